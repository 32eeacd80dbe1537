"""Queue data model: what the store keeps about a message and each of its recipients.

The wording of the statuses follows Exchange (``Get-Message`` / ``Get-Queue``): Ready, Retry,
Suspended; plus the two final states Delivered and Failed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "FINAL_STATUSES",
    "LINE_BREAKS",
    "LINE_BREAKS_CRLF",
    "PENDING_STATUSES",
    "SMTPUTF8",
    "Envelope",
    "QueueIdGenerator",
    "RecipientState",
    "RecipientStatus",
    "StoredMessage",
    "derived_columns",
    "message_status",
    "parse_status",
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


#: Envelope metadata key: the receiving session checked that every line break in the stored bytes
#: is CRLF (bare_linefeed_rejection_enabled), so delivery need not scan for bare CR or LF again.
LINE_BREAKS = "line_breaks"
LINE_BREAKS_CRLF = "CRLF"

#: Envelope metadata key, set to "1" when the client declared SMTPUTF8 on MAIL: a message with
#: UTF-8 in its headers then goes only to a next hop that offers SMTPUTF8 (RFC 6531 §3.2).
SMTPUTF8 = "smtputf8"


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
