"""Open SMTP connections counted for the node, not per worker (``server.workers > 1``).

max_inbound_connection (per receive connector) and max_inbound_connection_per_source (per
connector and client address) are limits of the server, as Exchange's are. Counted by each worker
alone, N workers let a connector hold N times its limit, and with ``worker_balance =
"connection"`` (or where no steering program runs) one address N times its own. So the workers
count their open connections in one table:

* a file ``/dev/shm/relaygate-<digest of data_dir>/connections`` (`table_path`; in
  ``<data_dir>/run`` without /dev/shm), created afresh by the supervisor before it starts any
  worker (`create`: written under a temporary name and renamed into place, with the token of this
  run that the supervisor hands its workers in ``RELAYGATE_CONNECTION_TABLE``), mapped by every
  worker (`NodeConnections.from_env`), and removed when the node stops (`remove`). A node killed
  outright leaves it: the next start replaces it (the dead run's counts are gone), or removes it
  when that start has no use for a table;
* a fixed number of slots, one per key (`key_digest` of connector name, kind and client address),
  found by linear probing over at most PROBES slots from the key's home slot; a slot is never
  emptied (a lookup stops at the first slot never used), and one whose counts are all zero is
  taken over by the next new key that probes it;
* per slot, one count per worker: worker i writes only its own column. A worker that dies, even
  by SIGKILL, holds no connection any more: the supervisor zeroes its column as soon as it sees
  it exit (`clear_worker`), and a worker zeroes its own column as it starts.

Locking: one ``flock`` on the file around each admission (counts read, compared with the limits,
the worker's own counts raised). The kernel releases it when the holder dies. A release takes no
lock: it lowers this worker's own column in the slots its admission returned, which no other
process writes, and which cannot be given to another key while that column counts a connection
(the supervisor's `clear_worker` runs only once this worker is gone).
The lock is waited for at most shared_rates.LOCK_WAIT seconds; past that, or when a key finds no slot (the
table full of live keys), the connection is counted by its worker alone, as before this table
(`NodeConnectionLimits`, which logs it once). Zeroing a worker's column takes no lock
(`clear_worker`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import mmap
import os
import secrets
import stat
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

from relaygate.config.model import ReceiveConnector
from relaygate.replies import Reply
from relaygate.smtp.limits import ConnectionLimits, connection_refusal
from relaygate.smtp.shared_rates import LockedMap, key_digest

__all__ = [
    "CONNECTION_TABLE_ENV",
    "SHARED_MEMORY",
    "NodeConnectionLimits",
    "NodeConnections",
    "create",
    "remove",
    "table_path",
]

logger = logging.getLogger("relaygate.smtp")

#: Set by the supervisor for its workers: ``<token hex> <path>`` of the table it created.
CONNECTION_TABLE_ENV = "RELAYGATE_CONNECTION_TABLE"

MAGIC = b"RGCONNS\0"
VERSION = 1
DIGEST = 16
PROBES = 32
DEFAULT_SLOTS = 16384  # connector keys and live sources: 16 + 4 x workers bytes each

# header: magic, version, slot count, workers, token; the slots from HEADER_SIZE
_HEADER = struct.Struct(f"<8sIII{DIGEST}s")
HEADER_SIZE = 4096
_U32 = struct.Struct("<I")
_EMPTY = bytes(DIGEST)


class TableMismatch(Exception):
    """The file is not the table this worker was told to use (size, version, token)."""


#: Shared memory, when the system has it (Linux: a tmpfs). Not data_dir: a file there that the
#: workers write through mmap at every connection is dirty at every queue commit, and the
#: filesystem's journal writes it with each one (7 % more CPU per message at 10 sessions).
SHARED_MEMORY = Path("/dev/shm")


def table_path(data_dir: Path) -> Path:
    """``/dev/shm/relaygate-<digest of data_dir>/connections`` (one per node on the machine),
    or ``<data_dir>/run/connections`` where there is no /dev/shm to write to."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK | os.X_OK):
        digest = hashlib.sha256(os.fsencode(Path(data_dir).resolve())).hexdigest()[:16]
        folder = SHARED_MEMORY / f"relaygate-{digest}"
        if _ours_alone(folder):
            return folder / "connections"
    return Path(data_dir) / "run" / "connections"


def _ours_alone(folder: Path) -> bool:
    """`folder` (in a directory every local user may write) does not exist yet, or is a real
    directory of this user that no one else may write: another user could have made it first,
    to swap the table under the workers."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _slot_size(workers: int) -> int:
    return DIGEST + 4 * workers


def create(path: Path, workers: int, *, slots: int = DEFAULT_SLOTS) -> bytes:
    """A fresh, empty table for `workers` workers at `path` (replacing whatever was there);
    returns its token. Every block allocated now: a worker never meets a hole on a full disk."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_bytes(DIGEST)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".connections.")
    try:
        os.posix_fallocate(fd, 0, HEADER_SIZE + slots * _slot_size(workers))
        os.pwrite(fd, _HEADER.pack(MAGIC, VERSION, slots, workers, token), 0)
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


def remove(path: Path) -> None:
    """The table at `path` deleted, with its folder in shared memory (which holds its memory
    until the machine restarts); nothing there is fine."""
    with contextlib.suppress(OSError):
        path.unlink()
    if path.parent.parent == SHARED_MEMORY:
        with contextlib.suppress(OSError):
            path.parent.rmdir()


class NodeConnections(LockedMap):
    """The table `create` made, mapped in this process (the event loop's, or the supervisor's)."""

    def __init__(self, fd: int, mm: mmap.mmap, slots: int, workers: int, path: Path) -> None:
        self._fd = fd
        self._mm = mm
        self.slots = slots
        self.workers = workers
        self.path = path
        self._slot = _slot_size(workers)
        self._columns = struct.Struct(f"<{workers}I")

    @classmethod
    def open(cls, path: Path, token: bytes) -> NodeConnections:
        """TableMismatch if the header is not this code's or not `token`'s run; OSError if the
        file cannot be opened."""
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:
                raise TableMismatch(f"{path}: {size} bytes, too short for a header")
            magic, version, slots, workers, found = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
            if (magic, version) != (MAGIC, VERSION) or workers < 1:
                raise TableMismatch(f"{path}: not a version {VERSION} connection table")
            if size != HEADER_SIZE + slots * _slot_size(workers):
                raise TableMismatch(f"{path}: {size} bytes for {slots} slots")
            if found != token:
                raise TableMismatch(f"{path}: made by another run of relaygate serve")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, mm, slots, workers, path)

    @classmethod
    def from_env(cls) -> NodeConnections | None:
        """The table the supervisor created for this worker, or None (none, or unusable: logged,
        and the connections are counted per worker)."""
        raw = os.environ.get(CONNECTION_TABLE_ENV)
        if not raw:
            return None
        token_hex, _, path = raw.partition(" ")
        try:
            return cls.open(Path(path), bytes.fromhex(token_hex))
        except (OSError, ValueError, TableMismatch) as exc:
            logger.error(
                "open connections cannot be counted with the other workers (%s): "
                "max_inbound_connection and max_inbound_connection_per_source are counted per "
                "worker",
                exc,
            )
            return None

    def _find(self, key: bytes, place: bool, keep: Sequence[int | None] = ()) -> int | None:
        """The offset of `key`'s slot; with `place`, a slot taken for it if it has none (a
        never-used one, or one that counts nothing and is not among `keep`: the slots of the
        other keys of the same admission), else None."""
        mm = self._mm
        home = int.from_bytes(key[:8], "little") % self.slots
        reusable: int | None = None
        for i in range(min(PROBES, self.slots)):
            at = HEADER_SIZE + ((home + i) % self.slots) * self._slot
            found = mm[at : at + DIGEST]
            if found == key:
                return at
            if found == _EMPTY:  # never used: no key was placed past it
                reusable = at if reusable is None else reusable
                break
            if (
                place
                and reusable is None
                and at not in keep
                and not any(self._columns.unpack_from(mm, at + DIGEST))
            ):
                reusable = at
        if place and reusable is not None:
            mm[reusable : reusable + DIGEST] = key
        return reusable if place else None

    def _total(self, at: int | None) -> int:
        return 0 if at is None else sum(self._columns.unpack_from(self._mm, at + DIGEST))

    def admit(
        self, keys: tuple[bytes, bytes], worker: int, decide: Callable[[int, int], Reply | None]
    ) -> Reply | tuple[int, ...] | Literal[False]:
        """One connection for (connector key, source key): `decide(open on the connector, open
        from the source)`, both for the node, and when it refuses nothing, each counted for
        `worker`. Returns decide's refusal, the slots that count the connection (for
        `release`), or False when the table cannot count it (no lock, no slot): the caller
        counts it alone."""
        if not self._lock():
            return False
        try:
            found = [self._find(key, place=False) for key in keys]
            refusal = decide(self._total(found[0]), self._total(found[1]))
            if refusal is not None:
                return refusal
            # One key at a time, and never in the slot of the other (two keys in one slot would
            # count each other's connections): a slot counting this connection is not free, and
            # the other key's slot found above may count nothing yet.
            counted: list[int] = []
            for key, known in zip(keys, found, strict=True):
                at = known if known is not None else self._find(key, place=True, keep=found)
                if at is None:  # no room for it: this connection is counted by its worker
                    for done in counted:
                        self._add(done, worker, -1)
                    return False
                self._add(at, worker, 1)
                counted.append(at)
            return tuple(counted)
        finally:
            self._unlock()

    def _add(self, at: int, worker: int, delta: int) -> None:
        column = at + DIGEST + 4 * worker
        count = _U32.unpack_from(self._mm, column)[0]
        _U32.pack_into(self._mm, column, max(0, count + delta))

    def release(self, slots: tuple[int, ...], worker: int) -> None:
        """The connection `admit` counted for `worker` in `slots` ended. No lock (see the module's
        docstring): a connection's close costs no system call, and is counted out even while
        another process holds the lock."""
        for at in slots:
            self._add(at, worker, -1)

    def clear_worker(self, worker: int) -> None:
        """Worker `worker` exited (the supervisor) or starts (itself): it holds no connection.
        Without the lock, which a stopped worker may hold (the supervisor must not wait): only
        that worker writes its column, and it is gone or not serving yet, so whatever a reader
        sees meanwhile is a count between what it held and none."""
        mm = self._mm
        for slot in range(self.slots):
            column = HEADER_SIZE + slot * self._slot + DIGEST + 4 * worker
            if mm[column : column + 4] != b"\0\0\0\0":
                _U32.pack_into(mm, column, 0)


class NodeConnectionLimits(ConnectionLimits):
    """`ConnectionLimits` decided on the node's counts (`NodeConnections`); this worker's own
    counts are kept as well (its /metrics gauges, and what it counts alone when the table cannot
    count a connection)."""

    def __init__(self, table: NodeConnections, worker: int) -> None:
        super().__init__()
        self.table = table
        self.worker = worker
        #: the connections of each (connector, source) that the table counted, and the slots
        #: counting them (the same for all of them: a slot stays its key's while it counts)
        self._in_table: dict[tuple[str, str], tuple[int, tuple[int, ...]]] = {}
        self._said_alone = False

    @staticmethod
    @functools.lru_cache(maxsize=4096)  # a connection's keys again at its release, a busy source's
    def _keys(name: str, source: str) -> tuple[bytes, bytes]:
        return key_digest(name, "connections", ""), key_digest(name, "connections-from", source)

    def admit(self, connector: ReceiveConnector, source: str) -> Reply | None:
        name = connector.name
        outcome = self.table.admit(
            self._keys(name, source),
            self.worker,
            lambda active, from_source: connection_refusal(connector, active, from_source),
        )
        if outcome is False:
            if not self._said_alone:
                self._said_alone = True
                logger.warning(
                    "connection table %s full or busy: some connections to receive connector %s "
                    "are counted by this worker alone",
                    self.table.path,
                    name,
                )
            return super().admit(connector, source)
        if isinstance(outcome, Reply):
            return outcome
        self.per_connector[name] += 1
        self.per_source[(name, source)] += 1
        held, _slots = self._in_table.get((name, source), (0, outcome))
        self._in_table[(name, source)] = (held + 1, outcome)
        return None

    def release(self, connector: ReceiveConnector, source: str) -> None:
        super().release(connector, source)
        key = (connector.name, source)
        entry = self._in_table.get(key)
        if entry is not None:
            held, slots = entry
            if held == 1:
                del self._in_table[key]
            else:
                self._in_table[key] = (held - 1, slots)
            self.table.release(slots, self.worker)
