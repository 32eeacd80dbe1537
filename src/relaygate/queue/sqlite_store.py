"""SQLite queue store (single node).

Durability: WAL journal, ``synchronous=FULL``; the message bytes are a BLOB written in the same
transaction as the envelope and the recipients, so one fsync of the WAL covers all three. Messages of
``SPOOL_THRESHOLD`` bytes or more go to a spool file instead (see spool.py), made durable before the
row that names it is committed. The database directory is fsync'd after the files are created.
After a write fails with an I/O error (a failed fsync), no write is acknowledged until the WAL
has been copied into the database file and emptied (sqlite_writer.py, ``_recover_wal``).

Group commit: one dedicated writer thread owns the write connection. Every mutating call is put on
a queue and awaited through an asyncio future; the writer takes everything that is queued (up to
``max_batch_items`` / ``max_batch_bytes``) and runs it in ONE transaction (if a call fails, the
batch runs again with each call inside its own SAVEPOINT, so one failing call does not spoil the
others), commits (one fsync), then resolves the futures with ``loop.call_soon_threadsafe``. The WAL
file is written ahead with zeros (``_reserve_wal``) so that a commit's fsync does not also have to
journal a bigger file. While the writer waits for an fsync the next batch
accumulates, so throughput grows with the number of concurrent submitters. The event loop never
touches the disk. Reads run on a small thread pool with their own read-only connections (WAL lets
them run alongside the writer).

Schema: ``messages`` (envelope, flags, lease and a few derived columns kept up to date by the
writer: ``status``, ``next_due``, ``open_rcpts``, ``completed_at``), ``recipients`` (one row per
recipient, so a per-recipient update is one small row write), ``message_data`` (the bytes plus a
SHA-256 checked on every read), ``send_log`` (pacing) and ``graph_drafts`` (the Microsoft Graph
draft, or plain sendMail, an attempt left to resolve, per message and route).

Schema versions: two numbers, the same rule as PostgreSQL's (pg_schema.py), so that a node can be
rolled back to the previous release; see sqlite_schema.py, which holds the schema.

The class is put together from sibling modules, one seam each: sqlite_schema.py (the tables and
their versions), sqlite_writer.py (the writer thread, group commit, the WAL written ahead, the
checkpointer), sqlite_ops.py (what each change writes, on the writer thread), sqlite_reads.py
(the reads on their thread pool); this module holds the store's state, its opening and closing,
and the public writes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .model import (
    SEND_LOG_RETENTION,
    Envelope,
    GraphDraft,
    QueueIdGenerator,
    RecipientState,
    RecipientStatus,
    SendLimit,
    SendWait,
    StoredMessage,
    submitted_recipients,
)
from .spool import SPOOL_THRESHOLD, Spool, SpoolClosedError
from .sqlite_ops import _SqliteOps
from .sqlite_reads import _SqliteReads
from .sqlite_schema import SCHEMA_LAYOUT as SCHEMA_LAYOUT
from .sqlite_schema import SCHEMA_VERSION as SCHEMA_VERSION
from .sqlite_writer import _STOP
from .store import (
    Store,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    open_store,
)

__all__ = ["SqliteStore", "open_store"]

#: The store's logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.queue.sqlite_store")


class SqliteStore(_SqliteReads, _SqliteOps, Store):
    """The single-node queue store. See the module docstring for the design."""

    def __init__(
        self,
        path: Path | str,
        *,
        max_batch_items: int = 256,
        max_batch_bytes: int = 32 * 1024 * 1024,
        read_threads: int = 2,
        busy_timeout: float = 30.0,
        shared_writers: bool = False,
        spool_threshold: int = SPOOL_THRESHOLD,
        orphan_sweep_interval: float = 3600.0,
    ) -> None:
        self.path = Path(path)
        #: Other processes write to this file too (``server.workers`` > 1): serialise the write
        #: transactions with an flock on ``<db>.writer-lock`` instead of SQLite's busy polling.
        self.shared_writers = shared_writers
        self._lock_fd: int | None = None
        self.max_batch_items = max_batch_items
        self.max_batch_bytes = max_batch_bytes
        self._read_threads = read_threads
        self._busy_timeout = busy_timeout
        self._ids = QueueIdGenerator()
        self._spool = Spool(self.path.parent / "spool")
        self.spool_threshold = spool_threshold
        #: Seconds between sweeps of orphaned spool files while open (`purge_completed` runs
        #: them), besides the one at open: a worker killed and restarted beside the others finds
        #: the files its predecessor created ahead too young to sweep, and the node's next start
        #: may be months away.
        self.orphan_sweep_interval = orphan_sweep_interval
        self._last_orphan_sweep = 0.0  # time.monotonic() of the last sweep
        #: spool files of rows deleted by the current batch: unlinked once it has committed
        self._unlink_after_commit: list[str] = []
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._state_lock = threading.Lock()
        self._open = False
        self._closing = False
        self._writer: threading.Thread | None = None
        self._wconn: sqlite3.Connection | None = None
        self._wsync = "FULL"  # the write connection's current PRAGMA synchronous
        self._reader: ThreadPoolExecutor | None = None
        self._rlocal = threading.local()
        self._rconns: list[sqlite3.Connection] = []
        self._checkpointer: threading.Thread | None = None
        self._ckpt_wake = threading.Event()
        self._ckpt_stop = threading.Event()
        self._bytes_since_ckpt = 0
        self._bytes_committed = 0  # since open (or the WAL emptied): how far the WAL may have grown
        self._wal_reserved = 0  # bytes of the WAL file known to be written (see _reserve_wal)
        self._wal_index: int | None = None  # fd of the -shm file, to read how much WAL is in use
        self._wal_frame = 4096 + 24
        #: A write failed with an I/O error (a failed fsync of the WAL, say): no write is
        #: acknowledged until a TRUNCATE checkpoint has made the WAL durable (_recover_wal)
        self._wal_unsynced = False
        self._wal_retry_at = 0.0  # time.monotonic() from which that checkpoint may run again
        # statistics (written by the writer thread only)
        self.commits = 0  # transactions committed (one fsync each)
        self.ops_committed = 0  # calls carried by those transactions
        self.max_batch = 0  # largest number of calls in one transaction
        self.failed_commits = 0

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._open:
            return
        if self._closing:
            raise StoreClosedError("store was closed; create a new one")
        ready: ConcurrentFuture[None] = ConcurrentFuture()
        self._writer = threading.Thread(
            target=self._writer_main, args=(ready,), name="relaygate-queue-writer", daemon=True
        )
        self._writer.start()
        await asyncio.wrap_future(ready)
        self._ckpt_stop.clear()
        self._checkpointer = threading.Thread(
            target=self._checkpointer_main, name="relaygate-queue-checkpoint", daemon=True
        )
        self._checkpointer.start()
        self._reader = ThreadPoolExecutor(
            max_workers=self._read_threads, thread_name_prefix="relaygate-queue-read"
        )
        self._open = True

    async def close(self) -> None:
        with self._state_lock:
            if not self._open or self._closing:
                return
            self._closing = True
            self._queue.put(_STOP)
        writer, reader, ckpt = self._writer, self._reader, self._checkpointer
        if writer is not None:
            await asyncio.to_thread(writer.join)
        if ckpt is not None:
            self._ckpt_stop.set()
            self._ckpt_wake.set()
            await asyncio.to_thread(ckpt.join)
        if reader is not None:
            await asyncio.to_thread(reader.shutdown, True)
        for conn in self._rconns:
            conn.close()
        self._rconns.clear()
        # The files created ahead and not used: unlinks, and a wait for a batch being created
        # (a directory fsync) if a late write is making one, so not on the event loop.
        await asyncio.to_thread(self._spool.close)
        self._open = False

    async def __aenter__(self) -> SqliteStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        return {
            "commits": self.commits,
            "ops_committed": self.ops_committed,
            "max_batch": self.max_batch,
            "failed_commits": self.failed_commits,
        }

    # ------------------------------------------------------------------ public API: writes

    async def submit(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        lease: tuple[str, float] | None = None,
        received_at: float | None = None,
    ) -> str:
        recipients = submitted_recipients(envelope, data)
        blob = bytes(data)
        if received_at is None:
            received_at = time.time()
        if len(blob) < self.spool_threshold:
            return await self._write(
                self._op_submit,
                envelope,
                recipients,
                blob,
                received_at,
                lease,
                None,
                size=len(blob) + 512,
            )
        # A big message: its file is durable before the row that names it is committed, and the
        # file's write and fsync run off the writer thread (other sessions' commits go on).
        if not self._open or self._closing:
            raise StoreClosedError("queue store is not open")
        try:
            digest, name = await asyncio.to_thread(self._spool_write, blob)
        except SpoolClosedError as exc:  # the store closed while this submit waited for a thread
            raise StoreClosedError("queue store is not open") from exc
        except OSError as exc:
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            cls = StoreFullError if full else StoreError
            raise cls(f"queue spool write failed: {exc}") from exc
        try:
            return await self._write(
                self._op_submit,
                envelope,
                recipients,
                b"",
                received_at,
                lease,
                (digest, name, len(blob)),
                size=512,
            )
        except StoreOutcomeUnknownError:
            raise  # the row may be on disk: its file stays (the orphan sweep takes it if not)
        except StoreError:
            self._spool.unlink([name])  # never committed: nobody will look for it
            raise
        # Cancelled (a stop past its grace time): the queued write may still commit, so the file
        # stays; unreferenced, the orphan sweep removes it at the next start.
        finally:
            # Held from its write to here: no sweep could take it for an old orphan meanwhile,
            # whatever the clock did (its modification time is all a sweep has otherwise).
            self._spool.release(name)

    def _spool_write(self, blob: bytes) -> tuple[bytes, str]:
        return hashlib.sha256(blob).digest(), self._spool.write(blob)

    async def lease_due(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []
        return await self._write(self._op_lease, owner, now, lease_seconds, limit, durable=False)

    async def release(self, queue_id: str, owner: str) -> None:
        await self._write(self._op_release, queue_id, owner, durable=False)

    async def renew_leases(self, owner: str, queue_ids: Sequence[str], until: float) -> int:
        if not queue_ids:
            return 0
        return await self._write(
            self._op_renew_leases, owner, list(queue_ids), until, durable=False
        )

    async def release_owners(self, owners: Sequence[str]) -> int:
        """Drop every lease held by one of ``owners`` (processes of this node that are known not to
        run: a supervisor before it starts its workers). Returns how many leases were dropped."""
        if not owners:
            return 0
        return await self._write(self._op_release_owners, list(owners), durable=False)

    async def record_results(
        self, queue_id: str, owner: str, results: list[RecipientState], *, release: bool = False
    ) -> None:
        rows = [
            (
                RecipientStatus(r.status).value,
                r.attempts,
                r.last_error,
                r.last_attempt,
                r.next_attempt,
                queue_id,
                r.address,
            )
            for r in results
        ]
        await self._write(
            self._op_record, queue_id, rows, time.time(), owner if release else None, durable=False
        )

    async def set_flags(
        self,
        queue_id: str,
        *,
        suspended: bool | None = None,
        delay_notified: bool | None = None,
    ) -> None:
        await self._write(self._op_set_flags, queue_id, suspended, delay_notified, time.time())

    async def retry_now(self, queue_id: str) -> None:
        await self._write(self._op_retry_now, queue_id, time.time())

    async def remove(
        self, queue_id: str, *, unless_in_flight_at: float | None = None
    ) -> StoredMessage | None:
        return await self._write(self._op_remove, queue_id, unless_in_flight_at)

    async def purge_completed(self, older_than: float) -> int:
        purged = await self._write(self._op_purge, older_than, time.time() - SEND_LOG_RETENTION)
        if time.monotonic() - self._last_orphan_sweep >= self.orphan_sweep_interval:
            # On a reader thread: the scan of the spool directory stays off the writer's commits.
            try:
                await self._read(self._sweep_orphans)
            except OSError as exc:  # the purge is done; tried again an interval later
                log.warning("queue store: sweep of %s failed: %s", self._spool.directory, exc)
        return purged

    async def reserve_send(
        self,
        key: str,
        now: float,
        recipients: int,
        limits: Sequence[SendLimit],
        *,
        partial: bool = False,
    ) -> SendWait | None:
        for lim in limits:
            lim.check(recipients)
        # Not fsync'd (as leases): a power cut may forget the last reservations, which at worst
        # lets a few more sends through in that window; a crash of this process forgets nothing.
        return await self._write(
            self._op_reserve_send, key, now, recipients, tuple(limits), partial, durable=False
        )

    async def save_graph_draft(self, queue_id: str, route: str, draft: GraphDraft | None) -> None:
        # fsync'd: the next attempt, after a crash too, must find the draft (or know it is gone)
        await self._write(self._op_save_graph_draft, queue_id, route, draft)
