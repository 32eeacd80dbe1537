"""Permission checks of the secret files an administrator copies into place (keys, tokens)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["mode_granting"]


def mode_granting(path: Path, bits: int) -> int | None:
    """The permission bits of `path` when they grant any of `bits` (0o007: every local user; 0o177:
    anyone but a reading owner), so that the caller can warn naming them; None when they do not, or
    when the file cannot be examined (the code that reads it says why)."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return None
    return mode if mode & bits else None
