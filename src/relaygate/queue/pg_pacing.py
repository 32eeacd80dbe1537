"""The PostgreSQL store's send pacing: reservations against a send connector's limits
(``send_log``), one at a time per budget across every node (an advisory lock held until COMMIT).

Kept apart from the queue's writes: the budget is shared by messages, not part of any one of them,
and takes no message lock.
"""

from __future__ import annotations

from collections.abc import Sequence

from .model import SendLimit, SendWait
from .pg_connection import Conn, _PgConnection

#: The first key of the two-key advisory lock that serialises the reservations of one send budget
#: (the second: hashtext of the budget's key). Two-key locks never collide with _SCHEMA_LOCK.
_SEND_BUDGET_LOCK = 0x52_47_53_42  # "RGSB"


async def _send_wait(
    conn: Conn, key: str, now: float, recipients: int, limits: tuple[SendLimit, ...]
) -> tuple[SendWait | None, int]:
    """Whether a send of ``recipients`` fits the budget ``key`` at ``now`` (None) or when it
    will (``Store.reserve_send``), and the room for recipients left now: 0 when a message limit
    is spent, else the least any recipient limit has left (``recipients`` with none)."""
    wait: SendWait | None = None
    room = recipients
    for lim in limits:
        since = now - lim.window
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(recipients), 0) FROM send_log "
            "WHERE key = %s AND at > %s",
            (key, since),
        )
        row = await cur.fetchone()
        assert row is not None
        count, total = int(row[0]), int(row[1])
        when: float | None = None
        if lim.max_messages is not None and count + 1 > lim.max_messages:
            room = 0
            # the (count - max + 1)-th oldest send must leave the window
            cur = await conn.execute(
                "SELECT at FROM send_log WHERE key = %s AND at > %s ORDER BY at LIMIT 1 OFFSET %s",
                (key, since, count - lim.max_messages),
            )
            found = await cur.fetchone()
            assert found is not None
            when = float(found[0]) + lim.window
        if lim.max_recipients is not None:
            room = min(room, max(0, lim.max_recipients - total))
            if total + recipients > lim.max_recipients:
                cur = await conn.execute(
                    "SELECT at FROM (SELECT at, sum(recipients) OVER (ORDER BY at) AS freed"
                    " FROM send_log WHERE key = %s AND at > %s) AS w WHERE freed >= %s"
                    " ORDER BY at LIMIT 1",
                    (key, since, total + recipients - lim.max_recipients),
                )
                found = await cur.fetchone()
                assert found is not None
                when = max(when or 0.0, float(found[0]) + lim.window)
        if when is not None and (wait is None or when > wait.until):
            wait = SendWait(when, lim)
    return wait, room


class _PgPacing(_PgConnection):
    """The send pacing of `PostgresStore`."""

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
        budget = tuple(limits)

        async def run(conn: Conn) -> SendWait | None:
            # One reservation of this budget at a time across every node: the count and the
            # insert below cannot interleave with another node's (READ COMMITTED alone would let
            # two transactions both see the last free slot). Held until COMMIT.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SEND_BUDGET_LOCK, key)
            )
            wait, room = await _send_wait(conn, key, now, recipients, budget)
            if wait is None:
                room = recipients
            elif not partial or room < 1:
                return wait
            await conn.execute(
                "INSERT INTO send_log (key, at, recipients) VALUES (%s, %s, %s)",
                (key, now, room),
            )
            if wait is None:
                return None
            # Partial: the first `room` recipients are counted; when could the others go?
            rest, _ = await _send_wait(conn, key, now, recipients - room, budget)
            assert rest is not None  # the tightest recipient limit is full now
            return SendWait(rest.until, rest.limit, room)

        return await self._tx(run)
