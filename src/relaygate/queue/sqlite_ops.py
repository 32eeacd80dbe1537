"""The SQLite store's changes: each a function of the write connection (``_op_*``) that the
writer thread runs inside its batch's transaction, and the derived columns of ``messages``
(status, next_due, open_rcpts, completed_at) that they keep in step with the recipients.

Kept apart from the writer thread (sqlite_writer.py): these say what is written, that one how
and when it is committed. The leases and the recipients' results are here, as is the pacing
budget (send_log) and the Graph draft records.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from typing import Any

from .model import (
    FINAL_STATUSES,
    Envelope,
    GraphDraft,
    RecipientStatus,
    SendLimit,
    SendWait,
    StoredMessage,
    derived_columns,
)
from .sqlite_reads import _chunks, _load_ids
from .sqlite_writer import _SqliteWriter
from .store import MessageInFlightError, StoreError

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


class _SqliteOps(_SqliteWriter):
    """The ``_op_*`` of `SqliteStore`, each given to ``_write`` by its public method."""

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

    @staticmethod
    def _op_release_owners(conn: sqlite3.Connection, owners: list[str]) -> int:
        marks = ", ".join("?" * len(owners))
        cur = conn.execute(
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            f"WHERE lease_owner IN ({marks})",
            owners,
        )
        return cur.rowcount
