"""Listeners: one per distinct binding (a specific address beside a wildcard of its port shares
the wildcard's socket, see `listener_bindings`); the connector is chosen per connection by the
policy engine from the connection's real local address.

A client that no connector accepts is closed without a banner. A PROXY header is honoured only from
`server.trusted_proxies`; elsewhere `PROXY ...` reaches the session as an unrecognised command.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import hashlib
import ipaddress
import logging
import socket
import ssl
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from relaygate.config.model import Config, ReceiveConnector
from relaygate.config.values import Binding, normalise_ip, wildcard_covers
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
from relaygate.smtp import proxy
from relaygate.smtp.auth import UsersFileError, UserStore, users_path
from relaygate.smtp.connection import Connection
from relaygate.smtp.counters import SmtpCounters
from relaygate.smtp.limits import (
    AuthFailures,
    ConnectionLimits,
    DataMemory,
    RateLimiter,
    default_data_memory,
)
from relaygate.smtp.session import Session
from relaygate.smtp.session_state import _SessionState
from relaygate.smtp.steering import attach_source_steering
from relaygate.smtp.tls import ACME, CONNECTOR, SELF_SIGNED, SERVER, listener_files, server_context

__all__ = [
    "ListenerError",
    "ServerContext",
    "SmtpServer",
    "StarttlsContexts",
    "TlsUnavailable",
    "check_bindings_free",
    "listener_bindings",
    "load_starttls_contexts",
]

logger = logging.getLogger("relaygate.smtp")


_SELECTION_CACHE_SIZE = 65536
# Connections the kernel completes before the event loop accepts them (capped by
# net.core.somaxconn). When the queue is full, a new client's SYN is dropped and it waits for its
# retransmission, 1 s and more: a burst of devices reconnecting must not meet that.
LISTEN_BACKLOG = 1024
_ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after EMFILE and the like (as asyncio)


class ListenerError(OSError):
    """A listener could not be opened; `binding` names it, and `config` the receive connectors
    whose bindings it is (an administrator looks for the connector, not the socket)."""

    def __init__(self, binding: Binding, exc: OSError, config: Config | None = None) -> None:
        names = [
            f'"{c.name}"'
            for c in (config.receive_connectors if config is not None else ())
            if c.enabled and binding in c.bindings
        ]
        owner = (
            f" (bindings of receive connector{'s' if len(names) > 1 else ''} {', '.join(names)})"
            if names
            else ""
        )
        super().__init__(exc.errno, f"cannot listen on {binding}{owner}: {exc.strerror or exc}")
        self.binding = binding

    def __str__(self) -> str:
        return str(self.strerror)  # not "[Errno None] ..." for a TLS error


class TlsUnavailable(OSError):
    """The certificate or key of an implicit-TLS connector cannot be loaded: its listener is not
    opened (never plain TCP in its place); the message names the connector and the keys."""

    def __init__(self, config: Config, connector: ReceiveConnector, exc: Exception) -> None:
        if connector.tls_certificate_file is not None:
            where = f'receive connector "{connector.name}": tls_certificate_file / tls_key_file'
            files = f"{connector.tls_certificate_file}, {connector.tls_key_file}"
        elif config.server.tls_certificate_file is not None:
            where = (
                f'receive connector "{connector.name}" (implicit TLS): '
                "server.tls_certificate_file / server.tls_key_file"
            )
            files = f"{config.server.tls_certificate_file}, {config.server.tls_key_file}"
        elif config.server.acme_directory_url:
            where = (
                f'receive connector "{connector.name}" (implicit TLS): the ACME certificate '
                "(server.acme_directory_url)"
            )
            files = str(Path(config.server.data_dir) / "acme")
        else:
            where = f'receive connector "{connector.name}" (implicit TLS): self-signed certificate'
            files = str(Path(config.server.data_dir) / "tls")
        detail = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        super().__init__(f"{where} ({files}) cannot be loaded: {detail}")
        self.connector = connector.name

    def __str__(self) -> str:
        return str(self.args[0])


def listener_bindings(config: Config) -> dict[Binding, bool]:
    """The sockets to open: distinct bindings of enabled connectors → implicit TLS.

    A specific address is left out when a wildcard socket of the same TLS mode already receives its
    connections on that port (0.0.0.0 for IPv4; [::] for IPv6, and for IPv4 too when it is
    dual-stack): two sockets would conflict (EADDRINUSE without SO_REUSEPORT), and the connector
    is chosen by the connection's real local address anyway, so the exact binding still wins
    (selection rule 2). `relaygate check` refuses a wildcard and a specific address of different
    TLS modes on one port; if it is met here, the specific socket is tried and its error reported."""
    wanted: dict[Binding, bool] = {}
    for c in config.receive_connectors:
        if not c.enabled:
            continue
        for b in c.bindings:
            wanted[b] = wanted.get(b, False) or c.tls_mode == "implicit"
    wildcards = [(w, implicit) for w, implicit in wanted.items() if w.is_wildcard]
    return {
        b: implicit
        for b, implicit in wanted.items()
        if b.is_wildcard
        or not any(
            w_implicit == implicit and wildcard_covers(w, b, ipv6_only=config.ipv6_only(w.port))
            for w, w_implicit in wildcards
        )
    }


def check_bindings_free(config: Config, *, skip_ports: frozenset[int] = frozenset()) -> None:
    """Raise ListenerError (naming the binding and its connectors) if a listener of `config`
    cannot be bound by a socket WITHOUT SO_REUSEPORT: another process listens there.

    Worker processes bind with SO_REUSEPORT, which the kernel lets any process of the same user
    share: a second node started on a port another node's workers hold would bind it too,
    say ready, and split (or silently take over) the first's connections. A socket without
    SO_REUSEPORT meets EADDRINUSE there, so the supervisor binds each endpoint that way (and
    closes it: it never listens) before it starts its workers, and at reload for the ports
    the node does not listen on yet (`skip_ports`: those its workers hold)."""
    for binding in listener_bindings(config):
        if binding.port in skip_ports:
            continue
        try:
            # as the listeners do (SO_REUSEADDR, IPV6_V6ONLY), so only a listener conflicts
            _bound_socket(config, binding, reuse_port=False).close()
        except OSError as exc:
            raise ListenerError(binding, exc, config) from exc


def _bound_socket(config: Config, binding: Binding, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to `binding` as a listener binds it (SO_REUSEADDR; IPV6_V6ONLY as
    `config` says for the port; SO_REUSEPORT if asked), not listening yet. IPPROTO_TCP, not 0:
    asyncio sets TCP_NODELAY only on sockets that say they are TCP (uvloop on every one), and
    each reply must leave at once. Closed again if it cannot be bound (OSError)."""
    family = socket.AF_INET6 if binding.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if config.ipv6_only(binding.port) else 0
            )
        sock.bind((binding.address, binding.port))
    except OSError:
        sock.close()
        raise
    return sock


class _ListenerState(NamedTuple):
    """What a listening socket depends on: a reload reopens it when this changes."""

    implicit: bool
    v6only: bool  # of a [::] socket (False for any other)
    tls: tuple[str, ...]  # of an implicit-TLS socket: version floor, files, their digest


def _implicit_connector(config: Config, binding: Binding) -> ReceiveConnector:
    return next(
        c
        for c in config.receive_connectors
        if c.enabled and binding in c.bindings and c.tls_mode == "implicit"
    )


def _implicit_context(config: Config, binding: Binding) -> ssl.SSLContext:
    connector = _implicit_connector(config, binding)
    try:
        return server_context(config, connector, implicit=True)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise TlsUnavailable(config, connector, exc) from exc


def _listener_state(config: Config, binding: Binding, implicit: bool) -> _ListenerState:
    v6only = binding.address == "::" and config.ipv6_only(binding.port)
    if not implicit:
        return _ListenerState(False, v6only, ())
    connector = _implicit_connector(config, binding)
    files = listener_files(config, connector, implicit=True)
    assert files is not None  # (implicit: the self-signed one at least)
    cert, key, _source = files
    digest = hashlib.sha256()
    for path in (cert, key):  # a renewed certificate often keeps its file name
        try:
            digest.update(Path(path).read_bytes())
        except OSError as exc:
            digest.update(f"unreadable: {exc}".encode())
    return _ListenerState(
        True, v6only, (connector.tls_min_version, str(cert), str(key), digest.hexdigest())
    )


def _listeners_to_open(
    config: Config, wanted: dict[Binding, bool], current: dict[Binding, _ListenerState]
) -> tuple[dict[Binding, _ListenerState], dict[Binding, ssl.SSLContext | None]]:
    """(the state of every wanted listener, the TLS context of each to open or reopen: None for
    a plain one) for `SmtpServer.sync_listeners`. Blocking: reads the certificate files.
    ListenerError if an implicit-TLS listener's certificate cannot be loaded."""
    states = {b: _listener_state(config, b, implicit) for b, implicit in wanted.items()}
    contexts: dict[Binding, ssl.SSLContext | None] = {}
    for binding in (b for b in wanted if current.get(b) != states[b]):
        try:
            contexts[binding] = _implicit_context(config, binding) if wanted[binding] else None
        except TlsUnavailable as exc:
            raise ListenerError(binding, exc) from exc
        if wanted[binding]:  # a self-signed certificate is created by the first context
            states[binding] = _listener_state(config, binding, True)
    return states, contexts


class _Admitted(NamedTuple):
    """An implicit-TLS connection counted against its connector's limits before its handshake."""

    connector: ReceiveConnector
    client: tuple[str, int]
    local: tuple[str, int]


#: How long a trusted proxy may take to send its PROXY header (`_read_proxy`, implicit TLS too).
PROXY_HEADER_TIMEOUT = 10.0


def _resolve_once(fut: asyncio.Future[None]) -> None:
    if not fut.done():  # a level-triggered reader can fire again before its waiter runs
        fut.set_result(None)


async def _take_proxy_header(sock: socket.socket) -> tuple[str, int] | None:
    """Read exactly the PROXY header off a non-blocking socket and nothing after it (peeking
    first): what follows is the client's TLS handshake, for the TLS layer to read. Returns the
    source it names (None: LOCAL/UNKNOWN).

    What is peeked before the header's end is there all belongs to the header (a v1 header ends
    at its first CRLF, a v2 one is at least 16 bytes and then as long as it says): it is read
    off the socket at once, so the socket is readable again only when more comes, or at its end
    (an end behind unread bytes is never seen by peeking them again)."""
    loop = asyncio.get_running_loop()
    taken = b""  # the header's bytes read so far
    while True:
        try:
            peeked = sock.recv(proxy.V1_MAX + 512, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            peeked = None
        if peeked == b"":
            raise ConnectionResetError("closed before its PROXY header")
        if peeked:
            length = proxy.header_length(taken + peeked)
            # The header's bytes among those peeked: all of them until its end is there.
            want = len(peeked) if length is None else min(len(peeked), length - len(taken))
            taken += sock.recv(want)  # in the buffer: they were peeked
            if length is not None and len(taken) >= length:
                return proxy.parse_header(taken)
            continue
        readable = loop.create_future()
        loop.add_reader(sock.fileno(), _resolve_once, readable)
        try:
            await readable
        finally:
            loop.remove_reader(sock.fileno())


class _TlsListener:
    """An implicit-TLS listening socket with its own accept loop (the interface of the
    `asyncio.Server` a plain socket gets: `sockets`, `start_serving`, `close`, `wait_closed`).

    With `create_server(ssl=...)` the loop runs the TLS handshake before the protocol sees the
    connection, so connections were counted against the connector's limits only once it was
    done: silent clients held sockets for asyncio's 60 s outside every limit. Here each accepted
    socket goes to `on_accept` before a byte of it is read, which admits or closes it and hands
    it to `loop.connect_accepted_socket(ssl=...)`: the ClientHello waits in the kernel's buffer
    until the TLS transport reads it, so nothing read early has to be handed over (the race of
    upgrading a plain transport with `start_tls`, reverted in d5d326d)."""

    def __init__(
        self, sock: socket.socket, on_accept: Callable[[socket.socket, Any], None]
    ) -> None:
        self._sock = sock
        self._on_accept = on_accept
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    async def start_serving(self) -> None:
        self._start_reading()

    def _start_reading(self) -> None:
        self._retry = None
        if not self._closed and not self._reading:
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._reading = True

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        if self._reading:
            self._loop.remove_reader(self._sock.fileno())
            self._reading = False
        self._sock.close()  # connections accepted already go on, as with asyncio.Server.close

    async def wait_closed(self) -> None:
        return

    def _accept(self) -> None:
        # As asyncio's own accept loop: up to a backlog's worth per wake-up.
        for _ in range(LISTEN_BACKLOG):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise  # the loop logs it; the reader stays
                # Linux keeps reporting the socket readable: stop reading it for a while.
                logger.error("accept on %s: %s", self._sock.getsockname(), exc)
                self._loop.remove_reader(self._sock.fileno())
                self._reading = False
                self._retry = self._loop.call_later(_ACCEPT_RETRY_DELAY, self._start_reading)
                return
            try:
                conn.setblocking(False)
                self._on_accept(conn, addr)
            except Exception:  # one connection's failure never stops the listener
                logger.exception("accepting a connection from %s failed", addr)
                conn.close()


class Handoff(Protocol):
    """What a receiving session needs of the local queue manager (QueueManager implements it)."""

    def lease_for_new(self) -> tuple[str, float] | None: ...

    def take_new(self, msg: StoredMessage, data: bytes) -> None: ...


@functools.lru_cache(maxsize=8192)
def canonical_ip(text: str) -> str:
    """A socket address as the policy compares it: no zone id, IPv4-mapped IPv6 as IPv4."""
    return str(normalise_ip(ipaddress.ip_address(text.partition("%")[0])))


class StarttlsContexts(NamedTuple):
    """The STARTTLS contexts of a configuration, built ahead by `load_starttls_contexts`."""

    contexts: dict[str, ssl.SSLContext]  # by connector name, those that loaded
    failed: dict[str, _FilesStamp]  # those that did not (logged): their files when they failed
    withheld: frozenset[str]  # connectors not offering STARTTLS (ACME has no certificate yet)


def load_starttls_contexts(config: Config) -> StarttlsContexts:
    """Every STARTTLS context of `config`. Blocking (file reads, and an ACME pair is read under
    its lock, which the ACME client holds while it writes and fsyncs a renewal): run it in a
    thread, then hand the result to `ServerContext.refresh_tls` / `apply`."""
    withheld = _starttls_withheld(config)
    contexts: dict[str, ssl.SSLContext] = {}
    failed: dict[str, _FilesStamp] = {}
    for c in config.receive_connectors:
        if (
            c.enabled
            and "Tls" in c.auth_mechanism
            and c.tls_mode != "implicit"
            and c.name not in withheld
        ):
            context, stamp = _starttls_context(config, c)
            if context is not None:
                contexts[c.name] = context
            elif stamp is not None:
                failed[c.name] = stamp
    return StarttlsContexts(contexts, failed, withheld)


def _starttls_withheld(config: Config) -> frozenset[str]:
    """Connectors whose Tls cannot be offered yet: ACME is on and has no certificate."""
    if not config.server.acme_directory_url:
        return frozenset()
    return frozenset(
        c.name
        for c in config.receive_connectors
        if "Tls" in c.auth_mechanism and listener_files(config, c) is None
    )


def _starttls_context(
    config: Config, connector: ReceiveConnector
) -> tuple[ssl.SSLContext | None, _FilesStamp | None]:
    """(`connector`'s STARTTLS context, None) or, if its certificate cannot be loaded (logged,
    naming the files and their keys), (None, the files' stamp when they failed)."""
    files = listener_files(config, connector)
    stamp = _files_stamp(files)
    try:
        return server_context(config, connector), None
    except (OSError, ssl.SSLError) as exc:
        logger.error(
            "TLS unavailable on receive connector %s: %s; STARTTLS not offered until the files load",
            connector.name,
            _load_failure(files, exc),
        )
        return None, stamp


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


#: (mtime, ctime, inode, size) of a listener's certificate file then its key file (None: absent)
_FilesStamp = tuple[tuple[int, int, int, int] | None, ...]


def _files_stamp(files: tuple[Path, Path, str] | None) -> _FilesStamp:
    """What tells that a certificate or key file changed: replaced, rewritten, or its mode or
    owner changed (ctime), as a fix of an unreadable key does."""
    if files is None:
        return ()
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in files[:2]:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(stamps)


#: `listener_files`' source → the keys that name the files
_FILE_KEYS = {
    CONNECTOR: "tls_certificate_file / tls_key_file",
    SERVER: "server.tls_certificate_file / server.tls_key_file",
    ACME: "the certificate of server.acme_directory_url",
    SELF_SIGNED: "the self-signed certificate",
}


def _load_failure(files: tuple[Path, Path, str] | None, exc: BaseException) -> str:
    """Why the files did not load, naming them and their keys: ssl's own error names neither
    ("[Errno 2] No such file or directory")."""
    if files is None:
        return str(exc)  # AcmePending says it all
    cert, key, source = files
    return f"cannot load certificate {cert} and key {key} ({_FILE_KEYS.get(source, source)}): {exc}"


class SmtpServer:
    def __init__(self, ctx: ServerContext, *, reuse_port: bool | None = None) -> None:
        self.ctx = ctx
        #: SO_REUSEPORT on every listener: several worker processes bind the same endpoints and
        #: the kernel spreads connections. Fixed at start, so a reload that changes
        #: `server.workers` (effective at the next restart) cannot make a new listener fail to bind.
        self.reuse_port = (
            ctx.config.server.workers > 1 if reuse_port is None else reuse_port
        ) and hasattr(socket, "SO_REUSEPORT")
        #: The worker processes sharing the listeners, fixed at start like `reuse_port`: a reload
        #: that changes `server.workers` (effective at the next restart) must not give a listener
        #: it opens a steering program for workers that do not run.
        self.workers = ctx.workers
        self._servers: dict[Binding, asyncio.Server | _TlsListener] = {}
        #: What each listening socket was opened with (compared on reload) and its TLS context
        #: (None: plain; kept to reopen the socket as it was when a reload is rolled back).
        self._states: dict[Binding, _ListenerState] = {}
        self._ssl: dict[Binding, ssl.SSLContext | None] = {}
        # One `sync_listeners` at a time (a SIGHUP reload beside the watcher's certificate
        # refresh): each compares the listeners as they are with what it wants.
        self._syncing = asyncio.Lock()
        self._sessions: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[Any]] = set()  # implicit TLS, before the session
        self._live: set[Session] = set()  # told of reloads, and to finish when the server stops
        self._hurry = False  # `cut_sessions`: stop without a grace
        ctx.on_reload(self._tell_sessions_of_reload)

    @property
    def endpoints(self) -> list[tuple[str, int]]:
        out = []
        for server in self._servers.values():
            for sock in server.sockets:
                name = sock.getsockname()
                out.append((name[0], name[1]))
        return out

    async def start(self) -> None:
        if any("BasicAuth" in c.auth_mechanism for c in self.ctx.config.receive_connectors):
            await (
                self.ctx.users.warm_up()
            )  # the dummy hash for unknown users, before the first AUTH
        await self.sync_listeners()

    async def sync_listeners(
        self, config: Config | None = None, *, before_serving: Callable[[], None] | None = None
    ) -> None:
        """Make the listeners match `config` (the current one by default): close those no enabled
        connector uses any more, open the new ones, and reopen those whose socket must change:
        another TLS mode (STARTTLS ↔ implicit), another certificate, key or TLS version floor on
        an implicit-TLS socket, or a [::] socket that becomes IPv6-only because 0.0.0.0 is bound
        on its port too (see `_ListenerState`).

        All or nothing: the TLS contexts of the sockets to open are built first (a certificate
        that cannot load changes nothing); when a listener cannot be opened, those opened here
        are closed, those closed here are opened again (with their former TLS context), and
        `ListenerError` (an OSError naming the binding) is raised. `before_serving` runs once
        every new listener is bound and before any accepts a connection (a reload applies its
        configuration there)."""
        async with self._syncing:
            await self._sync_listeners(config, before_serving)

    async def _sync_listeners(
        self, config: Config | None, before_serving: Callable[[], None] | None
    ) -> None:
        old = self.ctx.config
        config = old if config is None else config
        wanted = listener_bindings(config)
        # In a thread: the certificate files are read, and an ACME pair under its lock, which
        # the ACME client holds while it writes and fsyncs a renewal (seconds on a slow disk).
        states, contexts = await asyncio.to_thread(
            _listeners_to_open, config, wanted, dict(self._states)
        )
        to_open = list(contexts)
        closed: dict[Binding, tuple[_ListenerState, ssl.SSLContext | None]] = {}
        for binding in list(self._servers):
            if binding not in wanted or binding in contexts:
                # First: a wildcard replacing a specific address on the same port needs the port,
                # and a socket reopened with other settings needs its own.
                self._servers.pop(binding).close()
                closed[binding] = (self._states.pop(binding), self._ssl.pop(binding))
        opened: dict[Binding, asyncio.Server | _TlsListener] = {}
        for binding in to_open:
            try:
                opened[binding] = await self._listen(
                    config, binding, wanted[binding], contexts[binding]
                )
            except OSError as exc:
                for server in opened.values():
                    server.close()
                for back, (back_state, back_ssl) in closed.items():
                    try:
                        server = await self._listen(old, back, back_state.implicit, back_ssl)
                    except OSError as again:
                        logger.error("listener %s closed and cannot be reopened: %s", back, again)
                        continue
                    self._servers[back] = server
                    self._states[back], self._ssl[back] = back_state, back_ssl
                    await server.start_serving()
                raise ListenerError(binding, exc, config) from exc
        if before_serving is not None:
            before_serving()
        for binding, server in opened.items():
            self._servers[binding] = server
            self._states[binding], self._ssl[binding] = states[binding], contexts[binding]
            await server.start_serving()

    async def _listen(
        self,
        config: Config,
        binding: Binding,
        implicit: bool,
        ssl_ctx: ssl.SSLContext | None,
    ) -> asyncio.Server | _TlsListener:
        """A listening socket for `binding`, not accepting yet (`start_serving`)."""
        if implicit and ssl_ctx is None:  # never a plain socket in place of an implicit-TLS one
            raise ValueError(f"implicit-TLS listener {binding} without a TLS context")
        sock = _bound_socket(config, binding, reuse_port=self.reuse_port)
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        server = config.server
        workers = self.workers
        if self.reuse_port and workers > 1:
            # One client address → one worker, so per-source limits are counted in one place.
            steered = (
                server.worker_balance == "client_address"
                and sys.platform.startswith("linux")
                and attach_source_steering(sock, workers)
            )
            if not steered:
                # An address's sessions may reach any worker: its message rate and its AUTH
                # failures are counted in the table the workers share (users' always are), not
                # in this process.
                self.ctx.rates.share_addresses(unsteered=True)
                self.ctx.auth_failures.share_addresses(unsteered=True)

        async def on_connect(conn: Connection, admitted: _Admitted | None = None) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._sessions.add(task)
            try:
                await self._handle(conn, admitted)
            except Exception:  # a task boundary: log with context, never crash the listener
                logger.exception("session from %s failed", conn.get_extra_info("peername"))
            finally:
                self._sessions.discard(task)
                conn.close()

        if ssl_ctx is not None:
            return _TlsListener(
                sock, functools.partial(self._accept_tls, ssl_ctx=ssl_ctx, on_connect=on_connect)
            )
        loop = asyncio.get_running_loop()
        # create_server listens again, with its own backlog (100 unless given): pass ours.
        return await loop.create_server(
            lambda: Connection(on_connect),
            sock=sock,
            backlog=LISTEN_BACKLOG,
            start_serving=False,
        )

    def _trusted_proxy(self, ip: str) -> bool:
        """`ip` is in server.trusted_proxies: its connections start with a PROXY header."""
        proxies = self.ctx.config.server.trusted_proxies
        return bool(proxies) and any(r.contains(ipaddress.ip_address(ip)) for r in proxies)

    def _accept_tls(
        self,
        sock: socket.socket,
        peer: Any,
        *,
        ssl_ctx: ssl.SSLContext,
        on_connect: Callable[[Connection, _Admitted | None], Coroutine[Any, Any, None]],
    ) -> None:
        """An implicit-TLS connection just accepted, nothing read from it yet: choose its
        connector and count it in as `_handle` does for a plain one, or close it at once (no
        clear-text reply: an SMTPS client cannot read one, and the handshake is the work the
        limits are there to spare), then start its handshake bounded as STARTTLS's is. From a
        trusted proxy, its PROXY header is read first, in clear as the protocol sends it before
        the TLS bytes, and the client it names is the one counted."""
        try:
            local = sock.getsockname()
        except OSError:  # already reset by the client
            sock.close()
            return
        client = (canonical_ip(peer[0]), peer[1])
        local_end = (canonical_ip(local[0]), local[1])
        if self._trusted_proxy(client[0]):
            task = asyncio.get_running_loop().create_task(
                self._accept_proxied_tls(sock, client, local_end, ssl_ctx, on_connect)
            )
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)
            return
        self._start_tls_session(sock, client, local_end, ssl_ctx, on_connect)

    async def _accept_proxied_tls(
        self,
        sock: socket.socket,
        peer: tuple[str, int],
        local: tuple[str, int],
        ssl_ctx: ssl.SSLContext,
        on_connect: Callable[[Connection, _Admitted | None], Coroutine[Any, Any, None]],
    ) -> None:
        try:
            source = await asyncio.wait_for(_take_proxy_header(sock), PROXY_HEADER_TIMEOUT)
        except (proxy.ProxyError, ValueError, TimeoutError, OSError) as exc:
            logger.info("PROXY header from %s before implicit TLS refused: %s", peer[0], exc)
            sock.close()
            return
        except BaseException:  # cancelled (a stop): nobody else closes it
            sock.close()
            raise
        client = peer if source is None else (canonical_ip(source[0]), source[1])
        try:
            self._start_tls_session(sock, client, local, ssl_ctx, on_connect)
        except Exception:  # a task boundary, as on_connect's: log it, never leave the socket
            logger.exception("implicit TLS connection from %s via %s failed", client[0], peer[0])
            sock.close()

    def _start_tls_session(
        self,
        sock: socket.socket,
        client: tuple[str, int],
        local: tuple[str, int],
        ssl_ctx: ssl.SSLContext,
        on_connect: Callable[[Connection, _Admitted | None], Coroutine[Any, Any, None]],
    ) -> None:
        """Admit `client` (or close the socket) and start the TLS handshake on the socket."""
        connector = self.ctx.select(local[0], local[1], client[0]).connector
        if connector is None:
            logger.info(
                "no connector for %s on %s:%s; closed before the TLS handshake",
                client[0],
                local[0],
                local[1],
            )
            sock.close()
            return
        refusal = self.ctx.limits.admit(connector, client[0])
        if refusal is not None:
            self.ctx.counters.connections_refused[connector.name] += 1
            logger.debug(
                "%s from %s on implicit-TLS %s:%s; closed before the TLS handshake",
                refusal.line(),
                client[0],
                local[0],
                local[1],
            )
            sock.close()
            return
        self.ctx.counters.sessions[connector.name] += 1
        admitted = _Admitted(connector, client, local)
        timeout = max(  # asyncio refuses a handshake timeout that is not positive
            1.0,
            min(
                connector.connection_inactivity_timeout.total_seconds(),
                connector.connection_timeout.total_seconds(),
                60.0,
            ),
        )
        # `conn` starts its session (connection_made) once the handshake is done; the task
        # ends then, or when the handshake fails, times out or is cancelled (the loop closes the
        # transport): see `_handshake_done`.
        conn = Connection(lambda c: on_connect(c, admitted))
        loop = asyncio.get_running_loop()
        task = loop.create_task(
            loop.connect_accepted_socket(
                lambda: conn, sock, ssl=ssl_ctx, ssl_handshake_timeout=timeout
            )
        )
        self._handshakes.add(task)
        task.add_done_callback(
            functools.partial(self._handshake_done, conn, sock, client[0], admitted)
        )

    def _handshake_done(
        self,
        conn: Connection,
        sock: socket.socket,
        client_ip: str,
        admitted: _Admitted | None,
        task: asyncio.Task[Any],
    ) -> None:
        self._handshakes.discard(task)
        exc = None if task.cancelled() else task.exception()
        if conn.task is not None:
            return  # the session started: it releases the count when it ends
        # No session (a done callback: even for a task cancelled before it ran): nobody else
        # gives the count back or closes the socket (a no-op when the transport took it).
        sock.close()
        if admitted is not None:
            self.ctx.limits.release(admitted.connector, admitted.client[0])
        logger.debug("implicit TLS handshake with %s failed: %r", client_ip, exc)

    async def _handle(self, conn: Connection, admitted: _Admitted | None = None) -> None:
        if admitted is not None:  # implicit TLS: chosen and counted in by `_accept_tls`
            await self._serve(conn, admitted.connector, admitted.client, admitted.local)
            return
        peer = conn.get_extra_info("peername")
        local = conn.get_extra_info("sockname")
        if peer is None or local is None:
            return
        # No TCP_NODELAY here: asyncio and uvloop both set it on every accepted TCP socket (the
        # listening socket is made IPPROTO_TCP for asyncio's sake; tests/smtp/test_connection.py
        # and test_tls.py check it), so each reply leaves at once.
        client_ip, client_port = canonical_ip(peer[0]), peer[1]
        local_ip, local_port = canonical_ip(local[0]), local[1]
        initial = b""
        if self._trusted_proxy(client_ip):
            result = await self._read_proxy(conn)
            if result is None:
                return  # malformed PROXY header from the balancer: close
            source, initial = result
            if source is not None:
                client_ip, client_port = (
                    str(normalise_ip(ipaddress.ip_address(source[0]))),
                    source[1],
                )
        selection = self.ctx.select(local_ip, local_port, client_ip)
        connector = selection.connector
        if connector is None:
            logger.info(
                "no connector for %s on %s:%s; closed without banner",
                client_ip,
                local_ip,
                local_port,
            )
            return
        refusal = self.ctx.limits.admit(connector, client_ip)
        if refusal is not None:
            self.ctx.counters.connections_refused[connector.name] += 1
            conn.write(refusal.line().encode() + b"\r\n")
            try:
                await conn.drain()
            except ConnectionError:
                pass
            return
        self.ctx.counters.sessions[connector.name] += 1
        await self._serve(
            conn, connector, (client_ip, client_port), (local_ip, local_port), initial
        )

    async def _serve(
        self,
        conn: Connection,
        connector: ReceiveConnector,
        client: tuple[str, int],
        local: tuple[str, int],
        initial: bytes = b"",
    ) -> None:
        """Run the session of a connection counted in on `connector`; the count is released
        when it ends."""
        try:
            session = Session(
                self.ctx,
                connector,
                conn,
                client=client,
                local=local,
                # From the transport, never from the listener's configured mode.
                tls_active=conn.get_extra_info("ssl_object") is not None,
                initial=initial,
            )
        except BaseException:
            self.ctx.limits.release(connector, client[0])
            raise
        self._live.add(session)
        try:
            await session.run()
        finally:
            self._live.discard(session)
            self.ctx.limits.release(connector, client[0])

    async def _read_proxy(self, conn: Connection) -> tuple[tuple[str, int] | None, bytes] | None:
        """Read a PROXY v1 or v2 header from a trusted proxy. Returns (source, leftover bytes) or None."""
        buf = b""
        try:
            while len(buf) < 16:
                chunk = await asyncio.wait_for(conn.read(4096), PROXY_HEADER_TIMEOUT)
                if not chunk:
                    return None
                buf += chunk
                if buf.startswith(b"PROXY ") and b"\r\n" in buf:
                    break
            if buf.startswith(proxy.V2_SIGNATURE[: len(buf)]) and buf[:12] == proxy.V2_SIGNATURE:
                while True:
                    try:
                        source, length = proxy.parse_v2(buf)
                        return source, buf[length:]
                    except IndexError:
                        chunk = await asyncio.wait_for(conn.read(4096), PROXY_HEADER_TIMEOUT)
                        if not chunk:
                            return None
                        buf += chunk
            while b"\r\n" not in buf:
                if len(buf) > 107:
                    return None
                chunk = await asyncio.wait_for(conn.read(4096), PROXY_HEADER_TIMEOUT)
                if not chunk:
                    return None
                buf += chunk
            line, _, rest = buf.partition(b"\r\n")
            return proxy.parse_v1(line), rest
        except (proxy.ProxyError, ValueError, TimeoutError, UnicodeDecodeError):
            return None

    async def stop(self, grace: float = 5.0) -> None:
        if self._hurry:
            grace = 0.0
        for server in self._servers.values():
            server.close()
        for server in self._servers.values():
            await server.wait_closed() if not self._sessions else None
        self._servers.clear()
        self._states.clear()
        self._ssl.clear()
        if self._handshakes:  # implicit TLS without a session yet: nothing to finish
            handshakes = list(self._handshakes)
            for task in handshakes:
                task.cancel()
            await asyncio.wait(handshakes, timeout=grace)
        for session in list(self._live):
            session.shutdown()  # 421 to those waiting for a command; messages in DATA finish
        if self._sessions:
            _done, pending = await asyncio.wait(list(self._sessions), timeout=grace)
            for task in pending:
                task.cancel()

    def _tell_sessions_of_reload(self) -> None:
        """A reload was applied: each open session waiting for a command follows it now rather
        than at its next command (Session.reload_applied). Once per reload, never per command."""
        for session in list(self._live):
            try:
                session.reload_applied()
            except Exception:  # one session's failure must not fail the reload for the others
                logger.exception("session from %s could not follow the reload", session.client_ip)

    def cut_sessions(self) -> None:
        """Stop now (a second SIGTERM): cancel every session and TLS handshake, as `stop` does
        to those still open after its grace; a message not yet acknowledged is not kept (its
        client had no 250 and sends it again), one acknowledged is on disk already."""
        self._hurry = True  # and those accepted before the listeners close: no grace either
        for task in [*self._sessions, *self._handshakes]:
            task.cancel()


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
