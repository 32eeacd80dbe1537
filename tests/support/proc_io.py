"""What this process has read: the measure of a test that something is *not* read (the body of a
20 MB message shown for its header). The in-process relay and the store's threads count too."""

from __future__ import annotations

from pathlib import Path


def bytes_read() -> int:
    """Bytes read so far by this process (every thread) with read(2) and its kin: files, the
    database, sockets (``rchar`` of /proc/self/io)."""
    for line in Path("/proc/self/io").read_text(encoding="ascii").splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")
