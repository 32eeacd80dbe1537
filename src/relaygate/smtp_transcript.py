"""A small SMTP client that records every line both ways, for `relaygate test send` and `test smtp`.

Deliberately not smtplib or aiosmtplib: those hide the exchange (EHLO retries, AUTH negotiation, dot
stuffing), and the point of a test tool is to show the administrator exactly what was said. Lines are
recorded as `C: ...` (client) and `S: ...` (server); `*` lines are notes (TLS established, connection
closed). AUTH payloads are masked.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import re
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaygate.logs.protocol import escape_controls

__all__ = [
    "Reply",
    "SMTPClosed",
    "SMTPConnection",
    "SMTPReplyError",
    "Transcript",
    "TranscriptLine",
    "client_tls_context",
    "is_loopback",
    "is_own_address",
    "local_addresses",
    "mask_auth_line",
    "split_server",
]

MASK = "********"
#: The most bytes one reply may have, all its lines (an EHLO reply has a few hundred): a hostile
#: server cannot fill the transcript (and memory) with endless replies.
MAX_REPLY_BYTES = 65536
_REPLY = re.compile(r"^(\d{3})([ -])?(.*)$")
_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s")


class SMTPClosed(Exception):
    """The server closed the connection (EOF) while a reply was expected."""


class SMTPReplyError(SMTPClosed):
    """The server's reply cannot be read (a line over asyncio's 64 KiB limit): the session is out
    of step and unusable, so the connection is closed."""


@dataclass(frozen=True, slots=True)
class TranscriptLine:
    direction: str  # "C", "S" or "*"
    text: str

    def __str__(self) -> str:
        return (
            f"{self.direction}: {self.text}" if self.direction in ("C", "S") else f"* {self.text}"
        )


@dataclass
class Transcript:
    """Every line of a session in order; `on_line` (optional) sees each line as it happens."""

    lines: list[TranscriptLine] = field(default_factory=list)
    on_line: Callable[[TranscriptLine], None] | None = None

    def add(self, direction: str, text: str) -> None:
        line = TranscriptLine(direction, text)
        self.lines.append(line)
        if self.on_line is not None:
            self.on_line(line)

    def client(self, text: str) -> None:
        self.add("C", text)

    def server(self, text: str) -> None:
        self.add("S", text)

    def note(self, text: str) -> None:
        self.add("*", text)

    def render(self) -> str:
        return "\n".join(str(line) for line in self.lines)

    def to_list(self) -> list[dict[str, str]]:
        return [{"direction": line.direction, "text": line.text} for line in self.lines]


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]  # the text after "250-" / "250 ", one per line

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    @property
    def enhanced(self) -> str:
        m = _ENHANCED.match(self.lines[-1] if self.lines else "")
        return m.group(1) if m else ""

    def line(self) -> str:
        """The final line as sent, e.g. `550 5.7.54 SMTP; Unable to relay ...`."""
        return f"{self.code} {self.lines[-1] if self.lines else ''}".rstrip()

    @property
    def positive(self) -> bool:
        return 200 <= self.code < 400

    def keywords(self) -> dict[str, str]:
        """EHLO keywords → their parameters (`AUTH` → `PLAIN LOGIN`), first line (the greeting) skipped."""
        out: dict[str, str] = {}
        for text in self.lines[1:]:
            word, _, params = text.strip().partition(" ")
            if word.upper().startswith("AUTH="):
                word, params = "AUTH", word[5:] + (" " + params if params else "")
            out.setdefault(word.upper(), params.strip())
        return out


def mask_auth_line(line: str) -> str:
    """`AUTH PLAIN <secret>` → `AUTH PLAIN ********`; other lines unchanged."""
    parts = line.split(" ", 2)
    if len(parts) >= 3 and parts[0].upper() == "AUTH":
        return f"{parts[0]} {parts[1]} {MASK}"
    return line


def split_server(server: str, default_port: int = 25) -> tuple[str, int]:
    """`host`, `host:port`, `[v6]:port`, `v6` → (host, port)."""
    text = server.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        raise ValueError(f"{server!r}: port must be 1-65535")
    if not host:
        raise ValueError(f"{server!r}: no host")
    return host, int(port) if port else default_port


def is_loopback(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.partition("%")[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def local_addresses() -> set[str]:
    """This machine's addresses as its host names resolve (getaddrinfo: the CLI only)."""
    found: set[str] = set()
    for name in {socket.gethostname(), socket.getfqdn()}:
        try:
            for info in socket.getaddrinfo(name, None):
                found.add(str(info[4][0]))
        except OSError:
            continue
    return found


def is_own_address(source: str, server: str) -> bool:
    """A connection from the server's own (non-loopback) address to it: the client is the relay
    itself, so the connector of that address takes it, not the devices' one."""
    if is_loopback(source):
        return False
    return source == server or (source in (mine := local_addresses()) and server in mine)


class SMTPConnection:
    """One SMTP connection with every line recorded in `transcript`."""

    def __init__(self, transcript: Transcript, *, timeout: float = 30.0) -> None:
        self.transcript = transcript
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.closed = False
        self.tls = False

    # -- connection -------------------------------------------------------------------------------
    async def open(
        self,
        host: str,
        port: int,
        *,
        source_ip: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if source_ip:
            kwargs["local_addr"] = (source_ip, 0)
        if tls_context is not None:
            kwargs["ssl"] = tls_context
            kwargs["server_hostname"] = server_hostname or host
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, **kwargs), self.timeout
        )
        local, peer = self.local_address, self.peer_address
        self.transcript.note(f"connected to {_fmt(peer)} from {_fmt(local)}")
        if tls_context is not None:
            self.tls = True
            self._note_tls()

    @property
    def local_address(self) -> tuple[str, int]:
        assert self.writer is not None
        sock = self.writer.get_extra_info("sockname")
        return (str(sock[0]), int(sock[1]))

    @property
    def peer_address(self) -> tuple[str, int]:
        assert self.writer is not None
        peer = self.writer.get_extra_info("peername")
        return (str(peer[0]), int(peer[1]))

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        assert self.writer is not None
        await asyncio.wait_for(
            self.writer.start_tls(context, server_hostname=server_hostname), self.timeout
        )
        self.tls = True
        self._note_tls()

    def _note_tls(self) -> None:
        assert self.writer is not None
        obj = self.writer.get_extra_info("ssl_object")
        if obj is None:
            self.transcript.note("TLS established")
            return
        cipher = obj.cipher()
        text = f"TLS established: {obj.version()}" + (f", {cipher[0]}" if cipher else "")
        cert = obj.getpeercert()
        if cert:
            subject = ", ".join("=".join(pair) for rdn in cert.get("subject", ()) for pair in rdn)
            text += f"; certificate {subject}"
        self.transcript.note(text)

    async def close(self) -> None:
        if self.writer is not None and not self.closed:
            self.closed = True
            self.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.writer.wait_closed(), 2)

    # -- lines ------------------------------------------------------------------------------------
    async def send_line(self, line: str, *, shown: str | None = None) -> None:
        """Send one line with CRLF; the transcript shows `shown` instead when given (masking)."""
        assert self.writer is not None
        self.transcript.client(line if shown is None else shown)
        self.writer.write(line.encode("utf-8", "surrogateescape") + b"\r\n")
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def send_lines(self, lines: list[str]) -> None:
        """Send several lines in one write (message content), each recorded."""
        assert self.writer is not None
        for line in lines:
            self.transcript.client(line)
        self.writer.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))
        await asyncio.wait_for(self.writer.drain(), self.timeout)

    async def read_reply(self) -> Reply:
        """Read one complete reply (all continuation lines) within `timeout` seconds in all, and of
        at most MAX_REPLY_BYTES: a server that never ends a multi-line reply is bounded too."""
        assert self.reader is not None
        code = 0
        texts: list[str] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        size = 0
        while True:
            if size > MAX_REPLY_BYTES:
                self.transcript.note(f"reply over {MAX_REPLY_BYTES} bytes: connection dropped")
                await self.close()
                raise SMTPReplyError(f"reply over {MAX_REPLY_BYTES} bytes")
            try:
                raw = await asyncio.wait_for(self.reader.readline(), deadline - loop.time())
            except (ConnectionResetError, BrokenPipeError) as exc:
                self.transcript.note(f"connection reset by the server ({exc})")
                self.closed = True
                raise SMTPClosed("connection reset") from None
            except ValueError:  # over the StreamReader's limit (64 KiB): a line that never ends
                self.transcript.note("reply line too long (over 64 KiB): connection dropped")
                await self.close()
                raise SMTPReplyError("reply line too long") from None
            if not raw:
                self.transcript.note("connection closed by the server")
                self.closed = True
                raise SMTPClosed("connection closed")
            size += len(raw)
            # control characters as \xNN: the text goes to a terminal (ESC sequences) and to JSON
            text = escape_controls(raw.decode("utf-8", "replace").rstrip("\r\n"))
            self.transcript.server(text)
            m = _REPLY.match(text)
            if not m:
                # Not a reply line: keep it visible and treat it as a final, unparseable reply.
                return Reply(0, (*texts, text))
            if texts and int(m.group(1)) != code:  # RFC 5321 §4.2.1: one code for all lines
                self.transcript.note("the reply's lines have different codes")
                return Reply(0, (*texts, text))
            code = int(m.group(1))
            texts.append(m.group(3))
            if m.group(2) != "-":
                return Reply(code, tuple(texts))

    def unread(self) -> bool:
        """Whether the server has sent bytes not read yet: before a command, a reply nobody asked
        for (the session is out of step: the next reply read would not be this command's)."""
        return bool(getattr(self.reader, "_buffer", b""))

    async def command(self, line: str, *, shown: str | None = None) -> Reply:
        await self.send_line(line, shown=shown)
        return await self.read_reply()

    # -- AUTH -------------------------------------------------------------------------------------
    async def auth(self, mechanisms: list[str], user: str, password: str) -> Reply:
        """AUTH PLAIN if offered, else LOGIN; payloads never appear in the transcript."""
        upper = [m.upper() for m in mechanisms]
        if "PLAIN" in upper:
            token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
            reply = await self.command(f"AUTH PLAIN {token}", shown=f"AUTH PLAIN {MASK}")
            if reply.code == 334:  # server wanted the initial response separately
                reply = await self.command(token, shown=f"{MASK} (credentials, base64)")
            return reply
        if "LOGIN" in upper:
            reply = await self.command("AUTH LOGIN")
            if reply.code != 334:
                return reply
            reply = await self.command(
                base64.b64encode(user.encode()).decode(), shown=f"{MASK} (user name, base64)"
            )
            if reply.code != 334:
                return reply
            return await self.command(
                base64.b64encode(password.encode()).decode(), shown=f"{MASK} (password, base64)"
            )
        raise ValueError(
            f"no supported AUTH mechanism offered (server offers: {' '.join(mechanisms) or 'none'})"
        )


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def client_tls_context(insecure: bool) -> ssl.SSLContext:
    """The TLS context of `test send`, `test smtp` and `test relay`: the system's trust store and
    host name check, both off with --insecure (a lab relay's self-signed certificate)."""
    context = ssl.create_default_context()
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context
