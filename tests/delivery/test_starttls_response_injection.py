"""Security-bar item 90 (the client side of CVE-2011-0411, fake-mail-server's Buffering/B_1): a next
hop that answers STARTTLS with its `220` and, in the same segment, a forged EHLO reply. Those octets
arrived in clear before the handshake; the relay must not read them as the reply to the EHLO it
sends inside TLS. A raw asyncio server plays the next hop, so the octets and their order are the
test's: it waits before answering the EHLO in TLS, and a client that took the injected lines for
that answer sends MAIL during the wait.
"""

from __future__ import annotations

import asyncio
import ssl

import pytest
import trustme

from relaygate.delivery.client import deliver
from tests.delivery.helpers import Connector, hop

MSG = b"From: printer@corp.test\r\nSubject: injection\r\n\r\nbody\r\n"
INJECTED = b"250-forged.example\r\n250-AUTH PLAIN LOGIN\r\n250 8BITMIME\r\n"


class InjectingHop:
    """Banner, EHLO offering STARTTLS, `220` + INJECTED in one write, then TLS. In TLS it records
    each command line and whether it arrived before the reply to the one before was sent."""

    def __init__(self, tls: ssl.SSLContext, injected: bytes) -> None:
        self.tls = tls
        self.injected = injected
        self.in_tls: list[tuple[bytes, bool]] = []  # (command, arrived while a reply was held)
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(self._speak(reader, writer), 15)
        except (TimeoutError, ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _speak(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hop.test ESMTP\r\n")
        while True:  # in clear: EHLO, then STARTTLS
            line = await reader.readuntil(b"\r\n")
            verb = line[:8].upper()
            if verb.startswith(b"EHLO"):
                writer.write(b"250-hop.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n")
            elif verb.startswith(b"STARTTLS"):
                writer.write(b"220 2.0.0 Ready to start TLS\r\n" + self.injected)
                await writer.drain()
                break
            else:
                writer.write(b"503 5.5.1 STARTTLS first\r\n")
        await writer.start_tls(self.tls)
        replies = {
            b"EHLO": b"250-hop.test\r\n250 8BITMIME\r\n",
            b"MAIL": b"250 2.1.0 OK\r\n",
            b"RCPT": b"250 2.1.5 OK\r\n",
            b"RSET": b"250 2.0.0 OK\r\n",
            b"QUIT": b"221 2.0.0 Bye\r\n",
        }
        pending: list[bytes] = []
        while True:
            line = pending.pop(0) if pending else await reader.readuntil(b"\r\n")
            verb = line[:4].upper()
            early = False
            if verb in (b"EHLO", b"MAIL", b"RCPT") and not pending:
                # hold the reply: a client that already "has" one sends its next command now
                try:
                    pending.append(await asyncio.wait_for(reader.readuntil(b"\r\n"), 0.4))
                    early = True
                except TimeoutError:
                    pass
            self.in_tls.append((line.rstrip(b"\r\n"), early))
            if verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb in replies:
                writer.write(replies[verb])
                if verb == b"QUIT":
                    await writer.drain()
                    return
            else:
                writer.write(b"500 5.5.1 what\r\n")
            await writer.drain()


@pytest.fixture(scope="module")
def hop_tls() -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    trustme.CA().issue_cert("sink.test", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.mark.parametrize("require_tls", [False, True], ids=["opportunistic", "required"])
async def test_replies_injected_after_the_starttls_220_are_never_read_as_replies_in_tls(
    hop_tls: ssl.SSLContext, require_tls: bool
) -> None:
    fake = InjectingHop(hop_tls, INJECTED)
    port = await fake.start()
    try:
        out = await deliver(
            [hop(port)],
            connector=Connector(require_tls=require_tls, tls_auth_level="EncryptionOnly")
            if require_tls
            else Connector(),
            helo_name="relay.corp.test",
            sender="printer@corp.test",
            recipients=["a@dest.test"],
            data=MSG,
            timeout=5.0,
        )
    finally:
        await fake.close()
    commands = [c.split(b" ")[0].upper() for c, _ in fake.in_tls]
    assert commands[:1] == [b"EHLO"], fake.in_tls  # a fresh EHLO inside TLS (RFC 3207 §4.2)
    early = [c for c, was_early in fake.in_tls if was_early]
    assert early == [], f"sent before the hop's reply (read the injected lines): {early}"
    assert b"MAIL" in commands and out.delivered == ["a@dest.test"]
