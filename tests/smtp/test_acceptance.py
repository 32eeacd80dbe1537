"""Durable acceptance: the one Received header, nothing else changed, the queue id in the 250; and the
protocol log of a session parsed back as CSV, field by field (exchange-semantics.md §6.1-6.2)."""

from __future__ import annotations

import base64
import csv
import io
import itertools
import re

import pytest

from tests.smtp.conftest import FQDN, SERVER_NAME, relay_connector

RECEIVED = re.compile(
    rb"^Received: from (?P<helo>\S+) \(\[(?P<ip>[0-9.]+)\]\)\r\n"
    rb"\tby (?P<by>\S+) \(RelayGate; (?P<connector>[^)]+)\)\r\n"
    rb"\twith (?P<proto>(?:UTF8SMTP|ESMTP)S?A?|SMTP) id (?P<id>[0-9A-F]{16}-\d+)"
    rb"(\r\n\tfor <(?P<for>[^>]+)>)?; (?P<date>[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d [+-]\d{4})\r\n"
)


def test_received_header_prepended_and_nothing_else_changed(relay):
    r = relay([relay_connector(["127.0.0.5"], name="SMTP Relay Internal")])
    content = (
        b"Received: from upstream.example (forged) by nowhere; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: =?utf-8?q?Scanner_=C3=A9?= <scanner01@corp.example>\r\n"
        b"To: someone@external.example\r\n"
        b"Subject: caf\xc3\xa9 8-bit header\r\n"
        b"Message-ID: <scan-0001@corp.example>\r\n"
        b"X-Odd-Header:no space\r\n"
        b"X-Folded: first\r\n   continued\r\n"
        b"\r\n"
        b".leading dot\r\n"
        b"..two dots\r\n" + b"L" * 998 + b"\r\n"
        b"\xff\xfe binary-ish bytes \x01\x7f\r\n"
        b"last line without anything after"
        b"\r\n"
    )
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    with r.raw("127.0.0.5") as c:
        c.greet("EHLO scanner01.corp.example")
        c.cmd("MAIL FROM:<scanner01@corp.example> BODY=8BITMIME", 250)
        c.cmd("RCPT TO:<someone@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(stuffed + b".\r\n")
        done = c.expect(250).text
    m = re.search(r"\[InternalId=([0-9A-F]{16}), Hostname=relay\.corp\.example\]", done)
    assert m, done
    assert done.startswith("250 2.6.0 <scan-0001@corp.example> ")
    queue_id = m.group(1)
    msg = r.message(queue_id)
    assert msg is not None
    assert msg.sender == "scanner01@corp.example"
    assert [x.address for x in msg.recipients] == ["someone@external.example"]
    assert msg.message_id == "<scan-0001@corp.example>"
    data = r.data(queue_id)
    header = RECEIVED.match(data)
    assert header, data[:400]
    assert header["helo"] == b"scanner01.corp.example"
    assert header["ip"] == b"127.0.0.5"  # the real TCP peer
    assert header["by"] == FQDN.encode()
    assert header["connector"] == b"SMTP Relay Internal"
    assert header["proto"] == b"ESMTP"
    assert header["for"] == b"someone@external.example"
    assert data[header.end() :] == content  # byte for byte, dots unstuffed, 8-bit kept
    assert msg.size == len(data)
    assert f" {len(data)} bytes in " in done


_FIREWALLED = (
    b"X-MS-Exchange-Organization-AuthAs: Internal\r\n"
    b"x-ms-exchange-organization-SCL:\r\n -1\r\n"
    b"X-MS-Exchange-Forest-RulesExecuted: RELAY01\r\n"
)
_ROUTING = b"Received: from upstream.example by nowhere; Mon, 1 Jan 2024 00:00:00 +0000\r\nResent-From: <a@corp.example>\r\n"
_KEPT = b"X-MS-Exchange-Transport-Fork: kept\r\nSubject: firewall\r\n"


def _queued_content(r, source: str) -> bytes:
    """The stored message of one transaction from `source`, without the relay's Received field."""
    with r.raw(source) as c:
        c.greet()
        c.cmd("MAIL FROM:<app@corp.example>", 250)
        c.cmd("RCPT TO:<someone@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(_ROUTING + _FIREWALLED + _KEPT + b"\r\nbody\r\n.\r\n")
        queue_id = re.search(r"InternalId=([0-9A-F]{16})", c.expect(250).text).group(1)
    data = r.data(queue_id)
    return data[RECEIVED.match(data).end() :]


def test_header_firewall_removes_the_headers_the_session_may_not_send(relay):
    """exchange-semantics.md §3.1-3.2, Exchange's header firewall: without
    ms-Exch-Accept-Headers-Organization / -Forest a session's X-MS-Exchange-Organization-* /
    X-MS-Exchange-Forest-* fields (folded lines too) are removed, without
    ms-Exch-Accept-Headers-Routing its Received and Resent-* fields. A device in a relay range
    cannot hand the next hop (Exchange Online) an 'AuthAs: Internal' or an 'SCL: -1'."""
    anonymous = "NT AUTHORITY\\ANONYMOUS LOGON"
    org_rights = ["ms-Exch-Accept-Headers-Organization", "ms-Exch-Accept-Headers-Forest"]
    r = relay(
        [
            relay_connector(["127.0.0.5"], name="Method A"),
            relay_connector(
                ["127.0.0.6"], name="Method B", auth_mechanism=["ExternalAuthoritative"],
                permission_groups=["ExchangeServers"], permissions=[],
            ),
            relay_connector(
                ["127.0.0.7"], name="Custom rights", permission_groups=[],
                permissions=[{"user": anonymous, "extended_rights": [
                    "ms-Exch-SMTP-Submit", "ms-Exch-SMTP-Accept-Any-Recipient",
                    "ms-Exch-SMTP-Accept-Any-Sender", "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
                ]}],
            ),
            relay_connector(
                ["127.0.0.8"], name="Trusted headers",
                permissions=[{"user": anonymous, "extended_rights": [
                    "ms-Exch-SMTP-Accept-Any-Recipient", *org_rights,
                ]}],
            ),
        ]
    )  # fmt: skip
    # AnonymousUsers (method A) and Externally Secured Servers (method B) keep routing headers only
    for source in ("127.0.0.5", "127.0.0.6"):
        assert _queued_content(r, source) == _ROUTING + _KEPT + b"\r\nbody\r\n", source
    # no Accept-Headers-Routing: Received and Resent-* go too
    assert _queued_content(r, "127.0.0.7") == _KEPT + b"\r\nbody\r\n"
    # the rights granted: nothing removed
    assert _queued_content(r, "127.0.0.8") == _ROUTING + _FIREWALLED + _KEPT + b"\r\nbody\r\n"


def test_received_header_for_helo_and_several_recipients(relay):
    r = relay([relay_connector()])
    with r.raw() as c:
        c.greet("HELO old-printer")
        c.cmd("MAIL FROM:<p@corp.example>", 250)
        c.cmd("RCPT TO:<a@corp.example>", 250)
        c.cmd("RCPT TO:<b@corp.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
        c.expect(250)
    (msg,) = r.messages()
    header = RECEIVED.match(r.data(msg.queue_id))
    assert header and header["proto"] == b"SMTP" and header["for"] is None
    assert header["helo"] == b"old-printer"


def test_received_header_names_a_recipient_given_twice(relay):
    """RFC 5321 §4.4: `for` when the message has one recipient; a recipient given again is the
    same one (queued once), not a second recipient."""
    r = relay([relay_connector()])
    with r.raw() as c:
        c.greet()
        c.cmd("MAIL FROM:<p@corp.example>", 250)
        c.cmd("RCPT TO:<a@corp.example>", 250)
        c.cmd("RCPT TO:<a@corp.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
        c.expect(250)
    (msg,) = r.messages()
    assert [x.address for x in msg.recipients] == ["a@corp.example"]
    header = RECEIVED.match(r.data(msg.queue_id))
    assert header and header["for"] == b"a@corp.example"


def test_received_header_of_an_smtputf8_transaction_says_utf8smtp(relay):
    """RFC 6531 §3.7.3 (registered WITH protocol types): a transaction whose MAIL carried SMTPUTF8
    is received `with UTF8SMTP` (UTF8SMTPS, UTF8SMTPA, UTF8SMTPSA), as Postfix and Gmail write
    it; the next transaction on the session, without SMTPUTF8, is ESMTP again."""
    r = relay([relay_connector()])
    with r.raw() as c:
        c.greet()
        for mail in ("MAIL FROM:<jürgen@corp.example> SMTPUTF8", "MAIL FROM:<p@corp.example>"):
            c.cmd(mail, 250)
            c.cmd("RCPT TO:<a@corp.example>", 250)
            c.cmd("DATA", 354)
            c.send(b"Subject: x\r\n\r\ny\r\n.\r\n")
            c.expect(250)
    protocols = sorted(
        (m.sender, RECEIVED.match(r.data(m.queue_id))["proto"])  # type: ignore[index]
        for m in r.messages()
    )
    assert protocols == [("jürgen@corp.example", b"UTF8SMTP"), ("p@corp.example", b"ESMTP")]


def test_a_utf8_message_id_is_kept_and_never_written_into_a_reply(relay):
    """RFC 6532 lets an SMTPUTF8 message's Message-ID hold UTF-8; an SMTP reply is ASCII (RFC 5321
    §4.2 textstring). The id is tracked as written, and the 250 names the message by the id it
    would have had without one."""
    r = relay([relay_connector()])
    with r.raw() as c:
        c.greet()
        c.cmd("MAIL FROM:<jürgen@corp.example> SMTPUTF8", 250)
        c.cmd("RCPT TO:<a@corp.example>", 250)
        c.cmd("DATA", 354)
        c.send("Message-ID: <jürgen.1@corp.example>\r\nSubject: x\r\n\r\ny\r\n.\r\n".encode())
        done = c.expect(250).text
        c.cmd("QUIT", 221)
    assert c.received.isascii(), c.received
    (msg,) = r.messages()
    assert msg.message_id == "<jürgen.1@corp.example>"
    assert done.startswith(f"250 2.6.0 <{msg.queue_id}@{FQDN}> [InternalId={msg.queue_id}, ")


# -- protocol log --------------------------------------------------------------------------------------
PASSWORD = "Pr0tocol-log-secret"


@pytest.fixture
def logged(relay, monkeypatch):
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    r = relay(
        [
            relay_connector(
                ["127.0.0.5"], name="Client, Submission", auth_mechanism=["Tls", "BasicAuth"],
                permission_groups=["AnonymousUsers", "ExchangeUsers"], permissions=[],
                protocol_logging_level="Verbose",
            ),
            relay_connector(["127.0.0.6"], name="Quiet", protocol_logging_level="None"),
        ]
    )  # fmt: skip
    auth.UserStore(r.data_dir / "users.json").set_password("logger", PASSWORD)
    return r


def test_protocol_log_parsed_back_as_csv(logged):
    r = logged
    plain_ok = base64.b64encode(b"\0logger\0" + PASSWORD.encode()).decode()
    plain_bad = base64.b64encode(b"\0logger\0wrong-password").decode()
    with r.raw("127.0.0.5") as c:
        client_port = c.sock.getsockname()[1]
        c.greet("EHLO client.corp.example")
        c.cmd("AUTH PLAIN " + plain_bad, 535)
        c.cmd("AUTH LOGIN", 334)
        c.cmd(base64.b64encode(b"logger").decode(), 334)
        c.cmd(base64.b64encode(PASSWORD.encode()).decode(), 235)
        c.cmd("MAIL FROM:<logger@corp.example>", 250)
        c.cmd("RCPT TO:<x@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: TOP-SECRET-SUBJECT\r\n\r\nTOP-SECRET-BODY, with comma\r\n.\r\n")
        c.expect(250)
        c.cmd("HELP", 214)
        c.cmd("QUIT", 221)
    with r.raw("127.0.0.6") as c:  # protocol_logging_level = None: not logged at all
        quiet_port = c.sock.getsockname()[1]
        c.greet()
        c.cmd("QUIT", 221)
    text = r.protocol_log_text()
    head = [line for line in text.splitlines() if line.startswith("#")]
    assert head[:3] == [
        "#Software: Microsoft Exchange Server",
        "#Version: 15.0.0.0",
        "#Log-type: SMTP Receive Protocol Log",
    ]
    assert re.fullmatch(r"#Date: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", head[3])
    assert head[4] == (
        "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context"
    )
    for secret in (
        "TOP-SECRET",
        PASSWORD,
        plain_ok,
        plain_bad,
        base64.b64encode(PASSWORD.encode()).decode(),
    ):
        assert secret not in text

    rows = list(
        csv.reader(io.StringIO("\n".join(x for x in text.splitlines() if not x.startswith("#"))))
    )
    assert all(len(row) == 9 for row in rows)
    assert not any(row[5].endswith(f":{quiet_port}") for row in rows)
    mine = [row for row in rows if row[5] == f"127.0.0.5:{client_port}"]
    for row in mine:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", row[0])
        assert row[1] == f"{SERVER_NAME}\\Client, Submission"
        assert row[4] == f"127.0.0.1:{r.port}"
        assert row[6] in {"+", "-", ">", "<", "*"}
    assert len({row[2] for row in mine}) == 1 and re.fullmatch(r"[0-9A-F]{16}", mine[0][2])
    assert [int(row[3]) for row in mine] == list(range(len(mine)))
    assert mine[0][6:] == ["+", "", ""]
    assert mine[-1][6:] == ["-", "", "Local"]
    events = [(row[6], row[7], row[8]) for row in mine]
    # Exchange's order (real 2010/2016 logs): "+" (0), the session's permissions (1), the banner (2).
    assert events[1] == (
        "*",
        "SMTPSubmit SMTPAcceptAnySender SMTPAcceptAuthoritativeDomainSender AcceptRoutingHeaders",
        "Set Session Permissions",
    )
    assert events[2][0] == ">" and events[2][1].startswith(
        f"220 {FQDN} Microsoft ESMTP MAIL Service ready at "
    )
    permissions = [e[1] for e in events if e[0] == "*" and e[2] == "Set Session Permissions"]
    assert len(permissions) == 2  # at connect (anonymous) and after AUTH (ExchangeUsers)
    assert "SMTPAcceptAnyRecipient" not in permissions[0].split()
    assert {"SMTPSubmit", "SMTPAcceptAnyRecipient"} <= set(permissions[1].split())
    assert ("<", "EHLO client.corp.example", "") in events
    ehlo = [e for e in events if e[0] == ">" and e[1].startswith("250  ")]
    assert len(ehlo) == 1  # the multi-line EHLO reply is one line
    assert ehlo[0][1].startswith(f"250  {FQDN} Hello [127.0.0.5] SIZE 37748736 PIPELINING")
    assert "AUTH PLAIN LOGIN" in ehlo[0][1]
    assert ("<", "AUTH PLAIN <authentication response>", "") in events
    assert ("*", "Inbound AUTH PLAIN failed because of LogonDenied", "") in events
    assert ("<", "AUTH LOGIN", "") in events
    assert sum(1 for e in events if e == ("<", "<authentication response>", "")) == 2
    assert ("<", "MAIL FROM:<logger@corp.example>", "") in events
    assert (">", "250 2.1.5 Recipient OK", "") in events
    assert (">", "354 Start mail input; end with <CRLF>.<CRLF>", "") in events
    receiving = [e for e in events if e[2] == "receiving message"]
    assert len(receiving) == 1
    assert re.fullmatch(
        rf"{mine[0][2]};\d{{4}}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{{3}}Z;1", receiving[0][1]
    )
    queued = [e for e in events if e[1].startswith("250 2.6.0")]
    assert len(queued) == 1 and "InternalId=" in queued[0][1]
    assert (">", "221 2.0.0 Service closing transmission channel", "") in events
    # Every reply is logged, the multi-line HELP as one line as the EHLO reply is.
    assert (
        ">",
        "214  This server supports the following commands: "
        "HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH",
        "",
    ) in events
    assert all(later[0] in (">", "*") for e, later in itertools.pairwise(events) if e[0] == "<")
