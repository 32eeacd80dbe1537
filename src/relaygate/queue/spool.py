"""Spool files: the bytes of big messages, kept next to the queue database instead of inside it.

A message of ``SPOOL_THRESHOLD`` bytes or more goes to its own file in ``<queue dir>/spool``,
``fdatasync``'d *before* the database row that names it is committed, so a committed row always
finds its file (the order Postfix's cleanup follows for a queue file). Inside SQLite the same bytes
would go to the WAL and again to the database file at checkpoint time, two writes and a larger fsync
per message (9.5 ms p50 for 1 MB here, against 3.5 ms for a file).

The file's directory entry must be durable too. Rather than ``fsync`` the directory after every
message (a second flush on the path to the 250: 1 MB messages at one session ran 1.2x faster
without it), files are created ahead, ``READY_BATCH`` at a time, and the directory is ``fsync``'d
once for the batch before any of them is used; a message is then written into one of them in place,
and its ``fdatasync`` carries the new size. Each file waiting for a message is held under ``flock``
by its process, so that `sweep_orphans` in another process (a worker restarted beside it) leaves it
alone however long it waits, and stays held once written until the submit `release`s it (its row
committed, or never to be): between the two a sweep has only the file's modification time, which a
clock stepped forward would make old. The files created ahead and left when the store closes are
removed.

Files are named by a random token, not the queue id: the id is only allocated inside the write
transaction, and writing first lets several sessions fsync their files in parallel, off the single
writer thread. A crash between the file and the commit leaves an orphan file (or an empty one
created ahead); `sweep_orphans` removes those no row names once they are old enough that no other
process can still be about to commit them (the store runs it at open, and hourly with its purge).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from relaygate.durable_dirs import fsync_dir

__all__ = ["READY_BATCH", "SPOOL_THRESHOLD", "Spool", "SpoolClosedError", "fsync_dir"]

#: Messages at least this big are spooled to files; smaller ones ride in the group commit.
SPOOL_THRESHOLD = 64 * 1024

_ORPHAN_MIN_AGE = 3600.0  # seconds: far longer than any submit takes from file to commit

#: Spool files created ahead at a time (one directory fsync for all of them).
READY_BATCH = 8


class SpoolClosedError(Exception):
    """A write reached the spool after `Spool.close` (its store is closed)."""


class Spool:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._ready: list[tuple[str, int]] = []  # (name, fd held under flock), durable entries
        #: files written and not yet named by a committed row (`release`): still held, so that no
        #: sweep can take one for an old orphan however the clock moves meanwhile
        self._written: dict[str, int] = {}
        self._ready_lock = threading.Lock()  # writes run in several threads at once
        self._closed = False  # set by close: no batch may be created after it (nobody removes it)

    def open(self) -> None:
        """Create the directory (and make its entry durable). Idempotent."""
        with self._ready_lock:
            self._closed = False
        if not self.directory.exists():
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fsync_dir(self.directory.parent)

    def close(self) -> None:
        """Remove the files created ahead and not used (nothing names them); let go of the
        written ones still held (their submits are over: the store's writer has stopped)."""
        with self._ready_lock:
            ready, self._ready = self._ready, []
            written, self._written = self._written, {}
            self._closed = True
        for name, fd in ready:
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()
            os.close(fd)
        for fd in written.values():
            os.close(fd)

    def write(self, data: bytes) -> str:
        """Store `data` durably in a spool file; returns its name. The file stays held (flock)
        until `release`: call it once the row that names it is committed, or will not be.
        Blocking: run it in a thread."""
        name, fd = self._take()
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fdatasync(fd)  # the data and the new size; the entry was made durable ahead
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                (self.directory / name).unlink()
            raise
        with self._ready_lock:
            self._written[name] = fd
        return name

    def release(self, name: str) -> None:
        """Let go of written file `name` (its flock): its row is committed (a sweep now finds it
        named) or never will be (the caller removes it, or a later sweep does)."""
        with self._ready_lock:
            fd = self._written.pop(name, None)
        if fd is not None:
            os.close(fd)

    def _take(self) -> tuple[str, int]:
        """A file created ahead, its directory entry durable; a new batch when none is left.
        `SpoolClosedError` once closed: a write still in flight then (a session past the stop's
        grace time) would create a batch after close removed the last, held until the process
        exits and left behind as orphans."""
        with self._ready_lock:
            if self._closed:
                raise SpoolClosedError(f"spool {self.directory} is closed")
            if not self._ready:
                self._ready = self._create_batch(READY_BATCH)
            return self._ready.pop()

    def _create_batch(self, count: int) -> list[tuple[str, int]]:
        """Up to `count` files, fewer near the descriptor limit (at least one)."""
        made: list[tuple[str, int]] = []
        try:
            while len(made) < count:
                name = secrets.token_hex(12)
                try:
                    fd = os.open(
                        self.directory / name,
                        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                        0o600,
                    )
                except FileExistsError:  # pragma: no cover - 96 random bits
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EMFILE, errno.ENFILE) or len(made) < 2:
                        raise
                    # Out of descriptors (a connection flood): a smaller batch, one file given
                    # back for the directory's fsync, rather than refusing the message.
                    _discard(self.directory, made.pop())
                    break
                made.append((name, fd))
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new: nobody else can hold it
            fsync_dir(self.directory)
        except BaseException:
            for entry in made:
                _discard(self.directory, entry)
            raise
        return made

    def read(self, name: str) -> bytes:
        """The bytes of spool file `name`; ``FileNotFoundError`` if it is gone."""
        return (self.directory / _checked(name)).read_bytes()

    def read_head(self, name: str, limit: int) -> bytes:
        """The first `limit` bytes of spool file `name` (fewer when it is shorter), without reading
        further: unbuffered reads of what is still missing, never a buffer-full past `limit`.
        ``FileNotFoundError`` if it is gone. Blocking: run it in a thread."""
        parts: list[bytes] = []
        with open(self.directory / _checked(name), "rb", buffering=0) as f:
            # No more than the file holds: a read allocates the bytes it asks for first, and a
            # view asks for max_header_size (up to 2 GB) whatever the message's size.
            missing = min(limit, os.fstat(f.fileno()).st_size)
            while missing > 0:
                part = f.read(missing)
                if not part:
                    break
                parts.append(part)
                missing -= len(part)
        return b"".join(parts)

    def unlink(self, names: Iterable[str]) -> None:
        """Remove spool files whose rows are gone (already committed). Missing files are fine."""
        for name in names:
            with contextlib.suppress(FileNotFoundError, ValueError):
                (self.directory / _checked(name)).unlink()

    def sweep_orphans(self, referenced: set[str], *, min_age: float = _ORPHAN_MIN_AGE) -> int:
        """Remove files that no row names and that are older than `min_age` seconds (a crash
        between the file and its commit, or a file created ahead by a process that is gone).
        Returns how many were removed."""
        if not self.directory.exists():
            return 0
        cutoff = time.time() - min_age
        removed = 0
        for entry in os.scandir(self.directory):
            if entry.name in referenced or not entry.is_file():
                continue
            with contextlib.suppress(FileNotFoundError):
                if entry.stat().st_mtime < cutoff and _unlink_unless_held(entry.path, cutoff):
                    removed += 1
        return removed


def _discard(directory: Path, made: tuple[str, int]) -> None:
    """Close and remove a file created ahead that will not be used."""
    name, fd = made
    os.close(fd)
    with contextlib.suppress(OSError):
        (directory / name).unlink()


def _unlink_unless_held(path: str, cutoff: float) -> bool:
    """Unlink an old orphan unless a live process holds it (a file created ahead, waiting for a
    message) or it has been written since it was found old (it is a message's now: its row may
    be about to commit). Its holder keeps the flock until the message's bytes are written, so
    once the flock is ours the modification time says which."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if os.fstat(fd).st_mtime >= cutoff:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def _checked(name: str) -> str:
    """A spool file name from the database: our own hex tokens only, never a path."""
    if not name or not all(c in "0123456789abcdef" for c in name):
        raise ValueError(f"not a spool file name: {name!r}")
    return name
