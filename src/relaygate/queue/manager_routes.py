"""One delivery run of one message (`process_message`): expired, or its due recipients routed
through the send connectors (relaygate.delivery.routing), the bytes signed and rewritten once per
way they are sent, and each route delivered (`_deliver_route`: the Unreachable queue, Graph, or
SMTP to the resolved next hops, paced or not) with its results recorded as soon as it ends; of
several routes, the recipients they fail once all have ended, in one NDR per attempt.

Kept apart from the loop that leases the messages (manager_loop.py), and from what a route's
sends (manager_sending.py, manager_graph.py, manager_pacing.py) and results (manager_results.py)
are made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from relaygate import replies
from relaygate.delivery.client import CREDENTIALS_MISSING
from relaygate.delivery.credentials import Credentials, CredentialsError
from relaygate.delivery.nexthop import NextHopError, resolve_next_hops
from relaygate.delivery.routing import (
    DELIVERY_GRAPH,
    RouteKey,
    RouteTable,
    domain_of,
    explain_route,
)
from relaygate.delivery.wire import prepare_data
from relaygate.queue import pacing
from relaygate.queue.manager_outcomes import DEFERRED, FAILED, RouteResult, size_for_limits
from relaygate.queue.manager_pacing import _PacedRoutes
from relaygate.queue.manager_results import _Results
from relaygate.queue.manager_sending import _send_as
from relaygate.queue.model import LINE_BREAKS, LINE_BREAKS_CRLF, PENDING_STATUSES, StoredMessage
from relaygate.queue.store import CorruptMessageError, StoreClosedError, StoreError
from relaygate.replies import DELIVERY_FAILED_INTERNAL

log = logging.getLogger("relaygate.queue")


class _MessageRoutes(_PacedRoutes, _Results):
    """A mixin of `QueueManager`: one message's delivery run, route by route."""

    async def process_message(self, msg: StoredMessage, data: bytes | None = None) -> bool:
        """One delivery run for a leased message: expire it, or attempt its due recipients.
        `data`: the message bytes when the caller has them (a message just received). Returns
        True when the lease was already dropped with the last results (one transaction)."""
        now = self.clock()
        pending = [r for r in msg.recipients if r.status in PENDING_STATUSES]
        if not pending or msg.suspended:
            return False
        if self.schedule.is_expired(msg.received_at, now):
            await self._expire(msg, pending)
            return False
        due = [r for r in pending if r.next_attempt is None or r.next_attempt <= now]
        if not due:
            return False
        if data is None:
            try:
                data = await self.store.read_data(msg.queue_id, size=msg.size)
            except KeyError:
                return False  # removed by the administrator meanwhile
            except CorruptMessageError as exc:
                # Exchange's poison queue: keep it, never deliver damaged bytes, let an admin decide.
                log.error("message %s: %s; suspended", msg.queue_id, exc)
                with contextlib.suppress(KeyError):
                    await self.store.set_flags(msg.queue_id, suspended=True)
                    self._track_poison(msg, pending, str(exc))
                return False
            except StoreClosedError:
                raise
            except StoreError as exc:
                # Not the message's fault (the process out of descriptors, the database busy):
                # its lease goes, and a scan tries it again.
                log.warning("message %s: cannot read it now (%s); tried again", msg.queue_id, exc)
                return False

        routes = self._routes
        if routes is None or routes.source is not self.config.send_connectors:
            routes = self._routes = RouteTable(self.config.send_connectors)  # new configuration
        groups = routes.route([r.address for r in due], size=size_for_limits(msg))
        to_send = data
        # Checked on receipt: no second scan of the bytes (unless a signature was added to them).
        received_crlf = crlf_only = msg.metadata.get(LINE_BREAKS) == LINE_BREAKS_CRLF
        if self.signer is not None and any(
            not k.is_unreachable and not _send_as(k) for k in groups
        ):
            # Signed as they will go on the wire: the client folds lines over 998 octets and drops
            # NULs, which would break a signature made over the stored bytes (DMARC fails).
            to_send = await self._sign(msg, prepare_data(data, crlf_only=crlf_only))
            crlf_only = False
        # A coroutine only when a route sends as a mailbox (not the usual case).
        sent_as = (
            await self._sent_as(msg, data, received_crlf, groups)
            if any(_send_as(k) for k in groups)
            else {}
        )

        self.stats["attempts"] += 1
        by_addr = {r.address: r for r in due}
        deferred: list[RouteResult] = []
        # Several routes: the recipients they fail wait for the others, for one NDR per attempt
        # (as Exchange and Postfix report), not one per route.
        failed: list[RouteResult] | None = [] if len(groups) > 1 else None

        async def run_route(key: RouteKey, addrs: list[str]) -> None:
            # Each route's outcome is recorded as soon as it is known: a crash or a stop while
            # another route is still in progress never causes a resend to these recipients. A
            # failed one is not recorded before its NDR is queued: after a crash meanwhile it is
            # tried again (and refused again), never left without a report.
            send_as = _send_as(key)
            route_data, route_crlf = (sent_as[send_as], False) if send_as else (to_send, crlf_only)
            try:
                results = await self._deliver_route(
                    msg, key, addrs, route_data, route_crlf, data, received_crlf
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("message %s: delivery via %s failed: %r", msg.queue_id, key.next_hop, exc)
                results = [
                    RouteResult(a, DELIVERY_FAILED_INTERNAL, DEFERRED, key.connector_name or "")
                    for a in addrs
                ]
            if failed is not None:
                failed.extend(r for r in results if r.outcome == FAILED)
                results = [r for r in results if r.outcome != FAILED]
                if not results:
                    return
            deferred.extend(await self._record(msg, by_addr, results, data, release=release))

        # One route (the usual case): its results and the end of the lease are one transaction.
        release = len(groups) == 1 and not self.schedule.delay_notice_due(
            msg.received_at, now, msg.delay_notified
        )
        if len(groups) == 1:  # the usual case: no task (and no gather) for one route
            [(key, addrs)] = groups.items()
            await run_route(key, addrs)
        else:
            # Every route ends before the lease can go (return_exceptions): a route that raised
            # must not let the others deliver unleased, where another node could take them too.
            outcomes = await asyncio.gather(
                *(run_route(key, addrs) for key, addrs in groups.items()), return_exceptions=True
            )
            for outcome in outcomes:
                if isinstance(outcome, BaseException):
                    raise outcome
            if failed:  # one NDR for every route's failures, then their results
                deferred.extend(await self._record(msg, by_addr, failed, data))
        await self._maybe_delay_notice(msg, by_addr, pending, deferred, data)
        return release

    async def _deliver_route(
        self,
        msg: StoredMessage,
        key: RouteKey,
        addrs: list[str],
        data: bytes,
        crlf_only: bool,
        original: bytes,
        original_crlf: bool,
    ) -> list[RouteResult]:
        """One route's recipients: ``data`` as this route sends it (signed, sent as its
        ``send_as``); ``original``: the message as stored (for an overflow connector that sends
        it otherwise)."""
        if key.is_unreachable:
            out = []
            for a in addrs:
                reply = explain_route(
                    self.config.send_connectors, a, size=size_for_limits(msg)
                ).reply
                reply = reply or replies.NO_NEXT_HOP
                # No route: the Unreachable queue (retried until expiry). Too big for every route: NDR.
                outcome = DEFERRED if reply == replies.NO_NEXT_HOP else FAILED
                out.append(RouteResult(a, reply, outcome, source="ROUTING"))
            return out
        connector = key.connector
        name = str(connector.name)
        if key.delivery_type == DELIVERY_GRAPH:
            send = self._graph_sender(msg, connector, data, crlf_only)
            limits = pacing.limits_for(connector)
            if not limits:
                return await send(addrs)
            return await self._paced_route(
                msg, connector, limits, addrs, send, data, crlf_only, original, original_crlf
            )
        try:
            # A session may hand a message over while the listeners are still opening.
            await self.endpoints_known.wait()
            hops = await resolve_next_hops(
                connector,
                domain_of(addrs[0]),
                self.resolver,
                local_endpoints=self.local_endpoints,
                local_names=self.local_names,
            )
        except NextHopError as exc:
            outcome = FAILED if exc.permanent else DEFERRED
            return [RouteResult(a, exc.reply, outcome, name, source="DNS") for a in addrs]
        try:
            credentials = Credentials.from_connector(
                connector, token_provider=self.token_providers.get(name)
            )
        except CredentialsError as exc:
            log.error("%s", exc)
            return [RouteResult(a, CREDENTIALS_MISSING, DEFERRED, name) for a in addrs]
        limits = pacing.limits_for(connector)
        if not limits:  # the usual case: no pacing, no store call
            return await self._send(msg, connector, hops, credentials, addrs, data, crlf_only)
        send = functools.partial(
            self._send, msg, connector, hops, credentials, data=data, crlf_only=crlf_only
        )
        return await self._paced_route(
            msg, connector, limits, addrs, send, data, crlf_only, original, original_crlf
        )
