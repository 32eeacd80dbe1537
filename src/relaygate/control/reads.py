"""Reading the queue: the pages of Get-Message (``list_page``) and one message (``show``).

Paging and filters (``list_page``): messages come in queue-id order (arrival order: queue ids are
time-ordered); ``after`` (a queue id) starts past it, and a page's ``next_after`` is where the next
one starts (None: nothing further). ``sender`` / ``recipient`` (``*`` at the start or end,
`relaygate.queue.store.AddressPattern`), the cursor and a stored status (Ready, Retry, Suspended,
Delivered, Failed) are in the store's query. What is derived from the lease or from routing (the
Active and Unreachable statuses, ``queue``: the delivery queue of an unfinished recipient, as
``message_view`` computes it with the current send connectors) is tested here on the messages the
store returns, at most MAX_LIST_LIMIT of them per call: when that many were looked at before the
page was full, the page is returned with ``next_after`` at the last message looked at.

``MessageReads`` also holds what every part of ``QueueControl`` starts from: the store, the
current config, the clock and ``_get`` (a message by its identity). ``operations`` and
``queues`` build on it. It is apart from ``views`` because it reads the store, and apart from
``operations`` because nothing here changes a message.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relaygate.control.views import (
    MESSAGE_STATUSES,
    NotFound,
    _in_queue,
    header_read_limit,
    message_view,
    normalise_id,
    queue_name,
)
from relaygate.header_section import header_of_head
from relaygate.queue.model import StoredMessage
from relaygate.queue.store import AddressPattern, Store

__all__ = ["MAX_LIST_LIMIT", "MessagePage", "MessageReads"]

#: The most messages one ``list_messages`` call returns (and scans for a derived status or the
#: delivery queue). Get-Queue (``queues``) and Retry-Queue page through all of them.
MAX_LIST_LIMIT = 100_000

#: Messages read from the store at a time when a filter is applied here.
_SCAN_CHUNK = 500
#: Message views made between two turns of the event loop: it is the loop that serves SMTP
#: (worker 0), and MAX_LIST_LIMIT views take seconds (Get-Queue hands it back between pages).
_VIEW_CHUNK = 100


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


class MessageReads:
    """The messages of one node's queue as the admin reads them (the arguments: see
    ``QueueControl``)."""

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

    @property
    def config(self) -> Any:
        return self._config()

    def _queue_changed(self) -> None:
        """An operation here changed messages: Get-Queue (``DeliveryQueues``) counts again
        rather than reuse its last count."""

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
            views = []
            for i, m in enumerate(found[:limit], 1):
                if i % _VIEW_CHUNK == 0:
                    await asyncio.sleep(0)
                views.append(message_view(m, config, now=now))
            more = len(found) > limit
            return MessagePage(views, views[-1]["QueueId"] if more else None, len(found))
        out: list[dict[str, Any]] = []
        scanned = 0
        while scanned < MAX_LIST_LIMIT:
            chunk = min(_SCAN_CHUNK, MAX_LIST_LIMIT - scanned)
            found = await self.store.list_messages(limit=chunk, after=cursor, **filters)
            for m in found:
                scanned += 1
                if scanned % _VIEW_CHUNK == 0:
                    await asyncio.sleep(0)
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
            header = await self._read_header(msg)
        except Exception:
            header = b""
        return message_view(msg, self.config, now=self.clock(), data=header)

    async def _read_header(self, msg: StoredMessage) -> bytes:
        """The message's header section, read from the store as far as its receive connector's
        max_header_size (``header_read_limit``) and no further: a view needs the header only, and
        reading a 35 MB message whole for its Subject cost the memory and the time of the
        whole. Unchecked: the checksum covers the whole message (``Store.read_head``)."""
        limit = header_read_limit(msg, self.config)
        head = await self.store.read_head(msg.queue_id, limit)
        # Whole only when it is as long as the message: fewer bytes than asked for from a
        # longer message are a damaged (cut short) spool file, whose last field may be cut.
        return header_of_head(head, whole=len(head) >= msg.size)

    async def _after(self, queue_id: str) -> dict[str, Any]:
        msg = await self.store.get(queue_id)
        if msg is None:
            raise NotFound(f"message {queue_id} not found")
        return message_view(msg, self.config, now=self.clock())
