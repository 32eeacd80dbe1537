"""The queue manager: from the durable queue to the next hop, with Exchange's timings and reports.

One loop per node, or per worker process with ``server.workers > 1``. It leases due messages from
the store (owner = ``server.name``, or ``<server.name>-w<i>`` for worker i, so a restarted node or
worker takes its own in-flight messages back at once; another one waits for the lease to expire),
routes each due recipient through the send connectors (``relaygate.delivery.routing``), resolves the
next hops (smart hosts in order, or MX; loop detection against ``local_endpoints``), signs with DKIM
when keys are configured, delivers with the SMTP client, and records every recipient's outcome
durably before it forgets the message:

* 2xx → Delivered (final: never sent again, even after a crash);
* 4xx, DNS trouble, no route → Retry: ``transient_failure_retry_count`` retries
  ``transient_failure_retry_interval`` apart, then every ``message_retry_interval``
  (`relaygate.queue.retry`). A recipient with no route keeps ``550 5.4.4 ROUTING.NoNextHop; unable to
  route`` as its last error and is shown in the Unreachable queue, as Exchange does; a configuration
  reload resubmits it at once;
* 5xx → Failed, and an NDR;
* a send connector's pacing budget spent (``max_messages_per_minute``, ``max_recipients_per_day``,
  `relaygate.queue.pacing`; what is left of a day's budget is taken by the first recipients of a
  transaction bigger than it) → not attempted: Retry until the window frees, with a
  ``451 4.4.2 QUEUE.Paced; ...`` last error; no retry is used up (the attempt count, and so the
  retry interval, is left as it was), but the delay notice and the expiry still come on time;
* still pending ``delay_notification_timeout`` after arrival → one delay notice (DSN, delayed);
* still pending ``message_expiration_timeout`` after arrival → Failed with
  ``550 4.4.7 QUEUE.Expired; message expired``, and an NDR.

NDRs and delay notices (`relaygate.queue.bounce`) go to the original envelope sender (never when it
is ``<>``), NDRs also to ``admin_notification_address`` when set, from the default accepted domain's
postmaster (Exchange's; that domain's DKIM key signs them). They are submitted to the store as
ordinary messages with the null sender, so they are durable and delivered by this same loop. A report
is stored *before* the outcome that caused it is recorded: a crash in between can duplicate a report,
never lose one.

Concurrency: at most ``max_concurrent_deliveries`` messages in flight; ``wake()`` (called by the SMTP
server for every accepted message) starts a scan at once, otherwise the queue is scanned every
``scan_interval`` seconds. ``stop()`` lets deliveries in flight finish for ``stop_grace`` seconds and
then cancels them (their recipients are simply attempted again after the restart).

Tracking events (exchange-semantics.md §6.3): SEND (with the remote reply), DEFER, FAIL, DSN, DROP.

The class is put together from sibling modules, one seam each: manager_loop.py (the lease and
scan loop), manager_routes.py (one message's delivery run, route by route), manager_pacing.py
(paced routes and their overflow connectors), manager_sending.py (DKIM signing, send_as, the SMTP
transaction), manager_graph.py (the Graph sends and their draft records), manager_results.py
(each recipient's outcome recorded), manager_reports.py (expiry, delay notices, NDRs),
manager_tracking.py (the tracking-log events); manager_outcomes.py holds `RouteResult` and its
outcomes, manager_state.py the state they share. This module holds the manager's state, its
start and stop, and the control operations (new messages handed over, wake, reload, resubmit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from relaygate.delivery.client import ConnectionPool, load_tls_context
from relaygate.delivery.dns import Resolver
from relaygate.delivery.graph import GraphTransport, graph_scope, is_graph
from relaygate.delivery.oauth import TokenProvider, build_token_provider
from relaygate.delivery.routing import RouteTable
from relaygate.queue import pacing
from relaygate.queue.manager_loop import _ScanLoop
from relaygate.queue.manager_outcomes import RouteResult as RouteResult
from relaygate.queue.manager_outcomes import classify as classify
from relaygate.queue.manager_outcomes import is_unreachable
from relaygate.queue.model import PENDING_STATUSES, SendWait, StoredMessage
from relaygate.queue.retry import RetrySchedule
from relaygate.queue.store import Store
from relaygate.replies import DELIVERY_FAILED_INTERNAL as DELIVERY_FAILED_INTERNAL

__all__ = [
    "DELIVERY_FAILED_INTERNAL",
    "QueueManager",
    "RouteResult",
    "classify",
    "is_unreachable",
]

log = logging.getLogger("relaygate.queue")

#: Messages read from the store per page when the queue is walked whole (resubmitting the
#: Unreachable queue after a reload): keyset pages (``after`` = the last queue id), so a queue of
#: any size is gone through without holding it in memory, the event loop served between pages.
RESUBMIT_PAGE_SIZE = 1000


def _build_token_providers(
    config: Any, previous: dict[str, TokenProvider]
) -> dict[str, TokenProvider]:
    """One OAuth token provider per XOAUTH2 or Graph send connector (Graph's with Graph's
    scope; Entra ID's or a Google service account's by oauth_provider). A reload keeps a
    provider (and its cached token) when nothing it is built from changed."""
    out: dict[str, TokenProvider] = {}
    for connector in config.send_connectors:
        graph = is_graph(connector)
        if connector.smart_host_auth_mechanism != "XOAUTH2" and not graph:
            continue
        fresh = build_token_provider(connector, scope=graph_scope(connector) if graph else None)
        old = previous.get(fresh.connector_name)
        same = old is not None and old.signature == fresh.signature
        out[fresh.connector_name] = old if same and old is not None else fresh
    return out


def build_signer(config: Any) -> Any:
    """The DKIM signer for the configured keys, or None (no keys, or dkimpy missing).

    Reads and parses every key file (an RSA 4096 parse takes tens of ms): blocking, so a reload
    calls it in a thread (``asyncio.to_thread``) and hands the result to `QueueManager.apply`."""
    if not getattr(config, "dkim", None):
        return None
    try:
        from relaygate.dkim.signer import DkimSigner
    except ImportError:  # pragma: no cover - dkimpy is a dependency
        log.warning("DKIM keys are configured but the signer is not available; sending unsigned")
        return None
    try:
        signer = DkimSigner.from_config(config, skip_unusable=True)
    except Exception as exc:  # DkimConfigError: `relaygate check` lists the problems
        log.error("DKIM signing disabled, the [[dkim]] configuration cannot be used: %s", exc)
        return None
    # A key that cannot be used is left out, and the others sign: one bad entry (a rotation's new
    # key not written yet) must not send every domain's mail unsigned.
    for problem in signer.problems:
        log.error("DKIM key not used (mail it would sign goes out unsigned): %s", problem)
    for warning in signer.warnings:  # used, not refused: refusing would send mail unsigned
        log.warning("%s", warning)
    return signer


class QueueManager(_ScanLoop):
    """Delivers what is in the store. See the module docstring."""

    def __init__(
        self,
        config: Any,
        store: Store,
        *,
        tracking: Any = None,
        node_id: str | None = None,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.time,
        scan_interval: float = 1.0,
        lease_seconds: float = 1800.0,
        stop_grace: float = 10.0,
        delivery_timeout: float | None = None,
    ) -> None:
        self.config = config
        self._routes: RouteTable | None = None  # routing decisions for config.send_connectors
        # Messages whose delay notice this node queued but whose "delay notified" flag it could
        # not save (a store error): no second notice while the flag is owed (manager_reports.py).
        self._delay_flag_owed: set[str] = set()
        self.store = store
        self.tracking = tracking
        #: server.log_address_privacy for the addresses this writes to the service log (the
        #: Relay sets it at start and at every reload); None: as they are
        self.log_privacy: Any = None
        self.node_id = node_id or str(config.server.name)
        self.clock = clock
        self.scan_interval = scan_interval
        self.lease_seconds = lease_seconds
        self.stop_grace = stop_grace
        self.delivery_timeout = delivery_timeout
        #: messages per store page in resubmit_unreachable (tests make it small)
        self.resubmit_page_size = RESUBMIT_PAGE_SIZE
        #: This relay's SMTP listeners (ip, port): a next hop among them is a mail loop.
        self.local_endpoints: set[tuple[str, int]] = set()
        #: Set once local_endpoints holds the listeners (at once, unless the relay clears it
        #: before start: see `wait_for_listeners`); no message is routed before.
        self.endpoints_known = asyncio.Event()
        self.endpoints_known.set()
        #: This relay's host names: an MX host named so is looked up whatever the cap on MX hosts.
        self.local_names = own_host_names(config)
        self.schedule = RetrySchedule.from_config(config.queue)
        self._resolver_fixed = resolver is not None
        self.resolver = resolver or Resolver.from_config(config)
        self.signer = build_signer(config)
        self.token_providers = _build_token_providers(config, {})
        self.pool: ConnectionPool | None = None
        #: HTTP clients of the Graph send connectors, made at the first Graph delivery
        self.graph: GraphTransport | None = None
        self._wake = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._last_purge = 0.0
        self._last_renew = 0.0
        self._rescan = False
        #: Why the store refuses to lease (its ClockSkewError: this node's clock is off the
        #: cluster's), None while it leases. New messages are stored unleased meanwhile, for the
        #: nodes whose clocks agree; /healthz says degraded and /metrics has the gauge.
        self.clock_skew: str | None = None
        #: while a scan runs: the messages whose delivery ended since it called lease_due
        self._ended_during_scan: set[str] | None = None
        #: send budgets the store said are spent, until when: no store call for them meanwhile
        #: (slots only free with time; a reload that changes limits forgets these)
        self._paced_until: dict[str, SendWait] = {}
        #: messages held back per budget since its last granted reservation (see _retry_at)
        self._paced_count: dict[str, int] = {}
        #: (queue id, note) of the signing decisions already in the tracking log, oldest first
        #: and bounded (see _track_signing)
        self._signing_logged: dict[tuple[str, str], None] = {}
        #: Counters for /metrics (monotonic since start).
        self.stats: dict[str, int] = {
            "attempts": 0,
            "delivered": 0,
            "deferred": 0,
            "failed": 0,
            "paced": 0,
            "expired": 0,
            "ndr": 0,
            "delay_notices": 0,
            "loop_errors": 0,
        }

    # ------------------------------------------------------------------------------ lifecycle

    @property
    def running(self) -> bool:
        return self._loop_task is not None and not self._loop_task.done()

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    async def start(self) -> None:
        if self.running:
            return
        self._stopping = False
        self.pool = ConnectionPool()
        await self._load_tls_contexts()
        self._loop_task = asyncio.create_task(self._run(), name="relaygate-queue-manager")

    async def _load_tls_contexts(self) -> None:
        """Build the send connectors' client TLS contexts now, in a thread: one that validates
        certificates loads the system's trust store (~20 ms), which would otherwise block the
        event loop, every session included, at the connector's first delivery. A client
        certificate (tls_certificate_file) is read again here, so a reload takes up a renewed
        one under the same file names."""
        for connector in self.config.send_connectors:
            try:
                await asyncio.to_thread(load_tls_context, connector)
            # ssl.SSLError is an OSError. The same failure is reported again at delivery.
            except (OSError, ValueError) as exc:
                log.warning("send connector %s: its TLS context: %s", connector.name, exc)

    def wait_for_listeners(self) -> None:
        """Route nothing until `listeners_open`: the relay starts the queue manager before its
        listeners, and a message due at start routed in between had no loop detection (a smart
        host or MX that is this relay, or a sibling worker already listening there)."""
        self.endpoints_known.clear()

    def listeners_open(self, endpoints: set[tuple[str, int]]) -> None:
        """This relay's listeners are `endpoints`: loop detection knows them; routing starts."""
        self.local_endpoints = endpoints
        self.endpoints_known.set()

    async def stop(self) -> None:
        """Stop scanning; let deliveries in flight finish (``stop_grace`` s), cancel the rest."""
        self._stopping = True
        self._wake.set()
        self.endpoints_known.set()  # a loop still waiting for the listeners ends
        if self._loop_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        tasks = list(self._inflight.values()) + list(self._background)
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self.stop_grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        if self.pool is not None:
            with contextlib.suppress(Exception):
                await self.pool.aclose()
            self.pool = None
        if self.graph is not None:
            with contextlib.suppress(Exception):
                await self.graph.aclose()
            self.graph = None

    def cut_deliveries(self) -> None:
        """Stop now (a second SIGTERM): cancel the deliveries in flight, as `stop` does to those
        still running after ``stop_grace``. Their messages stay queued under this node's lease,
        which the next start drops; one the next hop took before the cut is sent again."""
        self._stopping = True  # none starts from now on, and `stop` has no grace left to give
        self.stop_grace = 0.0
        for task in [*self._inflight.values(), *self._background]:
            task.cancel()

    # ------------------------------------------------------------------------------ control

    def _has_room(self) -> bool:
        return self.running and not self._stopping and len(self._inflight) < self.max_concurrent

    def lease_for_new(self) -> tuple[str, float] | None:
        """The lease a receiving session stores a new message with when this manager has room to
        deliver it at once (see :meth:`take_new`); None: store it unleased, the scan finds it."""
        if not self._has_room() or self.clock_skew is not None:
            return None
        return (self.node_id, self.clock() + self.lease_seconds)

    def take_new(self, msg: StoredMessage, data: bytes) -> None:
        """Deliver a message this process has just stored leased to us, with the bytes the
        session still holds: no ``lease_due`` scan and no read of the data back (Postfix's
        cleanup hands the queue file to qmgr the same way). If the room has gone meanwhile the
        message keeps its lease, and our next scan (which re-leases our own messages) delivers
        it as soon as a delivery ends."""
        if not self._has_room():
            # Not released: a scan of ours may already have leased it from the row as it was,
            # and would deliver it while the lease was gone, so another node could as well
            # (3 of 4,100 messages delivered twice at 50 sessions, docs/benchmarks.md).
            self._rescan = True
            self._wake.set()
            return
        task = asyncio.create_task(self._process(msg, data), name=f"deliver-{msg.queue_id}")
        self._inflight[msg.queue_id] = task
        task.add_done_callback(functools.partial(self._done, msg.queue_id))

    def wake(self, queue_id: str | None = None) -> None:
        """Scan the queue now (a new message, a retry or resume by the administrator...)."""
        self._wake.set()

    @property
    def resolver_fixed(self) -> bool:
        """The resolver was given at construction (tests): a reload keeps it."""
        return self._resolver_fixed

    def apply(self, config: Any, *, signer: Any, resolver: Resolver | None = None) -> None:
        """Take a reloaded configuration. Unreachable recipients are resubmitted at once (a new
        send connector may route them), as Exchange resubmits its Unreachable queue.

        signer: `build_signer` of ``config``, built by the caller off the event loop (its key
        files are read and parsed there), so that taking the reload does not stall sessions.
        resolver: ``Resolver.from_config(config)``, built by the caller off the event loop for
        the same reason (a host name in dns_servers is looked up); None: built here."""
        providers = _build_token_providers(config, self.token_providers)
        renewed = any(self.token_providers.get(name) is not p for name, p in providers.items())
        if self.pool is not None and (
            renewed or config.send_connectors != self.config.send_connectors
        ):
            # Sessions opened under the old send connectors (their TLS, AUTH, credentials: a
            # renewed certificate credential too) must not carry mail under the new ones: a new
            # pool; the old one quits its idle sessions, and those still delivering are closed
            # when they come back to it.
            old, self.pool = self.pool, ConnectionPool()
            self._spawn(old.aclose())
        if self.graph is not None and config.send_connectors != self.config.send_connectors:
            old_graph, self.graph = self.graph, None  # a new CA file or endpoint: new clients
            self._spawn(old_graph.retire())  # once its deliveries in flight are over
        if config.queue.lease_duration != self.config.queue.lease_duration:
            self.lease_seconds = config.queue.lease_duration.total_seconds()
        limits_changed = _pacing_limits(config) != _pacing_limits(self.config)
        self.config = config
        self.local_names = own_host_names(config)
        self.schedule = RetrySchedule.from_config(config.queue)
        if not self._resolver_fixed:
            self.resolver = resolver if resolver is not None else Resolver.from_config(config)
        self.signer = signer
        self.token_providers = providers
        if limits_changed:
            self._paced_until.clear()
            self._paced_count.clear()
        if self.running:
            self._spawn(self._load_tls_contexts())
            self._spawn(self.resubmit_unreachable(paced=limits_changed))
        self.wake()

    async def resubmit_unreachable(self, *, paced: bool = False) -> int:
        """``retry_now`` every message with a recipient in the Unreachable queue (``paced``: or
        held back by a send connector's pacing limit, whose limits a reload changed); how many.
        The whole queue, ``resubmit_page_size`` messages at a time in queue-id order (a message
        that arrives meanwhile is routed by the new configuration anyway)."""
        count = 0
        after: str | None = None
        page_size = max(1, self.resubmit_page_size)
        while True:
            page = await self.store.list_messages(limit=page_size, status="Retry", after=after)
            for msg in page:
                if any(
                    is_unreachable(r)
                    or (paced and r.status in PENDING_STATUSES and pacing.is_paced(r.last_error))
                    for r in msg.recipients
                ):
                    with contextlib.suppress(KeyError):
                        await self.store.retry_now(msg.queue_id)
                        count += 1
            if len(page) < page_size:
                break
            after = page[-1].queue_id
            if count:
                self.wake()  # deliveries start while the walk goes on
            await asyncio.sleep(0)  # the loop serves SMTP sessions between pages
        if count:
            self.wake()
        return count

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_task_error)


def _pacing_limits(config: Any) -> dict[str, tuple[Any, ...]]:
    """Each send connector's pacing limits and overflow connector, by budget key (to see
    whether a reload changed any)."""
    return {
        pacing.budget_key(c): (
            *pacing.limits_for(c),
            str(getattr(c, "overflow_connector", "") or "").lower(),
        )
        for c in config.send_connectors
    }


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("queue manager background task failed: %r", exc)


def own_host_names(config: Any) -> frozenset[str]:
    """The names this relay goes by: server.fqdn and each connector's fqdn (lower case)."""
    connectors = (*config.receive_connectors, *config.send_connectors)
    names = [config.server.fqdn, *(getattr(c, "fqdn", None) for c in connectors)]
    return frozenset(n.strip().rstrip(".").lower() for n in names if n and n.strip())
