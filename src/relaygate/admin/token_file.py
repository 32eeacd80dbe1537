"""``admin.api_token_file``: the API token read from it (`read_token`), and the warning when every
local user may read it (`token_mode_warning`).

Apart from the HTTP application: the CLI (`relaygate check`, `relaygate queue`) and the admin server
read the same file."""

from __future__ import annotations

from pathlib import Path

from relaygate.file_modes import mode_granting


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
    if not all("!" <= c <= "~" for c in value):
        # it travels in an HTTP header (Authorization: Bearer): ASCII without spaces or controls
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r}: the API token must be printable ASCII "
            "without spaces"
        )
    return value


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
