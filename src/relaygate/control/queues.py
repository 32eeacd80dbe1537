"""The delivery queues: Get-Queue (``queues``, ``queue``) and Retry-Queue (``retry_queue``).

A delivery queue (``queues``) is named as Exchange names them: the recipient domain for DNS
delivery, the smart-host list for smart-host delivery (``[10.0.0.5]``, ``smtp.office365.com``),
``Unreachable`` when no send connector matches. A recipient is in the queue routing gives it with
the current send connectors, except one whose last attempt found no route: it stays in
Unreachable until its next attempt (``retry_queue("Unreachable")`` resubmits it; a reload does
too). A message whose recipients go to two next hops is in both queues (Exchange bifurcates it).

``queues`` and ``retry_queue`` read only the few columns they need of the unfinished messages,
in one query (``Store.queue_entries``), and route once per recipient domain (``RouteTable``)
instead of building the ``message_view`` of each message: ``_entry_queues`` must put a
recipient in the queue ``_recipient_queue`` (``views``) says it is in, which
tests/queue/test_get_queue_fast_path.py checks. Retry-Queue is here rather than in
``operations`` because it finds its messages by that same scan.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from relaygate.control.reads import _SCAN_CHUNK, MAX_LIST_LIMIT, MessageReads
from relaygate.control.views import NotFound, _unreachable, iso_time, message_status, queue_name
from relaygate.delivery.routing import DELIVERY_UNREACHABLE, RouteTable
from relaygate.queue.model import FINAL_STATUSES, QueueEntry, RecipientState, RecipientStatus

__all__ = ["QUEUE_STATUSES", "DeliveryQueues"]

#: What a delivery queue's ``Status`` can say (``queues``): Active (a message of it is being
#: delivered now), Ready (something in it is due), Retry (everything in it waits for a later
#: attempt), Suspended (every message in it is suspended).
QUEUE_STATUSES = ("Active", "Ready", "Retry", "Suspended")


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


class DeliveryQueues(MessageReads):
    """Get-Queue and Retry-Queue (see the module's docstring)."""

    #: Messages per store page when Retry-Queue walks the whole queue (tests make it small).
    queue_page_size = 1000

    async def _entry_pages(self) -> AsyncIterator[list[QueueEntry]]:
        """Every unfinished message, ``queue_page_size`` at a time (``Store.queue_entries``
        with a keyset cursor: none is skipped however big the queue, and only one page is held
        at a time); the event loop serves SMTP between pages."""
        size = max(1, self.queue_page_size)
        after: str | None = None
        while True:
            page = await self.store.queue_entries(limit=size, after=after)
            if page:
                yield page
            if len(page) < size:
                return
            after = page[-1].queue_id
            await asyncio.sleep(0)

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
        config = self.config
        now = self.clock()
        table = RouteTable(list(config.send_connectors))
        wanted = name.lower()
        retried: list[str] = []
        suspended: list[str] = []
        found = False
        # The whole queue, a page at a time: Get-Queue may stop counting at MAX_LIST_LIMIT (it
        # says so), but Retry-Queue must not leave the messages past it waiting.
        async for entries in self._entry_pages():
            for entry in entries:
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
