"""Send connector options of Exchange's Set-SendConnector: TlsCertificateName (a client certificate,
`tls_certificate_file`/`tls_key_file`), IgnoreSTARTTLS, ForceHELO, SmtpMaxMessagesPerConnection and
SourceIPAddress, against real sinks on loopback that record what they saw."""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme

from relaygate import replies
from relaygate.delivery.client import ConnectionPool, deliver, load_tls_context

from .helpers import Connector, LoopbackServer, hop

MSG = b"From: printer@corp.test\r\nTo: a@dest.test\r\nSubject: scan\r\n\r\nHello\r\n"
HELO = "relay.corp.test"
RELAY_SUBJECT = "relay.corp.test"


@dataclass
class Seen:
    """One connection as the sink saw it."""

    peer: tuple[str, int]
    commands: list[bytes] = field(default_factory=list)
    tls: bool = False
    peercert: dict[str, Any] | None = None
    handshake_error: str = ""
    delivered: int = 0


class RecordingSink(LoopbackServer):
    """An SMTP sink on 127.0.0.1 that records, per connection, the peer address, every command
    line, and the client certificate it verified (STARTTLS with `starttls`, or implicit TLS with
    `implicit`). EHLO offers STARTTLS (when it can), 8BITMIME, SIZE and PIPELINING."""

    def __init__(
        self,
        *,
        starttls: ssl.SSLContext | None = None,
        implicit: ssl.SSLContext | None = None,
        advertise_starttls: bool = False,
    ) -> None:
        self.starttls = starttls
        self.implicit = implicit
        self.advertise_starttls = advertise_starttls or starttls is not None
        self.seen: list[Seen] = []

    async def start(self) -> RecordingSink:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.implicit)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def commands(self) -> list[bytes]:
        return [c for s in self.seen for c in s.commands]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = Seen(peer=writer.get_extra_info("peername")[:2])
        self.seen.append(seen)
        if self.implicit is not None:
            seen.tls = True
            seen.peercert = writer.get_extra_info("peercert")

        async def say(text: bytes) -> None:
            writer.write(text)
            await writer.drain()

        try:
            await say(b"220 sink.test ESMTP\r\n")
            while line := await asyncio.wait_for(reader.readline(), 10):
                seen.commands.append(line.rstrip(b"\r\n"))
                verb = line[:4].upper()
                if verb == b"EHLO":
                    tls = b"250-STARTTLS\r\n" if self.advertise_starttls and not seen.tls else b""
                    await say(
                        b"250-sink.test\r\n" + tls + b"250-PIPELINING\r\n250-8BITMIME\r\n"
                        b"250 SIZE 10000000\r\n"
                    )
                elif verb == b"HELO":
                    await say(b"250 sink.test\r\n")
                elif verb == b"STAR" and self.starttls is not None and not seen.tls:
                    await say(b"220 2.0.0 Ready to start TLS\r\n")
                    try:
                        await writer.start_tls(self.starttls)
                    except (ssl.SSLError, OSError) as exc:
                        seen.handshake_error = str(getattr(exc, "reason", "") or exc)
                        return
                    seen.tls = True
                    seen.peercert = writer.get_extra_info("peercert")
                elif verb == b"DATA":
                    await say(b"354 go ahead\r\n")
                    while (body := await asyncio.wait_for(reader.readline(), 10)) != b".\r\n":
                        if not body:
                            return
                    seen.delivered += 1
                    await say(b"250 2.6.0 queued\r\n")
                elif verb == b"QUIT":
                    await say(b"221 2.0.0 bye\r\n")
                    return
                elif verb == b"STAR":
                    await say(b"454 4.7.0 TLS not available\r\n")
                else:
                    await say(b"250 2.0.0 OK\r\n")
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def send(sink_port: int, connector: Connector, **kw: Any):  # type: ignore[no-untyped-def]
    kw.setdefault("timeout", 5.0)
    return await deliver(
        [hop(sink_port)],
        connector=connector,
        helo_name=HELO,
        sender=kw.pop("sender", "printer@corp.test"),
        recipients=kw.pop("recipients", ["a@dest.test"]),
        data=kw.pop("data", MSG),
        **kw,
    )


def _subject_cn(peercert: dict[str, Any] | None) -> str | None:
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName":
                return str(value)
    return None


# --------------------------------------------------------------------------------------------------
# tls_certificate_file / tls_key_file (TlsCertificateName)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def mutual_tls(ca: trustme.CA) -> ssl.SSLContext:
    """The sink's side: its own certificate, and a client certificate from `ca` required."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test", "127.0.0.1").configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def write_client_cert(ca: trustme.CA, folder: Path, subject: str) -> tuple[Path, Path]:
    cert = ca.issue_cert(subject, common_name=subject)
    cert_file, key_file = folder / "relay.crt", folder / "relay.key"
    cert_file.write_bytes(b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    key_file.write_bytes(cert.private_key_pem.bytes())
    return cert_file, key_file


async def test_the_client_certificate_is_presented_on_starttls_and_verified(
    ca: trustme.CA, mutual_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    cert_file, key_file = write_client_cert(ca, tmp_path, RELAY_SUBJECT)
    sink = await RecordingSink(starttls=mutual_tls).start()
    try:
        out = await send(
            sink.port,
            Connector(require_tls=True, tls_certificate_file=cert_file, tls_key_file=key_file),
        )
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"], out
    (seen,) = sink.seen
    assert seen.tls and seen.delivered == 1
    assert _subject_cn(seen.peercert) == RELAY_SUBJECT  # the sink verified it against its CA


async def test_the_client_certificate_is_presented_on_implicit_tls(
    ca: trustme.CA, mutual_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    cert_file, key_file = write_client_cert(ca, tmp_path, RELAY_SUBJECT)
    sink = await RecordingSink(implicit=mutual_tls).start()
    try:
        out = await send(
            sink.port,
            Connector(implicit_tls=True, tls_certificate_file=cert_file, tls_key_file=key_file),
        )
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"], out
    assert _subject_cn(sink.seen[0].peercert) == RELAY_SUBJECT


async def test_without_the_client_certificate_the_sink_refuses_the_handshake_and_mail_waits(
    mutual_tls: ssl.SSLContext,
) -> None:
    sink = await RecordingSink(starttls=mutual_tls).start()
    try:
        out = await send(sink.port, Connector(require_tls=True))
    finally:
        await sink.close()
    reply = out.per_recipient["a@dest.test"]
    assert reply.is_transient, reply  # deferred (Retry), never bounced
    # the queue's LastError is built from these lines
    (last_error,) = out.transcript_errors
    assert "TLS handshake failed" in last_error, last_error
    assert "CERTIFICATE" in last_error.upper(), last_error
    assert sink.seen[0].handshake_error  # the sink did refuse it
    assert all(s.delivered == 0 for s in sink.seen)
    assert not any(c.upper().startswith(b"MAIL") for c in sink.commands)


async def test_an_unloadable_client_certificate_defers_naming_the_key(tmp_path: Path) -> None:
    sink = await RecordingSink(advertise_starttls=True).start()
    missing = tmp_path / "gone.crt"
    try:
        out = await send(
            sink.port, Connector(tls_certificate_file=missing, tls_key_file=tmp_path / "gone.key")
        )
    finally:
        await sink.close()
    reply = out.per_recipient["a@dest.test"]
    assert reply.is_transient and "tls_certificate_file" in reply.text, reply
    assert sink.seen == []  # not even connected: never sent without the certificate


async def test_a_renewed_client_certificate_is_taken_up_when_reloaded(
    ca: trustme.CA, mutual_tls: ssl.SSLContext, tmp_path: Path
) -> None:
    cert_file, key_file = write_client_cert(ca, tmp_path, "old.corp.test")
    connector = Connector(require_tls=True, tls_certificate_file=cert_file, tls_key_file=key_file)
    load_tls_context(connector)  # what the queue manager does at start, in a thread
    sink = await RecordingSink(starttls=mutual_tls).start()
    try:
        first = await send(sink.port, connector)
        write_client_cert(ca, tmp_path, "new.corp.test")  # renewed under the same names
        load_tls_context(connector)  # what the queue manager does at a reload
        second = await send(sink.port, connector)
    finally:
        await sink.close()
    assert first.delivered == second.delivered == ["a@dest.test"]
    assert [_subject_cn(s.peercert) for s in sink.seen] == ["old.corp.test", "new.corp.test"]


async def test_a_replaced_tls_ca_file_is_taken_up_when_reloaded(tmp_path: Path) -> None:
    """The smart host moves to a certificate from a new private CA; the administrator writes
    the new CA into the connector's tls_ca_file (same name) and reloads. Before, the trust
    store was built once per file name and kept: every delivery still failed certificate
    validation until the process restarted (reproduced). A reload reads the file again, as it
    does a renewed client certificate."""
    old_ca, new_ca = trustme.CA(), trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    new_ca.issue_cert("sink.test", "127.0.0.1").configure_cert(server_tls)
    ca_file = tmp_path / "smarthost-ca.pem"
    old_ca.cert_pem.write_to_path(str(ca_file))
    connector = Connector(tls_auth_level="CertificateValidation", tls_ca_file=ca_file)
    load_tls_context(connector)  # what the queue manager does at start, in a thread
    sink = await RecordingSink(starttls=server_tls).start()
    try:
        before = await send(sink.port, connector)
        new_ca.cert_pem.write_to_path(str(ca_file))  # the administrator's fix, same file name
        load_tls_context(connector)  # what the queue manager does at a reload
        after = await send(sink.port, connector)
    finally:
        await sink.close()
    refused = before.per_recipient["a@dest.test"]
    assert refused.is_transient and "certificate" in refused.text, refused
    assert after.delivered == ["a@dest.test"], after.per_recipient


async def test_a_tls_ca_file_that_cannot_be_loaded_is_named_in_the_reply(tmp_path: Path) -> None:
    """A CA file that is not PEM (replaced by mistake): the hop is deferred without connecting,
    and the reply names tls_ca_file. Before, it blamed the client certificate
    (tls_certificate_file) of a connector that has none (reproduced)."""
    ca_file = tmp_path / "smarthost-ca.pem"
    ca_file.write_text("not a certificate\n")
    sink = await RecordingSink(advertise_starttls=True).start()
    try:
        out = await send(
            sink.port, Connector(tls_auth_level="CertificateValidation", tls_ca_file=ca_file)
        )
    finally:
        await sink.close()
    reply = out.per_recipient["a@dest.test"]
    assert reply.is_transient and "tls_ca_file" in reply.text, reply
    assert "tls_certificate_file" not in reply.text, reply
    assert sink.seen == []


# --------------------------------------------------------------------------------------------------
# ignore_starttls (IgnoreSTARTTLS)


async def test_ignore_starttls_never_starts_tls_although_offered(
    ca: trustme.CA, mutual_tls: ssl.SSLContext
) -> None:
    plain_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test").configure_cert(plain_tls)
    sink = await RecordingSink(starttls=plain_tls).start()
    try:
        default = await send(sink.port, Connector())
        ignored = await send(sink.port, Connector(ignore_starttls=True))
    finally:
        await sink.close()
    assert default.delivered == ignored.delivered == ["a@dest.test"]
    with_tls, without = sink.seen
    assert b"STARTTLS" in [c.upper() for c in with_tls.commands] and with_tls.tls
    assert b"STARTTLS" not in [c.upper() for c in without.commands], without.commands
    assert not without.tls and without.delivered == 1


# --------------------------------------------------------------------------------------------------
# force_helo (ForceHELO)


async def test_force_helo_sends_helo_and_uses_no_extension() -> None:
    sink = await RecordingSink(advertise_starttls=True).start()
    try:
        out = await send(sink.port, Connector(force_helo=True))
        eight_bit = await send(
            sink.port, Connector(force_helo=True), data=MSG.replace(b"Hello", "Grüße".encode())
        )
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"], out
    commands = sink.seen[0].commands
    assert commands[0] == b"HELO " + HELO.encode()
    assert not any(c.upper().startswith((b"EHLO", b"STARTTLS")) for c in commands)
    mail = next(c for c in commands if c.upper().startswith(b"MAIL"))
    assert mail == b"MAIL FROM:<printer@corp.test>"  # no SIZE=, no BODY=
    # an 8-bit message is handled as by a server without 8BITMIME
    assert eight_bit.per_recipient["a@dest.test"] == replies.EIGHTBITMIME_NOT_SUPPORTED
    assert sum(s.delivered for s in sink.seen) == 1


# --------------------------------------------------------------------------------------------------
# smtp_max_messages_per_connection (SmtpMaxMessagesPerConnection)


async def test_smtp_max_messages_per_connection_opens_a_new_session_after_that_many() -> None:
    sink = await RecordingSink().start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        connector = Connector(smtp_max_messages_per_connection=3)
        for i in range(7):
            out = await send(sink.port, connector, pool=pool, recipients=[f"r{i}@dest.test"])
            assert out.delivered == [f"r{i}@dest.test"]
        await pool.aclose()
    finally:
        await sink.close()
    assert [s.delivered for s in sink.seen] == [3, 3, 1]


async def test_the_default_is_twenty_messages_per_connection() -> None:
    sink = await RecordingSink().start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        for i in range(21):
            await send(sink.port, Connector(), pool=pool, recipients=[f"r{i}@dest.test"])
        await pool.aclose()
    finally:
        await sink.close()
    assert [s.delivered for s in sink.seen] == [20, 1]


# --------------------------------------------------------------------------------------------------
# source_ip_address (SourceIPAddress)


async def test_source_ip_address_is_the_local_address_of_the_connection() -> None:
    sink = await RecordingSink().start()
    try:
        default = await send(sink.port, Connector())
        bound = await send(sink.port, Connector(source_ip_address="127.0.0.7"))
    finally:
        await sink.close()
    assert default.delivered == bound.delivered == ["a@dest.test"]
    assert sink.seen[0].peer[0] == "127.0.0.1"
    assert sink.seen[1].peer[0] == "127.0.0.7"


async def test_a_source_address_of_the_other_family_fails_the_hop_and_defers() -> None:
    sink = await RecordingSink().start()
    try:
        out = await send(sink.port, Connector(source_ip_address="::1"))
    finally:
        await sink.close()
    reply = out.per_recipient["a@dest.test"]
    assert reply.is_transient and "source_ip_address ::1" in reply.text, reply
    assert sink.seen == []


# --------------------------------------------------------------------------------------------------
# connect_timeout and greeting_timeout (RelayGate's own): a silent next hop costs seconds, not the
# connector's connection_inactivity_timeout (10 min by default) per hop


class _SilentServer:
    """A socket on 127.0.0.1 that accepts TCP connections and never says a word."""

    async def start(self) -> _SilentServer:
        self.held: list[asyncio.StreamWriter] = []
        self.accepted = asyncio.Event()

        async def hold(_r: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.held.append(writer)
            self.accepted.set()

        self.server = await asyncio.start_server(hold, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        for w in self.held:
            w.close()
        self.server.close()
        await self.server.wait_closed()


class _FullBacklog:
    """A listening socket whose accept queue is full and never accepted from: the kernel drops
    further SYNs (tcp_abort_on_overflow = 0), so a connect to it hangs as to a host that drops
    packets. listen(0) queues one connection; two fill it whatever the kernel rounds it to."""

    def __init__(self) -> None:
        import socket

        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(2):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", self.port))
            self.fillers.append(s)

    def close(self) -> None:
        for s in self.fillers:
            s.close()
        self.listener.close()


async def test_a_next_hop_that_never_greets_fails_after_greeting_timeout() -> None:
    silent = await _SilentServer().start()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        out = await send(silent.port, Connector(greeting_timeout=0.5), timeout=30.0)
        elapsed = loop.time() - started
    finally:
        await silent.close()
    assert silent.accepted.is_set()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(
        replies.CONNECTION_TIMEOUT.line()
    )
    assert elapsed < 5.0, elapsed  # the greeting's 0.5 s, not the 30 s per command


async def test_a_next_hop_that_drops_the_syn_fails_after_connect_timeout() -> None:
    backlog = _FullBacklog()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        out = await send(backlog.port, Connector(connect_timeout=0.5), timeout=30.0)
        elapsed = loop.time() - started
    finally:
        backlog.close()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(
        replies.CONNECTION_TIMEOUT.line()
    )
    assert elapsed < 5.0, elapsed


async def test_connect_and_greeting_timeouts_never_exceed_the_inactivity_timeout() -> None:
    silent = await _SilentServer().start()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        out = await send(silent.port, Connector(greeting_timeout=60.0), timeout=0.5)
        elapsed = loop.time() - started
    finally:
        await silent.close()
    assert out.per_recipient["a@dest.test"].code == 451
    assert elapsed < 5.0, elapsed
