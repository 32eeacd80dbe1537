"""Queue operations on a running node, shared by the admin API, the web admin centre and the CLI.

The CLI never opens the store itself: it calls the admin API of the running server, which calls
these functions, so there is one implementation of "what retry does" and one shape of a message.

A message is shown with Exchange's ``Get-Message`` / ``Get-Queue`` field names: ``Identity``
(``SERVER\\QueueId``), ``Status`` (Active, Ready, Retry, Suspended, Unreachable, Delivered, Failed),
``Queue`` and ``NextHopDomain`` (the delivery queue its pending recipients are in), ``LastError``,
``NextRetryTime``, ``Size``, ``FromAddress``, ``Recipients`` (each with its own status and last
response), ``DateReceived``, ``ExpirationTime``, ``MessageId``. Times are ISO 8601 in UTC.

Operations (Exchange counterpart): ``list_messages`` (Get-Message), ``show`` (Get-Message
-IncludeRecipientInfo), ``retry`` (Retry-Queue / Resubmit: every unfinished recipient is due now,
routing is done again), ``suspend`` / ``resume`` (Suspend-Message / Resume-Message), ``remove``
(Remove-Message [-WithNDR]: the unfinished recipients get ``550 4.3.2 QUEUE.Admin; message deleted
by administrative action``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from relaygate import replies
from relaygate.delivery.routing import DELIVERY_UNREACHABLE, explain_route
from relaygate.queue.bounce import DsnRecipient, header_value
from relaygate.queue.model import FINAL_STATUSES, PENDING_STATUSES, RecipientStatus, StoredMessage
from relaygate.queue.retry import RetrySchedule
from relaygate.queue.store import MessageInFlightError, Store

__all__ = [
    "MAX_LIST_LIMIT",
    "MESSAGE_STATUSES",
    "Conflict",
    "NotFound",
    "QueueControl",
    "iso_time",
    "message_view",
    "normalise_id",
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

#: The most messages one ``list_messages`` call returns (and scans for a derived status).
MAX_LIST_LIMIT = 100_000

_QUEUE_ID = re.compile(r"^[0-9A-F]{16}$")


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


def iso_time(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _unreachable(r: Any) -> bool:
    return r.status in PENDING_STATUSES and r.last_error == replies.NO_NEXT_HOP.line()


def _recipient_status(r: Any) -> str:
    return "Unreachable" if _unreachable(r) else RecipientStatus(r.status).value


def message_status(msg: StoredMessage, now: float) -> str:
    """Exchange's message status, with Active (being delivered now) and Unreachable added."""
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
    """A message as the API returns it (``data``, when given, adds Subject and headers)."""
    now = time.time() if now is None else now
    server = str(config.server.name)
    schedule = RetrySchedule.from_config(config.queue)
    connectors = list(config.send_connectors)
    recipients: list[dict[str, Any]] = []
    hops: list[str] = []
    types: list[str] = []
    send_connectors: list[str] = []
    for r in msg.recipients:
        finished = r.status in FINAL_STATUSES
        route = None if finished else explain_route(connectors, r.address, size=msg.size).route
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


class QueueControl:
    """The queue operations of one node.

    config: a callable returning the current config (it changes on reload). manager: the
    QueueManager (wakes the delivery loop, writes NDRs); may be None in tools that only read.
    """

    def __init__(
        self,
        store: Store,
        config: Callable[[], Any],
        manager: Any = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._config = config
        self.manager = manager
        self.clock = clock

    @classmethod
    def for_relay(cls, relay: Any) -> QueueControl:
        return cls(relay.store, lambda: relay.config, getattr(relay, "manager", None))

    @property
    def config(self) -> Any:
        return self._config()

    async def _get(self, identity: str) -> StoredMessage:
        qid = normalise_id(identity)
        msg = await self.store.get(qid)
        if msg is None:
            raise NotFound(f"message {identity} not found")
        return msg

    async def list_messages(
        self, *, status: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        """Messages in arrival order; ``status`` is one of MESSAGE_STATUSES (any case)."""
        wanted = None
        if status:
            matches = [s for s in MESSAGE_STATUSES if s.lower() == status.strip().lower()]
            if not matches:
                raise ValueError(
                    f"unknown status {status!r}; use one of {', '.join(MESSAGE_STATUSES)}"
                )
            wanted = matches[0]
        # Store-level filter where it is exact; Active/Unreachable are derived views.
        store_status = wanted if wanted in ("Delivered", "Failed", "Suspended") else None
        if wanted in ("Unreachable",):
            store_status = "Retry"
        messages = await self.store.list_messages(
            limit=limit if store_status or not wanted else MAX_LIST_LIMIT, status=store_status
        )
        now = self.clock()
        config = self.config
        out = [message_view(m, config, now=now) for m in messages]
        if wanted:
            out = [v for v in out if v["Status"] == wanted]
        return out[:limit]

    async def show(self, identity: str) -> dict[str, Any]:
        msg = await self._get(identity)
        try:
            data = await self.store.read_data(msg.queue_id)
        except Exception:
            data = b""
        return message_view(msg, self.config, now=self.clock(), data=data)

    async def _after(self, queue_id: str) -> dict[str, Any]:
        msg = await self.store.get(queue_id)
        if msg is None:
            raise NotFound(f"message {queue_id} not found")
        return message_view(msg, self.config, now=self.clock())

    async def retry(self, identity: str) -> dict[str, Any]:
        """Every unfinished recipient is due now (and routed again, which is Exchange's Resubmit)."""
        msg = await self._get(identity)
        if not msg.pending_recipients:
            raise Conflict(f"message {msg.queue_id} is {msg.status.value}: nothing to retry")
        try:
            await self.store.retry_now(msg.queue_id)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        if self.manager is not None:
            self.manager.wake(msg.queue_id)
        return await self._after(msg.queue_id)

    async def suspend(self, identity: str) -> dict[str, Any]:
        msg = await self._get(identity)
        if not msg.pending_recipients:
            raise Conflict(f"message {msg.queue_id} is {msg.status.value}: it cannot be suspended")
        try:
            await self.store.set_flags(msg.queue_id, suspended=True)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        return await self._after(msg.queue_id)

    async def resume(self, identity: str) -> dict[str, Any]:
        msg = await self._get(identity)
        try:
            await self.store.set_flags(msg.queue_id, suspended=False)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        if self.manager is not None:
            self.manager.wake(msg.queue_id)
        return await self._after(msg.queue_id)

    async def remove(self, identity: str, *, with_ndr: bool = False) -> dict[str, Any]:
        """Delete the message. With ``with_ndr`` its unfinished recipients get an NDR
        (``550 4.3.2 QUEUE.Admin``), sent to the sender (never to ``<>``) and the admin address."""
        msg = await self._get(identity)
        data = b""
        if with_ndr:
            try:
                data = await self.store.read_data(msg.queue_id)
            except Exception:
                data = b""
        try:
            # Not while an attempt is under way: it could still deliver the message after the
            # sender was told it was deleted. Exchange marks it PendingRemove; here the admin is
            # told to wait, or to suspend it, which takes effect when the attempt ends.
            removed = await self.store.remove(msg.queue_id, unless_in_flight_at=self.clock())
        except MessageInFlightError:
            raise Conflict(
                f"message {msg.queue_id} is being delivered now (Active): remove it when this "
                "attempt has ended, or suspend it first (it stays suspended after the attempt)"
            ) from None
        if removed is None:
            raise NotFound(f"message {identity} not found")
        view = message_view(removed, self.config, now=self.clock())
        pending = [r for r in removed.recipients if r.status not in FINAL_STATUSES]
        ndr_id = None
        reply = replies.ADMIN_DELETED
        manager = self.manager
        if pending and manager is not None:
            addresses = [r.address for r in pending]
            if with_ndr:
                manager.track(
                    "FAIL",
                    "ADMIN",
                    removed,
                    recipients=addresses,
                    recipient_status=[reply.line()] * len(pending),
                    data=data,
                )
                ndr_id = await manager.send_dsn(
                    removed,
                    data,
                    [
                        DsnRecipient(
                            r.address, reply, last_attempt=r.last_attempt, last_error=r.last_error
                        )
                        for r in pending
                    ],
                    action="failed",
                )
            else:
                manager.track(
                    "DROP",
                    "ADMIN",
                    removed,
                    recipients=addresses,
                    recipient_status=[reply.line()] * len(pending),
                )
        view["Status"] = "Removed"
        return {"Removed": view, "WithNdr": with_ndr, "NdrQueueId": ndr_id}

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()
