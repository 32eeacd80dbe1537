"""The queue manager's paced routes: a send connector with pacing limits
(``max_messages_per_minute``, ``max_recipients_per_day``, relaygate.queue.pacing) sends what its
budget lets go now, one reservation per transaction; what the budget holds back goes through the
connector's ``overflow_connector`` chain, or waits in the queue (Retry, no retry used up).

Kept apart from the routing of a message (manager_routes.py): an unpaced route (the usual case)
never comes here, and the budget, its reservations and the overflow chain are one subject.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from relaygate.delivery.credentials import Credentials
from relaygate.delivery.graph import is_graph
from relaygate.delivery.nexthop import resolve_next_hops
from relaygate.delivery.routing import DELIVERY_SMART_HOST, RouteKey, domain_of, route_key_for
from relaygate.delivery.wire import prepare_data
from relaygate.queue import pacing
from relaygate.queue.manager_graph import _graph_refuses, _GraphSending
from relaygate.queue.manager_outcomes import DEFERRED, PACED, RouteResult, size_for_limits
from relaygate.queue.manager_sending import _Sending
from relaygate.queue.model import SendWait, StoredMessage
from relaygate.replies import DELIVERY_FAILED_INTERNAL

log = logging.getLogger("relaygate.queue")


class _PacedRoutes(_Sending, _GraphSending):
    """A mixin of `QueueManager`: routes through paced send connectors, and their overflow."""

    async def _paced_route(
        self,
        msg: StoredMessage,
        connector: Any,
        limits: tuple[Any, ...],
        addrs: list[str],
        send: Callable[[list[str]], Awaitable[list[RouteResult]]],
        data: bytes,
        crlf_only: bool,
        original: bytes,
        original_crlf: bool,
    ) -> list[RouteResult]:
        """A paced route: what the budget lets go now through ``send``; what it holds back
        through the overflow connector(s) when there are some, else (and for whatever they
        hold back too) it waits in the queue."""
        name = str(connector.name)
        sent, held, wait = await self._paced_send(msg, connector, limits, addrs, send)
        if wait is None:
            return sent
        spent = [(connector, wait)]
        if getattr(connector, "overflow_connector", ""):
            spilled, held = await self._overflow(
                msg, connector, held, spent, data, crlf_only, original, original_crlf
            )
            sent += spilled
        if held:
            reply = pacing.paced_reply(connector, wait.limit)
            # due when the first of the spent connectors has room again
            retry_at = min(self._retry_at(pacing.budget_key(c), w) for c, w in spent)
            sent += [
                RouteResult(a, reply, PACED, name, source="QUEUE", retry_at=retry_at) for a in held
            ]
        return sent

    async def _paced_send(
        self,
        msg: StoredMessage,
        connector: Any,
        limits: tuple[Any, ...],
        addrs: list[str],
        send: Callable[[list[str]], Awaitable[list[RouteResult]]],
    ) -> tuple[list[RouteResult], list[str], SendWait | None]:
        """Send through ``send`` (one SMTP transaction, or one Graph send, per call) what the
        connector's budget lets go now: one reservation per call, made before it is attempted
        (a send that then fails keeps its reservation: the upstream may well have counted it).
        A transaction the budget has only some room left for takes that room: its first
        recipients go now. Returns the results, the recipients held back (in order) and the
        budget's answer for them (None: none held back)."""
        name = str(connector.name)
        sent: list[RouteResult] = []
        batches = pacing.batches(addrs, connector)
        for i, batch in enumerate(batches):
            try:
                wait = await self._reserve(connector, limits, len(batch))
            except Exception as exc:
                if not sent:
                    raise  # nothing sent yet: the caller defers the whole route
                # Earlier batches went out: their results must be recorded (a route-wide
                # failure would defer them too, and they would be sent again).
                log.error(
                    "message %s: cannot reserve a send through %s: %r", msg.queue_id, name, exc
                )
                sent += [
                    RouteResult(a, DELIVERY_FAILED_INTERNAL, DEFERRED, name)
                    for rest in batches[i:]
                    for a in rest
                ]
                return sent, [], None
            if wait is None:
                sent += await send(batch)
                continue
            if wait.reserved:  # the budget's last room: the first recipients now
                sent += await send(batch[: wait.reserved])
            held = batch[wait.reserved :] + [a for rest in batches[i + 1 :] for a in rest]
            return sent, held, wait
        return sent, [], None

    async def _overflow(
        self,
        msg: StoredMessage,
        first: Any,
        held: list[str],
        spent: list[tuple[Any, SendWait]],
        data: bytes,
        crlf_only: bool,
        original: bytes,
        original_crlf: bool,
    ) -> tuple[list[RouteResult], list[str]]:
        """``held``, the recipients ``first``'s pacing holds back, through its
        ``overflow_connector``, then that one's, and so on: each sends them its own way (its
        next hops, auth, send_as) within its own budget, and passes on what that holds back.
        A disabled connector, one whose max_message_size the message exceeds, or a Graph one that
        could never send it (too big even with its attachments uploaded apart, the null sender
        without a mailbox) is skipped;
        the chain ends at an unknown name or a connector already visited. Returns the results
        and the recipients still held; each spent connector's wait is appended to ``spent``."""
        results: list[RouteResult] = []
        visited = {str(first.name).lower()}
        current = first
        while held:
            target = str(getattr(current, "overflow_connector", "") or "").lower()
            current = next(
                (c for c in self.config.send_connectors if str(c.name).lower() == target), None
            )
            if current is None or str(current.name).lower() in visited:
                break
            visited.add(str(current.name).lower())
            limit = getattr(current, "max_message_size", None)
            if not getattr(current, "enabled", True) or (
                limit is not None and size_for_limits(msg) > limit
            ):
                continue
            try:
                send_as = str(getattr(current, "send_as", "") or "")
                if send_as == str(getattr(first, "send_as", "") or ""):
                    via = data, crlf_only  # sent alike: the bytes are ready
                elif send_as:
                    key = RouteKey(current.name, "", DELIVERY_SMART_HOST, current)
                    via = (await self._sent_as(msg, original, original_crlf, [key]))[send_as], False
                elif self.signer is not None:
                    via = (
                        await self._sign(msg, prepare_data(original, crlf_only=original_crlf)),
                        False,
                    )
                else:
                    via = original, original_crlf
            except Exception as exc:
                log.error(
                    "message %s: cannot prepare the message for overflow connector %s: %r",
                    msg.queue_id,
                    current.name,
                    exc,
                )
                break
            if is_graph(current) and await _graph_refuses(current, msg.sender, *via):
                continue  # Graph could never send it (unsplittable, the null sender): not this one
            sent, held = await self._spill(msg, current, held, spent, *via)
            if sent:
                log.info(
                    "message %s: %d recipient(s) held back by the pacing of %s went through "
                    "overflow connector %s",
                    msg.queue_id,
                    len(sent),
                    first.name,
                    current.name,
                )
            results += sent
        return results, held

    async def _spill(
        self,
        msg: StoredMessage,
        connector: Any,
        addrs: list[str],
        spent: list[tuple[Any, SendWait]],
        data: bytes,
        crlf_only: bool,
    ) -> tuple[list[RouteResult], list[str]]:
        """``addrs`` through the overflow ``connector`` (one route per next hop: by domain
        when it routes by MX). A route it cannot take now (its budget spent, no next hop, no
        credentials, a store error) keeps its recipients held, for the next connector of the
        chain or the queue."""
        name = str(connector.name)
        routes: dict[str, list[str]] = {}
        for a in addrs:
            routes.setdefault(route_key_for(connector, domain_of(a)).next_hop, []).append(a)
        limits = pacing.limits_for(connector)
        results: list[RouteResult] = []
        held: list[str] = []
        graph = getattr(connector, "delivery_method", "SMTP") == "Graph"
        for group in routes.values():
            try:
                if graph:
                    send = self._graph_sender(msg, connector, data, crlf_only)
                else:
                    # A session may hand a message over while the listeners are still opening.
                    await self.endpoints_known.wait()
                    hops = await resolve_next_hops(
                        connector,
                        domain_of(group[0]),
                        self.resolver,
                        local_endpoints=self.local_endpoints,
                        local_names=self.local_names,
                    )
                    credentials = Credentials.from_connector(
                        connector, token_provider=self.token_providers.get(name)
                    )
                    send = functools.partial(
                        self._send,
                        msg,
                        connector,
                        hops,
                        credentials,
                        data=data,
                        crlf_only=crlf_only,
                    )
                if not limits:
                    results += await send(group)
                    continue
                sent, rest, wait = await self._paced_send(msg, connector, limits, group, send)
            except Exception as exc:  # NextHopError, CredentialsError, StoreError...
                log.error(
                    "message %s: overflow connector %s cannot take %d recipient(s): %s",
                    msg.queue_id,
                    name,
                    len(group),
                    getattr(exc, "reply", None) or repr(exc),
                )
                held += group
                continue
            results += sent
            held += rest
            if wait is not None:
                spent.append((connector, wait))
        return results, held

    async def _reserve(
        self, connector: Any, limits: tuple[Any, ...], recipients: int
    ) -> SendWait | None:
        """A slot in the connector's budget (None), or when it will have one (with
        ``reserved`` > 0: a slot for that many of the recipients, the first ones)."""
        key = pacing.budget_key(connector)
        now = self.clock()
        known = self._paced_until.get(key)
        if known is not None and now < known.until:
            return known  # the store said so: no slot frees before then
        # partial: a transaction that does not fit whole takes what is left of a recipient
        # budget (a big message is not starved by the small ones that keep using each freed slot)
        wait = await self.store.reserve_send(key, now, recipients, limits, partial=True)
        if wait is None or wait.reserved:
            self._paced_until.pop(key, None)
            self._paced_count.pop(key, None)
        if wait is not None and wait.limit.max_messages is not None:
            # Only a message limit holds every send back alike (a smaller one may still fit
            # a recipient budget).
            self._paced_until[key] = replace(wait, reserved=0)
        return wait

    def _retry_at(self, key: str, wait: SendWait) -> float:
        """When a held-back message is due again: when the window frees (``wait.until``) for the
        first ``max_messages`` held back; at most that many can go in one window, so the next
        ones are due a window later each, instead of all of them taking the queue again for
        every slot that frees (a backlog of N messages would be N writes per freed slot)."""
        k = self._paced_count.get(key, 0)
        self._paced_count[key] = k + 1
        per_window = wait.limit.max_messages
        if per_window is None:
            return wait.until
        return wait.until + (k // per_window) * wait.limit.window
