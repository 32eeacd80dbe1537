"""``admin.api_token_file``: the API token read from it (`read_token`), the warning when every
local user may read it (`token_mode_warning`), and, with ``server.workers > 1``, the copy of the
token worker 0 (the admin centre's) runs (`keep_applied_token`, `applied_token`).

Apart from the HTTP application: the CLI (`relaygate check`, `relaygate queue`) and the admin server
read the same file."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from relaygate.file_modes import mode_granting

#: Under ``server.data_dir``: the token worker 0 runs and the file it was read from (mode 0600).
APPLIED_TOKEN_FILE = Path("run") / "admin-token-applied.json"


class TokenFileError(ValueError):
    """``admin.api_token_file`` is set but holds no token."""


def read_token(path: Path | None) -> str | None:
    """The API token from ``admin.api_token_file`` (first line, stripped); None when no file is
    configured. A file that is configured but empty raises :class:`TokenFileError`: the token is
    there to protect the queue, so a file emptied by mistake must not open the API and the admin
    centre to everyone (``OSError`` when it cannot be read)."""
    if path is None:
        return None
    try:
        # utf-8-sig: Notepad and PowerShell 5.1 (Set-Content -Encoding UTF8) write a BOM first
        token = Path(path).read_text(encoding="utf-8-sig").strip().splitlines()
    except UnicodeDecodeError:
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r} is not UTF-8 text (saved as UTF-16?)"
        ) from None
    if not token or not token[0].strip():
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r} is empty: its first line must be the API token"
        )
    value = token[0].strip()
    if not _printable(value):
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r}: the API token must be printable ASCII "
            "without spaces"
        )
    return value


def _printable(value: str) -> bool:
    """What an API token may hold: it travels in an HTTP header (Authorization: Bearer)."""
    return all("!" <= c <= "~" for c in value)


def token_mode_warning(path: Path | None) -> str | None:
    """A warning when ``admin.api_token_file`` is readable or writable by every local user (a
    copy keeps `cp`'s 0644): the listener is on loopback, so they all reach it, and the token is
    all that stops them listing and removing the queue. Group access is left alone (the admins
    who run `relaygate queue` read the file). None otherwise, or when it cannot be examined."""
    mode = None if path is None else mode_granting(path, 0o007)
    if mode is None:
        return None
    return (
        f"admin.api_token_file {str(path)!r} has mode {mode:04o}: every local user can read the "
        f"API token and use the queue's API and the admin centre with it; chmod o-rwx {path}"
    )


def applied_token_path(data_dir: Path) -> Path:
    return Path(data_dir) / APPLIED_TOKEN_FILE


def keep_applied_token(data_dir: Path, token_file: Path | None, token: str | None) -> None:
    """Worker 0, once it runs `token` (read from `token_file`, at start or at a reload): kept
    for the worker 0 started after it (`applied_token`). Files the configuration names are read
    as they are when a worker starts: a token file emptied, removed or made unreadable since
    (a reload then refused, the running token kept) would otherwise stop a restarted worker 0
    from starting at all, a crash loop. Blocking: call it in a thread."""
    path = applied_token_path(data_dir)
    if token_file is None or token is None:
        forget_applied_token(data_dir)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump({"file": str(token_file), "token": token}, f)
    os.replace(tmp, path)


def applied_token(data_dir: Path, token_file: Path | None) -> str | None:
    """The token a previous worker 0 of this run kept (`keep_applied_token`) when it read it
    from `token_file`, or None (none kept, another file, or a copy that cannot be used)."""
    if token_file is None:
        return None
    try:
        kept = json.loads(applied_token_path(data_dir).read_text(encoding="utf-8"))
        file, token = kept["file"], kept["token"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if file != str(token_file) or not isinstance(token, str):
        return None
    value = token.strip()
    # what read_token takes, and nothing else: never an admin centre open to an empty token
    return value if value and _printable(value) else None


def forget_applied_token(data_dir: Path) -> None:
    """No token kept (the supervisor, before it starts any worker: a worker 0 that cannot read
    the file at the node's start does not start; or no token file configured any more)."""
    with contextlib.suppress(FileNotFoundError):
        applied_token_path(data_dir).unlink()
