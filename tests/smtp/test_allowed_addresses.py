"""A receive connector's allowed_senders / allowed_recipients, end to end: real smtplib clients bound to
loopback sources, the in-process relay, and a real SMTP sink (aiosmtpd) as the smart host, so that what
is refused is shown never to be queued nor delivered, and what is allowed is shown to arrive."""

from __future__ import annotations

import smtplib
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
import tomlkit
from aiosmtpd.controller import Controller

from relaygate.config.loader import load_config
from tests.smtp.conftest import RelayHandle, default_frontend, relay_connector
from tests.smtp.helpers import free_port

ANON_SEND_AS = "550 5.7.1 Anonymous client does not have permissions to send as this sender"
RCPT_NOT_ALLOWED = (
    "550 5.7.1 Client does not have permissions to send to this recipient on this connector"
)
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
BAD_FROM = "554 5.6.0 Invalid message content, the From header cannot be parsed"
SENDER_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"

PRINTERS = "127.0.0.5"  # the "Printers" relay connector
NULL_OK = "127.0.0.6"  # the "Bounces" relay connector, which lists <>
LAN = "127.0.0.9"  # "Default Frontend" on the second port: no relay right


@dataclass
class Delivered:
    sender: str
    recipients: list[str]
    content: bytes


class Sink:
    """The smart host: keeps every message it accepts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.messages: list[Delivered] = []
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        with self.lock:
            self.messages.append(
                Delivered(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    bytes(envelope.original_content or envelope.content),
                )
            )
        return "250 2.0.0 Ok: queued"

    def wait_for(self, marker: bytes, timeout: float = 20) -> Delivered:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                for m in self.messages:
                    if marker in m.content:
                        return m
            time.sleep(0.05)
        raise AssertionError(f"{marker!r} never reached the sink")

    def has(self, marker: bytes) -> bool:
        with self.lock:
            return any(marker in m.content for m in self.messages)


@pytest.fixture
def sink() -> Any:
    s = Sink()
    s.controller.start()
    try:
        yield s
    finally:
        s.controller.stop()


def start(relay: Any, sink: Sink) -> RelayHandle:
    printers = relay_connector(
        [PRINTERS],
        name="Printers",
        allowed_senders=["scan@corp.example", "*@erp.corp.example"],
        allowed_recipients=["*@corp.example", "*@partner.example", "alerts@msp.example"],
    )
    bounces = relay_connector(
        [NULL_OK],
        name="Bounces",
        bindings=["127.0.0.1:{port3}"],
        allowed_senders=["<>", "*@*.corp.example"],
    )
    front = default_frontend(
        bindings=["127.0.0.1:{port2}"], allowed_recipients=["*@corp.example", "*@partner.example"]
    )
    node = relay([printers, bounces, front], start=False)
    node.doc["send_connectors"][0]["port"] = sink.controller.port
    node.doc["send_connectors"][0]["name"] = "Smart host (sink)"
    node.doc["queue"]["transient_failure_retry_interval"] = "00:00:01"
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.config = load_config(node.config_path)
    return node.start()


def line(reply: tuple[int, bytes]) -> str:
    code, text = reply
    return f"{code} {text.decode()}"


def client(node: RelayHandle, source: str, port: int | None = None) -> smtplib.SMTP:
    c = node.smtp(source=source, port=port)
    c.ehlo("device.corp.example")
    return c


def message(marker: str, from_header: str | None = "scan@corp.example", extra: str = "") -> str:
    head = f"From: {from_header}\r\n" if from_header is not None else ""
    return f"{head}{extra}To: it@corp.example\r\nSubject: {marker}\r\n\r\n{marker}\r\n"


def stored(node: RelayHandle, marker: bytes) -> bool:
    return any(marker in data for data in node.all_data().values())


def refusals(node: RelayHandle, connector: str, code: int, status: str) -> int:
    assert node.relay is not None
    return int(node.relay.ctx.counters.refusals[(connector, code, status)])


def test_allowed_sender_delivered_other_senders_refused_at_mail(relay: Any, sink: Sink) -> None:
    node = start(relay, sink)
    with client(node, PRINTERS) as c:
        assert line(c.mail("SCAN@Corp.Example")) == SENDER_OK  # ASCII case does not matter
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("allowed-exact"))[0] == 250
        assert line(c.mail("invoices@erp.corp.example")) == SENDER_OK  # *@erp.corp.example
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("allowed-domain", "invoices@erp.corp.example"))[0] == 250
    with client(node, PRINTERS) as c:
        # a sender of an accepted domain the connector's rights allow, but not in the list
        assert line(c.mail("ceo@corp.example")) == ANON_SEND_AS
        # *@erp.corp.example does not cover its subdomains
        assert line(c.mail("x@sub.erp.corp.example")) == ANON_SEND_AS
        # the null sender is refused unless listed
        assert line(c.mail("")) == ANON_SEND_AS
        # the session goes on: an allowed sender after the refusals
        assert line(c.mail("scan@corp.example")) == SENDER_OK
    got = sink.wait_for(b"allowed-exact")
    assert got.sender.lower() == "scan@corp.example" and got.recipients == ["it@corp.example"]
    assert sink.wait_for(b"allowed-domain").sender == "invoices@erp.corp.example"
    assert refusals(node, "Printers", 550, "5.7.1") == 3
    log = node.protocol_log_text()
    assert "MAIL refused: sender refused: <ceo@corp.example> is not in allowed_senders" in log
    assert "MAIL refused: sender refused: <> is not in allowed_senders of connector Printers" in log


def test_null_sender_accepted_only_where_listed(relay: Any, sink: Sink) -> None:
    node = start(relay, sink)
    with client(node, NULL_OK, port=node.ports[2]) as c:
        assert line(c.mail("")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("null-listed", "MAILER-DAEMON@relay.corp.example"))[0] == 250
        # *@*.corp.example: the subdomains, not corp.example itself
        assert line(c.mail("scan@corp.example")) == ANON_SEND_AS
    assert sink.wait_for(b"null-listed").sender in ("", "<>")  # aiosmtpd keeps "<>"


def test_from_header_spoofing_refused_at_end_of_data(relay: Any, sink: Sink) -> None:
    node = start(relay, sink)
    with client(node, PRINTERS) as c:
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        assert line(c.data(message("spoofed-from", "The CEO <ceo@corp.example>"))) == ANON_SEND_AS
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        # a second From field is read too
        two = message("two-from", "scan@corp.example", extra="From: ceo@corp.example\r\n")
        assert line(c.data(two)) == ANON_SEND_AS
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        assert line(c.data(message("bad-from", "scan@corp.example <<"))) == BAD_FROM
    with client(node, PRINTERS) as c:
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        # a display name, another allowed address of the list, a folded line: accepted
        folded = '"Scanner 2nd floor"\r\n <SCAN@corp.example>, invoices@erp.corp.example'
        assert c.data(message("display-name", folded))[0] == 250
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        # no From header: accepted (the relay adds none; MAIL FROM was checked)
        assert c.data(message("no-from", None))[0] == 250
    sink.wait_for(b"display-name")
    sink.wait_for(b"no-from")
    for marker in (b"spoofed-from", b"two-from", b"bad-from"):
        assert not sink.has(marker), marker
        assert not stored(node, marker), marker
    assert refusals(node, "Printers", 550, "5.7.1") == 2
    assert refusals(node, "Printers", 554, "5.6.0") == 1
    log = node.protocol_log_text()
    assert (
        "message refused: From header refused: <ceo@corp.example> is not in allowed_senders" in log
    )


@pytest.mark.parametrize("value", ["<", "?=q@[<Z(", "(\u00e9=?q=?).Z@", "a@b <", "<@"])
def test_a_from_header_the_standard_parser_trips_on_is_refused_not_a_crash(
    relay: Any, sink: Sink, value: str
) -> None:
    """Python's RFC 5322 header parser raises IndexError, AttributeError or TypeError (not the
    ValueError the check expected) on some malformed From values ("a@b <" is a defect it
    reports, the control case): the session died with a
    traceback logged at ERROR and the client got no reply, so it sent the message again, and
    again. Such a From is one that cannot be parsed: 554 5.6.0, and the session goes on."""
    node = start(relay, sink)
    content = f"From: {value}\r\nSubject: tripped\r\n\r\ntripped\r\n".encode()
    with client(node, PRINTERS) as c:
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        assert line(c.data(content)) == BAD_FROM
        assert c.noop()[0] == 250
    assert not stored(node, b"tripped")


@pytest.mark.parametrize(
    "breaker",
    [":\r\n", ": no name\r\n", "X\x01: control\r\n", "no colon\r\n", "From mbox-line\r\n", ""],
)
def test_a_from_header_behind_a_line_that_ends_the_strict_header_is_read_too(
    relay: Any, sink: Sink, breaker: str
) -> None:
    """A line that is not a header field ends the header section for the relay (Postfix's rule),
    but not for every reader: Python's email parser, for one, reads on past a ':' line and takes
    the From field behind it, and past an mbox "From " line, and past a first line that is a
    continuation. Up to the first empty line, every From field is checked."""
    node = start(relay, sink)
    hidden = f"Subject: hidden-from\r\n{breaker}From: ceo@corp.example\r\n\r\nhidden-from\r\n"
    refused = ANON_SEND_AS
    if not breaker:  # a first line that continues nothing: Python's parser reads on past it too
        hidden = " leading\r\nFrom: ceo@corp.example\r\n\r\nhidden-from\r\n"
        breaker = " \r\n"
        # refused before its From is read: it would continue the relay's Received field
        # (tests/smtp/test_security_bar.py, test_a_message_starting_with_a_folded_line_is_refused)
        refused = "554 5.6.0 Invalid message content, the header starts with a folded line"
    with client(node, PRINTERS) as c:
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        assert line(c.data(hidden)) == refused
        c.mail("scan@corp.example")
        c.rcpt("it@corp.example")
        # an allowed From behind such a line passes, and a From line in the body is not read
        allowed = (
            f"Subject: allowed-behind\r\n{breaker}From: scan@corp.example\r\n\r\n"
            "allowed-behind\r\nFrom: ceo@corp.example\r\n"
        )
        assert c.data(allowed)[0] == 250
    sink.wait_for(b"allowed-behind")
    assert not sink.has(b"hidden-from")
    assert not stored(node, b"hidden-from")


def test_recipients_narrowed_per_rcpt(relay: Any, sink: Sink) -> None:
    node = start(relay, sink)
    with client(node, PRINTERS) as c:
        assert line(c.mail("scan@corp.example")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        # the connector may relay (Accept-Any-Recipient), but not to this one
        assert line(c.rcpt("someone@gmail.com")) == RCPT_NOT_ALLOWED
        assert line(c.rcpt("alerts@msp.example")) == RCPT_OK  # external, listed, relay right
        assert line(c.rcpt("other@msp.example")) == RCPT_NOT_ALLOWED
        assert c.data(message("narrowed"))[0] == 250
    got = sink.wait_for(b"narrowed")
    assert sorted(got.recipients) == ["alerts@msp.example", "it@corp.example"]
    time.sleep(0.5)  # any copy to the refused recipients would have been sent with it
    assert all(
        "gmail.com" not in r and "other@" not in r for m in sink.messages for r in m.recipients
    )
    assert refusals(node, "Printers", 550, "5.7.1") == 2


def test_allowed_recipients_never_widen_relay(relay: Any, sink: Sink) -> None:
    node = start(relay, sink)
    with client(node, LAN, port=node.ports[1]) as c:
        assert line(c.mail("someone@example.org")) == SENDER_OK
        # *@partner.example is listed, but Default Frontend has no relay right: still 5.7.54
        assert line(c.rcpt("bob@partner.example")) == RELAY_DENIED
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("front", "someone@example.org"))[0] == 250
    got = sink.wait_for(b"front")
    assert got.recipients == ["it@corp.example"]
    assert refusals(node, "Default Frontend", 550, "5.7.54") == 1
