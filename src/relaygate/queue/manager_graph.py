"""How the queue manager sends a route's recipients through Microsoft Graph
(``delivery_method = "Graph"``, relaygate.delivery.graph): the octets prepared once (in a worker
thread for a big message), an earlier attempt's draft batch sent first on its own, and the
record of a draft or a plain sendMail kept in the queue store (`_StoredDraft`, graph_drafts)
between attempts.

Kept apart from the SMTP sends (manager_sending.py): the draft records and their keys concern
Graph alone, and the previous release reads them (see `_SENDMAIL_KEY`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from relaygate.delivery.graph import OFF_LOOP_OCTETS as GRAPH_OFF_LOOP_OCTETS
from relaygate.delivery.graph import GraphTransport, graph_mailbox
from relaygate.delivery.graph import refusal as graph_refusal
from relaygate.delivery.wire import prepare_data
from relaygate.queue.manager_outcomes import DEFERRED, RouteResult, classify
from relaygate.queue.manager_state import _ManagerState
from relaygate.queue.model import GraphDraft, StoredMessage
from relaygate.replies import DELIVERY_FAILED_INTERNAL


class _GraphSending(_ManagerState):
    """A mixin of `QueueManager`: the Graph sends of a route."""

    def _graph_sender(
        self, msg: StoredMessage, connector: Any, data: bytes, crlf_only: bool
    ) -> Callable[[list[str]], Awaitable[list[RouteResult]]]:
        """One Graph send per call, of the recipients given (delivery_method = "Graph":
        relaygate.delivery.graph), with the octets the SMTP client would put on the wire
        (prepared once, in a worker thread for a big message: ~2 ms per MB)."""
        prepared: list[bytes] = []

        async def send(batch: list[str]) -> list[RouteResult]:
            if not prepared:
                if len(data) > GRAPH_OFF_LOOP_OCTETS:
                    ready = await asyncio.to_thread(prepare_data, data, crlf_only=crlf_only)
                else:
                    ready = prepare_data(data, crlf_only=crlf_only)
                prepared.append(ready)
            return await self._send_graph(msg, connector, batch, prepared[0])

        return send

    async def _send_graph(
        self, msg: StoredMessage, connector: Any, addrs: list[str], data: bytes
    ) -> list[RouteResult]:
        name = str(connector.name)
        earlier = await self._earlier_graph_batch(msg, name, addrs)
        if earlier:
            # An earlier attempt's draft is recorded for some of these recipients only (a paced
            # connector's partial batch whose send got no answer, then the whole route due): that
            # batch first, on its own, so that its draft is looked up (or deleted) under its
            # record; a new draft for all of them would send it twice to those.
            rest = [a for a in addrs if a not in earlier]
            first = await self._send_graph(msg, connector, earlier, data)
            return first + await self._send_graph(msg, connector, rest, data)
        if self.graph is None:
            self.graph = GraphTransport()
        timeout = (
            self.delivery_timeout
            if self.delivery_timeout is not None
            else connector.connection_inactivity_timeout.total_seconds()
        )
        outcome = await self.graph.deliver(
            connector,
            token_provider=self.token_providers.get(name),
            mailbox=graph_mailbox(connector, msg.sender),
            recipients=addrs,
            data=data,
            timeout=timeout,
            log_privacy=self.log_privacy,
            drafts=_StoredDraft(
                self.store, msg.queue_id, _graph_route(name, addrs), since=msg.received_at
            ),
        )
        retry_at = None if outcome.retry_after is None else self.clock() + outcome.retry_after
        out = []
        for a in addrs:
            reply = outcome.per_recipient.get(a, DELIVERY_FAILED_INTERNAL)
            outcome_ = classify(reply)
            out.append(
                RouteResult(
                    a,
                    reply,
                    outcome_,
                    name,
                    outcome.host,
                    retry_at=retry_at if outcome_ == DEFERRED else None,
                )
            )
        return out

    async def _earlier_graph_batch(
        self, msg: StoredMessage, name: str, addrs: list[str]
    ) -> list[str]:
        """Those of ``addrs`` that an earlier attempt's Graph draft, recorded through connector
        ``name`` for a part of them only, was for ([] when none: the usual case)."""
        if len(addrs) < 2:
            return []
        records = {
            key.removeprefix(_SENDMAIL_KEY): draft
            for key, draft in (await self.store.graph_drafts(msg.queue_id)).items()
        }
        if not records or _graph_route(name, addrs) in records:
            return []
        prefix = name.lower() + "\n"
        wanted = {a.lower() for a in addrs}
        for route in records:
            if route.startswith(prefix):
                batch = set(route[len(prefix) :].split("\n"))
                if batch < wanted:
                    return [a for a in addrs if a.lower() in batch]
        return []


async def _graph_refuses(connector: Any, sender: str, data: bytes, crlf_only: bool) -> bool:
    """Whether Graph could never send ``data`` through ``connector`` (its split of a big
    message in a worker thread: the event loop keeps serving the sessions)."""

    def refused() -> bool:
        prepared = prepare_data(data, crlf_only=crlf_only)
        return graph_refusal(graph_mailbox(connector, sender), prepared) is not None

    if len(data) > GRAPH_OFF_LOOP_OCTETS:
        return await asyncio.to_thread(refused)
    return refused()


def _graph_route(connector: str, addrs: list[str]) -> str:
    """The key of a Graph route's draft record: its send connector and its recipients (a
    batch of them: a paced connector's batches are the same at every attempt)."""
    return "\n".join([connector.lower(), *sorted(a.lower() for a in addrs)])


#: Before the route's key, that of a plain sendMail's record (no draft id): the previous
#: release reads a record under the route's key (and, for a paced partial batch, under any key
#: starting with the connector's name) as a draft's, and would take '' for a draft id (a GET of
#: .../messages/, the mailbox's list, then a POST to .../messages//send). Under this key it
#: never sees it and sends again, as it did; a connector's name never starts with a newline.
_SENDMAIL_KEY = "\n"


class _StoredDraft:
    """A `relaygate.delivery.graph.DraftRecord` in the queue store (graph_drafts): a draft's
    under the route's key, a plain sendMail's under _SENDMAIL_KEY + that key."""

    def __init__(self, store: Any, queue_id: str, route: str, *, since: float) -> None:
        self.store = store
        self.queue_id = queue_id
        self.route = route
        self.since = since  # the message's received_at
        #: the key of the record loaded or saved last (the one `forget` drops), None before
        self.key: str | None = None

    async def load(self) -> tuple[str, str, bool, str] | None:
        records = await self.store.graph_drafts(self.queue_id)  # one read for either key
        for key in (self.route, _SENDMAIL_KEY + self.route):
            draft = records.get(key)
            if draft is not None:
                self.key = key
                return draft.mailbox, draft.draft_id, draft.sending, draft.message_id
        return None

    async def save(
        self, mailbox: str, draft_id: str, *, sending: bool, message_id: str = ""
    ) -> None:
        key = self.route if draft_id else _SENDMAIL_KEY + self.route
        if self.key is not None and key != self.key:
            await self.forget()  # the other kind's record (a route's plan seldom changes)
        self.key = key
        await self.store.save_graph_draft(
            self.queue_id, key, GraphDraft(mailbox, draft_id, sending, message_id)
        )

    async def forget(self) -> None:
        await self.store.save_graph_draft(self.queue_id, self.key or self.route, None)
