"""A session's bytes: its read buffer, its queued replies, and its read timeouts.

Separate from the protocol (session.py and the other session_*.py) because it is the one part every
command goes through: how a command line is cut from the buffer (only CRLF ends one; an overlong
line is discarded through its LF so the session stays in sync), when queued replies are written
(when the client's pipeline is drained), and the one watchdog timer per session that enforces
connection_inactivity_timeout and connection_timeout instead of a timer per read.
"""

from __future__ import annotations

import asyncio

from relaygate import replies
from relaygate.replies import Reply
from relaygate.smtp.session_state import _Close, _SessionState, _span

MAX_COMMAND_LINE = (
    2048  # Exchange accepts 571-char addresses plus parameters; RFC 5321 minimum is 512
)
READ_CHUNK = 262144

# A TLS record's first two octets when it is a handshake (a ClientHello): content type 22, major
# version 3 (SSL 3.0 up to TLS 1.3's legacy version field).
_TLS_HANDSHAKE = b"\x16\x03"


class _SessionIO(_SessionState):
    """Reading the client and writing replies (see the module docstring)."""

    def reply(self, reply: Reply) -> None:
        line = (
            reply.line()
            if self.connector.enhanced_status_codes_enabled
            else f"{reply.code} {reply.text}"
        )
        self.out.append(line.encode("utf-8", "replace") + b"\r\n")
        self.log.sent(line)
        if reply.code >= 400:
            self.ctx.counters.refusals[(self.connector.name, reply.code, reply.enhanced)] += 1

    def reply_lines(self, code: int, lines: list[str]) -> None:
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.out.append(f"{code}{sep}{text}\r\n".encode("utf-8", "replace"))

    async def flush(self) -> None:
        if self.out:
            self.conn.write(b"".join(self.out))
            self.out.clear()
            if not self.conn.transport.get_write_buffer_size():
                return  # the kernel took it all: nothing to wait for (the usual case)
            try:
                # asyncio.timeout, not wait_for: no extra task per reply on the hot path.
                async with asyncio.timeout(self.idle):
                    await self.conn.drain()
            except TimeoutError:
                raise ConnectionError("client does not read its replies") from None

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF. Enforces both timeouts."""
        await self.flush()
        chunk = await self._read_more()
        if not chunk:
            return False
        self.buf += chunk
        return True

    async def read_line(self) -> bytes | None:
        """The next command line without its ending; None at EOF. A line ended by a bare LF, or holding
        a bare CR, is returned with a marker the caller refuses."""
        while True:
            nl = self.buf.find(b"\n", 0, MAX_COMMAND_LINE)
            if nl >= 0:
                line = bytes(self.buf[: nl + 1])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) >= MAX_COMMAND_LINE:
                # Too long: discard through the next LF so the session stays in sync.
                nl = self.buf.find(b"\n")
                if nl >= 0:
                    del self.buf[: nl + 1]
                    return b"\x00TOOLONG"
                self.buf.clear()
                while True:
                    if not await self._fill():
                        return None
                    nl = self.buf.find(b"\n")
                    if nl >= 0:
                        del self.buf[: nl + 1]
                        return b"\x00TOOLONG"
                    self.buf.clear()
            if self.buf.startswith(_TLS_HANDSHAKE):
                # A ClientHello need not hold an LF: it is not going to end as a line, and its
                # client waits for an answer. Hand it over now (the caller hangs up).
                line = bytes(self.buf)
                self.buf.clear()
                return line
            if not await self._fill():
                return None

    async def _read_more(self) -> bytes:
        """One read from the client, bounded by the inactivity and absolute timeouts."""
        if self._stopping and not self._in_data:
            self.reply(replies.SERVICE_NOT_AVAILABLE)
            raise _Close()
        now = self.loop.time()
        if now >= self.deadline:
            self.reply(replies.CONNECTION_TIMEOUT)
            raise _Close()
        self._reading_since = now
        try:
            return await self.conn.read(READ_CHUNK)
        except asyncio.CancelledError:
            timed_out, self._timed_out = self._timed_out, None
            if timed_out is None or self._task is None:
                raise  # a real cancellation (the server is stopping)
            self._task.uncancel()
            if isinstance(timed_out, _Close):  # a reload ended the session (reload_applied)
                raise timed_out from None
            self.reply(timed_out)
            raise _Close() from None
        finally:
            self._reading_since = None

    def _next_check(self, now: float) -> float:
        """When the watchdog must look next: when the pending read (or one starting now) would be
        idle too long, or the connection's absolute deadline, whichever is first."""
        since = self._reading_since
        due = (since if since is not None else now) + self.idle
        if self.deadline > now or since is not None:
            due = min(due, self.deadline)
        return due

    def _watch(self) -> None:
        """The session's read timeouts, checked by one timer that re-arms itself: a per-read
        asyncio.timeout cost a timer scheduled and cancelled on every read (~5 % of the event
        loop's time under load). A read that has waited too long is cancelled, and _read_more turns
        the cancellation into the timeout reply."""
        if self._timed_out is not None:  # the read is cancelled already (a stop, a reload)
            self._watchdog = None
            return
        now = self.loop.time()
        due = self._next_check(now)
        if self._reading_since is not None and now + 0.001 >= due:
            self._timed_out = (
                replies.CONNECTION_TIMEOUT
                if now + 0.001 >= self.deadline
                else replies.INACTIVITY_TIMEOUT
            )
            self._watchdog = None
            if self._task is not None:
                self._task.cancel()
            return
        self._watchdog = self.loop.call_at(due, self._watch)

    async def protocol_error(self, reply: Reply, *, tarpit: bool = False) -> None:
        """A client error: counted toward max_protocol_errors, delayed by the tarpit if anonymous."""
        self.errors += 1
        if tarpit and not self.authenticated and self.tarpit > 0:
            self.log.info(f"Tarpit for '{_span(self.tarpit)}'")
            await self.flush()
            await asyncio.sleep(self.tarpit)
        self.reply(reply)
        limit = self.connector.max_protocol_errors
        if limit is not None and self.errors >= limit:
            self.reply(replies.TOO_MANY_ERRORS)
            raise _Close()
