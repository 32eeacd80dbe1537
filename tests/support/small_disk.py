"""A small file system of its own for a test (a tmpfs mounted under the test's tmp dir), and a
way to fill it: what a queue meets when its disk fills up, with the errors the kernel really
gives (ENOSPC from a write, from growing a file, from a mapped file), not injected ones.

Mounting needs root (the suite runs as root in CI); without it the test fails, never skips."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["fill", "small_tmpfs"]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of `size` (mount's syntax: "4m") at `path`, made here; unmounted at the end
    (lazily: a relay stopped by the test may still hold a file for a moment)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} (root needed): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def fill(path: Path) -> Path:
    """Write file `path` until its file system is full (ENOSPC); returns it. Remove it to give
    the space back."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    block = bytes(64 * 1024)
    try:
        while True:
            try:
                os.write(fd, block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if len(block) == 1:
                    break
                block = block[: len(block) // 2]  # the last blocks, down to the last byte
    finally:
        os.close(fd)
    return path
