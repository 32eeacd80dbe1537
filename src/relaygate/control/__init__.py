"""Queue operations on a running node, shared by the admin API, the web admin centre and the CLI.

The CLI never opens the store itself: it calls the admin API of the running server, which calls
these functions, so there is one implementation of "what retry does" and one shape of a message.

A message is shown with Exchange's ``Get-Message`` / ``Get-Queue`` field names: ``Identity``
(``SERVER\\QueueId``), ``Status`` (Active, Ready, Retry, Suspended, Unreachable, Delivered, Failed),
``Queue`` and ``NextHopDomain`` (the delivery queue its pending recipients are in), ``LastError``,
``NextRetryTime``, ``Size``, ``FromAddress``, ``Recipients`` (each with its own status and last
response), ``DateReceived``, ``ExpirationTime``, ``MessageId``. Times are ISO 8601 in UTC.

Operations (Exchange counterpart): ``list_messages`` / ``list_page`` (Get-Message [-Filter], a
page at a time: see ``reads``), ``show`` (Get-Message -IncludeRecipientInfo), ``retry``
(Retry-Queue / Resubmit: every unfinished recipient is due now, routing is done again),
``suspend`` / ``resume`` (Suspend-Message / Resume-Message), ``remove`` (Remove-Message
[-WithNDR]: the unfinished recipients get ``550 4.3.2 QUEUE.Admin; message deleted by
administrative action``), ``queues`` (Get-Queue: the delivery queues), ``retry_queue``
(Retry-Queue -Identity SERVER\\NextHop; on the Unreachable queue, Retry-Queue -Resubmit).

The code is in four modules, one for each part; each says more in its docstring:

- ``views``: what a message looks like (``message_view``), its status and its identity: pure.
- ``reads``: ``MessageReads`` (the store, config and clock every part starts from), the pages
  of Get-Message (``list_page``, ``list_messages``) and ``show``.
- ``operations``: ``MessageOperations``: ``retry``, ``suspend``, ``resume``, ``remove`` and
  ``bulk``.
- ``queues``: ``DeliveryQueues``: Get-Queue (``queues``, ``queue``) and ``retry_queue``.

``QueueControl`` joins them; callers import every name from ``relaygate.control``, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relaygate.control.operations import (
    BULK_ACTIONS,
    BULK_FILTERS,
    MessageOperations,
    bulk_filter_problem,
)
from relaygate.control.queues import QUEUE_STATUSES, DeliveryQueues
from relaygate.control.queues import _QueueTally as _QueueTally
from relaygate.control.reads import MAX_LIST_LIMIT, MessagePage
from relaygate.control.views import (
    MESSAGE_STATUSES,
    Conflict,
    NotFound,
    iso_time,
    message_view,
    normalise_id,
    queue_name,
)
from relaygate.control.views import _in_queue as _in_queue
from relaygate.control.views import _recipient_queue as _recipient_queue
from relaygate.control.views import message_status as message_status

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
    "bulk_filter_problem",
    "iso_time",
    "message_view",
    "normalise_id",
    "queue_name",
]


class QueueControl(MessageOperations, DeliveryQueues):
    """The queue operations of one node.

    config: a callable returning the current config (it changes on reload). manager: the
    QueueManager (wakes the delivery loop, writes NDRs); may be None in tools that only read.
    """

    #: Seconds a count made by ``shared_counts`` is given again. /healthz, /api/health and
    #: /metrics are open to whoever reaches the listener, and each counted every message: 160 ms
    #: of the database for 300,000 queued (an outage), per request.
    counts_reuse = 1.0
    _shared: asyncio.Task[tuple[dict[str, int], float]] | None = None

    @classmethod
    def for_relay(cls, relay: Any) -> QueueControl:
        return cls(relay.store, lambda: relay.config, getattr(relay, "manager", None))

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()

    async def shared_counts(self) -> dict[str, int]:
        """``counts`` for the health routes, /metrics and the dashboard: callers that come while a
        count is under way share it, and one that ended less than ``counts_reuse`` seconds ago
        is given again, unless it failed or an operation here changed messages since."""
        task = self._shared
        if task is None or not self._shared_reusable(task):
            task = self._shared = asyncio.ensure_future(self._timed_counts())
        # One caller going away (a probe that hung up) does not cancel the others' count.
        counts, _ended = await asyncio.shield(task)
        return dict(counts)

    def _shared_reusable(self, task: asyncio.Task[tuple[dict[str, int], float]]) -> bool:
        if task.get_loop() is not asyncio.get_running_loop():
            return False  # another loop's (a tool's)
        if not task.done():
            return True
        if task.cancelled() or task.exception() is not None:
            return False  # the store failed: the next caller asks it again
        return self._monotonic() - task.result()[1] < self.counts_reuse

    async def _timed_counts(self) -> tuple[dict[str, int], float]:
        counts = await self.store.counts()
        return counts, self._monotonic()

    def _queue_changed(self) -> None:
        super()._queue_changed()
        self._shared = None
