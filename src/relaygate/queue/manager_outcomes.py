"""What one delivery attempt came to for one recipient: `RouteResult`, its four outcomes
(delivered, deferred, failed, paced) and `classify`, which reads them off a reply.

Kept apart because every part of the queue manager speaks this vocabulary (the routes produce
results, the bookkeeping records them, the reports quote them) and none of them owns it; the
queue manager (manager.py) re-exports the public names.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaygate import replies
from relaygate.queue.model import PENDING_STATUSES, RecipientState, StoredMessage
from relaygate.replies import Reply

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"
#: Not attempted: the send connector's pacing budget is spent (see relaygate.queue.pacing). The
#: recipient waits (Retry) until RouteResult.retry_at; its attempts are not counted.
PACED = "paced"


def classify(reply: Reply) -> str:
    """``delivered`` (2xx/3xx), ``deferred`` (4xx) or ``failed`` (5xx)."""
    if reply.is_positive:
        return DELIVERED
    if reply.is_transient:
        return DEFERRED
    return FAILED


def size_for_limits(msg: StoredMessage) -> int:
    """The size a send connector's ``max_message_size`` is checked against: the message's, or 0
    for a report (NDR, delay notice). Exchange exempts DSNs and system messages from size limits
    (exchange-semantics.md §7.4): a report refused by the relay's own limit is never reported
    on, and the sender never learns that the message failed. A next hop's own limit (its SIZE)
    still holds."""
    return 0 if is_report(msg) else msg.size


def is_report(msg: StoredMessage) -> bool:
    """A report this relay made (`relaygate.queue.manager_reports.send_dsn`): null sender and
    the ``dsn`` metadata, which only the queue manager sets."""
    return msg.sender in ("", "<>") and bool(msg.metadata.get("dsn"))


def is_unreachable(recipient: RecipientState) -> bool:
    """A pending recipient waiting in the Unreachable queue (no send connector matches it)."""
    return (
        recipient.status in PENDING_STATUSES and recipient.last_error == replies.NO_NEXT_HOP.line()
    )


@dataclass(frozen=True, slots=True)
class RouteResult:
    """The outcome of one attempt for one recipient."""

    address: str
    reply: Reply
    outcome: str  # delivered | deferred | failed | paced
    connector: str = ""
    remote_host: str = ""
    remote_ip: str = ""
    source: str = "SMTP"  # the tracking-log source: SMTP, ROUTING, DNS, QUEUE
    #: paced: when the send connector's window has room again; deferred: not before then
    #: (Microsoft Graph's Retry-After)
    retry_at: float | None = None
