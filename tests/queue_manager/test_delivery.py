"""The queue manager end to end: a relay in-process, smart hosts that are aiosmtpd sinks on loopback.

Routes: ``*`` (or ``example.com``...) → sink A (the "internet"); ``senders.test`` → sink B, where the
senders' (and the admin's) mailboxes live, so NDRs and delay notices arrive there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relaygate import replies
from relaygate.app import Relay
from relaygate.control import QueueControl
from relaygate.logs.tracking import MESSAGE_TRACKING_DIR, search
from relaygate.queue.model import Envelope, RecipientStatus, StoredMessage
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    parse_mail,
    report_part,
    send,
    send_connector_text,
    split_received,
    start_relay,
    start_sink,
    wait_for,
)

SENDER = "scanner@senders.test"
ADMIN = "it@senders.test"


def dkim_table(domain: str, selector: str, key_file: Path | str) -> str:
    """A [[dkim]] entry of the config: `domain` signed with `key_file` under `selector`."""
    return f'\n[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{key_file}"\n'


def two_signing_keys(keys: Path) -> tuple[list[tuple[str, str, Path]], str]:
    """Keys written under `keys` for senders.test (selector s1) and other.test (o1): each one's
    (domain, selector, key file), and their [[dkim]] entries."""
    from relaygate.dkim.keys import write_key

    signing = [
        ("senders.test", "s1", write_key(keys, "senders.test", "s1")),
        ("other.test", "o1", write_key(keys, "other.test", "o1")),
    ]
    return signing, "".join(dkim_table(*entry) for entry in signing)


def original(subject: str = "Invoice 42", extra: bytes = b"") -> bytes:
    return (
        b"From: Scanner <scanner@senders.test>\r\n"
        b"To: Bob <bob@example.com>\r\n"
        b"Subject: " + subject.encode() + b"\r\n"
        b"Message-ID: <" + subject.replace(" ", "-").encode() + b"@senders.test>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"\r\n"
        b"Line one\r\n"
        b".leading dot line\r\n"
        b"\r\n"
        b"Caf\xc3\xa9 \xe2\x82\xac 8-bit body\r\n" + extra
    )


@contextlib.asynccontextmanager
async def sinks(*handlers: ScriptedHandler) -> AsyncIterator[list[Sink]]:
    started = [await start_sink(h) for h in handlers]
    try:
        yield started
    finally:
        for s in started:
            await s.close()


@contextlib.asynccontextmanager
async def relay_running(tmp_path: Path, routes: dict[str, int], **kw: Any) -> AsyncIterator[Relay]:
    relay = await start_relay(tmp_path / "data", routes, **kw)
    try:
        yield relay
    finally:
        await relay.stop()


def tracking(relay: Relay, event: str) -> list[dict[str, Any]]:
    if relay.tracking is not None:
        relay.tracking.flush()
    return search(Path(relay.config.server.data_dir) / MESSAGE_TRACKING_DIR, event_id=event)


def reports(sink: Sink) -> list[dict[str, Any]]:
    return [m for m in sink.handler.messages if m["mail_from"] == "<>"]


async def test_delivered_byte_for_byte_once_and_tracked(tmp_path: Path) -> None:
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        data = original()
        code, _ = await send(relay, SENDER, ["bob@example.com", "carol@example.com"], data)
        assert code == 250
        await wait_for(lambda: a.handler.messages)
        got = a.handler.messages[0]
        assert got["mail_from"] == SENDER
        assert got["rcpt_tos"] == ["bob@example.com", "carol@example.com"]
        received, rest = split_received(got["content"])
        assert rest == data  # only the Received header was added
        assert b"by relay.test" in received

        async def recorded() -> bool:  # the sink's 250 comes before the result is stored
            (m,) = await relay.store.list_messages()
            return all(r.status.is_final for r in m.recipients)

        await wait_for(recorded)
        (msg,) = await relay.store.list_messages()
        assert [r.status for r in msg.recipients] == [RecipientStatus.DELIVERED] * 2
        assert msg.recipients[0].last_error.startswith("250 ")
        sent = await wait_for(lambda: tracking(relay, "SEND"))
        assert sent[0]["recipient-address"] == ["bob@example.com", "carol@example.com"]
        assert sent[0]["recipient-status"][0].startswith("250 2.6.0")
        assert sent[0]["connector-id"] == "To *"
        assert sent[0]["internal-message-id"] == msg.queue_id
        assert sent[0]["server-ip"] == "127.0.0.1"
        await asyncio.sleep(0.6)  # several scans later: never sent twice
        assert len(a.handler.messages) == 1


async def test_4xx_retried_on_the_schedule_then_delivered(tmp_path: Path) -> None:
    def policy(address: str, attempt: int) -> str | None:
        return "451 4.3.2 Mailbox busy, try later" if attempt <= 2 else None

    async with (
        sinks(ScriptedHandler(policy)) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original())
        await wait_for(lambda: a.handler.messages, timeout=10)
        times = a.handler.attempts["bob@example.com"]
        assert len(times) == 3
        # transient_failure_retry_interval = 1 s between attempts
        assert all(0.8 <= later - earlier <= 2.0 for earlier, later in itertools.pairwise(times))

        async def delivered() -> Any:
            (msg,) = await relay.store.list_messages()
            return msg.recipients[0].status == RecipientStatus.DELIVERED and msg.recipients[0]

        rcpt = await wait_for(delivered)
        assert rcpt.attempts == 3
        defers = tracking(relay, "DEFER")
        assert len(defers) == 2
        # every RCPT refused transiently = the hop failed: Exchange's failover wording
        (status,) = defers[0]["recipient-status"]
        assert status.startswith("451 4.4.0 Primary target IP address responded with:")
        assert "451 4.3.2 Mailbox busy, try later" in status
        assert not reports(a)


async def test_5xx_fails_with_an_ndr_to_the_sender_and_a_copy_to_the_admin(
    tmp_path: Path,
) -> None:
    def policy(address: str, attempt: int) -> str | None:
        return "550 5.1.1 User unknown" if address.startswith("bob@") else None

    async with (
        sinks(ScriptedHandler(policy), ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={"admin_notification_address": ADMIN},
        ) as relay,
    ):
        data = original("Scan 7")
        await send(relay, SENDER, ["bob@example.com", "carol@example.com"], data)
        await wait_for(lambda: b.handler.messages)
        assert a.handler.messages[0]["rcpt_tos"] == ["carol@example.com"]
        (ndr,) = b.handler.messages
        assert ndr["mail_from"] == "<>"  # never an NDR about an NDR
        assert ndr["rcpt_tos"] == [SENDER, ADMIN]
        report = parse_mail(ndr["content"])
        assert report.get_content_type() == "multipart/report"
        assert report["Subject"] == "Undeliverable: Scan 7"
        # the (first, as none is the default) accepted domain's postmaster, as Exchange's
        assert report["From"].addresses[0].addr_spec == "postmaster@corp.test"
        text, status, headers = report.get_payload()
        assert "Delivery has failed to these recipients or groups:" in text.get_content()
        assert "bob@example.com" in text.get_content()
        assert "carol@example.com" not in text.get_content()
        per_message, per_rcpt = status.get_payload()
        assert per_message["Reporting-MTA"] == "dns; relay.test"
        assert per_rcpt["Final-Recipient"] == "rfc822; bob@example.com"
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "5.1.1"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.1.1 User unknown"
        original_headers = headers.get_payload(decode=True)
        assert b"Subject: Scan 7\r\n" in original_headers
        assert b"Message-ID: <Scan-7@senders.test>" in original_headers
        assert b"8-bit body" not in ndr["content"]

        msgs = {m.queue_id: m for m in await relay.store.list_messages()}
        first = next(m for m in msgs.values() if m.sender == SENDER)
        status_by = {r.address: r.status for r in first.recipients}
        assert status_by == {
            "bob@example.com": RecipientStatus.FAILED,
            "carol@example.com": RecipientStatus.DELIVERED,
        }
        dsn = next(m for m in msgs.values() if m.sender == "")
        assert dsn.metadata["original_queue_id"] == first.queue_id
        await wait_for(lambda: tracking(relay, "DSN") and tracking(relay, "FAIL"))
        (fail,) = tracking(relay, "FAIL")
        assert fail["recipient-address"] == ["bob@example.com"]
        (dsn_event,) = tracking(relay, "DSN")
        assert dsn_event["reference"] == ["<Scan-7@senders.test>"]
        assert dsn_event["internal-message-id"] == dsn.queue_id


class EightBitRefusal(ScriptedHandler):
    """Refuses every recipient with a 550 whose text is 8-bit: UTF-8 or Latin-1 octets, as sent."""

    def __init__(self, text: bytes) -> None:
        super().__init__()
        self.text = text

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        self.rcpts.append(address)
        return b"550 5.1.1 " + self.text  # aiosmtpd writes bytes as they are


class Without8BitMime(ScriptedHandler):
    """A sink that does not offer 8BITMIME (RFC 6152): 8-bit content must not be sent to it."""

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        responses = await super().handle_EHLO(server, session, envelope, hostname, responses)
        return [r for r in responses if r != "250-8BITMIME"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "Empfänger unbekannt: Postfach gelöscht".encode(),
            "Empfänger unbekannt: Postfach gelöscht",
        ),
        (b"Empf\xe4nger unbekannt", "Empf\ufffdnger unbekannt"),
    ],
    ids=["utf-8", "latin-1"],
)
async def test_an_ndr_with_8_bit_remote_text_is_7_bit_and_reaches_a_hop_without_8bitmime(
    tmp_path: Path, text: bytes, shown: str
) -> None:
    """A remote reply with non-ASCII text was copied as 8-bit into the NDR's text part and its
    Diagnostic-Code: the report was then 8-bit, and a route back to the sender without 8BITMIME
    refused it (5.6.3), so the sender never learnt that the message was lost. Now the text part is
    quoted-printable UTF-8 and the Diagnostic-Code escapes non-ASCII as RFC 6533's \\x{HHHH}."""
    async with (
        sinks(EightBitRefusal(text), Without8BitMime()) as (a, b),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original("Scan 9"))
        (ndr,) = await wait_for(lambda: reports(b))
        content = ndr["content"]
        assert content.isascii()
        assert "BODY=8BITMIME" not in ndr["mail_options"]
        report = parse_mail(content)
        text_part, status, _headers = report.get_payload()
        assert text_part["Content-Transfer-Encoding"] == "quoted-printable"
        assert text_part.get_content_charset() == "utf-8"
        assert f"returned '550 5.1.1 {shown}'" in text_part.get_content()
        assert status.get_content_type() == "message/delivery-status"
        _per_message, per_rcpt = status.get_payload()
        escaped = "".join(c if c.isascii() else f"\\x{{{ord(c):X}}}" for c in shown)
        assert per_rcpt["Diagnostic-Code"] == f"smtp; 550 5.1.1 {escaped}"


async def test_long_report_fields_are_folded_at_spaces_not_broken_on_the_wire(
    tmp_path: Path,
) -> None:
    """The report's fields were written on one line whatever their length: a remote reply in
    Chinese (each character 8 octets as \\x{HHHH}) made a Diagnostic-Code of some 4 000 octets,
    a long Subject an "Undeliverable:" line as long. The wire's line limit (998) then broke them
    where the octet count fell, inside an escape (\\x{6536} read back as \\x{65 36}) or a word
    of the Subject. Such fields are now folded where a space is (or before an escape), and no
    line of the stored report is over 998 octets."""
    words = [f"Invoice{i:03d}" for i in range(150)]
    folded = "\r\n ".join(" ".join(words[i : i + 6]) for i in range(0, len(words), 6))
    refusal = "收件人不存在，请检查地址" * 40  # more than the 512 characters a reply keeps
    async with (
        sinks(EightBitRefusal(refusal.encode()), ScriptedHandler()) as (a, b),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original(folded))
        (ndr,) = await wait_for(lambda: reports(b))
        report = parse_mail(ndr["content"])
        assert report["Subject"] == "Undeliverable: " + " ".join(words)
        _per_message, per_rcpt = report.get_payload()[1].get_payload()
        escapes = re.findall(r"\\x\{[^}]*\}", per_rcpt["Diagnostic-Code"])
        assert len(escapes) > 150
        assert all(re.fullmatch(r"\\x\{[0-9A-F]{4}\}", e) for e in escapes), escapes
        shown = re.sub(r"\s", "", per_rcpt["Diagnostic-Code"])
        escaped = "".join(f"\\x{{{ord(c):X}}}" for c in refusal)
        assert shown.startswith("smtp;5505.1.1" + escaped[:800])

        (stored,) = [m for m in await relay.store.list_messages() if m.sender == ""]
        content = await relay.store.read_data(stored.queue_id, size=stored.size)
        assert max(map(len, content.split(b"\r\n"))) <= 998


async def test_a_huge_original_header_is_returned_in_part_and_the_report_reaches_the_sender(
    tmp_path: Path,
) -> None:
    """A report carries the original's header twice (the text part and text/rfc822-headers),
    whatever its size (max_header_size is 256 KB by default): a 120 KB header made a 240 KB
    report, which the sender's route (max_message_size 150KB) refused, and the report was lost.
    At most 50 000 octets of it come back (Postfix's bounce_size_limit), whole fields, the text
    part saying how much was left out."""
    trace = b"".join(b"X-Trace-%04d: " % i + b"t" * 70 + b"\r\n" for i in range(1500))
    big = original("Big header").replace(b"MIME-Version:", trace + b"MIME-Version:")
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(
            tmp_path,
            {"*": a.port},
            extra=send_connector_text(
                "To senders", "senders.test", b.port, 'max_message_size = "150KB"'
            ),
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], big)
        (ndr,) = await wait_for(lambda: reports(b))
        assert len(ndr["content"]) < 110_000
        returned = report_part(ndr["content"], 2)
        assert returned.startswith(b"Received: ")  # the relay's own, then the client's
        assert b"\r\nFrom: Scanner <scanner@senders.test>\r\n" in returned[:1000]
        assert 49_000 < len(returned) <= 50_000
        assert returned.endswith(b"t" * 70 + b"\r\n")  # whole fields
        assert b"MIME-Version" not in returned
        text = parse_mail(ndr["content"]).get_payload()[0].get_content()
        said = re.search(r"\(([\d,]+) of the original header's ([\d,]+) octets are left out", text)
        assert said, text
        left_out, total = (int(n.replace(",", "")) for n in said.groups())
        assert total - left_out == len(returned) and total > len(big) - 200


async def test_a_report_is_exempt_from_the_send_connectors_max_message_size(
    tmp_path: Path,
) -> None:
    """exchange-semantics.md §7.4: "Exempt from size limits: DSNs, system messages, ...". The
    sender's route had a max_message_size smaller than the report: the relay refused its own
    report (550 5.3.4 ROUTING.SizeLimit) and, a report being never reported on, it was lost.
    The client's own messages over that limit are still refused."""
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(
            tmp_path,
            {"*": a.port},
            extra=send_connector_text(
                "To senders", "senders.test", b.port, 'max_message_size = "1KB"'
            ),
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original("Small limit"))
        (ndr,) = await wait_for(lambda: reports(b))
        assert len(ndr["content"]) > 1024
        assert ndr["rcpt_tos"] == [SENDER]
        assert b"Small limit" in ndr["content"]

        # a message of the client's own over the limit is still refused by routing
        await send(relay, "ann@example.com", [SENDER], original("Too big", b"x" * 2000 + b"\r\n"))

        async def refused() -> bool:
            for m in await relay.store.list_messages():
                if m.message_id == "<Too-big@senders.test>":
                    return m.recipients[0].status == RecipientStatus.FAILED
            return False

        await wait_for(refused)
        assert not [m for m in b.handler.messages if m["mail_from"] != "<>"]


async def test_a_queued_reports_route_shown_is_the_one_it_goes_by(tmp_path: Path) -> None:
    """A report is exempt from max_message_size (previous test): the message view (`relaygate
    queue show`, the API) named the route routing would have taken for a message of its size,
    another connector than the one it is sent through."""
    from relaygate.control.views import message_view

    async with (
        sinks(
            ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"),
            ScriptedHandler(lambda _a, _n: "451 4.3.2 Try later"),
        ) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port},
            extra=send_connector_text(
                "To senders", "senders.test", b.port, 'max_message_size = "1KB"'
            ),
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original("Shown route"))
        await wait_for(lambda: b.handler.attempts.get(SENDER))

        async def report() -> StoredMessage | None:
            return next((m for m in await relay.store.list_messages() if m.sender == ""), None)

        view = message_view(await wait_for(report), relay.config)
        assert view["SendConnector"] == "To senders"
        assert view["Recipients"][0]["SendConnector"] == "To senders"


async def test_original_header_lines_over_998_octets_come_back_folded_or_cut_short(
    tmp_path: Path,
) -> None:
    """The original's header lines were copied into the report as they were, and a line over
    998 octets was broken by the wire where the count fell (RFC 5322 §2.1.1): inside a word of a
    long list, whose unfolded value then had a space the client never wrote. Such a line is now
    folded at its white space; a run without any longer than a line is cut short at 998 octets,
    the text part saying so."""
    listed = b"X-Long-List: " + b" ".join(b"item%04d" % i for i in range(300))
    token = b"X-Token: " + b"a" * 1500 + b"Z"
    long_header = original("Long lines").replace(
        b"MIME-Version:", listed + b"\r\n" + token + b"\r\nMIME-Version:"
    )
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], long_header)
        (ndr,) = await wait_for(lambda: reports(b))
        for part in (report_part(ndr["content"], 0), report_part(ndr["content"], 2)):
            lines = part.split(b"\r\n")
            assert max(len(line) for line in lines) <= 998
            unfolded = part.replace(b"\r\n ", b" ").split(b"\r\n")
            assert listed in unfolded  # folded at its spaces: the same value
            (cut,) = [line for line in unfolded if line.startswith(b"X-Token: ")]
            assert token.startswith(cut) and 900 < len(cut) < len(token)
            assert unfolded[unfolded.index(cut) + 1].startswith(b"MIME-Version: ")
        text = parse_mail(ndr["content"]).get_payload()[0].get_content()
        assert "1 line of the original header was longer than 998 octets" in text, text


async def test_recipients_failing_on_two_routes_at_different_times_get_an_ndr_each(
    tmp_path: Path,
) -> None:
    """What README says: a recipient's NDR goes when it fails, as Exchange's "a 5xx means an
    immediate NDR for those recipients" (exchange-semantics.md §7.3); one that fails later on
    another route gets an NDR of its own, not a second copy of the first recipient's."""

    def later(address: str, attempt: int) -> str | None:
        return "451 4.3.2 Try later" if attempt == 1 else "550 5.1.1 No such user"

    async with (
        sinks(
            ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"),
            ScriptedHandler(later),
            ScriptedHandler(),
        ) as (now_route, later_route, b),
        relay_running(
            tmp_path,
            {"example.com": now_route.port, "later.test": later_route.port, "senders.test": b.port},
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com", "ann@later.test"], original("Scan 10"))
        first, second = await wait_for(lambda: len(reports(b)) == 2 and reports(b))
        listed = []
        for ndr in (first, second):
            per_rcpt = parse_mail(ndr["content"]).get_payload()[1].get_payload()[1:]
            listed.append([r["Final-Recipient"] for r in per_rcpt])
        assert listed == [["rfc822; bob@example.com"], ["rfc822; ann@later.test"]]
        assert len(later_route.handler.attempts["ann@later.test"]) == 2


async def test_recipients_failing_on_two_routes_in_one_attempt_get_one_ndr(
    tmp_path: Path,
) -> None:
    """Two recipients on two routes (different next hops), both refused with a 5xx in the same
    attempt: the sender gets one NDR listing both, as Exchange and Postfix send one report per
    message per attempt. Before, each route queued an NDR of its own (two reports)."""
    refuse = "550 5.1.1 User unknown"
    async with (
        sinks(
            ScriptedHandler(lambda _a, _n: refuse),
            ScriptedHandler(lambda _a, _n: refuse),
            ScriptedHandler(),
        ) as (one, two, b),
        relay_running(
            tmp_path,
            {"example.com": one.port, "other.test": two.port, "senders.test": b.port},
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com", "carol@other.test"], original("Both"))

        async def both_failed() -> bool:
            msg = next(m for m in await relay.store.list_messages() if m.sender == SENDER)
            return all(r.status is RecipientStatus.FAILED for r in msg.recipients)

        await wait_for(both_failed)
        assert relay.manager is not None
        # a report is queued before its recipients' results are stored: none is still coming
        assert relay.manager.stats["ndr"] == 1
        (ndr,) = await wait_for(lambda: reports(b))
        per_rcpt = parse_mail(ndr["content"]).get_payload()[1].get_payload()[1:]
        assert sorted(r["Final-Recipient"] for r in per_rcpt) == [
            "rfc822; bob@example.com",
            "rfc822; carol@other.test",
        ]


async def test_recipients_delayed_on_two_routes_get_one_delay_notice(tmp_path: Path) -> None:
    """The delay notice, as the NDR: recipients waiting on two routes past
    delay_notification_timeout are listed in one notice, not one per route."""
    busy = "451 4.4.1 Remote busy"
    one = ScriptedHandler(lambda _a, _n: busy)
    two = ScriptedHandler(lambda _a, _n: busy)
    async with (
        sinks(one, two, ScriptedHandler()) as (a, c, b),
        relay_running(
            tmp_path,
            {"example.com": a.port, "other.test": c.port, "senders.test": b.port},
            queue={
                "transient_failure_retry_interval": "00:00:00.3",
                "delay_notification_timeout": "00:00:01",
            },
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com", "carol@other.test"], original("Slow"))
        (notice,) = await wait_for(lambda: reports(b))
        per_rcpt = parse_mail(notice["content"]).get_payload()[1].get_payload()[1:]
        assert sorted(r["Final-Recipient"] for r in per_rcpt) == [
            "rfc822; bob@example.com",
            "rfc822; carol@other.test",
        ]
        assert {r["Action"] for r in per_rcpt} == {"delayed"}
        seen = len(one.attempts["bob@example.com"])
        await wait_for(lambda: len(one.attempts["bob@example.com"]) >= seen + 2)
        assert relay.manager is not None
        assert relay.manager.stats["delay_notices"] == 1
        assert len(reports(b)) == 1


async def test_an_ndr_comes_from_the_default_domains_postmaster_and_is_dkim_signed(
    tmp_path: Path,
) -> None:
    """Exchange's reports come from postmaster@<default accepted domain> (`relaygate domain add
    --default` says "postmaster@ for NDRs"). They came from postmaster@<server fqdn>, a domain
    with no DKIM key (keys match the exact domain), so every NDR and delay notice went out
    unsigned although the organisation's domain had a key."""
    import dkim
    from relaygate.dkim.keys import generate_key

    pem, record = generate_key("rsa-sha256")
    key_file = tmp_path / "s1.key"
    key_file.write_bytes(pem)
    accepted = '\n[[accepted_domains]]\ndomain = "senders.test"\ndefault = true\n'
    extra = accepted + dkim_table("senders.test", "s1", key_file)
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}, extra=extra) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original("Scan 8"))
        (ndr,) = await wait_for(lambda: reports(b))
        content = ndr["content"]
        assert parse_mail(content)["From"].addresses[0].addr_spec == "postmaster@senders.test"
        assert content.startswith(b"DKIM-Signature: ")
        assert b"d=senders.test" in content
        assert dkim.verify(content, dnsfunc=lambda name, timeout=5: record.encode())
        # Reporting-MTA stays the server's own name: the host that made the report
        assert b"Reporting-MTA: dns; relay.test\r\n" in content


async def test_an_ndr_that_cannot_be_queued_retries_the_failed_and_records_the_delivered(
    tmp_path: Path,
) -> None:
    """The NDR is queued before the results are recorded; when queueing it fails (a full disk),
    the delivered recipient must still be recorded (before: delivered again on every scan) and
    the failed one retried, then bounced once the NDR can be queued."""
    from relaygate.queue.store import StoreFullError

    def policy(address: str, attempt: int) -> str | None:
        return "550 5.1.1 User unknown" if address.startswith("gone@") else None

    async with (
        sinks(ScriptedHandler(policy), ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
        ) as relay,
    ):
        store = relay.store
        real_submit = store.submit
        disk_full = True

        async def submit(envelope: Envelope, data: bytes, **kw: Any) -> str:
            if disk_full and envelope.metadata.get("dsn"):
                raise StoreFullError("queue database full: database or disk is full")
            return await real_submit(envelope, data, **kw)

        store.submit = submit  # type: ignore[method-assign]
        await send(relay, SENDER, ["bob@example.com", "gone@example.com"], original("Full"))

        async def recorded() -> StoredMessage | None:
            (msg,) = await store.list_messages()
            by = {r.address: r for r in msg.recipients}
            return msg if by["bob@example.com"].status is RecipientStatus.DELIVERED else None

        msg = await wait_for(recorded)
        gone = next(r for r in msg.recipients if r.address == "gone@example.com")
        assert gone.status is RecipientStatus.DEFERRED and gone.last_error.startswith("550 5.1.1")
        await asyncio.sleep(0.8)  # four scans: none may deliver to bob again
        assert [m["rcpt_tos"] for m in a.handler.messages].count(["bob@example.com"]) == 1
        assert b.handler.messages == []

        disk_full = False  # the disk has room again: the retry fails again, and is bounced
        (ndr,) = await wait_for(lambda: reports(b), timeout=10)
        assert "gone@example.com" in parse_mail(ndr["content"]).get_payload()[0].get_content()
        (msg, _dsn) = sorted(await store.list_messages(), key=lambda m: m.sender == "")
        assert {r.address: r.status for r in msg.recipients} == {
            "bob@example.com": RecipientStatus.DELIVERED,
            "gone@example.com": RecipientStatus.FAILED,
        }
        assert sum("bob@example.com" in m["rcpt_tos"] for m in a.handler.messages) == 1


async def test_a_route_that_fails_to_record_does_not_end_the_lease_of_a_route_in_flight(
    tmp_path: Path,
) -> None:
    """Two routes at once: when one raises (its results could not be stored), the message's lease
    is let go only after the other has ended, never while it is still delivering, when another
    node could take the message and deliver it a second time."""
    from relaygate.queue.store import StoreError

    hold = asyncio.Event()
    async with (
        sinks(ScriptedHandler(hold=hold), ScriptedHandler()) as (a, b),
        relay_running(tmp_path, {"example.com": a.port, "other.test": b.port}) as relay,
    ):
        store = relay.store
        real_record = store.record_results

        async def record_results(queue_id: str, owner: str, results: Any, **kw: Any) -> None:
            if results[0].address == "carol@other.test":
                raise StoreError("disk I/O error")
            await real_record(queue_id, owner, results, **kw)

        store.record_results = record_results  # type: ignore[method-assign]
        await send(relay, SENDER, ["bob@example.com", "carol@other.test"], original("Two"))
        await asyncio.wait_for(a.handler.data_started.wait(), 10)
        await wait_for(lambda: b.handler.messages)
        await asyncio.sleep(0.3)  # the failed route's error has reached the delivery run
        (msg,) = await store.list_messages()
        assert msg.lease_owner == relay.manager.node_id, "lease let go with bob in flight"
        hold.set()
        await wait_for(lambda: a.handler.messages)


async def test_a_commit_with_an_unknown_outcome_gets_no_reply_and_results_are_stored_again(
    tmp_path: Path,
) -> None:
    """Two store failures met on a full disk (review, reproduced with a relay on a full tmpfs):
    - a COMMIT that failed after reaching the disk was answered 451 although the message could
      come back and be delivered: now the connection is closed without a reply (RFC 5321 §6.1);
    - delivery results that could not be stored were dropped, and the message was delivered
      again once writes worked: now they are stored again until the store takes them."""
    import aiosmtplib

    from relaygate.queue.store import StoreError, StoreOutcomeUnknownError
    from tests.queue_manager.helpers import smtp_port

    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        store = relay.store
        real_submit, real_record = store.submit, store.record_results
        unknown = True

        async def submit(envelope: Envelope, data: bytes, **kw: Any) -> str:
            if unknown:
                raise StoreOutcomeUnknownError("commit failed, outcome unknown: disk I/O error")
            return await real_submit(envelope, data, **kw)

        store.submit = submit  # type: ignore[method-assign]
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(relay), timeout=10)
        await client.connect()
        await client.ehlo(hostname="client.test")
        await client.mail(SENDER)
        await client.rcpt("bob@example.com")
        with contextlib.suppress(aiosmtplib.SMTPServerDisconnected):
            reply = await client.data(original("Unknown"))
            raise AssertionError(f"a reply to a message whose outcome is unknown: {reply}")
        client.close()

        unknown = False
        failures = 2

        async def record_results(queue_id: str, owner: str, results: Any, **kw: Any) -> None:
            nonlocal failures
            if failures:
                failures -= 1
                raise StoreError("queue database error: database or disk is full")
            await real_record(queue_id, owner, results, **kw)

        store.record_results = record_results  # type: ignore[method-assign]
        await send(relay, SENDER, ["bob@example.com"], original("Results"))

        async def delivered() -> Any:
            (msg,) = await store.list_messages()
            return msg.recipients[0].status is RecipientStatus.DELIVERED

        await wait_for(delivered)
        assert failures == 0
        await asyncio.sleep(1.0)  # five scans: none delivers it again
        assert len(a.handler.messages) == 1


async def test_results_not_stored_when_the_relay_stops_are_one_error_line_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop while the results of a delivery cannot be stored (seen with SQLite's "locking
    protocol" as a killed node's workers stopped): the message is delivered again at its next
    attempt, as documented. That is an operational condition the store error names, and it was
    logged as "delivery run failed" with a traceback (which the suite's relay fixture counts as
    a crash); it is one ERROR line naming the message, the error and what happens next."""
    from relaygate.queue.store import StoreError

    caplog.set_level(logging.INFO, logger="relaygate")
    async with sinks(ScriptedHandler()) as (a,):
        async with relay_running(tmp_path, {"*": a.port}) as relay:

            async def record_results(*args: Any, **kw: Any) -> None:
                raise StoreError("queue database error: locking protocol")

            relay.store.record_results = record_results  # type: ignore[method-assign]
            await send(relay, SENDER, ["bob@example.com"], original("Unstored"))
            await wait_for(lambda: a.handler.messages)
            await wait_for(
                lambda: any("could not be stored" in r.getMessage() for r in caplog.records)
            )
        failed = [r for r in caplog.records if "delivery run failed" in r.getMessage()]
        assert failed, [r.getMessage() for r in caplog.records]
        assert all(r.exc_info is None for r in failed), failed
        (line,) = failed
        assert line.levelno == logging.ERROR
        assert "queue database error: locking protocol" in line.getMessage()
        assert "stays queued" in line.getMessage()


async def test_a_store_error_failing_every_scan_is_said_when_it_starts_not_at_every_scan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that fails every scan (a database down, a disk refusing writes after a failed
    fsync) wrote "queue scan failed" at every scan, five a second per worker here: said when it
    starts, then at most every _REPEAT_EVERY with the count, and once when scans work again."""
    from relaygate.queue import manager_loop
    from relaygate.queue.store import StoreError

    monkeypatch.setattr(manager_loop, "_REPEAT_EVERY", 1.0, raising=False)
    caplog.set_level(logging.INFO, logger="relaygate")
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}, scan_interval=0.1) as relay,
    ):
        working = relay.store.lease_due
        failed_scans = 0

        async def lease_due(*args: Any, **kw: Any) -> Any:
            nonlocal failed_scans
            failed_scans += 1
            raise StoreError("queue database error: disk I/O error")

        relay.store.lease_due = lease_due  # type: ignore[method-assign]
        started = time.monotonic()
        await wait_for(lambda: failed_scans >= 20)  # 2 s of scans, at least
        relay.store.lease_due = working  # type: ignore[method-assign]
        outage = time.monotonic() - started
        await send(relay, SENDER, ["bob@example.com"], original("After the outage"))
        await wait_for(lambda: a.handler.messages)
        await wait_for(lambda: any("work again" in r.getMessage() for r in caplog.records))
    lines = [r.getMessage() for r in caplog.records if "queue scan" in r.getMessage()]
    failed = [line for line in lines if line.startswith("queue scan failed")]
    assert failed[0] == "queue scan failed: queue database error: disk I/O error", lines
    # the first, then one a second with the count (before: one line a scan, 20 or more)
    assert 2 <= len(failed) <= outage + 2, (lines, outage)
    assert re.fullmatch(
        r"queue scan failed \(again \d+ times in the last 1 s\): queue database error: disk I/O "
        r"error",
        failed[1],
    ), lines
    (back,) = [line for line in lines if "work again" in line]
    count = int(re.search(r"after (\d+) failed", back).group(1))  # type: ignore[union-attr]
    assert count == failed_scans, (back, failed_scans)  # every failed scan counted
    assert back.endswith("(last error: queue database error: disk I/O error)"), back


async def test_an_ndr_returns_the_header_of_a_message_without_an_empty_line_not_its_body(
    tmp_path: Path,
) -> None:
    """A script's report with no empty line after its header: the NDR (and the admin's copy)
    carried the whole message, body included, twice (text part and text/rfc822-headers)."""
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={"admin_notification_address": ADMIN},
        ) as relay,
    ):
        body = b"db_password=hunter2 in the nightly report\r\n" * 2000
        data = b"From: Scanner <scanner@senders.test>\r\nSubject: Nightly\r\n" + body
        await send(relay, SENDER, ["bob@example.com"], data)
        (ndr,) = await wait_for(lambda: b.handler.messages)
        assert ndr["rcpt_tos"] == [SENDER, ADMIN]
        assert b"hunter2" not in ndr["content"]
        assert len(ndr["content"]) < 4096
        _text, _status, headers = parse_mail(ndr["content"]).get_payload()
        original_headers = headers.get_payload(decode=True)
        assert original_headers.startswith(b"Received: ")
        assert original_headers.endswith(
            b"From: Scanner <scanner@senders.test>\r\nSubject: Nightly\r\n"
        )


async def test_notify_orcpt_and_envid_given_by_the_client_are_honoured_in_the_reports(
    tmp_path: Path,
) -> None:
    """RFC 3461's NOTIFY, ORCPT and ENVID were accepted and then ignored: NOTIFY=NEVER still
    got an NDR (a monitoring tool asking never to be bounced to), NOTIFY=FAILURE a delay
    notice, and ORCPT/ENVID never came back (Original-Recipient, Original-Envelope-Id) for the
    sender to match the report with. A recipient without NOTIFY keeps the default (failure and
    delay); the admin's copy is a copy of what is sent, as Exchange's GenerateCopyOfDSNFor."""
    never, failure, default = "never@example.com", "failure@example.com", "plain@example.com"
    late = "late@example.com"

    def policy(address: str, _attempt: int) -> str | None:
        return "451 4.3.2 Mailbox busy" if address == late else "550 5.1.1 User unknown"

    async with (
        sinks(ScriptedHandler(policy), ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={
                "admin_notification_address": ADMIN,
                "transient_failure_retry_interval": "00:00:00.5",
                "delay_notification_timeout": "00:00:01",
            },
        ) as relay,
    ):
        await send(
            relay,
            SENDER,
            [never, failure, default],
            original("Notify"),
            mail_params=b" ENVID=QQ314159",
            rcpt_params={
                never: b" NOTIFY=NEVER",
                failure: b" NOTIFY=FAILURE ORCPT=rfc822;Failure+2Bold@example.com",
            },
        )
        (ndr,) = await wait_for(lambda: reports(b))
        assert ndr["rcpt_tos"] == [SENDER, ADMIN]
        report = parse_mail(ndr["content"])
        per_message, *per_rcpt = report.get_payload()[1].get_payload()
        assert per_message["Original-Envelope-Id"] == "QQ314159"
        finals = [r["Final-Recipient"] for r in per_rcpt]
        assert finals == [f"rfc822; {failure}", f"rfc822; {default}"]  # not NOTIFY=NEVER's
        assert per_rcpt[0]["Original-Recipient"] == "rfc822; Failure+old@example.com"
        assert per_rcpt[1]["Original-Recipient"] is None
        assert never not in report.get_payload()[0].get_content()

        # NOTIFY=NEVER only: nothing at all; NOTIFY=FAILURE: no delay notice
        await send(relay, SENDER, [never], original("Never"), rcpt_params={never: b" NOTIFY=NEVER"})
        await send(
            relay, SENDER, [late], original("Not late"), rcpt_params={late: b" NOTIFY=FAILURE"}
        )

        async def settled() -> bool:
            msgs = await relay.store.list_messages()
            never_msg = next((m for m in msgs if m.message_id == "<Never@senders.test>"), None)
            late_msg = next((m for m in msgs if m.message_id == "<Not-late@senders.test>"), None)
            return (
                never_msg is not None
                and never_msg.recipients[0].status == RecipientStatus.FAILED
                and late_msg is not None
                and late_msg.delay_notified
            )

        await wait_for(settled)
        assert len(reports(b)) == 1
        assert len([m for m in await relay.store.list_messages() if m.sender == ""]) == 1


async def test_an_rfc822_orcpt_comes_back_xtext_decoded_only(tmp_path: Path) -> None:
    """RFC 6533's ``\\x{HHHH}`` is a notation of utf-8 ORCPTs only: an rfc822 ORCPT is xtext
    (RFC 3461 §4.2), where a backslash is an ordinary character. ``\\x{41}`` in one came back
    decoded, as ``A``: an address the client never gave. Its "+XX" is decoded when that gives
    printable ASCII (an rfc822 address is ASCII), else kept, so the status part stays 7-bit."""
    literal, octets = "literal@example.com", "octets@example.com"
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        await send(
            relay,
            SENDER,
            [literal, octets],
            original("Orcpt"),
            rcpt_params={
                literal: b" ORCPT=rfc822;odd\\x{41}name+2Bx@example.com",
                octets: b" ORCPT=rfc822;caf+C3+A9+0D@example.com",
            },
        )
        (ndr,) = await wait_for(lambda: reports(b))
        status = parse_mail(ndr["content"]).get_payload()[1]
        assert status.get_content_type() == "message/delivery-status"
        per_rcpt = status.get_payload()[1:]
        assert [r["Original-Recipient"] for r in per_rcpt] == [
            "rfc822; odd\\x{41}name+x@example.com",
            "rfc822; caf+C3+A9+0D@example.com",
        ]


async def test_a_recipient_given_twice_with_different_notify_gets_the_reports_either_asked(
    tmp_path: Path,
) -> None:
    """A recipient given twice in one transaction is one recipient (delivered once); its NOTIFY
    was the last RCPT's, so ``NOTIFY=FAILURE`` then ``NOTIFY=NEVER`` (or no NOTIFY, the default,
    then NEVER) got no NDR although the client asked for one. The reports are now those either
    RCPT asked for (the union of their conditions, as Postfix, which keeps such duplicates as
    two recipients, sends them), and the first ORCPT is kept (the report has one line for it)."""
    bob, ann, cy = "bob@example.com", "ann@example.com", "cy@example.com"
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        await send(
            relay,
            SENDER,
            [bob, bob, ann, ann, cy, cy],
            original("Twice"),
            rcpt_params={
                bob: [
                    b" NOTIFY=FAILURE ORCPT=rfc822;first@example.com",
                    b" NOTIFY=NEVER ORCPT=rfc822;second@example.com",
                ],
                ann: [b"", b" NOTIFY=NEVER"],
                cy: [b" NOTIFY=NEVER", b" NOTIFY=NEVER"],
            },
        )
        (ndr,) = await wait_for(lambda: reports(b))
        per_rcpt = parse_mail(ndr["content"]).get_payload()[1].get_payload()[1:]
        assert [r["Final-Recipient"] for r in per_rcpt] == [f"rfc822; {bob}", f"rfc822; {ann}"]
        assert per_rcpt[0]["Original-Recipient"] == "rfc822; first@example.com"
        assert {r: len(a.handler.attempts[r]) for r in (bob, ann, cy)} == {bob: 1, ann: 1, cy: 1}


async def test_no_report_to_a_sender_the_connector_may_not_send_to(tmp_path: Path) -> None:
    """A connector that limits to whom its clients send (allowed_recipients) but not as whom
    (allowed_senders empty): a client could name any address as its sender and a recipient
    that bounces, and the NDR, with every header the client wrote, went to that address,
    which the client may not send to. Such a sender gets no report (NDR or delay notice);
    the admin's copy still goes. A sender the list allows gets its NDR as before."""
    outsider, insider = "victim@elsewhere.test", "ops@example.com"

    def policy(address: str, _attempt: int) -> str | None:
        return "550 5.1.1 User unknown" if address.startswith("nobody@") else None

    async with (
        sinks(ScriptedHandler(policy), ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "elsewhere.test": b.port, "senders.test": b.port},
            queue={"admin_notification_address": ADMIN},
            receive_extra='allowed_recipients = ["*@example.com"]',
        ) as relay,
    ):

        async def reports_done() -> list[StoredMessage]:
            dsns = [m for m in await relay.store.list_messages() if m.sender == ""]
            done = all(r.status == RecipientStatus.DELIVERED for m in dsns for r in m.recipients)
            return dsns if dsns and done else []

        await send(relay, outsider, ["nobody@example.com"], original("Outsider"))
        (dsn,) = await wait_for(reports_done)
        assert [r.address for r in dsn.recipients] == [ADMIN]  # not the outsider
        (ndr,) = reports(b)
        assert ndr["rcpt_tos"] == [ADMIN]
        assert b"Subject: Undeliverable: Outsider" in ndr["content"]

        await send(relay, insider, ["nobody@example.com"], original("Insider"))
        (to_insider,) = await wait_for(lambda: reports(a))
        assert to_insider["rcpt_tos"] == [insider]
        await wait_for(lambda: len(reports(b)) == 2)  # and the admin's copy
        assert reports(b)[1]["rcpt_tos"] == [ADMIN]


async def test_the_null_sender_is_never_bounced(tmp_path: Path) -> None:
    async with (
        sinks(ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler()) as (
            a,
            b,
        ),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={"admin_notification_address": ADMIN},
        ) as relay,
    ):
        await send(relay, "", ["bob@example.com"], original())
        await wait_for(lambda: a.handler.rcpts)

        async def failed() -> bool:
            (msg,) = await relay.store.list_messages()
            return msg.recipients[0].status == RecipientStatus.FAILED

        await wait_for(failed)
        await asyncio.sleep(0.6)
        assert len(await relay.store.list_messages()) == 1  # no report was queued
        assert not b.handler.messages
        assert not tracking(relay, "DSN")


async def test_a_report_that_cannot_be_delivered_is_logged_as_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """An NDR that its recipient refuses is never reported on (its sender is <>), so the service
    log is the only trace of a sender who never learns that the message failed: it said, at INFO,
    that no report was sent about message <the report's id> "from <>", which reads like the
    ordinary case of a bounced bounce and names neither the original message nor who missed the
    report. A WARNING now says a report was lost, about which message, to whom, and why; a
    report that is only delayed is not lost."""
    caplog.set_level(logging.INFO, logger="relaygate")
    gone, busy = "gone@senders.test", "busy@senders.test"

    def refuse_gone(address: str, _attempt: int) -> str | None:
        if address == busy:
            return "451 4.2.1 Mailbox busy"
        return "550 5.1.1 Mailbox gone" if address == gone else None

    async with (
        sinks(
            ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown"), ScriptedHandler(refuse_gone)
        ) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={"delay_notification_timeout": "00:00:01", "admin_notification_address": ADMIN},
        ) as relay,
    ):
        await send(relay, busy, ["bob@example.com"], original("Delayed report"))
        await send(relay, gone, ["bob@example.com"], original("Lost report"))

        async def report_failed() -> StoredMessage | None:
            for m in await relay.store.list_messages():
                if m.sender == "" and any(r.status == RecipientStatus.FAILED for r in m.recipients):
                    return m
            return None

        report = await wait_for(report_failed)
        copies = await wait_for(lambda: len(reports(b)) == 2 and reports(b))
        assert [c["rcpt_tos"] for c in copies] == [[ADMIN], [ADMIN]]  # the admin's copies went
        original_id = report.metadata["original_queue_id"]

        def lost() -> list[str]:
            return [
                r.getMessage()
                for r in caplog.records
                if r.levelno == logging.WARNING and report.queue_id in r.getMessage()
            ]

        (line,) = await wait_for(lost)
        assert f"about message {original_id}" in line
        assert f"{gone}: 550 5.1.1 Mailbox gone" in line
        assert ADMIN not in line  # it reached the admin

        async def delayed_report() -> StoredMessage | None:
            for m in await relay.store.list_messages():
                if m.sender == "" and m.recipients[0].address == busy and m.delay_notified:
                    return m
            return None

        delayed = await wait_for(delayed_report)  # past delay_notification_timeout: still queued
        warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [r for r in warned if delayed.queue_id in r.getMessage()]
        assert len(await relay.store.list_messages()) == 4  # no report about either report


async def test_delay_notice_once_then_expiry_ndr_with_4_4_7(tmp_path: Path) -> None:
    always_busy = ScriptedHandler(lambda _a, _n: "451 4.4.1 Remote busy")
    async with (
        sinks(always_busy, ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={
                "transient_failure_retry_interval": "00:00:00.5",
                "delay_notification_timeout": "00:00:01",
                "message_expiration_timeout": "00:00:03",
            },
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original("Late"))
        await wait_for(lambda: reports(b))
        delayed = parse_mail(reports(b)[0]["content"])
        assert delayed["Subject"] == "Delivery delayed: Late"
        rcpt = delayed.get_payload()[1].get_payload()[1]
        assert rcpt["Action"] == "delayed"
        assert rcpt["Status"] == "4.4.0"  # the failover reply wraps the remote 451 4.4.1
        assert "Delivery is delayed" in delayed.get_payload()[0].get_content()

        await wait_for(lambda: len(reports(b)) >= 2, timeout=8)
        assert len(reports(b)) == 2  # one delay notice, then the NDR
        ndr = parse_mail(reports(b)[1]["content"])
        assert ndr["Subject"] == "Undeliverable: Late"
        per_rcpt = ndr.get_payload()[1].get_payload()[1]
        assert per_rcpt["Action"] == "failed"
        assert per_rcpt["Status"] == "4.4.7"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 4.4.7 QUEUE.Expired; message expired"
        assert "451 4.4.1 Remote busy" in ndr.get_payload()[0].get_content()
        original_msg = next(m for m in await relay.store.list_messages() if m.sender == SENDER)
        (r,) = original_msg.recipients
        assert r.status == RecipientStatus.FAILED
        assert r.last_error == replies.QUEUE_EXPIRED.line()
        assert original_msg.delay_notified
        attempts = len(always_busy.attempts["bob@example.com"])
        await asyncio.sleep(0.6)
        assert len(always_busy.attempts["bob@example.com"]) == attempts  # no attempt after expiry


async def test_a_delay_notified_flag_that_cannot_be_saved_sends_no_notice_storm(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The delay notice was queued, then its "delay notified" flag saved; a store error there
    (other than the message being gone) left the flag unset, and each retry sent the sender
    another delay notice. The notice still goes first (a crash in between duplicates a report,
    never loses one), but a flag that cannot be saved is owed: an ERROR names the message, each
    run tries to save it again, and no other notice goes."""
    from relaygate.queue.store import StoreError

    caplog.set_level(logging.INFO, logger="relaygate")
    always_busy = ScriptedHandler(lambda _a, _n: "451 4.4.1 Remote busy")
    async with (
        sinks(always_busy, ScriptedHandler()) as (a, b),
        relay_running(
            tmp_path,
            {"*": a.port, "senders.test": b.port},
            queue={
                "transient_failure_retry_interval": "00:00:00.2",
                "delay_notification_timeout": "00:00:00.5",
            },
        ) as relay,
    ):
        store = relay.store
        real_set_flags = store.set_flags
        broken = True

        async def set_flags(queue_id: str, **kw: Any) -> None:
            if broken and kw.get("delay_notified"):
                raise StoreError("disk I/O error")
            await real_set_flags(queue_id, **kw)

        store.set_flags = set_flags  # type: ignore[method-assign]
        await send(relay, SENDER, ["bob@example.com"], original("Storm"))

        def tries() -> int:
            return len(always_busy.attempts.get("bob@example.com", []))

        await wait_for(lambda: tries() >= 6)
        assert len(reports(b)) <= 1  # before: a notice after every retry
        errors = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.ERROR and "delay notified" in r.getMessage()
        ]
        (msg,) = [m for m in await store.list_messages() if m.sender == SENDER]
        assert errors and msg.queue_id in errors[0]

        await wait_for(lambda: reports(b))
        broken = False

        async def flag_saved() -> bool:
            (msg,) = [m for m in await store.list_messages() if m.sender == SENDER]
            return msg.delay_notified

        await wait_for(flag_saved)
        seen = tries()
        await wait_for(lambda: tries() >= seen + 3)
        assert len(reports(b)) == 1


@pytest.mark.parametrize("ending", ["delivered", "expired", "removed"])
async def test_an_owed_delay_notified_flag_is_forgotten_when_the_message_ends(
    tmp_path: Path, ending: str
) -> None:
    """A "delay notified" flag that cannot be saved is owed (`_delay_flag_owed`) until it is
    saved; when the message ended first (delivered, or expired with its NDR, or removed by an
    administrator) while the store still refused the flag, its entry stayed for the life of the
    process: a leak over a long run with a flaky store. The entry goes when the message ends
    in a run of this node, or at the next housekeeping (a removed message, one another node
    ended)."""
    from relaygate.queue.store import StoreError

    accept = False

    def policy(_address: str, _attempt: int) -> str | None:
        return None if accept else "451 4.4.1 Remote busy"

    queue = {
        "transient_failure_retry_interval": "00:00:00.2",
        "delay_notification_timeout": "00:00:00.5",
        "message_expiration_timeout": "00:00:03" if ending == "expired" else "2.00:00:00",
    }
    async with (
        sinks(ScriptedHandler(policy), ScriptedHandler()) as (a, b),
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}, queue=queue) as relay,
    ):
        store, manager = relay.store, relay.manager
        assert manager is not None
        real_set_flags = store.set_flags

        async def set_flags(queue_id: str, **kw: Any) -> None:
            if kw.get("delay_notified"):
                raise StoreError("disk I/O error")  # never saved, to the end
            await real_set_flags(queue_id, **kw)

        store.set_flags = set_flags  # type: ignore[method-assign]
        await send(relay, SENDER, ["bob@example.com"], original("Owed"))
        (notice,) = await wait_for(lambda: reports(b))
        assert parse_mail(notice["content"])["Subject"] == "Delivery delayed: Owed"
        (msg,) = [m for m in await store.list_messages() if m.sender == SENDER]
        assert manager._delay_flag_owed == {msg.queue_id}

        if ending == "removed":
            assert await store.remove(msg.queue_id) is not None
            manager._last_purge = float("-inf")  # the housekeeping is due at the next scan
            manager.wake()
            await wait_for(lambda: not manager._delay_flag_owed)
            return
        if ending == "delivered":
            accept = True
            await wait_for(lambda: a.handler.messages)
        else:
            await wait_for(lambda: len(reports(b)) == 2, timeout=10)  # the expiry's NDR

        async def ended() -> bool:
            got = await store.get(msg.queue_id)
            return got is not None and all(
                r.status in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)
                for r in got.recipients
            )

        await wait_for(ended)
        await wait_for(lambda: not manager._inflight)  # the run that ended it is over
        assert manager._delay_flag_owed == set()


async def test_an_unreachable_recipients_delay_notice_has_a_4_x_x_status_in_rfc3464_order(
    tmp_path: Path,
) -> None:
    """A recipient no send connector matches waits in the Unreachable queue with LastError
    `550 5.4.4 ROUTING.NoNextHop` (Exchange's text); its delay notice said `Action: delayed` with
    `Status: 5.4.4`, a permanent failure, and a sender's bounce processing that reads Status
    takes the address as dead while the relay still tries it. A delayed recipient's Status is of
    class 4 (RFC 3464 §2.3.4, RFC 3463). The extension fields (X-RelayGate-Queue-Id,
    X-Last-Error) came before fields RFC 3464 §2.2-2.3 puts ahead of any extension field."""
    async with (
        sinks(ScriptedHandler()) as (b,),
        relay_running(
            tmp_path,
            {"senders.test": b.port},
            queue={
                "delay_notification_timeout": "00:00:01",
                "message_expiration_timeout": "00:00:03",
            },
        ) as relay,
    ):
        await send(relay, SENDER, ["bob@nowhere.test"], original("Nowhere"))
        (notice,) = await wait_for(lambda: reports(b))
        per_message, per_rcpt = parse_mail(notice["content"]).get_payload()[1].get_payload()
        assert per_message.keys() == ["Reporting-MTA", "Arrival-Date", "X-RelayGate-Queue-Id"]
        assert per_rcpt["Action"] == "delayed"
        assert per_rcpt["Status"] == "4.4.4"
        assert per_rcpt["Diagnostic-Code"] == "smtp; 550 5.4.4 ROUTING.NoNextHop; unable to route"

        (_notice, ndr) = await wait_for(lambda: len(reports(b)) == 2 and reports(b), timeout=8)
        per_rcpt = parse_mail(ndr["content"]).get_payload()[1].get_payload()[1]
        assert per_rcpt["Status"] == "4.4.7"
        assert per_rcpt.keys() == [
            "Final-Recipient",
            "Action",
            "Status",
            "Diagnostic-Code",
            "Last-Attempt-Date",
            "X-Last-Error",
        ]


async def test_no_route_is_the_unreachable_queue_until_a_reload_adds_one(tmp_path: Path) -> None:
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"example.com": a.port}) as relay,
    ):
        await send(relay, SENDER, ["bob@nowhere.test", "carol@example.com"], original())
        await wait_for(lambda: a.handler.messages)
        control = QueueControl.for_relay(relay)

        async def unreachable() -> list[dict[str, Any]]:
            return await control.list_messages(status="Unreachable")

        (view,) = await wait_for(unreachable)
        assert view["NextHopDomain"] == "Unreachable"
        assert view["LastError"] == "550 5.4.4 ROUTING.NoNextHop; unable to route"
        rcpts = {r["Address"]: r["Status"] for r in view["Recipients"]}
        assert rcpts == {"bob@nowhere.test": "Unreachable", "carol@example.com": "Delivered"}
        assert view["NextRetryTime"] is not None
        assert not reports(a)  # kept for retry, not bounced

        # a reload that adds a route resubmits the Unreachable queue at once
        import dataclasses

        from relaygate.config import SendConnector

        new = dataclasses.replace(
            relay.config,
            send_connectors=(
                *relay.config.send_connectors,
                SendConnector(
                    name="Catch-all",
                    address_spaces=("*",),
                    dns_routing_enabled=False,
                    smart_hosts=(f"[127.0.0.1]:{a.port}",),
                ),
            ),
        )
        relay.config = new
        relay.manager.apply(new, signer=relay.manager.signer)
        await wait_for(lambda: len(a.handler.messages) == 2, timeout=5)
        assert a.handler.messages[1]["rcpt_tos"] == ["bob@nowhere.test"]


async def test_a_smart_host_that_is_this_relay_is_a_loop(tmp_path: Path) -> None:
    from tests.queue_manager.helpers import free_port

    port = free_port()
    async with (
        sinks(ScriptedHandler()) as (b,),
        relay_running(tmp_path, {"*": port, "senders.test": b.port}, smtp_port=port) as relay,
    ):
        await send(relay, SENDER, ["bob@example.com"], original())
        ndr = await wait_for(lambda: reports(b))
        per_rcpt = parse_mail(ndr[0]["content"]).get_payload()[1].get_payload()[1]
        assert per_rcpt["Diagnostic-Code"] == "smtp; " + replies.LOOP_DETECTED.line()
        assert len(await relay.store.list_messages()) == 2  # the original and the NDR, no loop


async def test_a_message_queued_before_a_start_is_checked_for_a_loop_against_the_listeners(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue manager started before the listeners with no endpoints, so a message due at
    start (queued before it) was routed in that window without loop detection: to a smart host
    that is this relay's own port, its sibling workers' listeners or its own about to open. A
    delivery now waits for the listeners. The listeners open here only once the first delivery
    resolved its next hops (or after at most 2 s, when deliveries wait for them)."""
    from relaygate.queue import manager_routes
    from relaygate.smtp.server import SmtpServer
    from tests.queue_manager.helpers import free_port

    port, closed = free_port(), free_port()
    async with sinks(ScriptedHandler()) as (b,):
        # First run: bob's route has no server (nothing listens on `closed`): queued for retry.
        async with relay_running(
            tmp_path, {"*": closed, "senders.test": b.port}, smtp_port=port
        ) as relay:
            await send(relay, SENDER, ["bob@example.com"], original())

            async def deferred() -> bool:
                msgs = await relay.store.list_messages()
                return bool(msgs) and msgs[0].recipients[0].status == RecipientStatus.DEFERRED

            await wait_for(deferred)

        seen: list[set[tuple[str, int]]] = []
        resolved = asyncio.Event()
        real_resolve = manager_routes.resolve_next_hops
        real_start = SmtpServer.start

        async def spy_resolve(*args: Any, **kw: Any) -> Any:
            seen.append(set(kw.get("local_endpoints", ())))
            resolved.set()
            return await real_resolve(*args, **kw)

        async def late_start(self: SmtpServer) -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(resolved.wait(), 2.0)
            await real_start(self)

        monkeypatch.setattr(manager_routes, "resolve_next_hops", spy_resolve)
        monkeypatch.setattr(SmtpServer, "start", late_start)
        # Second run: the route is this relay's own listener; bob is due at once (retry 1 s).
        async with relay_running(
            tmp_path, {"*": port, "senders.test": b.port}, smtp_port=port
        ) as relay:
            ndr = await wait_for(lambda: reports(b))
        assert seen and ("127.0.0.1", port) in seen[0], seen
        per_rcpt = parse_mail(ndr[0]["content"]).get_payload()[1].get_payload()[1]
        assert per_rcpt["Diagnostic-Code"] == "smtp; " + replies.LOOP_DETECTED.line()


async def test_another_loopback_address_at_the_relays_port_is_not_this_relay(
    tmp_path: Path,
) -> None:
    """A relay listening on 127.0.0.1:P only and a next hop at 127.0.0.2:P (another server on
    loopback, as in a lab chaining two relays): a connection there never reaches the relay's
    socket. It was taken for this relay because it is loopback with one of its ports, and the
    mail bounced with 554 5.4.6 ROUTING.Loop."""
    from tests.queue_manager.helpers import free_port

    port = free_port()
    lab = await start_sink(ScriptedHandler(), host="127.0.0.2", port=port)
    lab_route = (
        '\n[[send_connectors]]\nname = "Lab"\naddress_spaces = ["lab.test"]\n'
        f'dns_routing_enabled = false\nsmart_hosts = ["[127.0.0.2]:{port}"]\n'
    )
    try:
        async with (
            sinks(ScriptedHandler()) as (b,),
            relay_running(
                tmp_path, {"senders.test": b.port}, smtp_port=port, extra=lab_route
            ) as relay,
        ):
            assert ("127.0.0.1", port) in relay.manager.local_endpoints
            assert relay.manager.local_names == {"relay.test"}  # server.fqdn (for the MX cap)
            await send(relay, SENDER, ["bob@lab.test"], original())
            (got,) = await wait_for(lambda: lab.handler.messages or reports(b))
            assert got["rcpt_tos"] == ["bob@lab.test"]  # delivered, not an NDR to the sender
    finally:
        await lab.close()


async def test_mx_routing_through_a_dns_server_to_a_loopback_mx_a_lab_allows(
    tmp_path: Path,
) -> None:
    """Delivery by MX end to end: the relay asks its server.dns_servers, connects to the MX
    host, and returns mail for a domain that does not exist at once. An MX on a loopback
    address is refused (451 4.4.4 SpecialAddress): a lab or test with its own DNS had no way
    to deliver by MX to a server on loopback; allow_loopback_mx on the connector allows it."""
    from tests.support.dns_server import LoopbackDNS

    with LoopbackDNS() as dns_server:
        async with sinks(ScriptedHandler(), ScriptedHandler()) as (mx, b):
            dns_server.add("dest.test", "MX", (10, "mx.dest.test"))
            dns_server.add("mx.dest.test", "A", "127.0.0.1")
            lab = (
                '\n[[send_connectors]]\nname = "Lab MX"\naddress_spaces = ["*"]\n'
                f"dns_routing_enabled = true\nport = {mx.port}\nallow_loopback_mx = true\n"
            )
            async with relay_running(
                tmp_path,
                {"senders.test": b.port},
                extra=lab,
                server_extra=f'dns_servers = ["{dns_server.address}"]',
            ) as relay:
                await send(relay, SENDER, ["bob@dest.test"], original())
                (got,) = await wait_for(lambda: mx.handler.messages)
                assert got["rcpt_tos"] == ["bob@dest.test"]
                assert ("dest.test", "MX", "udp") in dns_server.queries

                await send(relay, SENDER, ["bob@gone.test"], original("Gone"))
                (ndr,) = await wait_for(lambda: reports(b))
                per_rcpt = parse_mail(ndr["content"]).get_payload()[1].get_payload()[1]
                assert per_rcpt["Final-Recipient"] == "rfc822; bob@gone.test"
                assert per_rcpt["Diagnostic-Code"] == (
                    "smtp; " + replies.DNS_NONEXISTENT_DOMAIN.line()
                )
                assert len(mx.handler.messages) == 1


async def test_a_relay_without_any_dns_server_starts_and_mx_mail_waits_saying_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No server.dns_servers and a system resolv.conf that names no server (here: dnspython
    reads an empty file for /etc/resolv.conf; the machine's is not touched): the start stopped
    with a traceback (dns.resolver.NoResolverConfiguration: no nameservers). The relay starts,
    says what is wrong, and mail routed by MX waits with the reason; a smart host given as an
    address still takes mail."""
    import dns.resolver

    empty = tmp_path / "resolv.conf"
    empty.write_text("", encoding="utf-8")
    read = dns.resolver.BaseResolver.read_resolv_conf

    def read_empty(self: Any, f: Any = "/etc/resolv.conf") -> None:
        read(self, str(empty) if f == "/etc/resolv.conf" else f)

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", read_empty)
    internet = (
        '\n[[send_connectors]]\nname = "Internet"\naddress_spaces = ["*"]\n'
        "dns_routing_enabled = true\n"
    )
    caplog.set_level(logging.ERROR, logger="relaygate")
    async with (
        sinks(ScriptedHandler()) as (b,),
        relay_running(tmp_path, {"senders.test": b.port}, extra=internet) as relay,
    ):
        why = "no DNS server: /etc/resolv.conf names none and server.dns_servers is empty"
        assert any(why in r.getMessage() for r in caplog.records), caplog.text
        await send(relay, SENDER, ["bob@dest.test"], original())

        async def deferred() -> Any:
            msgs = await relay.store.list_messages()
            rcpt = msgs[0].recipients[0] if msgs else None
            return rcpt if rcpt and rcpt.status == RecipientStatus.DEFERRED else None

        rcpt = await wait_for(deferred)
        assert rcpt.last_error == replies.dns_query_failed(why).line()
        await send(relay, "bob@dest.test", ["alice@senders.test"], original("Reply"))
        await wait_for(lambda: b.handler.messages)  # a smart host by address: delivered


async def test_restart_in_the_middle_of_a_run_resends_only_what_was_not_delivered(
    tmp_path: Path,
) -> None:
    hold = asyncio.Event()
    fast, slow = ScriptedHandler(), ScriptedHandler(hold=hold)
    async with sinks(fast, slow) as (a, b):
        routes = {"a.test": a.port, "b.test": b.port}
        relay = await start_relay(tmp_path / "data", routes)
        try:
            await send(relay, SENDER, ["x@a.test", "y@b.test"], original())
            await wait_for(lambda: a.handler.messages)
            await asyncio.wait_for(slow.data_started.wait(), 10)
            relay.manager.stop_grace = 0.2  # the node stops while y's DATA is in progress
        finally:
            await relay.stop()
        hold.set()
        await asyncio.sleep(0.1)
        assert len(fast.attempts["x@a.test"]) == 1

        relay = await start_relay(tmp_path / "data", routes)
        try:

            async def done() -> bool:
                (msg,) = await relay.store.list_messages()
                return all(r.status == RecipientStatus.DELIVERED for r in msg.recipients)

            await wait_for(done)
            assert len(slow.attempts["y@b.test"]) == 2  # attempted again after the restart
            await asyncio.sleep(0.5)
            assert len(fast.attempts["x@a.test"]) == 1  # delivered before: never resent
            assert len(fast.messages) == 1
        finally:
            await relay.stop()


async def test_dkim_signed_with_the_configured_key_before_sending(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import dkim

    caplog.set_level(logging.INFO, logger="relaygate")
    from relaygate.dkim.keys import generate_key

    pem, record = generate_key("rsa-sha256")
    key_file = tmp_path / "s1.key"
    key_file.write_bytes(pem)
    extra = f"""
[[dkim]]
domain = "senders.test"
selector = "s1"
key_file = "{key_file}"
"""
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}, extra=extra) as relay,
    ):
        data = original("Signed")
        await send(relay, SENDER, ["bob@example.com"], data)
        (got,) = await wait_for(lambda: a.handler.messages)
        content = got["content"]
        assert content.startswith(b"DKIM-Signature: ")
        assert b"d=senders.test" in content and b"s=s1" in content
        assert content.endswith(data)

        def dns(name: bytes, timeout: int = 5) -> bytes:
            assert name == b"s1._domainkey.senders.test."
            return record.encode()

        assert dkim.verify(content, dnsfunc=dns)
        assert relay.manager.signer is not None

        # A From domain without a key goes out unsigned, and the tracking log says why.
        unsigned = b"From: printer@nokey.test\r\nSubject: Unsigned\r\n\r\nbody\r\n"
        await send(relay, "printer@nokey.test", ["bob@example.com"], unsigned)
        await wait_for(lambda: len(a.handler.messages) == 2)
        assert not a.handler.messages[1]["content"].startswith(b"DKIM-Signature:")
        from relaygate.logs.tracking import search

        async def agentinfo() -> list[dict]:
            await asyncio.to_thread(relay.tracking.flush)
            found = search(relay.tracking.path, event_id="AGENTINFO")
            return found if len(found) >= 2 else []

        events = await wait_for(agentinfo)
        infos = {e["custom-data"] for e in events}
        assert any(i.startswith("DKIM signed d=senders.test s=s1") for i in infos), infos
        assert any("DKIM unsigned" in i and "nokey.test" in i for i in infos), infos
        # ... and only the tracking log: an unsigned message is not a service-log line at the
        # default level (one per message from a busy domain without a key).
        noisy = [
            r.getMessage()
            for r in caplog.records
            if r.levelno >= logging.INFO and "nokey.test" in r.getMessage()
        ]
        assert noisy == []


async def test_a_session_that_may_not_send_as_the_organisation_is_not_dkim_signed(
    tmp_path: Path,
) -> None:
    """Removing ms-Exch-SMTP-Accept-Authoritative-Domain-Sender from ANONYMOUS LOGON is Exchange's
    "no spoofing of my domain from the Internet": MAIL FROM:<ceo@corp.test> is refused. But the
    From header is not MAIL FROM, and RelayGate signed `From: ceo@corp.test` sent with any other
    MAIL FROM with corp.test's key: the spoof then passed DMARC at the receiver. A message from
    such a session is not signed, and the tracking log says why."""
    from relaygate.dkim.keys import generate_key
    from relaygate.logs.tracking import search

    pem, _record = generate_key("rsa-sha256")
    key_file = tmp_path / "s1.key"
    key_file.write_bytes(pem)
    no_spoofing = (
        "[[receive_connectors.permissions]]\n"
        'user = "NT AUTHORITY\\\\ANONYMOUS LOGON"\n'
        'extended_rights = ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"]\n'
        "deny = true\n"
    )
    extra = dkim_table("corp.test", "s1", key_file)
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}, extra=extra, receive_extra=no_spoofing) as relay,
    ):
        spoof = b"From: CEO <ceo@corp.test>\r\nSubject: Wire transfer\r\n\r\nPay now.\r\n"
        await send(relay, "x@attacker.test", ["bob@example.com"], spoof)
        (got,) = await wait_for(lambda: a.handler.messages)
        assert not got["content"].startswith(b"DKIM-Signature:")

        async def agentinfo() -> list[dict]:
            await asyncio.to_thread(relay.tracking.flush)
            return search(relay.tracking.path, event_id="AGENTINFO")

        (event,) = await wait_for(agentinfo)
        assert "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender" in event["custom-data"]
        assert "Test Relay" in event["custom-data"]


async def test_one_unusable_dkim_key_after_a_reload_leaves_the_other_keys_signing(
    tmp_path: Path,
) -> None:
    """Key rotation: a second selector for senders.test whose key file is not there yet. The
    reload disabled DKIM signing for every domain (all mail unsigned, DMARC fails); now that
    entry is left out and the keys that can be used go on signing."""
    import dkim
    from relaygate.dkim.keys import load_private_key, record_name
    from tests.support.dns_server import LoopbackDNS

    keys = tmp_path / "keys"
    signing, extra = two_signing_keys(keys)
    config_file = tmp_path / "relaygate.toml"
    with LoopbackDNS() as dns_server:
        for domain, selector, path in signing:
            record = load_private_key(path, "rsa-sha256").record
            dns_server.add(record_name(selector, domain), "TXT", record)
        async with (
            sinks(ScriptedHandler()) as (a,),
            relay_running(tmp_path, {"*": a.port}, extra=extra, config_file=config_file) as relay,
        ):
            rotation = dkim_table("senders.test", "s2", f"{keys}/s2.key")
            config_file.write_text(config_file.read_text() + rotation)
            await relay.reload()
            assert relay.manager.signer is not None
            for sender in (SENDER, "printer@other.test"):
                data = original("Rotated").replace(b"scanner@senders.test", sender.encode())
                await send(relay, sender, ["bob@example.com"], data)
            await wait_for(lambda: len(a.handler.messages) == 2)
            for got in a.handler.messages:
                assert got["content"].startswith(b"DKIM-Signature: ")
                assert dkim.verify(got["content"], dnsfunc=dns_server.txt_lookup)


async def longest_loop_stall(stop: asyncio.Event) -> float:
    """The longest the event loop went without running this task, which asks to run every 10 ms
    (a probe of what an SMTP session would wait for its next reply)."""
    longest = 0.0
    last = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.01)  # the probe's own tick, not a wait for a condition
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    return longest


async def test_a_reload_loads_the_dkim_keys_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload read and parsed every DKIM key file (RSA 4096: tens of ms each) inside the
    synchronous apply on the event loop: with many keys, every SMTP session stood still meanwhile.
    The key loader is slowed here to 0.4 s a key: the loop must not stall for it. A key that
    cannot be loaded is still left out, logged naming its domain and file, and the others sign."""
    from relaygate.dkim import signer as signer_module

    keys = tmp_path / "keys"
    _signing, extra = two_signing_keys(keys)
    config_file = tmp_path / "relaygate.toml"
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}, extra=extra, config_file=config_file) as relay,
    ):
        assert relay.manager is not None
        old_signer = relay.manager.signer
        bad = keys / "bad.test" / "b1.key"
        bad.parent.mkdir()
        bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
        config_file.write_text(config_file.read_text() + dkim_table("bad.test", "b1", bad))
        real_load = signer_module.load_private_key

        def slow_load(path: Path, algorithm: str) -> Any:
            time.sleep(0.4)  # a big key on a busy machine
            return real_load(path, algorithm)

        monkeypatch.setattr(signer_module, "load_private_key", slow_load)
        stop = asyncio.Event()
        probe = asyncio.create_task(longest_loop_stall(stop))
        await asyncio.sleep(0)  # the probe takes its first reading before the reload starts
        with caplog.at_level(logging.ERROR, logger="relaygate"):
            await relay.reload()
        stop.set()
        stall = await probe
        assert stall < 0.3, f"the event loop stood still {stall:.2f} s during the reload"
        signer = relay.manager.signer
        assert signer is not None and signer is not old_signer
        assert signer.domains == ["other.test", "senders.test"]
        (problem,) = [
            r.getMessage() for r in caplog.records if "DKIM key not used" in r.getMessage()
        ]
        assert "bad.test" in problem and str(bad) in problem
        await send(relay, SENDER, ["bob@example.com"], original("After reload"))
        (got,) = await wait_for(lambda: a.handler.messages)
        assert got["content"].startswith(b"DKIM-Signature: ")


async def test_a_signature_covers_the_octets_sent_and_does_not_count_against_the_route_limit(
    tmp_path: Path,
) -> None:
    """The client folds lines over 998 octets and drops NULs on the way out: a signature made
    over the stored bytes failed at the next hop (DMARC fails). And routing chose the connector by
    the size as received: the signature this relay adds must not then bounce it (5.3.4)."""
    import dkim
    from relaygate.dkim.keys import generate_key

    pem, record = generate_key("rsa-sha256")
    key_file = tmp_path / "s1.key"
    key_file.write_bytes(pem)
    async with sinks(ScriptedHandler(), ScriptedHandler()) as (a, b):
        extra = send_connector_text(
            "Size limited", "limited.test", b.port, 'max_message_size = "4KB"'
        ) + dkim_table("senders.test", "s1", key_file)
        async with relay_running(tmp_path, {"*": a.port}, extra=extra) as relay:
            one_line_html = b"<html><body>" + b"x" * 1500 + b"\x00</body></html>\r\n"
            await send(relay, SENDER, ["bob@example.com"], original("Long", one_line_html))
            (got,) = await wait_for(lambda: a.handler.messages)
            content = got["content"]
            assert content.startswith(b"DKIM-Signature: ")
            assert max(map(len, content.split(b"\r\n"))) <= 998 and b"\x00" not in content
            assert dkim.verify(content, dnsfunc=lambda name, timeout=5: record.encode())

            head = b"From: scanner@senders.test\r\nTo: x@limited.test\r\nSubject: fits\r\n\r\n"
            fits = head + (b"y" * 70 + b"\r\n") * 50  # ~3.7 KB; with the Received header < 4 KB
            await send(relay, SENDER, ["x@limited.test"], fits)
            (got,) = await wait_for(lambda: b.handler.messages)
            assert got["content"].startswith(b"DKIM-Signature: ") and got["content"].endswith(fits)
            messages = await relay.store.list_messages()
            stored = next(m for m in messages if m.recipients[0].address == "x@limited.test")
            assert stored.size <= 4096 < len(got["content"])


async def test_smtputf8_declared_by_the_client_is_kept_for_the_next_hop(tmp_path: Path) -> None:
    """The SMTPUTF8 a client declared is stored with the message: a UTF-8 header then needs a next
    hop that offers SMTPUTF8 (before, it went to one without it, and was recorded Delivered)."""
    utf8_header = "From: Jörg <scanner@senders.test>\r\nSubject: Grüße\r\n\r\nhi\r\n".encode()
    async with (
        sinks(ScriptedHandler(), ScriptedHandler()) as (a, b),  # neither offers SMTPUTF8
        relay_running(tmp_path, {"*": a.port, "senders.test": b.port}) as relay,
    ):
        code, _ = await send(
            relay, SENDER, ["bob@example.com"], utf8_header, mail_params=b" SMTPUTF8"
        )
        assert code == 250
        (ndr,) = await wait_for(lambda: reports(b))
        assert b"5.6.7" in ndr["content"]
        assert a.handler.messages == []
        (msg, _ndr) = sorted(await relay.store.list_messages(), key=lambda m: m.sender == "")
        assert msg.metadata["smtputf8"] == "1"
        assert msg.recipients[0].status is RecipientStatus.FAILED

        await send(relay, SENDER, ["carol@example.com"], utf8_header)  # not declared: as before
        (got,) = await wait_for(lambda: a.handler.messages)
        assert got["content"].endswith(utf8_header)


async def test_an_ndr_to_a_utf8_sender_goes_only_with_smtputf8(tmp_path: Path) -> None:
    """The report's To is the sender, here a UTF-8 address (RFC 6532): its header is UTF-8, so it
    needs SMTPUTF8 like a client's UTF-8 header. The admin's copy went to a next hop without
    SMTPUTF8, as 8-bit header octets in a plain transaction."""
    utf8_sender = "jörg@senders.test"
    data = b"From: scanner@senders.test\r\nSubject: Scan\r\n\r\nhi\r\n"
    bounce = ScriptedHandler(lambda _a, _n: "550 5.1.1 User unknown")
    for offers_utf8 in (False, True):
        async with (
            sinks(bounce) as (a,),
            sinks_with_smtputf8(offers_utf8) as b,
            relay_running(
                tmp_path / str(offers_utf8),
                {"*": a.port, "senders.test": b.port},
                queue={"admin_notification_address": ADMIN},
            ) as relay,
        ):
            await send(relay, utf8_sender, ["bob@example.com"], data, mail_params=b" SMTPUTF8")

            async def report_done() -> bool:
                dsn = [m for m in await relay.store.list_messages() if m.sender == ""]
                return bool(dsn) and all(
                    r.status in (RecipientStatus.DELIVERED, RecipientStatus.FAILED)
                    for r in dsn[0].recipients
                )

            await wait_for(report_done)
            for got in b.handler.messages:
                head = got["content"].split(b"\r\n\r\n", 1)[0]
                assert head.isascii() or "SMTPUTF8" in got["mail_options"], got["mail_options"]
            (dsn,) = [m for m in await relay.store.list_messages() if m.sender == ""]
            assert dsn.metadata["smtputf8"] == "1"
            if offers_utf8:
                (got,) = b.handler.messages
                assert got["rcpt_tos"] == [utf8_sender, ADMIN]
                assert f"To: <{utf8_sender}>".encode() in got["content"]
            else:
                assert b.handler.messages == []
                assert {r.last_error[:9] for r in dsn.recipients} == {"550 5.6.7"}


@contextlib.asynccontextmanager
async def sinks_with_smtputf8(offers_utf8: bool) -> AsyncIterator[Sink]:
    sink = await start_sink(ScriptedHandler(), enable_SMTPUTF8=offers_utf8)
    try:
        yield sink
    finally:
        await sink.close()


async def test_a_new_message_goes_straight_to_the_manager_and_its_lease_ends_with_the_results(
    tmp_path: Path,
) -> None:
    """The hand-off: a message the session has just stored (leased to the local manager) is
    delivered without waiting for a queue scan, from the bytes the session holds, and the
    results and the end of the lease are one transaction (no lease left behind)."""
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        assert relay.manager is not None
        relay.manager.scan_interval = 3600.0  # only the hand-off can deliver now
        await asyncio.sleep(0.3)  # let the scan that was already waiting take the new interval
        reads: list[str] = []
        real_read = relay.store.read_data

        async def counting_read(queue_id: str, *, size: int = 0) -> bytes:
            reads.append(queue_id)
            return await real_read(queue_id, size=size)

        relay.store.read_data = counting_read  # type: ignore[method-assign]
        data = original("Handed off")
        started = asyncio.get_running_loop().time()
        code, _ = await send(relay, SENDER, ["bob@example.com"], data)
        assert code == 250
        await wait_for(lambda: a.handler.messages, timeout=3.0)
        assert asyncio.get_running_loop().time() - started < 3.0
        assert split_received(a.handler.messages[0]["content"])[1] == data
        assert reads == []  # delivered from the session's bytes, never read back
        (msg,) = await wait_for(lambda: _completed(relay), timeout=3.0)
        assert msg.recipients[0].status == RecipientStatus.DELIVERED
        assert msg.lease_owner is None and msg.lease_until is None


async def _completed(relay: Relay) -> list[Any]:
    msgs = await relay.store.list_messages()
    return msgs if msgs and msgs[0].lease_owner is None and msgs[0].status.is_final else []


async def test_without_room_a_new_message_is_stored_unleased_and_the_scan_delivers_it(
    tmp_path: Path,
) -> None:
    """max_concurrent_deliveries reached: the session stores the message without a lease and the
    next scan takes it (the hand-off never exceeds the limit)."""
    gate = asyncio.Event()

    class Slow(ScriptedHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            if not self.messages:
                await gate.wait()  # the first delivery holds the only slot
            return await super().handle_DATA(server, session, envelope)

    async with (
        sinks(Slow()) as (a,),
        relay_running(tmp_path, {"*": a.port}, queue={"max_concurrent_deliveries": 1}) as relay,
    ):
        assert relay.manager is not None
        assert (await send(relay, SENDER, ["bob@example.com"], original("First")))[0] == 250
        await wait_for(lambda: relay.manager is not None and relay.manager.in_flight == 1)
        assert relay.manager.lease_for_new() is None  # no room
        assert (await send(relay, SENDER, ["carol@example.com"], original("Second")))[0] == 250
        msgs = await relay.store.list_messages()
        second = next(m for m in msgs if m.recipients[0].address == "carol@example.com")
        assert second.lease_owner is None  # stored unleased: any scan may take it
        assert relay.manager.in_flight == 1  # the limit held
        gate.set()
        await wait_for(lambda: len(a.handler.messages) == 2, timeout=5.0)
        assert sorted(m["rcpt_tos"][0] for m in a.handler.messages) == [
            "bob@example.com",
            "carol@example.com",
        ]


async def test_a_large_message_arrives_byte_for_byte(tmp_path: Path) -> None:
    """Over the size where DATA writes the body and the terminator separately (no copy of the
    body), with and without lines that need dot-stuffing."""
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        body = b"".join(b"line %06d of a big scan\r\n" % i for i in range(60_000))  # ~1.6 MB
        plain = original("Big plain", extra=body).replace(b"\r\n.leading", b"\r\nno leading")
        assert b"\n." not in plain  # nothing to stuff: the body goes out as it is
        dotted = original("Big dotted", extra=body.replace(b"line 0", b".line 0"))
        for data in (plain, dotted):
            assert (await send(relay, SENDER, ["bob@example.com"], data))[0] == 250
        await wait_for(lambda: len(a.handler.messages) == 2, timeout=20.0)
        got = sorted((split_received(m["content"])[1] for m in a.handler.messages), key=len)
        assert got == sorted([plain, dotted], key=len)


async def test_delivery_rescans_line_breaks_only_when_the_receive_check_did_not_run(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """The session's bare CR/LF check is recorded with the message and spares delivery a second
    scan of the bytes; a message without that record (here: put in the store directly, with a bare
    LF) is scanned and leaves with CRLF line breaks only."""
    from relaygate.delivery import wire
    from relaygate.queue.model import LINE_BREAKS, Envelope

    scans: list[int] = []

    def counting(content: bytes) -> bool:
        scans.append(len(content))
        return has_bare(content)

    has_bare = wire.has_bare_cr_or_lf
    monkeypatch.setattr(wire, "has_bare_cr_or_lf", counting)
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        data = original("Checked once")
        assert (await send(relay, SENDER, ["bob@example.com"], data))[0] == 250
        await wait_for(lambda: len(a.handler.messages) == 1)
        (msg,) = await relay.store.list_messages()
        assert msg.metadata[LINE_BREAKS] == "CRLF"
        assert split_received(a.handler.messages[0]["content"])[1] == data
        assert scans == []  # the receive check was trusted

        raw = b"Subject: unchecked\r\n\r\nbare\nlinefeed\r\n"
        await relay.store.submit(Envelope(SENDER, ["carol@example.com"]), raw)
        assert relay.manager is not None
        relay.manager.wake()
        await wait_for(lambda: len(a.handler.messages) == 2)
        assert a.handler.messages[1]["content"] == b"Subject: unchecked\r\n\r\nbare\r\nlinefeed\r\n"
        assert scans == [len(raw)]


async def test_a_delivery_that_ends_while_a_scan_leases_is_not_started_again(
    tmp_path: Path,
) -> None:
    """A scan's `lease_due` also returns the messages this manager is delivering (its own leases);
    the manager skips those in flight. One whose delivery ended while `lease_due` ran was no
    longer in flight when the scan looked, and was delivered a second time: 27 of 4,000 messages
    at 50 sessions in the benchmark (docs/benchmarks.md, thirteenth session)."""
    gate = asyncio.Event()

    class Slow(ScriptedHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            await gate.wait()  # the delivery is in flight until the scan has leased
            return await super().handle_DATA(server, session, envelope)

    async with (
        sinks(Slow()) as (a,),
        relay_running(tmp_path, {"*": a.port}) as relay,
    ):
        manager = relay.manager
        assert manager is not None
        manager.scan_interval = 3600.0  # scans only when woken below
        await asyncio.sleep(0.3)  # let the scan that was already waiting take the new interval
        real_lease_due = relay.store.lease_due
        leased_in_flight: list[str] = []

        async def lease_while_a_delivery_ends(*args: Any, **kw: Any) -> Any:
            leased = await real_lease_due(*args, **kw)
            if leased and manager.in_flight:
                leased_in_flight.extend(m.queue_id for m in leased)
                gate.set()  # the delivery in flight ends now, before this scan goes on
                await wait_for(lambda: manager.in_flight == 0, timeout=5.0)
            return leased

        relay.store.lease_due = lease_while_a_delivery_ends  # type: ignore[method-assign]
        assert (await send(relay, SENDER, ["bob@example.com"], original("Once")))[0] == 250
        await wait_for(lambda: manager.in_flight == 1)  # handed over, waiting at the sink
        manager.wake()
        await wait_for(lambda: leased_in_flight and a.handler.messages, timeout=5.0)
        await asyncio.sleep(0.5)  # a second delivery, if one was started, arrives meanwhile
        assert manager.in_flight == 0
        assert len(a.handler.messages) == 1, [m["rcpt_tos"] for m in a.handler.messages]
        assert len(tracking(relay, "SEND")) == 1
        (msg,) = await relay.store.list_messages()
        assert msg.recipients[0].status == RecipientStatus.DELIVERED
        assert msg.lease_owner is None  # the scan's lease on a finished message was let go


async def test_a_new_message_handed_over_without_room_keeps_its_lease_until_delivered(
    tmp_path: Path,
) -> None:
    """A session stored a message leased to this manager, which had no room left when it was
    handed over. It stays leased to us and our next scan delivers it. It used to be released
    at once, while a scan of ours could already have leased it from the row as it was: that
    scan delivered it, and with the lease gone another node could take it too (3 of 4,100
    messages delivered by both workers at 50 sessions, docs/benchmarks.md, thirteenth session).
    """
    gates = [asyncio.Event(), asyncio.Event()]
    started: list[str] = []

    class Gated(ScriptedHandler):
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
            started.append(envelope.rcpt_tos[0])
            await gates[len(started) - 1].wait()
            return await super().handle_DATA(server, session, envelope)

    async with (
        sinks(Gated()) as (a,),
        relay_running(tmp_path, {"*": a.port}, queue={"max_concurrent_deliveries": 1}) as relay,
    ):
        manager = relay.manager
        assert manager is not None
        manager.scan_interval = 3600.0  # scans only when a delivery ends
        await asyncio.sleep(0.3)
        real_release = relay.store.release

        async def release_once_the_next_delivery_runs(queue_id: str, owner: str) -> None:
            # the order that lost the lease: the release lands after our scan took the message
            await wait_for(lambda: len(started) == 2, timeout=5.0)
            await real_release(queue_id, owner)

        relay.store.release = release_once_the_next_delivery_runs  # type: ignore[method-assign]
        assert (await send(relay, SENDER, ["bob@example.com"], original("First")))[0] == 250
        await wait_for(lambda: started == ["bob@example.com"])  # the only slot is taken
        # What a session does when lease_for_new still had room and take_new no longer has.
        lease = (manager.node_id, manager.clock() + manager.lease_seconds)
        envelope = Envelope(sender=SENDER, recipients=["carol@example.com"], helo="client.test")
        data = original("Second")
        queue_id = await relay.store.submit(envelope, data, lease=lease)
        received = StoredMessage.new(
            queue_id, envelope, size=len(data), received_at=time.time(), lease=lease
        )
        manager.take_new(received, data)
        assert manager.in_flight == 1  # the limit held
        gates[0].set()  # the first delivery ends; the scan that follows takes the second
        await wait_for(lambda: len(started) == 2, timeout=5.0)
        await asyncio.sleep(0.3)  # a release, if one was made, has landed by now
        assert await relay.store.lease_due("another-node", time.time(), 60.0, 10) == []
        gates[1].set()
        await wait_for(lambda: len(a.handler.messages) == 2, timeout=5.0)
        await asyncio.sleep(0.3)
        assert sorted(m["rcpt_tos"][0] for m in a.handler.messages) == [
            "bob@example.com",
            "carol@example.com",
        ]


async def test_a_delivery_that_outlasts_its_lease_keeps_it(tmp_path: Path) -> None:
    """A next hop slower than a lease (here a 1 s lease and a sink that holds DATA for 2.5 s):
    the manager renews the leases of its deliveries in flight, so no other worker or node can
    take the message and deliver it as well. Its scans lease its own messages again, which
    renews them too, but a manager with no room left does not scan (one slot here)."""
    hold = asyncio.Event()
    async with (
        sinks(ScriptedHandler(hold=hold)) as (a,),
        relay_running(
            tmp_path, {"*": a.port}, scan_interval=0.1, queue={"max_concurrent_deliveries": 1}
        ) as relay,
    ):
        manager = relay.manager
        assert manager is not None
        manager.lease_seconds = 1.0
        assert (await send(relay, SENDER, ["bob@example.com"], original("Slow hop")))[0] == 250
        await wait_for(lambda: a.handler.data_started.is_set())
        started = time.monotonic()
        takers = []
        while time.monotonic() - started < 2.5:  # more than twice the lease
            takers += await relay.store.lease_due("another-node", time.time(), 60.0, 10)
            await asyncio.sleep(0.1)
        assert takers == []
        (msg,) = await relay.store.list_messages()
        assert msg.lease_owner == manager.node_id and msg.lease_until is not None
        assert msg.lease_until > time.time()
        hold.set()
        await wait_for(lambda: a.handler.messages)
        (msg,) = await wait_for(lambda: _completed(relay), timeout=5.0)
        assert msg.recipients[0].status == RecipientStatus.DELIVERED
        assert len(a.handler.messages) == 1


async def test_a_reload_that_hardens_a_send_connector_is_not_bypassed_by_a_pooled_session(
    tmp_path: Path,
) -> None:
    """A session kept open for reuse was opened under the old settings: after a reload that sets
    require_tls (or AUTH), it carried the next message in clear (review, reproduced)."""
    from tests.queue_manager.helpers import start_sink

    sink = await start_sink()  # plain SMTP: no STARTTLS
    cfg = tmp_path / "relaygate.toml"
    relay = await start_relay(tmp_path / "data", {"*": sink.port}, config_file=cfg)
    try:
        await send(relay, SENDER, ["a@example.com"], original("Before"))
        await wait_for(lambda: len(sink.handler.messages) == 1)
        assert relay.manager.pool is not None and len(relay.manager.pool) == 1  # kept for reuse
        text = cfg.read_text().replace(
            'connection_inactivity_timeout = "00:00:10"',
            'connection_inactivity_timeout = "00:00:10"\nrequire_tls = true',
        )
        cfg.write_text(text)
        await relay.reload()
        assert relay.manager.config.send_connectors[0].require_tls is True
        await send(relay, SENDER, ["b@example.com"], original("After"))

        async def deferred() -> Any:
            msgs = await relay.store.list_messages()
            after = [m for m in msgs if m.recipients[0].address == "b@example.com"]
            return after and after[0].recipients[0].status is RecipientStatus.DEFERRED and after

        (msg,) = await wait_for(deferred)
        assert "TLS" in msg.recipients[0].last_error
        assert [m["rcpt_tos"] for m in sink.handler.messages] == [["a@example.com"]]
    finally:
        await relay.stop()
        await sink.close()


async def test_a_password_file_that_is_not_utf8_defers_and_never_reaches_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A smart-host password saved in Latin-1 (``Pässwort``): reading it raised a
    UnicodeDecodeError, whose repr holds the file's bytes, and the manager logged that repr
    ("delivery via ... failed: UnicodeDecodeError('utf-8', b'P\\xe4sswort-...', ...)"): the
    password in the service log (reproduced). Now it is a credentials error naming the file,
    the recipient waits in the queue as with an unreadable file, and the bytes go nowhere."""
    caplog.set_level(logging.INFO, logger="relaygate")
    secret = "Pässwort-7Qz"
    password_file = tmp_path / "smarthost.password"
    password_file.write_bytes(secret.encode("latin-1") + b"\n")
    auth = send_connector_text(
        "Authenticated",
        "example.com",
        1,  # never connected to: the credentials are loaded first
        'smart_host_auth_mechanism = "BasicAuth"',
        'auth_username = "relay@corp.test"',
        f'auth_password_file = "{password_file}"',
    )
    async with (
        sinks(ScriptedHandler()) as (a,),
        relay_running(tmp_path, {"*": a.port}, extra=auth) as relay,
    ):
        code, _ = await send(relay, SENDER, ["bob@example.com"], original())
        assert code == 250
        deferred = await wait_for(lambda: tracking(relay, "DEFER"))
        assert deferred[0]["recipient-status"][0].startswith("451 4.7.0 SMTPSEND.Auth.")
        (msg,) = await relay.store.list_messages()
        assert msg.recipients[0].status == RecipientStatus.DEFERRED
        assert msg.recipients[0].last_error == replies.CREDENTIALS_MISSING.line()
    logged = caplog.text
    assert str(password_file) in logged and "UTF-8" in logged
    for leaked in ("Pässwort", "P\\xe4sswort", "sswort-7Qz"):
        assert leaked not in logged, logged


async def _rebind_receive_connector(relay: Relay, config_file: Path, bindings: list[int]) -> None:
    """Reload `config_file` with the receive connector listening on `bindings` (ports)."""
    text = config_file.read_text(encoding="utf-8")
    current = next(line for line in text.splitlines() if line.startswith("bindings = "))
    ports = ", ".join(f'"127.0.0.1:{p}"' for p in bindings)
    config_file.write_text(text.replace(current, f"bindings = [{ports}]"), encoding="utf-8")
    await relay.reload()
    assert sorted(p for _h, p in relay.server.endpoints) == sorted(bindings)


async def test_a_listener_added_by_a_reload_is_this_relay_for_loop_detection(
    tmp_path: Path,
) -> None:
    """A reload that adds a listener: a smart host at that address is this relay. Before, the
    queue manager kept the endpoints of the start, so the relay sent the message to itself,
    again and again, each copy a new message, until the hop count stopped it (reproduced)."""
    from tests.queue_manager.helpers import free_port, smtp_port

    added = free_port()
    async with (
        sinks(ScriptedHandler()) as (b,),
        relay_running(
            tmp_path,
            {"example.com": added, "senders.test": b.port},
            config_file=tmp_path / "relaygate.toml",
        ) as relay,
    ):
        await _rebind_receive_connector(
            relay, tmp_path / "relaygate.toml", [smtp_port(relay), added]
        )
        await send(relay, SENDER, ["bob@example.com"], original())
        ndr = await wait_for(lambda: reports(b))
        per_rcpt = parse_mail(ndr[0]["content"]).get_payload()[1].get_payload()[1]
        assert per_rcpt["Diagnostic-Code"] == "smtp; " + replies.LOOP_DETECTED.line()
        assert len(await relay.store.list_messages()) == 2  # the original and the NDR, no loop


async def test_a_listener_removed_by_a_reload_is_no_longer_this_relay(tmp_path: Path) -> None:
    """A reload that moves the relay off a port another server then takes (a content filter
    on 127.0.0.1, the smart host): before, the queue manager kept the endpoints of the start
    and bounced every message with 554 ROUTING.Loop until a restart (reproduced)."""
    from relaygate.config import load_config
    from tests.queue_manager.helpers import free_port, make_config_text

    smtp, moved = free_port(), free_port()
    config_file = tmp_path / "relaygate.toml"
    text = make_config_text(
        tmp_path / "data",
        smtp_port=smtp,
        admin_port=free_port(),
        routes={"example.com": moved},
    )
    config_file.write_text(
        text.replace(
            f'bindings = ["127.0.0.1:{smtp}"]',
            f'bindings = ["127.0.0.1:{smtp}", "127.0.0.1:{moved}"]',
        ),
        encoding="utf-8",
    )
    relay = Relay(load_config(config_file), config_path=config_file)
    await relay.start()
    try:
        assert relay.manager is not None
        relay.manager.scan_interval = 0.2
        await _rebind_receive_connector(relay, config_file, [smtp])
        handler = ScriptedHandler()
        filter_sink = await start_sink(handler, port=moved)  # now free: another server takes it
        try:
            await send(relay, SENDER, ["bob@example.com"], original())

            async def final() -> Any:
                msgs = await relay.store.list_messages()
                done = [r for m in msgs for r in m.recipients if r.status.is_final]
                return done[0] if done else None

            rcpt = await wait_for(final)
        finally:
            await filter_sink.close()
        assert rcpt.status == RecipientStatus.DELIVERED, rcpt.last_error
        assert len(handler.messages) == 1
    finally:
        await relay.stop()
