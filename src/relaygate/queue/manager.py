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
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from relaygate import replies
from relaygate.delivery.client import (
    CREDENTIALS_MISSING,
    ConnectionPool,
    deliver,
    load_tls_context,
)
from relaygate.delivery.credentials import Credentials, CredentialsError
from relaygate.delivery.dns import Resolver
from relaygate.delivery.graph import OFF_LOOP_OCTETS as GRAPH_OFF_LOOP_OCTETS
from relaygate.delivery.graph import GraphTransport, graph_mailbox, graph_scope, is_graph
from relaygate.delivery.graph import refusal as graph_refusal
from relaygate.delivery.nexthop import NextHopError, resolve_next_hops
from relaygate.delivery.oauth import TokenProvider, build_token_provider
from relaygate.delivery.routing import (
    DELIVERY_GRAPH,
    DELIVERY_SMART_HOST,
    RouteKey,
    RouteTable,
    domain_of,
    explain_route,
    route_key_for,
)
from relaygate.delivery.send_as import rewrite_headers
from relaygate.delivery.wire import prepare_data
from relaygate.queue import pacing
from relaygate.queue.bounce import (
    DsnRecipient,
    build_dsn,
    header_block,
    header_value,
    notify_allows,
    original_recipients,
)
from relaygate.queue.model import (
    DSN_ENVID,
    LINE_BREAKS,
    LINE_BREAKS_CRLF,
    NO_REPORTS_TO_SENDER,
    NOT_SIGNED,
    PENDING_STATUSES,
    SMTPUTF8,
    Envelope,
    GraphDraft,
    RecipientState,
    RecipientStatus,
    SendWait,
    StoredMessage,
)
from relaygate.queue.retry import RetrySchedule
from relaygate.queue.store import (
    ClockSkewError,
    CorruptMessageError,
    Store,
    StoreClosedError,
    StoreError,
)
from relaygate.replies import Reply

__all__ = [
    "DELIVERY_FAILED_INTERNAL",
    "QueueManager",
    "RouteResult",
    "classify",
    "is_unreachable",
]

log = logging.getLogger("relaygate.queue")

from relaygate.replies import DELIVERY_FAILED_INTERNAL, DELIVERY_PENDING  # noqa: E402

DELIVERED = "delivered"
DEFERRED = "deferred"
FAILED = "failed"
#: Not attempted: the send connector's pacing budget is spent (see relaygate.queue.pacing). The
#: recipient waits (Retry) until RouteResult.retry_at; its attempts are not counted.
PACED = "paced"
#: Messages read from the store per page when the queue is walked whole (resubmitting the
#: Unreachable queue after a reload): keyset pages (``after`` = the last queue id), so a queue of
#: any size is gone through without holding it in memory, the event loop served between pages.
RESUBMIT_PAGE_SIZE = 1000


def classify(reply: Reply) -> str:
    """``delivered`` (2xx/3xx), ``deferred`` (4xx) or ``failed`` (5xx)."""
    if reply.is_positive:
        return DELIVERED
    if reply.is_transient:
        return DEFERRED
    return FAILED


def is_unreachable(recipient: RecipientState) -> bool:
    """A pending recipient waiting in the Unreachable queue (no send connector matches it)."""
    return (
        recipient.status in PENDING_STATUSES and recipient.last_error == replies.NO_NEXT_HOP.line()
    )


@dataclass(frozen=True, slots=True)
class RouteResult:
    """The outcome of one attempt for one recipient."""

    address: str
    reply: Reply
    outcome: str  # delivered | deferred | failed | paced
    connector: str = ""
    remote_host: str = ""
    remote_ip: str = ""
    source: str = "SMTP"  # the tracking-log source: SMTP, ROUTING, DNS, QUEUE
    #: paced: when the send connector's window has room again; deferred: not before then
    #: (Microsoft Graph's Retry-After)
    retry_at: float | None = None


def _split_hop(label: str | None) -> tuple[str, str]:
    """``host[ip]:port`` / ``[ip]:port`` → (host, ip)."""
    if not label:
        return "", ""
    host, _, rest = label.partition("[")
    ip = rest.partition("]")[0]
    return host or ip, ip


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


class QueueManager:
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

    @property
    def max_concurrent(self) -> int:
        return max(1, int(self.config.queue.max_concurrent_deliveries))

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

    async def stop(self) -> None:
        """Stop scanning; let deliveries in flight finish (``stop_grace`` s), cancel the rest."""
        self._stopping = True
        self._wake.set()
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

    # ------------------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                with contextlib.suppress(ClockSkewError):  # said once, by _lease_due
                    # Refused scans must not stop the deliveries in flight from renewing their
                    # leases: another node would take those messages and deliver them too.
                    await self._scan()
                await self._renew_leases()
                await self._housekeeping()
            except StoreClosedError:
                if self._stopping:
                    break
                log.error("queue store is closed; the queue manager waits")
            except StoreError as exc:  # the database is down or full: say why, once a scan
                self.stats["loop_errors"] += 1
                log.error("queue scan failed: %s", exc)
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

    async def _process(self, msg: StoredMessage, data: bytes | None = None) -> None:
        released = False
        try:
            released = await self.process_message(msg, data)
        except asyncio.CancelledError:
            raise
        except StoreClosedError:
            log.warning("message %s: the store closed during delivery", msg.queue_id)
        except Exception:
            log.exception("message %s: delivery run failed", msg.queue_id)
        finally:
            if not released:
                with contextlib.suppress(Exception):
                    await self.store.release(msg.queue_id, self.node_id)

    # ------------------------------------------------------------------------------ one message

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
                return False

        routes = self._routes
        if routes is None or routes.source is not self.config.send_connectors:
            routes = self._routes = RouteTable(self.config.send_connectors)  # new configuration
        groups = routes.route([r.address for r in due], size=msg.size)
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

        async def run_route(key: RouteKey, addrs: list[str]) -> None:
            # Each route's outcome is recorded as soon as it is known: a crash or a stop while
            # another route is still in progress never causes a resend to these recipients.
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
        await self._maybe_delay_notice(msg, by_addr, pending, deferred, data)
        return release

    async def _sent_as(
        self, msg: StoredMessage, data: bytes, crlf_only: bool, groups: Any
    ) -> dict[str, bytes]:
        """The bytes for the routes whose send connector has ``send_as``, by that address: From
        and Sender rewritten (relaygate.delivery.send_as), then signed as that sender."""
        out: dict[str, bytes] = {}
        for key in groups:
            send_as = _send_as(key)
            if send_as and send_as not in out:
                rewritten = rewrite_headers(prepare_data(data, crlf_only=crlf_only), send_as)
                if self.signer is not None:
                    rewritten = await self._sign(msg, rewritten, envelope_sender=send_as)
                out[send_as] = rewritten
        return out

    async def _sign(
        self, msg: StoredMessage, data: bytes, *, envelope_sender: str | None = None
    ) -> bytes:
        refused = msg.metadata.get(NOT_SIGNED)
        if refused:  # received from a client that may not send as the organisation
            self._track_signing(msg, data, f"DKIM unsigned: not signed: {refused}")
            return data
        sender = msg.sender if envelope_sender is None else envelope_sender
        try:
            result = await asyncio.to_thread(self.signer.sign, data, envelope_sender=sender)
        except Exception:
            log.exception("message %s: DKIM signing failed; sent unsigned", msg.queue_id)
            return data
        if result.signed:
            info = f"DKIM signed d={result.domain} s={result.selector}"
        else:
            info = f"DKIM unsigned: {result.reason}"
            # DEBUG, not INFO: at INFO every message from a domain without a key wrote a service
            # log line (thousands an hour from a busy printer domain); the tracking log has it.
            log.debug("message %s: %s", msg.queue_id, result.reason)
        self._track_signing(msg, data, info)
        return bytes(result.data)

    def _track_signing(self, msg: StoredMessage, data: bytes, info: str) -> None:
        """Every signing decision goes to the tracking log (AGENTINFO, as Exchange's agents do),
        so `relaygate trace` answers "why did this arrive unsigned?"."""
        self.track(
            "AGENTINFO",
            "AGENT",
            msg,
            recipients=[r.address for r in msg.recipients],
            recipient_status=[],
            data=data,
            custom_data=info,
        )

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
                reply = explain_route(self.config.send_connectors, a, size=msg.size).reply
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
            hops = await resolve_next_hops(
                connector,
                domain_of(addrs[0]),
                self.resolver,
                local_endpoints=self.local_endpoints,
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
                limit is not None and msg.size is not None and msg.size > limit
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
                    hops = await resolve_next_hops(
                        connector,
                        domain_of(group[0]),
                        self.resolver,
                        local_endpoints=self.local_endpoints,
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

    async def _send(
        self,
        msg: StoredMessage,
        connector: Any,
        hops: Any,
        credentials: Any,
        addrs: list[str],
        data: bytes,
        crlf_only: bool,
    ) -> list[RouteResult]:
        """One SMTP transaction for ``addrs`` through the route's next hops."""
        name = str(connector.name)
        helo = getattr(connector, "fqdn", None) or self.config.server.fqdn
        outcome_ = await deliver(
            hops,
            connector=connector,
            helo_name=helo,
            sender=getattr(connector, "send_as", "") or msg.sender,
            recipients=addrs,
            data=data,
            credentials=credentials,
            timeout=self.delivery_timeout,
            pool=self.pool,
            crlf_only=crlf_only,
            size=msg.size,
            smtputf8=msg.metadata.get(SMTPUTF8) == "1",
            log_privacy=self.log_privacy,
        )
        host, ip = _split_hop(outcome_.hop_used)
        if not host and outcome_.transcript_errors:
            host, ip = _split_hop(outcome_.transcript_errors[0].partition(": ")[0])
        out = []
        for a in addrs:
            reply = outcome_.per_recipient.get(a, DELIVERY_FAILED_INTERNAL)
            out.append(RouteResult(a, reply, classify(reply), name, host, ip))
        return out

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

    async def _maybe_delay_notice(
        self,
        msg: StoredMessage,
        attempted: dict[str, RecipientState],
        pending: list[RecipientState],
        deferred: list[RouteResult],
        data: bytes,
    ) -> None:
        """One delay notice for the recipients still pending past delay_notification_timeout."""
        now = self.clock()
        if not self.schedule.delay_notice_due(msg.received_at, now, msg.delay_notified):
            return
        notice = [
            DsnRecipient(r.address, r.reply, r.remote_host, last_attempt=now) for r in deferred
        ]
        notice += [
            DsnRecipient(r.address, _last_reply(r), last_attempt=r.last_attempt)
            for r in pending
            if r.address not in attempted
        ]
        if not notice:
            return
        await self.send_dsn(msg, data, notice, action="delayed")
        with contextlib.suppress(KeyError):
            await self.store.set_flags(msg.queue_id, delay_notified=True)

    async def _expire(self, msg: StoredMessage, pending: list[RecipientState]) -> None:
        now = self.clock()
        try:
            data = await self.store.read_data(msg.queue_id, size=msg.size)
        except KeyError:
            return
        except CorruptMessageError:
            data = b""
        reply = replies.QUEUE_EXPIRED
        await self.send_dsn(
            msg,
            data,
            [
                DsnRecipient(r.address, reply, last_attempt=r.last_attempt, last_error=r.last_error)
                for r in pending
            ],
            action="failed",
        )
        await self.store.record_results(
            msg.queue_id,
            self.node_id,
            [
                RecipientState(r.address, RecipientStatus.FAILED, r.attempts, reply.line(), now)
                for r in pending
            ],
        )
        self.stats["expired"] += len(pending)
        self.stats[FAILED] += len(pending)
        self.track(
            "FAIL",
            "QUEUE",
            msg,
            recipients=[r.address for r in pending],
            recipient_status=[reply.line()] * len(pending),
            data=data,
        )
        log.info(
            "message %s expired after %s; NDR for %d recipient(s)",
            msg.queue_id,
            self.config.queue.message_expiration_timeout,
            len(pending),
        )

    # ------------------------------------------------------------------------------ reports

    def postmaster(self) -> str:
        """The reports' From: the default accepted domain's postmaster (signed with its key)."""
        return str(self.config.postmaster)

    def _report_to(self, msg: StoredMessage, action: str) -> list[str]:
        """Where a report about ``msg`` goes: its sender, and the admin for an NDR. A sender the
        client's connector may not send to (allowed_recipients) hears nothing: the report would
        carry what the client wrote to an address of its choosing."""
        to = [] if msg.metadata.get(NO_REPORTS_TO_SENDER) == "1" else [msg.sender]
        admin = (self.config.queue.admin_notification_address or "").strip()
        if action == "failed" and admin and admin.lower() not in (t.lower() for t in to):
            to.append(admin)
        return to

    async def send_dsn(
        self,
        msg: StoredMessage,
        data: bytes,
        recipients: Sequence[DsnRecipient],
        *,
        action: str = "failed",
    ) -> str | None:
        """Store a report about ``msg`` and wake the loop; its queue id, or None when none is due
        (null sender, no recipients, or none whose NOTIFY asks for it). NDRs (``failed``) are
        copied to admin_notification_address (a copy of what is sent, as Exchange's
        GenerateCopyOfDSNFor: none for NOTIFY=NEVER)."""
        if not recipients:
            return None
        kind = "non-delivery" if action == "failed" else "delay"
        if msg.sender in ("", "<>"):
            log.info(
                "message %s from <>: no %s report (never to the null sender)", msg.queue_id, kind
            )
            return None
        recipients = _reported(msg, recipients, action)
        if not recipients:
            log.info("message %s: no %s report (its recipients' NOTIFY)", msg.queue_id, kind)
            return None
        to = self._report_to(msg, action)
        if not to:
            log.info(
                "message %s: no %s report: its sender is not in allowed_recipients of connector %s",
                msg.queue_id,
                kind,
                msg.connector,
            )
            return None
        fqdn = self.config.server.fqdn
        body = build_dsn(
            action=action,
            reporting_mta=fqdn,
            to=msg.sender,
            original=data,
            recipients=recipients,
            received_at=msg.received_at,
            queue_id=msg.queue_id,
            will_retry_until=self.schedule.expires_at(msg.received_at),
            now=self.clock(),
            postmaster=self.postmaster(),
            envelope_id=msg.metadata.get(DSN_ENVID, ""),
        )
        message_id = header_value(body, "Message-ID")
        metadata = {"dsn": action, "original_queue_id": msg.queue_id}
        if not header_block(body).isascii():
            # A UTF-8 sender is in the report's To (RFC 6532): like a client's UTF-8 header, it
            # goes only to a next hop that offers SMTPUTF8 (RFC 6531 §3.2), never as 8-bit junk.
            metadata[SMTPUTF8] = "1"
        envelope = Envelope(
            sender="",
            recipients=to,
            helo=fqdn,
            message_id=message_id,
            metadata=metadata,
        )
        queue_id = await self.store.submit(envelope, body)
        self.stats["ndr" if action == "failed" else "delay_notices"] += 1
        self._write(
            "DSN",
            "DSN",
            internal_message_id=queue_id,
            message_id=message_id,
            recipients=to,
            # ", " between the addresses: ";" separates the field's values (one per recipient)
            recipient_status=[f"{action}: " + ", ".join(r.address for r in recipients)] * len(to),
            sender="",
            return_path="",
            total_bytes=len(body),
            reference=msg.message_id,
            related_recipient_address=";".join(r.address for r in recipients),
            message_subject=header_value(body, "Subject"),
            message_info=msg.queue_id,
        )
        privacy = self.log_privacy
        log.info(
            "message %s: %s report %s to %s",
            msg.queue_id,
            "non-delivery" if action == "failed" else "delay",
            queue_id,
            ", ".join(to) if privacy is None else privacy.text(", ".join(to)),
        )
        self.wake(queue_id)
        return queue_id

    # ------------------------------------------------------------------------------ tracking

    def _write(self, event_id: str, source: str, **fields: Any) -> None:
        if self.tracking is None:
            return
        try:
            self.tracking.write(event_id, source, **fields)
        except Exception:  # the log must never stop mail
            log.exception("message tracking log write failed")

    def track(
        self,
        event_id: str,
        source: str,
        msg: StoredMessage,
        *,
        recipients: Iterable[str],
        recipient_status: Iterable[str],
        data: bytes = b"",
        **fields: Any,
    ) -> None:
        """Write one tracking event about ``msg``."""
        self._write(
            event_id,
            source,
            internal_message_id=msg.queue_id,
            message_id=msg.message_id,
            recipients=list(recipients),
            recipient_status=list(recipient_status),
            sender=msg.sender,
            return_path=msg.sender,
            total_bytes=msg.size,
            message_subject=header_value(data, "Subject") if data else "",
            **fields,
        )

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


def _reported(
    msg: StoredMessage, recipients: Sequence[DsnRecipient], action: str
) -> list[DsnRecipient]:
    """The recipients whose NOTIFY asks for a report of ``action``, with the ORCPT they were
    given with (RFC 3461, honoured though DSN is not advertised)."""
    orcpts = original_recipients(msg.metadata)
    return [
        replace(r, original_recipient=orcpts.get(r.address, "")) if r.address in orcpts else r
        for r in recipients
        if notify_allows(msg.metadata, r.address, action)
    ]


def _send_as(key: RouteKey) -> str:
    """The ``send_as`` of a route's send connector ("" for none, and for the Unreachable queue)."""
    return "" if key.is_unreachable else str(getattr(key.connector, "send_as", "") or "")


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


def _last_reply(recipient: RecipientState) -> Reply:
    """A stored ``last_error`` line back as a Reply."""
    code, _, rest = recipient.last_error.partition(" ")
    if not code.isdigit():
        return DELIVERY_PENDING
    enhanced, _, text = rest.partition(" ")
    if enhanced[:1].isdigit() and enhanced.count(".") == 2:
        return Reply(int(code), enhanced, text)
    return Reply(int(code), "", rest)


def _log_task_error(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.error("queue manager background task failed: %r", exc)
