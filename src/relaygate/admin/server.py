"""The admin listener: uvicorn serving `relaygate.admin.api` inside the relay's own event loop.

The socket is bound in `start()` (so "address in use" is an error at start-up, not a log line
later) and handed to uvicorn. uvicorn's own signal handling is switched off: SIGTERM/SIGINT/SIGHUP
belong to the relay (`relaygate.app`), which stops this server in its shutdown sequence.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, cast

import h11
import uvicorn
from starlette.routing import BaseRoute
from uvicorn.protocols.http.h11_impl import H11Protocol

from relaygate.admin.api import (
    TokenFileError,
    client_network,
    create_app,
    read_token,
    token_mode_warning,
)
from relaygate.admin.token_file import applied_token, applied_token_path
from relaygate.audit import admin_exposed
from relaygate.config.values import parse_binding
from relaygate.file_modes import mode_granting

__all__ = ["AdminServer", "AdminStartError", "load_admin_tls"]

log = logging.getLogger("relaygate.admin")


class AdminStartError(RuntimeError):
    """The admin listener cannot start: its token file cannot be read or is empty, or its
    address cannot be bound. `relaygate serve` reports it in one line and exits 1."""


#: Seconds a client has to send a whole request (head and body), from its connection or from the
#: previous response: uvicorn alone waits for ever until the first request is complete.
REQUEST_TIMEOUT = 30.0
#: Seconds an answer may stay stuck in the listener's buffer: written no further since the buffer
#: passed asyncio's high-water mark (the client reads nothing, or too little to bring it back under
#: the low-water mark), or since the connection began to close with an answer not yet all sent.
#: Then the connection is aborted: a client that pipelines requests and reads no answer held its
#: connection (and the answer's task) for ever, and a close waits for the buffer to drain.
WRITE_TIMEOUT = 30.0
#: Seconds the answers on a connection get once its client falls behind (the listener's buffer
#: past its high-water mark), plus one for each ANSWER_MIN_RATE bytes the client takes: a client
#: that takes less than that, on average, loses the connection. WRITE_TIMEOUT bounds one stall
#: only: a client reading a little (just enough to bring the buffer under its low-water mark
#: within WRITE_TIMEOUT), again and again, kept its connection and the answer's task for ever.
ANSWER_TIMEOUT = 60.0
#: Bytes a second: 4 KB/s (32 kbit/s) is far below any link an admin works over; a 10 MB listing
#: gets over 40 minutes.
ANSWER_MIN_RATE = 4096
#: Connections the admin listener keeps open at once (a closing one counts while an answer to it
#: is unsent: it holds its file descriptor until then). Past them a new connection takes the place
#: of the one that has waited longest, for a request (idle, or its request not yet all sent) or
#: for its client to read an answer (write-blocked), among those of the client holding the most;
#: when every one has a request being answered, the new one is closed at once. The listener
#: shares worker 0's file descriptors with SMTP, deliveries and the queue.
MAX_CONNECTIONS = 128


class _CountingTransport(asyncio.Transport):
    """A connection's transport, counting the bytes handed to it: with what its buffer still
    holds, what the client has taken (the answer deadline's measure, `_Protocol._check_answer`).
    The rest is the transport's own."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self.inner = inner
        self.handed = 0

    def taken(self) -> int:
        """Bytes handed to the transport and gone from its buffer (to the kernel, the client)."""
        return self.handed - self.inner.get_write_buffer_size()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.handed += len(data)
        self.inner.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.inner.write_eof()

    def can_write_eof(self) -> bool:
        return self.inner.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self.inner.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.inner.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.inner.set_write_buffer_limits(high, low)

    def abort(self) -> None:
        self.inner.abort()

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.inner.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.inner.pause_reading()

    def resume_reading(self) -> None:
        self.inner.resume_reading()

    def is_reading(self) -> bool:
        return self.inner.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.inner.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.inner.get_protocol()


class _Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request, for each answer's writing and for
    the answers a client falls behind on, and a cap on connections."""

    _deadline: asyncio.TimerHandle | None = None
    _waiting_since = 0.0  # loop time the deadline was armed: since then it waits for a request
    _write_deadline: asyncio.TimerHandle | None = None
    _blocked_since = 0.0  # loop time the write deadline was armed: since then writes are stuck
    counted: _CountingTransport  # self.transport, as connection_made wraps it
    _answer_deadline: asyncio.TimerHandle | None = None
    _behind_since = 0.0  # loop time the client fell behind (the answer deadline was armed)
    _taken_then = 0  # bytes it had taken then
    _full = False  # said once, until a connection is taken again
    _client = ""  # `_client_key`, worked out once: the cap compares it on every new connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # the answers' writes go through it (uvicorn hands self.transport to each request's cycle)
        self.transport = self.counted = _CountingTransport(transport)
        self._client = _client_key(self)
        if _open_count(self.connections) > MAX_CONNECTIONS and not self._make_room():
            if not _Protocol._full:
                log.warning(
                    "admin listener: %d connections open, each answering a request: new ones "
                    "are closed until some end",
                    MAX_CONNECTIONS,
                )
            _Protocol._full = True
            transport.abort()
            return
        _Protocol._full = False
        self._arm()

    def _make_room(self) -> bool:
        """Close a connection that waits for its client, if one does (for a request, or to have
        an answer read: `_waiting_for_client`): the one that has waited longest among those of
        the client (``client_network``) holding the most connections. Closing the new one instead let
        a single client that keeps MAX_CONNECTIONS connections open (idle keep-alive, requests
        trickled in under REQUEST_TIMEOUT, pipelined requests whose answers it never reads) lock
        out everyone else: the admins, `relaygate queue` and the load balancer's /healthz probe.
        Closing the longest waiting whoever held it let a client opening connections fast close
        an admin's before its request was read (a turn of the loop after the accept)."""
        waiting = {
            p: since
            for p in _open(self.connections)
            if p is not self
            and isinstance(p, _Protocol)
            and (since := p._waiting_for_client()) is not None
        }
        if not waiting:
            return False
        held = collections.Counter(
            p._client for p in _open(self.connections) if isinstance(p, _Protocol)
        )
        victim = min(waiting, key=lambda p: (-held[p._client], waiting[p]))
        victim._disarm()
        victim._unwatch_writes()
        victim._unwatch_answer()
        victim.transport.abort()  # at once: a client that reads nothing keeps no buffer alive
        return True

    def _waiting_for_client(self) -> float | None:
        """Since when (loop time) this connection waits for its client: for a request (it may
        be closed as idle), or for it to read an answer (write-blocked); None while its request
        is being answered."""
        if self._write_deadline is not None:
            return self._blocked_since
        if self._deadline is not None and not self.transport.is_closing():
            return self._waiting_since
        return None

    def _arm(self) -> None:
        self._disarm()
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(REQUEST_TIMEOUT, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()  # a request begun and not finished, or none at all
            self._bound_unsent()

    def _watch_writes(self) -> None:
        """Abort the connection if its buffer is not written further within WRITE_TIMEOUT."""
        if self._write_deadline is None:
            self._blocked_since = self.loop.time()
            self._write_deadline = self.loop.call_later(WRITE_TIMEOUT, self._write_expired)

    def _unwatch_writes(self) -> None:
        if self._write_deadline is not None:
            self._write_deadline.cancel()
            self._write_deadline = None

    def _write_expired(self) -> None:
        self._write_deadline = None
        self.transport.abort()  # close() would wait for the buffer to drain, for ever

    def _watch_answer(self) -> None:
        """The client fell behind: from now its answers get ANSWER_TIMEOUT, plus a second for each
        ANSWER_MIN_RATE bytes it takes, while any of them waits in the buffer."""
        if self._answer_deadline is None:
            self._behind_since = self.loop.time()
            self._taken_then = self.counted.taken()
            self._answer_deadline = self.loop.call_later(ANSWER_TIMEOUT, self._check_answer)

    def _unwatch_answer(self) -> None:
        if self._answer_deadline is not None:
            self._answer_deadline.cancel()
            self._answer_deadline = None

    def _caught_up(self) -> bool:
        """Nothing is owed to the client: its buffer is empty and no answer is being made (none
        to a pipelined request either: uvicorn starts the next one as the last one ends). A
        buffer merely empty is not enough: the kernel takes a few hundred KB at times, and a
        client reading a little then found caught up got a new ANSWER_TIMEOUT each time."""
        if self.transport.get_write_buffer_size():
            return False
        cycle = self.cycle
        return cycle is None or cycle.response_complete

    def _check_answer(self) -> None:
        """At the deadline: caught up, the watch ends; taken enough meanwhile, the deadline moves
        on by what it earned; else the connection is aborted."""
        self._answer_deadline = None
        if self._caught_up():
            return
        earned = (self.counted.taken() - self._taken_then) / ANSWER_MIN_RATE
        left = self._behind_since + ANSWER_TIMEOUT + earned - self.loop.time()
        if left > 0:
            self._answer_deadline = self.loop.call_later(left, self._check_answer)
            return
        self._unwatch_writes()
        self.transport.abort()  # close() would wait for the buffer to drain

    def _bound_unsent(self) -> None:
        """After the transport began to close: asyncio closes the socket once the buffer is
        empty, so an answer still in it gets WRITE_TIMEOUT to be written."""
        if self.transport.is_closing() and self.transport.get_write_buffer_size():
            self._watch_writes()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_writes()
        self._watch_answer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._unwatch_writes()
        self._bound_unsent()  # a closing one that drains gets its time again from here

    def shutdown(self) -> None:
        """The server stops: uvicorn lets each answer finish, but one the client does not read
        never would (the stop waited its whole grace, then cancelled the answer and logged a
        traceback): a write-blocked connection is aborted at once."""
        if self._write_deadline is not None:
            self._unwatch_writes()
            self._unwatch_answer()
            self.transport.abort()
            return
        super().shutdown()

    def timeout_keep_alive_handler(self) -> None:
        super().timeout_keep_alive_handler()
        self._bound_unsent()

    def send_400_response(self, msg: str) -> None:
        super().send_400_response(msg)
        self._bound_unsent()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state not in (h11.IDLE, h11.SEND_BODY):
            self._disarm()  # the whole request is in: the application takes its time

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
            self._arm()
        self._bound_unsent()  # the answer's ``Connection: close``, or the client's

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._unwatch_writes()
        self._unwatch_answer()
        super().connection_lost(exc)

    # The admin listener serves plain HTTP/1.1 and no WebSocket: a request asking to upgrade
    # (``Upgrade: websocket``, curl's ``h2c``) is answered as HTTP/1.1, as it was. uvicorn logged two
    # warnings for each one, the second telling the admin to install a WebSocket library: anyone
    # who reached the port could fill the service log with them, and following the advice would
    # have let WebSocket requests past the guard (`relaygate.admin.guard._Guard` checks HTTP only).

    def _should_upgrade_to_ws(self) -> bool:
        return False

    def _unsupported_upgrade_warning(self) -> None:
        pass


def _open(connections: Iterable[Any]) -> list[Any]:
    """The connections not closed yet: not closing, or closing with an answer still unsent (its
    socket stays open until then). An aborted one stays in uvicorn's set until its
    connection_lost, a turn of the loop later, and counted, it made the listener look full while
    a burst of new connections was being accepted (abort empties the buffer)."""
    return [
        p
        for p in connections
        if not p.transport.is_closing() or p.transport.get_write_buffer_size()
    ]


def _open_count(connections: Iterable[Any]) -> int:
    return len(_open(connections))


def _client_key(protocol: Any) -> str:
    """Whose connection it is: its IPv4 address, or its IPv6 address's /64 (`client_network`;
    each loopback address apart, unlike the wrong-token count's `guess_key`)."""
    client = getattr(protocol, "client", None)
    return client_network(client[0]) if client else ""


#: uvicorn logs "Invalid HTTP request received." for every malformed request (a port scanner, TLS
#: spoken to the HTTP port): it is let through once in this many seconds, with a count.
INVALID_REQUEST_LOG_INTERVAL = 60.0
_INVALID_REQUEST = "Invalid HTTP request received."


class _InvalidRequestLines(logging.Filter):
    """A filter on uvicorn's logger: its line for a malformed request, once per
    INVALID_REQUEST_LOG_INTERVAL with how many were left out since. Anyone who reached the
    listener could write a warning to the service log with each malformed request."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _INVALID_REQUEST:
            return True
        now = time.monotonic()
        if self._last is not None and now - self._last < INVALID_REQUEST_LOG_INTERVAL:
            self._left_out += 1
            return False
        self._last = now
        if self._left_out:
            record.msg = "admin listener: invalid HTTP request (answered 400); %d more since the last such line"
            record.args = (self._left_out,)
        else:
            record.msg = "admin listener: invalid HTTP request (answered 400); more in the next %d s are counted, not logged"
            record.args = (int(INVALID_REQUEST_LOG_INTERVAL),)
        self._left_out = 0
        return True


def load_admin_tls(config: Any) -> ssl.SSLContext | None:
    """The admin listener's TLS context from ``admin.tls_certificate_file`` / ``tls_key_file``
    (None: neither is set, plain HTTP). TLS 1.2 and later only. Blocking (file reads): run it in
    a thread. AdminStartError naming the key and the file when one cannot be read, or both when
    they do not load together (not PEM, a key that is not the certificate's)."""
    admin = config.admin
    cert, key = admin.tls_certificate_file, admin.tls_key_file
    if cert is None or key is None:
        return None
    for name, path in (("tls_certificate_file", cert), ("tls_key_file", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise AdminStartError(
                f"cannot read admin.{name} {str(path)!r}: {exc.strerror or exc}"
            ) from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise AdminStartError(
            f"admin.tls_certificate_file {str(cert)!r} and admin.tls_key_file {str(key)!r} "
            f"cannot be loaded together: {reason}"
        ) from exc
    return context


def tls_key_mode_warning(config: Any) -> str | None:
    """A warning when ``admin.tls_key_file`` is readable or writable by every local user (a copy
    keeps `cp`'s 0644): any of them can pose as the admin listener and read the token and the
    session cookies the admins send it. Group access is left alone. None otherwise, or when it
    cannot be examined."""
    key = config.admin.tls_key_file
    mode = None if key is None else mode_granting(key, 0o007)
    if mode is None:
        return None
    return (
        f"admin.tls_key_file {str(key)!r} has mode {mode:04o}: every local user can read the "
        f"admin listener's private key, pose as it and read the API token the admins send it; "
        f"chmod o-rwx {key}"
    )


#: (mtime, ctime, inode, size) of the admin certificate file then its key file (None: absent)
_TlsStamp = tuple[tuple[int, int, int, int] | None, ...]


def _tls_stamp(config: Any) -> _TlsStamp:
    """What tells that the admin certificate or key file changed: replaced, rewritten, or its
    mode or owner changed (a fix of an unreadable key). Empty without TLS."""
    admin = config.admin
    if admin.tls_certificate_file is None or admin.tls_key_file is None:
        return ()
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in (admin.tls_certificate_file, admin.tls_key_file):
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(stamps)


class _SwappableTls:
    """The listener's TLS context, replaceable while it runs: every handshake is begun with one
    context (``front``, `_Handshake`); its SNI callback, which OpenSSL calls for every handshake,
    with or without a server name, hands the handshake the current context. A renewed
    certificate is then served from the next connection on without reopening the listener;
    open connections keep theirs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.front = self.current = context
        context.sni_callback = self._choose

    def _choose(self, connection: Any, _server_name: str | None, _context: Any) -> None:
        if connection.context is not self.current:
            connection.context = self.current

    def swap(self, context: ssl.SSLContext) -> None:
        self.current = context


class _Handshakes:
    """The HTTPS connections of one listener whose TLS handshake is under way, oldest first. The
    HTTP protocol hears of a connection only once its handshake is done: left to asyncio, one
    that never began it stayed 60 s, and any number of them could be open at once (file
    descriptors the listener shares with SMTP), outside REQUEST_TIMEOUT and MAX_CONNECTIONS."""

    def __init__(self, tls: _SwappableTls) -> None:
        self.tls = tls
        self.pending: dict[_Handshake, None] = {}

    def factory(self, **uvicorn_args: Any) -> _Handshake:
        """uvicorn's protocol factory (its ``http``): a handshake, then the HTTP protocol."""
        return _Handshake(self, _Protocol(**uvicorn_args))

    def admit(self, handshake: _Handshake) -> None:
        """Past MAX_CONNECTIONS handshakes, the oldest makes room: each waits for its client."""
        while len(self.pending) >= MAX_CONNECTIONS:
            oldest = next(iter(self.pending))
            self.pending.pop(oldest)
            oldest.transport.abort()
        self.pending[handshake] = None

    def abort_all(self) -> None:
        """The listener stops: handshakes under way end now."""
        for handshake in list(self.pending):
            handshake.transport.abort()
        self.pending.clear()


class _Handshake(asyncio.Protocol):
    """An HTTPS connection until its TLS handshake is done (REQUEST_TIMEOUT at most), then its
    HTTP protocol's. The TLS layer is put in at once, in connection_made: started from a task
    (``loop.start_tls``), uvloop had already delivered the ClientHello here, and it was lost
    (the handshake then hung until its timeout, one connection in four). asyncio's SSLProtocol
    is what ``create_server(ssl=...)`` puts in; it serves uvloop's transports as well."""

    transport: asyncio.Transport

    def __init__(self, handshakes: _Handshakes, protocol: _Protocol) -> None:
        self.handshakes = handshakes
        self.protocol = protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are no asyncio.Transport subclasses: not asserted)
        self.transport = cast(asyncio.Transport, transport)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        tls = sslproto.SSLProtocol(
            loop,
            self.protocol,  # its connection_made comes with the TLS transport, once it is done
            self.handshakes.tls.front,
            done,
            server_side=True,
            ssl_handshake_timeout=REQUEST_TIMEOUT,  # type: ignore[arg-type]  # (seconds, a float)
        )
        transport.set_protocol(tls)
        tls.connection_made(transport)
        self.handshakes.admit(self)
        done.add_done_callback(self._handshake_ended)

    def _handshake_ended(self, done: asyncio.Future[None]) -> None:
        """Done, failed or timed out (the TLS layer aborts the connection then): no longer
        under way. A failure is not logged: a client that is no TLS client, too slow, or gone."""
        self.handshakes.pending.pop(self, None)
        if not done.cancelled():
            done.exception()  # retrieved: asyncio would log it as never retrieved


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the relay owns the signals
        yield


class AdminServer:
    """Serves the admin application on ``config.admin.listen``.

    relay: an object with ``config``, ``store`` and ``manager`` (and ``server`` for /healthz).
    extra_routes: further Starlette routes (the web admin centre's pages).
    """

    def __init__(self, relay: Any, *, extra_routes: Sequence[BaseRoute] = ()) -> None:
        self.relay = relay
        self.extra_routes = list(extra_routes)
        self.app: Any = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint: tuple[str, int] | None = None
        self._invalid_lines = _InvalidRequestLines()
        self._tls: _SwappableTls | None = None
        self._handshakes: _Handshakes | None = None
        #: The certificate files as last loaded, or as they were when they last failed to load
        #: (logged once: `watch_certificate` tries again when they change again).
        self._tls_stamp: _TlsStamp = ()
        #: A worker 0 started again whose admin pair cannot be loaded: the listener is not open
        #: yet, and `watch_certificate` opens it once the files load (`_open_when_loaded`).
        self._closed_for_tls = False

    @property
    def url(self) -> str | None:
        if self.endpoint is None:
            return None
        host, port = self.endpoint
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def serves_tls(self) -> bool:
        """Whether the listener speaks HTTPS (fixed at start: turning TLS on or off waits for a
        restart, like admin.listen), or will once its pair loads (`_closed_for_tls`)."""
        return self._tls is not None or self._closed_for_tls

    @staticmethod
    def load_tls(config: Any, *, warn: bool = True) -> tuple[ssl.SSLContext | None, _TlsStamp]:
        """`load_admin_tls` of ``config`` with the files' stamp taken before they were read.
        Blocking: run it in a thread. A key file every local user may read is used, with a
        warning unless ``warn`` is false (a worker that only checks the files)."""
        stamp = _tls_stamp(config)
        context = load_admin_tls(config)
        if warn and (warning := tls_key_mode_warning(config)) is not None:
            log.warning("%s", warning)  # warned, not refused: the admins would lose HTTPS
        return context, stamp

    def apply_tls(self, loaded: tuple[ssl.SSLContext | None, _TlsStamp]) -> None:
        """A reload's certificate (from `load_tls`): served from the next connection on."""
        context, stamp = loaded
        if self._tls is not None and context is not None:
            self._tls.swap(context)
            self._tls_stamp = stamp

    async def watch_certificate(self) -> bool:
        """Load the certificate and key again when their files changed since they were last
        loaded (a renewal copied in place, as the SMTP listener's are taken on a reload): the
        next connections get the new certificate. Files that do not load are logged once,
        naming the keys, and the running certificate stays. True when a certificate was taken
        (its expiry date is then read again)."""
        if self._closed_for_tls:
            return await self._open_when_loaded()
        if self._tls is None:
            return False
        config = self.relay.config
        if _tls_stamp(config) == self._tls_stamp:
            return False
        try:
            context, stamp = await asyncio.to_thread(self.load_tls, config)
        except AdminStartError as exc:
            self._tls_stamp = _tls_stamp(config)
            log.error("admin listener keeps the certificate it serves: %s", exc)
            return False
        if context is not None and self.relay.config is config:
            self.apply_tls((context, stamp))
            log.info("admin listener: certificate %s reloaded", config.admin.tls_certificate_file)
            return True
        return False

    async def _open_when_loaded(self) -> bool:
        """The listener left closed at start (`_closed_for_tls`): opened once the certificate
        files changed and load; still failing, said again only when they change again."""
        config = self.relay.config
        if _tls_stamp(config) == self._tls_stamp:
            return False
        try:
            context, stamp = await asyncio.to_thread(self.load_tls, config)
        except AdminStartError as exc:
            self._tls_stamp = _tls_stamp(config)
            log.error("admin listener still closed: %s", exc)
            return False
        if context is None or self.relay.config is not config:
            return False  # a reload meanwhile: the next turn looks at its files
        self._closed_for_tls = False
        self._tls_stamp = stamp
        try:
            await self._listen(config, context)
        except AdminStartError as exc:  # its port taken meanwhile: tried again at a change
            self._closed_for_tls = True
            log.error("admin listener still closed: %s", exc)
            return False
        return True

    def _bind(self) -> socket.socket:
        binding = parse_binding(self.relay.config.admin.listen)
        family = socket.AF_INET6 if binding.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((binding.address, binding.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def read_token(config: Any, *, warn: bool = True) -> str | None:
        """The API token ``config`` names (None: no token file). AdminStartError when the file
        cannot be read or holds no token: at start the relay does not start, at a reload the
        reload is refused (the running token stays; a file emptied by mistake never opens the
        API). A file every local user may read or write is used, with a warning (at a reload
        too: a rotated token copied with `cp` is 0644) unless ``warn`` is false (a worker that
        only checks the file, so that it refuses the reload the admin centre's worker does)."""
        token_file = getattr(config.admin, "api_token_file", None)
        try:
            token = read_token(token_file)
        except OSError as exc:
            raise AdminStartError(
                f"cannot read admin.api_token_file {str(token_file)!r}: {exc.strerror or exc}"
            ) from exc
        except TokenFileError as exc:
            raise AdminStartError(str(exc)) from exc
        if warn and (warning := token_mode_warning(token_file)) is not None:
            log.warning("%s", warning)  # warned, not refused: the relay starts, the reload goes on
        return token

    def _start_token(self, config: Any) -> str | None:
        """`read_token` at start. Worker 0 of several, started again by its supervisor, whose
        token file cannot be used now keeps the token the node applied (kept by the worker 0
        before it: token_file.keep_applied_token), and says so once, naming the file: a reload
        refusing that file left the other workers on it, and this worker used to exit and be
        restarted, over and over. At the node's start there is no such token (the supervisor
        forgets it): a file that cannot be used stops the start, as with one process."""
        try:
            return self.read_token(config)
        except AdminStartError as exc:
            if getattr(self.relay, "worker_index", None) != 0:
                raise
            data_dir = config.server.data_dir
            kept = applied_token(data_dir, config.admin.api_token_file)
            if kept is None:
                raise
            log.warning(
                "%s; this worker started again with the API token the node runs (%s) until a "
                "reload reads a usable file",
                exc,
                applied_token_path(data_dir),
            )
            return kept

    def apply_token(self, token: str | None, *, metrics_require_token: bool) -> None:
        """A reload's token (from `read_token`) and ``admin.metrics_require_token``: the API, the
        pages, /api/health's whole report and /metrics (when it asks for the token) require it
        from the next request on (the guard reads both from the app's state per request); a
        changed token ends every session of the admin centre (their HMAC was made with the old
        one)."""
        if self.app is not None:
            self.app.state.token = token
            self.app.state.metrics_require_token = metrics_require_token

    async def start(self) -> None:
        if self._task is not None:
            return
        config = self.relay.config
        token = self._start_token(config)
        self.app = create_app(self.relay, token=token, extra_routes=self.extra_routes)
        context = await self._start_tls(config)
        if not self._closed_for_tls:
            await self._listen(config, context)

    async def _start_tls(self, config: Any) -> ssl.SSLContext | None:
        """`load_tls` at start. Worker 0 of several, started again by its supervisor, whose
        pair cannot be loaded now (a key emptied or replaced: a reload refused it, the running
        worker 0 kept the certificate it served) leaves the listener closed until the files
        load (`watch_certificate`), and says so once, naming the keys and files: it used to
        exit and be restarted, over and over, its SMTP listeners opened and closed at each try.
        No copy of the private key is kept for it. At the node's start a pair that cannot be
        loaded stops the start, as with one process."""
        stamp = _tls_stamp(config)
        try:
            context, self._tls_stamp = await asyncio.to_thread(self.load_tls, config)
        except AdminStartError as exc:
            if getattr(self.relay, "worker_index", None) != 0 or not getattr(
                self.relay, "started_again", False
            ):
                raise
            self._closed_for_tls, self._tls_stamp = True, stamp
            log.error(
                "%s; this worker started again: the admin listener stays closed until the files "
                "load (SMTP is served meanwhile)",
                exc,
            )
            return None
        return context

    async def _listen(self, config: Any, context: ssl.SSLContext | None) -> None:
        """Open the listener on admin.listen, HTTPS with `context` (None: plain HTTP)."""
        self._tls = _SwappableTls(context) if context is not None else None
        self._handshakes = _Handshakes(self._tls) if self._tls is not None else None
        try:
            sock = self._bind()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise AdminStartError(
                f"cannot listen on admin.listen {config.admin.listen}: {reason}"
            ) from exc
        name = sock.getsockname()
        self.endpoint = (name[0], name[1])
        server = _Server(
            uvicorn.Config(
                self.app,
                # HTTPS: the handshake is done here (`_Handshakes`), not by uvicorn's ssl option
                # (uvicorn calls ``http`` as it would the class: a factory does as well)
                http=cast(Any, self._handshakes.factory) if self._handshakes else _Protocol,
                log_level="warning",
                # its lines go through the service log (relaygate.logs.service), in its format
                log_config=None,
                access_log=False,
                lifespan="off",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._server = server
        logging.getLogger("uvicorn.error").addFilter(self._invalid_lines)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="relaygate-admin")
        while not server.started:
            if self._task.done():
                failure = self._task.exception()
                self._task = None
                logging.getLogger("uvicorn.error").removeFilter(self._invalid_lines)
                sock.close()
                raise AdminStartError(
                    f"admin listener on {config.admin.listen} failed: {failure!r}"
                )
            await asyncio.sleep(0.01)
        log.info("admin centre and API listening on %s", self.url)
        if admin_exposed(config):
            log.warning(
                "the admin listener on %s is reachable from the network and admin.api_token_file "
                "is not set: anyone who reaches it can read and remove queued mail",
                config.admin.listen,
            )

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is None or task is None:
            return
        logging.getLogger("uvicorn.error").removeFilter(self._invalid_lines)
        server.should_exit = True
        if self._handshakes is not None:
            self._handshakes.abort_all()
        try:
            await asyncio.wait_for(asyncio.shield(task), 8.0)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            log.exception("admin listener stopped with an error")
