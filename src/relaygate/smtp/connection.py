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
import ssl
from collections.abc import Callable, Coroutine
from typing import Any

__all__ = ["Connection"]

_PAUSE_ABOVE = 2 * 1024 * 1024  # unread bytes at which the socket stops being read


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
        self._over_tls = False
        self._writing_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._lost = False

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
        if self._reading_paused and self._unread < _PAUSE_ABOVE:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def discard_unread(self) -> int:
        """Drop what was received and not read yet (STARTTLS: CVE-2011-0411); returns its size."""
        dropped = self._unread
        self._chunks.clear()
        self._unread = 0
        return dropped

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
        self.task = asyncio.get_running_loop().create_task(self._on_connect(self))

    def data_received(self, data: bytes) -> None:
        self._chunks.append(data)
        self._unread += len(data)
        if self._unread > _PAUSE_ABOVE and not self._reading_paused:
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
