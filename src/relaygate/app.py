"""Composition root: Config → store, logs, SMTP listeners, queue manager, admin centre; signals; shutdown.

Start order: store → logs → queue manager → listeners → admin; the queue manager routes no
message before the listeners are open (loop detection needs them). Shutdown runs in reverse:
listeners stop accepting first, sessions get a grace period, then deliveries, then the store
closes.

With ``server.workers = N > 1`` `run` hands over to the supervisor (`relaygate.workers`), which
starts N copies of this node as worker processes (``worker_index`` 0..N-1): each binds the same
endpoints with SO_REUSEPORT, has its own store connection, logs and queue manager (lease owner
``<server.name>-w<i>``); only worker 0 runs the admin listener.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaygate.acme import AcmeManager, acme_enabled, acme_files
from relaygate.acme import reconcile as reconcile_acme
from relaygate.admin.server import AdminServer, AdminStartError
from relaygate.admin.token_file import applied_token_path, keep_applied_token
from relaygate.certificates import CertificateExpiry, read_expiries
from relaygate.config import Config, ConfigError, load_config
from relaygate.delivery.dns import Resolver
from relaygate.dkim.keys import rsa_key_sizes
from relaygate.durable_dirs import make_dirs_durably
from relaygate.fd_limit import raise_fd_limit
from relaygate.logs.privacy import (
    AddressPrivacy,
    PrivacyKeyError,
    key_mode_warning,
    privacy_for,
)
from relaygate.logs.service import READY_FLUSH_TIMEOUT, buffer_stderr, flush_stderr
from relaygate.logs.service import apply_config as apply_service_log
from relaygate.logs.service import configure as configure_service_log
from relaygate.logs.tracking import MESSAGE_TRACKING_DIR, TrackingLog
from relaygate.malloc_tuning import tune_malloc
from relaygate.node_connections import NodeConnectionLimits, NodeConnections
from relaygate.node_lock import NodeLock, NodeLockError
from relaygate.queue.manager import QueueManager, build_signer
from relaygate.queue.pressure import DiskPressure
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import Store, StoreError
from relaygate.sd_notify import Notifier, watchdog_interval
from relaygate.smtp.auth import UsersFileError
from relaygate.smtp.server import (
    ListenerError,
    ServerContext,
    SmtpServer,
    load_starttls_contexts,
    protocol_log_for,
)
from relaygate.smtp.shared_rates import SharedRateTable
from relaygate.worker_stats import NodeSums, SnapshotWriter

__all__ = ["Relay", "open_store", "run", "worker_node_id"]

logger = logging.getLogger("relaygate")


def open_store(config: Config, *, shared: bool = False) -> Store:
    """The configured queue store; ``shared``: other processes (workers) write to it too."""
    if config.queue.store == "postgresql":  # several nodes share it (validated: a URL is set)
        from relaygate.queue.pg_store import PostgresStore

        return PostgresStore(config.queue.database_url)
    return SqliteStore(Path(config.server.data_dir) / "queue" / "queue.db", shared_writers=shared)


def tracking_log_for(config: Config, privacy: AddressPrivacy | None = None) -> TrackingLog:
    s = config.server
    return TrackingLog(
        Path(s.data_dir) / MESSAGE_TRACKING_DIR,
        server_name=s.name,
        max_file_size=s.message_tracking_log_max_file_size,
        max_directory_size=s.message_tracking_log_max_directory_size,
        max_age=s.message_tracking_log_max_age,
        privacy=privacy,
        subject_logging=s.message_tracking_log_subject_logging_enabled,
    )


def log_privacy_for(config: Config) -> AddressPrivacy | None:
    """The address rewriting of ``server.log_address_privacy`` (its key created if need be), or
    None. Raises PrivacyKeyError, naming the key file, when the key cannot be had."""
    s = config.server
    return privacy_for(s.log_address_privacy, Path(s.data_dir), create_key=True)


def worker_node_id(server_name: str, index: int) -> str:
    """The queue lease owner of worker ``index``: ``<server.name>-w<index>``."""
    return f"{server_name}-w{index}"


def worker_node_ids(server_name: str) -> list[str]:
    """Every lease owner a worker of this node can have (``server.workers`` is at most 64)."""
    from relaygate.config.model import MAX_WORKERS

    return [worker_node_id(server_name, i) for i in range(MAX_WORKERS)]


class Relay:
    """One running RelayGate node, or one worker process of it (``worker_index`` 0..N-1)."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        worker_index: int | None = None,
        config_stamp: tuple[int, int] | None = None,
        config_digest: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        #: A supervised worker's: the digest of the configuration text its supervisor handed it
        #: and it runs (relaygate.workers.handed_config). Such a worker reloads the text its
        #: supervisor offers, never the file, which it does not watch. None: reads the file.
        self.config_digest = config_digest
        # The file as `config` was read from it (`config_stamp`, taken before it was read; else
        # near enough: now): the watcher compares against this, so an edit made while the relay
        # starts (it may wait for the node lock for minutes) is not missed.
        if config_stamp is None and config_path is not None:
            config_stamp = _stamp(config_path)
        self._config_stamp = config_stamp
        self.worker_index = worker_index
        from relaygate.workers import started_again

        #: A worker its supervisor started again (not at the node's start): what the node's
        #: files no longer load (an admin or implicit-TLS pair) is done without, not fatal.
        self.started_again = worker_index is not None and started_again()
        self.store = open_store(config, shared=worker_index is not None)
        self.tracking: TrackingLog | None = None
        self.protocol_log: Any = None
        #: server.log_address_privacy's rewriting of log addresses (None: "none")
        self.log_privacy: AddressPrivacy | None = None
        self.ctx: ServerContext | None = None
        self.server: SmtpServer | None = None
        self.manager: Any = None
        self.admin: Any = None
        self.pressure: DiskPressure | None = None
        self.snapshots: SnapshotWriter | None = None
        #: worker 0 of several: the other workers' figures for /metrics (relaygate.worker_stats)
        self.node_sums: NodeSums | None = None
        #: the expiry dates of the certificates of the config (certificates.py), read at start and
        #: on reload: /metrics and the admin centre's findings (not read per scrape)
        self.certificates: tuple[CertificateExpiry, ...] = ()
        #: the bits of each enabled RSA DKIM key by [[dkim]] index, for the admin's findings
        self.dkim_key_sizes: dict[int, int] = {}
        #: the ACME client (relaygate.acme) when this process runs it: a node of one process
        #: (a supervisor runs it for its workers)
        self.acme: AcmeManager | None = None
        #: Whether the node's admin centre runs (in worker 0 when there are several: the
        #: listener is opened at start, admin.enabled edited waits for a restart)
        self.admin_in_node = config.admin.enabled
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        make_dirs_durably(Path(cfg.server.data_dir))
        self.log_privacy = log_privacy_for(cfg)  # PrivacyKeyError: cannot start
        await self.store.open()
        s = cfg.server
        if self.worker_index is None:
            # A single process owns every lease of this node: drop those a previous run with
            # `server.workers > 1` left behind instead of waiting for them to expire.
            release_owners = getattr(self.store, "release_owners", None)
            if release_owners is not None:
                await release_owners(worker_node_ids(str(s.name)))
        self.protocol_log = protocol_log_for(cfg, self.log_privacy)
        if s.message_tracking_log_enabled:
            self.tracking = tracking_log_for(cfg, self.log_privacy)
        self.manager = QueueManager(
            cfg,
            self.store,
            tracking=self.tracking,
            node_id=self.node_id,
            lease_seconds=cfg.queue.lease_duration.total_seconds(),
        )
        self.manager.log_privacy = self.log_privacy
        wake = self.manager.wake
        # The STARTTLS contexts are built now, in a thread, not by the first STARTTLS on the event
        # loop: an ACME pair is read under its lock, which the ACME client (the supervisor's,
        # with workers) holds for seconds while it writes and fsyncs a renewal.
        tls = await asyncio.to_thread(load_starttls_contexts, cfg)
        self.ctx = self._server_context(
            cfg, protocol_log=self.protocol_log, tracking=self.tracking, on_message=wake, tls=tls
        )
        self.ctx.handoff = self.manager
        if self.worker_index == 0 and cfg.server.workers > 1:  # before any session: the
            # other workers' counters from here on (their figures now, if this is a restart)
            self.node_sums = NodeSums(Path(s.data_dir), cfg.server.workers, 0)
        if self.worker_index is not None:
            # The message rate and AUTH failure counts this worker shares with its siblings (None when started
            # without a supervisor's table: then counted in this process, as with one worker).
            self.ctx.rates.shared = self.ctx.auth_failures.shared = SharedRateTable.from_env()
            await self._count_connections_for_the_node(self.ctx, self.worker_index)
        queue_dir = Path(s.data_dir) / "queue"
        self.pressure = DiskPressure(
            queue_dir if queue_dir.is_dir() else Path(s.data_dir), cfg.queue.min_free_disk_space
        )
        await self.pressure.start()
        self.ctx.pressure = self.pressure
        self.server = SmtpServer(self.ctx, reuse_port=self.worker_index is not None or None)
        self.server.defer_unloadable_tls = self.started_again
        if self.manager is not None:
            self.manager.wait_for_listeners()  # no delivery before loop detection knows them
            await self.manager.start()
        try:
            await self.server.start()
        except BaseException:  # a listener cannot open: stop what started, then report it
            await self.stop()
            raise
        if self.manager is not None:
            self.manager.listeners_open(set(self.server.endpoints))
        if self.worker_index and cfg.server.workers > 1:  # worker 0 sums them for /metrics
            self.snapshots = SnapshotWriter(self, self.worker_index)
            self.snapshots.start()
        if self.worker_index is None and acme_enabled(s):
            # Its thread orders and renews; the new files are picked up by watch_config.
            self.acme = AcmeManager(cfg)
            self.acme.start()
        if cfg.admin.enabled and self.worker_index in (None, 0):
            self.certificates = await asyncio.to_thread(read_expiries, cfg)
            self.dkim_key_sizes = await asyncio.to_thread(rsa_key_sizes, cfg)
            self.admin = AdminServer(self)
            try:
                await self.admin.start()
            except BaseException:  # no token, or the port is taken: stop what started, report it
                await self.stop()
                raise
            await asyncio.to_thread(self._keep_admin_token)
        logger.info(
            "RelayGate %s listening on %s (config %s)",
            s.name,
            ", ".join(f"{h}:{p}" for h, p in self.server.endpoints),
            cfg.source,
        )

    def _server_context(self, cfg: Config, **kwargs: Any) -> ServerContext:
        """The SMTP service's context. A worker of several whose users file cannot be read at
        start (broken by an edit since the node started: its siblings keep the users they
        read) starts with the copy its supervisor keeps of the file as it last could be read,
        and watches that copy (renewed once the file can be read again) until a reload: it
        used to exit, and be started again, over and over. Logged once, naming the file."""
        from relaygate.workers import users_mirror_path

        try:
            return ServerContext(cfg, self.store, **kwargs)
        except UsersFileError as exc:
            mirror = users_mirror_path(Path(cfg.server.data_dir))
            if self.worker_index is None or not mirror.is_file():
                raise
            logger.warning(
                "%s; this worker started again with the users the node last read from it (%s) "
                "until it can be read",
                exc,
                mirror,
            )
            server = dataclasses.replace(cfg.server, users_file=mirror)
            return ServerContext(dataclasses.replace(cfg, server=server), self.store, **kwargs)

    @staticmethod
    async def _count_connections_for_the_node(ctx: ServerContext, worker: int) -> None:
        """A worker counts its open connections in the table its siblings share (None when
        started without a supervisor's table: then in this process, as with one worker),
        starting from none: a worker of the same index before it may have died holding some."""
        table = NodeConnections.from_env()
        if table is None:
            return
        await asyncio.to_thread(table.clear_worker, worker)
        ctx.limits = NodeConnectionLimits(table, worker)

    @property
    def node_id(self) -> str:
        """The queue lease owner: ``server.name``, or ``<server.name>-w<i>`` for worker i."""
        name = str(self.config.server.name)
        return name if self.worker_index is None else worker_node_id(name, self.worker_index)

    async def reload(self) -> None:
        """Re-read the config file; keep running on the old one if the new one is invalid."""
        if self.config_path is None:
            return
        try:
            new, digest = await asyncio.to_thread(self._read_new_config, self.config_path)
        except ConfigError as exc:
            logger.error("reload refused, configuration invalid:\n%s", exc)
            return
        except Exception:  # a loader bug must not stop a running relay: keep the running config
            logger.exception("reload refused, cannot load %s", self.config_path)
            return
        assert self.ctx is not None and self.server is not None
        ctx = self.ctx
        retired: list[TrackingLog] = []
        restart_only: list[str] = []
        if new.server.data_dir != self.config.server.data_dir:
            # The queue, the logs and the node lock stay where they were opened: keys read from a
            # new directory now (log privacy, DKIM, ACME) would not match what the relay keeps
            # writing in the old one. Like queue.store, it takes effect at the next start.
            restart_only.append("server.data_dir")
            server = dataclasses.replace(new.server, data_dir=self.config.server.data_dir)
            new = dataclasses.replace(new, server=server)
        running_balance = self.config.server.worker_balance
        if self.worker_index is not None and new.server.worker_balance != running_balance:
            # The node's, as it started (its supervisor made the open-connection table for it,
            # or not, and says the change waits for a restart): a listener this reload opens
            # is steered, and its connections counted, as the node's others.
            server = dataclasses.replace(new.server, worker_balance=running_balance)
            new = dataclasses.replace(new, server=server)
        try:
            privacy = await asyncio.to_thread(log_privacy_for, new)
        except PrivacyKeyError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        restart_only += [
            f"queue.{key}"
            for key in ("store", "database_url")
            if getattr(new.queue, key) != getattr(self.config.queue, key)
        ]
        if self.worker_index in (None, 0):  # the admin listener's worker
            # The one place that says which admin keys wait for a restart: the listener is bound
            # at start (its address matters only while it runs). The API token (read again
            # below) and metrics_require_token apply now (AdminServer.apply_token).
            running = self.config.admin
            keys = ("enabled", "listen") if self.admin is not None else ("enabled",)
            moved = [k for k in keys if getattr(new.admin, k) != getattr(running, k)]
            restart_only += [f"admin.{key}" for key in moved]
            kept: dict[str, Any] = {
                k: getattr(running, k) for k in ("enabled", "listen") if k in moved
            }
            if self.admin is not None and self.admin.serves_tls != (
                new.admin.tls_certificate_file is not None
            ):
                # HTTPS on or off: the listener's socket is wrapped at start. Certificate files
                # changed while it stays on apply now (AdminServer.apply_tls).
                restart_only.append("admin.tls_certificate_file / admin.tls_key_file (HTTPS)")
                kept["tls_certificate_file"] = running.tls_certificate_file
                kept["tls_key_file"] = running.tls_key_file
            if kept:
                # Until then the config says where the admin listener is, or that there is none
                # (the audit's finding about a listener reachable from the network reads it).
                new = dataclasses.replace(new, admin=dataclasses.replace(new.admin, **kept))
        # ACME on or off applies (the listeners' certificate source follows the new config);
        # the ACME client is started or stopped below, once the reload is applied.
        # Read before anything is applied (a renewed certificate file is what a reload is for).
        certificates = await asyncio.to_thread(read_expiries, new) if self.admin is not None else ()
        dkim_key_sizes = (
            await asyncio.to_thread(rsa_key_sizes, new) if self.admin is not None else {}
        )
        admin_token: str | None = None
        admin_tls: Any = None
        if self.admin is not None:
            # A token file set or changed since the start applies now (it used to wait for a
            # restart while the audit, reading the new config, no longer reported the open API).
            # So does the certificate; a pair that does not load refuses the reload (the running
            # certificate stays) rather than leave the admins without HTTPS.
            try:
                admin_token = await asyncio.to_thread(self.admin.read_token, new)
                admin_tls = await asyncio.to_thread(self.admin.load_tls, new)
            except AdminStartError as exc:
                logger.error("reload refused, keeping the running configuration: %s", exc)
                return
        elif self.worker_index and self.admin_in_node:
            # Worker 0 refuses a reload whose token file or certificate cannot be used: so does
            # every worker, or the node would serve the new configuration from some workers and
            # the old one from the others.
            try:
                await asyncio.to_thread(AdminServer.read_token, new, warn=False)
                await asyncio.to_thread(AdminServer.load_tls, new, warn=False)
            except AdminStartError as exc:
                logger.error("reload refused, keeping the running configuration: %s", exc)
                return

        # The DKIM keys are read and parsed (RSA: tens of ms each) in a thread, before anything is
        # applied: in apply() they stalled every SMTP session. A key that cannot be used is left
        # out and logged (build_signer); a reload refused below leaves this signer unused.
        signer = await asyncio.to_thread(build_signer, new) if self.manager is not None else None
        # The resolver too: a host name in server.dns_servers is looked up when it is built (a
        # blocking call, and one that can fail). In apply() it stalled the loop, and a failure
        # came after the sessions had taken the new file, though the reload said it was refused.
        # Built at every reload, dns_servers changed or not: a new one keeps no DNS answer (the
        # way an operator has an MX record changed at the far end used at once).
        resolver = None
        if self.manager is not None and not self.manager.resolver_fixed:
            try:
                resolver = await asyncio.to_thread(Resolver.from_config, new)
            except (OSError, ValueError) as exc:
                logger.error(
                    "reload refused, keeping the running configuration: server.dns_servers %s: %s",
                    list(new.server.dns_servers),
                    exc,
                )
                return

        # STARTTLS contexts too (file reads, an ACME pair under its lock): not on the event loop.
        tls = await asyncio.to_thread(load_starttls_contexts, new)

        if restart_only:
            logger.warning(
                "%s changed: takes effect when relaygate serve restarts", ", ".join(restart_only)
            )

        def apply() -> None:  # every listener is bound, none of the new ones accepts yet
            apply_service_log(new.server.log_format, new.server.log_level)
            self.config = new
            self.config_digest = digest
            self.certificates = certificates
            self.dkim_key_sizes = dkim_key_sizes
            ctx.apply(new, tls=tls)
            retired.extend(self._apply_logs(new, privacy))
            if self.manager is not None:
                self.manager.apply(new, signer=signer, resolver=resolver)
            if self.pressure is not None:
                self.pressure.apply(new.queue.min_free_disk_space)
            if self.admin is not None:
                self.admin.apply_token(
                    admin_token, metrics_require_token=new.admin.metrics_require_token
                )
                self.admin.apply_tls(admin_tls)

        try:
            await self.server.sync_listeners(new, before_serving=apply)
        except OSError as exc:  # the listeners are as they were; nothing of `new` was applied
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return
        if self.manager is not None:
            # Loop detection knows the listeners as they are now: one added is this relay, one
            # removed (its port perhaps taken by the next hop) no longer is.
            self.manager.local_endpoints = set(self.server.endpoints)
        await asyncio.to_thread(self._keep_admin_token)
        if self.worker_index is None:  # (a supervisor runs the client for its workers)
            # ACME turned on: the client starts; off: it stops; else its settings apply.
            self.acme = await asyncio.to_thread(reconcile_acme, self.acme, new)
        for log in retired:  # message tracking switched off: write what it holds, then close
            await asyncio.to_thread(log.close)
        logger.info("configuration reloaded from %s", self.config_path)

    def _keep_admin_token(self) -> None:
        """Worker 0 of several: the API token its admin centre runs now, for a worker 0 started
        after it whose token file cannot be used (`AdminServer._start_token`). Blocking."""
        if self.worker_index != 0 or self.admin is None or self.admin.app is None:
            return
        data_dir = self.config.server.data_dir
        try:
            keep_applied_token(
                data_dir, self.config.admin.api_token_file, self.admin.app.state.token
            )
        except OSError as exc:  # a restarted worker 0 then needs a usable file, as before
            logger.warning("cannot keep the API token in %s: %s", applied_token_path(data_dir), exc)

    def _read_new_config(self, path: Path) -> tuple[Config, str | None]:
        """The configuration a reload applies: the file, or for a supervised worker the text its
        supervisor offers (with its digest)."""
        if self.config_digest is not None:
            from relaygate.workers import handed_config

            offered = handed_config(path, "offered")
            if offered is not None:
                return offered
        return load_config(path), None

    def _apply_logs(self, new: Config, privacy: AddressPrivacy | None) -> list[TrackingLog]:
        """The log settings of a reloaded config: rotation limits and address privacy in place,
        the tracking log opened or closed (handed to the SMTP service and the queue manager).
        Returns the tracking log to close, if it was switched off."""
        s = new.server
        self.log_privacy = privacy
        if self.protocol_log is not None:
            self.protocol_log.directory.set_limits(
                s.receive_protocol_log_max_file_size,
                s.receive_protocol_log_max_directory_size,
                s.receive_protocol_log_max_age,
            )
            self.protocol_log.set_privacy(privacy)
        retired: list[TrackingLog] = []
        if not s.message_tracking_log_enabled:
            if self.tracking is not None:
                retired.append(self.tracking)
            self.tracking = None
        elif self.tracking is None:
            self.tracking = tracking_log_for(new, privacy)
        else:
            self.tracking.directory.set_limits(
                s.message_tracking_log_max_file_size,
                s.message_tracking_log_max_directory_size,
                s.message_tracking_log_max_age,
            )
            self.tracking.set_privacy(privacy, s.message_tracking_log_subject_logging_enabled)
        if self.ctx is not None:
            self.ctx.tracking = self.tracking
        if self.manager is not None:
            self.manager.tracking = self.tracking
            self.manager.log_privacy = privacy
        return retired

    async def refresh_certificates(self) -> None:
        """The listener certificate files changed (ACME renewed them): new STARTTLS sessions
        and implicit-TLS sockets take them, as a reload does; open sessions keep theirs."""
        if self.ctx is None or self.server is None:
            return
        # Built in a thread: the pair is read under its lock, which the ACME client may still
        # hold (it writes and fsyncs certificate.names after the pair); on the event loop the
        # wait stalled every session. Sessions use the old contexts until the new ones are in.
        while True:
            config = self.ctx.config
            tls = await asyncio.to_thread(load_starttls_contexts, config)
            if self.ctx.config is config:
                break  # (else a reload came meanwhile, perhaps with files read before these)
        self.ctx.refresh_tls(tls)
        try:
            await self.server.sync_listeners()
        except OSError as exc:  # an implicit-TLS socket could not be reopened: as it was
            logger.error("new listener certificate not taken by every listener: %s", exc)
        if self.admin is not None:
            self.certificates = await asyncio.to_thread(read_expiries, self.config)
        logger.info("listener certificate reloaded (ACME)")

    async def watch_admin_certificate(self) -> None:
        """The admin listener's certificate renewed in place: taken as a reload does, and its
        expiry date read again for /metrics and the findings (they showed the old one until
        the next reload)."""
        if self.admin is None:
            return
        try:
            if await self.admin.watch_certificate():
                self.certificates = await asyncio.to_thread(read_expiries, self.config)
        except Exception:  # the watcher must outlive it
            logger.exception("taking the admin listener's new certificate failed")

    async def _open_deferred_listeners(self) -> None:
        """A worker started again while an implicit-TLS certificate could not be loaded: that
        listener is opened once its files changed and load (`SmtpServer.open_deferred`)."""
        if self.server is None:
            return
        try:
            opened = await self.server.open_deferred()
        except Exception:  # the watcher must outlive it
            logger.exception("opening the listeners left closed failed")
            return
        if opened:
            logger.info("listeners left closed at start now open: %s", self.server.endpoints)
            if self.manager is not None:
                self.manager.local_endpoints = set(self.server.endpoints)

    def _acme_stamp(self) -> tuple[int, int] | None:
        s = self.config.server
        return _stamp(acme_files(Path(s.data_dir))[0]) if s.acme_directory_url else None

    async def stop(self) -> None:
        if self.acme is not None:
            await asyncio.to_thread(self.acme.stop)
        if self.admin is not None:
            await self.admin.stop()
        if self.server is not None:
            await self.server.stop()
        if self.manager is not None:
            await self.manager.stop()
        if self.pressure is not None:
            await self.pressure.stop()
        if self.snapshots is not None:
            await self.snapshots.stop()
        await self.store.close()
        for log in (self.protocol_log, self.tracking):
            if log is not None:
                await asyncio.to_thread(log.close)
        self._stopped.set()

    def hurry(self) -> None:
        """A second SIGTERM/SIGINT while stopping: the sessions and deliveries still running are
        cut now instead of at the end of their grace; the rest of `stop` (the store, the logs)
        runs as it would."""
        logger.warning("second signal: stopping now (sessions and deliveries in flight are cut)")
        if self.server is not None:
            self.server.cut_sessions()
        if self.manager is not None:
            self.manager.cut_deliveries()

    async def watch_config(self, interval: float = 2.0) -> None:
        """Reload when the config file changes (edits by `relaygate connector ...` are atomic renames)."""
        if self.config_path is None:
            return
        last = self._config_stamp
        # The ACME certificate (every process of the node; written by the one that runs the
        # ACME client): a new file is swapped in like a renewed file on reload.
        acme_last = self._acme_stamp()
        # A supervised worker does not reload the file: its supervisor reads it and offers it to
        # every worker at once (relaygate.workers), so that they all run the same text.
        watch_file = self.config_digest is None
        while True:
            await asyncio.sleep(interval)
            await self.watch_admin_certificate()
            await self._open_deferred_listeners()
            now = _stamp(self.config_path) if watch_file else last
            if now != last:
                last = now
                try:
                    await self.reload()
                except Exception:  # the watcher must outlive a failed reload
                    logger.exception("reload of %s failed", self.config_path)
                acme_last = self._acme_stamp()  # a reload loads the certificate files anew
                continue
            acme_now = self._acme_stamp()
            if acme_now != acme_last:
                acme_last = acme_now
                if acme_now is None and not self.config.server.acme_directory_url:
                    continue  # ACME turned off (the reload took the other files already)
                try:
                    await self.refresh_certificates()
                except Exception:
                    logger.exception("taking the new ACME certificate failed")


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)


async def _main(
    config: Config,
    config_path: Path | None,
    *,
    worker_index: int | None = None,
    link_fd: int | None = None,
    config_stamp: tuple[int, int] | None = None,
    config_digest: str | None = None,
) -> None:
    relay = Relay(
        config,
        config_path=config_path,
        worker_index=worker_index,
        config_stamp=config_stamp,
        config_digest=config_digest,
    )
    await relay.start()
    tune_gc()
    tune_malloc()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    assert relay.server is not None
    endpoints = ", ".join(f"{h}:{p}" for h, p in relay.server.endpoints)
    admin = ""
    if relay.admin is not None:
        scheme = "https" if relay.admin.serves_tls else "http"
        admin = f"; admin {scheme}://{relay.config.admin.listen}"
    ready = f"RelayGate ready: SMTP {endpoints}{admin}"
    # systemd (Type=notify): only the process it started; a worker's supervisor speaks for it
    systemd = Notifier() if link_fd is None else None

    async def reload() -> None:
        if systemd is not None:
            systemd.reloading()
        try:
            await relay.reload()
        finally:
            if systemd is not None:
                systemd.ready(ready)
            if link is not None and relay.config_digest is not None:
                from relaygate.workers import config_applied

                # applied or refused: the supervisor hands the node's text to a worker it starts
                config_applied(link, relay.config_digest)

    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(reload()))
    watcher = asyncio.ensure_future(relay.watch_config())
    pinger = None
    link: socket.socket | None = None
    if systemd is not None:
        await asyncio.to_thread(flush_stderr, READY_FLUSH_TIMEOUT)  # the lines logged before it
        print(ready, flush=True)
        systemd.ready(ready)
        if (interval := watchdog_interval()) is not None:
            pinger = asyncio.ensure_future(_ping_watchdog(systemd, interval))
    else:
        from relaygate.workers import heartbeat_interval, worker_ready

        # The supervisor prints the ready line once every worker listens; EOF on the link means
        # the supervisor is gone, and a worker without its supervisor stops.
        link = socket.socket(fileno=link_fd)
        # the lines logged before it go first: the supervisor's ready line comes after them
        await asyncio.to_thread(flush_stderr, READY_FLUSH_TIMEOUT)
        try:
            worker_ready(link, endpoints=endpoints, admin=admin, config=relay.config_digest)
        except OSError:  # EPIPE: the supervisor died while this worker started
            logger.warning("supervisor gone: worker %d stops", os.getpid())
            stop.set()
        else:
            link.setblocking(False)
            loop.add_reader(link.fileno(), _on_link, link, stop, relay.hurry)
            # at the pace of the configuration in force (a reload may change the hang timeout)
            pinger = asyncio.ensure_future(
                _heartbeats(link, lambda: heartbeat_interval(relay.config))
            )
    await stop.wait()
    if link is None:
        # The next one: no more grace. (A worker hurries when its supervisor says so on the
        # link: a stop signal sent to every process of the node, ^C in a terminal or
        # KillMode=control-group, reaches it once from there and once more passed on.)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.hurry)
    if systemd is not None:
        systemd.stopping()
    if pinger is not None:
        pinger.cancel()
    watcher.cancel()
    await relay.stop()  # the link is still read: the supervisor may say "hurry"
    if link is not None:
        loop.remove_reader(link.fileno())
        link.close()


async def _heartbeats(link: socket.socket, interval: Callable[[], float]) -> None:
    """A worker's "my event loop turns" to its supervisor, which kills a worker that goes quiet
    for server.worker_hang_timeout (worker_link.py); each says when the next one comes."""
    from relaygate.workers import send_heartbeat

    every = interval()
    while True:
        await asyncio.sleep(every)
        every = interval()
        send_heartbeat(link, every)


async def _ping_watchdog(systemd: Notifier, interval: float) -> None:
    """WATCHDOG=1 from the event loop: if the loop stops turning, systemd restarts the service."""
    while True:
        systemd.watchdog()
        await asyncio.sleep(interval)


# CPython's default thresholds are (700, 10, 10). Measured at 50 sessions with 2 workers
# (docs/benchmarks.md, fourth session): the collector ran ~330 times per worker for 5,000
# messages, took ~4 % of its CPU (a full collection 40-50 ms, a latency spike for every session
# waiting meanwhile) and found ~700 objects in all: what a session allocates is freed by
# reference counting. Freezing what start-up built (modules, configuration, policy tables) keeps
# it out of every later scan; the higher first threshold makes the young scans rare.
GC_THRESHOLDS = (10_000, 20, 20)


def tune_gc() -> None:
    """For a long-running server process, after start-up: see GC_THRESHOLDS."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    logger.info(
        "garbage collector: %d start-up objects frozen, thresholds %s",
        gc.get_freeze_count(),
        "/".join(map(str, GC_THRESHOLDS)),
    )


def _on_link(link: socket.socket, stop: asyncio.Event, hurry: Callable[[], None]) -> None:
    """What the supervisor says on a worker's link: nothing but `HURRY_LINE` (a second stop
    signal reached it: relaygate.workers), then EOF when it is gone."""
    from relaygate.workers import HURRY_LINE

    try:
        data = link.recv(4096)
    except (BlockingIOError, InterruptedError):
        return
    except OSError:
        data = b""
    if HURRY_LINE in data:
        stop.set()
        hurry()
        return
    if not data:
        logger.warning("supervisor gone: worker %d stops", os.getpid())
        asyncio.get_running_loop().remove_reader(link.fileno())
        stop.set()


#: The lock of this process's node (see `run`): referenced here so that it lives as long as the
#: process does.
_NODE_LOCKS: list[NodeLock] = []


def _lock_node(config: Config) -> NodeLock:
    s = config.server
    url = config.queue.database_url if config.queue.store == "postgresql" else None
    lock = NodeLock(Path(s.data_dir), str(s.name), url or None)
    try:
        lock.acquire()
    except (NodeLockError, StoreError) as exc:
        logger.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    _NODE_LOCKS.append(lock)
    return lock


def _lock_worker(config: Config, index: int, link_fd: int | None) -> None:
    """A worker's shared hold on the node's name (PostgreSQL queue; the directory lock comes
    from the supervisor): a worker that cannot take it does not serve."""
    from relaygate.workers import supervisor_alive

    url = config.queue.database_url if config.queue.store == "postgresql" else None
    if not url:
        return
    s = config.server
    lock = NodeLock(Path(s.data_dir), str(s.name), url)
    alive = None if link_fd is None else (lambda: supervisor_alive(link_fd))
    try:
        lock.acquire_worker(index, alive)
    except (NodeLockError, StoreError) as exc:
        logger.error("cannot start: %s", exc)
        raise SystemExit(1) from None
    _NODE_LOCKS.append(lock)


def _handed_start_config(config_path: Path) -> tuple[Config, str]:
    """A supervised worker's configuration at start (relaygate.workers.handed_config)."""
    from relaygate.workers import handed_config

    try:
        handed = handed_config(config_path, "node")
    except ConfigError as exc:  # the supervisor parsed it: a file removed or damaged since
        logger.error("cannot start: configuration invalid:\n%s", exc)
        raise SystemExit(1) from None
    assert handed is not None
    return handed


def run(
    config_path: Path | None = None,
    *,
    worker_index: int | None = None,
    link_fd: int | None = None,
) -> None:
    from relaygate.config import default_config_path

    resolved = default_config_path(config_path)
    # before it is read: an edit made from now on (during the wait for the node lock too) is seen
    stamp = _stamp(resolved) if resolved is not None else None
    from relaygate.workers import supervised_worker

    digest: str | None = None
    if worker_index is not None and resolved is not None and supervised_worker():
        # the configuration the node runs, as its supervisor hands it, not the file as it is now
        config, digest = _handed_start_config(resolved)
    else:
        config = load_config(config_path)
    # server.log_format / log_level (the serve flags win); `[wN]` or "worker" in a worker
    configure_service_log(config.server.log_format, config.server.log_level, worker=worker_index)
    if worker_index is None:
        # The node's stderr, written by this process alone (a worker writes to a pipe that its
        # supervisor reads): from a thread, so that a stderr nobody reads (a full pipe) keeps
        # neither the event loop nor the supervision of the workers waiting.
        buffer_stderr()
    if worker_index is None:  # the workers inherit the limit from their supervisor
        raise_fd_limit(config)
    lock: NodeLock | None = None
    if worker_index is None:
        # Held until the process exits (its workers run under it): no second node with this
        # data_dir, or with this server.name on a shared queue database (relaygate.node_lock).
        lock = _lock_node(config)
    if worker_index is None:
        # The pseudonymization key, before any worker: they all read the one created here.
        try:
            log_privacy_for(config)
        except PrivacyKeyError as exc:
            logger.error("cannot start: %s", exc)
            raise SystemExit(1) from None
        warning = key_mode_warning(Path(config.server.data_dir))
        if warning is not None:  # warned, not refused: the relay starts
            logger.warning("%s", warning)
        try:
            if config.server.dns_servers:  # a host name among them is looked up here
                Resolver.from_config(config)
        except (OSError, ValueError) as exc:
            logger.error(
                "cannot start: server.dns_servers %s: %s", list(config.server.dns_servers), exc
            )
            raise SystemExit(1) from None
    if worker_index is None and config.server.workers > 1 and resolved is not None:
        from relaygate.workers import Supervisor

        assert lock is not None
        supervisor: Supervisor | None = None
        try:
            # Before any worker starts: the workers take the name shared too, each for its
            # lifetime, so that it stays claimed while any of them runs (relaygate.node_lock).
            lock.share()
            supervisor = Supervisor(config, resolved, hold_fds=(lock.fileno(),), file_stamp=stamp)
            if acme_enabled(config.server):
                # The node's only ACME client; the workers watch the files it writes.
                supervisor.acme = AcmeManager(config)
                supervisor.acme.start()
            status = supervisor.run()
        except (StoreError, NodeLockError) as exc:
            # the queue database cannot be reached or opened, or the name's lock was lost
            logger.error("cannot start: %s", exc)
            status = 1
        finally:
            if supervisor is not None and supervisor.acme is not None:
                supervisor.acme.stop()
        raise SystemExit(status)
    if worker_index is not None:
        from relaygate.config.model import MAX_WORKERS
        from relaygate.logs.protocol import use_session_id_stride
        from relaygate.workers import pinned_queue

        config = pinned_queue(config)
        # Before the store opens, the listeners bind or a delivery starts: the name stays
        # claimed while this worker runs, even if its supervisor is killed (relaygate.node_lock).
        _lock_worker(config, worker_index, link_fd)

        use_session_id_stride(worker_index, MAX_WORKERS)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(
            _main(
                config,
                resolved,
                worker_index=worker_index,
                link_fd=link_fd,
                config_stamp=stamp,
                config_digest=digest,
            )
        )
    except (ListenerError, StoreError, AdminStartError, PrivacyKeyError, UsersFileError) as exc:
        # a port in use, an implicit-TLS certificate that cannot load, a queue database that
        # cannot be opened or reached, an admin token file that cannot be read or is empty, a
        # users file that is not JSON or holds a send-as pattern that is not valid
        logger.error("cannot start: %s", exc)
        raise SystemExit(1) from None
