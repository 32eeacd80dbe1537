"""The pure parts: Exchange's retry timeline and the RFC 3464 report builder."""

from __future__ import annotations

from datetime import timedelta

import pytest

from relaygate import replies
from relaygate.config import QueueConfig
from relaygate.control import normalise_id
from relaygate.queue.bounce import DsnRecipient, build_dsn, header_block, status_of
from relaygate.queue.retry import RetrySchedule
from relaygate.replies import Reply
from tests.queue_manager.helpers import parse_mail, report_part


def test_exchange_defaults_timeline() -> None:
    s = RetrySchedule.from_config(QueueConfig())
    assert (s.transient_interval, s.transient_count, s.message_interval) == (300, 6, 600)
    assert s.delay_notification == 4 * 3600 and s.expiration == 2 * 86400
    # six transient retries five minutes apart, then every message_retry_interval
    assert [s.interval_after(n) for n in range(1, 9)] == [300] * 6 + [600] * 2


def test_next_attempt_never_after_expiry_or_owed_delay_notice() -> None:
    s = RetrySchedule(10, 1, 100, delay_notification=50, expiration=120)
    t0 = 1000.0
    assert s.next_attempt(1, t0 + 5, t0) == t0 + 15
    # the delay notice falls due at t0+50: the attempt is pulled in to send it on time
    assert s.next_attempt(2, t0 + 15, t0, delay_notified=False) == t0 + 50
    assert s.next_attempt(2, t0 + 15, t0, delay_notified=True) == t0 + 115
    # never past the expiry
    assert s.next_attempt(5, t0 + 60, t0) == t0 + 120
    assert s.is_expired(t0, t0 + 120) and not s.is_expired(t0, t0 + 119)
    assert s.delay_notice_due(t0, t0 + 50, False)
    assert not s.delay_notice_due(t0, t0 + 50, True)
    assert not s.delay_notice_due(t0, t0 + 49, False)
    # a delay timeout at/after the expiry never sends a notice
    late = RetrySchedule(10, 1, 100, delay_notification=200, expiration=120)
    assert not late.delay_notice_due(t0, t0 + 119, False)


def test_schedule_from_shortened_config() -> None:
    q = QueueConfig(
        transient_failure_retry_interval=timedelta(seconds=1),
        transient_failure_retry_count=2,
        message_retry_interval=timedelta(seconds=2),
    )
    s = RetrySchedule.from_config(q)
    assert [s.interval_after(n) for n in (1, 2, 3)] == [1, 1, 2]


ORIGINAL = (
    b"Received: from printer ([10.0.0.5])\r\n\tby relay.test\r\n"
    b"From: Scanner <scanner@corp.test>\r\nTo: bob@example.com\r\n"
    b"Subject: Scan\r\n from floor 2\r\nMessage-ID: <scan-1@corp.test>\r\n\r\n"
    b"secret body\r\n"
)

USER_UNKNOWN = Reply(550, "5.1.1", "User unknown")


def failed_report(
    original: bytes = ORIGINAL,
    *recipients: DsnRecipient,
    to: str = "scanner@corp.test",
    envelope_id: str = "",
) -> bytes:
    """The relay.test failure report to `to` of `original` (received at 0) for `recipients`:
    bob@example.com, 550 5.1.1 User unknown, unless given."""
    return build_dsn(
        action="failed",
        reporting_mta="relay.test",
        to=to,
        original=original,
        recipients=list(recipients) or [DsnRecipient("bob@example.com", USER_UNKNOWN)],
        received_at=0.0,
        envelope_id=envelope_id,
    )


def test_ndr_is_an_rfc3464_report() -> None:
    body = build_dsn(
        action="failed",
        reporting_mta="relay.test",
        to="scanner@corp.test",
        original=ORIGINAL,
        recipients=[
            DsnRecipient(
                "bob@example.com", Reply(550, "5.1.1", "User unknown"), "mx.example.com", 1.0e9
            )
        ],
        received_at=1.0e9 - 60,
        queue_id="0123456789ABCDEF",
        now=1.0e9,
    )
    assert b"\n" not in body.replace(b"\r\n", b"")
    msg = parse_mail(body)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <postmaster@relay.test>"
    assert msg["To"].addresses[0].addr_spec == "scanner@corp.test"
    assert msg["Subject"] == "Undeliverable: Scan from floor 2"
    assert msg["In-Reply-To"] == "<scan-1@corp.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    text, status, headers = msg.get_payload()
    human = text.get_content()
    assert "Delivery has failed to these recipients or groups:" in human
    assert "Diagnostic information for administrators:" in human
    assert "Generating server: relay.test" in human
    assert "returned '550 5.1.1 User unknown'" in human
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; relay.test"
    assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.com"
    assert per_rcpt["Action"] == "failed"
    assert per_rcpt["Status"] == "5.1.1"
    assert per_rcpt["Remote-MTA"] == "dns; mx.example.com"
    assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
    assert headers.get_content_type() == "text/rfc822-headers"
    original_headers = headers.get_payload(decode=True)
    assert original_headers == header_block(ORIGINAL)
    assert b"secret body" not in body


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("Grüße aus Köln".encode(), "Undeliverable: Grüße aus Köln"),
        (b"Rechnung f\xfcr M\xe4rz", "Undeliverable: Rechnung f\ufffdr M\ufffdrz"),
        (b"=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Undeliverable: Grüße"),
    ],
    ids=["utf-8", "latin-1", "encoded-word"],
)
def test_ndr_subject_stays_7_bit_whatever_the_original(raw: bytes, shown: str) -> None:
    """The report's own header is 7-bit (before, an 8-bit original Subject was copied into it, and
    the report went out without SMTPUTF8): a non-ASCII Subject is RFC 2047-encoded."""
    original = b"From: a@corp.test\r\nSubject: " + raw + b"\r\n\r\nbody\r\n"
    out = failed_report(original, to="a@corp.test")
    head = out[: out.index(b"\r\n\r\n")]
    assert head.isascii()
    assert parse_mail(out)["Subject"] == shown


def test_delay_notice_and_status_codes() -> None:
    body = build_dsn(
        action="delayed",
        reporting_mta="relay.test",
        to="scanner@corp.test",
        original=ORIGINAL,
        recipients=[DsnRecipient("bob@example.com", Reply(451, "4.4.0", "try later"))],
        received_at=1000.0,
        will_retry_until=1000.0 + 2 * 86400,
        now=1000.0 + 4 * 3600,
    )
    msg = parse_mail(body)
    assert msg["Subject"].startswith("Delivery delayed: ")
    human = msg.get_payload()[0].get_content()
    assert "Delivery is delayed to these recipients or groups:" in human
    assert "1 day, 20 hours" in human
    rcpt = msg.get_payload()[1].get_payload()[1]
    assert rcpt["Action"] == "delayed" and rcpt["Status"] == "4.4.0"
    assert rcpt["Will-Retry-Until"]
    assert status_of(replies.QUEUE_EXPIRED) == "4.4.7"
    assert status_of(Reply(554, "", "no")) == "5.0.0"
    with pytest.raises(ValueError):
        build_dsn(
            action="relayed", reporting_mta="r", to="a@b", original=b"", recipients=[],
            received_at=0,
        )  # fmt: skip


def test_identities() -> None:
    assert normalise_id("RELAY01\\0123456789abcdef") == "0123456789ABCDEF"
    assert normalise_id("RELAY01\\Retry\\0123456789ABCDEF") == "0123456789ABCDEF"
    with pytest.raises(LookupError):
        normalise_id("RELAY01\\42")


def test_a_utf8_recipient_is_of_type_utf8_in_a_global_delivery_status() -> None:
    """RFC 6533 §3: in message/global-delivery-status a UTF-8 address is `utf-8; ...`; it was
    `rfc822;`, a type whose addresses are ASCII. An ASCII one stays rfc822."""
    body = failed_report(
        ORIGINAL,
        DsnRecipient("jörg@example.com", USER_UNKNOWN),
        DsnRecipient("bob@example.com", USER_UNKNOWN),
    )
    assert b"Content-Type: message/global-delivery-status" in body
    status = report_part(body, 1)
    assert "Final-Recipient: utf-8; jörg@example.com\r\n".encode() in status
    assert b"Final-Recipient: rfc822; bob@example.com\r\n" in status


def test_a_utf8_message_id_is_not_copied_into_the_reports_own_header() -> None:
    """In-Reply-To and References carried the original's Message-ID as it was: a UTF-8 one
    (an SMTPUTF8 client's, or undeclared 8-bit) made the report's own header UTF-8, so the
    report needed SMTPUTF8 and never reached an ASCII sender whose next hop lacks it, for the
    sake of two optional fields. An ASCII Message-ID is still referenced."""
    utf8 = ORIGINAL.replace(b"<scan-1@corp.test>", "<bericht-märz@corp.test>".encode())
    out = failed_report(utf8)
    head = out[: out.index(b"\r\n\r\n")]
    assert head.isascii(), head
    assert b"In-Reply-To" not in head and b"References" not in head
    ascii_out = failed_report()
    assert b"\r\nIn-Reply-To: <scan-1@corp.test>\r\nReferences: <scan-1@corp.test>\r\n" in ascii_out


def test_orcpt_and_envid_come_back_decoded_and_cannot_add_fields() -> None:
    """ORCPT and ENVID are xtext: given back decoded (RFC 3464 Original-Recipient,
    Original-Envelope-Id), a UTF-8 one (RFC 6533 utf-8-addr-xtext) in a global delivery status,
    and an encoded CR LF cannot start a field of its own in the report."""
    body = failed_report(
        ORIGINAL,
        DsnRecipient(
            "joerg@example.com",
            USER_UNKNOWN,
            original_recipient="utf-8;j\\x{F6}rg@example.com",
        ),
        DsnRecipient(
            "bob@example.com",
            USER_UNKNOWN,
            original_recipient="rfc822;bob@example.com+0D+0AAction:+20delivered",
        ),
        envelope_id="QQ+2B1+0D+0AStatus:+202.0.0",
    )
    assert b"Content-Type: message/global-delivery-status" in body
    status = report_part(body, 1)
    assert "Original-Recipient: utf-8; jörg@example.com\r\n".encode() in status
    # an rfc822 address is ASCII: its encoded CR LF stays encoded (it was dropped)
    assert b"Original-Recipient: rfc822; bob@example.com+0D+0AAction: delivered\r\n" in status
    assert b"Original-Envelope-Id: QQ+1Status: 2.0.0\r\n" in status
    assert b"\r\nAction: delivered" not in status and b"\r\nStatus: 2.0.0" not in status


@pytest.mark.parametrize(
    ("reply", "says", "not_said"),
    [
        (replies.ROUTE_SIZE_LIMIT, "too large", "no route or mail server"),
        (replies.MESSAGE_TOO_BIG, "too large", "rejected it"),
        (replies.LOOP_DETECTED, "configuration", "no route or mail server"),
        (replies.NO_NEXT_HOP, "no route or mail server", "too large"),
        # RFC 7505: the domain says it takes no mail at all; not a route the relay failed to find
        (replies.NULL_MX, "doesn't accept email", "no route or mail server"),
    ],
    ids=["route-size-limit", "hop-size-limit", "loop", "no-route", "null-mx"],
)
def test_the_senders_text_says_what_went_wrong(reply: Reply, says: str, not_said: str) -> None:
    """Every ROUTING.* reply told the sender "no route or mail server was found for the
    recipient's domain": a message too big for every route (5.3.4 ROUTING.SizeLimit) or one the
    relay would send back to itself (ROUTING.Loop) sent its sender looking at the address, not
    at the attachment or the relay's configuration."""
    body = failed_report(ORIGINAL, DsnRecipient("bob@example.com", reply))
    human = parse_mail(body).get_payload()[0].get_content()
    user_part = human.split("Diagnostic information for administrators:")[0]
    assert says in user_part and not_said not in user_part, user_part


def test_utf8_original_headers_come_back_as_message_global_headers() -> None:
    """RFC 6533 §3: the header of an internationalized message (UTF-8 in its fields) is returned
    as message/global-headers; text/rfc822-headers holds ASCII header text. An ASCII header
    stays text/rfc822-headers."""
    utf8 = b"From: j\xc3\xb6rg@corp.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe\r\n\r\nbody\r\n"
    for original, kind in ((utf8, "message/global-headers"), (ORIGINAL, "text/rfc822-headers")):
        body = failed_report(original)
        returned = parse_mail(body).get_payload()[2]
        assert returned.get_content_type() == kind


def test_a_report_on_an_internationalized_message_is_7_bit() -> None:
    """The returned UTF-8 header (message/global-headers) and a UTF-8 recipient's status
    (message/global-delivery-status) were 8bit: the report to an ASCII sender needed 8BITMIME on
    its way, and a report is never reported on when it fails. RFC 6533 §6.2-6.3 allow
    quoted-printable for both: the report is now 7-bit, and decoding gives back the exact octets."""
    header = b"From: j\xc3\xb6rg@corp.test\r\nSubject: Gr\xc3\xbc\xc3\x9fe " + b"x" * 120 + b"\r\n"
    body = failed_report(
        header + b"\r\nbody \xc3\xa4\r\n", DsnRecipient("jörg@example.com", USER_UNKNOWN)
    )
    assert body.isascii()
    assert max(map(len, body.split(b"\r\n"))) <= 998
    assert report_part(body, 2) == header
    assert "Final-Recipient: utf-8; jörg@example.com\r\n".encode() in report_part(body, 1)


def test_a_remote_servers_8_bit_text_leaves_the_report_7_bit() -> None:
    """Every field that carries what a remote server said (Diagnostic-Code, X-Last-Error, the
    text part) was copied as UTF-8: the report needed 8BITMIME to reach the sender. Non-ASCII is
    now ``\\x{HHHH}`` in the status fields and quoted-printable UTF-8 in the text part."""
    body = build_dsn(
        action="delayed",
        reporting_mta="relay.test",
        to="scanner@corp.test",
        original=ORIGINAL,
        recipients=[
            DsnRecipient(
                "bob@example.com",
                Reply(451, "4.4.0", "Primary target IP address responded with: Zeitüberschreitung"),
                "mx.example.com",
                last_error="421 4.3.2 Überlastet",
            )
        ],
        received_at=0.0,
        will_retry_until=86400.0,
        now=3600.0,
    )
    assert body.isascii()
    text, status, _headers = parse_mail(body).get_payload()
    assert text["Content-Transfer-Encoding"] == "quoted-printable"
    assert "Zeitüberschreitung'" in text.get_content()
    assert "Last error: '421 4.3.2 Überlastet'" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    rcpt = status.get_payload()[1]
    assert rcpt["Diagnostic-Code"].endswith("responded with: Zeit\\x{FC}berschreitung")
    assert rcpt["X-Last-Error"] == "421 4.3.2 \\x{DC}berlastet"


def test_an_undeclared_8_bit_original_header_comes_back_as_utf_8() -> None:
    """A header with Latin-1 octets (a device that writes its Subject in its own charset) was
    returned as it was in message/global-headers, whose content is UTF-8 (RFC 6533 §3), and in the
    text part, declared charset=utf-8: a reader decoding them as declared failed or showed junk.
    Octets that are not UTF-8 come back as U+FFFD, as the report's Subject has them; UTF-8 stays."""
    latin1 = b"From: scanner@corp.test\r\nSubject: Gr\xfc\xdfe aus K\xf6ln\r\n\r\nbody\r\n"
    body = failed_report(latin1)
    for index in (0, 2):
        text = report_part(body, index).decode("utf-8")  # strict: every part is UTF-8
        assert "Subject: Gr\ufffd\ufffde aus K\ufffdln\r\n" in text
    assert (
        "Subject: Grüße"
        in report_part(failed_report(latin1.replace(b"\xfc\xdf", "üß".encode())), 2).decode()
    )


def test_a_long_utf8_header_line_without_spaces_is_cut_between_characters() -> None:
    """A header line over 998 octets with nowhere to fold is cut short at a character boundary:
    the returned header (message/global-headers) stays UTF-8, every line within 998 octets."""
    line = b"X-Note: " + "é".encode() * 800  # 1 608 octets: no space but the one after the name
    body = failed_report(ORIGINAL.replace(b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n", 1))
    returned = report_part(body, 2)
    lines = returned.split(b"\r\n")
    assert max(map(len, lines)) <= 998
    # folded after "X-Note:", its continuation (" " and 498 of them) cut before a split "é"
    assert returned.decode("utf-8").replace("\r\n ", " ").count("é") == 498
    assert (
        "1 line of the original header was longer"
        in parse_mail(body).get_payload()[0].get_content()
    )
