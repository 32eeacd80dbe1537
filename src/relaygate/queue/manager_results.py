"""The queue manager's bookkeeping of an attempt: each recipient's outcome turned into its new
state (delivered, failed with its NDR stored first, deferred to its next retry, paced without
using up a retry), stored until the store takes it, and written to the tracking log.

Kept apart from the routes that produce the results: this is the one place that decides what a
result does to the queue, whichever way (SMTP, Graph, overflow) the recipient was attempted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from relaygate.queue.bounce import DsnRecipient
from relaygate.queue.manager_outcomes import DEFERRED, DELIVERED, FAILED, PACED, RouteResult
from relaygate.queue.manager_reports import _Reports
from relaygate.queue.model import RecipientState, RecipientStatus, StoredMessage
from relaygate.queue.store import StoreClosedError, StoreError

log = logging.getLogger("relaygate.queue")


class _Results(_Reports):
    """A mixin of `QueueManager`: the results of an attempt, recorded."""

    async def _record(
        self,
        msg: StoredMessage,
        by_addr: dict[str, RecipientState],
        results: list[RouteResult],
        data: bytes,
        *,
        release: bool = False,
    ) -> list[RouteResult]:
        """Store the outcomes (NDR first); returns the deferred ones."""
        now = self.clock()
        failed = [res for res in results if res.outcome == FAILED]
        # The NDR first: a crash before the results are recorded repeats the attempt (and maybe
        # the NDR), it never loses the report.
        if failed:
            try:
                await self.send_dsn(
                    msg,
                    data,
                    [
                        DsnRecipient(r.address, r.reply, r.remote_host, last_attempt=now)
                        for r in failed
                    ],
                    action="failed",
                )
            except StoreClosedError:
                raise
            except Exception as exc:
                # The NDR could not be queued (a full disk...): its recipients are retried on the
                # schedule, as after a 4xx, and bounced when they fail again. What was delivered
                # is still recorded below, or every scan would deliver it again.
                log.error(
                    "message %s: the NDR for %d recipient(s) could not be queued (%s); "
                    "they are retried later",
                    msg.queue_id,
                    len(failed),
                    exc,
                )
                results = [
                    replace(r, outcome=DEFERRED) if r.outcome == FAILED else r for r in results
                ]
        updates: list[RecipientState] = []
        deferred: list[RouteResult] = []
        for res in results:
            attempts = by_addr[res.address].attempts + 1
            line = res.reply.line()
            if res.outcome == PACED:
                # Not an attempt: attempts and last_attempt stay; due again when the window
                # frees, but never past the delay notice or the expiry (time still runs).
                before = by_addr[res.address]
                nxt = self.schedule.not_later_than(
                    res.retry_at if res.retry_at is not None else now,
                    now,
                    msg.received_at,
                    delay_notified=msg.delay_notified,
                )
                state = RecipientState(
                    res.address,
                    RecipientStatus.DEFERRED,
                    before.attempts,
                    line,
                    before.last_attempt,
                    nxt,
                )
                deferred.append(res)
            elif res.outcome == DELIVERED:
                state = RecipientState(
                    res.address, RecipientStatus.DELIVERED, attempts, line, now, None
                )
            elif res.outcome == FAILED:
                state = RecipientState(res.address, RecipientStatus.FAILED, attempts, line, now)
            else:
                nxt = self.schedule.next_attempt(
                    attempts, now, msg.received_at, delay_notified=msg.delay_notified
                )
                if res.retry_at is not None and res.retry_at > nxt:
                    # the upstream asked for a wait (Retry-After): not sooner, but still never
                    # past the delay notice or the expiry
                    nxt = self.schedule.not_later_than(
                        res.retry_at, now, msg.received_at, delay_notified=msg.delay_notified
                    )
                state = RecipientState(
                    res.address, RecipientStatus.DEFERRED, attempts, line, now, nxt
                )
                deferred.append(res)
            updates.append(state)
            self.stats[res.outcome] += 1

        await self._store_results(msg.queue_id, updates, release)
        self._track_results(msg, results, data)
        return deferred

    async def _store_results(
        self, queue_id: str, updates: list[RecipientState], release: bool
    ) -> None:
        """record_results, tried again until it is stored: the next hop has answered, and a
        result dropped here (a full disk, an I/O error) would deliver the message again once
        writes work. The lease is kept meanwhile (renewed when the store takes writes again).
        Applying the same results twice is harmless (a final status is never overwritten)."""
        delay = 0.5
        while True:
            try:
                await self.store.record_results(queue_id, self.node_id, updates, release=release)
                return
            except StoreClosedError:
                raise
            except StoreError as exc:
                if self._stopping:
                    raise  # stopping: the result is lost, the message is delivered again
                log.error(
                    "message %s: its delivery results could not be stored (%s); trying again "
                    "in %.1f s",
                    queue_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _track_results(self, msg: StoredMessage, results: list[RouteResult], data: bytes) -> None:
        groups: dict[tuple[str, str, str, str, str], list[RouteResult]] = {}
        event_of = {DELIVERED: "SEND", DEFERRED: "DEFER", FAILED: "FAIL", PACED: "DEFER"}
        for r in results:
            key = (event_of[r.outcome], r.source, r.connector, r.remote_host, r.remote_ip)
            groups.setdefault(key, []).append(r)
        fqdn = self.config.server.fqdn
        for (event, source, connector, host, ip), rs in groups.items():
            extra: dict[str, Any] = {}
            if event == "SEND" or host:
                extra = {
                    "server_hostname": host,
                    "server_ip": ip,
                    "client_hostname": fqdn,
                }
            self.track(
                event,
                source,
                msg,
                recipients=[r.address for r in rs],
                recipient_status=[r.reply.line() for r in rs],
                data=data,
                connector_id=connector,
                **extra,
            )
