"""The queue manager's loop: scan the store (``scan_interval``, or at once when woken), lease the
due messages up to ``max_concurrent_deliveries`` (owner ``node_id``), run each one's delivery in
a task of its own, renew the leases of those in flight, and purge completed messages (and forget
the delay flags owed for messages that ended elsewhere).

Kept apart from what a delivery run does (manager_routes.py): this part is about leases,
concurrency and a node's clock (a refused lease for clock skew is said once), not about mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

from relaygate.queue.manager_routes import _MessageRoutes
from relaygate.queue.model import StoredMessage
from relaygate.queue.store import ClockSkewError, StoreClosedError, StoreError

log = logging.getLogger("relaygate.queue")

#: A store error that fails every scan (a database down, a disk refusing writes) is said when it
#: starts and then at most this often, with how many scans it failed meanwhile: a scan runs
#: every scan_interval (or sooner when woken), and a line per scan per worker buried the log.
_REPEAT_EVERY = 60.0


class _ScanFailures:
    """The scans failed by one store error in a row, and when that was last said."""

    __slots__ = ("count", "first", "message", "said_at", "unsaid")

    def __init__(self) -> None:
        self.message = ""
        self.count = 0  # failed scans since the last one that worked
        self.unsaid = 0  # ... of which not in a log line yet
        self.first = self.said_at = 0.0

    def failed(self, exc: StoreError) -> None:
        now, message = time.monotonic(), str(exc)
        if self.count == 0:
            self.first = now
        self.count += 1
        if message != self.message:
            self.message, self.said_at, self.unsaid = message, now, 0
            log.error("queue scan failed: %s", message)
        elif now - self.said_at >= _REPEAT_EVERY:
            log.error(
                "queue scan failed (again %d times in the last %.0f s): %s",
                self.unsaid + 1,
                now - self.said_at,
                message,
            )
            self.said_at, self.unsaid = now, 0
        else:
            self.unsaid += 1

    def worked(self) -> None:
        if self.count:
            log.warning(
                "queue scans work again, after %d failed in %.0f s (last error: %s)",
                self.count,
                time.monotonic() - self.first,
                self.message,
            )
            self.message, self.count, self.unsaid = "", 0, 0


class _ScanLoop(_MessageRoutes):
    """A mixin of `QueueManager`: the lease and scan loop."""

    @property
    def max_concurrent(self) -> int:
        return max(1, int(self.config.queue.max_concurrent_deliveries))

    async def _run(self) -> None:
        await self.endpoints_known.wait()  # loop detection needs the listeners (manager.py)
        failures = _ScanFailures()
        while not self._stopping:
            self._wake.clear()
            try:
                with contextlib.suppress(ClockSkewError):  # said once, by _lease_due
                    # Refused scans must not stop the deliveries in flight from renewing their
                    # leases: another node would take those messages and deliver them too.
                    await self._scan()
                await self._renew_leases()
                await self._housekeeping()
                failures.worked()
            except StoreClosedError:
                if self._stopping:
                    break
                log.error("queue store is closed; the queue manager waits")
            except StoreError as exc:  # the database is down or full: say why, not every scan
                self.stats["loop_errors"] += 1
                failures.failed(exc)
            except Exception:
                self.stats["loop_errors"] += 1
                log.exception("queue scan failed")
            if self._stopping:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.scan_interval)

    async def _scan(self) -> None:
        free = self.max_concurrent - len(self._inflight)
        if free <= 0:
            self._rescan = True
            return
        now = self.clock()
        # Our own leases do not stop us from leasing again, so ask for room for what is in flight.
        limit = free + len(self._inflight)
        # lease_due returns our messages in flight too, as they were before its transaction: one
        # whose delivery ends while the call runs is no longer in flight when the loop below
        # looks, yet its copy is still pending. Without this set it was delivered twice.
        ended: set[str] = set()
        self._ended_during_scan = ended
        try:
            leased = await self._lease_due(now, limit)
            # A full batch may have left due messages behind: scan again as soon as there is room.
            self._rescan = len(leased) >= limit
            for msg in leased:
                if msg.queue_id in self._inflight:
                    continue
                if msg.queue_id in ended or len(self._inflight) >= self.max_concurrent:
                    # Its run has just ended (the lease_due may have leased it again from the
                    # row as it was), or no room after all: let it go; a scan takes it if due.
                    await self.store.release(msg.queue_id, self.node_id)
                    continue
                task = asyncio.create_task(self._process(msg), name=f"deliver-{msg.queue_id}")
                self._inflight[msg.queue_id] = task
                task.add_done_callback(functools.partial(self._done, msg.queue_id))
        finally:
            self._ended_during_scan = None

    async def _lease_due(self, now: float, limit: int) -> list[StoredMessage]:
        """store.lease_due, keeping track of a refusal for this node's clock: said once when it
        starts and once when it ends, not at every scan (every second) in between."""
        try:
            leased = await self.store.lease_due(self.node_id, now, self.lease_seconds, limit)
        except ClockSkewError as exc:
            if self.clock_skew is None:
                self.stats["loop_errors"] += 1
                log.error("queue: %s", exc)
            self.clock_skew = str(exc)  # the offset as last measured
            raise
        if self.clock_skew is not None:
            self.clock_skew = None
            log.warning("queue: this node's clock agrees with the queue's again; leasing resumes")
        return leased

    def _done(self, queue_id: str, _task: asyncio.Task[None] | None = None) -> None:
        self._inflight.pop(queue_id, None)
        if self._ended_during_scan is not None:
            self._ended_during_scan.add(queue_id)
        if self._rescan and not self._stopping:
            self._wake.set()  # room for the next due message

    async def _renew_leases(self) -> None:
        """Keep the leases of the deliveries in flight. A run can outlast a lease (a next hop
        that answers each command just inside its timeout, several hops in turn), and another
        worker or node would then take the message and deliver it as well. One store call for
        all of them, every third of a lease."""
        now = self.clock()
        if not self._inflight or now - self._last_renew < self.lease_seconds / 3:
            return
        self._last_renew = now
        await self.store.renew_leases(self.node_id, list(self._inflight), now + self.lease_seconds)

    async def _housekeeping(self) -> None:
        now = self.clock()
        if now - self._last_purge < 60.0:
            return
        self._last_purge = now
        retention = self.config.queue.completed_retention.total_seconds()
        purged = await self.store.purge_completed(now - retention)
        if purged:
            log.info("purged %d completed message(s) older than %s", purged, retention)
        await self.forget_ended_delay_flags()

    async def _process(self, msg: StoredMessage, data: bytes | None = None) -> None:
        released = False
        try:
            released = await self.process_message(msg, data)
        except asyncio.CancelledError:
            raise
        except StoreClosedError:
            log.warning("message %s: the store closed during delivery", msg.queue_id)
        except StoreError as exc:
            # An operational condition the error names (a full disk, an I/O or locking error,
            # results that could not be stored as the relay stops): no traceback to read.
            log.error(
                "message %s: delivery run failed: %s; the message stays queued and is tried "
                "again (a recipient delivered without its result stored is sent again)",
                msg.queue_id,
                exc,
            )
        except Exception:
            log.exception("message %s: delivery run failed", msg.queue_id)
        finally:
            if not released:
                with contextlib.suppress(Exception):
                    await self.store.release(msg.queue_id, self.node_id)
