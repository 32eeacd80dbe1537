"""The SQLite store's reads, and the loading of message rows that the writes share.

Each read runs on a thread of a small pool, on that thread's own read-only connection, in one
snapshot (``BEGIN`` ... ``COMMIT``): WAL lets them run alongside the writer, and the event loop
never touches the disk. Kept apart from the writer (sqlite_writer.py) so that adding a query
does not mean reading the group commit.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .model import (
    MESSAGE_COLUMNS,
    QUEUE_ENTRY_COLUMNS,
    RECIPIENT_COLUMNS,
    GraphDraft,
    QueueEntry,
    RecipientState,
    RecipientStatus,
    StoredMessage,
    message_from_row,
    parse_status,
    queue_entries_from_rows,
    recipient_from_row,
)
from .sqlite_writer import _SqliteWriter, _wrap_error
from .store import (
    AddressPattern,
    CorruptMessageError,
    StoreClosedError,
    StoreError,
    check_after,
    sql_head_limit,
)

T = TypeVar("T")

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
_CHUNK = 500  # ids per "IN (...)" query


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


class _SqliteReads(_SqliteWriter):
    """The reads of `SqliteStore` (whose ``__init__`` sets the reader pool up)."""

    _reader: ThreadPoolExecutor | None
    _rlocal: threading.local
    _rconns: list[sqlite3.Connection]

    def _read_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._rlocal, "conn", None)
        if conn is None:
            conn = self._connect(readonly=True)
            self._rlocal.conn = conn
            with self._state_lock:
                self._rconns.append(conn)
        return conn

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
            raise _wrap_error(exc, self.path) from exc

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
                    raise _spool_unreadable(queue_id, spool_name, exc) from exc
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
                raise _spool_unreadable(queue_id, spool_name, exc) from exc

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


#: Errors that say nothing about the file, only that the process is short of something for now
#: (descriptors in a connection flood, memory): the read is tried again later.
_SHORT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


def _spool_unreadable(queue_id: str, name: str, exc: Exception) -> StoreError:
    """The error for a spool file that could not be read. CorruptMessageError makes the queue
    manager suspend the message (poison) until an administrator acts, so only for the file
    itself: gone, damaged, not ours. A process out of descriptors or memory gets a StoreError."""
    text = f"message {queue_id}: spool file {name} unreadable: {exc}"
    if isinstance(exc, OSError) and exc.errno in _SHORT_OF_RESOURCES:
        return StoreError(text)
    return CorruptMessageError(text)
