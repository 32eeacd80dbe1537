"""SMTP AUTH users: a JSON file of argon2 hashes, managed by `relaygate user add/remove/list`.

Each user may have a send-as list (`relaygate user send-as`): the file's optional `send_as` object,
user name → patterns in the `allowed_senders` language. A file without it (as written before the
lists existed) loads unchanged, and the file keeps `users` as it was, so an older RelayGate still
reads the passwords (it ignores the lists).

Verification runs in a worker thread: argon2 is deliberately slow and must not stall the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from relaygate.address_patterns import AddressRule
from relaygate.durable_dirs import fsync_dir, make_dirs_durably
from relaygate.policy.address_rules import SendAsList, parse_send_as

__all__ = ["UserStore", "UsersFileError", "users_path"]

logger = logging.getLogger("relaygate.smtp")
_HASHER = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """A real hash to verify against for unknown users, so timing does not reveal which names exist.
    Made on first use (and warmed by the server at start), not at import: every CLI verb imports this."""
    return _HASHER.hash("relaygate-dummy-password")


def users_path(data_dir: Path, explicit: Path | None = None) -> Path:
    return explicit if explicit is not None else data_dir / "users.json"


class UsersFileError(ValueError):
    """The users file cannot be used at start (the server does not start without its users)."""


@dataclass(frozen=True, slots=True)
class _Users:
    """The file as last read, replaced whole (a session reads it while a thread re-reads the file):
    `hashes` by user, and the send-as lists of the users that have one, compiled."""

    hashes: dict[str, str] = field(default_factory=dict)
    send_as: dict[str, SendAsList] = field(default_factory=dict)


def _read_users(data: Any) -> _Users:
    """The users file's JSON `data`. ValueError naming the user and the pattern for a send-as
    entry that is not a list of patterns `allowed_senders` takes."""
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    hashes = {str(k).lower(): str(v) for k, v in data.get("users", {}).items()}
    lists: dict[str, SendAsList] = {}
    for name, patterns in (data.get("send_as") or {}).items():
        user = str(name).lower()
        if not isinstance(patterns, list):
            raise ValueError(f"send_as of user {user}: expected a list of patterns")
        try:
            rules = parse_send_as(patterns)
        except ValueError as exc:
            raise ValueError(f"send_as of user {user}: {exc}") from None
        if rules:  # an empty list is no list, as an empty allowed_senders is no restriction
            lists[user] = SendAsList.compile(user, rules)
    return _Users(hashes, lists)


class UserStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._state = _Users()
        self._stamp: tuple[int, int, int] | None = None
        self.reload()

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_ino, st.st_size)

    def reload(self) -> None:
        """Read the file (ValueError naming it when it cannot be used; none is no users)."""
        self._stamp = self._file_stamp()  # a broken file is reported once, not at every AUTH
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._state = _Users()
            return
        self._state = _read_users(json.loads(text))

    def changed(self) -> bool:
        """Whether the file changed since it was last read (one stat: cheap enough for each MAIL
        on the event loop; the re-read, `refresh`, goes to a thread)."""
        return self._file_stamp() != self._stamp

    def refresh(self) -> None:
        """Re-read the file if `relaygate user add/remove` changed it (a stat per AUTH, no restart)."""
        if self.changed():
            try:
                self.reload()
            except (OSError, ValueError) as exc:  # a broken file: keep the users we had
                logger.error("cannot read users file %s: %s", self.path, exc)

    def names(self) -> list[str]:
        return sorted(self._state.hashes)

    def __len__(self) -> int:
        return len(self._state.hashes)

    def __contains__(self, user: object) -> bool:
        """Whether `user` (a canonical, lower-case name) is in the file as last read."""
        return user in self._state.hashes

    def send_as(self, user: str) -> SendAsList | None:
        """`user`'s send-as list as last read (None: the user has none: it may send as any sender
        the connector allows). The same object until the file changes."""
        return self._state.send_as.get(user.lower())

    def without_send_as(self) -> list[str]:
        """The users that have no send-as list (for `relaygate audit`)."""
        return [name for name in self.names() if name not in self._state.send_as]

    def _verify_sync(self, user: str, password: str) -> bool:
        self.refresh()
        stored = self._state.hashes.get(user.lower())
        try:
            _HASHER.verify(stored or _dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        return stored is not None

    async def warm_up(self) -> None:
        await asyncio.to_thread(_dummy_hash)

    async def verify(self, user: str, password: str) -> bool:
        return await asyncio.to_thread(self._verify_sync, user, password)

    def set_password(
        self, user: str, password: str, send_as: Sequence[AddressRule] | None = None
    ) -> None:
        """Add `user` or change its password; `send_as` (parsed by `parse_send_as`) replaces its
        send-as list, None keeps the list it has."""
        name = user.lower()
        hashes = {**self._state.hashes, name: _HASHER.hash(password)}
        self._save(_Users(hashes, self._lists_with(name, send_as)))

    def set_send_as(self, user: str, send_as: Sequence[AddressRule]) -> bool:
        """Replace the send-as list of `user` (empty: remove it). False when there is no such user."""
        name = user.lower()
        if name not in self._state.hashes:
            return False
        self._save(_Users(self._state.hashes, self._lists_with(name, send_as or ())))
        return True

    def _lists_with(
        self, name: str, send_as: Sequence[AddressRule] | None
    ) -> dict[str, SendAsList]:
        lists = dict(self._state.send_as)
        if send_as is None:
            return lists
        if send_as:
            lists[name] = SendAsList.compile(name, send_as)
        else:
            lists.pop(name, None)
        return lists

    def remove(self, user: str) -> bool:
        name = user.lower()
        if name not in self._state.hashes:
            return False
        hashes = {k: v for k, v in self._state.hashes.items() if k != name}
        lists = {k: v for k, v in self._state.send_as.items() if k != name}
        self._save(_Users(hashes, lists))
        return True

    def _save(self, state: _Users) -> None:
        data: dict[str, Any] = {"users": state.hashes}
        if state.send_as:  # only when there are lists: files without them stay as they were
            data["send_as"] = {name: lst.texts for name, lst in state.send_as.items()}
        make_dirs_durably(self.path.parent)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users.")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)
        # The rename is an entry of the folder: synced, or a power cut brings the old file back
        # (a user the CLI said was added, or removed, is not, or is still there).
        fsync_dir(self.path.parent)
        self._state = state
