"""The queue ``Store`` interface.

One interface, two engines: SQLite (WAL) on a single node, PostgreSQL when several nodes share
one queue. The semantics below are written so that both can honour them; callers must not rely
on anything engine-specific.

Contract highlights
-------------------
* ``submit`` returns only when the envelope and the message bytes are committed and flushed to
  stable storage ("a 250 means durable"). If it raises, nothing may be acknowledged to the
  client: :class:`StoreFullError` maps to ``452 4.3.1``, any other :class:`StoreError` to
  ``451 4.3.0``. (A submit whose caller was cancelled may still have been committed: duplicates
  are possible, loss is not.)
* Every mutating call is durable on return, in particular ``record_results``: a recipient
  recorded as Delivered is never handed out for delivery again, even after a crash of the
  process. The delivery bookkeeping (leases, ``record_results``, ``reserve_send``) may be made
  durable against a power cut only by the next flush (SQLite commits it with
  ``synchronous=NORMAL``): a power cut can forget a last result, and the recipient is then
  delivered again (at least once), never lost.
* Delivered and Failed are final: ``record_results`` never moves a recipient out of them.
* Leases use wall-clock time supplied by the caller (``now``) so that nodes of a cluster agree.
  A shared store raises :class:`ClockSkewError` from ``lease_due`` when the caller's node clock
  is too far off the cluster's for its leases to be compared safely with the other nodes'.
  A lease held by ``owner`` does not stop ``owner`` itself from leasing the message again
  (a restarted node with the same owner name recovers its in-flight messages at once); callers
  that lease repeatedly must keep track of what they already have in flight.
* Unknown queue ids: ``get``/``remove`` return ``None``; ``read_data``, ``read_head``,
  ``set_flags`` and ``retry_now`` raise ``KeyError``; ``release`` and ``record_results`` are
  no-ops (the admin may have removed the message while it was being delivered).
* Graph drafts (``save_graph_draft``) are durable on return, as every mutating call: a node that
  takes the message over after a crash finds them.
* Send budgets (``reserve_send``) are shared by every client of one store: the workers of a node
  (SQLite) and every node of a cluster (PostgreSQL). A reservation is atomic: two clients that
  reserve at once never both take the last slot.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from relaygate.address_patterns import AddressPattern, ascii_lower

from .model import (
    Envelope,
    GraphDraft,
    QueueEntry,
    RecipientState,
    SendLimit,
    SendWait,
    StoredMessage,
)

__all__ = [
    "AddressPattern",
    "ClockSkewError",
    "CorruptMessageError",
    "MessageInFlightError",
    "Store",
    "StoreClosedError",
    "StoreError",
    "StoreFullError",
    "StoreOutcomeUnknownError",
    "ascii_lower",
    "check_after",
    "open_store",
    "sql_head_limit",
]

_QUEUE_ID = re.compile(r"^[0-9A-Fa-f]{16}$")


def check_after(after: str | None) -> str | None:
    """The ``after`` cursor of ``list_messages``: a queue id (16 hex digits), upper-cased.
    ``ValueError`` for anything else."""
    if after is None:
        return None
    text = after.strip()
    if not _QUEUE_ID.match(text):
        raise ValueError(f"after must be a queue id (16 hex digits), not {after!r}")
    return text.upper()


#: The longest length SQL's substr (SQLite) / substring (PostgreSQL) takes: a 32-bit integer
#: (SQLite reads a longer one as something else, PostgreSQL has no bigint form). No message in
#: either database is longer: their blobs and bytea values stop at 1 GB.
_SQL_LENGTH_MAX = 2**31 - 1


def sql_head_limit(limit: int) -> int:
    """The ``limit`` of ``read_head`` as a length for SQL: ``ValueError`` under 0, at most
    _SQL_LENGTH_MAX (max_header_size may be up to 2 GB, and room is added to it)."""
    if limit < 0:
        raise ValueError(f"read_head limit must be 0 or more bytes, not {limit}")
    return min(limit, _SQL_LENGTH_MAX)


class StoreError(Exception):
    """The store could not do what was asked (I/O error, database error...)."""


class StoreFullError(StoreError):
    """The disk (or the database) is full: refuse new mail with a 4xx, retry later."""


class StoreClosedError(StoreError):
    """The store is not open (not yet opened, or closed / shutting down)."""


class ClockSkewError(StoreError):
    """This node's clock is too far off the shared store's to lease messages safely: the leases
    of a cluster are compared with each node's clock, so a node ahead would take other nodes'
    live leases (and a node behind would write leases they see expire early)."""


class StoreOutcomeUnknownError(StoreError):
    """The commit failed after its changes may have reached the disk (an error from COMMIT
    itself: SQLite may have written the WAL frames, even fsync'd them, before it failed). They
    may come back at the next open. A caller must not report the change as refused: a receiving
    session closes the connection without a reply (RFC 5321 §6.1: the client cannot tell)."""


class CorruptMessageError(StoreError):
    """The stored message bytes fail their integrity check."""


class MessageInFlightError(Exception):
    """The message is being delivered now (its lease is live): Exchange's Active status."""

    def __init__(self, message: StoredMessage) -> None:
        super().__init__(f"message {message.queue_id} is being delivered")
        self.message = message


@runtime_checkable
class Store(Protocol):
    async def open(self) -> None:
        """Create/upgrade the schema and start the engine. Idempotent."""
        ...

    async def close(self) -> None:
        """Finish everything already submitted, then stop. Idempotent."""
        ...

    async def __aenter__(self) -> Store:
        """``async with store:`` opens it, and closes it at the end of the block."""
        ...

    async def __aexit__(self, *exc: object) -> None: ...

    async def submit(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        lease: tuple[str, float] | None = None,
        received_at: float | None = None,
    ) -> str:
        """Store a new message; durable on return. Returns its queue id (16 upper-case hex
        digits, unique, time-ordered). Raises ``ValueError`` for an envelope without
        recipients; duplicate recipient addresses are stored once. ``lease=(owner, until)``
        stores it already leased to ``owner`` (the local queue manager takes it from the
        receiving session without a ``lease_due`` round trip). ``received_at`` (unix time,
        default now) lets that session keep the same value in its in-memory copy."""
        ...

    async def get(self, queue_id: str) -> StoredMessage | None: ...

    async def read_data(self, queue_id: str, *, size: int = 0) -> bytes:
        """The message bytes exactly as submitted. ``KeyError`` if unknown,
        :class:`CorruptMessageError` if they fail their checksum. ``size``: the message's size
        when the caller knows it (a store whose reads are bounded in time bounds this one by it;
        0: the store finds it)."""
        ...

    async def read_head(self, queue_id: str, limit: int) -> bytes:
        """The first ``limit`` bytes of the message (all of it when it is shorter), read without
        reading the rest: what an admin's view of one message needs (its header), where a
        message can be 35 MB. Not checked against the checksum, which covers the whole message
        only: the bytes are as stored, corrupt or not. ``KeyError`` if unknown; ``ValueError``
        for a ``limit`` under 0."""
        ...

    async def list_messages(
        self,
        *,
        limit: int = 1000,
        status: str | None = None,
        after: str | None = None,
        sender: AddressPattern | None = None,
        recipient: AddressPattern | None = None,
    ) -> list[StoredMessage]:
        """Up to ``limit`` messages in queue-id (arrival) order. ``status`` filters on the message
        status (:attr:`StoredMessage.status`): Ready, Retry, Suspended, Delivered or Failed, any
        case; ``ValueError`` for anything else. ``after``: only messages whose queue id is greater
        (the cursor of the next page: the last queue id of this one; see :func:`check_after`,
        ``ValueError`` if it is not a queue id). ``sender``: the envelope sender matches
        (:class:`AddressPattern`, ``""`` for ``<>``); ``recipient``: at least one recipient,
        whatever its status, matches. All filters are in the query (``queue_id > ? ... ORDER BY
        queue_id LIMIT ?``), never applied to a larger result afterwards."""
        ...

    async def queue_entries(self, *, limit: int, after: str | None = None) -> list[QueueEntry]:
        """The first ``limit`` unfinished messages (stored status Ready, Retry or Suspended) in
        queue-id order, each as a :class:`QueueEntry`: the few message columns Get-Queue reads
        and its unfinished recipients in their order; no bytes, no metadata, no finished
        recipients. One query (messages joined with recipients), so that Get-Queue over
        100,000 messages does not build 100,000 :class:`StoredMessage` objects. ``after``: only
        messages whose queue id is greater (keyset paging, as in ``list_messages``)."""
        ...

    async def lease_due(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[StoredMessage]:
        """Atomically lease up to ``limit`` messages that are not suspended, have at least one
        Ready/Retry recipient whose ``next_attempt`` is ``None`` or ``<= now``, and carry no live
        lease (``lease_until > now``) of another owner. Sets ``lease_owner=owner`` and
        ``lease_until=now+lease_seconds`` and returns the leased messages, most overdue first."""
        ...

    async def release(self, queue_id: str, owner: str) -> None:
        """Drop the lease if ``owner`` holds it."""
        ...

    async def renew_leases(self, owner: str, queue_ids: Sequence[str], until: float) -> int:
        """Extend to ``until`` the leases ``owner`` still holds on ``queue_ids`` (a delivery run
        longer than a lease: a slow next hop). Returns how many it still held; a lease that has
        passed to another owner meanwhile is left as it is."""
        ...

    async def record_results(
        self, queue_id: str, owner: str, results: list[RecipientState], *, release: bool = False
    ) -> None:
        """Store per-recipient outcomes, matched by address (status, attempts, last_error,
        last_attempt, next_attempt). Results are facts and are recorded even if the lease has
        meanwhile passed to another owner; a recipient already Delivered/Failed is left as is;
        unknown addresses are ignored. ``release=True`` also drops ``owner``'s lease in the same
        transaction (the delivery run is over)."""
        ...

    async def set_flags(
        self,
        queue_id: str,
        *,
        suspended: bool | None = None,
        delay_notified: bool | None = None,
    ) -> None: ...

    async def retry_now(self, queue_id: str) -> None:
        """``next_attempt = None`` for every unfinished recipient."""
        ...

    async def remove(
        self, queue_id: str, *, unless_in_flight_at: float | None = None
    ) -> StoredMessage | None:
        """Delete the message; returns what it was, or ``None`` if unknown.
        unless_in_flight_at: the time now; a message whose lease is live then is kept and
        :class:`MessageInFlightError` raised (checked in the same transaction as the delete)."""
        ...

    async def purge_completed(self, older_than: float) -> int:
        """Delete messages whose recipients are all Delivered/Failed and that were completed
        before the unix time ``older_than``. Returns how many were deleted. Also drops every send
        record (``reserve_send``) older than ``SEND_LOG_RETENTION``, of any budget (a renamed or
        removed send connector's too)."""
        ...

    async def reserve_send(
        self,
        key: str,
        now: float,
        recipients: int,
        limits: Sequence[SendLimit],
        *,
        partial: bool = False,
    ) -> SendWait | None:
        """Reserve one send of ``recipients`` recipients against the budget ``key`` (a send
        connector's pacing limits, shared by all the clients of this store) at the unix time
        ``now``, atomically: if, for every limit, the sends already counted within its window
        (``at > now - window``) plus this one stay within it, count this one at ``now`` and return
        ``None``; otherwise count nothing and return a :class:`SendWait`: the earliest time at
        which the oldest counted sends will have left the windows far enough for it to fit (if
        nobody else sends meanwhile), and the limit that holds it longest.
        ``partial``: a send that does not fit whole takes what room is left instead, when every
        message limit has room for it and the recipient limits for at least one recipient: one
        send of the first R recipients is counted at ``now`` (R = the room left under the
        tightest recipient limit, 1 <= R < ``recipients``) and the answer is a
        :class:`SendWait` with ``reserved = R`` whose ``until``/``limit`` say when the other
        ``recipients - R`` could go (as if asked for them right after). Without room for one
        recipient, or a message limit spent, nothing is counted (``reserved = 0``), as without
        ``partial``.
        A reservation is never given back (the caller sends, or its upstream may have counted the
        attempt). ``purge_completed`` prunes the records (a window is at most
        ``SEND_LOG_RETENTION``). ``ValueError`` for a send that can never fit (more recipients
        than a ``max_recipients``, a ``max_messages`` under 1) or a window out of range."""
        ...

    async def graph_draft(self, queue_id: str, route: str) -> GraphDraft | None:
        """The Graph draft recorded for ``route`` of the message (``save_graph_draft``), or
        ``None``."""
        ...

    async def graph_drafts(self, queue_id: str) -> dict[str, GraphDraft]:
        """Every Graph draft recorded for the message, by route (``{}`` for none, and for an
        unknown queue id)."""
        ...

    async def save_graph_draft(self, queue_id: str, route: str, draft: GraphDraft | None) -> None:
        """Record (durably) the Graph draft an attempt made for ``route`` (a send connector and
        its recipients) of the message, replacing the one recorded before; ``None`` forgets it.
        A no-op for an unknown queue id; the record goes with its message (``remove``, a
        purge), and in the transaction that finishes the message (its last open recipient
        Delivered or Failed: ``record_results``, an expiry), so that a send's record outlives
        the send until its result is stored."""
        ...

    async def counts(self) -> dict[str, int]:
        """``{"messages", "ready", "retry", "suspended", "delivered", "failed", "active",
        "recipients_pending"}``: messages by status, ``active`` = messages under a live lease,
        ``recipients_pending`` = unfinished recipients."""
        ...


def open_store(data_dir: Path) -> Store:
    """The single-node store: SQLite at ``data_dir/queue/queue.db`` (not yet opened: call
    ``await store.open()``). The configured store, SQLite or PostgreSQL, comes from
    ``relaygate.app.open_store``."""
    from .sqlite_store import SqliteStore

    return SqliteStore(Path(data_dir) / "queue" / "queue.db")
