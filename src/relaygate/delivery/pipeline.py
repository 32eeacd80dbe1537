"""Reading pipelined SMTP replies (RFC 2920) on a connection that aiosmtplib opened.

With PIPELINING the client sends MAIL, every RCPT and DATA in one write and then reads their
replies in order; the server may answer them in one segment. aiosmtplib cannot do this: its
protocol hands over one reply per command and drops what arrives while a parsed reply waits to be
picked up. For the length of one transaction `ReplyReader` takes the transport's protocol slot,
buffers every octet and parses any number of replies per segment; afterwards aiosmtplib's protocol
gets the transport back for RSET, QUIT or the next EHLO. Per message this is two writes and two
waits instead of four of each through aiosmtplib's per-command machinery.
"""

from __future__ import annotations

import asyncio
from collections import deque

from aiosmtplib import SMTPResponseException, SMTPServerDisconnected, SMTPTimeoutError

__all__ = ["ReplyReader"]

_MAX_PENDING = 64 * 1024  # octets of one reply (complete or not): not an SMTP server


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPTimeoutError("Timed out waiting for server response"))


class ReplyReader(asyncio.Protocol):
    """The transport's protocol while installed: collects replies as (code, text)."""

    def __init__(self, transport: asyncio.Transport, inner: asyncio.BaseProtocol) -> None:
        self.transport = transport
        self.inner = inner
        self._buffer = bytearray()
        self._replies: deque[tuple[int, str]] = deque()
        self._error: BaseException | None = None
        self._lost = False
        self._waiter: asyncio.Future[None] | None = None

    @classmethod
    def install(cls, transport: asyncio.Transport) -> ReplyReader:
        reader = cls(transport, transport.get_protocol())
        transport.set_protocol(reader)
        return reader

    def restore(self) -> None:
        """Give the transport back to the protocol it had (nothing to give if it was lost)."""
        if not self._lost:
            self.transport.set_protocol(self.inner)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def reply(self, timeout: float) -> tuple[int, str]:
        """The next reply, in order; raises as aiosmtplib would (disconnected, timeout, garbage)."""
        while not self._replies:
            if self._error is not None:
                raise self._error
            if self._lost:
                raise SMTPServerDisconnected("Connection lost")
            loop = asyncio.get_running_loop()
            self._waiter = waiter = loop.create_future()
            # A plain timer that fails the waiter: cheaper than asyncio.timeout's task bookkeeping,
            # and this runs twice per delivered message.
            timer = loop.call_later(timeout, _expire, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        return self._replies.popleft()

    # ---------------------------------------------------------------- asyncio.Protocol

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        try:
            self._parse()
        except SMTPResponseException as exc:
            self._error = exc
            self.transport.abort()
        self._wake()

    def eof_received(self) -> bool | None:
        return False  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._wake()
        self.inner.connection_lost(exc)  # aiosmtplib's SMTP object must see it too

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # ---------------------------------------------------------------- parsing

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _parse(self) -> None:
        """Move every complete reply out of the buffer (a reply ends at a line whose fourth octet
        is not "-"); its text is the lines' texts joined by newlines, as aiosmtplib gives it."""
        buf = self._buffer
        start = 0
        lines: list[bytes] = []
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(buf[start : end + 1])
            start = end + 1
            if start > _MAX_PENDING:  # this reply's lines so far, complete or not: same bound
                raise SMTPResponseException(-1, "Response too long")
            code_text = line[:3]
            if not code_text.isdigit():
                raise SMTPResponseException(
                    -1, "Malformed SMTP response line: " + line.decode("utf-8", "replace")
                )
            lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(x[4:].strip(b" \t\r\n") for x in lines)
                self._replies.append((int(code_text), text.decode("utf-8", "surrogateescape")))
                del buf[:start]
                start = 0
                lines = []
        if len(buf) > _MAX_PENDING:
            raise SMTPResponseException(-1, "Response too long")
