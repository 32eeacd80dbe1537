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

    @classmethod
    def for_relay(cls, relay: Any) -> QueueControl:
        return cls(relay.store, lambda: relay.config, getattr(relay, "manager", None))

    async def counts(self) -> dict[str, int]:
        return await self.store.counts()
