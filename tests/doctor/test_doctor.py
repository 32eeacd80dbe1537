"""The DNS doctor against a real loopback DNS server: a healthy domain and every failure of issue 5."""

from __future__ import annotations

import pytest

from relaygate import public_suffix, replies
from relaygate.delivery.dns import MX_NAMES_ADDRESSES
from relaygate.dkim.keys import generate_key
from relaygate.doctor import (
    Report,
    authorise_ip,
    diagnose,
    org_domain,
    parse_tags,
    pyspf_hook,
    spf_syntax_problems,
    zone_txt,
)
from tests.support.dns_server import LoopbackDNS
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401

DOMAIN = "corp.example"
RELAY_IP = "203.0.113.7"
SPF = "v=spf1 mx include:_spf.corp.example ip4:203.0.113.7 -all"
DMARC = "v=DMARC1; p=reject; rua=mailto:dmarc@corp.example"


@pytest.fixture(scope="module")
def keys() -> tuple[str, str]:
    """Two RSA public records: the relay's key and an unrelated one."""
    return generate_key("rsa-sha256")[1], generate_key("rsa-sha256")[1]


def healthy(server: LoopbackDNS, local_record: str) -> None:
    server.add(DOMAIN, "MX", (10, "mx1.corp.example"))
    server.add(DOMAIN, "MX", (20, "mx2.corp.example"))
    server.add("mx1.corp.example", "A", "192.0.2.10")
    server.add("mx2.corp.example", "AAAA", "2001:db8::25")
    server.add(DOMAIN, "TXT", "google-site-verification=abc")
    server.add(DOMAIN, "TXT", SPF)
    server.add("_spf.corp.example", "TXT", "v=spf1 ip4:198.51.100.0/24 -all")
    server.add("s1._domainkey.corp.example", "TXT", local_record)
    server.add("_dmarc.corp.example", "TXT", DMARC)


async def run(server: LoopbackDNS, local_record: str | None, **kw) -> Report:
    kw.setdefault("relay_ip", RELAY_IP)
    kw.setdefault("selector", "s1")
    return await diagnose(
        kw.pop("domain", DOMAIN),
        resolver=server.resolver(),
        local_dkim_public=local_record,
        **kw,
    )


def only(report: Report, check: str, severity: str | None = None):
    found = report.by_check(check)
    if severity is not None:
        found = [f for f in found if f.severity == severity]
    assert len(found) == 1, [f.to_dict() for f in report.by_check(check)]
    return found[0]


def severities(report: Report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for f in report.findings:
        out.setdefault(f.check, []).append(f.severity)
    return out


async def test_healthy_domain(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0])
    assert not report.has_errors, report.to_dict()
    assert report.worst == "ok"
    assert severities(report) == {
        "MX": ["ok"],
        "SPF": ["ok", "ok"],
        "DKIM": ["ok"],
        "DMARC": ["ok"],
    }
    assert only(report, "MX").summary == "MX: 10 mx1.corp.example, 20 mx2.corp.example"
    spf_findings = report.by_check("SPF")
    assert spf_findings[0].summary == "SPF record is valid and needs 2 of 10 DNS lookups"
    assert spf_findings[1].summary == f"SPF authorises {RELAY_IP} (pass)"
    assert "matches the relay's rsa key" in only(report, "DKIM").summary
    assert only(report, "DMARC").summary == "DMARC p=reject; relayed mail aligns via SPF and DKIM"
    data = report.to_dict()
    assert data["counts"] == {"ok": 5, "info": 0, "warning": 0, "error": 0}
    assert set(data["findings"][0]) == {"check", "severity", "summary", "detail", "fix"}
    # every lookup went to the loopback server, and pyspf's hook is released afterwards
    assert (DOMAIN, "TXT", "udp") in loopback_dns.queries
    assert pyspf_hook._spf_lookup.get() is None


async def test_no_mx_and_no_address(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    report = await run(loopback_dns, keys[0])
    mx = only(report, "MX", "error")
    assert "has no MX and no A record" in mx.summary
    assert "550 5.1.8" in mx.summary
    assert f"{DOMAIN}. 3600 IN MX 10" in mx.fix


async def test_no_mx_but_address_is_a_warning(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    loopback_dns.add(DOMAIN, "A", "192.0.2.80")
    report = await run(loopback_dns, keys[0])
    assert "implicit MX" in only(report, "MX", "warning").summary
    assert not report.has_errors


async def test_no_mx_and_only_a_loopback_address_is_an_error_mail_waits(loopback_dns, keys):
    """The implicit MX on a loopback address is not connected to, as an MX host there is not
    (451 4.4.4 SpecialAddress): the doctor only warned that the A record is used."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    loopback_dns.add(DOMAIN, "A", "127.0.0.1")
    mx = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert mx.summary == (
        f"{DOMAIN} has no MX record, and its own address, which senders would use instead "
        "(implicit MX), is one mail is not sent to: 127.0.0.1"
    )
    assert replies.MX_SPECIAL_ADDRESS.line() in mx.detail


async def test_null_mx(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    loopback_dns.add(DOMAIN, "MX", (0, "."))
    mx = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert "null MX" in mx.summary and "550 5.7.27" in mx.summary


async def test_mx_host_without_address(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("mx2.corp.example")
    mx = only(await run(loopback_dns, keys[0]), "MX", "warning")
    assert mx.summary == "MX host(s) without an address: mx2.corp.example"


async def test_no_mx_host_with_an_address_is_an_error_mail_bounces(loopback_dns, keys):
    """When no MX host has an address, mail to the domain is returned to its senders at once
    (RelayGate's next hops: 550 5.4.4; Postfix and Exim bounce too): an error, saying so. It was
    a warning saying the mail queues with 451 4.4.0."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("mx1.corp.example")
    loopback_dns.remove("mx2.corp.example")
    mx = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert mx.summary == "MX host(s) without an address: mx1.corp.example, mx2.corp.example"
    assert replies.DNS_NONEXISTENT_DOMAIN.line() in mx.detail
    assert "451" not in mx.detail


async def test_mx_records_naming_ip_addresses_say_what_delivery_does(loopback_dns, keys):
    """An MX naming an IP address is skipped by senders (RFC 1035 wants a host name); when
    every MX does, RelayGate keeps the mail queued with 451 4.4.0 (the domain's owner may fix
    the records). The doctor looked the address up as a host name, found none and said mail
    is returned at once (550 5.4.4)."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    loopback_dns.add(DOMAIN, "MX", (10, "192.0.2.10"))
    mx = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert mx.summary == "MX record(s) naming an IP address instead of a host: 192.0.2.10"
    assert replies.dns_query_failed(MX_NAMES_ADDRESSES).line() in mx.detail
    assert "550" not in mx.detail
    # beside a host that resolves: a warning (that host takes the mail)
    loopback_dns.add(DOMAIN, "MX", (20, "mx1.corp.example"))
    mx = only(await run(loopback_dns, keys[0]), "MX", "warning")
    assert mx.summary == "MX record(s) naming an IP address instead of a host: 192.0.2.10"


async def test_mx_hosts_on_special_addresses_say_what_delivery_does(loopback_dns, keys):
    """An MX host whose every address is loopback, link-local, multicast, unspecified or
    reserved is not connected to (451 4.4.4 SMTPSEND.DNS.SpecialAddress, the mail waits until it
    expires). The doctor said 'ok' since the host resolves."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("mx1.corp.example")
    loopback_dns.remove("mx2.corp.example")
    loopback_dns.add("mx1.corp.example", "A", "127.0.0.1")
    loopback_dns.add("mx2.corp.example", "AAAA", "::1")
    loopback_dns.add("mx2.corp.example", "A", "169.254.169.254")
    mx = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert mx.summary == (
        "MX host(s) on addresses mail is not sent to (loopback, link-local, multicast, "
        "unspecified or reserved): mx1.corp.example (127.0.0.1), "
        "mx2.corp.example (169.254.169.254, ::1)"
    )
    assert replies.MX_SPECIAL_ADDRESS.line() in mx.detail
    # beside a host with a usable address: a warning (that host takes the mail)
    loopback_dns.remove("mx2.corp.example")
    loopback_dns.add("mx2.corp.example", "AAAA", "2001:db8::25")
    mx = only(await run(loopback_dns, keys[0]), "MX", "warning")
    assert mx.summary.endswith(": mx1.corp.example (127.0.0.1)")
    assert replies.MX_SPECIAL_ADDRESS.line() not in mx.detail


async def test_nxdomain(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], domain="missing.example")
    mx = only(report, "MX", "error")
    assert "does not exist in DNS (NXDOMAIN)" in mx.summary
    assert "550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain" in mx.summary
    assert severities(report) == {
        "MX": ["error"],
        "SPF": ["info"],
        "DKIM": ["info"],
        "DMARC": ["info"],
    }


async def test_servfail(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.set_servfail(DOMAIN)
    report = await run(loopback_dns, keys[0])
    mx = only(report, "MX", "error")
    assert mx.summary == (
        "MX lookup for corp.example failed: 451 4.4.0 DNS query failed. The error was: ServerFailure"
    )
    spf_finding = only(report, "SPF", "error")
    assert "ServerFailure" in spf_finding.summary and "temperror" in spf_finding.summary


async def test_timeout_is_error_retry(keys):
    # a loopback port nobody answers on: the query times out
    server = LoopbackDNS()
    server.start()
    resolver = server.resolver(lifetime=0.5)
    server.stop()
    report = await diagnose(
        DOMAIN, resolver=resolver, relay_ip=None, selector=None, local_dkim_public=None
    )
    assert "The error was: ErrorRetry" in only(report, "MX", "error").summary


async def test_spf_missing(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    report = await run(loopback_dns, keys[0])
    finding = only(report, "SPF", "error")
    assert finding.summary.startswith(
        "corp.example has no SPF record: external recipients will answer 550 5.7.23 / 550 5.7.1"
    )
    assert finding.fix == 'corp.example. 3600 IN TXT "v=spf1 ip4:203.0.113.7 -all"'
    # the relay's IP cannot be authorised, but DKIM still aligns
    assert only(report, "DMARC").severity == "ok"
    assert only(report, "DMARC").summary.endswith("aligns via DKIM")


async def test_spf_without_relay_ip_and_the_fix_works(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    record = "v=spf1 mx ip4:198.51.100.1 ~all"
    loopback_dns.add(DOMAIN, "TXT", record)
    report = await run(loopback_dns, keys[0])
    finding = only(report, "SPF", "error")
    assert finding.summary == (
        "external recipients will answer 550 5.7.23 / 550 5.7.1 because SPF does not "
        "authorise 203.0.113.7 (SPF softfail)"
    )
    fixed = "v=spf1 ip4:203.0.113.7 mx ip4:198.51.100.1 ~all"
    assert finding.fix == f'corp.example. 3600 IN TXT "{fixed}"'
    # publishing exactly the suggested record makes pyspf pass
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", fixed)
    report = await run(loopback_dns, keys[0])
    assert report.by_check("SPF")[-1].summary == "SPF authorises 203.0.113.7 (pass)"


async def test_spf_hard_fail_wording(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 -all")
    finding = only(await run(loopback_dns, keys[0]), "SPF", "error")
    assert "(SPF fail)" in finding.summary
    assert finding.fix.endswith('"v=spf1 ip4:203.0.113.7 -all"')


async def test_spf_ipv6_relay(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], relay_ip="2001:db8:1::7")
    assert '"v=spf1 ip6:2001:db8:1::7 mx ' in only(report, "SPF", "error").fix


async def test_spf_over_ten_lookups(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    includes = " ".join(f"include:s{i}.corp.example" for i in range(4))
    loopback_dns.add(DOMAIN, "TXT", f"v=spf1 {includes} ip4:203.0.113.7 -all")
    for i in range(4):
        loopback_dns.add(f"s{i}.corp.example", "TXT", "v=spf1 a mx exists:x.corp.example -all")
    report = await run(loopback_dns, keys[0])
    finding = only(report, "SPF", "error")
    assert finding.summary == (
        "SPF record of corp.example needs 16 DNS lookups (limit 10): receivers stop with SPF "
        "permerror and answer 550 5.7.23 / 550 5.7.1"
    )
    assert "include:s0.corp.example (4)" in finding.detail
    assert "ip4:203.0.113.7" in finding.fix
    # pyspf agrees (permerror before it reaches ip4:), so only DKIM aligns
    assert severities(report)["SPF"] == ["error"]
    assert only(report, "DMARC").summary.endswith("aligns via DKIM")


async def test_spf_over_ten_lookups_but_relay_matches_first(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    includes = " ".join(f"include:s{i}.corp.example" for i in range(4))
    loopback_dns.add(DOMAIN, "TXT", f"v=spf1 ip4:203.0.113.7 {includes} -all")
    for i in range(4):
        loopback_dns.add(f"s{i}.corp.example", "TXT", "v=spf1 a mx exists:x.corp.example -all")
    report = await run(loopback_dns, keys[0])
    assert severities(report)["SPF"] == ["error", "ok"]
    assert "before the lookup limit" in only(report, "SPF", "ok").detail


async def test_spf_multiple_records(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 include:spf.protection.outlook.com -all")
    finding = only(await run(loopback_dns, keys[0]), "SPF", "error")
    assert "has 2 SPF records" in finding.summary and "permerror" in finding.summary
    assert "include:spf.protection.outlook.com" in finding.fix
    assert finding.fix.count("v=spf1") == 1


async def test_spf_syntax_error(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 ip4:203.0.113.300 inclde:foo.example -all")
    finding = only(await run(loopback_dns, keys[0]), "SPF", "error")
    assert "is invalid" in finding.summary
    assert "not an IP address" in finding.detail and "unknown mechanism 'inclde'" in finding.detail


async def test_spf_include_without_record(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("_spf.corp.example")
    finding = only(await run(loopback_dns, keys[0]), "SPF", "error")
    assert "include:_spf.corp.example has no SPF record" in finding.detail


async def test_spf_not_evaluated_without_relay_ip(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], relay_ip=None)
    assert "pass --relay-ip" in only(report, "SPF", "info").summary
    assert only(report, "DMARC").severity == "ok"  # DKIM aligns


async def test_dkim_missing(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("s1._domainkey.corp.example")
    finding = only(await run(loopback_dns, keys[0]), "DKIM", "error")
    assert finding.summary.startswith("no DKIM record at s1._domainkey.corp.example")
    assert "550 5.7.509" in finding.summary
    assert finding.fix == "Publish: " + zone_txt("s1._domainkey.corp.example", keys[0])


async def test_dkim_key_mismatch(loopback_dns, keys):
    healthy(loopback_dns, keys[1])  # DNS has another key than the relay's
    report = await run(loopback_dns, keys[0])
    finding = only(report, "DKIM", "error")
    assert finding.summary.startswith("DKIM key mismatch at s1._domainkey.corp.example")
    assert keys[0].split("p=")[1][:200] in finding.fix.replace('" "', "")
    # SPF still aligns, so DMARC passes
    assert only(report, "DMARC").summary.endswith("aligns via SPF")


async def test_dkim_revoked_and_garbage(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("s1._domainkey.corp.example")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", "v=DKIM1; k=rsa; p=")
    assert "revoked" in only(await run(loopback_dns, keys[0]), "DKIM", "error").summary
    loopback_dns.remove("s1._domainkey.corp.example")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", "v=DKIM1; k=rsa; p=AAAA")
    assert (
        "not an RSA public key" in only(await run(loopback_dns, keys[0]), "DKIM", "error").summary
    )


async def test_dkim_ed25519_and_bare_public_key(loopback_dns):
    record = generate_key("ed25519-sha256")[1]
    healthy(loopback_dns, record)
    report = await run(loopback_dns, record.split("p=")[1])
    assert "matches the relay's ed25519 key" in only(report, "DKIM", "ok").summary


async def test_dkim_no_selector_is_a_warning(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, None, selector=None)
    assert "not DKIM-signed" in only(report, "DKIM", "warning").summary
    assert only(report, "DMARC").summary.endswith("aligns via SPF")


async def test_dkim_published_but_no_local_key(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, None)
    assert "no local key to compare" in only(report, "DKIM", "info").summary


async def test_dmarc_missing(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("_dmarc.corp.example")
    finding = only(await run(loopback_dns, keys[0]), "DMARC", "warning")
    assert finding.summary.startswith("corp.example has no DMARC record")
    assert finding.fix == (
        '_dmarc.corp.example. 3600 IN TXT "v=DMARC1; p=none; rua=mailto:dmarc-reports@corp.example"'
    )


async def test_dmarc_reject_with_unaligned_from(loopback_dns, keys):
    """SPF does not authorise the relay and the relay does not sign: p=reject bites."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 mx -all")
    report = await run(loopback_dns, None, selector=None)
    finding = only(report, "DMARC", "error")
    assert finding.summary == (
        "receivers will reject relayed mail (550 5.7.509 / DMARC): neither SPF nor DKIM aligns "
        "with From: @corp.example (p=reject)"
    )
    assert '"v=spf1 ip4:203.0.113.7 mx -all"' in finding.fix
    assert "relaygate dkim new --domain corp.example" in finding.fix


async def test_dmarc_unaligned_envelope_domain(loopback_dns, keys):
    """SPF passes for the relay's bounce domain, but that is not the From domain."""
    healthy(loopback_dns, keys[0])
    loopback_dns.add("bounces.relay.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    report = await run(loopback_dns, None, selector=None, envelope_domain="bounces.relay.example")
    finding = only(report, "DMARC", "error")
    assert "neither SPF nor DKIM aligns" in finding.summary
    assert "bounces.relay.example does not align" in finding.detail
    # with a matching DKIM key it aligns again
    report = await run(loopback_dns, keys[0], envelope_domain="bounces.relay.example")
    assert only(report, "DMARC").summary.endswith("aligns via DKIM")


async def test_dmarc_quarantine_and_none(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("_dmarc.corp.example")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=quarantine; pct=50")
    loopback_dns.remove(DOMAIN, "TXT")
    report = await run(loopback_dns, None, selector=None)
    finding = only(report, "DMARC", "error")
    assert finding.summary.startswith(
        "receivers will quarantine relayed mail (550 5.7.509 / DMARC)"
    )
    assert "pct=50" in finding.detail
    loopback_dns.remove("_dmarc.corp.example")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=none")
    assert (
        "p=none" in only(await run(loopback_dns, None, selector=None), "DMARC", "warning").summary
    )


async def test_dmarc_inherited_from_organisational_domain(loopback_dns, keys):
    loopback_dns.add("scan.corp.example", "MX", (10, "mx1.corp.example"))
    loopback_dns.add("mx1.corp.example", "A", "192.0.2.10")
    loopback_dns.add("scan.corp.example", "TXT", "v=spf1 -all")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=none; sp=reject")
    report = await run(loopback_dns, None, domain="scan.corp.example", selector=None)
    finding = only(report, "DMARC", "error")
    assert "(p=reject (inherited from corp.example))" in finding.summary


async def test_dmarc_invalid_and_duplicate(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("_dmarc.corp.example")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; rua=mailto:x@corp.example")
    assert "is invalid" in only(await run(loopback_dns, keys[0]), "DMARC", "error").summary
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=none")
    assert "2 DMARC records" in only(await run(loopback_dns, keys[0]), "DMARC", "error").summary


# ------------------------------------------------------------------------- pure helpers
@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 -all",
        "v=spf1",
        "v=spf1 ip4:192.0.2.0/24 ip6:2001:db8::/32 a mx/24 a:mail.example.org//64 ~all",
        "v=spf1 include:_spf.google.com exists:%{i}._spf.example.org ?all",
        "v=spf1 redirect=_spf.example.org",
        "V=SPF1 MX -ALL",
    ],
)
def test_spf_syntax_valid(record):
    assert spf_syntax_problems(record) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ("v=spf2 -all", "must start with 'v=spf1'"),
        ("v=spf1 ip4:192.0.2.0/33", "bad prefix length"),
        ("v=spf1 ip4:2001:db8::1", "ip4 with an IPv6 address"),
        ("v=spf1 include", "include needs a domain"),
        ("v=spf1 all:foo", "takes no argument"),
        ("v=spf1 redirect=a.example redirect=b.example", "redirect= appears 2 times"),
        ("v=spf1 ptr/24", "ptr takes no prefix length"),
        ("v=spf1 exists:%{z}.example", "exists needs a domain"),
    ],
)
def test_spf_syntax_problems(record, problem):
    assert any(problem in p for p in spf_syntax_problems(record)), spf_syntax_problems(record)


def test_authorise_ip():
    assert authorise_ip("v=spf1 mx -all", "192.0.2.1") == "v=spf1 ip4:192.0.2.1 mx -all"
    assert authorise_ip("v=spf1", "192.0.2.1") == "v=spf1 ip4:192.0.2.1"
    assert (
        authorise_ip("v=spf1 ip4:192.0.2.0/28 +ip6:2001:db8::/32 mx -all", "192.0.2.99")
        == "v=spf1 ip4:192.0.2.0/28 +ip6:2001:db8::/32 ip4:192.0.2.99 mx -all"
    )
    assert (
        authorise_ip("v=spf1 ~ip4:192.0.2.0/24 -all", "192.0.2.1")
        == "v=spf1 ip4:192.0.2.1 ~ip4:192.0.2.0/24 -all"
    )
    assert (
        authorise_ip("v=spf1 redirect=_spf.example", "2001:db8::1")
        == "v=spf1 ip6:2001:db8::1 redirect=_spf.example"
    )


def test_zone_txt_splits_long_values():
    value = "v=DKIM1; k=rsa; p=" + "A" * 400
    line = zone_txt("s1._domainkey.corp.example", value)
    assert line.startswith('s1._domainkey.corp.example. 3600 IN TXT ( "v=DKIM1')
    assert line.count('"') == 4
    assert zone_txt("x.example.", 'a"b') == 'x.example. 3600 IN TXT "a\\"b"'


def test_parse_tags():
    assert parse_tags("v=DKIM1; k=rsa; p=AB CD") == {"v": "DKIM1", "k": "rsa", "p": "ABCD"}
    assert parse_tags("v=DMARC1; p=none; p=reject") is None
    assert parse_tags("garbage") is None


# ------------------------------------------------------------- adversarial review (session 21)


async def test_dmarc_spf_alignment_checks_the_envelope_domains_own_spf(loopback_dns, keys):
    """Receivers check SPF for the MAIL FROM domain: the From domain's SPF passing proves nothing."""
    healthy(loopback_dns, keys[0])
    loopback_dns.add("bounces.corp.example", "TXT", "v=spf1 -all")
    report = await run(loopback_dns, None, selector=None, envelope_domain="bounces.corp.example")
    finding = only(report, "DMARC", "error")
    assert "neither SPF nor DKIM aligns" in finding.summary
    assert "SPF: fail for 203.0.113.7 at bounces.corp.example" in finding.detail
    assert "bounces.corp.example. 3600 IN TXT" in finding.fix
    # once the envelope domain authorises the relay, SPF aligns (relaxed: same organisation)
    loopback_dns.remove("bounces.corp.example", "TXT")
    loopback_dns.add("bounces.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    report = await run(loopback_dns, None, selector=None, envelope_domain="bounces.corp.example")
    assert only(report, "DMARC").summary == "DMARC p=reject; relayed mail aligns via SPF"


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("h=sha1", "h=sha1 does not allow sha256"),
        ("s=tlsrpt", "s=tlsrpt: the key is not for email"),
    ],
)
async def test_dkim_record_that_refuses_the_relays_signatures(loopback_dns, keys, extra, problem):
    """RFC 6376 §3.6.1/§6.1.2: h= without sha256 or s= without email/* makes every signature fail."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("s1._domainkey.corp.example")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", f"{keys[0]}; {extra}")
    report = await run(loopback_dns, keys[0])
    finding = only(report, "DKIM", "error")
    assert problem in finding.summary, finding.summary
    assert only(report, "DMARC").summary.endswith("aligns via SPF")  # not via DKIM
    # the usual spellings are accepted
    loopback_dns.remove("s1._domainkey.corp.example")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", f"{keys[0]}; h=sha1:sha256; s=email")
    assert only(await run(loopback_dns, keys[0]), "DKIM").severity == "ok"


@pytest.fixture
def suffix_list(tmp_path, monkeypatch):
    """A small Public Suffix List in place of the system's, so results do not depend on it."""
    path = tmp_path / "public_suffix_list.dat"
    path.write_text("// ===BEGIN ICANN DOMAINS===\nuk\nco.uk\nexample\n*.ck\n!www.ck\n")
    monkeypatch.setattr(public_suffix, "PUBLIC_SUFFIX_LIST", path)
    return path


def test_org_domain_follows_the_public_suffix_list(suffix_list):
    public_suffix.suffix_rules(suffix_list)  # what diagnose() does in a thread
    org = org_domain._org_domain
    assert org("mail.example.co.uk") == "example.co.uk"
    assert org("example.co.uk") == "example.co.uk"
    assert org("a.b.corp.example") == "corp.example"
    assert org("mail.shop.foo.ck") == "shop.foo.ck"  # *.ck: foo.ck is a public suffix
    assert org("mail.www.ck") == "www.ck"  # !www.ck: an exception to *.ck
    assert org("a.b.unlisted") == "b.unlisted"  # the default rule "*"


async def test_dmarc_organisational_domain_under_a_multi_label_public_suffix(
    loopback_dns, suffix_list
):
    """mail.example.co.uk inherits _dmarc.example.co.uk (the org domain), not _dmarc.co.uk."""
    loopback_dns.add("mail.example.co.uk", "MX", (10, "mx1.example.co.uk"))
    loopback_dns.add("mx1.example.co.uk", "A", "192.0.2.10")
    loopback_dns.add("mail.example.co.uk", "TXT", "v=spf1 -all")
    loopback_dns.add("_dmarc.example.co.uk", "TXT", "v=DMARC1; p=reject")
    report = await run(loopback_dns, None, domain="mail.example.co.uk", selector=None)
    finding = only(report, "DMARC", "error")
    assert "(p=reject (inherited from example.co.uk))" in finding.summary
    assert ("_dmarc.co.uk", "TXT", "udp") not in loopback_dns.queries


async def test_dmarc_relaxed_alignment_does_not_join_two_organisations(loopback_dns, suffix_list):
    """relay.co.uk and customer.co.uk share only the public suffix: SPF does not align."""
    loopback_dns.add("customer.co.uk", "MX", (10, "mx1.customer.co.uk"))
    loopback_dns.add("mx1.customer.co.uk", "A", "192.0.2.10")
    loopback_dns.add("customer.co.uk", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    loopback_dns.add("relay.co.uk", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    loopback_dns.add("_dmarc.customer.co.uk", "TXT", "v=DMARC1; p=reject")
    report = await run(
        loopback_dns, None, domain="customer.co.uk", selector=None, envelope_domain="relay.co.uk"
    )
    finding = only(report, "DMARC", "error")
    assert "relay.co.uk does not align with customer.co.uk" in finding.detail


async def test_ipv4_mapped_relay_ip_is_the_ipv4_address(loopback_dns, keys):
    """Receivers see ::ffff:192.0.2.99 as 192.0.2.99 (RFC 7208 §5): the fix must be ip4:."""
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], relay_ip="::ffff:192.0.2.99")
    assert report.relay_ip == "192.0.2.99"
    finding = only(report, "SPF", "error")
    assert "does not authorise 192.0.2.99 (SPF fail)" in finding.summary
    assert '"v=spf1 ip4:192.0.2.99 mx ' in finding.fix and "ip6:" not in finding.fix


async def test_mx_host_lookup_failure_is_a_dns_error_not_a_missing_address(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.set_servfail("mx2.corp.example")
    report = await run(loopback_dns, keys[0])
    finding = only(report, "MX", "warning")  # mx1 still resolves; if none does, an error
    assert finding.summary == (
        "address lookup for MX host mx2.corp.example failed: 451 4.4.0 DNS query failed. "
        "The error was: ServerFailure"
    )
    assert "without an address" not in finding.summary


async def test_implicit_mx_lookup_failure_is_a_dns_error(loopback_dns, keys):
    """No MX, and the A lookup of the implicit MX fails: a DNS error, not 'no A record'."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "MX")
    loopback_dns.set_servfail(DOMAIN, "A")
    finding = only(await run(loopback_dns, keys[0]), "MX", "error")
    assert finding.summary == (
        "corp.example has no MX record and the address lookup for the implicit MX failed: "
        "451 4.4.0 DNS query failed. The error was: ServerFailure"
    )


async def test_spf_include_that_fails_to_resolve_is_a_temperror(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.set_servfail("_spf.corp.example")
    report = await run(loopback_dns, keys[0], relay_ip="198.51.100.9")
    finding = report.by_check("SPF")[0]
    assert finding.severity == "error"
    assert "temperror" in finding.summary and "permerror" not in finding.summary, finding.summary
    assert "include:_spf.corp.example: 451 4.4.0" in finding.detail


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 ?ip4:203.0.113.0/24 -all",  # an earlier neutral term matches the relay
        "v=spf1 -include:_spf.corp.example ~all",  # an earlier -include matches it
    ],
)
async def test_the_suggested_spf_record_makes_the_relay_pass(loopback_dns, keys, record):
    """The fix puts ip4:RELAY before any term that could match the relay first (or cost a lookup)."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", record)
    loopback_dns.remove("_spf.corp.example")
    loopback_dns.add("_spf.corp.example", "TXT", "v=spf1 ip4:203.0.113.0/24 -all")
    report = await run(loopback_dns, keys[0])
    finding = report.by_check("SPF")[-1]
    assert finding.severity == "error" and "203.0.113.7" in finding.summary
    fixed = finding.fix.split('"')[1]
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", fixed)
    report = await run(loopback_dns, keys[0])
    assert report.by_check("SPF")[-1].summary == "SPF authorises 203.0.113.7 (pass)", fixed


@pytest.mark.parametrize("all_term", ["+all", "all", "+ALL"])
async def test_spf_that_authorises_every_address_is_a_warning(loopback_dns, keys, all_term):
    """'+all' makes the relay pass, but also every spoofer: not a healthy record."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", f"v=spf1 mx {all_term}")
    report = await run(loopback_dns, keys[0])
    finding = only(report, "SPF", "warning")
    assert finding.summary.startswith(
        f"SPF record of corp.example ends in '{all_term}': it authorises every IP address"
    )
    assert finding.fix == 'corp.example. 3600 IN TXT "v=spf1 ip4:203.0.113.7 mx -all"'
    assert report.by_check("SPF")[-1].summary == "SPF authorises 203.0.113.7 (pass)"


async def test_dmarc_record_is_recognised_by_its_v_tag_not_a_prefix(loopback_dns, keys):
    """RFC 7489 §6.6.3: only records whose first tag is v=DMARC1 count; 'v=DMARC10' is not one."""
    healthy(loopback_dns, keys[0])
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC10; p=none")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1x")
    report = await run(loopback_dns, keys[0])
    assert only(report, "DMARC").summary == "DMARC p=reject; relayed mail aligns via SPF and DKIM"
    loopback_dns.remove("_dmarc.corp.example")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v = DMARC1 ; p = quarantine")
    report = await run(loopback_dns, keys[0])
    assert only(report, "DMARC").summary.startswith("DMARC p=quarantine;")


async def test_mx_host_that_is_an_alias_is_a_warning(loopback_dns, keys):
    """RFC 2181 §10.3: an MX names a host, not an alias; some senders refuse a CNAME there."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("mx2.corp.example")
    loopback_dns.add("mx2.corp.example", "CNAME", "mail.provider.example")
    loopback_dns.add("mail.provider.example", "A", "192.0.2.26")
    finding = only(await run(loopback_dns, keys[0]), "MX", "warning")
    assert finding.summary == (
        "MX host(s) that are aliases (CNAME): mx2.corp.example -> mail.provider.example"
    )
    assert "MX 20 mail.provider.example." in finding.fix


async def test_dkim_alignment_of_another_signing_domain_follows_adkim(loopback_dns, keys):
    """d=mail.corp.example aligns with From corp.example under adkim=r, not under adkim=s."""
    healthy(loopback_dns, keys[0])
    loopback_dns.add("s1._domainkey.mail.corp.example", "TXT", keys[0])
    report = await run(loopback_dns, keys[0], relay_ip=None, signing_domain="mail.corp.example")
    assert "s1._domainkey.mail.corp.example matches" in only(report, "DKIM", "ok").summary
    assert only(report, "DMARC").summary == "DMARC p=reject; relayed mail aligns via DKIM"
    loopback_dns.remove("_dmarc.corp.example")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=reject; adkim=s")
    report = await run(loopback_dns, keys[0], relay_ip=None, signing_domain="mail.corp.example")
    finding = only(report, "DMARC", "warning")  # SPF not evaluated (no --relay-ip)
    assert "d=mail.corp.example, which does not align with corp.example (adkim=s)" in (
        finding.detail
    )


async def test_null_mx_next_to_mail_hosts_is_a_warning(loopback_dns, keys):
    """RFC 7505 §3: a null MX must be the only MX; mixed, senders disagree on what it means."""
    healthy(loopback_dns, keys[0])
    loopback_dns.add(DOMAIN, "MX", (0, "."))
    finding = only(await run(loopback_dns, keys[0]), "MX", "warning")
    assert finding.summary == (
        "corp.example publishes a null MX next to mail hosts (10 mx1.corp.example, "
        "20 mx2.corp.example): RFC 7505 forbids it, and senders that honour the null MX "
        f"refuse mail to the domain ({replies.NULL_MX.line()})"
    )
    assert "Remove the null MX" in finding.fix


@pytest.mark.parametrize("private_ip", ["10.0.0.5", "192.168.1.20", "100.64.0.9", "fd00::25"])
async def test_private_relay_ip_is_a_warning(loopback_dns, keys, private_ip):
    """Receivers never see a private address: an SPF verdict for it says nothing."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 ip4:10.0.0.0/8 ip4:192.168.0.0/16 ip4:100.64.0.0/10 "
                     "ip6:fd00::/8 -all")  # fmt: skip
    report = await run(loopback_dns, keys[0], relay_ip=private_ip)
    finding = only(report, "SPF", "warning")
    assert finding.summary == (
        f"--relay-ip {private_ip} is a private address: receivers see the relay's public (NAT) "
        "address, or the smart host's, so this SPF verdict does not apply to them"
    )


async def test_dkim_record_without_a_key_is_unusable_not_missing(loopback_dns, keys):
    """A v=DKIM1 record with no p= tag is there, but unusable (RFC 6376 §3.6.1: p= is required)."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove("s1._domainkey.corp.example")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", "v=DKIM1; k=rsa")
    finding = only(await run(loopback_dns, keys[0]), "DKIM", "error")
    assert finding.summary == (
        "DKIM record at s1._domainkey.corp.example is unusable (no p= tag: the record holds no "
        "key): receivers report dkim=permerror"
    )


async def test_internationalised_domain_is_checked_and_fixed_as_a_labels(loopback_dns):
    """Zone files and the signer's d= use A-labels: bücher.example is xn--bcher-kva.example."""
    loopback_dns.add("xn--bcher-kva.example", "MX", (10, "mx1.xn--bcher-kva.example"))
    loopback_dns.add("mx1.xn--bcher-kva.example", "A", "192.0.2.10")
    loopback_dns.add("xn--bcher-kva.example", "TXT", "v=spf1 ip4:192.0.2.1 -all")
    loopback_dns.add("_dmarc.xn--bcher-kva.example", "TXT", "v=DMARC1; p=reject")
    report = await run(
        loopback_dns, None, domain="BÜCHER.example", selector=None,
        envelope_domain="xn--bcher-kva.example",
    )  # fmt: skip
    assert report.domain == report.envelope_domain == "xn--bcher-kva.example"
    spf_fix = only(report, "SPF", "error").fix
    assert (
        spf_fix == 'xn--bcher-kva.example. 3600 IN TXT "v=spf1 ip4:192.0.2.1 ip4:203.0.113.7 -all"'
    )
    dmarc = only(report, "DMARC", "error")
    assert "does not align" not in dmarc.detail  # the same domain in two spellings
    assert "SPF: fail for 203.0.113.7" in dmarc.detail


@pytest.mark.parametrize(
    "record",
    [
        "v=spf1 a:foo-.example.com -all",  # RFC 7208 §7.1: labels are macro-literals
        "v=spf1 include:my+host.example.com -all",
        "v=spf1 a:-x.example.com mx:mail.example.c-m -all",  # toplabel with an inner hyphen
        "v=spf1 include:_spf.example.com. -all",  # a final dot
    ],
)
def test_spf_domain_specs_the_abnf_allows(record):
    """Receivers (pyspf among them) accept these: calling them permerror would be a wrong fail."""
    assert spf_syntax_problems(record) == []


@pytest.mark.parametrize(
    ("record", "problem"),
    [
        ("v=spf1 a:host.example.123 -all", "'host.example.123' is not a domain"),  # toplabel
        ("v=spf1 include:localhost -all", "include needs a domain"),
        ("v=spf1 a:mail..example.com -all", "'mail..example.com' is not a domain"),
    ],
)
def test_spf_domain_specs_the_abnf_refuses(record, problem):
    assert any(problem in p for p in spf_syntax_problems(record)), spf_syntax_problems(record)


async def test_spf_section_checks_the_envelope_domain_receivers_check(loopback_dns, keys):
    """With --envelope-domain, receivers evaluate that domain's SPF record: the From domain's
    record failing the relay is no reason for 'recipients will answer 550' (nor exit 1)."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 mx -all")  # does not authorise the relay
    loopback_dns.add("bounces.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    report = await run(loopback_dns, keys[0], envelope_domain="bounces.corp.example")
    assert not report.has_errors, [f.to_dict() for f in report.findings]
    assert severities(report)["SPF"] == ["info", "ok", "ok"]
    assert report.by_check("SPF")[0].summary == (
        "SPF checked for the envelope (MAIL FROM) domain bounces.corp.example: receivers "
        "evaluate its record, not corp.example's"
    )
    assert report.by_check("SPF")[1].detail == "Record: v=spf1 ip4:203.0.113.7 -all"
    assert only(report, "DMARC").summary.endswith("aligns via SPF and DKIM")


async def test_spf_terms_after_all_cost_no_lookup(loopback_dns, keys):
    """Evaluation stops at 'all' (RFC 7208 §5.1): what follows is never looked up or counted."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    after = " ".join(f"a:h{i}.corp.example" for i in range(11))
    loopback_dns.add(DOMAIN, "TXT", f"v=spf1 ip4:203.0.113.7 -all {after}")
    report = await run(loopback_dns, keys[0])
    assert severities(report)["SPF"] == ["ok", "ok"], [f.to_dict() for f in report.findings]
    assert report.by_check("SPF")[0].summary == "SPF record is valid and needs 0 of 10 DNS lookups"


# RFC 7208 §7.3: %{l} is the local part of the MAIL FROM address, %{i} the client IP, %{d} the
# domain. A record of this kind authorises each sender of the domain by name.
PER_SENDER_SPF = "v=spf1 exists:%{l}.%{i}._spf.%{d} -all"


@pytest.mark.parametrize(
    ("sender", "authorised", "result"),
    [
        ("scanner@corp.example", "scanner", "pass"),  # postmaster is not authorised, scanner is
        ("noreply@corp.example", "postmaster", "fail"),  # postmaster is, noreply is not
    ],
)
async def test_spf_macros_are_expanded_for_the_relays_envelope_sender(
    loopback_dns, keys, sender, authorised, result
):
    """The SPF verdict is the one receivers reach for the relay's MAIL FROM address, whose local
    part the %{l} macro names: not the one for postmaster@ the doctor used to check."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", PER_SENDER_SPF)
    loopback_dns.add(f"{authorised}.{RELAY_IP}._spf.corp.example", "A", "127.0.0.2")
    report = await run(loopback_dns, keys[0], envelope_sender=sender)
    assert report.envelope_sender == sender
    verdict = report.by_check("SPF")[-1]
    if result == "pass":
        assert verdict.summary == f"SPF authorises {RELAY_IP} (pass)", verdict.to_dict()
        assert only(report, "DMARC").summary.endswith("aligns via SPF and DKIM")
    else:
        assert verdict.severity == "error", verdict.to_dict()
        assert verdict.summary.endswith(f"does not authorise {RELAY_IP} (SPF fail)")
        assert f"for {sender}" in verdict.detail
    assert f"{sender.partition('@')[0]}.{RELAY_IP}._spf.corp.example" in {
        name for name, _, _ in loopback_dns.queries
    }


async def test_spf_that_depends_on_the_sender_warns_when_no_sender_is_known(loopback_dns, keys):
    """Without --sender the doctor cannot know the local part %{l} stands for: it says which
    address it evaluated the record for, and how to name the real one."""
    healthy(loopback_dns, keys[0])
    loopback_dns.remove(DOMAIN, "TXT")
    loopback_dns.add(DOMAIN, "TXT", "v=spf1 include:_spf.corp.example -all")
    loopback_dns.remove("_spf.corp.example", "TXT")
    loopback_dns.add("_spf.corp.example", "TXT", "v=spf1 exists:%{l}.%{i}._spf.%{o} -all")
    loopback_dns.add(f"postmaster.{RELAY_IP}._spf.corp.example", "A", "127.0.0.2")
    report = await run(loopback_dns, keys[0])
    warning = only(report, "SPF", "warning")
    assert warning.summary == (
        "the SPF verdict for corp.example depends on the sender's address (%{l} in "
        "_spf.corp.example's record): checked for postmaster@corp.example only"
    )
    assert "--sender" in warning.fix
    assert report.by_check("SPF")[-1].summary == f"SPF authorises {RELAY_IP} (pass)"


SIGNED_MESSAGE = (
    b"From: Scanner <scanner@corp.example>\r\n"
    b"To: someone@external.example\r\n"
    b"Subject: Scanned document\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
    b"Message-ID: <scan-1@corp.example>\r\n"
    b"\r\n"
    b"Your scan is attached.\r\n"
)


@pytest.fixture(scope="module", params=["rsa-sha256", "ed25519-sha256"])
def signed(request, tmp_path_factory) -> tuple[str, str, bytes]:
    """(key type, the relay's public record, a message the relay signed with s1 of corp.example)."""
    from relaygate.dkim.keys import load_private_key, write_key
    from relaygate.dkim.signer import DkimSigner

    algorithm = request.param
    folder = tmp_path_factory.mktemp("dkim")
    path = write_key(folder, DOMAIN, "s1", algorithm)

    class Key:  # a [[dkim]] entry
        domain, selector, key_file, headers, enabled = DOMAIN, "s1", path, [], True

    Key.algorithm = algorithm  # type: ignore[attr-defined]
    result = DkimSigner([Key]).sign(SIGNED_MESSAGE, envelope_sender="scanner@corp.example")
    assert result.signed, result.reason
    return algorithm.partition("-")[0], load_private_key(path, algorithm).record, result.data


def _key_record_variants(key_type: str, p: str) -> dict[str, str | tuple[str, ...]]:
    half = len(p) // 2
    return {
        "as generated": f"v=DKIM1; k={key_type}; p={p}",
        # RFC 6376 §3.2: tag names are case-sensitive; an unknown tag is ignored (§3.6.1), so
        # K= leaves k= at its default, rsa
        "K=": f"v=DKIM1; K={key_type}; p={p}",
        "P=": f"v=DKIM1; k={key_type}; P={p}",
        "V=": f"V=DKIM1; k={key_type}; p={p}",
        "k= in capitals": f"v=DKIM1; k={key_type.upper()}; p={p}",
        "p= folded over TXT strings": (f"v=DKIM1; k={key_type}; p={p[:half]}", f" {p[half:]}\t"),
        "p= twice": f"v=DKIM1; k={key_type}; p={p}; p={p}",
    }


@pytest.mark.parametrize(
    "variant",
    ["as generated", "K=", "P=", "V=", "k= in capitals", "p= folded over TXT strings", "p= twice"],
)
async def test_dkim_key_record_is_read_as_receivers_read_it(loopback_dns, signed, variant):
    """The doctor calls the published record good exactly when dkimpy's verifier (a receiver)
    verifies the relay's signature with it."""
    import dkim

    key_type, local_record, message = signed
    p = parse_tags(local_record)["p"]  # type: ignore[index]
    healthy(loopback_dns, local_record)
    loopback_dns.remove("s1._domainkey.corp.example", "TXT")
    loopback_dns.add(
        "s1._domainkey.corp.example", "TXT", _key_record_variants(key_type, p)[variant]
    )
    verified = dkim.verify(message, dnsfunc=loopback_dns.txt_lookup)
    report = await run(loopback_dns, local_record)
    # the record's finding (an Ed25519-only domain has a warning about that beside it)
    (finding,) = [f for f in report.by_check("DKIM") if "s1._domainkey.corp.example" in f.summary]
    assert (finding.severity == "ok") == verified, (verified, finding.to_dict())
    if variant == "P=":
        assert "tag names are case-sensitive (RFC 6376 §3.2): P= is not p=" in finding.summary


async def test_another_txt_record_at_the_selector_name_is_an_error(loopback_dns, signed):
    """RFC 6376 §3.6.2.2: several TXT records at a selector name give undefined results; dkimpy
    takes the first one, which may be the other record."""
    import dkim

    _, local_record, message = signed
    healthy(loopback_dns, local_record)
    loopback_dns.remove("s1._domainkey.corp.example", "TXT")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", "site-verification=0123456789")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", local_record)
    assert not dkim.verify(message, dnsfunc=loopback_dns.txt_lookup)
    finding = only(await run(loopback_dns, local_record), "DKIM")
    assert finding.severity == "error", finding.to_dict()
    assert finding.summary == (
        "2 TXT records at s1._domainkey.corp.example: receivers may pick either and fail the "
        "signature"
    )


# -- the HELO identity (RFC 7208 §2.3): what receivers check for the relay's NDRs and DSNs ------

HELO = "relay.corp.example"


async def test_helo_name_authorising_the_relay_is_ok(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.add(HELO, "TXT", "v=spf1 ip4:203.0.113.0/24 -all")
    report = await run(loopback_dns, keys[0], helo_names={HELO: ["Internet"]})
    finding = only(report, "HELO", "ok")
    assert finding.summary == f"SPF for the HELO name {HELO} authorises {RELAY_IP} (pass)"
    assert [f.check for f in report.findings] == ["MX", "SPF", "SPF", "HELO", "DKIM", "DMARC"]


async def test_helo_name_without_spf_record_is_a_warning_and_the_fix_works(loopback_dns, keys):
    """Before, the doctor checked the envelope domain only: a relay whose HELO name has no SPF
    record was reported healthy, and its NDRs (MAIL FROM:<>, checked by HELO alone) get SPF none."""
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], helo_names={HELO: ["Internet", "Backup"]})
    finding = only(report, "HELO", "warning")
    assert finding.summary == (
        f"the HELO name {HELO} has no SPF record: the relay's NDRs and DSNs (MAIL FROM:<>, "
        "checked by the HELO name alone) get SPF none"
    )
    assert 'send connectors "Internet", "Backup" say EHLO relay.corp.example' in finding.detail
    assert finding.fix == f'{HELO}. 3600 IN TXT "v=spf1 ip4:203.0.113.7 -all"'
    loopback_dns.add(HELO, "TXT", "v=spf1 ip4:203.0.113.7 -all")
    report = await run(loopback_dns, keys[0], helo_names={HELO: ["Internet"]})
    assert only(report, "HELO").severity == "ok"


async def test_helo_name_whose_spf_fails_the_relay_is_a_warning(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.add(HELO, "TXT", "v=spf1 a -all")
    loopback_dns.add(HELO, "A", "192.0.2.99")
    report = await run(loopback_dns, keys[0], helo_names={HELO: ["Internet"]})
    finding = only(report, "HELO", "warning")
    assert finding.summary == (
        f"SPF for the HELO name {HELO} does not authorise {RELAY_IP} (SPF fail): the relay's "
        "NDRs and DSNs (MAIL FROM:<>, checked by the HELO name alone) fail SPF"
    )
    assert finding.fix == f'{HELO}. 3600 IN TXT "v=spf1 ip4:203.0.113.7 a -all"'
    assert not report.has_errors  # the envelope domain's SPF passes: ordinary mail is fine


async def test_helo_name_without_relay_ip_is_checked_for_a_record(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], relay_ip=None, helo_names={HELO: ["Internet"]})
    assert "has no SPF record" in only(report, "HELO", "warning").summary
    loopback_dns.add(HELO, "TXT", "v=spf1 ip4:203.0.113.7 -all")
    report = await run(loopback_dns, keys[0], relay_ip=None, helo_names={HELO: ["Internet"]})
    assert only(report, "HELO", "info").summary == (
        f"SPF for the HELO name {HELO} not evaluated for the relay: pass --relay-ip with the "
        "relay's public IP"
    )


async def test_helo_name_that_is_not_a_domain_is_a_warning(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    report = await run(loopback_dns, keys[0], helo_names={"relay01": ["Internet"]})
    finding = only(report, "HELO", "warning")
    assert finding.summary == (
        "the HELO name relay01 is not a fully qualified domain name: receivers cannot check SPF "
        "for the relay's NDRs and DSNs (MAIL FROM:<>), and many refuse such a HELO"
    )
    assert "fqdn" in finding.fix


async def test_helo_lookup_failure_is_a_warning(loopback_dns, keys):
    healthy(loopback_dns, keys[0])
    loopback_dns.set_servfail(HELO)
    report = await run(loopback_dns, keys[0], helo_names={HELO: ["Internet"]})
    assert only(report, "HELO", "warning").summary.startswith(
        f"SPF lookup for the HELO name {HELO} failed"
    )


async def test_a_domain_signed_with_ed25519_only_does_not_align_via_dkim(loopback_dns):
    """Gmail, Microsoft 365 and Yahoo do not verify ed25519-sha256 (neutral, fail, permerror):
    with only an Ed25519 key, the doctor said DMARC "aligns via DKIM" while those receivers
    refuse the mail under p=reject unless SPF passes. The record is still right (ok), but the
    doctor warns about the Ed25519-only signing and DMARC aligns via RSA keys only."""
    record = generate_key("ed25519-sha256")[1]
    healthy(loopback_dns, record)
    report = await run(loopback_dns, record, relay_ip=None)
    dkim_findings = {f.severity: f for f in report.by_check("DKIM")}
    assert "matches the relay's ed25519 key" in dkim_findings["ok"].summary
    warning = dkim_findings["warning"]
    assert warning.summary.startswith("corp.example is DKIM-signed with Ed25519 only: Gmail,")
    assert "rsa-sha256" in warning.fix and "relaygate dkim new --domain corp.example" in warning.fix
    dmarc = only(report, "DMARC")
    assert dmarc.severity == "warning", dmarc.to_dict()
    assert "DKIM does not align" in dmarc.summary
    assert "signs corp.example with Ed25519 only" in dmarc.detail
    # beside an RSA key (dual signing) DKIM aligns, and no warning
    rsa_record = generate_key("rsa-sha256")[1]
    loopback_dns.add("s2._domainkey.corp.example", "TXT", rsa_record)
    both = await run(
        loopback_dns,
        None,
        relay_ip=None,
        selector=None,
        dkim_keys=[("s1", record), ("s2", rsa_record)],
    )
    assert [f.severity for f in both.by_check("DKIM")] == ["ok", "ok"]
    assert only(both, "DMARC").summary.endswith("aligns via DKIM")
