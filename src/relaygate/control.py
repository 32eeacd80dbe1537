"""Queue operations on a running node, shared by the admin API, the web admin centre and the CLI.

The CLI never opens the store itself: it calls the admin API of the running server, which calls
these functions, so there is one implementation of "what retry does" and one shape of a message.

A message is shown with Exchange's ``Get-Message`` / ``Get-Queue`` field names: ``Identity``
(``SERVER\\QueueId``), ``Status`` (Active, Ready, Retry, Suspended, Unreachable, Delivered, Failed),
``Queue`` and ``NextHopDomain`` (the delivery queue its pending recipients are in), ``LastError``,
``NextRetryTime``, ``Size``, ``FromAddress``, ``Recipients`` (each with its own status and last
response), ``DateReceived``, ``ExpirationTime``, ``MessageId``. Times are ISO 8601 in UTC.

Operations (Exchange counterpart): ``list_messages`` / ``list_page`` (Get-Message [-Filter], a
page at a time: see below), ``show`` (Get-Message -IncludeRecipientInfo), ``retry`` (Retry-Queue /
Resubmit: every unfinished recipient is due now, routing is done again), ``suspend`` / ``resume``
(Suspend-Message / Resume-Message), ``remove`` (Remove-Message [-WithNDR]: the unfinished
recipients get ``550 4.3.2 QUEUE.Admin; message deleted by administrative action``), ``queues``
(Get-Queue: the delivery queues), ``retry_queue`` (Retry-Queue -Identity SERVER\\NextHop; on the
Unreachable queue, Retry-Queue -Resubmit).

Paging and filters (``list_page``): messages come in queue-id order (arrival order: queue ids are
time-ordered); ``after`` (a queue id) starts past it, and a page's ``next_after`` is where the next
one starts (None: nothing further). ``sender`` / ``recipient`` (``*`` at the start or end,
`relaygate.queue.store.AddressPattern`), the cursor and a stored status (Ready, Retry, Suspended,
Delivered, Failed) are in the store's query. What is derived from the lease or from routing (the
Active and Unreachable statuses, ``queue``: the delivery queue of an unfinished recipient, as
``message_view`` computes it with the current send connectors) is tested here on the messages the
store returns, at most MAX_LIST_LIMIT of them per call: when that many were looked at before the
page was full, the page is returned with ``next_after`` at the last message looked at.

A delivery queue (``queues``) is named as Exchange names them: the recipient domain for DNS
delivery, the smart-host list for smart-host delivery (``[10.0.0.5]``, ``smtp.office365.com``),
``Unreachable`` when no send connector matches. A recipient is in the queue routing gives it with
the current send connectors, except one whose last attempt found no route: it stays in
Unreachable until its next attempt (``retry_queue("Unreachable")`` resubmits it; a reload does
too). A message whose recipients go to two next hops is in both queues (Exchange bifurcates it).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relaygate import replies
from relaygate.delivery.routing import DELIVERY_UNREACHABLE, RouteTable, explain_route
from relaygate.header_section import header_end
from relaygate.queue.bounce import DsnRecipient, header_value
from relaygate.queue.model import (
    FINAL_STATUSES,
    PENDING_STATUSES,
    QueueEntry,
    RecipientState,
    RecipientStatus,
    StoredMessage,
)
from relaygate.queue.retry import RetrySchedule
from relaygate.queue.store import AddressPattern, MessageInFlightError, Store

__all__ = [
    "BULK_ACTIONS",
    "BULK_FILTERS",
    "MAX_LIST_LIMIT",
    "MESSAGE_STATUSES",
    "QUEUE_STATUSES",
    "Conflict",
    "MessagePage",
    "NotFound",
    "QueueControl",
    "iso_time",
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

#: The most messages one ``list_messages`` call returns (and scans for a derived status or the
#: delivery queue); also what ``queues`` and ``retry_queue`` look at, at most.
MAX_LIST_LIMIT = 100_000

#: What a delivery queue's ``Status`` can say (``queues``): Active (a message of it is being
#: delivered now), Ready (something in it is due), Retry (everything in it waits for a later
#: attempt), Suspended (every message in it is suspended).
QUEUE_STATUSES = ("Active", "Ready", "Retry", "Suspended")

#: Messages read from the store at a time when a filter is applied here.
_SCAN_CHUNK = 500

#: What ``bulk`` does to every message a filter matches (Get-Message -Filter | Retry-Message,
#: Suspend-Message, Resume-Message, Remove-Message).
BULK_ACTIONS = ("retry", "suspend", "resume", "remove")
#: ``bulk``'s filters, as the API and the CLI name them: at least one is required.
BULK_FILTERS = ("from", "to", "queue", "status")
#: Messages ``bulk`` changes at once (SQLite commits concurrent writes together).
_BULK_BATCH = 64

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


def _cursor(after: str | None) -> str | None:
    if after is None or not after.strip():
        return None
    try:
        return normalise_id(after)
    except NotFound:
        raise ValueError(
            f"after must be a message identity (SERVER\\QueueId, 16 hex digits), not {after!r}"
        ) from None


@dataclass(frozen=True, slots=True)
class MessagePage:
    """One page of ``list_page``: the messages (``message_view``) and where the next page
    starts (``after=next_after``); ``next_after`` is None when nothing follows. ``scanned``: how
    many messages were read from the store to fill it."""

    messages: list[dict[str, Any]]
    next_after: str | None
    scanned: int


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


class _QueueTally:
    """What ``queues`` gathers about one delivery queue."""

    def __init__(self, next_hop: str, delivery_type: str, connector: str) -> None:
        self.next_hop = next_hop
        self.delivery_type = delivery_type
        self.connector = connector
        self.messages: set[str] = set()
        self.statuses: set[str] = set()
        self.recipients = 0
        self.due = False
        self.retry_times: list[float] = []
        self.last_attempt: float | None = None
        self.last_error = ""

    def add(self, queue_id: str, status: str, r: RecipientState, now: float) -> None:
        self.messages.add(queue_id)
        self.statuses.add(status)
        self.recipients += 1
        if status != "Suspended" and r.status != RecipientStatus.SUSPENDED:
            if r.next_attempt is None or r.next_attempt <= now:
                self.due = True
            else:
                self.retry_times.append(r.next_attempt)
        if r.last_attempt is not None and (
            self.last_attempt is None or r.last_attempt >= self.last_attempt
        ):
            self.last_attempt = r.last_attempt
            self.last_error = r.last_error or self.last_error

    def view(self, server: str, now: float) -> dict[str, Any]:
        """A queue as Get-Queue shows it."""
        if "Active" in self.statuses:
            status = "Active"
        elif self.statuses == {"Suspended"}:
            status = "Suspended"
        elif self.due:
            status = "Ready"
        else:
            status = "Retry"
        return {
            "Identity": f"{server}\\{self.next_hop}",
            "DeliveryType": self.delivery_type,
            "NextHopDomain": self.next_hop,
            "SendConnector": self.connector,
            "Status": status,
            "MessageCount": len(self.messages),
            "RecipientCount": self.recipients,
            "NextRetryTime": iso_time(min(self.retry_times)) if self.retry_times else None,
            "LastRetryTime": iso_time(self.last_attempt),
            "LastError": self.last_error,
        }


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
        self,
        *,
        status: str | None = None,
        limit: int = 1000,
        after: str | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        queue: str | None = None,
    ) -> list[dict[str, Any]]:
        """Messages in arrival order; ``status`` is one of MESSAGE_STATUSES (any case). The other
        arguments are those of ``list_page``."""
        page = await self.list_page(
            status=status,
            limit=limit,
            after=after,
            sender=sender,
            recipient=recipient,
            queue=queue,
        )
        return page.messages

    async def list_page(
        self,
        *,
        status: str | None = None,
        limit: int = 1000,
        after: str | None = None,
        sender: str | None = None,
        recipient: str | None = None,
        queue: str | None = None,
    ) -> MessagePage:
        """Up to ``limit`` messages past ``after`` (a message identity) in arrival order, with
        Get-Message's filters: ``status`` (MESSAGE_STATUSES), ``sender`` (FromAddress) and
        ``recipient`` (any recipient): an address or ``*@domain`` / ``name@*`` (any ASCII case;
        ``<>`` is the null sender); ``queue``: a delivery queue, as ``queue_name`` reads it.
        ``ValueError`` naming the parameter (status, after, from, to, queue) for a bad value."""
        wanted = None
        if status:
            matches = [s for s in MESSAGE_STATUSES if s.lower() == status.strip().lower()]
            if not matches:
                raise ValueError(
                    f"unknown status {status!r}; use one of {', '.join(MESSAGE_STATUSES)}"
                )
            wanted = matches[0]
        cursor = _cursor(after)
        config = self.config
        filters: dict[str, Any] = {
            "sender": None if sender is None else AddressPattern.parse(sender, name="from"),
            "recipient": (
                None if recipient is None else AddressPattern.parse(recipient, name="to")
            ),
        }
        hop = None if queue is None else queue_name(queue, str(config.server.name))
        # The store filters on the stored status. Active (a live lease: a stored Ready or Retry)
        # and Unreachable (a stored Retry whose unfinished recipients have no route) are derived
        # from it here, and so are Ready and Retry (which are not Active).
        store_status = {"Active": None, "Unreachable": "Retry"}.get(wanted or "", wanted)
        filters["status"] = store_status
        now = self.clock()
        if limit <= 0:
            return MessagePage([], None, 0)
        if hop is None and wanted in (None, "Suspended", "Delivered", "Failed"):
            # Every filter is in the query: one more than the page says whether one follows.
            found = await self.store.list_messages(limit=limit + 1, after=cursor, **filters)
            views = [message_view(m, config, now=now) for m in found[:limit]]
            more = len(found) > limit
            return MessagePage(views, views[-1]["QueueId"] if more else None, len(found))
        out: list[dict[str, Any]] = []
        scanned = 0
        while scanned < MAX_LIST_LIMIT:
            chunk = min(_SCAN_CHUNK, MAX_LIST_LIMIT - scanned)
            found = await self.store.list_messages(limit=chunk, after=cursor, **filters)
            for m in found:
                scanned += 1
                cursor = m.queue_id
                view = message_view(m, config, now=now)
                if wanted and view["Status"] != wanted:
                    continue
                if hop is not None and not _in_queue(view, hop):
                    continue
                if len(out) == limit:  # a match past the page: there is a next one
                    return MessagePage(out, out[-1]["QueueId"], scanned)
                out.append(view)
            if len(found) < chunk:
                return MessagePage(out, None, scanned)
        # MAX_LIST_LIMIT messages looked at: the caller goes on from the last one.
        return MessagePage(out, cursor, scanned)

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
            # The NDR and the tracking log read the header only: the body (a 30 MB scan) is
            # not kept while the removal and the NDR wait for the store (a bulk runs 64 at once).
            data = data[: header_end(data)]
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

    async def bulk(
        self,
        action: str,
        *,
        sender: str | None = None,
        recipient: str | None = None,
        queue: str | None = None,
        status: str | None = None,
        after: str | None = None,
        with_ndr: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """``action`` (BULK_ACTIONS) on every message ``list_page`` finds with these filters, at
        most MAX_LIST_LIMIT of them per call, as Exchange admins pipe ``Get-Message -Filter``
        into Suspend-Message, Resume-Message, Remove-Message [-WithNDR] or Retry-Message.

        A filter (``sender``, ``recipient``, ``queue`` or ``status``) is required: ``ValueError``
        naming them without one (``after`` alone is no filter, nor an address pattern that
        matches every address: ``*``, ``*@*``, as ``--from "*$DOMAIN"`` with DOMAIN unset gives),
        so that nobody empties the queue
        by accident; ``ValueError`` naming the parameter for a bad value, as ``list_page``.
        ``dry_run``: change nothing, say what would be acted on.

        Returns ``{"server", "action", "dry_run", "with_ndr", "matched", "done", "skipped":
        [{"identity", "reason"}], "identities": [...], "ndrs", "limit_reached",
        "next_after"}``: ``identities`` are those acted on (in a dry run: those matched);
        ``skipped``, what the action did not apply to and why: a message being delivered
        (Active) is not removed (the single remove says 409), an already suspended one is not
        suspended again, a suspended one is not retried (resume it), one not suspended is not
        resumed, a finished one is neither retried nor suspended, one removed meanwhile is
        gone. ``limit_reached``: MAX_LIST_LIMIT messages were looked at or matched and more may
        match past ``next_after``: call again with ``after=next_after``."""
        if action not in BULK_ACTIONS:
            raise ValueError(f"unknown action {action!r}; use one of {', '.join(BULK_ACTIONS)}")
        given = [v for v in (sender, recipient, queue, status) if v is not None and v.strip()]
        match_all = _match_all(from_=sender, to=recipient)
        if not given or len(match_all) == len(given):
            why = "".join(
                f"; {name} {value!r} matches every message, which is no filter (to act on every "
                "message of a status, give status)"
                for name, value in match_all
            )
            raise ValueError(
                f"a bulk {action} needs at least one filter: "
                f"{', '.join(BULK_FILTERS)} (to act on one message, give its identity){why}"
            )
        if with_ndr and action != "remove":
            raise ValueError("with_ndr applies to remove only")

        def clean(value: str | None) -> str | None:
            return value.strip() if value is not None and value.strip() else None

        page = await self.list_page(
            limit=MAX_LIST_LIMIT,
            after=after,
            sender=clean(sender),
            recipient=clean(recipient),
            queue=clean(queue),
            status=clean(status),
        )
        server = str(self.config.server.name)
        views = page.messages
        done: list[str] = []
        skipped: list[dict[str, str]] = []
        ndrs = 0
        if not dry_run:
            outcomes: list[tuple[str, str | None, bool]] = []
            for start in range(0, len(views), _BULK_BATCH):
                batch = views[start : start + _BULK_BATCH]
                outcomes += await asyncio.gather(
                    *(self._bulk_one(action, v, with_ndr) for v in batch)
                )
            for identity, reason, ndr in outcomes:
                if reason is None:
                    done.append(identity)
                    ndrs += ndr
                else:
                    skipped.append({"identity": identity, "reason": reason})
            if done and action in ("retry", "resume") and self.manager is not None:
                self.manager.wake()
        return {
            "server": server,
            "action": action,
            "dry_run": dry_run,
            "with_ndr": with_ndr,
            "matched": len(views),
            "done": len(done),
            "skipped": skipped,
            "identities": [v["Identity"] for v in views] if dry_run else done,
            "ndrs": ndrs,
            "limit_reached": page.next_after is not None,
            "next_after": page.next_after,
        }

    async def _bulk_one(
        self, action: str, view: dict[str, Any], with_ndr: bool
    ) -> tuple[str, str | None, bool]:
        """(identity, why it was skipped or None when done, whether an NDR was queued)."""
        identity, qid, status = view["Identity"], view["QueueId"], view["Status"]
        finished = status in _FINAL_VIEW
        try:
            if action == "remove":
                body = await self.remove(qid, with_ndr=with_ndr)
                return identity, None, bool(body["NdrQueueId"])
            if action == "suspend":
                if finished:
                    return identity, f"message is {status}: it cannot be suspended", False
                if view["Suspended"]:
                    return identity, "already suspended", False
                await self.store.set_flags(qid, suspended=True)
            elif action == "resume":
                if not view["Suspended"]:
                    return identity, "not suspended", False
                await self.store.set_flags(qid, suspended=False)
            else:  # retry
                if finished:
                    return identity, f"message is {status}: nothing to retry", False
                if view["Suspended"] or status == "Suspended":
                    return identity, "suspended: resume it first (Resume-Message)", False
                await self.store.retry_now(qid)
        except Conflict as exc:
            return identity, str(exc), False
        except (NotFound, KeyError):
            return identity, "not found: removed meanwhile", False
        return identity, None, False

    async def _queue_entries(self) -> tuple[list[QueueEntry], bool]:
        """The messages not yet Delivered/Failed, in arrival order, at most MAX_LIST_LIMIT of
        them, as ``Store.queue_entries`` gives them (no bytes, unfinished recipients only); and
        whether there were more."""
        found = await self.store.queue_entries(limit=MAX_LIST_LIMIT + 1)
        return found[:MAX_LIST_LIMIT], len(found) > MAX_LIST_LIMIT

    @staticmethod
    def _entry_queues(
        entry: QueueEntry, table: RouteTable
    ) -> list[tuple[RecipientState, str, str, str]]:
        """``(recipient, NextHopDomain, DeliveryType, SendConnector)`` of each unfinished
        recipient with a delivery queue: what ``_recipient_queue`` says of it in
        ``message_view``, with routing looked up once per domain (``RouteTable``)."""
        out: list[tuple[RecipientState, str, str, str]] = []
        for r in entry.recipients:
            if r.status in FINAL_STATUSES:
                continue
            if _unreachable(r):
                out.append((r, DELIVERY_UNREACHABLE, DELIVERY_UNREACHABLE, ""))
                continue
            route = table.route_one(r.address, size=entry.size)
            if route.next_hop:
                out.append((r, route.next_hop, route.delivery_type, route.connector_name or ""))
        return out

    async def queues(self) -> dict[str, Any]:
        """Get-Queue: ``{"server", "queues": [queue_view...], "truncated"}``, the delivery
        queues with messages in them, by name; ``truncated``: more than MAX_LIST_LIMIT
        unfinished messages, and the first MAX_LIST_LIMIT were counted.

        Read with one query of the few columns it needs (``Store.queue_entries``) and routed
        once per recipient domain: the same answer as ``message_view`` of every unfinished
        message would give (tests/queue/test_get_queue_fast_path.py), without reading
        100,000 whole messages on each call."""
        entries, truncated = await self._queue_entries()
        config = self.config
        server = str(config.server.name)
        now = self.clock()
        table = RouteTable(list(config.send_connectors))
        groups: dict[str, _QueueTally] = {}
        for i, entry in enumerate(entries, 1):
            if i % _SCAN_CHUNK == 0:
                # This runs on the loop that serves SMTP: up to MAX_LIST_LIMIT entries take
                # a while, so hand it back between chunks.
                await asyncio.sleep(0)
            status = message_status(entry, now)
            for r, hop, delivery_type, connector in self._entry_queues(entry, table):
                tally = groups.get(hop)
                if tally is None:
                    tally = groups[hop] = _QueueTally(hop, delivery_type, connector)
                tally.add(entry.queue_id, status, r, now)
        queues = [groups[k].view(server, now) for k in sorted(groups, key=str.lower)]
        return {"server": server, "queues": queues, "truncated": truncated}

    async def queue(self, identity: str) -> dict[str, Any]:
        """One delivery queue (``queue_view``); NotFound when it holds no message."""
        name = self._queue_identity(identity)
        for view in (await self.queues())["queues"]:
            if view["NextHopDomain"].lower() == name.lower():
                return view
        raise NotFound(f"queue {identity} not found: no message waits in it")

    def _queue_identity(self, identity: str) -> str:
        try:
            return queue_name(identity, str(self.config.server.name))
        except ValueError as exc:
            raise NotFound(str(exc)) from None

    async def retry_queue(self, identity: str) -> dict[str, Any]:
        """Retry-Queue: every message with an unfinished recipient in the queue is due now
        (``retry_now``: all its unfinished recipients, in this queue or another). The delivery
        run routes each recipient again, so on the Unreachable queue this is Retry-Queue
        -Resubmit: a send connector added since takes them. Suspended messages stay as they
        are (Resume-Message them). NotFound when the queue holds no message."""
        name = self._queue_identity(identity)
        entries, _truncated = await self._queue_entries()
        config = self.config
        now = self.clock()
        table = RouteTable(list(config.send_connectors))
        wanted = name.lower()
        retried: list[str] = []
        suspended: list[str] = []
        found = False
        for i, entry in enumerate(entries, 1):
            if i % _SCAN_CHUNK == 0:
                await asyncio.sleep(0)  # as in queues()
            if not any(
                hop.lower() == wanted for _r, hop, _t, _c in self._entry_queues(entry, table)
            ):
                continue
            found = True
            if entry.suspended or message_status(entry, now) == "Suspended":
                suspended.append(entry.queue_id)
                continue
            try:
                await self.store.retry_now(entry.queue_id)
            except KeyError:  # removed meanwhile
                continue
            retried.append(entry.queue_id)
        if not found:
            raise NotFound(f"queue {identity} not found: no message waits in it")
        if retried and self.manager is not None:
            self.manager.wake()
        server = str(config.server.name)
        return {
            "Identity": f"{server}\\{name}",
            "NextHopDomain": name,
            "Resubmit": name == DELIVERY_UNREACHABLE,
            "RetriedCount": len(retried),
            "Retried": [f"{server}\\{q}" for q in retried],
            "SuspendedCount": len(suspended),
        }

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()


def _match_all(**patterns: str | None) -> list[tuple[str, str]]:
    """(parameter, value) of the address patterns given that match every address (``*``,
    ``*@*``): ``bulk`` does not count them as a filter. A bad pattern is left to ``list_page``,
    which names it."""
    out: list[tuple[str, str]] = []
    for name, value in patterns.items():
        if value is None or not value.strip():
            continue
        name = name.rstrip("_")
        try:
            if AddressPattern.parse(value, name=name).matches_all:
                out.append((name, value.strip()))
        except ValueError:
            continue
    return out
