"""An implicit-TLS listening socket with its own accept loop, and what its accept hands on.

Separate because it replaces asyncio's accept loop for one reason: with `create_server(ssl=...)`
the TLS handshake ran before a connection was counted against its connector's limits. Here each
accepted socket goes to the server (`SmtpServer._accept_tls`) before a byte of it is read, which
admits or closes it (`_Admitted`: the connection counted in) before its handshake.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

from relaygate.config.model import ReceiveConnector
from relaygate.smtp.listener_sockets import LISTEN_BACKLOG

logger = logging.getLogger("relaygate.smtp")

_ACCEPT_RETRY_DELAY = 1.0  # seconds without accepting after EMFILE and the like (as asyncio)


class _Admitted(NamedTuple):
    """An implicit-TLS connection counted against its connector's limits before its handshake."""

    connector: ReceiveConnector
    client: tuple[str, int]
    local: tuple[str, int]


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
