"""The listeners of an `SmtpServer` made to match a configuration, at start and at each reload.

Separate from accepting connections (server.py) because it is a reload's all-or-nothing step:
the sockets to open or reopen (another TLS mode, another certificate, key or TLS version floor on
an implicit-TLS socket, a [::] socket becoming IPv6-only) are found and their TLS contexts built in
a thread first, and when one cannot be opened those opened are closed and those closed are
opened again. `_ListenerSync` is the mixin `SmtpServer` is made with; it declares what of the
server it uses.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from relaygate.config.model import Config, ReceiveConnector
from relaygate.config.values import Binding
from relaygate.smtp.connection import Connection
from relaygate.smtp.listener_sockets import (
    LISTEN_BACKLOG,
    ListenerError,
    _bound_socket,
    listener_bindings,
)
from relaygate.smtp.starttls_contexts import _files_stamp, _FilesStamp
from relaygate.smtp.steering import attach_source_steering
from relaygate.smtp.tls import listener_files, server_context
from relaygate.smtp.tls_listener import _Admitted, _TlsListener

if TYPE_CHECKING:
    import socket

    from relaygate.smtp.server_context import ServerContext

logger = logging.getLogger("relaygate.smtp")


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


class _Deferred(NamedTuple):
    """An implicit-TLS listener left closed because its certificate cannot be loaded."""

    reason: TlsUnavailable
    stamp: _FilesStamp  # its files when they failed: tried again once they change


def _implicit_files_stamp(config: Config, binding: Binding) -> _FilesStamp:
    connector = _implicit_connector(config, binding)
    return _files_stamp(listener_files(config, connector, implicit=True))


def _listeners_to_open(
    config: Config,
    wanted: dict[Binding, bool],
    current: dict[Binding, _ListenerState],
    *,
    defer_tls: bool = False,
) -> tuple[
    dict[Binding, _ListenerState], dict[Binding, ssl.SSLContext | None], dict[Binding, _Deferred]
]:
    """(the state of every wanted listener, the TLS context of each to open or reopen: None for
    a plain one, the implicit-TLS ones whose certificate cannot be loaded) for
    `SmtpServer.sync_listeners`. Blocking: reads the certificate files. ListenerError if an
    implicit-TLS listener's certificate cannot be loaded, unless `defer_tls`."""
    states = {b: _listener_state(config, b, implicit) for b, implicit in wanted.items()}
    contexts: dict[Binding, ssl.SSLContext | None] = {}
    deferred: dict[Binding, _Deferred] = {}
    for binding in (b for b in wanted if current.get(b) != states[b]):
        stamp = _implicit_files_stamp(config, binding) if wanted[binding] else ()
        try:
            contexts[binding] = _implicit_context(config, binding) if wanted[binding] else None
        except TlsUnavailable as exc:
            if not defer_tls:
                raise ListenerError(binding, exc) from exc
            if binding in current:  # open with the pair it loaded: kept (a reload tries again)
                states[binding] = current[binding]
                continue
            deferred[binding] = _Deferred(exc, stamp)
            del states[binding]
            continue
        if wanted[binding]:  # a self-signed certificate is created by the first context
            states[binding] = _listener_state(config, binding, True)
    return states, contexts, deferred


class _ListenerSync:
    """`SmtpServer`'s listeners: opened, reopened and closed to match the configuration."""

    # What of `SmtpServer.__init__` (server.py) this uses (see there for what each one is).
    ctx: ServerContext
    reuse_port: bool
    workers: int
    _servers: dict[Binding, asyncio.Server | _TlsListener]
    _states: dict[Binding, _ListenerState]
    _ssl: dict[Binding, ssl.SSLContext | None]
    _syncing: asyncio.Lock
    _sessions: set[asyncio.Task[None]]
    #: A worker started again by its supervisor (not at the node's start): an implicit-TLS
    #: listener whose certificate cannot be loaded is left closed (`_deferred`), its siblings
    #: serving its port, instead of stopping the start (the worker exited at every restart).
    defer_unloadable_tls = False
    _deferred: dict[Binding, _Deferred]

    if TYPE_CHECKING:
        # SmtpServer's (server.py): what a listener hands its connections to.
        async def _handle(self, conn: Connection, admitted: _Admitted | None = None) -> None: ...

        def _accept_tls(
            self,
            sock: socket.socket,
            peer: Any,
            *,
            ssl_ctx: ssl.SSLContext,
            on_connect: Callable[[Connection, _Admitted | None], Coroutine[Any, Any, None]],
        ) -> None: ...

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
        await self.sync_listeners(defer_tls=self.defer_unloadable_tls)

    async def open_deferred(self) -> bool:
        """Try again the implicit-TLS listeners left closed (`defer_unloadable_tls`) whose
        certificate files changed since they failed (the watcher calls it every few seconds).
        True when one was opened."""
        config = self.ctx.config
        changed = await asyncio.to_thread(self._deferred_files_changed, config)
        if not changed:
            return False
        before = set(self._servers)
        await self.sync_listeners(defer_tls=True)
        return bool(set(self._servers) - before)

    def _deferred_files_changed(self, config: Config) -> bool:
        """Blocking (stat): whether a deferred listener's files differ from when they failed."""
        return any(
            _implicit_files_stamp(config, binding) != d.stamp
            for binding, d in self._deferred.items()
            if binding in listener_bindings(config)
        )

    async def sync_listeners(
        self,
        config: Config | None = None,
        *,
        before_serving: Callable[[], None] | None = None,
        defer_tls: bool = False,
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
        configuration there). With `defer_tls`, an implicit-TLS listener whose certificate
        cannot be loaded is left closed (logged once, naming connector, keys and files) and the
        others are opened: `open_deferred` tries it again."""
        async with self._syncing:
            await self._sync_listeners(config, before_serving, defer_tls)

    async def _sync_listeners(
        self,
        config: Config | None,
        before_serving: Callable[[], None] | None,
        defer_tls: bool = False,
    ) -> None:
        old = self.ctx.config
        config = old if config is None else config
        wanted = listener_bindings(config)
        # In a thread: the certificate files are read, and an ACME pair under its lock, which
        # the ACME client holds while it writes and fsyncs a renewal (seconds on a slow disk).
        states, contexts, deferred = await asyncio.to_thread(
            functools.partial(_listeners_to_open, defer_tls=defer_tls),
            config,
            wanted,
            dict(self._states),
        )
        self._say_deferred(deferred)
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
        self._deferred = deferred
        for binding, server in opened.items():
            self._servers[binding] = server
            self._states[binding], self._ssl[binding] = states[binding], contexts[binding]
            await server.start_serving()

    def _say_deferred(self, deferred: dict[Binding, _Deferred]) -> None:
        """Log each listener left closed: once, and again only when its files changed and
        still fail (not at every look of the watcher)."""
        for binding, d in deferred.items():
            before = self._deferred.get(binding)
            if before is None:
                logger.error(
                    "%s; this worker started again: its listener %s stays closed in this worker "
                    "until the files load (the other workers serve it)",
                    d.reason,
                    binding,
                )
            elif before.stamp != d.stamp:
                logger.error("listener %s still closed in this worker: %s", binding, d.reason)

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
