"""Message rate counts shared by the worker processes of one node (``server.workers > 1``).

MessageRateLimit is "messages per minute per source", logon_failure_rate_limit "failed AUTH per
minute per client address" (smtp/limits.py `AuthFailures`, which takes back an attempt that
succeeded with `subtract`). With several workers, the sessions of one
source may reach several processes: an authenticated user connecting from several addresses always
can (smtp/steering.py keeps one *address* on one worker), and with ``worker_balance =
"connection"`` even one address spreads over every worker. Counted per process, the limit would be
multiplied by the number of workers. So the workers count such sources in one table:

* a file ``<data_dir>/run/message-rates``, created afresh by the supervisor before it starts any
  worker (`create`: written under a temporary name and renamed into place, so no worker ever sees a
  half-made file and a stale one from a previous run is simply replaced), and mapped by every worker
  (`SharedRateTable.open`, which checks the header: magic, layout version, size and the token of
  this run that the supervisor hands its workers in ``RELAYGATE_RATE_TABLE``);
* a fixed number of slots, one per key (the BLAKE2b digest of connector name, kind and value),
  found by open addressing: linear probing over at most PROBES slots from the digest's home slot;
* per slot, per-second buckets over the window: a ring of BUCKETS (second, count) pairs, the
  bucket of second s at index s % BUCKETS. A count is the sum of the buckets whose second is
  within the last WINDOW seconds. Seconds come from CLOCK_MONOTONIC (`time.monotonic`), one
  clock for every process on a Linux machine.

Approximation: a message counts from the second it was recorded in for WINDOW + 1 whole seconds
of that clock minus its fraction, i.e. between 60 and 61 seconds after it was recorded, never less:
the table never lets more than the limit through in any 60-second span; a sender may wait up to
one second longer than with the exact per-process window (`SlidingWindow`).

Eviction: a slot whose newest bucket is older than the window counts nothing and is taken over by
the next new key that probes it. A slot is never emptied, so a lookup stops at the first slot
never used (keys are placed at the first free or expired slot of their probe sequence).

When a new key finds no free or expired slot among its PROBES (the table is full of live keys),
`add` reports it and the caller counts that key in its own process, as before this table existed
(RateLimiter, which logs it once).

Locking: one ``flock`` on the file around every lookup or update. The kernel releases it when the
holder dies, even by SIGKILL, so a dead worker never blocks the others. Updates are ordered so that
a worker killed half-way loses at most the count it was adding, and never leaves a count that does
not expire or that another key inherits: a slot's newest second is raised before any of its
buckets gets that second (so a slot that looks expired has only expired buckets, and a key taking
it over starts from nothing), and a bucket of a new second gets its count before its second
(killed in between: the bucket still carries its old, expired second and counts nothing). At
worst a slot then looks live for a minute with nothing in it. The lock is waited for at most
LOCK_WAIT seconds (a holder stopped, not killed): past that the caller counts in its own process
for that message.

Seconds are stored as unsigned 32-bit: CLOCK_MONOTONIC counts from boot on Linux.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import mmap
import os
import secrets
import struct
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from relaygate.node_lock import flock_until

__all__ = [
    "RATE_TABLE_ENV",
    "LockedMap",
    "SharedRateTable",
    "TableMismatch",
    "create",
    "key_digest",
    "lock_briefly",
    "table_path",
]

logger = logging.getLogger("relaygate.smtp")

#: Set by the supervisor for its workers: ``<token hex> <path>`` of the table it created.
RATE_TABLE_ENV = "RELAYGATE_RATE_TABLE"

MAGIC = b"RGRATES\0"
VERSION = 1
WINDOW = 60  # seconds: MessageRateLimit is per minute
BUCKETS = WINDOW + 1  # seconds now-60 ... now, each its own bucket
PROBES = 32  # slots looked at from a key's home slot
DEFAULT_SLOTS = 8192  # x 512 bytes = 4 MiB, allocated at creation; 8,192 live senders per minute
LOCK_WAIT = 0.05  # seconds
SPIN_TRIES = 50  # tries of a held lock before sleeping (lock_briefly)
DIGEST = 16

# header: magic, version, slot count, slot size, buckets, token (16 bytes); slots from HEADER_SIZE
_HEADER = struct.Struct(f"<8sIIII{DIGEST}s")
HEADER_SIZE = 4096  # the slots start page-aligned
# slot: key digest, newest second, (unused), then BUCKETS x (second, count)
_SLOT_HEAD = struct.Struct(f"<{DIGEST}sII")
_U32 = struct.Struct("<I")
_PAIR = struct.Struct("<II")
SLOT_SIZE = 512
_BUCKETS_AT = _SLOT_HEAD.size  # offset of the first bucket in a slot
_ALL_BUCKETS = struct.Struct(f"<{2 * BUCKETS}I")
assert _BUCKETS_AT + _ALL_BUCKETS.size <= SLOT_SIZE
_EMPTY = bytes(DIGEST)


class TableMismatch(Exception):
    """The file is not the table this worker was told to use (size, version, token)."""


def table_path(data_dir: Path) -> Path:
    return Path(data_dir) / "run" / "message-rates"


def key_digest(connector: str, kind: str, value: str) -> bytes:
    """The slot key of (connector, kind, value): never all zeros (that marks a slot never used)."""
    raw = f"{connector}\0{kind}\0{value}".encode("utf-8", "surrogatepass")
    digest = hashlib.blake2b(raw, digest_size=DIGEST).digest()
    return digest if digest != _EMPTY else b"\1" + digest[1:]


def create(path: Path, *, slots: int = DEFAULT_SLOTS) -> bytes:
    """Create a fresh, empty table at `path` (replacing whatever was there); returns its token.

    Written under a temporary name in the same directory, then renamed: a process that opens
    `path` sees the old file or the whole new one, never a half-written header."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    token = secrets.token_bytes(DIGEST)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".message-rates.")
    try:
        # Every block allocated now (zeros), not sparse: a worker writing a slot in a hole of
        # its mapping when the disk is full would get SIGBUS and die between storing a message
        # and its 250. Without room here, the caller counts per worker instead.
        os.posix_fallocate(fd, 0, HEADER_SIZE + slots * SLOT_SIZE)
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, slots, SLOT_SIZE, BUCKETS, token), 0)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return token


def lock_briefly(fd: int, wait: float) -> bool:
    """Take an exclusive flock on `fd`; False if another process held it for `wait` seconds.
    A table's holder runs a few microseconds of Python, unless it was descheduled or stopped.
    So first a few tries a yield apart (SPIN_TRIES): a sibling worker accepting at the same
    moment on the other CPU is done by then, where a sleep of the shortest kind costs the event
    loop a quarter of a millisecond (7 % of the CPU per message at 10 sessions with 2 workers);
    then short sleeps, bounded in time (and so in count), never a blocking flock."""
    for _ in range(SPIN_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            os.sched_yield()  # the holder may be waiting for this CPU
    return flock_until(fd, time.monotonic() + wait, 0.0002)


class LockedMap:
    """A table file mapped in this process (`_mm`, from `_fd`) and locked by flock around each
    read-and-update (`lock_briefly`): the message-rate table here and node_connections'."""

    _fd: int
    _mm: mmap.mmap

    def close(self) -> None:
        self._mm.close()
        os.close(self._fd)

    def _lock(self) -> bool:
        """Take the table's lock; False if another process held it for LOCK_WAIT seconds."""
        return lock_briefly(self._fd, LOCK_WAIT)

    def _unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


class SharedRateTable(LockedMap):
    """A table created by `create`, mapped in this process. Single-threaded use (the event loop):
    the flock is on this process's own open file description."""

    def __init__(self, fd: int, mm: mmap.mmap, slots: int, path: Path) -> None:
        self._fd = fd
        self._mm = mm
        self.slots = slots
        self.path = path

    @classmethod
    def open(cls, path: Path, token: bytes | None = None) -> SharedRateTable:
        """Map the table at `path`; TableMismatch if its header is not what this code writes (or
        not `token`'s run), OSError if it cannot be opened."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise TableMismatch(f"{path}: {size} bytes, too short for a header")
            magic, version, slots, slot_size, buckets, found = _HEADER.unpack(
                os.pread(fd, _HEADER.size, 0)
            )
            if (magic, version, slot_size, buckets) != (MAGIC, VERSION, SLOT_SIZE, BUCKETS):
                raise TableMismatch(f"{path}: not a version {VERSION} message rate table")
            if slots < 1 or size != HEADER_SIZE + slots * SLOT_SIZE:
                raise TableMismatch(f"{path}: {size} bytes for {slots} slots")
            if token is not None and found != token:
                raise TableMismatch(f"{path}: made by another run of relaygate serve")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, slots, path)

    @classmethod
    def from_env(cls) -> SharedRateTable | None:
        """The table the supervisor created for this worker (RATE_TABLE_ENV), or None: not a
        worker of a supervisor, or the table cannot be used (logged; counts stay per process)."""
        raw = os.environ.get(RATE_TABLE_ENV)
        if not raw:
            return None
        token_hex, _, path = raw.partition(" ")
        try:
            return cls.open(Path(path), bytes.fromhex(token_hex))
        except (OSError, ValueError, TableMismatch) as exc:
            logger.error(
                "message rate and AUTH failure counts cannot be shared with the other workers (%s): "
                "message_rate_limit and logon_failure_rate_limit are counted per worker",
                exc,
            )
            return None

    # -------------------------------------------------------------------------------- slots

    def _find(self, key: bytes, now: int) -> tuple[int | None, int | None]:
        """(offset of `key`'s slot or None, offset of the first free or expired slot or None)."""
        mm = self._mm
        home = int.from_bytes(key[:8], "little") % self.slots
        reusable: int | None = None
        for i in range(min(PROBES, self.slots)):
            at = HEADER_SIZE + ((home + i) % self.slots) * SLOT_SIZE
            found, newest, _ = _SLOT_HEAD.unpack_from(mm, at)
            if found == key:
                return at, reusable
            if found == _EMPTY:  # never used: no key was placed past it
                return None, at if reusable is None else reusable
            if reusable is None and now - newest > WINDOW:
                reusable = at
        return None, reusable

    def _sum(self, at: int, now: int) -> int:
        values = _ALL_BUCKETS.unpack_from(self._mm, at + _BUCKETS_AT)
        horizon = now - WINDOW
        # A bucket of a later second than `now` (another process read the clock a moment later)
        # counts too: the clock is one for all of them.
        return sum(values[i + 1] for i in range(0, 2 * BUCKETS, 2) if values[i] >= horizon)

    # -------------------------------------------------------------------------------- API

    def counts(self, keys: Sequence[bytes], now: float) -> list[int] | None:
        """Each key's count in the window ending at `now` (`time.monotonic()`); None if the lock
        could not be had."""
        second = int(now)
        if not self._lock():
            return None
        try:
            out = []
            for key in keys:
                at, _ = self._find(key, second)
                out.append(0 if at is None else self._sum(at, second))
            return out
        finally:
            self._unlock()

    def add(self, keys: Sequence[bytes], now: float) -> list[bytes]:
        """Count one event for each key at `now`; returns the keys not counted (the table is full
        of live keys where they belong, or the lock could not be had).

        The order of the writes is what keeps a worker killed half-way from leaving a count that
        never expires or that another key inherits (see the module doc): the slot's key, then its
        newest second, then the bucket's count, then the bucket's second."""
        second = int(now)
        if not self._lock():
            return list(keys)
        missed: list[bytes] = []
        try:
            mm = self._mm
            for key in keys:
                at, reusable = self._find(key, second)
                if at is None:
                    if reusable is None:
                        missed.append(key)
                        continue
                    # Take over a free or expired slot: all its buckets are older than its newest
                    # second, so older than the window: they count nothing for the new key.
                    at = reusable
                    mm[at : at + DIGEST] = key
                if _U32.unpack_from(mm, at + DIGEST)[0] < second:
                    _U32.pack_into(mm, at + DIGEST, second)  # before any bucket gets `second`
                bucket = at + _BUCKETS_AT + (second % BUCKETS) * _PAIR.size
                held_second, count = _PAIR.unpack_from(mm, bucket)
                if held_second == second:
                    _U32.pack_into(mm, bucket + 4, count + 1)
                else:  # the ring's bucket of `second`, last used BUCKETS or more seconds ago
                    _U32.pack_into(mm, bucket + 4, 1)
                    _U32.pack_into(mm, bucket, second)
            return missed
        finally:
            self._unlock()

    def subtract(self, key: bytes, at: float) -> bool:
        """Take back one event that `add` counted for `key` at `at` (an AUTH attempt counted as
        failed before its password was checked, which succeeded); False if the lock could not be
        had. Once the bucket of `at`'s second has left the window (or the slot went to another
        key) the event counts nothing any more, and nothing is changed.

        One write, the bucket's count: a worker killed before it leaves the event counted, as a
        failure, until it expires with its bucket."""
        second = int(at)
        if not self._lock():
            return False
        try:
            found, _ = self._find(key, second)
            if found is not None:
                bucket = found + _BUCKETS_AT + (second % BUCKETS) * _PAIR.size
                held_second, count = _PAIR.unpack_from(self._mm, bucket)
                if held_second == second and count > 0:
                    _U32.pack_into(self._mm, bucket + 4, count - 1)
            return True
        finally:
            self._unlock()
