"""DKIM end to end: a message sent through an in-process relay to a loopback sink, its received
bytes verified with dkimpy against the key published on a loopback DNS server (what Gmail or
Microsoft 365 would check)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import dkim
from relaygate.app import Relay
from relaygate.dkim.keys import load_private_key, record_name, write_key
from relaygate.logs.tracking import search
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    start_relay,
    start_sink,
    wait_for,
)
from tests.support.dns_server import LoopbackDNS
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401

SENDER = "app@corp.test"


def dkim_entry(domain: str, selector: str, key_file: Path) -> str:
    return f'\n[[dkim]]\ndomain = "{domain}"\nselector = "{selector}"\nkey_file = "{key_file}"\n'


def publish_new_key(dns: LoopbackDNS, keys: Path, domain: str, selector: str) -> str:
    """A new RSA key for (domain, selector), published in `dns`; its [[dkim]] entry."""
    path = write_key(keys, domain, selector)
    dns.add(record_name(selector, domain), "TXT", load_private_key(path, "rsa-sha256").record)
    return dkim_entry(domain, selector, path)


@contextlib.asynccontextmanager
async def relay_to_sink(
    tmp_path: Path, handler: ScriptedHandler | None = None, **kw: object
) -> AsyncIterator[tuple[Relay, Sink]]:
    """A relay whose every route goes to one loopback sink (which answers as `handler` says)."""
    sink = await start_sink(handler or ScriptedHandler())
    try:
        relay = await start_relay(tmp_path / "data", {"*": sink.port}, **kw)  # type: ignore[arg-type]
        try:
            yield relay, sink
        finally:
            await relay.stop()
    finally:
        await sink.close()


def signed_headers(content: bytes) -> list[bytes]:
    """The h= tag of the topmost DKIM-Signature of `content`, as field names."""
    head = re.sub(rb"\r\n[ \t]+", b" ", content.partition(b"\r\n\r\n")[0])
    match = re.search(rb"^DKIM-Signature:.*?\bh=([^;]+);", head, re.MULTILINE)
    assert match, head[:300]
    return match.group(1).replace(b" ", b"").split(b":")


async def test_list_unsubscribe_and_sender_are_signed(tmp_path: Path, loopback_dns: LoopbackDNS):
    """RFC 8058 §4: one-click unsubscribe needs List-Unsubscribe and List-Unsubscribe-Post in the
    h= of a valid DKIM signature, or the receiver does not offer it (Gmail and Yahoo require it
    of bulk senders). The default list (the config's `headers`) had neither, nor Sender nor the
    other List-* fields RFC 6376 §5.4.1 names: a newsletter sent through the relay failed the
    requirement, and its unsubscribe link could be replaced in transit without breaking the
    signature."""
    extra = publish_new_key(loopback_dns, tmp_path / "keys", "corp.test", "s1")
    message = (
        b"From: News <news@corp.test>\r\n"
        b"Sender: app@corp.test\r\n"
        b"To: bob@example.com\r\n"
        b"Subject: Monthly news\r\n"
        b"List-Id: News <news.corp.test>\r\n"
        b"List-Unsubscribe: <https://corp.test/u/abc123>, <mailto:u@corp.test>\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"\r\n"
        b"Hello.\r\n"
    )
    async with relay_to_sink(tmp_path, extra=extra) as (relay, sink):
        await send(relay, SENDER, ["bob@example.com"], message)
        (got,) = await wait_for(lambda: sink.handler.messages)
    content = got["content"]
    assert dkim.verify(content, dnsfunc=loopback_dns.txt_lookup)
    names = signed_headers(content)
    for name in (b"list-unsubscribe", b"list-unsubscribe-post", b"list-id", b"sender"):
        assert name in names, names
    swapped = content.replace(b"https://corp.test/u/abc123", b"https://evil.example/u/abc123")
    assert not dkim.verify(swapped, dnsfunc=loopback_dns.txt_lookup)


async def test_ndrs_are_signed_when_the_domain_comes_from_the_envelope(
    tmp_path: Path, loopback_dns: LoopbackDNS
):
    """The relay's NDRs and delay notices come from postmaster@<default accepted domain> so that
    its key signs them (README), but they are sent with the null sender: under
    `dkim_domain_source = "envelope_sender"` no domain was found and every report went out
    unsigned (DMARC fails for the organisation's own postmaster). A null sender has no domain:
    the From's signs, as the envelope's does for a message without a usable From."""
    extra = publish_new_key(loopback_dns, tmp_path / "keys", "corp.test", "s1")
    refuse_bob = ScriptedHandler(
        lambda a, _n: "550 5.1.1 Unknown" if a.startswith("bob@") else None
    )
    message = b"From: App <app@corp.test>\r\nTo: bob@example.com\r\nSubject: Hi\r\n\r\nHi.\r\n"
    async with relay_to_sink(
        tmp_path,
        refuse_bob,
        extra=extra,
        server_extra='dkim_domain_source = "envelope_sender"',
    ) as (relay, sink):
        await send(relay, SENDER, ["bob@example.com"], message)
        (ndr,) = await wait_for(
            lambda: [m for m in sink.handler.messages if m["mail_from"] == "<>"]
        )
    content = ndr["content"]
    assert b"From: Mail Delivery System <postmaster@corp.test>\r\n" in content
    assert content.startswith(b"DKIM-Signature: "), content[:300]
    assert b"d=corp.test" in content.partition(b"\r\n\r\n")[0]
    assert dkim.verify(content, dnsfunc=loopback_dns.txt_lookup)


async def test_a_subdomains_entry_signs_a_subdomains_mail_through_the_relay(
    tmp_path: Path, loopback_dns: LoopbackDNS
):
    """`subdomains = true` on corp.test's entry: a device writing From alerts.corp.test (a
    subdomain with no key of its own) gets a signature d=corp.test that verifies against the
    published parent key at the next hop; without it the message went out unsigned."""
    entry = publish_new_key(loopback_dns, tmp_path / "keys", "corp.test", "s1")
    message = (
        b"From: Alerts <ups@alerts.corp.test>\r\nTo: bob@example.com\r\nSubject: On battery\r\n"
        b"\r\nMains power lost.\r\n"
    )
    async with relay_to_sink(tmp_path, extra=entry + "subdomains = true\n") as (relay, sink):
        await send(relay, "ups@alerts.corp.test", ["bob@example.com"], message)
        (got,) = await wait_for(lambda: sink.handler.messages)

        async def agentinfo() -> list[dict[str, str]]:
            await asyncio.to_thread(relay.tracking.flush)
            return search(relay.tracking.path, event_id="AGENTINFO")

        (event,) = await wait_for(agentinfo)
    # why it was signed so, for `relaygate trace`
    assert event["custom-data"] == (
        "DKIM signed d=corp.test s=s1 for alerts.corp.test (subdomains = true)"
    )
    content = got["content"]
    assert content.startswith(b"DKIM-Signature: "), content[:300]
    assert re.search(rb"\bd=corp\.test;", content.partition(b"\r\n\r\n")[0])
    assert dkim.verify(content, dnsfunc=loopback_dns.txt_lookup)


async def test_a_field_added_above_a_signed_one_breaks_the_signature(
    tmp_path: Path, loopback_dns: LoopbackDNS
):
    """RFC 6376 §8.15: a verifier checks the last instance of each field named in h=, a reader
    shows the first. Only From was signed once more than present, so anyone holding a message
    the relay signed could put a second Subject, To or Content-Type above the signed one (or a
    Reply-To into a message without one: replies to the attacker) and the message still passed
    DKIM, and DMARC, as the organisation's. The fields a message may have once are now signed
    once more than present (Reply-To and Subject even when absent, as Gmail does); a field
    that relays legitimately add when missing (Message-ID, Date) still does not break it."""
    extra = publish_new_key(loopback_dns, tmp_path / "keys", "corp.test", "s1")
    message = (
        b"From: App <app@corp.test>\r\n"
        b"To: bob@example.com\r\n"
        b"Subject: Your invoice\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
        b"\r\n"
        b"Pay to the usual account.\r\n"
    )
    async with relay_to_sink(tmp_path, extra=extra) as (relay, sink):
        await send(relay, SENDER, ["bob@example.com"], message)
        (got,) = await wait_for(lambda: sink.handler.messages)
    content = got["content"]

    def verifies(data: bytes) -> bool:
        return bool(dkim.verify(data, dnsfunc=loopback_dns.txt_lookup))

    assert verifies(content)
    for added in (
        b"Subject: Urgent: new bank details\r\n",
        b"To: victim@example.net\r\n",
        b"Content-Type: text/html\r\n",
        b"Reply-To: attacker@evil.example\r\n",
    ):
        forged = content.replace(b"From: App", added + b"From: App", 1)
        assert not verifies(forged), added
    # what a next hop may add to a message without them
    relayed = content.replace(
        b"From: App",
        b"Message-ID: <added@mx.example>\r\nDate: Mon, 7 Dec 2026 10:00:00 +0000\r\nFrom: App",
        1,
    )
    assert verifies(relayed)


def _edge_cases() -> dict[str, bytes]:
    """Messages whose bytes the relay or the wire changes around the signature (line breaks,
    folding, NULs, dot-stuffing, the empty line), or that carry UTF-8, 8-bit or a signature."""
    head = (
        b"From: App <app@corp.test>\r\nTo: bob@example.com\r\nSubject: %s\r\n"
        b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\n"
    )
    mime_8bit = (
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
    )
    foreign = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=other.example; s=x; c=relaxed/relaxed; h=from;"
        b" bh=abc; b=def\r\n"
    )
    cases = {
        "no body": b"\r\n",
        "no empty line": b"",
        "LF only": b"\nbody\nline 2\n",
        "8-bit body": mime_8bit + "\r\nhéllo\r\n".encode(),
        "over 998 octets": b"\r\n" + b"x" * 3000 + b"\r\n",
        "dot lines": b"\r\n.\r\n..\r\n.x\r\n",
        "trailing blank lines": b"\r\nbody  \r\n\r\n\r\n",
        "NUL": b"\r\na\x00b\r\n",
        "bare CR": b"\r\na\rb\r\n",
    }
    messages = {name: head % name.encode() + rest for name, rest in cases.items()}
    messages["LF only"] = messages["LF only"].replace(b"\r\n", b"\n")
    messages["UTF-8 header"] = head % "héllo".encode() + b"\r\nbody\r\n"
    messages["long Subject"] = head % (b"y" * 1500) + b"\r\nbody\r\n"
    messages["signed before"] = foreign + head % b"signed before" + b"\r\nbody\r\n"
    return messages


async def test_what_the_next_hop_receives_verifies(tmp_path: Path, loopback_dns: LoopbackDNS):
    """The review's cases end to end: signed as they go on the wire (after CRLF normalisation,
    folding of lines over 998 octets, NUL removal, the empty line put in), each message the sink
    received, dot-stuffing undone, verifies; another domain's signature stays below ours."""
    extra = publish_new_key(loopback_dns, tmp_path / "keys", "corp.test", "s1")
    messages = _edge_cases()
    async with relay_to_sink(tmp_path, extra=extra) as (relay, sink):
        for message in messages.values():
            await send(relay, SENDER, ["bob@example.com"], message, mail_params=b" SMTPUTF8")
        received = await wait_for(
            lambda: len(sink.handler.messages) == len(messages) and sink.handler.messages
        )
    for got in received:
        content = got["content"]
        assert content.startswith(
            b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=corp.test;"
        )
        assert dkim.verify(content, dnsfunc=loopback_dns.txt_lookup), content[:600]
    (before,) = [m["content"] for m in received if b"d=other.example" in m["content"]]
    assert before.index(b"d=corp.test") < before.index(b"d=other.example")
