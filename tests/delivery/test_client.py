"""The SMTP client against real sinks on 127.0.0.1 (aiosmtpd, and a raw recorder)."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import struct
import time
from typing import Any

import pytest
import trustme

from relaygate import replies
from relaygate.delivery.client import (
    CONNECTION_DROPPED,
    CREDENTIALS_MISSING,
    SMTPUTF8_NOT_SUPPORTED,
    TLS_NOT_OFFERED,
    TOKEN_UNAVAILABLE,
    UNABLE_TO_CONNECT,
    ConnectionPool,
    deliver,
    helo_name_for,
    remote_reply,
)
from relaygate.delivery.credentials import Credentials, CredentialsError
from relaygate.delivery.oauth import TokenError
from relaygate.delivery.wire import normalise_for_wire, prepare_data
from tests.support.ports import free_port

from . import helpers
from .helpers import SILENT, Connector, Handler, RawSink, hop, start_sink


@pytest.fixture(autouse=True, params=[True, False], ids=["pipelined", "one-by-one"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test here runs against sinks that advertise PIPELINING and against sinks that do not:
    the client's two transaction paths must give the same outcomes."""
    monkeypatch.setattr(helpers, "PIPELINING", request.param)
    return bool(request.param)


MSG = b"From: printer@corp.test\r\nTo: a@dest.test\r\nSubject: scan\r\n\r\nHello\r\n.dot line\r\n"
HELO = "relay.corp.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("sink.test", "127.0.0.1").configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca, tmp_path):
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


async def send(hops, connector=None, *, rcpts=("a@dest.test",), data=MSG, **kw):
    kw.setdefault("timeout", 5.0)
    return await deliver(
        hops if isinstance(hops, list) else [hops],
        connector=connector or Connector(),
        helo_name=HELO,
        sender=kw.pop("sender", "printer@corp.test"),
        recipients=list(rcpts),
        data=data,
        **kw,
    )


# --------------------------------------------------------------------------------------------------
# basic outcomes


async def test_accepts_and_content_is_prepared_data():
    sink = await start_sink()
    try:
        out = await send(hop(sink.port), rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await sink.close()
    assert out.hop_used == f"sink.test[127.0.0.1]:{sink.port}"
    assert out.delivered == ["a@dest.test", "b@dest.test"]
    assert out.per_recipient["a@dest.test"] == replies.Reply(
        250, "2.6.0", "<id@sink.test> Queued mail for delivery"
    )
    assert out.data_reply.code == 250
    [m] = sink.handler.messages
    assert m["content"] == MSG  # well-formed CRLF message arrives byte for byte
    assert m["mail_from"] == "printer@corp.test"
    assert m["rcpt_tos"] == ["a@dest.test", "b@dest.test"]
    assert sink.handler.ehlo_names == [HELO]
    assert f"SIZE={len(normalise_for_wire(MSG))}" in m["mail_options"]


async def test_null_sender():
    sink = await start_sink()
    try:
        out = await send(hop(sink.port), sender="")
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert sink.handler.mail_froms == ["<>"]  # aiosmtpd spells the null path "<>"


async def test_transient_reply_to_all_rcpts_fails_over_and_defers():
    sink = await start_sink(Handler(rcpt_replies={"a@dest.test": "451 4.3.0 try later"}))
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient and r.code == 451 and r.enhanced == "4.4.0"
    assert '"451 4.3.0 try later."' in r.text
    assert out.hop_used is None
    assert sink.handler.messages == []


async def test_transient_mail_from_defers():
    sink = await start_sink(Handler(mail_reply="452 4.3.1 Insufficient system resources"))
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(
        "452 4.3.1 Insufficient system resources"
    )


async def test_permanent_on_one_rcpt_others_delivered():
    sink = await start_sink(
        Handler(rcpt_replies={"bad@dest.test": "550 5.1.1 RESOLVER.ADR.RecipNotFound; not found"})
    )
    try:
        out = await send(hop(sink.port), rcpts=["a@dest.test", "bad@dest.test", "c@dest.test"])
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test", "c@dest.test"]
    assert out.per_recipient["bad@dest.test"] == replies.Reply(
        550, "5.1.1", "RESOLVER.ADR.RecipNotFound; not found"
    )
    assert sink.handler.messages[0]["rcpt_tos"] == ["a@dest.test", "c@dest.test"]


async def test_mixed_transient_rcpt_stays_deferred_without_failover():
    s1 = await start_sink(Handler(rcpt_replies={"b@dest.test": "452 4.2.2 Mailbox full"}))
    s2 = await start_sink()
    try:
        out = await send([hop(s1.port), hop(s2.port)], rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await s1.close()
        await s2.close()
    assert out.delivered == ["a@dest.test"]
    assert out.per_recipient["b@dest.test"] == replies.Reply(452, "4.2.2", "Mailbox full")
    assert s2.handler.connections == 0  # no copy to a second host


async def test_permanent_mail_from_fails_all_without_failover():
    s1 = await start_sink(
        Handler(mail_reply="550 5.7.1 Client does not have permissions to send as this sender")
    )
    s2 = await start_sink()
    try:
        out = await send([hop(s1.port), hop(s2.port)], rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await s1.close()
        await s2.close()
    assert out.failed == ["a@dest.test", "b@dest.test"]
    assert out.per_recipient["a@dest.test"].enhanced == "5.7.1"
    assert s2.handler.connections == 0


async def test_data_5xx_applies_to_all_accepted():
    sink = await start_sink(Handler(data_reply="554 5.6.0 Invalid message content"))
    try:
        out = await send(hop(sink.port), rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await sink.close()
    assert out.per_recipient == {
        "a@dest.test": replies.Reply(554, "5.6.0", "Invalid message content"),
        "b@dest.test": replies.Reply(554, "5.6.0", "Invalid message content"),
    }


async def test_data_4xx_fails_over_to_next_host():
    s1 = await start_sink(Handler(data_reply="451 4.3.0 queue full"))
    s2 = await start_sink()
    try:
        out = await send([hop(s1.port, "mx1.test"), hop(s2.port, "mx2.test")])
    finally:
        await s1.close()
        await s2.close()
    assert out.delivered == ["a@dest.test"]
    assert out.hop_used == f"mx2.test[127.0.0.1]:{s2.port}"
    assert out.transcript_errors == [f"mx1.test[127.0.0.1]:{s1.port}: 451 4.3.0 queue full"]


async def test_drop_mid_data_fails_over():
    raw = await RawSink(drop_after_bytes=10).start()
    sink = await start_sink()
    try:
        out = await send([hop(raw.port, "dropper.test"), hop(sink.port)])
    finally:
        await raw.close()
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert CONNECTION_DROPPED.line() in out.transcript_errors[0]
    assert len(sink.handler.messages) == 1


async def test_drop_mid_data_single_host_defers():
    raw = await RawSink(drop_after_bytes=10).start()
    try:
        out = await send(hop(raw.port))
    finally:
        await raw.close()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(CONNECTION_DROPPED.line())
    assert raw.data == []


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service not available", "554 5.7.1 go away"])
async def test_error_greeting_fails_over(greeting):
    raw = await RawSink(greeting=greeting).start()
    sink = await start_sink()
    try:
        out = await send([hop(raw.port), hop(sink.port)])
    finally:
        await raw.close()
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert greeting in out.transcript_errors[0]


@pytest.mark.parametrize(
    ("greeting", "ehlo_reply", "said"),
    [
        ("this is not SMTP", None, "Malformed SMTP response line"),
        ("220 raw.test ESMTP", "this is not SMTP either", "Malformed SMTP response line"),
        ("220 raw.test ESMTP", "250-" + "x" * 9000, "Response too long"),
    ],
    ids=["garbled-greeting", "garbled-ehlo", "overlong-ehlo"],
)
async def test_a_garbled_greeting_or_ehlo_reply_fails_over_to_the_next_hop(
    greeting, ehlo_reply, said
):
    """A greeting or EHLO reply that is not SMTP (a middlebox, a port that speaks something
    else): aiosmtplib's SMTPResponseException left `deliver` altogether, so the next MX or
    smart host was never tried and the queue said "QUEUE.Internal; delivery attempt failed
    inside the relay" until the message expired (reproduced). Now the hop failed, the next
    one takes the message."""
    raw = await RawSink(
        greeting=greeting,
        answer=lambda verb, conn, n: ehlo_reply if verb == b"EHLO" else None,
    ).start()
    sink = await start_sink()
    try:
        out = await send([hop(raw.port, "mx1.test"), hop(sink.port, "mx2.test")])
    finally:
        await raw.close()
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert out.hop_used == f"mx2.test[127.0.0.1]:{sink.port}"
    [error] = out.transcript_errors
    assert error.startswith(f"mx1.test[127.0.0.1]:{raw.port}: ") and said in error, error
    assert raw.data == []


async def test_failover_when_first_smart_host_refuses_connections():
    dead = free_port()
    sink = await start_sink()
    try:
        out = await send([hop(dead, "sh1.test"), hop(sink.port, "sh2.test")])
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert out.hop_used.startswith("sh2.test")
    assert out.transcript_errors == [f"sh1.test[127.0.0.1]:{dead}: 421 4.2.1 Unable to connect"]
    assert len(sink.handler.messages) == 1


async def test_a_hop_of_an_address_family_this_host_lacks_fails_over_to_the_next(
    monkeypatch: pytest.MonkeyPatch,
):
    """On a host without IPv6 (ipv6.disable=1: socket(AF_INET6) fails with EAFNOSUPPORT), an
    IPv6 next hop ended the whole attempt with an exception: the IPv4 hops after it were never
    tried. It is a hop that cannot be connected to, as one refusing connections. (The kernel
    here has IPv6, so socket creation for AF_INET6 is made to fail as it would.)"""
    import errno

    from relaygate.delivery.client import connection

    real_socket = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    monkeypatch.setattr(connection.socket, "socket", no_ipv6)
    sink = await start_sink()
    try:
        out = await send([hop(sink.port, "mx.test", ip="::1"), hop(sink.port, "mx.test")])
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert out.transcript_errors == [f"mx.test[::1]:{sink.port}: {UNABLE_TO_CONNECT.line()}"]
    assert len(sink.handler.messages) == 1


async def test_all_hosts_unreachable_uses_exchange_failover_text():
    out = await send([hop(free_port()), hop(free_port())])
    r = out.per_recipient["a@dest.test"]
    assert r == replies.failover_failed(UNABLE_TO_CONNECT.line())
    assert r.line() == (
        '451 4.4.0 Primary target IP address responded with: "421 4.2.1 Unable to connect." '
        "Attempted failover to alternate host, but that did not succeed. Either there are no "
        "alternate hosts, or delivery failed to all alternate hosts."
    )
    assert len(out.transcript_errors) == 2


async def test_connect_timeout_text():
    # a listening socket with a full backlog is hard to build portably; a greeting that never
    # comes exercises the same "Connection timed out" reply
    writers = []

    async def silent(reader, writer):
        writers.append(writer)
        await reader.read()  # never greets; returns when the client gives up

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        out = await send(hop(port), timeout=0.3)
    finally:
        for w in writers:
            w.close()
        server.close()
        await server.wait_closed()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(
        "421 4.4.1 Connection timed out"
    )


async def test_no_hops_and_invalid_addresses():
    out = await send([], rcpts=["a@dest.test"])
    assert out.per_recipient["a@dest.test"] == replies.NO_NEXT_HOP
    sink = await start_sink()
    try:
        out = await send(
            hop(sink.port), rcpts=["a@dest.test", "x@dest.test>\r\nRCPT TO:<y@evil.test"]
        )
        bad_sender = await send(hop(sink.port), sender="a@b\r\nRSET")
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert out.per_recipient["x@dest.test>\r\nRCPT TO:<y@evil.test"] == replies.INVALID_RECIPIENT
    assert sink.handler.rcpts == ["a@dest.test"]
    assert bad_sender.per_recipient["a@dest.test"] == replies.INVALID_SENDER


async def test_smtputf8_recipient_needs_remote_support():
    plain = await start_sink()
    utf8 = await start_sink(enable_SMTPUTF8=True)
    rcpts = ["a@dest.test", "josé@dest.test"]
    try:
        out = await send(hop(plain.port), rcpts=rcpts)
        out8 = await send(hop(utf8.port), rcpts=rcpts)
    finally:
        await plain.close()
        await utf8.close()
    assert out.delivered == ["a@dest.test"]
    assert out.per_recipient["josé@dest.test"] == SMTPUTF8_NOT_SUPPORTED
    assert "SMTPUTF8" not in plain.handler.messages[0]["mail_options"]
    assert out8.delivered == rcpts
    assert "SMTPUTF8" in utf8.handler.messages[0]["mail_options"]


def test_helo_name_and_remote_reply_parsing():
    assert helo_name_for(Connector(fqdn="out.corp.test"), "relay.corp.test") == "out.corp.test"
    assert helo_name_for(Connector(), "relay.corp.test") == "relay.corp.test"
    r = remote_reply(550, "5.7.1 first line\n5.7.1 second\x00 line")
    assert r == replies.Reply(550, "5.7.1", "first line second line")
    assert remote_reply(250, "OK") == replies.Reply(250, "", "OK")
    # lines whose codes disagree (the last line's code is the reply's): its own class's status
    r = remote_reply(554, "2.6.0 queued\n5.6.0 rejected after all")
    assert r == replies.Reply(554, "5.6.0", "2.6.0 queued rejected after all")


def test_a_remote_reply_loses_its_c1_controls_too():
    """C1 controls (U+0080-U+009F: U+009B is a terminal's CSI, U+0085 a line break to some
    readers) in a remote server's reply were kept, where C0 ones were dropped: they went into
    the queue's LastError, the logs and the NDR, and from there to an administrator's terminal
    or a sender's mail reader. Other non-ASCII text stays."""
    r = remote_reply(550, "5.1.1 unknown\u009b2J user\u0085 Empf\u00e4nger")
    assert r == replies.Reply(550, "5.1.1", "unknown2J user Empf\u00e4nger")


async def test_route_size_limit():
    out = await send([hop(1)], Connector(max_message_size=10))
    assert out.per_recipient["a@dest.test"] == replies.ROUTE_SIZE_LIMIT


async def test_remote_size_limit_is_permanent():
    sink = await start_sink(data_size_limit=20)
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"] == replies.MESSAGE_TOO_BIG
    assert sink.handler.mail_froms == []


async def test_a_size_limit_that_is_not_a_number_is_ignored():
    """SIZE with a value that is not ASCII digits ("²" passes str.isdigit, then int() raises):
    the ValueError left `deliver`, so no other hop was tried and the queue said QUEUE.Internal
    (reproduced). RFC 1870: a SIZE without a usable number gives no limit."""
    raw = await RawSink(
        answer=lambda verb, conn, n: "250-raw.test\r\n250 SIZE ²" if verb == b"EHLO" else None
    ).start()
    try:
        out = await send(hop(raw.port))
    finally:
        await raw.close()
    assert out.delivered == ["a@dest.test"], out.per_recipient
    assert len(raw.data) == 1


# --------------------------------------------------------------------------------------------------
# byte-for-byte


NASTY = (
    b"Subject: smuggle\r\n\r\nSMUGGLINGSTART\n.\r\nMAIL FROM:<x@evil>\r\n\r.\r\n"
    b"\r\n\x00.\r\nbare\rcr and bare\nlf\r\n" + b"L" * 2000 + b"\r\n..two dots\r\n.\r\nend"
)


@pytest.mark.parametrize(
    "data", [MSG, NASTY, b"", b"no final newline"], ids=["clean", "nasty", "empty", "nonl"]
)
async def test_wire_bytes_equal_normalised_input(data):
    raw = await RawSink().start()
    try:
        out = await send(hop(raw.port), data=data)
    finally:
        await raw.close()
    assert out.delivered == ["a@dest.test"]
    assert raw.data == [normalise_for_wire(data)]


async def test_aiosmtpd_sink_reconstructs_prepared_data():
    sink = await start_sink()
    try:
        await send(hop(sink.port), data=NASTY)
    finally:
        await sink.close()
    assert sink.handler.messages[0]["content"] == prepare_data(NASTY)


async def test_eight_bit_body_declares_8bitmime():
    sink = await start_sink()
    data = "Subject: é\r\n\r\nnaïve\r\n".encode()
    try:
        await send(hop(sink.port), data=data)
    finally:
        await sink.close()
    m = sink.handler.messages[0]
    assert "BODY=8BITMIME" in m["mail_options"]
    assert m["content"] == data


async def test_eight_bit_content_is_returned_by_a_hop_without_8bitmime():
    """RFC 6152: never 8-bit octets to a next hop that did not offer 8BITMIME (before, they were
    sent anyway, without BODY=); ASCII messages still go to it."""

    def seven_bit(verb: bytes, _connection: int, _n: int) -> str | None:
        return "250-raw.test\r\n250 SIZE 10000000" if verb == b"EHLO" else None

    raw = await RawSink(answer=seven_bit).start()
    try:
        eight = await send(hop(raw.port), data="Subject: x\r\n\r\nnaïve café\r\n".encode())
        seven = await send(hop(raw.port), data=b"Subject: x\r\n\r\nnaive cafe\r\n")
    finally:
        await raw.close()
    assert eight.per_recipient["a@dest.test"] == replies.EIGHTBITMIME_NOT_SUPPORTED
    assert eight.per_recipient["a@dest.test"].code == 550
    assert seven.delivered == ["a@dest.test"]
    assert raw.data == [b"Subject: x\r\n\r\nnaive cafe\r\n.\r\n"]
    assert [c for c in raw.commands if c.startswith(b"MAIL")] == [
        b"MAIL FROM:<printer@corp.test> SIZE=29\r\n"
    ]


async def test_declared_smtputf8_needs_a_hop_with_it_only_when_the_header_has_utf8():
    """RFC 6531 §3.2: a message the client sent with SMTPUTF8 and a UTF-8 header is never
    downgraded silently (security bar 146): 5.6.7 from a hop without SMTPUTF8. With an ASCII
    header it goes as usual (Postfix does the same)."""
    plain = await start_sink()
    utf8 = await start_sink(enable_SMTPUTF8=True)
    utf8_header = "Subject: Grüße\r\n\r\nhi\r\n".encode()
    utf8_body = "Subject: Greetings\r\n\r\nGrüße\r\n".encode()
    try:
        refused = await send(hop(plain.port), data=utf8_header, smtputf8=True)
        body_only = await send(hop(plain.port), data=utf8_body, smtputf8=True)
        undeclared = await send(hop(plain.port), data=utf8_header)
        offered = await send(hop(utf8.port), data=utf8_header, smtputf8=True)
    finally:
        await plain.close()
        await utf8.close()
    assert refused.per_recipient["a@dest.test"] == SMTPUTF8_NOT_SUPPORTED
    assert body_only.delivered == ["a@dest.test"] and undeclared.delivered == ["a@dest.test"]
    assert [m["content"] for m in plain.handler.messages] == [utf8_body, utf8_header]
    assert all("SMTPUTF8" not in m["mail_options"] for m in plain.handler.messages)
    assert offered.delivered == ["a@dest.test"]
    assert "SMTPUTF8" in utf8.handler.messages[0]["mail_options"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_recipients_over_the_servers_limit_go_in_another_transaction(
    monkeypatch: pytest.MonkeyPatch, pipelining: bool
) -> None:
    """A server that takes one recipient per transaction answers the others 452: they go in
    further transactions on the same connection, not in the next retry five minutes later
    (review, reproduced). A 452 that is not such a limit (nothing taken) is left deferred."""
    monkeypatch.setattr(helpers, "PIPELINING", pipelining)

    seen: dict[str, int] = {"rcpts": 0}

    def answer(verb: bytes, connection: int, n: int) -> str | None:
        if verb == b"MAIL":
            seen["rcpts"] = 0
        if verb == b"RCPT":
            seen["rcpts"] += 1
            if seen["rcpts"] > 1:
                return "452 4.5.3 Too many recipients"
        return None

    raw = await RawSink(answer=answer).start()
    try:
        out = await send(hop(raw.port), rcpts=["a@dest.test", "b@dest.test", "c@dest.test"])
    finally:
        await raw.close()
    assert out.delivered == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert raw.connections == 1 and len(raw.data) == 3

    def always_full(verb: bytes, _connection: int, n: int) -> str | None:
        return "452 4.2.2 Mailbox full" if verb == b"RCPT" and n > 1 else None

    raw = await RawSink(answer=always_full).start()
    try:
        out = await send(hop(raw.port), rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await raw.close()
    assert out.delivered == ["a@dest.test"]
    assert out.per_recipient["b@dest.test"].code == 452
    # One more transaction at most (it took nothing); with PIPELINING its DATA, which this
    # scripted server accepts with no recipient, is ended at once with an empty content.
    assert [d for d in raw.data if d != b".\r\n"] == raw.data[:1]


async def test_552_to_rcpt_is_temporary_not_a_bounce():
    """RFC 5321 §4.5.3.1.10: clients should treat a 552 to RCPT (RFC 821's "too many
    recipients") as temporary; it was bounced with an NDR (review, reproduced)."""

    def answer(verb: bytes, _connection: int, n: int) -> str | None:
        return "552 5.5.3 Too many recipients" if verb == b"RCPT" and n > 1 else None

    raw = await RawSink(answer=answer).start()
    try:
        out = await send(hop(raw.port), rcpts=["a@dest.test", "b@dest.test"])
    finally:
        await raw.close()
    assert out.delivered == ["a@dest.test"] and not out.failed
    assert out.per_recipient["b@dest.test"] == replies.Reply(452, "4.5.3", "Too many recipients")


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelining", "one-by-one"])
async def test_421_on_a_pooled_session_that_delivered_nothing_yet_gets_a_fresh_connection(
    monkeypatch: pytest.MonkeyPatch, pipelining: bool
) -> None:
    """A pooled session whose last transaction had every RCPT refused had delivered no message,
    so a 421 at its next MAIL (the server's idle timeout) failed the hop instead of opening one
    fresh connection (review, reproduced)."""
    monkeypatch.setattr(helpers, "PIPELINING", pipelining)

    def answer(verb: bytes, connection: int, n: int) -> str | None:
        if connection == 1 and verb == b"RCPT" and n == 1:
            return "550 5.1.1 User unknown"
        if connection == 1 and verb == b"MAIL" and n == 2:
            return "421 4.4.2 Idle timeout, closing"
        return None

    raw = await RawSink(answer=answer).start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        first = await send(hop(raw.port), rcpts=["x@dest.test"], pool=pool)
        second = await send(hop(raw.port), rcpts=["y@dest.test"], pool=pool)
    finally:
        await pool.aclose()
        await raw.close()
    assert first.failed == ["x@dest.test"]
    assert second.delivered == ["y@dest.test"] and raw.connections == 2


# --------------------------------------------------------------------------------------------------
# TLS


async def test_opportunistic_starttls_used_when_offered(server_tls):
    sink = await start_sink(tls_context=server_tls)
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert sink.handler.messages[0]["tls"] is True
    assert sink.handler.ehlo_names == [HELO, HELO]  # EHLO again after TLS


async def test_encryption_only_accepts_untrusted_cert(server_tls):
    sink = await start_sink(tls_context=server_tls)
    try:
        out = await send(
            hop(sink.port), Connector(require_tls=True, tls_auth_level="EncryptionOnly")
        )
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert sink.handler.tls_at_mail == [True]


async def test_certificate_validation_fails_without_ca_then_passes_with_ca(server_tls, ca_file):
    sink = await start_sink(tls_context=server_tls)
    try:
        bad = await send(
            hop(sink.port), Connector(require_tls=True, tls_auth_level="CertificateValidation")
        )
        good = await send(
            hop(sink.port),
            Connector(
                require_tls=True, tls_auth_level="CertificateValidation", tls_ca_file=ca_file
            ),
        )
    finally:
        await sink.close()
    r = bad.per_recipient["a@dest.test"]
    assert r.is_transient  # certificate failures are deferred, never bounced
    assert "certificate validation failed" in r.text
    assert good.delivered == ["a@dest.test"]
    assert sink.handler.tls_at_mail == [True]  # the failed attempt never reached MAIL


async def test_domain_validation_checks_name(server_tls, ca_file):
    sink = await start_sink(tls_context=server_tls)
    base = dict(require_tls=True, tls_auth_level="DomainValidation", tls_ca_file=ca_file)
    try:
        ok_host = await send(hop(sink.port, host="sink.test"), Connector(**base))
        ok_domain = await send(
            hop(sink.port, host="other.test"), Connector(**base, tls_domain="sink.test")
        )
        wrong = await send(
            hop(sink.port, host="sink.test"),
            Connector(**base, tls_domain="mail.protection.outlook.com"),
        )
    finally:
        await sink.close()
    assert ok_host.delivered == ["a@dest.test"]
    assert ok_domain.delivered == ["a@dest.test"]
    r = wrong.per_recipient["a@dest.test"]
    assert r.is_transient and "certificate validation failed" in r.text
    assert len(sink.handler.messages) == 2


async def test_verification_levels_imply_required_tls(ca_file):
    sink = await start_sink()  # no STARTTLS
    try:
        out = await send(
            hop(sink.port), Connector(tls_auth_level="CertificateValidation", tls_ca_file=ca_file)
        )
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"] == replies.failover_failed(TLS_NOT_OFFERED.line())
    assert sink.handler.mail_froms == []


async def test_require_tls_without_starttls_defers_and_sends_no_mail():
    sink = await start_sink()  # STARTTLS hidden
    try:
        out = await send(hop(sink.port), Connector(require_tls=True))
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient and TLS_NOT_OFFERED.line() in r.text
    assert sink.handler.mail_froms == []  # the sink never saw MAIL
    assert sink.handler.messages == []


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_opportunistic_tls_failure_falls_back_to_clear(server_tls):
    # a server whose STARTTLS handshake fails (it has no usable certificate for our client context
    # because we ask for a TLS version it refuses)
    bad_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    bad_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    bad_ctx.set_ciphers("ALL:@SECLEVEL=0")
    ca = trustme.CA()
    ca.issue_cert("sink.test").configure_cert(bad_ctx)
    sink = await start_sink(tls_context=bad_ctx)
    try:
        out = await send(hop(sink.port))
        required = await send(hop(sink.port), Connector(require_tls=True))
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert sink.handler.messages[0]["tls"] is False
    assert required.per_recipient["a@dest.test"].is_transient
    assert len(sink.handler.messages) == 1


async def test_implicit_tls(server_tls, ca_file):
    sink = await start_sink(tls_context=server_tls, implicit_tls=True)
    try:
        out = await send(
            hop(sink.port),
            Connector(implicit_tls=True, tls_auth_level="DomainValidation", tls_ca_file=ca_file),
        )
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]


# --------------------------------------------------------------------------------------------------
# AUTH


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
async def test_basic_auth_with_password_file(server_tls, tmp_path, mechanism, caplog):
    pw = tmp_path / "pw"
    pw.write_text("s3cret-Pa55\n")
    exclude = ["LOGIN"] if mechanism == "PLAIN" else ["PLAIN"]
    sink = await start_sink(
        Handler(users={"relay@corp.test": "s3cret-Pa55"}),
        tls_context=server_tls,
        auth_required=True,
        auth_exclude_mechanism=exclude,
    )
    conn = Connector(
        smart_host_auth_mechanism="BasicAuthRequireTLS",
        auth_username="relay@corp.test",
        auth_password_file=pw,
    )
    creds = Credentials.from_connector(conn)
    assert "s3cret" not in repr(creds)
    caplog.set_level(logging.DEBUG)
    try:
        out = await send(hop(sink.port), conn, credentials=creds)
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert sink.handler.auth_seen == [(mechanism, "relay@corp.test")]
    assert sink.handler.messages[0]["auth"] == "relay@corp.test"
    assert "s3cret" not in caplog.text


async def test_wrong_password_defers_and_never_leaks(server_tls, caplog):
    sink = await start_sink(
        Handler(users={"relay@corp.test": "right"}), tls_context=server_tls, auth_required=True
    )
    conn = Connector(
        smart_host_auth_mechanism="BasicAuth",
        auth_username="relay@corp.test",
        auth_password_env="RG_TEST_PW",
    )
    creds = Credentials.from_connector(conn, environ={"RG_TEST_PW": "wrong-Secret-XYZ"})
    caplog.set_level(logging.DEBUG)
    try:
        out = await send(hop(sink.port), conn, credentials=creds)
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient and "535" in r.text
    assert "wrong-Secret-XYZ" not in r.line() + " ".join(out.transcript_errors) + caplog.text
    assert sink.handler.mail_froms == []


async def test_basic_auth_require_tls_never_sends_credentials_in_clear():
    sink = await start_sink(
        Handler(users={"u": "p"}), auth_require_tls=False
    )  # offers AUTH in clear, no STARTTLS
    conn = Connector(smart_host_auth_mechanism="BasicAuthRequireTLS", auth_username="u")
    try:
        out = await send(hop(sink.port), conn, credentials=Credentials("u", password="p"))
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"].is_transient
    assert sink.handler.auth_seen == []
    assert sink.handler.mail_froms == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
async def test_basic_auth_in_clear_when_connector_allows_it():
    sink = await start_sink(Handler(users={"u": "p"}), auth_require_tls=False, auth_required=True)
    conn = Connector(smart_host_auth_mechanism="BasicAuth", auth_username="u")
    try:
        out = await send(hop(sink.port), conn, credentials=Credentials("u", password="p"))
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]


async def test_missing_credentials_never_connect():
    sink = await start_sink()
    conn = Connector(smart_host_auth_mechanism="BasicAuth", auth_username="u")
    try:
        out = await send(hop(sink.port), conn, credentials=None)
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"] == CREDENTIALS_MISSING
    assert sink.handler.connections == 0


def test_credentials_loading(tmp_path):
    f = tmp_path / "pw"
    f.write_bytes(b"pa ss\r\n")
    c = Connector(smart_host_auth_mechanism="BasicAuth", auth_username="u", auth_password_file=f)
    assert Credentials.from_connector(c).password == "pa ss"
    assert Credentials.from_connector(Connector()) is None
    with pytest.raises(CredentialsError) as info:
        Credentials.from_connector(
            Connector(smart_host_auth_mechanism="BasicAuth", auth_password_env="NOPE_RG_X"),
            environ={},
        )
    assert "NOPE_RG_X" in str(info.value)
    with pytest.raises(CredentialsError):
        Credentials.from_connector(
            Connector(smart_host_auth_mechanism="BasicAuth", auth_password_file=tmp_path / "none")
        )
    with pytest.raises(CredentialsError):
        Credentials.from_connector(Connector(smart_host_auth_mechanism="XOAUTH2"))


async def test_xoauth2_exchange(server_tls):
    sink = await start_sink(
        Handler(oauth_tokens={"relay@corp.test": "tok-123"}),
        tls_context=server_tls,
        auth_required=True,
    )
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        return "tok-123"

    conn = Connector(
        smart_host_auth_mechanism="XOAUTH2", auth_username="relay@corp.test", require_tls=True
    )
    creds = Credentials.from_connector(conn, token_provider=token)
    try:
        out = await send(hop(sink.port), conn, credentials=creds)
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert calls == 1
    assert sink.handler.auth_seen == [("XOAUTH2", "relay@corp.test")]


async def test_xoauth2_bad_token_defers(server_tls):
    sink = await start_sink(
        Handler(oauth_tokens={"relay@corp.test": "good"}),
        tls_context=server_tls,
        auth_required=True,
    )

    async def token() -> str:
        return "expired"

    conn = Connector(smart_host_auth_mechanism="XOAUTH2", auth_username="relay@corp.test")
    try:
        out = await send(
            hop(sink.port), conn, credentials=Credentials("relay@corp.test", token_provider=token)
        )
    finally:
        await sink.close()
    assert out.per_recipient["a@dest.test"].is_transient
    assert sink.handler.mail_froms == []


class _RevokingSink(Handler):
    """Takes one token at a time for relay@corp.test. The second AUTH with a revoked token is
    answered only once a message went through with the new one: that connection started with
    the old token before another had renewed it."""

    def __init__(self) -> None:
        super().__init__(oauth_tokens={"relay@corp.test": "tok-0"})
        self.revoked: set[str] = set()
        self.refusals = 0

    async def auth_XOAUTH2(self, server, args):
        token = base64.b64decode(args[1]).split(b"Bearer ")[1].rstrip(b"\x01").decode()
        if token in self.revoked:
            self.refusals += 1
            if self.refusals == 2:
                while len(self.messages) < 2:
                    await asyncio.sleep(0.01)
        return await super().auth_XOAUTH2(server, args)


class _RenewingProvider:
    """A caching token provider: invalidate(token) renews it while it is the current one."""

    def __init__(self) -> None:
        self.current, self.issued = "tok-0", 1

    async def __call__(self) -> str:
        return self.current

    async def invalidate(self, token: str | None = None) -> None:
        if token is None or token == self.current:
            self.current, self.issued = f"tok-{self.issued}", self.issued + 1


async def test_xoauth2_two_connections_refused_the_same_revoked_token_both_deliver(server_tls):
    """Two deliveries authenticate with a token that had been accepted and is now revoked: the
    first renews it and delivers; the second's refusal comes after that. It retried only if
    its token was the last one accepted (by then the new one): deferred, though a good token
    was at hand (review, reproduced: the second deferred)."""
    handler = _RevokingSink()
    sink = await start_sink(handler, tls_context=server_tls, auth_required=True)
    provider = _RenewingProvider()
    conn = Connector(
        smart_host_auth_mechanism="XOAUTH2", auth_username="relay@corp.test", require_tls=True
    )
    creds = Credentials("relay@corp.test", token_provider=provider)
    try:
        first = await send(hop(sink.port), conn, credentials=creds)
        assert first.delivered == ["a@dest.test"]  # tok-0 accepted
        handler.revoked.add("tok-0")
        handler.oauth_tokens["relay@corp.test"] = "tok-1"
        a, b = await asyncio.gather(
            send(hop(sink.port), conn, credentials=creds, rcpts=("b@dest.test",)),
            send(hop(sink.port), conn, credentials=creds, rcpts=("c@dest.test",)),
        )
    finally:
        await sink.close()
    assert a.delivered == ["b@dest.test"] and b.delivered == ["c@dest.test"]
    assert provider.issued == 2  # one renewal for both


async def test_xoauth2_token_provider_failure_defers(server_tls):
    sink = await start_sink(Handler(oauth_tokens={"u": "t"}), tls_context=server_tls)

    async def token() -> str:
        raise RuntimeError("AADSTS7000215: invalid client secret is 'hunter2'")

    conn = Connector(smart_host_auth_mechanism="XOAUTH2", auth_username="u")
    try:
        out = await send(hop(sink.port), conn, credentials=Credentials("u", token_provider=token))
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r == TOKEN_UNAVAILABLE  # the relay's own reply, not the remote host's (no failover)
    assert "hunter2" not in r.line()


async def test_xoauth2_no_token_is_not_asked_again_for_each_next_hop(server_tls):
    """No token could be had: the next hops (smtp.office365.com's several addresses) would need
    the same token. Each hop asked for it again: as many token requests per delivery as hops,
    and with an endpoint that does not answer, a timeout for each (review, reproduced: three
    requests for three hops)."""
    sinks = [
        await start_sink(Handler(oauth_tokens={"u": "t"}), tls_context=server_tls) for _ in range(3)
    ]
    calls = 0

    async def token() -> str:
        nonlocal calls
        calls += 1
        raise TokenError("send connector 'M365': invalid_client (AADSTS7000215: Invalid secret)")

    conn = Connector(smart_host_auth_mechanism="XOAUTH2", auth_username="u")
    try:
        out = await send(
            [hop(s.port) for s in sinks], conn, credentials=Credentials("u", token_provider=token)
        )
    finally:
        for s in sinks:
            await s.close()
    assert calls == 1
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient and r.text.startswith(TOKEN_UNAVAILABLE.text)
    assert "AADSTS7000215" in r.text and "failover" not in r.text
    assert all(s.handler.mail_froms == [] for s in sinks)


# --------------------------------------------------------------------------------------------------
# connection reuse


async def test_pool_reuses_authenticated_session(server_tls):
    sink = await start_sink(Handler(users={"u": "p"}), tls_context=server_tls, auth_required=True)
    pool = ConnectionPool(idle_seconds=5.0)
    conn = Connector(smart_host_auth_mechanism="BasicAuth", auth_username="u")
    creds = Credentials("u", password="p")
    try:
        for i in range(3):
            out = await send(
                hop(sink.port), conn, credentials=creds, pool=pool, rcpts=[f"r{i}@dest.test"]
            )
            assert out.delivered == [f"r{i}@dest.test"]
        assert len(pool) == 1
        await pool.aclose()
    finally:
        await sink.close()
    assert sink.handler.connections == 1
    assert len(sink.handler.auth_seen) == 1
    assert [m["rcpt_tos"] for m in sink.handler.messages] == [
        ["r0@dest.test"],
        ["r1@dest.test"],
        ["r2@dest.test"],
    ]


async def test_pool_expires_idle_sessions_and_caps_messages():
    sink = await start_sink()
    pool = ConnectionPool(idle_seconds=0.2, max_messages_per_connection=2)
    try:
        for _ in range(3):
            await send(hop(sink.port), pool=pool)
        assert sink.handler.connections == 2  # third message needed a new session
        await asyncio.sleep(0.5)
        assert len(pool) == 0
        await send(hop(sink.port), pool=pool)
        assert sink.handler.connections == 3
        await pool.aclose()
    finally:
        await sink.close()


async def test_pool_recovers_from_stale_session():
    sink = await start_sink()
    pool = ConnectionPool(idle_seconds=30)
    try:
        await send(hop(sink.port), pool=pool)
        # the remote closes the idle connection behind our back
        [[session]] = pool._idle.values()
        session.smtp.transport.close()
        await asyncio.sleep(0.05)
        out = await send(hop(sink.port), pool=pool)
        await pool.aclose()
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert len(sink.handler.messages) == 2


async def test_pool_is_bounded():
    sinks = [await start_sink() for _ in range(3)]
    pool = ConnectionPool(idle_seconds=30, max_size=2)
    try:
        for s in sinks:
            await send(hop(s.port), pool=pool)
        assert len(pool) == 2
        await pool.aclose()
    finally:
        for s in sinks:
            await s.close()


# --------------------------------------------------------------------------------------------------
# reuse without RSET when the last transaction ended cleanly


def _verbs(commands: list[bytes]) -> list[bytes]:
    return [c[:4].upper() for c in commands]


async def test_a_clean_pooled_session_is_reused_without_rset():
    sink = await RawSink().start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        for i in range(3):
            out = await send(hop(sink.port), pool=pool, rcpts=[f"r{i}@dest.test"])
            assert out.delivered == [f"r{i}@dest.test"]
        await pool.aclose()
    finally:
        await sink.close()
    assert len(sink.sessions) == 1
    verbs = _verbs(sink.sessions[0])
    assert b"RSET" not in verbs  # three transactions back to back, each ended by its 250
    assert verbs.count(b"MAIL") == 3 and verbs.count(b"DATA") == 3


async def test_after_a_refused_data_command_the_next_reuse_starts_with_rset():
    # DATA refused at the command (the server may keep MAIL/RCPT state): RSET before reuse.
    sink = await RawSink(
        answer=lambda verb, conn, n: (
            "554 5.5.1 no valid recipients" if verb == b"DATA" and n == 1 else None
        )
    ).start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        first = await send(hop(sink.port), pool=pool)
        assert first.per_recipient["a@dest.test"].code == 554
        second = await send(hop(sink.port), pool=pool)
        assert second.delivered == ["a@dest.test"]
        await pool.aclose()
    finally:
        await sink.close()
    assert len(sink.sessions) == 1
    verbs = _verbs(sink.sessions[0])
    first_data = verbs.index(b"DATA")
    assert verbs[first_data + 1] == b"RSET"  # before the second MAIL


async def test_a_pooled_session_the_server_closed_with_421_retries_on_a_fresh_connection():
    sink = await RawSink(
        answer=lambda verb, conn, n: (
            "421 4.4.2 scripted.test idle timeout"
            if verb == b"MAIL" and conn == 1 and n == 2
            else None
        )
    ).start()
    pool = ConnectionPool(idle_seconds=30)
    try:
        assert (await send(hop(sink.port), pool=pool)).delivered == ["a@dest.test"]
        out = await send(hop(sink.port), pool=pool)
        await pool.aclose()
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert len(sink.sessions) == 2
    assert _verbs(sink.sessions[1])[:2] == [b"EHLO", b"MAIL"]


async def test_a_server_that_stops_answering_times_out_and_defers():
    """No reply to MAIL (or to the pipelined group) within the timeout: the hop failed with a
    timeout, nothing was delivered, the message waits for a retry."""
    sink = await RawSink(answer=lambda verb, conn, n: None if verb == b"EHLO" else SILENT).start()
    try:
        t0 = time.monotonic()
        out = await send(hop(sink.port), timeout=0.5)
        took = time.monotonic() - t0
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient, r
    assert "time" in r.text.lower(), r
    assert out.delivered == [] and sink.data == []
    assert 0.4 < took < 3.0


async def test_a_garbled_reply_defers_the_message_and_drops_the_session():
    """A reply without a three-digit code is no reply: the hop failed, nothing was delivered, the
    message waits for a retry (with or without PIPELINING)."""
    sink = await RawSink(
        answer=lambda verb, conn, n: "this is not SMTP" if verb == b"MAIL" else None
    ).start()
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient, r
    assert out.hop_used is None and out.delivered == []
    assert sink.data == []


@pytest.mark.parametrize(
    ("handler", "where"),
    [
        (lambda: Handler(data_reply="999 9.9.9 what now"), "the end of DATA"),
        (lambda: Handler(rcpt_replies={"a@dest.test": "600 6.0.0 unheard of"}), "RCPT"),
        (lambda: Handler(mail_reply="700 whatever"), "MAIL"),
    ],
    ids=["end-of-data", "rcpt", "mail"],
)
async def test_a_reply_code_outside_2xx_to_5xx_is_a_protocol_error_not_a_bounce(handler, where):
    """RFC 5321 §4.2: a reply whose first digit is not 2 to 5 is out of range, a fatal error of
    the session, and says nothing of the message. Before, a 6xx-9xx counted as a permanent
    failure (Reply.is_permanent is code >= 500): an NDR for a message the next hop may have
    taken at the end of DATA (reproduced). Now the hop failed transiently: retried, not bounced."""
    sink = await start_sink(handler())
    try:
        out = await send(hop(sink.port))
    finally:
        await sink.close()
    r = out.per_recipient["a@dest.test"]
    assert r.is_transient, r
    assert f"unexpected reply to {where}" in r.text, r
    assert out.failed == [] and out.delivered == []


class SlowReader(helpers.LoopbackServer):
    """An SMTP server on a slow link: it takes the content 16 KiB at a time, 30 ms apart
    (about 0.5 MB/s), with its receive buffer fixed at 4 KiB so that the kernel cannot take
    the message in for it. Records how many octets came after the 354."""

    def __init__(self, tls: ssl.SSLContext | None = None, pause: float = 0.03) -> None:
        self.received: list[int] = []
        self.tls = tls  # offer STARTTLS with this context
        self.pause = pause  # between two 16 KiB reads of the content

    async def start(self) -> SlowReader:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by accept
        listener.bind(("127.0.0.1", 0))
        # a small stream buffer too: the server reads the content as it goes, not ahead of it
        self.server = await asyncio.start_server(self._serve, sock=listener, limit=16384)
        self.port = listener.getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 slow.test ESMTP\r\n")
        starttls = self.tls is not None
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    pipelining = b"250-PIPELINING\r\n" if helpers.PIPELINING else b""
                    offer = b"250-STARTTLS\r\n" if starttls else b""
                    writer.write(b"250-slow.test\r\n" + pipelining + offer + b"250 8BITMIME\r\n")
                elif verb == b"STAR" and starttls and self.tls is not None:
                    writer.write(b"220 2.0.0 go ahead\r\n")
                    await writer.drain()
                    await writer.start_tls(self.tls)
                    starttls = False
                    continue
                elif verb == b"DATA":
                    writer.write(b"354 go ahead\r\n")
                    await writer.drain()
                    content = bytearray()
                    while not content.endswith(b"\r\n.\r\n"):
                        chunk = await reader.read(16384)
                        if not chunk:
                            return
                        content += chunk
                        await asyncio.sleep(self.pause)
                    self.received.append(len(content))
                    writer.write(b"250 2.6.0 queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 OK\r\n")
                await writer.drain()
        except ConnectionError:
            return
        finally:
            writer.close()


def slow_link_message(monkeypatch: pytest.MonkeyPatch) -> bytes:
    """A ~1 MB message, and the client's send buffer fixed small (8 KiB) so that the kernel
    holds little of it on the client's side: the link's pace is the reader's."""
    from relaygate.delivery.client import connection

    connect = connection._connect_socket

    async def small_send_buffer(*args: Any, **kwargs: Any) -> socket.socket:
        sock = await connect(*args, **kwargs)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        return sock

    monkeypatch.setattr(connection, "_connect_socket", small_send_buffer)
    return b"Subject: scans\r\n\r\n" + (b"0123456789" * 7 + b"abcdef\r\n") * 13_000


async def test_a_message_that_flows_slowly_is_not_cut_off_by_the_reply_timeout(monkeypatch):
    """The timeout bounds each wait for the next hop (connection_inactivity_timeout), not the
    transfer of the content: a 1 MB message on a ~0.5 MB/s link takes 2 s, each piece of it
    moving well inside a 0.5 s timeout. Before, the whole content was handed to the transport
    at once and the wait for the final reply began there, so it timed out while the content
    was still flowing (reproduced, with or without PIPELINING), on every retry: a message
    bigger than timeout × link speed could never be delivered. The client's send buffer is
    fixed small too, so the kernel holds little of the message on either side."""
    data = slow_link_message(monkeypatch)
    slow = await SlowReader().start()
    try:
        t0 = time.monotonic()
        out = await send(hop(slow.port), data=data, timeout=0.5)
        took = time.monotonic() - t0
    finally:
        await slow.close()
    assert out.delivered == ["a@dest.test"], out.per_recipient
    assert slow.received == [len(normalise_for_wire(data))]
    assert took > 1.0  # it did flow slowly: more than twice the timeout


async def test_a_message_that_flows_slowly_over_tls_is_not_cut_off_by_the_reply_timeout(
    monkeypatch, server_tls
):
    """The same over STARTTLS. asyncio's TLS transport (uvloop's too) asks its writer to pause
    only when 512 KiB wait in it, not 64 KiB as a TCP transport does: the content was written
    piece by piece, yet up to 512 KiB of it was still to go when the wait for the final reply
    began, and a link that moves that in more than the timeout cut off every attempt
    (reproduced: 1 MB at ~0.27 MB/s, 1 s timeout, 421 4.4.1 each time)."""
    data = slow_link_message(monkeypatch)
    slow = await SlowReader(tls=server_tls, pause=0.06).start()
    try:
        t0 = time.monotonic()
        out = await send(
            hop(slow.port), Connector(tls_auth_level="EncryptionOnly"), data=data, timeout=1.0
        )
        took = time.monotonic() - t0
    finally:
        await slow.close()
    assert out.delivered == ["a@dest.test"], out.per_recipient
    assert slow.received == [len(normalise_for_wire(data))]
    assert took > 2.0  # it did flow slowly: more than twice the timeout


class ResetAfter354(helpers.LoopbackServer):
    """Answers DATA with 354, then resets the connection (RST) before reading the content."""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 reset.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                pipelining = b"250-PIPELINING\r\n" if helpers.PIPELINING else b""
                writer.write(b"250-reset.test\r\n" + pipelining + b"250 8BITMIME\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            else:
                writer.write(b"250 2.0.0 OK\r\n")
            await writer.drain()


async def test_content_stops_at_a_connection_reset_without_a_warning_per_piece(caplog):
    """A big message whose next hop resets the connection once it has said 354: the hop failed
    (transient), and the content stops at the reset. Written piece by piece, every piece after
    the reset made asyncio log "socket.send() raised exception." (473 lines for 31 MB,
    reproduced with PIPELINING)."""
    caplog.set_level(logging.WARNING, logger="asyncio")
    data = b"Subject: big\r\n\r\n" + (b"z" * 76 + b"\r\n") * 60_000  # ~4.7 MB: 72 pieces
    server = await ResetAfter354().start()
    try:
        out = await send(hop(server.port), data=data)
    finally:
        await server.close()
    reply = out.per_recipient["a@dest.test"]
    assert reply.is_transient and out.delivered == [], reply
    warnings = [r for r in caplog.records if "socket.send() raised" in r.getMessage()]
    assert warnings == [], len(warnings)
