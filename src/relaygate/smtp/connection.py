"""The transport under one SMTP session: the few stream calls a session makes, and nothing more.

asyncio's StreamReader copies every chunk into its own buffer, copies it out again on read, and
runs flow-control checks on both sides; the session then copies it into its own buffer. Here a
chunk the kernel delivered is handed to the session's waiting `read` as it is. Measured at 10
sessions, the stream reader machinery was 5.9 % of the event loop's time (docs/benchmarks.md).

A `Connection` is the asyncio protocol of one accepted socket. `connection_made` starts the
session task (`on_connect(connection)`); the session then calls `read`, `write`, `drain`,
`start_tls`, `get_extra_info` and `close`, with the semantics of StreamReader/StreamWriter:
`read` returns b"" at EOF and raises the error a lost connection reported; `drain` waits while the
transport's buffer is over its high-water mark. An EOF from the client keeps the transport open
for the replies still to be written (half-close), except over TLS.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Connection"]

# Unread bytes at which the socket stops being read (the rest waits in the kernel). A message
# streams while the session reads it, so DATA may run ahead by 2 MB; between messages a session
# that is not reading (a tarpit, a store commit, a password check) must not hold megabytes for
# each of thousands of connections: 64 KB is a pipeline of ~2 000 commands.
_PAUSE_ABOVE = 2 * 1024 * 1024
_PAUSE_ABOVE_COMMANDS = 64 * 1024
_TCP_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)  # Linux only (see ack_now)


class Connection(asyncio.Protocol):
    def __init__(self, on_connect: Callable[[Connection], Coroutine[Any, Any, None]]) -> None:
        self._on_connect = on_connect
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set on connect
        self.task: asyncio.Task[None] | None = None  # held here: the loop keeps only weak refs
        self._chunks: list[bytes] = []  # received, not read yet
        self._unread = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._reading_paused = False
        self._pause_above = _PAUSE_ABOVE_COMMANDS
        self._over_tls = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost = False
        self._sock: Any = None  # the TCP socket, for ack_now (None: not available here)

    # ---------------------------------------------------------------- what the session calls

    async def read(self, n: int) -> bytes:
        """Up to `n` bytes as they arrived (b"" at EOF); waits when there are none."""
        if not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if not self._chunks:
                if self._error is not None:
                    raise self._error
                return b""
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        if len(data) > n:
            chunks.append(data[n:])
            data = data[:n]
        self._unread = len(chunks[0]) if chunks else 0
        if self._reading_paused and self._unread < self._pause_above:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    @property
    def unread(self) -> int:
        """Bytes received and not read yet: the client sent them before its last reply came."""
        return self._unread

    def reading_message(self, reading: bool) -> None:
        """The session reads a message's content (DATA) from now on, or no longer: how much may
        arrive before it is read (see _PAUSE_ABOVE)."""
        self._pause_above = _PAUSE_ABOVE if reading else _PAUSE_ABOVE_COMMANDS

    def discard_unread(self) -> int:
        """Drop what was received and not read yet (STARTTLS: CVE-2011-0411); returns its size."""
        dropped = self._unread
        self._chunks.clear()
        self._unread = 0
        return dropped

    def ack_now(self) -> None:
        """Acknowledge what has arrived now, not when the kernel's delayed-ACK timer fires.

        A client streaming a message holds back its short last segment until what it sent before
        is acknowledged (Nagle's algorithm, on in most SMTP clients), while Linux, seeing a
        command-and-reply connection, delays that acknowledgement by up to 40 ms in the hope of
        sending it with a reply, which only comes after the whole message. Measured with
        smtp-source, one 1 MB message in six stalled ~45 ms that way (docs/benchmarks.md,
        eleventh session). TCP_QUICKACK sends the pending acknowledgement and leaves that mode;
        the kernel may enter it again, so the session calls this before each read of message
        data (one setsockopt).
        """
        sock = self._sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                self._sock = None  # not a TCP socket after all: not again on this connection

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        if self._lost:
            raise ConnectionResetError("connection lost")
        if not self._writing_paused:
            return
        self._drain_waiter = asyncio.get_running_loop().create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    async def start_tls(self, context: ssl.SSLContext) -> None:
        await self.drain()
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(self.transport, self, context, server_side=True)
        if transport is None:  # the connection closed during the handshake
            raise ConnectionResetError("connection lost during the TLS handshake")
        self.transport = transport
        self._over_tls = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is not None:
            return  # the TLS layer announcing itself after start_tls: nothing new to start
        self.transport = transport
        self._over_tls = transport.get_extra_info("sslcontext") is not None
        if _TCP_QUICKACK is not None:
            self._sock = transport.get_extra_info("socket")
        self.task = asyncio.get_running_loop().create_task(self._on_connect(self))

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread > self._pause_above and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        return not self._over_tls  # keep a plain transport open for the replies still to go

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._eof = True
        if exc is not None:
            self._error = exc
        self._wake()
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_exception(ConnectionResetError("connection lost"))

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain_waiter
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
