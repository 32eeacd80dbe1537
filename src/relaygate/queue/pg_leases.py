"""The PostgreSQL store's leases and the cluster clock: due messages leased with ``FOR UPDATE SKIP
LOCKED`` (two nodes never get the same message, nor wait for each other's rows), leases renewed
and released, and the check of this node's clock against the database server's before leasing.

Kept apart from the other writes: a lease is how nodes share the queue, and its safety rests on
the clocks agreeing, which only this module looks at.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .model import StoredMessage
from .pg_connection import Conn, _PgConnection, _rowcount, redact_url
from .pg_reads import _load
from .store import ClockSkewError


class _PgLeases(_PgConnection):
    """The leases of `PostgresStore` (whose ``__init__`` sets ``_clock``)."""

    _clock: Callable[[], float]

    async def lease_due(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []

        async def run(conn: Conn) -> list[StoredMessage]:
            # The database server's clock, read in the same round trip as the lease (pipeline
            # mode) and checked before the transaction commits: a clock stepped off is caught
            # at the next scan. Ours around it: the offset is known within that round trip.
            before = self._clock()
            clock_cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            # SKIP LOCKED: rows another node is leasing (or writing) right now are not waited
            # for; a row that changed since this statement's snapshot is checked again by
            # PostgreSQL against the WHERE clause once locked, so no lease is taken twice.
            cur = await conn.execute(
                "WITH picked AS ("
                " SELECT queue_id FROM messages"
                " WHERE NOT suspended AND next_due <= %(now)s"
                " AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until <= %(now)s"
                "      OR lease_owner = %(owner)s)"
                " ORDER BY next_due, queue_id LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED) "
                "UPDATE messages m SET lease_owner = %(owner)s, lease_until = %(until)s "
                "FROM picked WHERE m.queue_id = picked.queue_id "
                "RETURNING m.queue_id, m.next_due",
                {"now": now, "owner": owner, "limit": limit, "until": now + lease_seconds},
            )
            server_clock = await clock_cur.fetchone()
            after = self._clock()
            assert server_clock is not None
            # The server read its clock somewhere between `before` and `after`: the offset is
            # known within half that (a busy server, a slow link), which is given the benefit.
            offset = float(server_clock[0]) - (before + after) / 2
            self._check_clock(offset, max(0.0, after - before) / 2, lease_seconds)
            picked = sorted(await cur.fetchall(), key=lambda r: (r[1], r[0]))
            return await _load(conn, [r[0] for r in picked])

        return await self._tx(run)

    def _check_clock(self, offset: float, uncertainty: float, lease_seconds: float) -> None:
        """Refuse to lease when this node's clock is off the database server's (``offset``:
        theirs minus ours) by more than a third of a lease. Every node compares leases with its
        own clock (the contract's ``now``): one ahead by more than a lease has left takes a live
        lease of another node, one behind writes leases the others see end early, and the
        message is delivered twice. A delivery renews its lease every third of one, so a third
        is what each lease keeps in hand. The database server's clock stands for the cluster's:
        the one clock every node sees."""
        if abs(offset) - uncertainty > lease_seconds / 3:
            raise ClockSkewError(
                f"this node's clock is {abs(offset):.0f} s "
                f"{'behind' if offset > 0 else 'ahead of'} the queue database "
                f"{redact_url(self.url)}'s, more than a third of queue.lease_duration "
                f"({lease_seconds:g} s): its leases could overlap other nodes' and a message be "
                "delivered twice, so it leases no message until the clocks agree (set up NTP on "
                "the node and the database server)"
            )

    async def release(self, queue_id: str, owner: str) -> None:
        await self._tx(
            _rowcount,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            "WHERE queue_id = %s AND lease_owner = %s",
            (queue_id, owner),
        )

    async def renew_leases(self, owner: str, queue_ids: Sequence[str], until: float) -> int:
        if not queue_ids:
            return 0

        # Rows locked in queue-id order, as every call locking several does: two such calls
        # never wait for each other in a cycle (a deadlock, then a retry).
        return await self._tx(
            _rowcount,
            "UPDATE messages SET lease_until = %s WHERE queue_id IN ("
            " SELECT queue_id FROM messages WHERE lease_owner = %s AND queue_id = ANY(%s)"
            " ORDER BY queue_id FOR UPDATE)",
            (until, owner, list(queue_ids)),
        )

    async def release_owners(self, owners: Sequence[str]) -> int:
        """Drop every lease held by one of ``owners`` (processes of this node known not to run:
        the supervisor before it starts its workers). Returns how many were dropped."""
        if not owners:
            return 0

        return await self._tx(
            _rowcount,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ANY(%s)",
            (list(owners),),
        )
