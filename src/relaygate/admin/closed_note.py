"""Why worker 0's admin listener is closed while the node runs: ``<data_dir>/run/admin-closed``.

Worker 0 started again whose admin certificate pair does not load serves SMTP with its admin
listener closed until the files load (relaygate.admin.server). `relaygate queue`, which goes
through that listener, found nothing answering and said the relay was not running. The admin
server writes the reason here when it leaves the listener closed and removes it once it listens
or stops; the CLI reads it only while a `relaygate serve` holds the node lock, so a note left by
a node killed outright is never shown for a relay that is not running.

Apart from the HTTP application: the CLI imports it without Starlette.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["CLOSED_NOTE", "clear_closed", "closed_reason", "note_closed"]

#: Under ``server.data_dir`` (mode 0600: it names the key files).
CLOSED_NOTE = Path("run") / "admin-closed"


def note_closed(data_dir: Path, reason: str) -> None:
    """Say why the admin listener is closed (blocking: run it in a thread). Replaced at once, so
    that a reader never sees half of it; a note that cannot be written only costs the CLI its
    reason."""
    path = Path(data_dir) / CLOSED_NOTE
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(reason.strip() + "\n")
        os.replace(tmp, path)


def clear_closed(data_dir: Path) -> None:
    """The admin listener listens (or the node stops): no note (blocking: run it in a thread)."""
    with contextlib.suppress(OSError):
        (Path(data_dir) / CLOSED_NOTE).unlink()


def closed_reason(data_dir: Path) -> str | None:
    """The reason worker 0 gave for its closed admin listener, or None (no note)."""
    try:
        text = (Path(data_dir) / CLOSED_NOTE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.strip() or None
