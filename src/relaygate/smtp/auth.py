"""SMTP AUTH users: a JSON file of argon2 hashes, managed by `relaygate user add/remove/list`.

Verification runs in a worker thread: argon2 is deliberately slow and must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import tempfile
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = ["UserStore", "users_path"]

logger = logging.getLogger("relaygate.smtp")
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A real hash to verify against for unknown users, so timing does not reveal which names exist.
    Made on first use (and warmed by the server at start), not at import: every CLI verb imports this."""
    return _HASHER.hash("relaygate-dummy-password")


def users_path(data_dir: Path, explicit: Path | None = None) -> Path:
    return explicit if explicit is not None else data_dir / "users.json"


class UserStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: dict[str, str] = {}
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def reload(self) -> None:
        self._stamp = self._file_stamp()
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self._users = {str(k).lower(): str(v) for k, v in data.get("users", {}).items()}
        except FileNotFoundError:
            self._users = {}

    def refresh(self) -> None:
        """Re-read the file if `relaygate user add/remove` changed it (a stat per AUTH, no restart)."""
        if self._file_stamp() != self._stamp:
            try:
                self.reload()
            except (OSError, ValueError) as exc:  # a broken file: keep the users we had
                logger.error("cannot read users file %s: %s", self.path, exc)

    def names(self) -> list[str]:
        return sorted(self._users)

    def __len__(self) -> int:
        return len(self._users)

    def __contains__(self, user: object) -> bool:
        """Whether `user` (a canonical, lower-case name) is in the file as last read."""
        return user in self._users

    def _verify_sync(self, user: str, password: str) -> bool:
        self.refresh()
        stored = self._users.get(user.lower())
        try:
            _HASHER.verify(stored or _dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored is not None

    async def warm_up(self) -> None:
        await asyncio.to_thread(_dummy_hash)

    async def verify(self, user: str, password: str) -> bool:
        return await asyncio.to_thread(self._verify_sync, user, password)

    def set_password(self, user: str, password: str) -> None:
        self._users[user.lower()] = _HASHER.hash(password)
        self._save()

    def remove(self, user: str) -> bool:
        found = self._users.pop(user.lower(), None) is not None
        if found:
            self._save()
        return found

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"users": self._users}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
