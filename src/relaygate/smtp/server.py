"""Listeners: one per distinct binding (a specific address beside a wildcard of its port shares
the wildcard's socket, see `listener_bindings`); the connector is chosen per connection by the
policy engine from the connection's real local address.

A client that no connector accepts is closed without a banner. A PROXY header is honoured only from
`server.trusted_proxies`; elsewhere `PROXY ...` reaches the session as an unrecognised command.

This module holds `SmtpServer`'s connections: accepted (plain, or implicit TLS before its
handshake), their PROXY header read, counted against their connector's limits, their session
run, and the server's stop. Beside it: which sockets and how they are bound
(listener_sockets.py), the listeners made to match a configuration (listener_sync.py, the mixin
`SmtpServer` is made with), the implicit-TLS accept loop (tls_listener.py), what the sessions
share (server_context.py) and the STARTTLS contexts (starttls_contexts.py); the names other
modules import from here are re-exported.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

from relaygate.config.model import ReceiveConnector
from relaygate.config.values import Binding, normalise_ip
from relaygate.smtp import proxy
from relaygate.smtp.connection import Connection
from relaygate.smtp.listener_sockets import LISTEN_BACKLOG as LISTEN_BACKLOG
from relaygate.smtp.listener_sockets import (
    ListenerError,
    check_bindings_free,
    listener_bindings,
)
from relaygate.smtp.listener_sync import TlsUnavailable, _ListenerState, _ListenerSync
from relaygate.smtp.server_context import Handoff as Handoff
from relaygate.smtp.server_context import ServerContext
from relaygate.smtp.server_context import protocol_log_for as protocol_log_for
from relaygate.smtp.session import Session
from relaygate.smtp.starttls_contexts import StarttlsContexts, load_starttls_contexts
from relaygate.smtp.tls_listener import _Admitted, _TlsListener

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


@functools.lru_cache(maxsize=8192)
def canonical_ip(text: str) -> str:
    """A socket address as the policy compares it: no zone id, IPv4-mapped IPv6 as IPv4."""
    return str(normalise_ip(ipaddress.ip_address(text.partition("%")[0])))


class SmtpServer(_ListenerSync):
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
        #: Implicit-TLS listeners left closed (`defer_unloadable_tls`), their files then.
        self._deferred = {}
        # One `sync_listeners` at a time (a SIGHUP reload beside the watcher's certificate
        # refresh): each compares the listeners as they are with what it wants.
        self._syncing = asyncio.Lock()
        self._sessions: set[asyncio.Task[None]] = set()
        self._handshakes: set[asyncio.Task[Any]] = set()  # implicit TLS, before the session
        self._live: set[Session] = set()  # told of reloads, and to finish when the server stops
        self._hurry = False  # `cut_sessions`: stop without a grace
        ctx.on_reload(self._tell_sessions_of_reload)

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
