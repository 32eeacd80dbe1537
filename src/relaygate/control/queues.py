"""The delivery queues: Get-Queue (``queues``, ``queue``) and Retry-Queue (``retry_queue``).

A delivery queue (``queues``) is named as Exchange names them: the recipient domain for DNS
delivery, the smart-host list for smart-host delivery (``[10.0.0.5]``, ``smtp.office365.com``),
``Unreachable`` when no send connector matches. A recipient is in the queue routing gives it with
the current send connectors, except one whose last attempt found no route: it stays in
Unreachable until its next attempt (``retry_queue("Unreachable")`` resubmits it; a reload does
too). A message whose recipients go to two next hops is in both queues (Exchange bifurcates it).

``queues`` and ``retry_queue`` go through every unfinished message, however many (hundreds of
thousands in an outage), a page at a time by keyset (``_entry_pages``: ``Store.queue_entries``,
the few columns they need, never the bytes), handing the event loop back between pages, and
route once per recipient domain (``RouteTable``) instead of building the ``message_view`` of
each message: ``_entry_queues`` must put a recipient in the queue ``_recipient_queue``
(``views``) says it is in, which tests/queue/test_get_queue_fast_path.py checks. Retry-Queue is
here rather than in ``operations`` because it finds its messages by that same scan.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from relaygate.control.reads import _SCAN_CHUNK, MessageReads
from relaygate.control.views import NotFound, _unreachable, iso_time, message_status, queue_name
from relaygate.delivery.routing import DELIVERY_UNREACHABLE, RouteTable
from relaygate.queue.model import FINAL_STATUSES, QueueEntry, RecipientState, RecipientStatus

__all__ = ["QUEUE_STATUSES", "DeliveryQueues"]

#: What a delivery queue's ``Status`` can say (``queues``): Active (a message of it is being
#: delivered now), Ready (something in it is due), Retry (everything in it waits for a later
#: attempt), Suspended (every message in it is suspended).
QUEUE_STATUSES = ("Active", "Ready", "Retry", "Suspended")


class _QueueTally:
    """What ``queues`` gathers about one delivery queue. Constant in size however many messages
    it counts (a count, the earliest retry, not a set of ids nor a list of times): Get-Queue
    goes through every unfinished message, hundreds of thousands in an outage. The recipients
    of one message are added one after the other (``queues`` tallies a message at a time), so
    a message is counted when its first recipient in this queue is added."""

    def __init__(self, next_hop: str, delivery_type: str, connector: str) -> None:
        self.next_hop = next_hop
        self.delivery_type = delivery_type
        self.connector = connector
        self.message_count = 0
        self._last_message: str | None = None
        self.statuses: set[str] = set()
        self.recipients = 0
        self.due = False
        self.next_retry: float | None = None
        self.last_attempt: float | None = None
        self.last_error = ""

    def add(self, queue_id: str, status: str, r: RecipientState, now: float) -> None:
        if queue_id != self._last_message:
            self.message_count += 1
            self._last_message = queue_id
        self.statuses.add(status)
        self.recipients += 1
        if status != "Suspended" and r.status != RecipientStatus.SUSPENDED:
            if r.next_attempt is None or r.next_attempt <= now:
                self.due = True
            elif self.next_retry is None or r.next_attempt < self.next_retry:
                self.next_retry = r.next_attempt
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
            "MessageCount": self.message_count,
            "RecipientCount": self.recipients,
            "NextRetryTime": iso_time(self.next_retry),
            "LastRetryTime": iso_time(self.last_attempt),
            "LastError": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class _Count:
    """One Get-Queue answer, with what decides whether ``queues`` may give it again."""

    body: dict[str, Any]
    ended: float  # time.monotonic()
    took: float  # seconds


class DeliveryQueues(MessageReads):
    """Get-Queue and Retry-Queue (see the module's docstring)."""

    #: Messages per store page when Get-Queue or Retry-Queue walks the whole queue (tests make
    #: it small). Larger pages were no faster over 300,000 messages.
    queue_page_size = 1000
    #: A Get-Queue count that took at least this long (seconds) is given again, for as long as
    #: it took but at most ``queues_reuse_limit`` seconds (see ``queues``).
    queues_reuse_from = 0.5
    queues_reuse_limit = 5.0
    #: The count under way or the last one (``queues``), per QueueControl, so per worker, and
    #: the config it routes with.
    _count: asyncio.Task[_Count] | None = None
    _count_config: Any = None
    #: What ``queues`` measures ages with (tests give a clock of their own).
    _monotonic = staticmethod(time.monotonic)

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
        """Get-Queue: ``{"server", "queues": [queue_view...], "truncated": False}``, the delivery
        queues with messages in them, by name, counting every unfinished message (``_counted``).

        Callers that come while a count is under way share it, and a count that took at least
        ``queues_reuse_from`` is given again for as long as it took (at most
        ``queues_reuse_limit``), unless the config changed or an operation here changed
        messages. Why: counting 300,000 messages takes seconds of the worker that serves SMTP,
        and the admin centre's /queue and send connector pages count on every load, so a page
        reloaded (or a dashboard polling GET /api/queues) would keep the worker counting; this
        way counting takes at most about half of its time, and a small queue (counted in
        milliseconds) is always counted afresh. Deliveries meanwhile show at the next count.
        """
        count = self._count
        if count is None or not self._reusable(count):
            self._count_config = self.config
            count = self._count = asyncio.ensure_future(self._timed_count(self._count_config))
        # One caller going away (a closed browser tab) does not cancel the others' count.
        body = (await asyncio.shield(count)).body
        return {**body, "queues": [dict(q) for q in body["queues"]]}

    def _reusable(self, count: asyncio.Task[_Count]) -> bool:
        if (
            self._count_config is not self.config
            or count.get_loop() is not asyncio.get_running_loop()
        ):
            return False  # reloaded: the routes may differ (or another loop: a tool's)
        if not count.done():
            return True
        if count.cancelled() or count.exception() is not None:
            return False
        done = count.result()
        age = self._monotonic() - done.ended
        return done.took >= self.queues_reuse_from and age < min(done.took, self.queues_reuse_limit)

    def _queue_changed(self) -> None:
        self._count = None  # a count under way finishes for those waiting for it

    async def _timed_count(self, config: Any) -> _Count:
        start = self._monotonic()
        body = await self._counted(config)
        end = self._monotonic()
        return _Count(body, end, end - start)

    async def _counted(self, config: Any) -> dict[str, Any]:
        """Get-Queue's answer, counted now.

        Read a page at a time (``_entry_pages``: the few columns it needs, ``Store.queue_entries``,
        handing the loop that serves SMTP back between pages) and routed once per recipient
        domain: the same answer as ``message_view`` of every unfinished message would give
        (tests/queue/test_get_queue_fast_path.py), without reading whole messages.
        ``truncated`` is always false; it stays for the callers that read it (Get-Queue used to
        count the first MAX_LIST_LIMIT unfinished messages only, and said so there)."""
        server = str(config.server.name)
        now = self.clock()
        table = RouteTable(list(config.send_connectors))
        groups: dict[str, _QueueTally] = {}
        async for entries in self._entry_pages():
            for start in range(0, len(entries), _SCAN_CHUNK):
                if start:
                    await asyncio.sleep(0)  # the loop serves SMTP between chunks, too
                self._tally(entries[start : start + _SCAN_CHUNK], groups, table, now)
        queues = [groups[k].view(server, now) for k in sorted(groups, key=str.lower)]
        return {"server": server, "queues": queues, "truncated": False}

    def _tally(
        self,
        entries: list[QueueEntry],
        groups: dict[str, _QueueTally],
        table: RouteTable,
        now: float,
    ) -> None:
        """Add these messages to the tallies of their delivery queues (``groups``, by
        NextHopDomain), at one go: ``queues`` gives it at most _SCAN_CHUNK at a time."""
        for entry in entries:
            status = message_status(entry, now)
            for r, hop, delivery_type, connector in self._entry_queues(entry, table):
                tally = groups.get(hop)
                if tally is None:
                    tally = groups[hop] = _QueueTally(hop, delivery_type, connector)
                tally.add(entry.queue_id, status, r, now)

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
        # The whole queue, a page at a time, as Get-Queue counts it.
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
        if retried:
            self._queue_changed()
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
