"""What a queued message looks like to an admin: its identity, its status and ``message_view``.

The names of the fields are Exchange's (see the package's docstring). Everything here is a pure
function of a message (a ``StoredMessage``, or a ``QueueEntry`` for the status) and the current
config: no store, no I/O. The pages (``reads``), the operations (``operations``) and the
delivery queues (``queues``) all show a message through ``message_view`` and read identities
with ``normalise_id`` / ``queue_name``, so there is one shape of a message; it is in a module of
its own so that it can be read, and tested, without a store or a running node.
"""

from __future__ import annotations

import dataclasses
import re
import time
from datetime import UTC, datetime
from typing import Any

from relaygate import replies
from relaygate.config.model import ReceiveConnector
from relaygate.delivery.routing import DELIVERY_UNREACHABLE, explain_route
from relaygate.queue.bounce import header_value
from relaygate.queue.manager_outcomes import size_for_limits
from relaygate.queue.model import (
    FINAL_STATUSES,
    PENDING_STATUSES,
    QueueEntry,
    RecipientStatus,
    StoredMessage,
)
from relaygate.queue.retry import RetrySchedule

__all__ = [
    "MESSAGE_STATUSES",
    "Conflict",
    "NotFound",
    "header_read_limit",
    "iso_time",
    "message_status",
    "message_view",
    "normalise_id",
    "queue_name",
]

#: What ``Status`` can say, and what ``list_messages(status=...)`` filters on.
MESSAGE_STATUSES = (
    "Active",
    "Ready",
    "Retry",
    "Suspended",
    "Unreachable",
    "Delivered",
    "Failed",
)

_QUEUE_ID = re.compile(r"^[0-9A-F]{16}$")


#: A receive connector's max_header_size when the message's connector is no longer configured
#: (or it was made here: an NDR): the default, 256 KB.
_DEFAULT_MAX_HEADER = next(
    int(f.default)
    for f in dataclasses.fields(ReceiveConnector)
    if f.name == "max_header_size" and isinstance(f.default, int)
)
#: Room for the Received field the receiving session puts above the header it measured against
#: max_header_size (`relaygate.smtp.message.received_header`: a HELO of up to 255 characters,
#: the FQDN, the connector's name, the recipient).
_RECEIVED_ROOM = 8 * 1024


class NotFound(LookupError):
    """No message with that identity."""


class Conflict(Exception):
    """The operation does not apply to the message in its current state."""


def normalise_id(identity: str) -> str:
    """``0195...``, ``relay01\\0195...`` or ``RELAY01\\Queue\\0195...`` → the 16-digit queue id."""
    text = identity.strip().replace("/", "\\")
    qid = text.rsplit("\\", 1)[-1].strip().upper()
    if not _QUEUE_ID.match(qid):
        raise NotFound(f"{identity!r} is not a message identity (SERVER\\QueueId, 16 hex digits)")
    return qid


def queue_name(identity: str, server: str) -> str:
    """``RELAY01\\[10.0.0.5]``, ``[10.0.0.5]``, ``unreachable`` → the delivery queue's name
    (``Unreachable`` spelt as Exchange does). ``ValueError`` naming ``queue`` when it is empty
    or names another server."""
    text = identity.strip().replace("/", "\\")
    if "\\" in text:
        node, _, text = text.partition("\\")
        if node.strip().lower() != server.lower():
            raise ValueError(
                f"queue {identity!r} is on server {node.strip()!r}; this server is {server}"
            )
        text = text.strip()
    if not text or "\\" in text:
        raise ValueError(
            "queue must be a delivery queue: its NextHopDomain (a domain, a smart-host list "
            f"such as [10.0.0.5]) or Unreachable, optionally as {server}\\NAME"
        )
    return DELIVERY_UNREACHABLE if text.lower() == DELIVERY_UNREACHABLE.lower() else text


def header_read_limit(msg: StoredMessage, config: Any) -> int:
    """How many bytes of the message to read for its header (``Store.read_head``): the most
    header its receive connector accepts (max_header_size, as configured now) and the Received
    field added above it. A header the relay accepted is then whole in it, unless the limit was
    lowered since (``header_of_head`` leaves out the field that the cut would show in part)."""
    connector = config.connector(msg.connector) if msg.connector else None
    most = connector.max_header_size if connector is not None else _DEFAULT_MAX_HEADER
    return int(most) + _RECEIVED_ROOM


def _recipient_queue(r: dict[str, Any]) -> tuple[str, str, str]:
    """(NextHopDomain, DeliveryType, SendConnector) of the delivery queue an unfinished
    recipient (of ``message_view``'s Recipients) waits in: Unreachable while its last attempt
    found no route, until it is resubmitted (a send connector added since does not move it
    before its next attempt, as in Exchange); else the queue routing gives it now."""
    if r["Status"] == DELIVERY_UNREACHABLE:
        return DELIVERY_UNREACHABLE, DELIVERY_UNREACHABLE, ""
    return str(r["NextHopDomain"]), str(r["DeliveryType"]), str(r["SendConnector"])


def _in_queue(view: dict[str, Any], name: str) -> bool:
    wanted = name.lower()
    return any(
        r["Status"] not in _FINAL_VIEW and _recipient_queue(r)[0].lower() == wanted
        for r in view["Recipients"]
    )


_FINAL_VIEW = tuple(s.value for s in FINAL_STATUSES)


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _unreachable(r: Any) -> bool:
    return r.status in PENDING_STATUSES and r.last_error == replies.NO_NEXT_HOP.line()


def _recipient_status(r: Any) -> str:
    return "Unreachable" if _unreachable(r) else RecipientStatus(r.status).value


def message_status(msg: StoredMessage | QueueEntry, now: float) -> str:
    """Exchange's message status, with Active (being delivered now) and Unreachable added
    (``msg`` may be a ``QueueEntry``: only the unfinished recipients are looked at)."""
    status = msg.status
    if status in FINAL_STATUSES:
        return status.value
    if status == RecipientStatus.SUSPENDED:
        return "Suspended"
    if msg.lease_owner and msg.lease_until is not None and msg.lease_until > now:
        return "Active"
    pending = [r for r in msg.recipients if r.status in PENDING_STATUSES]
    if status == RecipientStatus.DEFERRED and pending and all(_unreachable(r) for r in pending):
        return "Unreachable"
    return status.value


def message_view(
    msg: StoredMessage,
    config: Any,
    *,
    now: float | None = None,
    data: bytes | None = None,
) -> dict[str, Any]:
    """A message as the API returns it. ``data``, when given (the header section, or the whole
    message), adds the Subject and the envelope's HELO, AUTH user and lease."""
    now = time.time() if now is None else now
    server = str(config.server.name)
    schedule = RetrySchedule.from_config(config.queue)
    connectors = list(config.send_connectors)
    recipients: list[dict[str, Any]] = []
    hops: list[str] = []
    types: list[str] = []
    send_connectors: list[str] = []
    size = size_for_limits(msg)  # a report's is 0: exempt from max_message_size, as it is sent
    for r in msg.recipients:
        finished = r.status in FINAL_STATUSES
        route = None if finished else explain_route(connectors, r.address, size=size).route
        if route is not None:
            for seen, value in (
                (hops, route.next_hop),
                (types, route.delivery_type),
                (send_connectors, route.connector_name or ""),
            ):
                if value and value not in seen:
                    seen.append(value)
        delivered = r.status == RecipientStatus.DELIVERED
        recipients.append(
            {
                "Address": r.address,
                "Status": _recipient_status(r),
                "LastError": "" if delivered else r.last_error,
                "LastResponse": r.last_error,
                "RetryCount": r.attempts,
                "LastAttemptTime": iso_time(r.last_attempt),
                "NextRetryTime": None if finished else iso_time(r.next_attempt),
                "NextHopDomain": route.next_hop if route else "",
                "DeliveryType": route.delivery_type if route else "",
                "SendConnector": (route.connector_name or "") if route else "",
            }
        )
    pending = [r for r in msg.recipients if r.status in PENDING_STATUSES]
    errored = [r for r in msg.recipients if r.last_error and r.status != RecipientStatus.DELIVERED]
    errored.sort(key=lambda r: r.last_attempt or 0.0)
    retry_times = [r.next_attempt for r in pending if r.next_attempt is not None]
    next_hop = ", ".join(hops)
    queue_name = DELIVERY_UNREACHABLE if hops == [DELIVERY_UNREACHABLE] else next_hop
    view: dict[str, Any] = {
        "Identity": f"{server}\\{msg.queue_id}",
        "QueueId": msg.queue_id,
        "Queue": f"{server}\\{queue_name}" if queue_name else "",
        "Status": message_status(msg, now),
        "FromAddress": msg.sender or "<>",
        "Size": msg.size,
        "DateReceived": iso_time(msg.received_at),
        "ExpirationTime": iso_time(schedule.expires_at(msg.received_at)),
        "MessageId": msg.message_id,
        "NextHopDomain": next_hop,
        "DeliveryType": ", ".join(types),
        "SendConnector": ", ".join(send_connectors),
        "LastError": errored[-1].last_error if errored else "",
        "NextRetryTime": iso_time(min(retry_times)) if retry_times else None,
        "RetryCount": max((r.attempts for r in msg.recipients), default=0),
        "RecipientCount": len(msg.recipients),
        "Recipients": recipients,
        "SourceIP": msg.client_ip,
        "ReceiveConnector": msg.connector,
        "Suspended": msg.suspended,
        "DelayNotified": msg.delay_notified,
        "IsDsn": bool(msg.metadata.get("dsn")),
        "OriginalQueueId": msg.metadata.get("original_queue_id", ""),
    }
    if data is not None:
        view["Subject"] = header_value(data, "Subject")
        view["Helo"] = msg.helo
        view["AuthUser"] = msg.auth_user
        view["LeaseOwner"] = msg.lease_owner
        view["LeaseUntil"] = iso_time(msg.lease_until)
    return view
