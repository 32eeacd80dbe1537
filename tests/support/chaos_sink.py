"""A next hop that misbehaves on purpose: an SMTP server on loopback written on raw asyncio streams
(not aiosmtpd), so that every octet it sends, and when, is the test's choice.

It speaks enough SMTP to take mail (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; STARTTLS is
refused unless scripted, AUTH with an initial response is accepted unless scripted) and records every transaction it completed: a transaction counts as completed
when the sink decided to answer the final dot with a 2xx, whether or not that reply reached the
client (a connection reset right after it is still a delivery, SMTP's at-least-once rule).

`script(point, connection, n)` chooses what happens at each point of each connection (1-based
connection number, n-th time the point is reached on that connection); None = behave. Points:
``banner``, ``ehlo``, ``helo``, ``mail``, ``rcpt``, ``data`` (the DATA command), ``dot`` (the end
of the content), ``rset``, ``quit``, ``starttls``, ``auth``. An action is one of:

* `Reply(b"...")`: these octets instead of the usual reply (any number of lines, any bytes, no
  CRLF added), written ``chunk`` octets at a time with ``delay`` seconds between writes; then
  ``after`` = "close" (FIN) or "reset" (RST) ends the connection;
* `HANG`: answer nothing and never read again (the connection stays open until the client goes);
* `CLOSE` / `RESET`: end the connection there, FIN or RST, without a reply;
* `Reply(..., accept=True)` at ``dot``: the transaction is recorded as completed.

Everything listens on 127.0.0.1 only; every session ends when the client closes or when the sink
is closed, and no read waits longer than ``idle`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Self

__all__ = ["CLOSE", "HANG", "RESET", "ChaosSink", "Reply", "Transaction"]


@dataclass(frozen=True)
class Reply:
    data: bytes
    chunk: int = 0  # 0: one write
    delay: float = 0.0
    after: str = ""  # "", "close", "reset"
    accept: bool | None = None  # at "dot": record the transaction (default: a 2xx reply does)


@dataclass(frozen=True)
class _Special:
    name: str


HANG = _Special("hang")
CLOSE = _Special("close")
RESET = _Special("reset")

Action = Reply | _Special | None


@dataclass
class Transaction:
    connection: int
    mail_from: str
    rcpts: list[str]
    data: bytes


@dataclass
class ChaosSink:
    script: Callable[[str, int, int], Action] = lambda point, conn, n: None
    #: the EHLO keywords after the greeting line, in order
    extensions: list[str] = field(
        default_factory=lambda: ["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 10000000"]
    )
    #: RCPT replies by address (without <>); the default is 250
    rcpt_replies: dict[str, bytes] = field(default_factory=dict)
    idle: float = 30.0
    transactions: list[Transaction] = field(default_factory=list)
    connections: int = 0
    commands: list[list[bytes]] = field(default_factory=list)
    server: asyncio.base_events.Server | None = None
    port: int = 0
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._tasks):  # hung sessions end with the sink
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.wait_closed()

    def copies(self, rcpt: str) -> int:
        """How many completed transactions carried `rcpt`."""
        return sum(rcpt in t.rcpts for t in self.transactions)

    # ------------------------------------------------------------------ one connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = self.connections
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        seen: list[bytes] = []
        self.commands.append(seen)
        uses: dict[str, int] = {}

        def action(point: str) -> Action:
            uses[point] = uses.get(point, 0) + 1
            return self.script(point, conn, uses[point])

        async def answer(point: str, default: bytes) -> bool:
            """Send the scripted or default reply; False: the session is over."""
            act = action(point)
            return await self._act(writer, act, default)

        mail_from = ""
        rcpts: list[str] = []
        try:
            if not await answer("banner", b"220 chaos.test ESMTP\r\n"):
                return
            while True:
                line = await asyncio.wait_for(reader.readline(), self.idle)
                if not line:
                    return
                seen.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                if verb == b"EHLO":
                    lines = ["chaos.test", *self.extensions]
                    text = "".join(
                        f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n"
                        for i, x in enumerate(lines)
                    )
                    ok = await answer("ehlo", text.encode())
                elif verb == b"HELO":
                    ok = await answer("helo", b"250 chaos.test\r\n")
                elif verb == b"STAR":  # STARTTLS
                    ok = await answer("starttls", b"454 4.7.0 TLS not available\r\n")
                elif verb == b"AUTH":
                    ok = await answer("auth", b"235 2.7.0 Authentication successful\r\n")
                elif verb == b"MAIL":
                    mail_from = line[10:].split(b">")[0].lstrip(b"<").decode("utf-8", "replace")
                    rcpts = []
                    ok = await answer("mail", b"250 2.1.0 Sender OK\r\n")
                elif verb == b"RCPT":
                    addr = line[8:].split(b">")[0].lstrip(b"<").decode("utf-8", "replace")
                    default = self.rcpt_replies.get(addr, b"250 2.1.5 Recipient OK\r\n")
                    act = action("rcpt")
                    if _final_code(act.data if isinstance(act, Reply) else default) == b"250":
                        rcpts.append(addr)  # what the client is told decides, as for a real MTA
                    ok = await self._act(writer, act, default)
                elif verb == b"DATA":
                    usual = (
                        b"354 Start mail input\r\n"
                        if rcpts
                        else b"554 5.5.1 No valid recipients\r\n"
                    )
                    reply = action("data") or Reply(usual)
                    ok = await self._act(writer, reply, b"")
                    if ok and isinstance(reply, Reply) and reply.data.startswith(b"354"):
                        ok = await self._content(reader, writer, conn, mail_from, rcpts, action)
                    rcpts = []
                elif verb == b"RSET":
                    rcpts = []
                    ok = await answer("rset", b"250 2.0.0 Reset\r\n")
                elif verb == b"QUIT":
                    await answer("quit", b"221 2.0.0 Bye\r\n")
                    return
                elif verb == b"NOOP":
                    ok = await self._act(writer, None, b"250 2.0.0 OK\r\n")
                else:
                    ok = await self._act(writer, None, b"500 5.5.1 Unknown command\r\n")
                if not ok:
                    return
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _content(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: int,
        mail_from: str,
        rcpts: list[str],
        action: Callable[[str], Action],
    ) -> bool:
        buf = bytearray()
        while not (buf.endswith(b"\r\n.\r\n") or buf == b".\r\n"):
            chunk = await asyncio.wait_for(reader.read(65536), self.idle)
            if not chunk:
                return False
            buf += chunk
        act = action("dot")
        default = b"250 2.6.0 Queued as chaos\r\n"
        sent = act.data if isinstance(act, Reply) else default if act is None else b""
        accept = act.accept if isinstance(act, Reply) and act.accept is not None else None
        if accept is None:
            accept = _final_code(sent).startswith(b"2") and (act is None or isinstance(act, Reply))
        if accept:
            self.transactions.append(Transaction(conn, mail_from, list(rcpts), bytes(buf[:-3])))
        return await self._act(writer, act, default)

    async def _act(self, writer: asyncio.StreamWriter, act: Action, default: bytes) -> bool:
        if act is None:
            act = Reply(default)
        if act is HANG:
            # Never answer, never read: wait for the client to give up (or the sink to close).
            with contextlib.suppress(Exception):
                await asyncio.sleep(self.idle)
            return False
        if act is CLOSE:
            return False
        if act is RESET:
            _reset(writer)
            return False
        assert isinstance(act, Reply)
        if act.chunk:
            for i in range(0, len(act.data), act.chunk):
                writer.write(act.data[i : i + act.chunk])
                await writer.drain()
                if act.delay:
                    await asyncio.sleep(act.delay)
        else:
            writer.write(act.data)
            await writer.drain()
        if act.after == "reset":
            _reset(writer)
            return False
        return act.after != "close"


def _final_code(reply: bytes) -> bytes:
    """The code of a reply's last line (a client reads a multi-line reply's code there)."""
    lines = reply.rstrip(b"\r\n").split(b"\r\n")
    return lines[-1][:3]


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0) rather than a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
