"""SQLite queue store (single node).

Durability: WAL journal, ``synchronous=FULL``; the message bytes are a BLOB written in the same
transaction as the envelope and the recipients, so one fsync of the WAL covers all three. Messages of
``SPOOL_THRESHOLD`` bytes or more go to a spool file instead (see spool.py), made durable before the
row that names it is committed. The database directory is fsync'd after the files are created.

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

Schema versions: two numbers, the same rule as PostgreSQL's (pg_store.py), so that a node can be
rolled back to the previous release (and, with PostgreSQL, a cluster upgraded one node at a time):
* ``PRAGMA user_version`` (``SCHEMA_VERSION``) is the one every release checks at open, since the
  first: a release refuses a queue whose version is above its own. It is "the oldest release that
  can use this queue", so bump it ONLY for a change older code cannot tolerate: a column it does
  not fill but newer code needs filled, a table or column it uses dropped or renamed, a meaning
  changed, a table newer code relies on being kept in step with the messages by every writer.
  A queue's version is raised to this release's at open, never lowered.
* ``relaygate_schema.layout`` (``SCHEMA_LAYOUT``) is the full layout: bump it for EVERY change,
  additive ones included (a table or index only newer code uses, a column older code's writes
  leave correct). Additive objects are created idempotently (IF NOT EXISTS) at every open, so a
  queue of any older layout is upgraded in place, and one of a newer layout (a newer release's
  additive change) is used as it is; its layout is never lowered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import queue
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .model import (
    FINAL_STATUSES,
    MESSAGE_COLUMNS,
    QUEUE_ENTRY_COLUMNS,
    RECIPIENT_COLUMNS,
    SEND_LOG_RETENTION,
    Envelope,
    GraphDraft,
    QueueEntry,
    QueueIdGenerator,
    RecipientState,
    RecipientStatus,
    SendLimit,
    SendWait,
    StoredMessage,
    derived_columns,
    message_from_row,
    parse_status,
    queue_entries_from_rows,
    recipient_from_row,
    submitted_recipients,
)
from .spool import SPOOL_THRESHOLD, Spool, SpoolClosedError, fsync_dir
from .store import (
    AddressPattern,
    CorruptMessageError,
    MessageInFlightError,
    Store,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    check_after,
    open_store,
    sql_head_limit,
)

__all__ = ["SqliteStore", "open_store"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: PRAGMA user_version, checked at open by every release (see "Schema versions" above): 2:
#: message_data.spool (big messages in spool files). Not 3: development builds of send_log
#: (a952ede until this rule) wrote 3, so the next bump is to 4.
SCHEMA_VERSION = 2
#: relaygate_schema.layout: 1 and 2 as the versions above, 3: send_log (send connectors' pacing
#: limits; additive: a release without it simply does not pace), 4: graph_drafts (the Graph drafts
#: an attempt left to resolve; additive: a release without it makes a new draft, as it did), 5:
#: graph_drafts.message_id (a plain sendMail in flight is recorded too; additive: a release
#: without it leaves it '' and never records a sendMail).
SCHEMA_LAYOUT = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id       TEXT PRIMARY KEY,
    sender         TEXT NOT NULL,
    size           INTEGER NOT NULL,
    received_at    REAL NOT NULL,
    message_id     TEXT NOT NULL,
    client_ip      TEXT NOT NULL,
    connector      TEXT NOT NULL,
    helo           TEXT NOT NULL,
    auth_user      TEXT NOT NULL,
    suspended      INTEGER NOT NULL DEFAULT 0,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    metadata       TEXT NOT NULL DEFAULT '{}',
    lease_owner    TEXT,
    lease_until    REAL,
    -- derived from the recipients, maintained by the writer:
    status         TEXT NOT NULL,      -- message_status()
    next_due       REAL,               -- min(next_attempt, NULL->0) over Ready/Retry recipients
    open_rcpts     INTEGER NOT NULL,   -- recipients not Delivered/Failed
    completed_at   REAL                -- when open_rcpts reached 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_due, queue_id)
    WHERE suspended = 0 AND next_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_status ON messages (status, queue_id);
CREATE INDEX IF NOT EXISTS messages_completed ON messages (completed_at)
    WHERE completed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS recipients (
    queue_id     TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT '',
    last_attempt REAL,
    next_attempt REAL,
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_data (
    queue_id TEXT PRIMARY KEY REFERENCES messages (queue_id) ON DELETE CASCADE,
    sha256   BLOB NOT NULL,
    data     BLOB NOT NULL,   -- empty when the bytes are in a spool file
    spool    TEXT             -- that file's name in <queue dir>/spool (see spool.py)
);
-- one row per send counted against a budget (reserve_send: send connectors' pacing limits)
CREATE TABLE IF NOT EXISTS send_log (
    key        TEXT NOT NULL,
    at         REAL NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS send_log_key_at ON send_log (key, at);
-- the Microsoft Graph draft an attempt made for a route (Store.save_graph_draft)
CREATE TABLE IF NOT EXISTS graph_drafts (
    queue_id TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    route    TEXT NOT NULL,
    mailbox  TEXT NOT NULL,
    draft_id TEXT NOT NULL,   -- '' for a plain sendMail
    sending  INTEGER NOT NULL,
    message_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, route)
) WITHOUT ROWID;
-- one row: the layout (SCHEMA_LAYOUT), the version every release checks is PRAGMA user_version
CREATE TABLE IF NOT EXISTS relaygate_schema (layout INTEGER NOT NULL);
"""

_MSG_COLS = MESSAGE_COLUMNS
#: Store.queue_entries: the first ? unfinished messages past a queue id (the messages_status
#: index), joined with their unfinished recipients (the recipients' primary key).
_QUEUE_ENTRIES_SQL = (
    f"SELECT {QUEUE_ENTRY_COLUMNS} FROM (SELECT queue_id, size, status, suspended, lease_owner, "
    "lease_until FROM messages WHERE status IN ('Ready', 'Retry', 'Suspended') "
    "AND queue_id > ? ORDER BY queue_id LIMIT ?) AS m JOIN recipients AS r "
    "ON r.queue_id = m.queue_id AND r.status NOT IN ('Delivered', 'Failed') "
    "ORDER BY m.queue_id, r.idx"
)
_RCPT_COLS = RECIPIENT_COLUMNS
_FINAL_SQL = ", ".join(f"'{s.value}'" for s in sorted(FINAL_STATUSES))
_UPDATE_DERIVED = (
    "UPDATE messages SET status = ?, next_due = ?, open_rcpts = ?, completed_at = ? "
    "WHERE queue_id = ?"
)
# The same, ending one owner's lease: both CASEs see the row's old lease_owner (SQLite evaluates
# every SET expression against the row as it was).
_UPDATE_DERIVED_RELEASE = (
    "UPDATE messages SET status = ?, next_due = ?, open_rcpts = ?, completed_at = ?, "
    "lease_until = CASE WHEN lease_owner = ? THEN NULL ELSE lease_until END, "
    "lease_owner = CASE WHEN lease_owner = ? THEN NULL ELSE lease_owner END "
    "WHERE queue_id = ?"
)
_CHUNK = 500  # ids per "IN (...)" query
_CKPT_BYTES = 4 * 1024 * 1024  # wake the checkpointer after this much new data
_WAL_LIMIT = 64 * 1024 * 1024  # PRAGMA journal_size_limit: SQLite truncates a restarted WAL to this
_WAL_RESERVE_FIRST = 4 * 1024 * 1024  # WAL space written ahead at open, then this much more ...
_WAL_RESERVE_STEP = 16 * 1024 * 1024  # ... when less than half of it is left, up to _WAL_LIMIT
_WAL_HEADER = 32  # bytes before the first frame; each frame is a 24-byte header and a page


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


def _wrap_error(exc: BaseException) -> BaseException:
    """Engine errors become StoreError (a fresh instance per caller); others pass through."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code == sqlite3.SQLITE_FULL:
            err: StoreError = StoreFullError(f"queue database full: {exc}")
        else:
            err = StoreError(f"queue database error: {exc}")
        err.__cause__ = exc
        return err
    return exc


def _outcome_unknown(exc: BaseException) -> StoreOutcomeUnknownError:
    err = StoreOutcomeUnknownError(f"queue database commit failed, outcome unknown: {exc}")
    err.__cause__ = exc
    return err


def _make_dirs_durably(path: Path) -> None:
    """mkdir -p, then fsync every directory that got a new entry."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    if not missing:
        return
    path.mkdir(parents=True, exist_ok=True)
    for d in missing:
        fsync_dir(d.parent)


def _chunks(seq: Sequence[str], n: int = _CHUNK) -> Iterable[Sequence[str]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _load_messages(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> list[StoredMessage]:
    """Turn ``messages`` rows (``_MSG_COLS``) into StoredMessage objects with their recipients."""
    if not rows:
        return []
    rcpts: dict[str, list[RecipientState]] = {r[0]: [] for r in rows}
    ids = list(rcpts)
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id IN ({marks}) "
            "ORDER BY queue_id, idx",
            chunk,
        ):
            rcpts[row[0]].append(recipient_from_row(row))
    return [message_from_row(r, rcpts[r[0]]) for r in rows]


def _load_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> list[StoredMessage]:
    """Load messages by id, in the order given (unknown ids are skipped)."""
    rows: dict[str, tuple[Any, ...]] = {}
    for chunk in _chunks(ids):
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(
            f"SELECT {_MSG_COLS} FROM messages WHERE queue_id IN ({marks})", chunk
        ):
            rows[row[0]] = row
    return _load_messages(conn, [rows[i] for i in ids if i in rows])


def _list_filters(
    status: str | None,
    after: str | None,
    sender: AddressPattern | None,
    recipient: AddressPattern | None,
) -> tuple[str, list[Any]]:
    """The WHERE clause of ``list_messages`` and its parameters. ``lower()`` is SQLite's own,
    which lower-cases ASCII letters only (as :func:`relaygate.queue.store.ascii_lower`)."""
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        clauses.append("status = ?")
        args.append(parse_status(status).value)
    after = check_after(after)
    if after is not None:
        clauses.append("queue_id > ?")
        args.append(after)
    if sender is not None:
        clauses.append("lower(sender) LIKE ? ESCAPE '\\'" if sender.like else "lower(sender) = ?")
        args.append(sender.sql_value)
    if recipient is not None:
        test = "LIKE ? ESCAPE '\\'" if recipient.like else "= ?"
        clauses.append(
            "EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
            f"AND lower(r.address) {test})"
        )
        args.append(recipient.sql_value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


def _send_wait(
    conn: sqlite3.Connection,
    key: str,
    now: float,
    recipients: int,
    limits: tuple[SendLimit, ...],
) -> tuple[SendWait | None, int]:
    """Whether a send of ``recipients`` fits the budget ``key`` at ``now`` (None) or when it
    will (``Store.reserve_send``), and the room for recipients left now: 0 when a message limit
    is spent, else the least any recipient limit has left (``recipients`` with none)."""
    wait: SendWait | None = None
    room = recipients
    for lim in limits:
        since = now - lim.window
        count, total = conn.execute(
            "SELECT count(*), coalesce(sum(recipients), 0) FROM send_log WHERE key = ? AND at > ?",
            (key, since),
        ).fetchone()
        when: float | None = None
        if lim.max_messages is not None and count + 1 > lim.max_messages:
            room = 0
            # the (count - max + 1)-th oldest send must leave the window
            row = conn.execute(
                "SELECT at FROM send_log WHERE key = ? AND at > ? ORDER BY at LIMIT 1 OFFSET ?",
                (key, since, count - lim.max_messages),
            ).fetchone()
            when = row[0] + lim.window
        if lim.max_recipients is not None:
            room = min(room, max(0, lim.max_recipients - total))
            if total + recipients > lim.max_recipients:
                row = conn.execute(
                    "SELECT at FROM (SELECT at, sum(recipients) OVER (ORDER BY at) AS freed "
                    "FROM send_log WHERE key = ? AND at > ?) WHERE freed >= ? "
                    "ORDER BY at LIMIT 1",
                    (key, since, total + recipients - lim.max_recipients),
                ).fetchone()
                when = max(when or 0.0, row[0] + lim.window)
        if when is not None and (wait is None or when > wait.until):
            wait = SendWait(when, lim)
    return wait, room


class SqliteStore(Store):
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
        self._bytes_committed = 0  # since open: how far the WAL may have grown
        self._wal_reserved = 0  # bytes of the WAL file known to be written (see _reserve_wal)
        self._wal_index: int | None = None  # fd of the -shm file, to read how much WAL is in use
        self._wal_frame = 4096 + 24
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
        conn.execute("BEGIN IMMEDIATE")  # the version read and set under the write lock (workers)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path}: queue schema version {version} is newer than this RelayGate "
                    f"({SCHEMA_VERSION})"
                )
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    conn.execute(stmt)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(message_data)")}
            if "spool" not in columns:  # a version 1 queue: every message is still inline
                conn.execute("ALTER TABLE message_data ADD COLUMN spool TEXT")
            columns = {row[1] for row in conn.execute("PRAGMA table_info(graph_drafts)")}
            if "message_id" not in columns:  # layout 4
                conn.execute(
                    "ALTER TABLE graph_drafts ADD COLUMN message_id TEXT NOT NULL DEFAULT ''"
                )
            # An older layout was upgraded just above (3: the send_log table and its index; 4:
            # graph_drafts; 5: graph_drafts.message_id); a newer one stays as it is.
            layout = conn.execute("SELECT max(layout) FROM relaygate_schema").fetchone()[0]
            if layout is None:
                conn.execute("INSERT INTO relaygate_schema (layout) VALUES (?)", (SCHEMA_LAYOUT,))
            elif layout < SCHEMA_LAYOUT:
                conn.execute("UPDATE relaygate_schema SET layout = ?", (SCHEMA_LAYOUT,))
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        top = conn.execute("SELECT max(queue_id) FROM messages").fetchone()[0]
        if top:
            self._ids.advance_past(top)
        self._spool.open()
        self._sweep_orphans(conn)

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

    def _read_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._rlocal, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._rlocal.conn = conn
            with self._state_lock:
                self._rconns.append(conn)
        return conn

    # ------------------------------------------------------------------ writer thread

    def _writer_main(self, ready: ConcurrentFuture[None]) -> None:
        try:
            _make_dirs_durably(self.path.parent)
            if self.shared_writers:
                self._lock_fd = os.open(
                    f"{self.path}.writer-lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600
                )
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
                if not conn.in_transaction:
                    # SQLite rolled the whole transaction back (disk full, I/O error...):
                    # nothing of the batch survives, so the batch fails with this error.
                    raise
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                outcomes.append((False, exc))
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
            fd = os.open(f"{self.path}-wal", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                pos = os.fstat(fd).st_size
                wrote = pos < size
                zeros = memoryview(bytes(min(1024 * 1024, max(size - pos, 0))))
                while pos < size:
                    pos += os.pwrite(fd, zeros[: size - pos], pos)
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

    def _commit_batch(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run every call of the batch in one transaction: (True, result) or (False, error) each."""
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
            if self._wconn is not None:
                with contextlib.suppress(Exception):
                    self._wconn.execute("ROLLBACK")
                with contextlib.suppress(Exception):
                    self._wconn.close()
                self._wconn = None
            if committing:
                # COMMIT itself failed: its frames may be in the WAL file, and come back when
                # SQLite next rebuilds its index from it (a full disk failing the -shm file, a
                # failed fsync): the outcome is unknown, not "not stored".
                outcomes = [(False, _outcome_unknown(exc)) for _ in batch]
            else:
                outcomes = [(False, _wrap_error(exc)) for _ in batch]
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

    async def _read(self, fn: Callable[..., T], *args: Any) -> T:
        if not self._open or self._closing or self._reader is None:
            raise StoreClosedError("queue store is not open")

        def run() -> T:
            conn = self._read_conn()
            conn.execute("BEGIN")  # one snapshot for all the SELECTs of this call
            try:
                return fn(conn, *args)
            finally:
                conn.execute("COMMIT")

        try:
            return await asyncio.get_running_loop().run_in_executor(self._reader, run)
        except sqlite3.Error as exc:
            raise _wrap_error(exc) from exc

    # ------------------------------------------------------------------ writes (writer thread)

    def _refresh(
        self,
        conn: sqlite3.Connection,
        queue_id: str,
        now: float,
        release_owner: str | None = None,
    ) -> None:
        """Recompute the derived columns of one message from its recipients; with `release_owner`,
        also end that owner's lease on it, in the same UPDATE (two statements; it was four)."""
        rows = conn.execute(
            "SELECT m.suspended, m.completed_at, r.status, r.next_attempt "
            "FROM messages m LEFT JOIN recipients r ON r.queue_id = m.queue_id "
            "WHERE m.queue_id = ?",
            (queue_id,),
        ).fetchall()
        if not rows:
            return
        derived = derived_columns(
            bool(rows[0][0]),
            rows[0][1],
            ((status, next_attempt) for _, _, status, next_attempt in rows if status is not None),
            now,
        )  # status None: the message has no recipient rows (LEFT JOIN)
        if release_owner is None:
            conn.execute(_UPDATE_DERIVED, (*derived, queue_id))
        else:
            conn.execute(
                _UPDATE_DERIVED_RELEASE, (*derived, release_owner, release_owner, queue_id)
            )
        if derived[2] == 0:  # open_rcpts
            # Finished: the Graph records of its routes go in the transaction that records how
            # (a record forgotten before the result is stored lets a crash send it again).
            conn.execute("DELETE FROM graph_drafts WHERE queue_id = ?", (queue_id,))

    def _op_submit(
        self,
        conn: sqlite3.Connection,
        env: Envelope,
        recipients: list[str],
        data: bytes,
        received_at: float,
        lease: tuple[str, float] | None,
        spooled: tuple[bytes, str, int] | None,
    ) -> str:
        if spooled is not None:  # (digest, spool file name, size): the bytes are in the file
            digest, spool_name, size = spooled
        else:
            digest, spool_name, size = hashlib.sha256(data).digest(), None, len(data)
        lease_owner, lease_until = lease if lease is not None else (None, None)
        metadata = json.dumps(env.metadata, ensure_ascii=False, sort_keys=True)
        for _attempt in range(1000):
            queue_id = self._ids.next()
            try:
                conn.execute(
                    "INSERT INTO messages (queue_id, sender, size, received_at, message_id, "
                    "client_ip, connector, helo, auth_user, metadata, status, next_due, "
                    "open_rcpts, lease_owner, lease_until) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                    (
                        queue_id,
                        env.sender,
                        size,
                        received_at,
                        env.message_id,
                        env.client_ip,
                        env.connector,
                        env.helo,
                        env.auth_user,
                        metadata,
                        RecipientStatus.READY.value,
                        len(recipients),
                        lease_owner,
                        lease_until,
                    ),
                )
            except sqlite3.IntegrityError:
                # Another process sharing this database took the id: jump past its ids.
                top = conn.execute("SELECT max(queue_id) FROM messages").fetchone()[0]
                if not top or top < queue_id:
                    raise
                self._ids.advance_past(top)
                continue
            break
        else:  # pragma: no cover
            raise StoreError("could not allocate a queue id")
        conn.execute(
            "INSERT INTO message_data (queue_id, sha256, data, spool) VALUES (?, ?, ?, ?)",
            (queue_id, digest, b"" if spool_name else data, spool_name),
        )
        conn.executemany(
            "INSERT INTO recipients (queue_id, idx, address, status) VALUES (?, ?, ?, ?)",
            [(queue_id, i, a, RecipientStatus.READY.value) for i, a in enumerate(recipients)],
        )
        return queue_id

    def _op_lease(
        self, conn: sqlite3.Connection, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[StoredMessage]:
        ids = [
            r[0]
            for r in conn.execute(
                "SELECT queue_id FROM messages "
                "WHERE suspended = 0 AND next_due <= ? "
                "AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until <= ? "
                "     OR lease_owner = ?) "
                "ORDER BY next_due, queue_id LIMIT ?",
                (now, now, owner, limit),
            )
        ]
        until = now + lease_seconds
        conn.executemany(
            "UPDATE messages SET lease_owner = ?, lease_until = ? WHERE queue_id = ?",
            [(owner, until, qid) for qid in ids],
        )
        return _load_ids(conn, ids)

    @staticmethod
    def _op_release(conn: sqlite3.Connection, queue_id: str, owner: str) -> None:
        conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            "WHERE queue_id = ? AND lease_owner = ?",
            (queue_id, owner),
        )

    def _op_record(
        self,
        conn: sqlite3.Connection,
        queue_id: str,
        results: list[tuple[Any, ...]],
        now: float,
        release_owner: str | None,
    ) -> None:
        # A removed message: the UPDATE finds no rows and _refresh does nothing.
        conn.executemany(
            "UPDATE recipients SET status = ?, attempts = ?, last_error = ?, "
            "last_attempt = ?, next_attempt = ? "
            f"WHERE queue_id = ? AND address = ? AND status NOT IN ({_FINAL_SQL})",
            results,
        )
        self._refresh(conn, queue_id, now, release_owner)

    def _op_set_flags(
        self,
        conn: sqlite3.Connection,
        queue_id: str,
        suspended: bool | None,
        delay_notified: bool | None,
        now: float,
    ) -> None:
        if not conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone():
            raise KeyError(queue_id)
        if suspended is not None:
            conn.execute(
                "UPDATE messages SET suspended = ? WHERE queue_id = ?", (int(suspended), queue_id)
            )
        if delay_notified is not None:
            conn.execute(
                "UPDATE messages SET delay_notified = ? WHERE queue_id = ?",
                (int(delay_notified), queue_id),
            )
        self._refresh(conn, queue_id, now)

    def _op_retry_now(self, conn: sqlite3.Connection, queue_id: str, now: float) -> None:
        if not conn.execute("SELECT 1 FROM messages WHERE queue_id = ?", (queue_id,)).fetchone():
            raise KeyError(queue_id)
        conn.execute(
            "UPDATE recipients SET next_attempt = NULL "
            f"WHERE queue_id = ? AND status NOT IN ({_FINAL_SQL})",
            (queue_id,),
        )
        self._refresh(conn, queue_id, now)

    def _op_remove(
        self, conn: sqlite3.Connection, queue_id: str, unless_in_flight_at: float | None
    ) -> StoredMessage | None:
        found = _load_ids(conn, [queue_id])
        if not found:
            return None
        msg = found[0]
        if (
            unless_in_flight_at is not None
            and msg.lease_owner is not None
            and msg.lease_until is not None
            and msg.lease_until > unless_in_flight_at
        ):
            raise MessageInFlightError(msg)
        spools = [
            r[0]
            for r in conn.execute(
                "SELECT spool FROM message_data WHERE queue_id = ? AND spool IS NOT NULL",
                (queue_id,),
            )
        ]
        conn.execute("DELETE FROM messages WHERE queue_id = ?", (queue_id,))
        self._unlink_after_commit.extend(spools)  # last: only once nothing here can fail
        return found[0]

    def _op_purge(self, conn: sqlite3.Connection, older_than: float, sends_before: float) -> int:
        spools = [
            r[0]
            for r in conn.execute(
                "SELECT d.spool FROM message_data d JOIN messages m USING (queue_id) "
                "WHERE m.completed_at IS NOT NULL AND m.completed_at < ? AND d.spool IS NOT NULL",
                (older_than,),
            )
        ]
        cur = conn.execute(
            "DELETE FROM messages WHERE completed_at IS NOT NULL AND completed_at < ?",
            (older_than,),
        )
        self._unlink_after_commit.extend(spools)
        purged = cur.rowcount
        conn.execute("DELETE FROM send_log WHERE at <= ?", (sends_before,))
        return purged

    @staticmethod
    def _op_reserve_send(
        conn: sqlite3.Connection,
        key: str,
        now: float,
        recipients: int,
        limits: tuple[SendLimit, ...],
        partial: bool,
    ) -> SendWait | None:
        # The writer runs one transaction at a time (and, with several processes, under the
        # writer flock / BEGIN IMMEDIATE): the count and the insert cannot interleave with
        # another reservation's.
        wait, room = _send_wait(conn, key, now, recipients, limits)
        if wait is None:
            room = recipients
        elif not partial or room < 1:
            return wait
        conn.execute(
            "INSERT INTO send_log (key, at, recipients) VALUES (?, ?, ?)", (key, now, room)
        )
        if wait is None:
            return None
        # Partial: the first `room` recipients are counted; when could the others go?
        rest, _ = _send_wait(conn, key, now, recipients - room, limits)
        assert rest is not None  # the tightest recipient limit is full now
        return SendWait(rest.until, rest.limit, room)

    @staticmethod
    def _op_save_graph_draft(
        conn: sqlite3.Connection, queue_id: str, route: str, draft: GraphDraft | None
    ) -> None:
        if draft is None:
            conn.execute(
                "DELETE FROM graph_drafts WHERE queue_id = ? AND route = ?", (queue_id, route)
            )
            return
        conn.execute(  # a message removed meanwhile: no row (its record goes with it)
            "INSERT OR REPLACE INTO graph_drafts "
            "(queue_id, route, mailbox, draft_id, sending, message_id) "
            "SELECT ?, ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM messages WHERE queue_id = ?)",
            (
                queue_id,
                route,
                draft.mailbox,
                draft.draft_id,
                int(draft.sending),
                draft.message_id,
                queue_id,
            ),
        )

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

    @staticmethod
    def _op_renew_leases(
        conn: sqlite3.Connection, owner: str, queue_ids: list[str], until: float
    ) -> int:
        held = 0
        for chunk in _chunks(queue_ids):
            marks = ", ".join("?" * len(chunk))
            cur = conn.execute(
                "UPDATE messages SET lease_until = ? "
                f"WHERE lease_owner = ? AND queue_id IN ({marks})",
                (until, owner, *chunk),
            )
            held += cur.rowcount
        return held

    async def release_owners(self, owners: Sequence[str]) -> int:
        """Drop every lease held by one of ``owners`` (processes of this node that are known not to
        run: a supervisor before it starts its workers). Returns how many leases were dropped."""
        if not owners:
            return 0
        return await self._write(self._op_release_owners, list(owners), durable=False)

    @staticmethod
    def _op_release_owners(conn: sqlite3.Connection, owners: list[str]) -> int:
        marks = ", ".join("?" * len(owners))
        cur = conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            f"WHERE lease_owner IN ({marks})",
            owners,
        )
        return cur.rowcount

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

    # ------------------------------------------------------------------ public API: reads

    async def graph_draft(self, queue_id: str, route: str) -> GraphDraft | None:
        def run(conn: sqlite3.Connection) -> GraphDraft | None:
            row = conn.execute(
                "SELECT mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = ? AND route = ?",
                (queue_id, route),
            ).fetchone()
            return None if row is None else GraphDraft(row[0], row[1], bool(row[2]), row[3])

        return await self._read(run)

    async def graph_drafts(self, queue_id: str) -> dict[str, GraphDraft]:
        def run(conn: sqlite3.Connection) -> dict[str, GraphDraft]:
            rows = conn.execute(
                "SELECT route, mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = ?",
                (queue_id,),
            ).fetchall()
            return {row[0]: GraphDraft(row[1], row[2], bool(row[3]), row[4]) for row in rows}

        return await self._read(run)

    async def get(self, queue_id: str) -> StoredMessage | None:
        found = await self._read(_load_ids, [queue_id])
        return found[0] if found else None

    async def read_data(self, queue_id: str, *, size: int = 0) -> bytes:
        def run(conn: sqlite3.Connection) -> bytes:
            row = conn.execute(
                "SELECT sha256, data, spool FROM message_data WHERE queue_id = ?", (queue_id,)
            ).fetchone()
            if row is None:
                raise KeyError(queue_id)
            digest, data, spool_name = row
            if spool_name is not None:
                try:
                    data = self._spool.read(spool_name)
                except (OSError, ValueError) as exc:
                    raise CorruptMessageError(
                        f"message {queue_id}: spool file {spool_name} unreadable: {exc}"
                    ) from exc
            if hashlib.sha256(data).digest() != digest:
                raise CorruptMessageError(f"message {queue_id}: stored bytes fail their checksum")
            return bytes(data)

        return await self._read(run)

    async def read_head(self, queue_id: str, limit: int) -> bytes:
        length = sql_head_limit(limit)

        def run(conn: sqlite3.Connection) -> bytes:
            # substr on a BLOB counts bytes. A spooled message's row holds b"" and its file
            # is read only as far as `limit`. No checksum: it covers the whole message.
            row = conn.execute(
                "SELECT substr(data, 1, ?), spool FROM message_data WHERE queue_id = ?",
                (length, queue_id),
            ).fetchone()
            if row is None:
                raise KeyError(queue_id)
            head, spool_name = row
            if spool_name is None:
                return bytes(head or b"")  # substr of an empty blob is NULL
            try:
                return self._spool.read_head(spool_name, limit)
            except (OSError, ValueError) as exc:
                raise CorruptMessageError(
                    f"message {queue_id}: spool file {spool_name} unreadable: {exc}"
                ) from exc

        return await self._read(run)

    async def list_messages(
        self,
        *,
        limit: int = 1000,
        status: str | None = None,
        after: str | None = None,
        sender: AddressPattern | None = None,
        recipient: AddressPattern | None = None,
    ) -> list[StoredMessage]:
        where, args = _list_filters(status, after, sender, recipient)
        sql = f"SELECT {_MSG_COLS} FROM messages {where} ORDER BY queue_id LIMIT ?"

        def run(conn: sqlite3.Connection) -> list[StoredMessage]:
            return _load_messages(conn, conn.execute(sql, (*args, limit)).fetchall())

        if limit <= 0:
            return []
        return await self._read(run)

    async def queue_entries(self, *, limit: int, after: str | None = None) -> list[QueueEntry]:
        cursor = check_after(after) or ""  # every queue id is greater than ""
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[QueueEntry]:
            return queue_entries_from_rows(conn.execute(_QUEUE_ENTRIES_SQL, (cursor, limit)))

        return await self._read(run)

    async def counts(self) -> dict[str, int]:
        now = time.time()

        def run(conn: sqlite3.Connection) -> dict[str, int]:
            out = {"messages": 0, **{s.value.lower(): 0 for s in RecipientStatus}}
            for status, n in conn.execute("SELECT status, count(*) FROM messages GROUP BY status"):
                out[str(status).lower()] = n
                out["messages"] += n
            out["active"] = conn.execute(
                "SELECT count(*) FROM messages WHERE lease_owner IS NOT NULL AND lease_until > ?",
                (now,),
            ).fetchone()[0]
            out["recipients_pending"] = conn.execute(
                "SELECT coalesce(sum(open_rcpts), 0) FROM messages"
            ).fetchone()[0]
            return out

        return await self._read(run)
