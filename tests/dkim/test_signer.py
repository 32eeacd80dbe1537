"""Signing with dkimpy, verified against keys published on a real loopback DNS server."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dkim
from relaygate.dkim.keys import load_private_key, record_name, write_key
from relaygate.dkim.signer import (
    DEFAULT_SIGNED_HEADERS,
    DkimConfigError,
    DkimSigner,
    from_header_domain,
)
from tests.support.dns_server import LoopbackDNS
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401

MESSAGE = (
    b"Received: from scanner01 ([10.0.0.5]) by relay.corp.example\r\n"
    b"From: Scanner 3rd floor <scanner@corp.example>\r\n"
    b"To: someone@external.example\r\n"
    b"Subject: Scanned document\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <scan-1@corp.example>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Your scan is attached.\r\n"
    b".leading dot line\r\n"
)


@dataclass
class Key:
    domain: str
    selector: str
    key_file: Path | None
    algorithm: str = "rsa-sha256"
    headers: list[str] = field(default_factory=list)
    enabled: bool = True
    subdomains: bool = False


def _key(tmp_path, domain="corp.example", selector="s1", algorithm="rsa-sha256", **kw) -> Key:
    path = write_key(tmp_path, domain, selector, algorithm)
    return Key(domain, selector, path, algorithm, **kw)


def _publish(server: LoopbackDNS, key: Key) -> None:
    record = load_private_key(key.key_file, key.algorithm).record
    server.add(record_name(key.selector, key.domain), "TXT", record)


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signed_message_verifies_against_published_key(tmp_path, loopback_dns, algorithm):
    key = _key(tmp_path, algorithm=algorithm)
    _publish(loopback_dns, key)
    result = DkimSigner([key]).sign(MESSAGE, envelope_sender="scanner@corp.example")
    assert result.signed, result.reason
    assert (result.domain, result.selector) == ("corp.example", "s1")
    assert result.reason == f"signed d=corp.example s=s1 a={algorithm}"
    assert result.data.endswith(MESSAGE)
    header = result.data[: len(result.data) - len(MESSAGE)]
    assert header.startswith(b"DKIM-Signature: v=1; a=" + algorithm.encode())
    assert b"c=relaxed/relaxed" in header
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    # the key really came from the loopback server
    assert ("s1._domainkey.corp.example", "TXT", "udp") in loopback_dns.queries


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_modified_body_or_header_fails(tmp_path, loopback_dns, algorithm):
    key = _key(tmp_path, algorithm=algorithm)
    _publish(loopback_dns, key)
    data = DkimSigner([key]).sign(MESSAGE, envelope_sender="x@corp.example").data
    assert not dkim.verify(
        data.replace(b"Your scan", b"Your scam"), dnsfunc=loopback_dns.txt_lookup
    )
    assert not dkim.verify(
        data.replace(b"Subject: Scanned", b"Subject: Urgent"), dnsfunc=loopback_dns.txt_lookup
    )


def test_relaxed_canonicalisation_tolerates_whitespace_changes(tmp_path, loopback_dns):
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    data = DkimSigner([key]).sign(MESSAGE, envelope_sender="x@corp.example").data
    rewrapped = data.replace(b"Subject: Scanned document", b"Subject:   Scanned   document")
    assert dkim.verify(rewrapped, dnsfunc=loopback_dns.txt_lookup)


def test_added_from_header_breaks_signature(tmp_path, loopback_dns):
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    data = DkimSigner([key]).sign(MESSAGE, envelope_sender="x@corp.example").data
    forged = data.replace(b"From: Scanner", b"From: ceo@corp.example\r\nFrom: Scanner")
    assert not dkim.verify(forged, dnsfunc=loopback_dns.txt_lookup)


def test_wrong_published_key_fails(tmp_path, loopback_dns):
    key = _key(tmp_path)
    other = _key(tmp_path, selector="other")
    loopback_dns.add(
        "s1._domainkey.corp.example", "TXT", load_private_key(other.key_file, "rsa-sha256").record
    )
    data = DkimSigner([key]).sign(MESSAGE, envelope_sender="x@corp.example").data
    assert not dkim.verify(data, dnsfunc=loopback_dns.txt_lookup)


def test_dual_signing_rsa_and_ed25519(tmp_path, loopback_dns):
    rsa_key = _key(tmp_path, selector="r1")
    ed_key = _key(tmp_path, selector="e1", algorithm="ed25519-sha256")
    _publish(loopback_dns, rsa_key)
    _publish(loopback_dns, ed_key)
    result = DkimSigner([rsa_key, ed_key]).sign(MESSAGE, envelope_sender="x@corp.example")
    assert result.signed and result.selector == "r1,e1"
    verifier = dkim.DKIM(result.data)
    assert verifier.verify(idx=0, dnsfunc=loopback_dns.txt_lookup)
    assert verifier.verify(idx=1, dnsfunc=loopback_dns.txt_lookup)


def test_unknown_domain_is_unsigned_with_reason(tmp_path):
    signer = DkimSigner([_key(tmp_path)])
    message = MESSAGE.replace(b"scanner@corp.example", b"scanner@other.example")
    result = signer.sign(message, envelope_sender="scanner@corp.example")
    assert not result.signed
    assert result.data == message
    assert result.domain == "other.example"
    assert result.reason == "no DKIM key for domain other.example"


def test_exact_domain_only(tmp_path):
    signer = DkimSigner([_key(tmp_path)])
    message = MESSAGE.replace(b"scanner@corp.example", b"scanner@sub.corp.example")
    result = signer.sign(message, envelope_sender="x@corp.example")
    assert not result.signed
    assert result.reason == "no DKIM key for domain sub.corp.example"


def _from(domain: str) -> bytes:
    return MESSAGE.replace(b"scanner@corp.example", f"scanner@{domain}".encode())


def test_a_subdomains_key_signs_a_subdomain_with_d_the_parent(tmp_path, loopback_dns):
    """`subdomains = true`: mail From alerts.corp.example (and deeper) is signed d=corp.example by
    that entry's key, and verifies against the parent's published key; the parent's other key
    (no `subdomains`) signs only the parent."""
    parent = _key(tmp_path, subdomains=True)
    rotation = _key(tmp_path, selector="s2")
    for key in (parent, rotation):
        _publish(loopback_dns, key)
    signer = DkimSigner([parent, rotation])
    for domain in ("alerts.corp.example", "a.b.corp.example"):
        result = signer.sign(_from(domain), envelope_sender="x@other.example")
        assert result.signed, result.reason
        assert (result.domain, result.selector) == ("corp.example", "s1")
        assert result.reason == (
            f"signed d=corp.example s=s1 a=rsa-sha256 for {domain} (subdomains = true)"
        )
        assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    own = signer.sign(MESSAGE, envelope_sender="x@corp.example")
    assert own.selector == "s1,s2"  # the parent itself: every key, as before
    # not a longer name that merely ends in the parent's, nor the parent's own parent
    for domain in ("xcorp.example", "example.com"):
        result = signer.sign(_from(domain), envelope_sender="")
        assert not result.signed and result.reason == f"no DKIM key for domain {domain}"


def test_a_subdomain_with_an_entry_of_its_own_is_decided_by_it(tmp_path, loopback_dns):
    """Its own key signs it; its own disabled or broken key leaves it unsigned (the parent's
    subdomains key does not step in); the nearest parent with `subdomains` wins."""
    parent = _key(tmp_path, subdomains=True)
    own = _key(tmp_path, domain="alerts.corp.example", selector="a1")
    nearer = _key(tmp_path, domain="eu.corp.example", selector="e1", subdomains=True)
    off = Key("off.corp.example", "x1", tmp_path / "nope.key", enabled=False)
    broken = Key("broken.corp.example", "b1", tmp_path / "nope.key")
    for key in (parent, own, nearer):
        _publish(loopback_dns, key)
    signer = DkimSigner([parent, own, nearer, off, broken], skip_unusable=True)
    result = signer.sign(_from("alerts.corp.example"), envelope_sender="")
    assert (result.signed, result.domain, result.selector) == (True, "alerts.corp.example", "a1")
    result = signer.sign(_from("paris.eu.corp.example"), envelope_sender="")
    assert (result.signed, result.domain, result.selector) == (True, "eu.corp.example", "e1")
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    result = signer.sign(_from("off.corp.example"), envelope_sender="")
    assert not result.signed
    assert result.reason == "DKIM key for domain off.corp.example is disabled (selector x1)"
    result = signer.sign(_from("broken.corp.example"), envelope_sender="")
    assert not result.signed
    assert result.reason == "DKIM key for domain broken.corp.example cannot be used (selector b1)"


def test_a_broken_subdomains_key_is_named_for_the_subdomain(tmp_path):
    missing = Key("corp.example", "s1", tmp_path / "nope.key", subdomains=True)
    signer = DkimSigner([missing], skip_unusable=True)
    result = signer.sign(_from("alerts.corp.example"), envelope_sender="")
    assert not result.signed and result.domain == "corp.example"
    assert result.reason == (
        "DKIM key for domain corp.example (which signs alerts.corp.example's mail) cannot be"
        " used (selector s1)"
    )


def test_disabled_key_is_not_used_and_not_loaded(tmp_path):
    key = Key("corp.example", "s1", tmp_path / "does-not-exist.key", enabled=False)
    result = DkimSigner([key]).sign(MESSAGE, envelope_sender="x@corp.example")
    assert not result.signed
    assert result.reason == "DKIM key for domain corp.example is disabled (selector s1)"


def test_skip_unusable_keeps_every_usable_key_signing(tmp_path, loopback_dns):
    """The running relay builds its signer with skip_unusable: a key that cannot be loaded (a
    rotation's new key not written yet) is left out and named; every other key still signs."""
    good = _key(tmp_path)
    other = _key(tmp_path, domain="other.example", selector="o1")
    for key in (good, other):
        _publish(loopback_dns, key)
    missing = Key("corp.example", "s2", tmp_path / "s2-not-yet.key")
    broken = Key("broken.example", "b1", tmp_path / "nope.key")
    with pytest.raises(DkimConfigError):
        DkimSigner([good, missing, other, broken])
    signer = DkimSigner([good, missing, other, broken], skip_unusable=True)
    assert signer.domains == ["corp.example", "other.example"]
    assert signer.selectors("corp.example") == ["s1"]
    assert len(signer.problems) == 2 and "s2-not-yet.key" in signer.problems[0]
    for domain, sender in (
        ("corp.example", "x@corp.example"),
        ("other.example", "y@other.example"),
    ):
        message = MESSAGE.replace(b"scanner@corp.example", sender.encode())
        result = signer.sign(message, envelope_sender=sender)
        assert result.signed and result.domain == domain and result.selector in ("s1", "o1")
        assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    result = signer.sign(
        MESSAGE.replace(b"scanner@corp.example", b"z@broken.example"),
        envelope_sender="z@broken.example",
    )
    assert not result.signed
    assert result.reason == "DKIM key for domain broken.example cannot be used (selector b1)"


def test_missing_from_falls_back_to_envelope_sender(tmp_path, loopback_dns):
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    message = b"To: a@external.example\r\nSubject: no from\r\n\r\nbody\r\n"
    result = DkimSigner([key]).sign(message, envelope_sender="printer@corp.example")
    assert result.signed, result.reason
    # dkimpy requires a From in h=; the absent From is signed as empty, so adding one breaks it
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)

    strict = DkimSigner([key], envelope_fallback=False)
    result = strict.sign(message, envelope_sender="printer@corp.example")
    assert not result.signed
    assert result.reason == "not signed: message has no From header"


@pytest.mark.parametrize(
    ("from_value", "why"),
    [
        ("a@corp.example, b@corp.example", "more than one address"),
        ("<a@corp.example> <b@corp.example>", "more than one address"),
        ("Undisclosed: ;", "group syntax"),
        ('"unterminated <a@corp.example>', "unbalanced"),
        ("a@[192.0.2.1]", "no usable domain"),
        ("no-at-sign", "no usable domain"),
        ("", "no address"),
    ],
)
def test_unusable_from_header(tmp_path, from_value, why):
    domain, reason = from_header_domain(from_value)
    assert domain is None and why in reason
    message = MESSAGE.replace(b"Scanner 3rd floor <scanner@corp.example>", from_value.encode())
    signer = DkimSigner([_key(tmp_path)], envelope_fallback=False)
    result = signer.sign(message, envelope_sender="scanner@corp.example")
    assert not result.signed and why in result.reason


@pytest.mark.parametrize(
    ("value", "domain"),
    [
        ("scanner@Corp.Example", "corp.example"),
        ("<scanner@corp.example>", "corp.example"),
        ('"Doe, John (3rd) <x>" <john@corp.example>', "corp.example"),
        ("john@corp.example (John Doe, Accounts)", "corp.example"),
        ("=?utf-8?q?J=C3=B6rg?= <joerg@corp.example>", "corp.example"),
        ("Jörg <joerg@bücher.example>", "xn--bcher-kva.example"),
    ],
)
def test_from_header_parser_accepts(value, domain):
    assert from_header_domain(value) == (domain, "")


def test_two_from_headers_fall_back_to_envelope(tmp_path, loopback_dns):
    message = b"From: a@corp.example\r\nFrom: b@corp.example\r\nSubject: x\r\n\r\nbody\r\n"
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    result = DkimSigner([key]).sign(message, envelope_sender="bounce@corp.example")
    assert result.signed and result.domain == "corp.example", result.reason
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    strict = DkimSigner([key], envelope_fallback=False)
    result = strict.sign(message, envelope_sender="x@corp.example")
    assert result.reason == "not signed: message has 2 From headers"
    # a device's unquoted comma in the display name: its only domain is the envelope's
    broken = MESSAGE.replace(b"Scanner 3rd floor <", b"Scanner, 3rd floor <")
    result = DkimSigner([key]).sign(broken, envelope_sender="scanner@corp.example")
    assert result.signed and result.domain == "corp.example", result.reason


@pytest.mark.parametrize(
    "froms",
    [
        [b"a@corp.example", b"ceo@bank.example"],  # the receiver may check one, show the other
        [b"ceo@bank.example, a@corp.example"],
        [b'"CEO" <ceo@bank.example> (unbalanced'],
    ],
    ids=["two-from-headers", "two-addresses", "unreadable"],
)
def test_the_envelope_domain_never_signs_a_from_of_another_domain(tmp_path, froms):
    """A From the strict parser cannot use fell back to the envelope sender's domain whatever
    the From said: corp.example's key signed mail From bank.example (with two From fields, the
    DMARC bypass of receivers that check one From and show the other). The fallback is for a
    From without a domain of its own; a From naming another domain goes out unsigned."""
    head = b"".join(b"From: " + value + b"\r\n" for value in froms)
    message = head + b"Subject: x\r\n\r\nbody\r\n"
    result = DkimSigner([_key(tmp_path)]).sign(message, envelope_sender="bounce@corp.example")
    assert not result.signed
    assert result.reason.endswith(
        "; From names bank.example, not the envelope sender's domain corp.example"
    ), result.reason


def test_a_from_line_in_the_body_of_a_message_without_an_empty_line_is_not_a_header(
    tmp_path, loopback_dns
):
    """The key was chosen from everything up to the first empty line, so in a message that has
    none a body line "From: ..." counted as a second From: the envelope sender's domain signed
    (other.example) although the message as sent, with the empty line put where its header ends,
    is From corp.example. The header ends for the choice where it ends for the signature."""
    corp, other = _key(tmp_path), _key(tmp_path, domain="other.example", selector="o1")
    _publish(loopback_dns, corp)
    message = (
        b"From: Scanner <scanner@corp.example>\r\nSubject: report\r\n"
        b"Forwarded report follows\r\nFrom: x@other.example\r\n"
    )
    result = DkimSigner([corp, other]).sign(message, envelope_sender="bounce@other.example")
    assert result.signed and result.domain == "corp.example", result.reason
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    strict = DkimSigner([corp], envelope_fallback=False)
    assert strict.sign(message, envelope_sender="bounce@other.example").signed


def test_null_envelope_sender_and_no_from(tmp_path):
    signer = DkimSigner([_key(tmp_path)])
    result = signer.sign(b"Subject: x\r\n\r\nbody\r\n", envelope_sender="")
    assert not result.signed
    assert result.reason == (
        "not signed: message has no From header; the envelope sender is empty (null sender)"
    )


def test_envelope_sender_domain_source(tmp_path, loopback_dns):
    key = _key(tmp_path, domain="relay.example")
    _publish(loopback_dns, key)
    signer = DkimSigner([key], domain_source="envelope_sender")
    result = signer.sign(MESSAGE, envelope_sender="bounces@relay.example")
    assert result.signed and result.domain == "relay.example"
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)


def test_signed_headers_default_and_only_present_ones(tmp_path):
    result = DkimSigner([_key(tmp_path)]).sign(MESSAGE, envelope_sender="x@corp.example")
    signature = result.data[: len(result.data) - len(MESSAGE)]
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", signature)
    signed = re.search(rb"h=([^;]+);", unfolded).group(1).replace(b" ", b"").split(b":")
    # the default list, limited to headers present, then the fields a message has at most once
    # again (oversigned), Reply-To (and From, Subject) even when absent
    present = [b"from", b"to", b"subject", b"date", b"message-id", b"mime-version", b"content-type"]
    assert signed == [
        *present,
        b"from", b"to", b"subject", b"date", b"message-id", b"reply-to", b"mime-version",
        b"content-type",
    ]  # fmt: skip
    assert DEFAULT_SIGNED_HEADERS[0] == "From"


def test_custom_headers_and_lf_only_message(tmp_path, loopback_dns):
    key = _key(tmp_path, headers=["Subject", "X-Device"])
    _publish(loopback_dns, key)
    message = MESSAGE.replace(b"\r\n", b"\n").replace(b"Subject:", b"X-Device: copier-7\nSubject:")
    result = DkimSigner([key]).sign(message, envelope_sender="x@corp.example")
    assert result.signed
    assert b"\r\n" not in result.data  # folded with the message's own line ending
    assert b"x-device" in result.data.split(b"\n\n")[0]
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)


def test_config_problems_are_collected(tmp_path):
    good = _key(tmp_path)
    problems = [
        Key("corp.example", "s1", good.key_file),  # duplicate
        Key("other.example", "s1", tmp_path / "missing.key"),
        Key("third.example", "s1", good.key_file, headers=["From", "Received"]),
        Key("fourth.example", "s1", good.key_file, algorithm="ed25519-sha256"),
        Key("fifth.example", "s1", None),
    ]
    with pytest.raises(DkimConfigError) as exc:
        DkimSigner([good, *problems])
    text = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 5
    assert "configured twice" in text
    assert "cannot read DKIM key" in text and "missing.key" in text
    assert "Received must not be signed" in text
    assert "needs an Ed25519 key" in text
    assert "key_file is not set" in text
    with pytest.raises(DkimConfigError, match="dkim_domain_source"):
        DkimSigner([], domain_source="header")


def test_from_config_uses_data_dir_default_path(tmp_path):
    write_key(tmp_path, "corp.example", "s1")

    @dataclass
    class Server:
        data_dir: Path
        dkim_domain_source: str = "header_from"

    @dataclass
    class Config:
        server: Server
        dkim: tuple

    signer = DkimSigner.from_config(Config(Server(tmp_path), (Key("corp.example", "s1", None),)))
    assert signer.domains == ["corp.example"]
    assert signer.selectors("corp.example") == ["s1"]
    assert signer.public_record("corp.example", "s1").startswith("v=DKIM1; k=rsa; p=")
    assert signer.sign(MESSAGE, envelope_sender="x@corp.example").signed


async def test_signed_message_through_an_smtp_sink_verifies(tmp_path, loopback_dns):
    """Sign, send over real SMTP on loopback (dot-stuffing, CRLF), verify what the sink got."""
    import aiosmtplib
    from aiosmtpd.smtp import SMTP

    received: list[bytes] = []

    class Sink:
        async def handle_DATA(self, server, session, envelope):
            received.append(envelope.original_content)
            return "250 OK"

    key = _key(tmp_path, algorithm="ed25519-sha256")
    _publish(loopback_dns, key)
    signer = DkimSigner([key])
    result = await asyncio.to_thread(signer.sign, MESSAGE, envelope_sender="scanner@corp.example")
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(Sink()), "127.0.0.1", 0)
    try:
        await aiosmtplib.send(
            result.data,
            sender="scanner@corp.example",
            recipients=["someone@external.example"],
            hostname="127.0.0.1",
            port=server.sockets[0].getsockname()[1],
            start_tls=False,
            use_tls=False,
        )
    finally:
        server.close()
        await server.wait_closed()
    assert received and b".leading dot line" in received[0]
    assert dkim.verify(received[0], dnsfunc=loopback_dns.txt_lookup)


def test_a_message_without_an_empty_line_is_signed_with_one_inserted(tmp_path, loopback_dns):
    """dkimpy refuses a header followed by a body line with no empty line ("Unexpected
    characters in RFC822 header"), and such a message went out unsigned. The empty line is put
    where the header ends (the session's rule, as Postfix's cleanup does) and the message as
    sent, with it, verifies; a message that is all header is signed as it is."""
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    head, _, body = MESSAGE.partition(b"\r\n\r\n")
    no_gap = head + b"\r\n" + body  # "Your scan is attached." right after the last field
    result = DkimSigner([key]).sign(no_gap, envelope_sender="scanner@corp.example")
    assert result.signed, result.reason
    assert result.data.endswith(MESSAGE), result.data[-200:]
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    all_header = head + b"\r\n"
    result = DkimSigner([key]).sign(all_header, envelope_sender="scanner@corp.example")
    assert result.signed and result.data.endswith(all_header), result.reason
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)


def test_a_field_name_with_white_space_before_its_colon_is_signed(tmp_path, loopback_dns):
    """RFC 5322's obsolete ``Subject : x`` (old devices write it; the session accepts it as a
    header field) made dkimpy refuse the message ("Unexpected characters in RFC822 header") and
    it went out unsigned; ``From : x`` alone (dkimpy skips it as an mbox "From " line) was
    signed as if there were no From, which fails at every verifier that reads the field. The
    space is dropped, as relaxed canonicalisation does anyway, and the message as sent
    verifies; a body line of that shape is left alone."""
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    message = (
        b"From : Scanner <scanner@corp.example>\r\nSubject\t: Scan\r\nTo: a@b.example\r\n\r\n"
        b"Note : body lines keep their space\r\n"
    )
    result = DkimSigner([key]).sign(message, envelope_sender="scanner@corp.example")
    assert result.signed and result.domain == "corp.example", result.reason
    assert result.data.endswith(
        b"From: Scanner <scanner@corp.example>\r\nSubject: Scan\r\nTo: a@b.example\r\n\r\n"
        b"Note : body lines keep their space\r\n"
    )
    assert dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)


def test_a_key_file_every_local_user_can_read_is_warned_about(tmp_path, loopback_dns, caplog):
    """A key_file copied with cp keeps 0644: every local user can then sign mail as the domain
    (OpenDKIM refuses such a key). The signer used it without a word; it still signs with it
    (refusing would send the domain's mail unsigned) but says so, naming the entry, the file,
    its mode and the fix. Group access is left alone (0640 root:relaygate is the packaged way)."""
    key = _key(tmp_path)
    _publish(loopback_dns, key)
    key.key_file.chmod(0o644)
    signer = DkimSigner([key])
    assert signer.sign(MESSAGE, envelope_sender="x@corp.example").signed
    (warning,) = signer.warnings
    assert warning.startswith("[[dkim]] corp.example selector s1: ")
    assert f"DKIM key {key.key_file} has mode 0644" in warning
    assert f"chmod o-rwx {key.key_file}" in warning
    # the running relay (start and reload) says it in the service log
    from types import SimpleNamespace

    from relaygate.queue.manager import build_signer

    config = SimpleNamespace(dkim=[key], server=SimpleNamespace(dkim_domain_source="header_from"))
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        assert build_signer(config) is not None
    assert [r.getMessage() for r in caplog.records] == [warning]
    key.key_file.chmod(0o640)
    assert DkimSigner([key]).warnings == []


def test_a_domain_signed_with_ed25519_only_is_warned_about(tmp_path, loopback_dns, caplog):
    """Gmail, Microsoft 365 and Yahoo do not verify ed25519-sha256 (Microsoft reports dkim=fail):
    a domain whose only key is Ed25519 has no DKIM pass there, and its mail fails DMARC under
    p=reject unless SPF aligns. It was signed without a word; the signer still signs (the
    signature is valid) but the service log says so at start and reload, naming the domain and
    the fix. RSA beside it (dual signing, RFC 8463) is not warned about."""
    ed_key = _key(tmp_path, selector="e1", algorithm="ed25519-sha256")
    _publish(loopback_dns, ed_key)
    signer = DkimSigner([ed_key])
    result = signer.sign(MESSAGE, envelope_sender="x@corp.example")
    assert result.signed and dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    (warning,) = signer.warnings
    assert warning.startswith("[[dkim]] corp.example: signed with Ed25519 only (selector e1)")
    assert "add an rsa-sha256 key" in warning
    from types import SimpleNamespace

    from relaygate.queue.manager import build_signer

    config = SimpleNamespace(
        dkim=[ed_key], server=SimpleNamespace(dkim_domain_source="header_from")
    )
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        assert build_signer(config) is not None
    assert [r.getMessage() for r in caplog.records] == [warning]
    assert DkimSigner([ed_key, _key(tmp_path, selector="r1")]).warnings == []


@pytest.mark.parametrize("bits", [1024, 4160])
def test_an_rsa_key_outside_rfc_8301_sizes_is_warned_about(tmp_path, loopback_dns, bits):
    """RFC 8301 §3.2: signers SHOULD use RSA keys of 2048 bits or more, and verifiers need only
    validate 1024 to 4096 bits. A 1024-bit key (old OpenDKIM setups) or an 8192-bit one was used
    without a word; it still signs, and the warning names the entry, the file, the size and the
    fix. A 2048-bit key (`relaygate dkim new`'s) is not warned about."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path = tmp_path / f"k{bits}.key"
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    key = Key("corp.example", "s1", path)
    _publish(loopback_dns, key)
    signer = DkimSigner([key])
    result = signer.sign(MESSAGE, envelope_sender="x@corp.example")
    assert result.signed and dkim.verify(result.data, dnsfunc=loopback_dns.txt_lookup)
    (warning,) = signer.warnings
    assert warning.startswith(
        f"[[dkim]] corp.example selector s1: DKIM key {path} is an RSA key of {bits} bits, "
    )
    assert ("under the 2048 bits" if bits < 2048 else "over the 4096 bits") in warning
    assert DkimSigner([_key(tmp_path, selector="s2")]).warnings == []


def test_the_rsa_signature_is_topmost_whatever_the_configuration_order(tmp_path, loopback_dns):
    """With an Ed25519 entry written before the RSA one (RFC 8463's dual signing, the new key
    added first), the Ed25519 signature was topmost: a verifier that checks only the first
    signature (dkimpy's dkim.verify) and cannot verify Ed25519 (dkimpy without PyNaCl; Microsoft
    365 reports dkim=fail) failed the message though its RSA signature was good. RSA signatures
    come first, each algorithm's in configuration order."""
    ed_key = _key(tmp_path, selector="e1", algorithm="ed25519-sha256")
    rsa_key = _key(tmp_path, selector="r1")
    _publish(loopback_dns, ed_key)
    _publish(loopback_dns, rsa_key)
    result = DkimSigner([ed_key, rsa_key]).sign(MESSAGE, envelope_sender="x@corp.example")
    assert result.signed and result.selector == "r1,e1"
    assert result.data.startswith(b"DKIM-Signature: v=1; a=rsa-sha256;")
    verifier = dkim.DKIM(result.data)
    assert verifier.verify(idx=0, dnsfunc=loopback_dns.txt_lookup)
    assert verifier.verify(idx=1, dnsfunc=loopback_dns.txt_lookup)
