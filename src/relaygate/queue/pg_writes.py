"""The PostgreSQL store's writes: a submit in one statement, the recipients' results, the admin's
changes (suspend, retry now, remove), the purge, and the Graph draft records; with the lock taken
first by every write to one message and the derived columns recomputed in the same transaction.

Every write that touches one message locks its ``messages`` row first, then its recipients (see
pg_store.py). Kept apart from the leases (pg_leases.py) and the pacing (pg_pacing.py), which
write too but follow rules of their own.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from .model import (
    FINAL_STATUSES,
    SEND_LOG_RETENTION,
    Envelope,
    GraphDraft,
    QueueIdGenerator,
    RecipientState,
    RecipientStatus,
    StoredMessage,
    derived_columns,
    submitted_recipients,
)
from .pg_connection import Conn, _PgConnection, _rowcount
from .pg_reads import _load
from .store import MessageInFlightError, StoreError

#: A submit in one statement: the message, its bytes and its recipients (none of the three when
#: the queue id is taken: ON CONFLICT leaves `m` empty).
_SUBMIT = """
WITH m AS (
    INSERT INTO messages (queue_id, sender, size, received_at, message_id, client_ip, connector,
        helo, auth_user, metadata, status, next_due, open_rcpts, lease_owner, lease_until)
    VALUES (%(queue_id)s, %(sender)s, %(size)s, %(received_at)s, %(message_id)s, %(client_ip)s,
        %(connector)s, %(helo)s, %(auth_user)s, %(metadata)s, %(ready)s, 0, %(open_rcpts)s,
        %(lease_owner)s, %(lease_until)s)
    ON CONFLICT (queue_id) DO NOTHING
    RETURNING queue_id
), d AS (
    INSERT INTO message_data (queue_id, sha256, data)
    SELECT queue_id, %(sha256)s, %(data)s FROM m
), r AS (
    INSERT INTO recipients (queue_id, idx, address, status)
    SELECT m.queue_id, t.n - 1, t.address, %(ready)s
    FROM m, unnest(%(recipients)s::text[]) WITH ORDINALITY AS t(address, n)
)
SELECT queue_id FROM m
"""
#: Per-recipient outcomes, one statement for all of them (a recipient already final is kept).
_RECORD = """
UPDATE recipients r SET status = v.status, attempts = v.attempts, last_error = v.last_error,
    last_attempt = v.last_attempt, next_attempt = v.next_attempt
FROM unnest(%s::text[], %s::text[], %s::integer[], %s::text[], %s::double precision[],
            %s::double precision[]) AS v(address, status, attempts, last_error, last_attempt,
                                         next_attempt)
WHERE r.queue_id = %s AND r.address = v.address AND r.status <> ALL(%s)
"""
_FINAL = [s.value for s in FINAL_STATUSES]


async def _lock_message(conn: Conn, queue_id: str) -> tuple[bool, float | None] | None:
    """Lock the message's row (the first lock of every write to one message: see the module
    docstring) and return ``(suspended, completed_at)``, or ``None`` if it does not exist."""
    cur = await conn.execute(
        "SELECT suspended, completed_at FROM messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def _refresh(
    conn: Conn,
    queue_id: str,
    locked: tuple[bool, float | None],
    now: float,
    release_owner: str | None = None,
) -> None:
    """Recompute the derived columns from the recipients (``locked``: what _lock_message read);
    with ``release_owner``, end that owner's lease in the same UPDATE."""
    cur = await conn.execute(
        "SELECT status, next_attempt FROM recipients WHERE queue_id = %s", (queue_id,)
    )
    status, next_due, open_rcpts, completed_at = derived_columns(
        locked[0], locked[1], await cur.fetchall(), now
    )
    await conn.execute(
        "UPDATE messages SET status = %s, next_due = %s, open_rcpts = %s, completed_at = %s, "
        "lease_until = CASE WHEN lease_owner = %s THEN NULL ELSE lease_until END, "
        "lease_owner = CASE WHEN lease_owner = %s THEN NULL ELSE lease_owner END "
        "WHERE queue_id = %s",
        (status, next_due, open_rcpts, completed_at, release_owner, release_owner, queue_id),
    )
    if open_rcpts == 0:
        # Finished: the Graph records of its routes go in the transaction that records how
        # (a record forgotten before the result is stored lets a crash send it again).
        await conn.execute("DELETE FROM graph_drafts WHERE queue_id = %s", (queue_id,))


class _PgWrites(_PgConnection):
    """The writes of `PostgresStore` (whose ``__init__`` sets ``_ids``)."""

    _ids: QueueIdGenerator

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
        return await self._tx(
            self._op_submit,
            envelope,
            recipients,
            blob,
            hashlib.sha256(blob).digest(),
            time.time() if received_at is None else received_at,
            lease,
            octets=len(blob),
        )

    async def _op_submit(
        self,
        conn: Conn,
        env: Envelope,
        recipients: list[str],
        data: bytes,
        digest: bytes,
        received_at: float,
        lease: tuple[str, float] | None,
    ) -> str:
        lease_owner, lease_until = lease if lease is not None else (None, None)
        metadata = json.dumps(env.metadata, ensure_ascii=False, sort_keys=True)
        for _ in range(1000):
            queue_id = self._ids.next()
            cur = await conn.execute(
                _SUBMIT,
                {
                    "queue_id": queue_id,
                    "sender": env.sender,
                    "size": len(data),
                    "received_at": received_at,
                    "message_id": env.message_id,
                    "client_ip": env.client_ip,
                    "connector": env.connector,
                    "helo": env.helo,
                    "auth_user": env.auth_user,
                    "metadata": metadata,
                    "ready": RecipientStatus.READY.value,
                    "open_rcpts": len(recipients),
                    "lease_owner": lease_owner,
                    "lease_until": lease_until,
                    "sha256": digest,
                    "data": data,
                    "recipients": recipients,
                },
            )
            if await cur.fetchone() is not None:
                return queue_id
            # Another node took this id (same millisecond): continue past the largest one.
            top = await (await conn.execute("SELECT max(queue_id) FROM messages")).fetchone()
            if top and top[0]:
                self._ids.advance_past(top[0])
        raise StoreError("could not allocate a queue id")  # pragma: no cover

    async def record_results(
        self, queue_id: str, owner: str, results: list[RecipientState], *, release: bool = False
    ) -> None:
        latest = {r.address: r for r in results}  # one outcome per address: the last given
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for r in latest.values():
            for column, value in zip(
                columns,
                (
                    r.address,
                    RecipientStatus(r.status).value,
                    r.attempts,
                    r.last_error,
                    r.last_attempt,
                    r.next_attempt,
                ),
                strict=True,
            ):
                column.append(value)
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:  # removed by the admin meanwhile
                return
            if latest:
                await conn.execute(_RECORD, (*columns, queue_id, _FINAL))
            await _refresh(conn, queue_id, locked, now, owner if release else None)

        # Durable, as the contract asks: a Delivered that a crash of the database server undid
        # would be delivered again by whichever node leases the message next.
        await self._tx(run)

    async def set_flags(
        self,
        queue_id: str,
        *,
        suspended: bool | None = None,
        delay_notified: bool | None = None,
    ) -> None:
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:
                raise KeyError(queue_id)
            await conn.execute(
                "UPDATE messages SET suspended = coalesce(%s, suspended), "
                "delay_notified = coalesce(%s, delay_notified) WHERE queue_id = %s",
                (suspended, delay_notified, queue_id),
            )
            new_suspended = locked[0] if suspended is None else suspended
            await _refresh(conn, queue_id, (new_suspended, locked[1]), now)

        await self._tx(run)

    async def retry_now(self, queue_id: str) -> None:
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:
                raise KeyError(queue_id)
            await conn.execute(
                "UPDATE recipients SET next_attempt = NULL "
                "WHERE queue_id = %s AND status <> ALL(%s)",
                (queue_id, _FINAL),
            )
            await _refresh(conn, queue_id, locked, now)

        await self._tx(run)

    async def remove(
        self, queue_id: str, *, unless_in_flight_at: float | None = None
    ) -> StoredMessage | None:
        async def run(conn: Conn) -> StoredMessage | None:
            if await _lock_message(conn, queue_id) is None:
                return None
            msg = (await _load(conn, [queue_id]))[0]
            if (
                unless_in_flight_at is not None
                and msg.lease_owner is not None
                and msg.lease_until is not None
                and msg.lease_until > unless_in_flight_at
            ):
                raise MessageInFlightError(msg)
            await conn.execute("DELETE FROM messages WHERE queue_id = %s", (queue_id,))
            return msg

        return await self._tx(run)

    async def purge_completed(self, older_than: float) -> int:
        sends_before = time.time() - SEND_LOG_RETENTION

        async def run(conn: Conn) -> int:
            purged = await _rowcount(  # locked in queue-id order (see renew_leases, pg_leases.py)
                conn,
                "DELETE FROM messages WHERE queue_id IN ("
                " SELECT queue_id FROM messages WHERE completed_at IS NOT NULL"
                " AND completed_at < %s ORDER BY queue_id FOR UPDATE)",
                (older_than,),
            )
            # Send records no window counts any more (reservations only insert: they never
            # wait for these rows, nor these for them).
            await conn.execute("DELETE FROM send_log WHERE at <= %s", (sends_before,))
            return purged

        return await self._tx(run)

    async def save_graph_draft(self, queue_id: str, route: str, draft: GraphDraft | None) -> None:
        async def run(conn: Conn) -> None:
            if draft is None:
                await conn.execute(
                    "DELETE FROM graph_drafts WHERE queue_id = %s AND route = %s",
                    (queue_id, route),
                )
                return
            # A message removed meanwhile: no row (its record would go with it).
            await conn.execute(
                "INSERT INTO graph_drafts "
                "(queue_id, route, mailbox, draft_id, sending, message_id) "
                "SELECT %s, %s, %s, %s, %s, %s WHERE EXISTS "
                "(SELECT 1 FROM messages WHERE queue_id = %s) "
                "ON CONFLICT (queue_id, route) DO UPDATE SET mailbox = excluded.mailbox, "
                "draft_id = excluded.draft_id, sending = excluded.sending, "
                "message_id = excluded.message_id",
                (
                    queue_id,
                    route,
                    draft.mailbox,
                    draft.draft_id,
                    draft.sending,
                    draft.message_id,
                    queue_id,
                ),
            )

        await self._tx(run)
