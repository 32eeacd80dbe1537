"""Directories whose entries survive a power cut: a new file or directory is durable only once the
directory holding it is fsync'd too (POSIX; ext4's ordered mode often hides the omission, other
file systems and a strict reading do not).

`make_dirs_durably` is ``mkdir -p`` for the directories the relay creates on its first start
(``server.data_dir``, its ``queue`` folder): whichever code creates ``data_dir`` first, its entry
must be durable, or a power cut soon after a first start takes the whole queue (every message the
relay has said 250 to) with it (tests/smtp/test_power_cut.py).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["fsync_dir", "make_dirs_durably"]


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (a file created or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durably(path: Path) -> None:
    """mkdir -p, then fsync the parent of every directory it created (innermost first). Nothing
    to do, and no fsync, when `path` exists."""
    missing: list[Path] = []
    p = Path(path)
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if not missing:
        return
    Path(path).mkdir(parents=True, exist_ok=True)
    for d in missing:
        fsync_dir(d.parent)
