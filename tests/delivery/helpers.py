"""Test doubles for delivery: a SendConnector stand-in and downstream SMTP sinks on 127.0.0.1.

Sinks are started with ``loop.create_server`` on port 0 (aiosmtpd's Controller probes its port, which
races with parallel tests); every sink listens on loopback only.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relaygate.delivery.nexthop import NextHop

#: Whether the sinks advertise PIPELINING (RFC 2920); tests/delivery runs its client tests both
#: ways (the `pipelining` fixture), the other suites with it on, like Postfix and Exchange.
PIPELINING = True


@dataclass
class Connector:
    """Same attribute names as relaygate.config.SendConnector."""

    name: str = "Outbound"
    address_spaces: list[str] = field(default_factory=lambda: ["*"])
    dns_routing_enabled: bool = False
    smart_hosts: list[str] = field(default_factory=list)
    port: int = 25
    smart_host_auth_mechanism: str = "None"
    auth_username: str = ""
    auth_password_file: Path | None = None
    auth_password_env: str = ""
    require_tls: bool = False
    tls_auth_level: str = "EncryptionOnly"
    tls_domain: str = ""
    tls_ca_file: Path | None = None
    implicit_tls: bool = False
    cost: int = 1
    enabled: bool = True
    fqdn: str | None = None
    max_message_size: int | None = None
    connection_inactivity_timeout: float = 10.0
    connect_timeout: float = 30.0
    greeting_timeout: float = 300.0
    tls_certificate_file: Path | None = None
    tls_key_file: Path | None = None
    ignore_starttls: bool = False
    force_helo: bool = False
    smtp_max_messages_per_connection: int = 20
    source_ip_address: str | None = None
    allow_loopback_mx: bool = False


def hop(port: int, host: str = "sink.test", ip: str = "127.0.0.1") -> NextHop:
    return NextHop(host=host, ip=ip, port=port, tls_name=host)


# --------------------------------------------------------------------------------------------------
# aiosmtpd sink


class Handler:
    """Records every transaction; replies can be scripted per command / recipient."""

    def __init__(
        self,
        *,
        rcpt_replies: dict[str, str] | None = None,
        mail_reply: str | None = None,
        data_reply: str | None = None,
        users: dict[str, str] | None = None,
        oauth_tokens: dict[str, str] | None = None,
    ) -> None:
        self.rcpt_replies = rcpt_replies or {}
        self.mail_reply = mail_reply
        self.data_reply = data_reply
        self.users = users or {}
        self.oauth_tokens = oauth_tokens or {}
        self.messages: list[dict[str, Any]] = []
        self.mail_froms: list[str] = []
        self.rcpts: list[str] = []
        self.ehlo_names: list[str] = []
        self.auth_seen: list[tuple[str, str]] = []  # (mechanism, username)
        self.connections = 0
        self.tls_at_mail: list[bool] = []

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        self.ehlo_names.append(hostname)
        session.host_name = hostname
        if PIPELINING:  # aiosmtpd reads pipelined commands line by line but does not say so
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.mail_froms.append(address)
        self.tls_at_mail.append(session.ssl is not None)
        if self.mail_reply:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpts.append(address)
        reply = self.rcpt_replies.get(address)
        if reply and not reply.startswith("2"):
            return reply
        envelope.rcpt_tos.append(address)
        return reply or "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        self.messages.append(
            {
                "mail_from": envelope.mail_from,
                "mail_options": list(envelope.mail_options),
                "rcpt_tos": list(envelope.rcpt_tos),
                "content": envelope.original_content,
                "tls": session.ssl is not None,
                "auth": session.auth_data,
            }
        )
        return "250 2.6.0 <id@sink.test> Queued mail for delivery"

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode()
            self.auth_seen.append((mechanism, user))
            ok = self.users.get(user) == auth_data.password.decode()
            return AuthResult(success=ok, auth_data=user if ok else None, handled=False)
        return AuthResult(success=False, handled=False)

    async def auth_XOAUTH2(self, server, args):
        if len(args) < 2:
            blob = await server.challenge_auth("")
            if not isinstance(blob, bytes):
                return AuthResult(success=False, handled=False)
        else:
            blob = base64.b64decode(args[1])
        parts = dict(p.split("=", 1) for p in blob.decode().split("\x01") if "=" in p)
        user = parts.get("user", "")
        token = parts.get("auth", "").removeprefix("Bearer ")
        self.auth_seen.append(("XOAUTH2", user))
        ok = self.oauth_tokens.get(user) == token
        return AuthResult(success=ok, auth_data=user if ok else None, handled=False)


class Sink:
    """A running aiosmtpd server on 127.0.0.1 and its handler."""

    def __init__(self, server: asyncio.base_events.Server, handler: Handler) -> None:
        self.server = server
        self.handler = handler
        self.port = server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.server.close()
        await self.server.wait_closed()


async def start_sink(
    handler: Handler | None = None,
    *,
    tls_context: ssl.SSLContext | None = None,
    implicit_tls: bool = False,
    port: int = 0,
    host: str = "127.0.0.1",
    **smtp_kwargs: Any,
) -> Sink:
    handler = handler or Handler()
    loop = asyncio.get_running_loop()
    kwargs = dict(smtp_kwargs)
    if handler.users or handler.oauth_tokens:
        kwargs.setdefault("authenticator", handler.authenticator)

    def factory() -> SMTP:
        handler.connections += 1
        return SMTP(
            handler,
            hostname="sink.test",
            tls_context=None if implicit_tls else tls_context,
            loop=loop,
            **kwargs,
        )

    server = await loop.create_server(
        factory, host, port, ssl=tls_context if implicit_tls else None
    )
    return Sink(server, handler)


# --------------------------------------------------------------------------------------------------
# raw sink: records the exact octets of DATA; can greet with an error or drop mid-DATA


SILENT = "(no reply)"  # what RawSink's `answer` returns to leave a command unanswered


class LoopbackServer:
    """A stream server on 127.0.0.1, an ephemeral port; subclasses define `_serve`."""

    server: asyncio.base_events.Server | None = None
    port = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> Self:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


class RawSink(LoopbackServer):
    """Minimal SMTP speaker recording the octets between the 354 and the final reply.

    `answer(verb, connection, n)` may replace the reply to the n-th use of a verb on a connection
    (1-based); a 421 ends the connection, `SILENT` sends nothing. `sessions` holds each
    connection's command lines."""

    def __init__(
        self,
        *,
        greeting: str = "220 raw.test ESMTP",
        drop_after_bytes: int | None = None,
        answer: Callable[[bytes, int, int], str | None] | None = None,
    ) -> None:
        self.greeting = greeting
        self.drop_after_bytes = drop_after_bytes
        self.answer = answer or (lambda verb, connection, n: None)
        self.data: list[bytes] = []
        self.commands: list[bytes] = []
        self.sessions: list[list[bytes]] = []
        self.connections = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        connection = self.connections
        session: list[bytes] = []
        self.sessions.append(session)
        uses: dict[bytes, int] = {}
        try:
            writer.write(self.greeting.encode() + b"\r\n")
            await writer.drain()
            if not self.greeting.startswith("220"):
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.commands.append(line)
                session.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                uses[verb] = uses.get(verb, 0) + 1
                special = self.answer(verb, connection, uses[verb])
                if special == SILENT:
                    continue
                if special is not None:
                    writer.write(special.encode() + b"\r\n")
                    await writer.drain()
                    if special.startswith("421"):
                        return
                    continue
                if verb == b"EHLO":
                    pipelining = b"250-PIPELINING\r\n" if PIPELINING else b""
                    writer.write(
                        b"250-raw.test\r\n" + pipelining + b"250-8BITMIME\r\n250 SIZE 10000000\r\n"
                    )
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    buf = bytearray()
                    while not (buf.endswith(b"\r\n.\r\n") or buf == b".\r\n"):
                        chunk = await reader.read(65536)
                        if not chunk:
                            return
                        buf += chunk
                        if self.drop_after_bytes is not None and len(buf) >= self.drop_after_bytes:
                            writer.transport.abort()
                            return
                    self.data.append(bytes(buf))
                    writer.write(b"250 2.6.0 queued as raw\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
