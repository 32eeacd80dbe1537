"""What the sessions of a process share: `ServerContext` (the current configuration, the store,
the logs, the limits, the STARTTLS contexts and the users), and the protocol log it is given.

Separate from the listeners (server.py) because it is the sessions' side of a reload: `apply`
takes a new configuration, resets the per-configuration caches the sessions read through
(connector selection, rights, address rules) and tells the servers registered with `on_reload`,
whose sessions follow it (session_reload.py). The listeners only hand it their connections.
"""

from __future__ import annotations

import logging
import re
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from relaygate.config.model import Config, ReceiveConnector
from relaygate.logs.privacy import AddressPrivacy
from relaygate.logs.protocol import PROTOCOL_LOG_RECEIVE_DIR, NullSessionLog, ProtocolLog
from relaygate.policy.address_rules import ConnectorAddressRules, compile_connector_rules
from relaygate.policy.rights import SessionRights, session_rights
from relaygate.policy.selection import Selection, select_connector
from relaygate.policy.verdicts import host_ips
from relaygate.queue.bounce import header_value
from relaygate.queue.model import Envelope, StoredMessage
from relaygate.queue.pressure import DiskPressure
from relaygate.queue.store import Store
from relaygate.smtp.auth import UsersFileError, UserStore, users_path
from relaygate.smtp.counters import SmtpCounters
from relaygate.smtp.limits import (
    AuthFailures,
    ConnectionLimits,
    DataMemory,
    RateLimiter,
    default_data_memory,
)
from relaygate.smtp.message import own_received_pattern
from relaygate.smtp.starttls_contexts import (
    StarttlsContexts,
    _files_stamp,
    _FilesStamp,
    _starttls_context,
    _starttls_withheld,
)
from relaygate.smtp.tls import listener_files

if TYPE_CHECKING:
    from relaygate.smtp.session_state import _SessionState

logger = logging.getLogger("relaygate.smtp")

_SELECTION_CACHE_SIZE = 65536


class Handoff(Protocol):
    """What a receiving session needs of the local queue manager (QueueManager implements it)."""

    def lease_for_new(self) -> tuple[str, float] | None: ...

    def take_new(self, msg: StoredMessage, data: bytes) -> None: ...


class ServerContext:
    """What sessions share: the current config, the store, logs, limits, TLS contexts and users."""

    def __init__(
        self,
        config: Config,
        store: Store,
        *,
        protocol_log: ProtocolLog | None = None,
        tracking: Any = None,
        on_message: Callable[[str], None] | None = None,
        tls: StarttlsContexts | None = None,
    ) -> None:
        """`tls`: the STARTTLS contexts of `config`, built ahead (`load_starttls_contexts`)."""
        self.store = store
        self.protocol_log = protocol_log
        self.tracking = tracking
        self.on_message = on_message
        #: The local queue manager, when new messages go straight to it (``lease_for_new`` /
        #: ``take_new``); without one, ``on_message(queue_id)`` wakes whoever scans the queue.
        self.handoff: Handoff | None = None
        self.limits = ConnectionLimits()
        #: /metrics counters of this process (summed over the workers by relaygate.worker_stats)
        self.counters = SmtpCounters()
        self.rates = RateLimiter()
        self.auth_failures = AuthFailures()
        #: Back pressure on the queue's disk (set by the relay; None: never refuse for it).
        self.pressure: DiskPressure | None = None
        self.data_memory = DataMemory(0)  # its limit is set by apply()
        self.logger = logger
        self.host_ips: list[str] = []
        self._tls: dict[str, ssl.SSLContext | None] = {}
        #: Connectors whose certificate files did not load, with the files' stamps then: tried
        #: again once the files change (see tls_context); meanwhile STARTTLS is not offered.
        self._tls_failed: dict[str, _FilesStamp] = {}
        #: Connectors that do not offer STARTTLS although their auth_mechanism has Tls: ACME is on
        #: and has no certificate yet (empty without ACME).
        self.starttls_withheld: frozenset[str] = frozenset()
        #: Called at the end of every apply() (none yet at the first): the servers telling their
        #: open sessions of a reload (SmtpServer registers itself, see `on_reload`).
        self._reload_listeners: list[Callable[[], None]] = []
        self.config = config
        # At start a users file that cannot be read is an error (ValueError naming it): no users,
        # or users without their send-as lists, would be worse than not starting.
        path = users_path(config.server.data_dir, config.server.users_file)
        try:
            self.users = UserStore(path)
        except ValueError as exc:
            raise UsersFileError(f"cannot read the users file {path}: {exc}") from None
        #: The processes the node runs (fixed at start: a changed `server.workers` waits for a
        #: restart), among which the default `max_data_in_memory` is divided.
        self.workers = config.server.workers
        self.apply(config, tls=tls)

    def apply(self, config: Config, *, tls: StarttlsContexts | None = None) -> None:
        """Take a new configuration (start or reload). An open session checks, at its next command
        and at the end of DATA, that the connector it started on still takes its client, and takes
        that connector's new values (Session._follow_reload); one waiting for a command does so
        now (the listeners registered with `on_reload`: Session.reload_applied). `tls`: its
        STARTTLS contexts, built ahead in a thread (else each is built at its first STARTTLS)."""
        self.config = config
        self.refresh_tls(tls)
        limit = config.server.max_data_in_memory
        self.data_memory.limit = limit if limit is not None else default_data_memory(self.workers)
        # Per-connection decisions that depend only on the configuration, computed once per config:
        # the connector for (local address, port, client) and a connector's session rights.
        self._selections: dict[tuple[str, int, str], Selection] = {}
        self._rights: dict[int, tuple[ReceiveConnector, SessionRights]] = {}
        self._address_rules: dict[int, tuple[ReceiveConnector, ConnectorAddressRules]] = {}
        self._banner_second = -1
        self._banner_stamp = ""
        self.users = self._read_users(config)
        self.host_ips = host_ips()  # for relay_local_ips: the relay's own address literals
        #: Finds this relay's names in a Received field's `by` (max_local_hop_count)
        self.own_received: re.Pattern[bytes] | None = own_received_pattern(
            [config.server.fqdn, *(c.fqdn for c in config.receive_connectors if c.fqdn)]
        )
        # A client's address from a PROXY header is not what the kernel steered by.
        self.rates.share_addresses(proxied=bool(config.server.trusted_proxies))
        self.auth_failures.share_addresses(proxied=bool(config.server.trusted_proxies))
        # Last: the sessions told select, and read rights and users, through the caches reset above.
        for listener in self._reload_listeners:
            listener()

    def on_reload(self, listener: Callable[[], None]) -> None:
        """Call `listener` (on the event loop, without arguments) after each reload is applied."""
        self._reload_listeners.append(listener)

    def _read_users(self, config: Config) -> UserStore:
        """The users file of `config`, read again (a reload: `users_file` may have changed). One
        that cannot be read keeps the users and send-as lists read before, as AUTH does when the
        file changes (`UserStore.refresh`), rather than failing the reload half applied."""
        path = users_path(config.server.data_dir, config.server.users_file)
        try:
            return UserStore(path)
        except (OSError, ValueError) as exc:
            logger.error(
                "cannot read users file %s: %s; keeping the users read from %s",
                path,
                exc,
                self.users.path,
            )
            return self.users

    def refresh_tls(self, prepared: StarttlsContexts | None = None) -> None:
        """Forget the TLS contexts built so far: the next STARTTLS loads the certificate files
        again (a reload, or a certificate renewed by ACME). Open sessions keep theirs.
        `prepared` (from `load_starttls_contexts` in a thread, for this config): taken as they
        are, so no session waits for the files on the event loop."""
        if prepared is not None:
            self._tls = dict(prepared.contexts)
            self._tls_failed = dict(prepared.failed)
            self.starttls_withheld = prepared.withheld
        else:
            self._tls = {}
            self._tls_failed = {}
            self.starttls_withheld = _starttls_withheld(self.config)
        if self.starttls_withheld:
            logger.warning(
                "no ACME certificate yet: STARTTLS not offered on %s",
                ", ".join(sorted(self.starttls_withheld)),
            )

    def select(self, local_ip: str, local_port: int, client_ip: str) -> Selection:
        """`select_connector` for the current config, remembered per (local, client) triple."""
        key = (local_ip, local_port, client_ip)
        selection = self._selections.get(key)
        if selection is None:
            selection = select_connector(
                self.config.receive_connectors,
                local_ip=local_ip,
                local_port=local_port,
                client_ip=client_ip,
            )
            if len(self._selections) >= _SELECTION_CACHE_SIZE:
                self._selections.clear()  # bounded: a scan of many sources only costs recomputation
            self._selections[key] = selection
        return selection

    def rights(self, connector: ReceiveConnector) -> SessionRights:
        """The anonymous session rights of `connector` (a pure function of its settings)."""
        entry = self._rights.get(id(connector))
        if entry is None or entry[0] is not connector:
            entry = (connector, session_rights(connector))
            self._rights[id(connector)] = entry
        return entry[1]

    def address_rules(self, connector: ReceiveConnector) -> ConnectorAddressRules:
        """`connector`'s allowed_senders / allowed_recipients, compiled once per config load."""
        entry = self._address_rules.get(id(connector))
        if entry is None or entry[0] is not connector:
            entry = (connector, compile_connector_rules(connector))
            self._address_rules[id(connector)] = entry
        return entry[1]

    def banner_stamp(self) -> str:
        """Exchange's banner date (`Mon, 23 Nov 2026 13:15:31 +0000`), formatted once per second."""
        now = time.time()
        second = int(now)
        if second != self._banner_second:
            local = datetime.fromtimestamp(second, UTC).astimezone()
            self._banner_stamp = f"{local:%a}, {local.day} {local:%b %Y %H:%M:%S %z}"
            self._banner_second = second
        return self._banner_stamp

    def tls_context(
        self, connector: ReceiveConnector, config: Config | None = None
    ) -> ssl.SSLContext | None:
        """The server TLS context of `connector`; of a `config` not applied yet: built, not kept."""
        if config is not None and config is not self.config:
            return _starttls_context(config, connector)[0]
        name = connector.name
        context = self._tls.get(name)
        if context is not None:
            return context
        if self.tls_unavailable(connector):
            return None  # the files that failed are unchanged: no new error per STARTTLS
        context, failed = _starttls_context(self.config, connector)
        if failed is not None:
            # Kept until the files change, not until a reload: an administrator who fixes the
            # key (a copy that was late, a chmod) gets STARTTLS back at the next session.
            self._tls_failed[name] = failed
            return None
        self._tls_failed.pop(name, None)
        self._tls[name] = context
        return context

    def tls_unavailable(self, connector: ReceiveConnector) -> bool:
        """Whether `connector`'s certificate files failed to load and have not changed since: its
        EHLO reply does not offer STARTTLS (a client told 454 after an offer often gives up)."""
        failed = self._tls_failed.get(connector.name)
        if failed is None:
            return False
        return failed == _files_stamp(listener_files(self.config, connector))

    def session_log(
        self, connector: ReceiveConnector, local: tuple[str, int], client: tuple[str, int]
    ) -> Any:
        if self.protocol_log is None or connector.protocol_logging_level != "Verbose":
            return NullSessionLog()  # its own session id: the Received header and tracking use it
        return self.protocol_log.session(connector.name, local, client)

    def postmaster_address(self) -> str:
        admin = self.config.queue.admin_notification_address
        if admin:
            return admin
        return self.config.postmaster

    def message_received(
        self, queue_id: str, envelope: Envelope, data: bytes, session: _SessionState
    ) -> None:
        size = len(data)
        self.counters.messages[envelope.connector] += 1
        self.counters.bytes[envelope.connector] += size
        if self.tracking is not None:
            # Exchange's RECEIVE has the subject too (Get-MessageTrackingLog -MessageSubject
            # finds a message still queued); read from the header only when it will be logged.
            subject = header_value(data, "Subject") if self.tracking.subject_logging else ""
            self.tracking.write(
                "RECEIVE",
                "SMTP",
                internal_message_id=queue_id,
                message_id=envelope.message_id,
                message_subject=subject,
                recipients=envelope.recipients,
                recipient_status=["250 2.1.5 Recipient OK"] * len(envelope.recipients),
                sender=envelope.sender,
                return_path=envelope.sender,
                total_bytes=size,
                client_ip=session.client_ip,
                client_hostname=session.helo or "",
                server_ip=session.local[0],
                server_hostname=session.fqdn,
                connector_id=f"{self.config.server.name}\\{envelope.connector}",
                source_context=envelope.metadata.get("session", ""),
            )


def protocol_log_for(config: Config, privacy: AddressPrivacy | None = None) -> ProtocolLog:
    s = config.server
    return ProtocolLog(
        Path(s.data_dir) / PROTOCOL_LOG_RECEIVE_DIR,
        server_name=s.name,
        max_file_size=s.receive_protocol_log_max_file_size,
        max_directory_size=s.receive_protocol_log_max_directory_size,
        max_age=s.receive_protocol_log_max_age,
        privacy=privacy,
    )
