"""Spend every file descriptor of this process for a while (what a connection flood does to a
relay): the soft RLIMIT_NOFILE brought down to what is open plus a few, those few opened."""

from __future__ import annotations

import contextlib
import os
import resource
from collections.abc import Iterator

import pytest

__all__ = ["descriptors_spent"]


@contextlib.contextmanager
def descriptors_spent() -> Iterator[None]:
    """Every descriptor in use inside the block (EMFILE for any new one); given back after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
    held: list[int] = []
    try:
        with pytest.raises(OSError, match="Too many open files"):
            for _ in range(64):
                held.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
