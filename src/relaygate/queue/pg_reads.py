"""The PostgreSQL store's reads: a message with its recipients, its bytes (checksum verified) or
their head, the listing with its filters, the queue entries, the counts and the Graph draft
records; and the loading of message rows that the writes and the leases share.

Each read is one REPEATABLE READ READ ONLY transaction (pg_connection.py). Kept apart from the
writes so that adding a query does not mean reading the lock order.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from typing import Any

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
from .pg_connection import Conn, _PgConnection
from .store import AddressPattern, CorruptMessageError, check_after, sql_head_limit

_MSG_COLS = MESSAGE_COLUMNS
#: Store.queue_entries: the first %s unfinished messages (the messages_status index), joined with
#: their unfinished recipients (the recipients' primary key).
_QUEUE_ENTRIES_SQL = (
    f"SELECT {QUEUE_ENTRY_COLUMNS} FROM (SELECT queue_id, size, status, suspended, lease_owner, "
    "lease_until FROM messages WHERE status IN ('Ready', 'Retry', 'Suspended') "
    "AND queue_id > %s ORDER BY queue_id LIMIT %s) AS m JOIN recipients AS r "
    "ON r.queue_id = m.queue_id AND r.status NOT IN ('Delivered', 'Failed') "
    "ORDER BY m.queue_id, r.idx"
)
_RCPT_COLS = RECIPIENT_COLUMNS


#: ASCII-only lower-casing, as SQLite's lower() (whatever the database's locale and collation).
_ASCII_LOWER = "translate({}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"


def _list_filters(
    status: str | None,
    after: str | None,
    sender: AddressPattern | None,
    recipient: AddressPattern | None,
) -> tuple[str, list[Any]]:
    """The WHERE clause of ``list_messages`` and its parameters."""
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        clauses.append("status = %s")
        args.append(parse_status(status).value)
    after = check_after(after)
    if after is not None:
        clauses.append("queue_id > %s")
        args.append(after)
    for pattern, column in ((sender, "sender"), (recipient, "r.address")):
        if pattern is None:
            continue
        test = _ASCII_LOWER.format(column) + (" LIKE %s ESCAPE '\\'" if pattern.like else " = %s")
        if column == "sender":
            clauses.append(test)
        else:
            clauses.append(
                f"EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                f"AND {test})"
            )
        args.append(pattern.sql_value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


async def _load(conn: Conn, ids: Sequence[str]) -> list[StoredMessage]:
    """The messages ``ids`` with their recipients, in the order given (unknown ids skipped)."""
    if not ids:
        return []
    cur = await conn.execute(
        f"SELECT {_MSG_COLS} FROM messages WHERE queue_id = ANY(%s)", (list(ids),)
    )
    rows = {r[0]: r for r in await cur.fetchall()}
    rcpts: dict[str, list[RecipientState]] = {qid: [] for qid in rows}
    cur = await conn.execute(
        f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id = ANY(%s) ORDER BY queue_id, idx",
        (list(rows),),
    )
    for row in await cur.fetchall():
        rcpts[row[0]].append(recipient_from_row(row))
    return [message_from_row(rows[qid], rcpts[qid]) for qid in ids if qid in rows]


class _PgReads(_PgConnection):
    """The reads of `PostgresStore`."""

    async def graph_draft(self, queue_id: str, route: str) -> GraphDraft | None:
        async def run(conn: Conn) -> GraphDraft | None:
            cur = await conn.execute(
                "SELECT mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = %s AND route = %s",
                (queue_id, route),
            )
            row = await cur.fetchone()
            return None if row is None else GraphDraft(row[0], row[1], bool(row[2]), row[3])

        return await self._tx(run, readonly=True)

    async def graph_drafts(self, queue_id: str) -> dict[str, GraphDraft]:
        async def run(conn: Conn) -> dict[str, GraphDraft]:
            cur = await conn.execute(
                "SELECT route, mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = %s",
                (queue_id,),
            )
            rows = await cur.fetchall()
            return {row[0]: GraphDraft(row[1], row[2], bool(row[3]), row[4]) for row in rows}

        return await self._tx(run, readonly=True)

    async def get(self, queue_id: str) -> StoredMessage | None:
        async def run(conn: Conn) -> StoredMessage | None:
            found = await _load(conn, [queue_id])
            return found[0] if found else None

        return await self._tx(run, readonly=True)

    async def read_data(self, queue_id: str, *, size: int = 0) -> bytes:
        if size <= 0:  # how long the read may take depends on it
            size = await self._tx(self._op_data_size, queue_id, readonly=True)

        async def run(conn: Conn) -> bytes:
            # Binary results: as text, bytea comes back hex-encoded, twice its size plus 2, and
            # the server cannot build a value past 1 GB: a message over 512 MB was stored (and
            # acknowledged) but could never be read back, so never delivered.
            cur = await conn.execute(
                "SELECT sha256, data FROM message_data WHERE queue_id = %s",
                (queue_id,),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            digest, data = row
            data = bytes(data)
            if hashlib.sha256(data).digest() != bytes(digest):
                raise CorruptMessageError(f"message {queue_id}: stored bytes fail their checksum")
            return data

        return await self._tx(run, readonly=True, octets=size)

    @staticmethod
    async def _op_data_size(conn: Conn, queue_id: str) -> int:
        cur = await conn.execute(
            "SELECT octet_length(data) FROM message_data WHERE queue_id = %s", (queue_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise KeyError(queue_id)
        return int(row[0])

    async def read_head(self, queue_id: str, limit: int) -> bytes:
        length = sql_head_limit(limit)

        async def run(conn: Conn) -> bytes:
            # substring of a toasted bytea fetches the chunks the slice needs (decompressing a
            # compressed value only as far as the slice), not the 35 MB. No checksum: it covers
            # the whole message.
            cur = await conn.execute(
                "SELECT substring(data FROM 1 FOR %s) FROM message_data WHERE queue_id = %s",
                (length, queue_id),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            return bytes(row[0])

        return await self._tx(run, readonly=True)

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
        if limit <= 0:
            return []
        sql = f"SELECT queue_id FROM messages {where} ORDER BY queue_id LIMIT %s"

        async def run(conn: Conn) -> list[StoredMessage]:
            cur = await conn.execute(sql, (*args, limit))
            return await _load(conn, [r[0] for r in await cur.fetchall()])

        return await self._tx(run, readonly=True)

    async def queue_entries(self, *, limit: int, after: str | None = None) -> list[QueueEntry]:
        cursor = check_after(after) or ""  # every queue id is greater than ""
        if limit <= 0:
            return []

        async def run(conn: Conn) -> list[QueueEntry]:
            cur = await conn.execute(_QUEUE_ENTRIES_SQL, (cursor, limit))
            return queue_entries_from_rows(await cur.fetchall())

        return await self._tx(run, readonly=True)

    async def counts(self) -> dict[str, int]:
        now = time.time()

        async def run(conn: Conn) -> dict[str, int]:
            out = {"messages": 0, **{s.value.lower(): 0 for s in RecipientStatus}}
            cur = await conn.execute("SELECT status, count(*) FROM messages GROUP BY status")
            for status, n in await cur.fetchall():
                out[str(status).lower()] = n
                out["messages"] += n
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE lease_owner IS NOT NULL AND lease_until > %s), "
                "coalesce(sum(open_rcpts), 0) FROM messages",
                (now,),
            )
            row = await cur.fetchone()
            assert row is not None
            out["active"], out["recipients_pending"] = int(row[0]), int(row[1])
            return out

        return await self._tx(run, readonly=True)
