"""The admin listener's connections: how many it keeps open and how long a client may take.

uvicorn's HTTP protocol with a cap on open connections (a new one takes the place of the one
that has waited longest, of the client holding the most), a deadline for each request, one for
an answer stuck in the buffer and one for a client that reads its answers too slowly; and, for
HTTPS, the connections whose TLS handshake is under way, under the same cap and deadline.

Separate from server.py (the listener's start, token and certificate, stop) because this is
what every connection goes through and what a hostile or slow client meets; its limits are
module attributes that tests lower (patch them here, where they are read).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from asyncio import sslproto
from collections.abc import Iterable
from typing import Any, cast

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from relaygate.admin.api import client_network
from relaygate.admin.tls import _SwappableTls

log = logging.getLogger("relaygate.admin")


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
