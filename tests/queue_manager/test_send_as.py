"""A send connector's ``send_as`` (relaygate.delivery.send_as): mail through it leaves as one
mailbox, as Microsoft 365 SMTP AUTH with one licensed mailbox requires. A relay in-process, two
aiosmtpd sinks on loopback as smart hosts, DKIM verified over what a sink received."""

from __future__ import annotations

import asyncio
from email.utils import getaddresses
from pathlib import Path

import pytest

import dkim
from relaygate.config import ConfigError, parse_text
from relaygate.delivery.send_as import rewrite_headers
from relaygate.dkim.keys import generate_key
from relaygate.logs.tracking import search
from tests.queue_manager.helpers import (
    ScriptedHandler,
    make_config_text,
    send,
    send_connector_text,
    start_relay,
    start_sink,
    wait_for,
)

MAILBOX = "relay@corp.test"
MESSAGE = (
    b"From: Scanner 3F <scanner@senders.test>\r\n"
    b"To: alice@m365.test, bob@example.com\r\n"
    b"Subject: Scan 42\r\n"
    b"Message-ID: <scan-42@senders.test>\r\n"
    b"\r\n"
    b"page 1\r\n"
)


def header(content: bytes, name: bytes) -> list[bytes]:
    head = content.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[1].strip()
        for line in head.split(b"\r\n")
        if line.lower().startswith(name.lower() + b":")
    ]


async def test_a_send_as_connector_sends_as_its_mailbox_and_signs_for_it(tmp_path: Path) -> None:
    keys = {}
    extra = ""
    for domain in ("corp.test", "senders.test"):
        pem, record = generate_key("rsa-sha256")
        (tmp_path / f"{domain}.key").write_bytes(pem)
        keys[f"s1._domainkey.{domain}.".encode()] = record.encode()
        extra += f'\n[[dkim]]\ndomain = "{domain}"\nselector = "s1"\n'
        extra += f'key_file = "{tmp_path / (domain + ".key")}"\n'
    internet, m365 = ScriptedHandler(), ScriptedHandler()
    a, b = await start_sink(internet), await start_sink(m365)
    extra = send_connector_text("To M365", "m365.test", b.port, f'send_as = "{MAILBOX}"') + extra
    relay = await start_relay(tmp_path / "data", {"*": a.port}, extra=extra)
    try:
        code, _ = await send(
            relay, "scanner@senders.test", ["alice@m365.test", "bob@example.com"], MESSAGE
        )
        assert code == 250
        await wait_for(lambda: internet.messages and m365.messages)

        def dns(name: bytes, timeout: int = 5) -> bytes:
            return keys[name]

        # Through the send_as connector: the mailbox in MAIL FROM and From, the writer kept.
        assert m365.mail_froms == [MAILBOX]
        sent = m365.messages[0]["content"]
        assert header(sent, b"From") == [b'"Scanner 3F" <relay@corp.test>']
        assert header(sent, b"Reply-To") == [b"Scanner 3F <scanner@senders.test>"]
        assert header(sent, b"Subject") == [b"Scan 42"]
        assert sent.endswith(b"\r\n\r\npage 1\r\n")
        assert b"d=corp.test" in sent.split(b"\r\n\r\n", 1)[0]  # signed for the new From
        assert dkim.verify(sent, dnsfunc=dns)

        # The other route is untouched: the writer's envelope, From and signature.
        assert internet.mail_froms == ["scanner@senders.test"]
        other = internet.messages[0]["content"]
        assert header(other, b"From") == [b"Scanner 3F <scanner@senders.test>"]
        assert header(other, b"Reply-To") == []
        assert b"d=senders.test" in other.split(b"\r\n\r\n", 1)[0]
        assert dkim.verify(other, dnsfunc=dns)

        # The queue and the tracking log keep the original sender.
        assert relay.tracking is not None
        await asyncio.to_thread(relay.tracking.flush)
        sends = search(relay.tracking.path, event_id="SEND")
        assert {e["sender-address"] for e in sends} == {"scanner@senders.test"}

        # A report (null sender) through it leaves as the mailbox too: such a host takes no other.
        code, _ = await send(relay, "", ["alice@m365.test"], b"Subject: report\r\n\r\nx\r\n")
        assert code == 250
        await wait_for(lambda: len(m365.messages) == 2)
        assert m365.mail_froms[1] == MAILBOX
    finally:
        await relay.stop()
        await a.close()
        await b.close()


def test_check_refuses_a_send_as_that_is_not_an_address(tmp_path: Path) -> None:
    for bad in ("relay", "relay@", "<relay@corp.test>", "two words@corp.test"):
        text = make_config_text(
            tmp_path, smtp_port=2600, admin_port=2601, routes={"*": 2602}
        ) + send_connector_text("To M365", "m365.test", 2603, f'send_as = "{bad}"')
        with pytest.raises(ConfigError) as info:
            parse_text(text, "<test>")
        assert f'send_connectors[1] "To M365": send_as: {bad!r} is not a mail address' in str(
            info.value
        )


def test_a_refused_send_as_says_why() -> None:
    # It said "is not a mail address (name@domain)" for an address of that very form.
    for bad, why in (
        ("rélay@corp.test", "non-ASCII"),
        ("relay@10.0.0.1", "address literal"),
        ("relay@corp..test", "label"),
    ):
        text = make_config_text(
            Path("/nonexistent"), smtp_port=2600, admin_port=2601, routes={"*": 2602}
        ) + send_connector_text("To M365", "m365.test", 2603, f'send_as = "{bad}"')
        with pytest.raises(ConfigError) as info:
            parse_text(text, "<test>")
        [line] = [x for x in str(info.value).splitlines() if "send_as" in x]
        assert f"{bad!r} is not a mail address (name@domain): " in line, line
        assert why in line, line


@pytest.mark.parametrize(
    ("head", "from_", "reply_to"),
    [
        (
            b"From: scan@corp.example\r\n",
            b'"scan@corp.example" <relay@corp.test>',
            b"scan@corp.example",
        ),
        (
            b"From: =?utf-8?q?Sc=C3=A4nner?= <scan@corp.example>\r\n",
            b"=?utf-8?q?Sc=C3=A4nner?= <relay@corp.test>",
            b"=?utf-8?q?Sc=C3=A4nner?= <scan@corp.example>",
        ),
        (
            b'From: "Evil\\" <x@y>" <scan@corp.example>\r\n',
            b'"Evil <x@y>" <relay@corp.test>',
            b'"Evil\\" <x@y>" <scan@corp.example>',
        ),
    ],
)
def test_rewrite_keeps_the_writer_as_display_name_and_reply_to(
    head: bytes, from_: bytes, reply_to: bytes
) -> None:
    out = rewrite_headers(head + b"Subject: s\r\n\r\nbody\r\n", MAILBOX)
    assert header(out, b"From") == [from_]
    assert header(out, b"Reply-To") == [reply_to]
    assert out.endswith(b"\r\n\r\nbody\r\n")


def test_rewrite_keeps_an_existing_reply_to_and_replaces_sender() -> None:
    message = (
        b"From: A <a@corp.example>\r\nSender: b@corp.example\r\nReply-To: help@corp.example\r\n"
        b"\r\nbody\r\n"
    )
    out = rewrite_headers(message, MAILBOX)
    assert header(out, b"Sender") == [b"<relay@corp.test>"]
    assert header(out, b"Reply-To") == [b"help@corp.example"]


def test_a_from_without_an_address_or_no_from_at_all_becomes_the_mailbox() -> None:
    """Left as written, the host refused them (554 5.2.252 SendAsDenied, or no From at all)."""
    cases = {
        b"Subject: none\r\n\r\nbody\r\n": b"Subject: none\r\nFrom: <relay@corp.test>\r\n",
        b"From: nobody\r\n\r\nbody\r\n": b"From: <relay@corp.test>\r\n",
        b"From: undisclosed-recipients:;\r\nSubject: s\r\n\r\nbody\r\n": (
            b"From: <relay@corp.test>\r\nSubject: s\r\n"
        ),
    }
    for message, head in cases.items():
        assert rewrite_headers(message, MAILBOX) == head + b"\r\nbody\r\n"


def test_a_second_from_field_is_dropped() -> None:
    message = b"From: A <a@corp.example>\r\nFrom: B <b@corp.example>\r\n\r\nbody\r\n"
    out = rewrite_headers(message, MAILBOX)
    assert header(out, b"From") == [b'"A" <relay@corp.test>']
    assert header(out, b"Reply-To") == [b"A <a@corp.example>"]


def from_mailboxes(content: bytes) -> list[tuple[str, str]]:
    """The From field's mailboxes as a mail reader parses them (unfolded)."""
    (value,) = header(content.replace(b"\r\n ", b" ").replace(b"\r\n\t", b"\t"), b"From")
    return getaddresses([value.decode("utf-8", "replace")])


@pytest.mark.parametrize(
    "display",
    [
        b'"=?x?q?<evil@attacker.example>,?="',  # specials inside what looks like an encoded-word
        b'"=?utf-8?q?a?= , <evil@attacker.example>"',
        b'"=?utf-8?b?YQ==?=;evil@attacker.example"',
        b'"=?utf-8?q?a:b?="',
    ],
)
def test_a_display_name_never_becomes_another_mailbox_in_the_new_from(display: bytes) -> None:
    # A quoted display name that only looks like encoded-words was written unquoted, and its
    # comma, angle brackets or semicolon made the From read as two mailboxes (one of the
    # writer's choosing).
    out = rewrite_headers(b"From: " + display + b" <scan@corp.example>\r\n\r\nbody\r\n", MAILBOX)
    mailboxes = from_mailboxes(out)
    assert len(mailboxes) == 1
    assert mailboxes[0][1] == MAILBOX


def test_a_long_display_name_is_folded_into_lines_of_at_most_998_octets() -> None:
    # Folded over several lines in the original, one line of 1,600 octets once unfolded.
    words = [b"Scanner%03d" % i for i in range(150)]
    name = b"\r\n ".join(b" ".join(words[i : i + 10]) for i in range(0, 150, 10))
    one_word = b'"' + b"x" * 990 + b"\r\n " + b"y" * 500 + b'"'  # no space to fold at
    for display in (name, one_word):
        head = b"From: " + display + b" <scan@corp.example>\r\n"
        out = rewrite_headers(head + b"Subject: s\r\n\r\nbody\r\n", MAILBOX)
        assert max(len(line) for line in out.split(b"\r\n")) <= 998
        assert from_mailboxes(out)[0][1] == MAILBOX
    out = rewrite_headers(b"From: " + name + b" <scan@corp.example>\r\n\r\nbody\r\n", MAILBOX)
    assert from_mailboxes(out) == [(" ".join(w.decode() for w in words), MAILBOX)]
    # A From line of 998 octets: its Reply-To ("Reply-To: " is longer than "From: ") fits too.
    local = b"s" * 60
    address = b" <" + local + b"@corp.example>"
    long_from = b"From: " + b"n" * (998 - 6 - len(address)) + address
    assert len(long_from) == 998
    out = rewrite_headers(long_from + b"\r\n\r\nbody\r\n", MAILBOX)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998


async def test_a_long_display_name_still_verifies_after_the_rewrite(tmp_path: Path) -> None:
    # The rewritten From was one line over 998 octets: signed as it was, then folded by the
    # delivery client (wire.prepare_data), and the signature over From failed (DMARC fails).
    pem, record = generate_key("rsa-sha256")
    (tmp_path / "corp.key").write_bytes(pem)
    extra = (
        f'\n[[dkim]]\ndomain = "corp.test"\nselector = "s1"\nkey_file = "{tmp_path / "corp.key"}"\n'
    )
    m365 = ScriptedHandler()
    b = await start_sink(m365)
    extra = send_connector_text("To M365", "m365.test", b.port, f'send_as = "{MAILBOX}"') + extra
    relay = await start_relay(tmp_path / "data", {"*": b.port}, extra=extra)
    words = " ".join(f"Scanner{i:03d}" for i in range(150)).encode()
    name = b"\r\n ".join(words[i : i + 100] for i in range(0, len(words), 100))
    message = b"From: " + name + b" <scanner@senders.test>\r\nSubject: long\r\n\r\npage 1\r\n"
    try:
        code, _ = await send(relay, "scanner@senders.test", ["alice@m365.test"], message)
        assert code == 250
        await wait_for(lambda: m365.messages)
        sent = m365.messages[0]["content"]
        assert from_mailboxes(sent)[0][1] == MAILBOX
        assert dkim.verify(sent, dnsfunc=lambda name, timeout=5: record.encode())
    finally:
        await relay.stop()
        await b.close()


def test_an_unreadable_sender_does_not_keep_the_from_as_written() -> None:
    # "Sender: scanner" (no domain, as some devices write it) left the whole header as written:
    # the writer's From went to a host that refuses it (554 5.2.252 SendAsDenied).
    for sender in (b"scanner", b"undisclosed-recipients:;", b""):
        message = b"From: Scan <scan@corp.example>\r\nSender: " + sender + b"\r\n\r\nbody\r\n"
        out = rewrite_headers(message, MAILBOX)
        assert header(out, b"From") == [b'"Scan" <relay@corp.test>'], sender
        assert header(out, b"Sender") == [b"<relay@corp.test>"], sender
        assert header(out, b"Reply-To") == [b"Scan <scan@corp.example>"], sender
