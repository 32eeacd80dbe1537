"""Queue data model: what the store keeps about a message and each of its recipients.

The wording of the statuses follows Exchange (``Get-Message`` / ``Get-Queue``): Ready, Retry,
Suspended; plus the two final states Delivered and Failed.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

__all__ = [
    "DSN_ENVID",
    "DSN_NOTIFY",
    "DSN_ORCPT",
    "FINAL_STATUSES",
    "LINE_BREAKS",
    "LINE_BREAKS_CRLF",
    "MESSAGE_COLUMNS",
    "NOT_SIGNED",
    "NO_REPORTS_TO_SENDER",
    "PENDING_STATUSES",
    "QUEUE_ENTRY_COLUMNS",
    "RECIPIENT_COLUMNS",
    "SEND_LOG_RETENTION",
    "SMTPUTF8",
    "Envelope",
    "GraphDraft",
    "QueueEntry",
    "QueueIdGenerator",
    "RecipientState",
    "RecipientStatus",
    "SendLimit",
    "SendWait",
    "StoredMessage",
    "derived_columns",
    "message_from_row",
    "message_status",
    "parse_status",
    "queue_entries_from_rows",
    "recipient_from_row",
    "submitted_recipients",
]


class RecipientStatus(StrEnum):
    """Per-recipient delivery state (Exchange wording)."""

    READY = "Ready"
    DEFERRED = "Retry"
    DELIVERED = "Delivered"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


#: A recipient in one of these states is done: it is never delivered to again.
FINAL_STATUSES: frozenset[RecipientStatus] = frozenset(
    {RecipientStatus.DELIVERED, RecipientStatus.FAILED}
)
#: A recipient in one of these states is waiting for a delivery attempt (when due).
PENDING_STATUSES: frozenset[RecipientStatus] = frozenset(
    {RecipientStatus.READY, RecipientStatus.DEFERRED}
)

_STATUS_ALIASES: dict[str, RecipientStatus] = {
    **{s.value.lower(): s for s in RecipientStatus},
    **{s.name.lower(): s for s in RecipientStatus},
}


def parse_status(value: str | RecipientStatus) -> RecipientStatus:
    """``"retry"``, ``"Retry"``, ``"deferred"``, ``RecipientStatus.DEFERRED`` → DEFERRED."""
    if isinstance(value, RecipientStatus):
        return value
    try:
        return _STATUS_ALIASES[value.strip().lower()]
    except KeyError:
        allowed = ", ".join(s.value for s in RecipientStatus)
        raise ValueError(f"unknown status {value!r} (expected one of {allowed})") from None


@dataclass
class RecipientState:
    address: str
    status: RecipientStatus
    attempts: int = 0
    last_error: str = ""
    last_attempt: float | None = None  # unix time
    next_attempt: float | None = None  # unix time; None = as soon as possible


@dataclass
class StoredMessage:
    queue_id: str
    sender: str  # "" for the null sender <>
    recipients: list[RecipientState]
    size: int
    received_at: float  # unix time
    message_id: str
    client_ip: str
    connector: str
    helo: str
    auth_user: str
    suspended: bool
    delay_notified: bool
    metadata: dict[str, str]
    lease_owner: str | None
    lease_until: float | None

    @classmethod
    def new(
        cls,
        queue_id: str,
        envelope: Envelope,
        *,
        size: int,
        received_at: float,
        lease: tuple[str, float] | None = None,
    ) -> StoredMessage:
        """What the store holds right after ``submit(envelope, data, lease=lease)``."""
        owner, until = lease if lease is not None else (None, None)
        return cls(
            queue_id=queue_id,
            sender=envelope.sender,
            recipients=[
                RecipientState(a, RecipientStatus.READY) for a in dict.fromkeys(envelope.recipients)
            ],
            size=size,
            received_at=received_at,
            message_id=envelope.message_id,
            client_ip=envelope.client_ip,
            connector=envelope.connector,
            helo=envelope.helo,
            auth_user=envelope.auth_user,
            suspended=False,
            delay_notified=False,
            metadata=dict(envelope.metadata),
            lease_owner=owner,
            lease_until=until,
        )

    @property
    def status(self) -> RecipientStatus:
        """The message's status as the queue viewer shows it (see :func:`message_status`)."""
        return message_status(self.suspended, [r.status for r in self.recipients])

    @property
    def pending_recipients(self) -> list[RecipientState]:
        return [r for r in self.recipients if not r.status.is_final]


@dataclass(slots=True)
class QueueEntry:
    """What Get-Queue needs of an unfinished message (``Store.queue_entries``): no bytes, no
    envelope details, only its unfinished recipients. ``status`` is the stored message status
    (:attr:`StoredMessage.status`: Ready, Retry or Suspended), so the fields read by
    ``relaygate.control.message_status`` mean what they mean on a :class:`StoredMessage`."""

    queue_id: str
    size: int
    status: RecipientStatus
    suspended: bool
    lease_owner: str | None
    lease_until: float | None
    recipients: list[RecipientState]  # the unfinished ones (not Delivered/Failed), in order


#: Envelope metadata key: the receiving session checked that every line break in the stored bytes
#: is CRLF (bare_linefeed_rejection_enabled), so delivery need not scan for bare CR or LF again.
LINE_BREAKS = "line_breaks"
LINE_BREAKS_CRLF = "CRLF"

#: Envelope metadata key, set to "1" when the client declared SMTPUTF8 on MAIL: a message with
#: UTF-8 in its headers then goes only to a next hop that offers SMTPUTF8 (RFC 6531 §3.2).
SMTPUTF8 = "smtputf8"

#: Envelope metadata keys for the RFC 3461 parameters a client gave (DSN is not advertised, but
#: what is accepted is honoured in the relay's own reports): NOTIFY and ORCPT as JSON objects by
#: recipient address (only the recipients that had one), ENVID as given (xtext).
DSN_NOTIFY = "dsn_notify"
DSN_ORCPT = "dsn_orcpt"
DSN_ENVID = "dsn_envid"

#: Envelope metadata key: why the message must not be DKIM-signed (the receiving session could not
#: send as the organisation: unauthenticated, without ms-Exch-SMTP-Accept-Authoritative-Domain-Sender).
NOT_SIGNED = "not_signed"

#: Envelope metadata key, set to "1" when the receive connector limits to whom its clients send
#: (allowed_recipients) but not as whom (allowed_senders) and the sender is not a recipient the
#: client could have written to: its NDRs and delay notices would carry what the client wrote to
#: an address of its choosing. They go to admin_notification_address only.
NO_REPORTS_TO_SENDER = "no_reports_to_sender"


@dataclass
class Envelope:
    """What the SMTP session hands to :meth:`Store.submit`."""

    sender: str
    recipients: list[str]
    client_ip: str = ""
    connector: str = ""
    helo: str = ""
    auth_user: str = ""
    message_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


#: Send records (``Store.reserve_send``) are kept this long, the longest window a send connector's
#: limits use (max_recipients_per_day); older ones are pruned.
SEND_LOG_RETENTION = 86400.0


@dataclass(frozen=True, slots=True)
class SendLimit:
    """A rolling-window budget for ``Store.reserve_send``: at most ``max_messages`` sends and at
    most ``max_recipients`` recipients (None: no such limit) counted within any ``window`` seconds.
    A send counted at ``at`` leaves the window at ``at + window``."""

    window: float
    max_messages: int | None = None
    max_recipients: int | None = None

    def check(self, recipients: int) -> None:
        """``ValueError`` for a send that could never fit this limit."""
        if not 0 < self.window <= SEND_LOG_RETENTION:
            raise ValueError(f"window must be in (0, {SEND_LOG_RETENTION:g}] s, got {self.window}")
        if self.max_messages is not None and self.max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {self.max_messages}")
        if self.max_recipients is not None and recipients > self.max_recipients:
            raise ValueError(
                f"{recipients} recipients can never fit max_recipients={self.max_recipients}"
            )


@dataclass(frozen=True, slots=True)
class SendWait:
    """``reserve_send``'s answer when a send does not fit: it could at ``until`` (when enough
    of the oldest counted sends have left the windows), ``limit`` being the one that holds it
    longest.

    ``reserved``: with ``reserve_send(..., partial=True)``, how many of its recipients were
    counted now all the same (the first ones, as many as the recipient limits had room for: the
    caller sends those now); ``until`` and ``limit`` are then about the rest. 0: nothing was
    counted (always so without ``partial``)."""

    until: float
    limit: SendLimit
    reserved: int = 0


@dataclass(frozen=True, slots=True)
class GraphDraft:
    """A Microsoft Graph draft an attempt made for one route of a message
    (``Store.save_graph_draft``): what the next attempt must resolve before it makes another.

    mailbox: the mailbox the draft is in; draft_id: its id there ("": no draft, a plain
    ``sendMail`` of the message was (or was about to be) requested).
    sending: ``POST .../send`` (or the sendMail) was (or was about to be) requested: Graph may
    have sent it.
    message_id: the message's Message-ID ("" for none), for looking it up in Sent Items.
    """

    mailbox: str
    draft_id: str
    sending: bool = False
    message_id: str = ""


def message_status(suspended: bool, statuses: list[RecipientStatus]) -> RecipientStatus:
    """One status for a whole message, in this order of precedence:

    * Suspended – the message is suspended and not finished;
    * Ready – some recipient is Ready;
    * Retry – some recipient waits for a retry;
    * Suspended – the only unfinished recipients are suspended ones;
    * Failed – finished, at least one recipient failed;
    * Delivered – finished, every recipient delivered.
    """
    present = set(statuses)
    unfinished = present - FINAL_STATUSES
    if suspended and unfinished:
        return RecipientStatus.SUSPENDED
    for status in (RecipientStatus.READY, RecipientStatus.DEFERRED, RecipientStatus.SUSPENDED):
        if status in present:
            return status
    if RecipientStatus.FAILED in present:
        return RecipientStatus.FAILED
    return RecipientStatus.DELIVERED


def derived_columns(
    suspended: bool,
    completed_at: float | None,
    recipients: Iterable[tuple[str, float | None]],
    now: float,
) -> tuple[str, float | None, int, float | None]:
    """The columns a store keeps derived from a message's recipients, recomputed after every
    change to them: ``(status, next_due, open_rcpts, completed_at)``. ``recipients`` are
    ``(status, next_attempt)`` pairs. ``next_due`` is the earliest ``next_attempt`` of a
    Ready/Retry recipient (``None`` = due now, counted as 0), ``None`` when none waits;
    ``completed_at`` is kept from before, or ``now`` when the last recipient has just finished.
    Both engines call this, so they agree on every message's status."""
    statuses: list[RecipientStatus] = []
    due: list[float] = []
    for status, next_attempt in recipients:
        st = RecipientStatus(status)
        statuses.append(st)
        if st in PENDING_STATUSES:
            due.append(0.0 if next_attempt is None else next_attempt)
    open_rcpts = sum(1 for s in statuses if s not in FINAL_STATUSES)
    if open_rcpts:
        completed_at = None
    elif completed_at is None:
        completed_at = now
    return (
        message_status(suspended, statuses).value,
        min(due) if due else None,
        open_rcpts,
        completed_at,
    )


class QueueIdGenerator:
    """Queue ids: 16 upper-case hex digits, unique and ordered by time.

    The id is a 64-bit number whose top 42 bits are the unix time in milliseconds (good until
    the year 2109) and whose low 22 bits count ids within that millisecond. Every id is strictly
    greater than the previous one: if the clock stands still or jumps back, the generator keeps
    counting from the last id. Seed it with the largest id already stored (``advance_past``) so
    ids stay unique and ordered across restarts, even after a clock jump.
    """

    _SHIFT = 22
    _MAX = (1 << 64) - 1

    def __init__(self, floor: str | None = None) -> None:
        self._last = 0
        self._lock = threading.Lock()
        if floor:
            self.advance_past(floor)

    def advance_past(self, queue_id: str) -> None:
        value = int(queue_id, 16)
        with self._lock:
            self._last = max(self._last, value)

    def next(self, now: float | None = None) -> str:
        ms = int((time.time() if now is None else now) * 1000)
        with self._lock:
            value = max(ms << self._SHIFT, self._last + 1)
            if value > self._MAX:
                raise OverflowError("queue id space exhausted")
            self._last = value
        return f"{value:016X}"

    @classmethod
    def timestamp(cls, queue_id: str) -> float:
        """Approximate creation time (unix seconds) encoded in a queue id."""
        return (int(queue_id, 16) >> cls._SHIFT) / 1000.0


#: The columns both stores select for a message and for a recipient, in the order
#: message_from_row and recipient_from_row read them.
MESSAGE_COLUMNS = (
    "queue_id, sender, size, received_at, message_id, client_ip, connector, helo, auth_user, "
    "suspended, delay_notified, metadata, lease_owner, lease_until"
)
RECIPIENT_COLUMNS = "queue_id, address, status, attempts, last_error, last_attempt, next_attempt"


#: ``Store.queue_entries``: the message columns (``m.``) and the recipient columns (``r.``) of one
#: row, in the order queue_entries_from_rows reads them.
QUEUE_ENTRY_COLUMNS = (
    "m.queue_id, m.size, m.status, m.suspended, m.lease_owner, m.lease_until, "
    "r.address, r.status, r.attempts, r.last_error, r.last_attempt, r.next_attempt"
)


def queue_entries_from_rows(rows: Iterable[Sequence[Any]]) -> list[QueueEntry]:
    """``QUEUE_ENTRY_COLUMNS`` rows, one per unfinished recipient, ordered by queue id and
    recipient → one :class:`QueueEntry` per message."""
    out: list[QueueEntry] = []
    entry: QueueEntry | None = None
    for row in rows:
        qid = row[0]
        if entry is None or entry.queue_id != qid:
            entry = QueueEntry(
                queue_id=qid,
                size=row[1],
                status=RecipientStatus(row[2]),
                suspended=bool(row[3]),
                lease_owner=row[4],
                lease_until=row[5],
                recipients=[],
            )
            out.append(entry)
        entry.recipients.append(
            RecipientState(
                address=row[6],
                status=RecipientStatus(row[7]),
                attempts=row[8],
                last_error=row[9],
                last_attempt=row[10],
                next_attempt=row[11],
            )
        )
    return out


def recipient_from_row(row: Sequence[Any]) -> RecipientState:
    """A ``RECIPIENT_COLUMNS`` row (its queue id, first, is the caller's to use)."""
    _qid, address, status, attempts, last_error, last_attempt, next_attempt = row
    return RecipientState(
        address=address,
        status=RecipientStatus(status),
        attempts=attempts,
        last_error=last_error,
        last_attempt=last_attempt,
        next_attempt=next_attempt,
    )


def message_from_row(row: Sequence[Any], recipients: list[RecipientState]) -> StoredMessage:
    """A ``MESSAGE_COLUMNS`` row and the message's recipients (metadata is stored as JSON)."""
    return StoredMessage(
        queue_id=row[0],
        sender=row[1],
        recipients=recipients,
        size=row[2],
        received_at=row[3],
        message_id=row[4],
        client_ip=row[5],
        connector=row[6],
        helo=row[7],
        auth_user=row[8],
        suspended=bool(row[9]),
        delay_notified=bool(row[10]),
        metadata=json.loads(row[11]),
        lease_owner=row[12],
        lease_until=row[13],
    )


def submitted_recipients(envelope: Envelope, data: object) -> list[str]:
    """What ``Store.submit`` checks before storing anything, for both engines: bytes-like data
    (``TypeError``), at least one recipient, each a non-empty string (``ValueError``). Returns
    the recipients with duplicates dropped, in order."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"message data must be bytes, not {type(data).__name__}")
    recipients = list(dict.fromkeys(envelope.recipients))
    if not recipients:
        raise ValueError("an envelope needs at least one recipient")
    if not all(isinstance(a, str) and a for a in recipients):
        raise ValueError("recipient addresses must be non-empty strings")
    return recipients
