"""The SQLite store's writer thread and its group commit, the WAL written ahead, and the
checkpointer thread.

One dedicated writer thread owns the write connection. Every mutating call is put on a queue and
awaited through an asyncio future (`_write`); the writer takes everything that is queued (up to
``max_batch_items`` / ``max_batch_bytes``) and runs it in ONE transaction (if a call fails, the
batch runs again with each call inside its own SAVEPOINT), commits (one fsync), then resolves the
futures with ``loop.call_soon_threadsafe``. See sqlite_store.py for the design as a whole.

A base class of `SqliteStore`, which sets up the state declared below in its ``__init__``: kept
apart so that the threading and durability machinery reads on its own, without the SQL of each
operation (sqlite_ops.py) or of the reads (sqlite_reads.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from relaygate.durable_dirs import make_dirs_durably

from .model import QueueIdGenerator
from .spool import Spool, fsync_dir
from .sqlite_schema import create_or_upgrade
from .store import StoreClosedError, StoreError, StoreFullError, StoreOutcomeUnknownError

#: The store's logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.queue.sqlite_store")

T = TypeVar("T")

_CKPT_BYTES = 4 * 1024 * 1024  # wake the checkpointer after this much new data
_WAL_LIMIT = 64 * 1024 * 1024  # PRAGMA journal_size_limit: SQLite truncates a restarted WAL to this
_WAL_RESERVE_FIRST = 4 * 1024 * 1024  # WAL space written ahead at open, then this much more ...
_WAL_RESERVE_STEP = 16 * 1024 * 1024  # ... when less than half of it is left, up to _WAL_LIMIT
_WAL_HEADER = 32  # bytes before the first frame; each frame is a 24-byte header and a page
_WAL_INDEX_REGION = 32 * 1024  # the -shm file grows by regions of this size ...
_WAL_INDEX_FRAMES = 4096  # ... each indexing this many frames (wal.c: HASHTABLE_NPAGE)
#: After a write failed with an I/O error, the checkpoint that lets the store take writes again
#: (_recover_wal) is tried at most this often, before a batch: the batches in between are refused.
_WAL_RECOVERY_INTERVAL = 1.0


@dataclass(slots=True)
class _Op:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    size: int
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    durable: bool = True


_STOP = object()


def _resolve(items: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    """Runs on the event loop: hand each caller its outcome."""
    for fut, ok, value in items:
        if fut.done():  # the caller was cancelled
            continue
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)


#: Less free space than this on the queue's file system makes an I/O error of the database a full
#: disk. SQLite says SQLITE_FULL only where a page write runs out of space; growing its -shm index
#: on a full disk is SQLITE_IOERR_SHMSIZE (what a relay on a full tmpfs met first), a "disk I/O
#: error" that the client would get as 451 4.3.0 instead of the full disk's 452 4.3.1.
_FULL_BELOW = 1024 * 1024


def _disk_full(directory: Path) -> bool:
    """True if the file system holding `directory` has (almost) no space left. Called after a
    failed write only, never on the commit path."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < _FULL_BELOW


def _damaged(exc: BaseException) -> bool:
    """SQLite found the database file damaged (SQLITE_CORRUPT, SQLITE_NOTADB)."""
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)


def _wrap_error(exc: BaseException, db: Path | None = None) -> BaseException:
    """Engine errors become StoreError (a fresh instance per caller); others pass through.
    `db`: the database file, named when it is damaged; its directory's disk is looked at for an
    I/O error that a full disk caused (see _FULL_BELOW)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        io_error_on_full_disk = (
            db is not None
            and code is not None
            # CANTOPEN: a connection opened again after a failed commit rebuilds the -shm index
            and code & 0xFF in (sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN)
            and _disk_full(db.parent)
        )
        if code == sqlite3.SQLITE_FULL or io_error_on_full_disk:
            err: StoreError = StoreFullError(f"queue database full: {exc}")
        elif db is not None and _damaged(exc):
            err = StoreError(
                f"queue database {db} is damaged ({exc}): stop the relay, then recover the file"
                " (sqlite3's .recover) or restore it"
            )
        else:
            err = StoreError(f"queue database error: {exc}")
        err.__cause__ = exc
        return err
    return exc


def _frames_not_written(exc: BaseException) -> bool:
    """A COMMIT that failed with SQLITE_FULL did not commit. In WAL mode SQLite returns it only
    from writing the transaction's frames (a short write, ENOSPC), and the commit frame is written
    last, its checksum over the whole page: a frame cut short is no commit when the WAL is read
    again. What can fail after the commit frame is written returns other codes (the fsync:
    SQLITE_IOERR_FSYNC, the -shm index: SQLITE_IOERR_SHMSIZE; wal.c, walFrames). So the client
    of a full disk gets 452 4.3.1, not a connection closed without a reply. Unless SQLite was
    built without powersafe overwrite: it then pads the WAL after the commit frame with copies
    of it, and a full disk can fail those."""
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL and _powersafe_overwrite()


@functools.cache
def _powersafe_overwrite() -> bool:
    """SQLite's unix VFS has SQLITE_IOCAP_POWERSAFE_OVERWRITE unless built with it off."""
    conn = sqlite3.connect(":memory:")
    try:
        options = {row[0] for row in conn.execute("PRAGMA compile_options")}
    finally:
        conn.close()
    return "POWERSAFE_OVERWRITE=0" not in options


def _io_error(exc: BaseException) -> bool:
    """SQLite's SQLITE_IOERR family: IOERR_FSYNC (a failed fsync), IOERR_WRITE, IOERR_SHMSIZE..."""
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_IOERR
    )


def _outcome_unknown(exc: BaseException) -> StoreOutcomeUnknownError:
    err = StoreOutcomeUnknownError(f"queue database commit failed, outcome unknown: {exc}")
    err.__cause__ = exc
    return err


class _SqliteWriter:
    """The writer and checkpointer threads of `SqliteStore` (whose ``__init__`` sets all this)."""

    path: Path
    shared_writers: bool
    _lock_fd: int | None
    max_batch_items: int
    max_batch_bytes: int
    _busy_timeout: float
    _ids: QueueIdGenerator
    _spool: Spool
    _last_orphan_sweep: float
    _unlink_after_commit: list[str]
    _queue: queue.SimpleQueue[Any]
    _state_lock: threading.Lock
    _open: bool
    _closing: bool
    _wconn: sqlite3.Connection | None
    _wsync: str
    _ckpt_wake: threading.Event
    _ckpt_stop: threading.Event
    _bytes_since_ckpt: int
    _bytes_committed: int
    _wal_reserved: int
    _wal_index: int | None
    _wal_frame: int
    _wal_unsynced: bool
    _wal_retry_at: float
    commits: int
    ops_committed: int
    max_batch: int
    failed_commits: int

    # ------------------------------------------------------------------ connections

    def _connect(self, *, readonly: bool = False, checkpointer: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            if readonly:
                conn.execute("PRAGMA query_only = ON")
            elif checkpointer:
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA wal_autocheckpoint = 0")
            else:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise StoreError(f"{self.path}: cannot enable WAL mode (got {mode!r})")
                conn.execute("PRAGMA synchronous = FULL")
                conn.execute("PRAGMA foreign_keys = ON")
                conn.execute(f"PRAGMA journal_size_limit = {_WAL_LIMIT}")
                # Checkpoints run on their own thread (see _checkpointer_main) so that copying
                # the WAL into the database and its fsync stay off the commit path.
                conn.execute("PRAGMA wal_autocheckpoint = 0")
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        create_or_upgrade(conn, self.path)
        top = conn.execute("SELECT max(queue_id) FROM messages").fetchone()[0]
        if top:
            self._ids.advance_past(top)
        self._spool.open()
        self._report_missing_spool_files(conn)
        self._sweep_orphans(conn)

    def _refuse_a_lost_database(self) -> None:
        """Stop the start when the database is gone but its spool folder still holds message
        files: the queue was lost (deleted to "fix" it, a partial restore), and a new, empty one
        would let the orphan sweep delete the only copy of those messages' bytes."""
        if self.path.exists():
            return
        directory = self._spool.directory
        with contextlib.suppress(FileNotFoundError):
            held = [e for e in os.scandir(directory) if e.is_file() and e.stat().st_size]
            if held:  # empty ones are only created ahead (spool.py)
                raise StoreError(
                    f"the queue database {self.path} is missing, but {directory} holds "
                    f"{len(held)} message file(s) of the queue it belonged to: restore the "
                    f"database (with its -wal file), or move {directory} away to start with an "
                    "empty queue"
                )

    def _report_missing_spool_files(self, conn: sqlite3.Connection) -> None:
        """Say at open which messages still to deliver have lost their spool file: each one is
        suspended as corrupt only when next due, which can be an hour later."""
        rows = conn.execute(
            "SELECT d.queue_id, d.spool FROM message_data d JOIN messages m"
            " ON m.queue_id = d.queue_id WHERE d.spool IS NOT NULL AND m.open_rcpts > 0"
        ).fetchall()
        if not rows:
            return
        present = set(os.listdir(self._spool.directory))
        missing = [f"{qid} ({name})" for qid, name in rows if name not in present]
        if missing:
            log.error(
                "queue store: %d message(s) to deliver have lost their bytes, their spool files"
                " missing from %s: %s; each is suspended as corrupt when next due (restore the"
                " files to deliver them)",
                len(missing),
                self._spool.directory,
                ", ".join(missing[:20]) + (", ..." if len(missing) > 20 else ""),
            )

    def _sweep_orphans(self, conn: sqlite3.Connection) -> None:
        """Remove the spool files no row names, once old (see `Spool.sweep_orphans`)."""
        self._last_orphan_sweep = time.monotonic()
        referenced = {
            r[0] for r in conn.execute("SELECT spool FROM message_data WHERE spool IS NOT NULL")
        }
        swept = self._spool.sweep_orphans(referenced)
        if swept:
            log.info("queue store: removed %d orphaned spool file(s)", swept)

    def _checkpointer_main(self) -> None:
        """Copy the WAL back into the database file when it has grown (``_CKPT_BYTES``) or at
        least every second after changes. PASSIVE: never blocks the writer or the readers."""
        conn: sqlite3.Connection | None = None
        done_commits = self.commits
        try:
            while not self._ckpt_stop.is_set():
                self._ckpt_wake.wait(1.0)
                self._ckpt_wake.clear()
                if self.commits == done_commits:
                    continue
                done_commits = self.commits
                try:
                    if conn is None:
                        conn = self._connect(checkpointer=True)
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.warning("queue store: checkpoint failed: %s", exc)
                    if conn is not None:
                        conn.close()
                        conn = None
        finally:
            if conn is not None:
                conn.close()

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self, ready: ConcurrentFuture[None]) -> None:
        try:
            make_dirs_durably(self.path.parent)
            if self.shared_writers:
                self._lock_fd = os.open(
                    f"{self.path}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
            self._refuse_a_lost_database()
            self._wconn = self._connect()
            self._init_schema(self._wconn)
            self._wconn.execute("BEGIN IMMEDIATE")
            try:
                self._reserve_wal(_WAL_RESERVE_FIRST)
            finally:
                self._wconn.execute("ROLLBACK")
            self._wal_frame = self._wconn.execute("PRAGMA page_size").fetchone()[0] + 24
            with contextlib.suppress(OSError):  # without it, _wal_in_use estimates
                self._wal_index = os.open(f"{self.path}-shm", os.O_RDONLY | os.O_CLOEXEC)
            fsync_dir(self.path.parent)  # the database and WAL directory entries
        except BaseException as exc:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None
            if self._wconn is not None:
                self._wconn.close()
                self._wconn = None
            if isinstance(exc, sqlite3.Error | OSError):
                # At start-up: name the file (under server.data_dir), not SQLite's words alone.
                kind = (
                    StoreFullError if isinstance(_wrap_error(exc), StoreFullError) else StoreError
                )
                reason = exc if isinstance(exc, sqlite3.Error) else exc.strerror or exc
                opened = kind(f"cannot open the queue database {self.path}: {reason}")
                opened.__cause__ = exc
                ready.set_exception(opened)
                return
            ready.set_exception(_wrap_error(exc))
            return
        ready.set_result(None)
        carry: _Op | None = None
        stop = False
        while not stop:
            if carry is not None:
                first, carry = carry, None
            else:
                item = self._queue.get()
                if item is _STOP:
                    break
                first = item
            if self._lock_fd is not None:
                # Several processes share the file: take turns through a kernel lock that wakes
                # the next writer at once (SQLite's busy handler polls with sleeps of 1, 2, 5,
                # 10... ms). Ops that arrive meanwhile join this batch.
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            batch = [first]
            nbytes = first.size
            while len(batch) < self.max_batch_items:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                if nbytes + item.size > self.max_batch_bytes:
                    carry = item  # starts the next batch
                    break
                batch.append(item)
                nbytes += item.size
            try:
                outcomes = self._commit_batch(batch)
            finally:
                if self._lock_fd is not None:
                    # The other workers wait for this lock, so it ends with the commit: telling the
                    # callers (a write to each event loop's wake-up pipe) happens after it.
                    fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._resolve_batch(batch, outcomes)
        if carry is not None:  # pragma: no cover - STOP is only queued after every op
            self._resolve_batch([carry], self._commit_batch([carry]))
        if self._wal_index is not None:
            os.close(self._wal_index)
            self._wal_index = None
        if self._wconn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._wconn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            self._wconn.close()
            self._wconn = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _run_with_savepoints(
        self, conn: sqlite3.Connection, batch: list[_Op]
    ) -> list[tuple[bool, Any]]:
        """Each call in its own SAVEPOINT: a failing call is undone and reported alone."""
        outcomes: list[tuple[bool, Any]] = []
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                value = op.fn(conn, *op.args)
            except Exception as exc:
                if not conn.in_transaction or _damaged(exc):
                    # SQLite rolled the whole transaction back (disk full, I/O error...):
                    # nothing of the batch survives, so the batch fails with this error. Or the
                    # file is damaged: SQLite keeps the error, and COMMIT fails with it later,
                    # which would read as an unknown outcome (every client's connection closed
                    # without a reply) when nothing was written.
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, _wrap_error(exc, self.path)))
            else:
                conn.execute("RELEASE op")
                outcomes.append((True, value))
        return outcomes

    def _wal_in_use(self) -> int:
        """Bytes of the WAL holding frames now: mxFrame from SQLite's wal-index header (offset 16,
        native byte order, https://www.sqlite.org/walformat.html) in the -shm file. Read with
        pread, not a memory map: another process's SQLite may truncate that file, and touching a
        map past its end is SIGBUS. Only decides when to write ahead more; when the header cannot
        be read, an estimate (a 10 KB message writes about 10 pages: tables, indexes, overflow)."""
        if self._wal_index is not None:
            with contextlib.suppress(OSError):
                header = os.pread(self._wal_index, 20, 0)
                if len(header) == 20:
                    (max_frame,) = struct.unpack_from("=I", header, 16)
                    return _WAL_HEADER + max_frame * self._wal_frame
        return self._bytes_committed * 4

    def _reserve_wal(self, size: int) -> None:
        """Write zeros to the WAL file up to `size` bytes (at most _WAL_LIMIT) and fdatasync them.

        A commit that appends to a file makes fdatasync journal the new size as well as write the
        data (a 10 KB submit committed in 1.1 ms p50 instead of 0.55 ms on ext4 here, with the
        same SQL); a commit into blocks already written only flushes the data. SQLite
        reads a WAL up to the first frame whose salt and checksum do not match its header, so zeros
        past the last frame are an empty tail, like the stale frames SQLite itself leaves there when
        it restarts the log. Called with the write lock held (inside BEGIN IMMEDIATE, before any
        frame of the transaction is written), so no connection in any process appends meanwhile.
        """
        size = min(size, _WAL_LIMIT)
        try:
            self._reserve_wal_index(size)
            fd = os.open(f"{self.path}-wal", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                pos = start = os.fstat(fd).st_size
                wrote = pos < size
                zeros = memoryview(bytes(min(1024 * 1024, max(size - pos, 0))))
                try:
                    while pos < size:
                        pos += os.pwrite(fd, zeros[: size - pos], pos)
                except OSError:
                    # Give back what was written: else the zeros take the disk's last free
                    # space, and the store's other files (the database at a checkpoint, the
                    # spool), the logs and the commits past them find it full until an
                    # administrator frees some. No frame lies past `start` (the write lock).
                    with contextlib.suppress(OSError):
                        os.ftruncate(fd, start)
                    raise
                if wrote:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: commits still work, only slower; try no more
            log.warning(
                "queue store: could not reserve WAL space (%s); commits will be slower", exc
            )
            self._wal_reserved = _WAL_LIMIT
            return
        self._wal_reserved = max(self._wal_reserved, size)

    def _reserve_wal_index(self, wal_size: int) -> None:
        """Write zeros to the -shm file (SQLite's wal-index) as far as `wal_size` bytes of WAL
        need. SQLite grows it a 32 KB region at a time, for each 4,096 frames, from inside a
        COMMIT after the frames are written and synced: on a full disk that fails
        (SQLITE_IOERR_SHMSIZE) with the transaction in the WAL file, an outcome no client can be
        told. Grown here, it only fails where nothing is written yet. Zeros are what SQLite's own
        growth leaves there (a sparse file) until it fills a region, which it clears first.
        SQLite truncates the file when a connection opens it while no other has it open: the
        writer's first, before this runs, or (rarely) the writer's next after a failed commit
        with no reader connected; SQLite then grows it itself, as before. Not fsync'd: the file
        is never read back after a crash."""
        regions = wal_size // self._wal_frame // _WAL_INDEX_FRAMES + 2  # the first holds fewer
        try:
            fd = os.open(f"{self.path}-shm", os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # pragma: no cover - open in WAL mode makes it
            return
        try:
            pos = os.fstat(fd).st_size
            end = regions * _WAL_INDEX_REGION
            zeros = memoryview(bytes(max(end - pos, 0)))
            while pos < end:
                pos += os.pwrite(fd, zeros[: end - pos], pos)
        finally:
            os.close(fd)

    def _commit_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run every call of the batch in one transaction: (True, result) or (False, error) each."""
        if self._wal_unsynced and not self._recover_wal():
            return [(False, self._refused_until_wal_synced()) for _ in batch]
        outcomes: list[tuple[bool, Any]] = []
        committing = False
        try:
            if self._wconn is None:  # a previous commit failed: start on a fresh connection
                self._wconn = self._connect()
                self._wsync = "FULL"
            conn = self._wconn
            # An accepted message (a 250) needs its commit on stable storage: synchronous=FULL.
            # Delivery bookkeeping (leases, per-recipient results) only needs to survive a crash of
            # this process, which WAL with synchronous=NORMAL guarantees without an fsync; the next
            # FULL commit syncs it too. Losing it to a power cut means a re-delivery (at least once).
            sync = "FULL" if any(op.durable for op in batch) else "NORMAL"
            if sync != self._wsync:
                conn.execute(f"PRAGMA synchronous = {sync}")
                self._wsync = sync
            conn.execute("BEGIN IMMEDIATE")
            if self._wal_reserved < _WAL_LIMIT and (
                self._wal_in_use() + _WAL_RESERVE_STEP // 2 >= self._wal_reserved
            ):
                self._reserve_wal(self._wal_reserved + _WAL_RESERVE_STEP)
            try:
                # Every SQL statement hands the GIL to the event loop and waits to get it back,
                # which under load costs more than the statement itself: run the batch without a
                # SAVEPOINT per call (two statements each), and only when a call fails roll back
                # and run the batch again with them.
                outcomes = [(True, op.fn(conn, *op.args)) for op in batch]
            except Exception:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self._unlink_after_commit.clear()
                conn.execute("BEGIN IMMEDIATE")
                outcomes = self._run_with_savepoints(conn, batch)
            committing = True
            conn.execute("COMMIT")
        except Exception as exc:
            self._unlink_after_commit.clear()  # the rows are still there: so are their files
            # Nothing of this batch is durable. Drop the connection rather than retrying on the
            # same file descriptors: a failed fsync may have thrown away dirty pages.
            self.failed_commits += 1
            log.error("queue store: transaction failed: %s", exc)
            self._drop_writer_connection()
            if (
                not self._wal_unsynced
                and _io_error(exc)
                and not isinstance(_wrap_error(exc, self.path), StoreFullError)
            ):
                self._refuse_writes_until_wal_synced(exc)
            if committing and not _frames_not_written(exc):
                # COMMIT itself failed: its frames may be in the WAL file, and come back when
                # SQLite next rebuilds its index from it (a full disk failing the -shm file, a
                # failed fsync): the outcome is unknown, not "not stored".
                outcomes = [(False, _outcome_unknown(exc)) for _ in batch]
            else:
                outcomes = [(False, _wrap_error(exc, self.path)) for _ in batch]
        else:
            if self._unlink_after_commit:
                self._spool.unlink(self._unlink_after_commit)
                self._unlink_after_commit.clear()
            self.commits += 1
            self.ops_committed += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
            nbytes = sum(op.size for op in batch)
            self._bytes_committed += nbytes
            self._bytes_since_ckpt += nbytes
            if self._bytes_since_ckpt >= _CKPT_BYTES:
                self._bytes_since_ckpt = 0
                self._ckpt_wake.set()
        return outcomes

    def _drop_writer_connection(self) -> None:
        if self._wconn is not None:
            with contextlib.suppress(Exception):
                self._wconn.execute("ROLLBACK")
            with contextlib.suppress(Exception):
                self._wconn.close()
            self._wconn = None

    # ------------------------------------------------------------------ after a failed fsync
    #
    # When the kernel fails to write a file's dirty pages back (EIO), it marks them clean and
    # reports the error once to each open file description, at its next fsync. Frames that
    # earlier synchronous=NORMAL commits wrote to the WAL (visible, never synced) may then never
    # reach the disk, while the fsync of a later commit succeeds: after a power cut SQLite's WAL
    # recovery stops at the first frame that does not check out, and every commit acknowledged
    # after it is lost (PostgreSQL's "fsyncgate"). So after a write fails with an I/O error, no
    # write is acknowledged until the WAL's content is durable another way: a TRUNCATE
    # checkpoint copies it into the database file (read back through the page cache), fsyncs
    # that, and empties the WAL.
    #
    # Per process: with server.workers > 1 each worker's writer has the WAL open on its own file
    # description, so each meets the error at its own next sync and recovers on its own. A
    # checkpoint one worker runs copies the frames every worker wrote.

    def _refuse_writes_until_wal_synced(self, exc: BaseException) -> None:
        self._wal_unsynced = True
        self._wal_retry_at = time.monotonic() + _WAL_RECOVERY_INTERVAL
        log.error(
            "queue store: a write to the queue database %s failed with an I/O error (%s); data"
            " already written to its write-ahead log may not be on the disk: mail is refused"
            " with 451 4.3.0 and delivery results are not recorded until the queue's disk"
            " takes writes again (the relay copies the log into the database, retried every"
            " second): check the disk and the kernel log (dmesg)",
            self.path,
            exc,
        )

    def _refused_until_wal_synced(self) -> StoreError:
        return StoreError(
            f"queue database {self.path}: writes refused after an I/O error until its"
            " write-ahead log is copied into the database file (check the disk)"
        )

    def _recover_wal(self) -> bool:
        """Try, at most every _WAL_RECOVERY_INTERVAL, the checkpoint that ends the refusal: True
        once the WAL has been copied into the database file, synced, and emptied."""
        now = time.monotonic()
        if now < self._wal_retry_at:
            return False
        self._wal_retry_at = now + _WAL_RECOVERY_INTERVAL
        try:
            if self._wconn is None:
                self._wconn = self._connect()
                self._wsync = "FULL"
            # Waits (busy_timeout) for readers on an older snapshot, in any process, to finish.
            busy, frames, copied = self._wconn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.Error as exc:
            log.debug("queue store: checkpoint after the failed write failed: %s", exc)
            self._drop_writer_connection()  # not another sync through the same descriptors
            return False
        if busy or frames != copied:
            log.debug("queue store: checkpoint after the failed write incomplete (busy)")
            return False
        self._wal_unsynced = False
        # The WAL file is empty now: write its space ahead again (see _reserve_wal), and a
        # reserve that failed on the broken disk is tried again too.
        self._wal_reserved = 0
        self._bytes_committed = 0  # what _wal_in_use estimates from without the -shm file
        self._bytes_since_ckpt = 0
        log.warning(
            "queue store: the write-ahead log of %s is copied into the database file and"
            " synced; writes are accepted again",
            self.path,
        )
        return True

    @staticmethod
    def _resolve_batch(batch: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
        """Hand each caller its outcome, on its own event loop (one wake-up per loop)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(op.loop, []).append(
                (op.future, ok, value if ok else _wrap_error(value))
            )
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, items)

    async def _write(
        self, fn: Callable[..., T], *args: Any, size: int = 0, durable: bool = True
    ) -> T:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._state_lock:
            if not self._open or self._closing:
                raise StoreClosedError("queue store is not open")
            self._queue.put(_Op(fn, args, size, fut, loop, durable))
        return await fut
