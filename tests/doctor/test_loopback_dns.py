"""The loopback DNS server the other tests rely on behaves like a real authority."""

from __future__ import annotations

import dns.asyncresolver
import dns.flags
import dns.message
import dns.query
import dns.resolver
import pytest

from tests.support.dns_server import LoopbackDNS
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401


async def test_record_types_and_rcodes(loopback_dns):
    loopback_dns.add("example.org", "MX", (10, "mx.example.org"))
    loopback_dns.add("example.org", "MX", "20 mx2.example.org.")
    loopback_dns.add("mx.example.org", "A", "192.0.2.1")
    loopback_dns.add("mx.example.org", "AAAA", "2001:db8::1")
    loopback_dns.add("www.example.org", "CNAME", "mx.example.org")
    loopback_dns.add("s1._domainkey.example.org", "TXT", "v=DKIM1; p=")
    resolver = loopback_dns.resolver()
    assert isinstance(resolver, dns.asyncresolver.Resolver)
    mx = await resolver.resolve("example.org", "MX")
    assert sorted((r.preference, r.exchange.to_text()) for r in mx) == [
        (10, "mx.example.org."),
        (20, "mx2.example.org."),
    ]
    assert [r.address for r in await resolver.resolve("mx.example.org", "AAAA")] == ["2001:db8::1"]
    via_cname = await resolver.resolve("www.example.org", "A")
    assert [r.address for r in via_cname] == ["192.0.2.1"]
    assert via_cname.canonical_name.to_text() == "mx.example.org."
    with pytest.raises(dns.resolver.NoAnswer):  # exists, no record of the type
        await resolver.resolve("example.org", "A")
    with pytest.raises(dns.resolver.NoAnswer):  # empty non-terminal
        await resolver.resolve("_domainkey.example.org", "TXT")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("nothing.example.org", "A")
    loopback_dns.set_nxdomain("mx.example.org")
    with pytest.raises(dns.resolver.NXDOMAIN):
        await resolver.resolve("mx.example.org", "A")
    loopback_dns.set_servfail("mx.example.org", "AAAA")  # one type only
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        await resolver.resolve("mx.example.org", "AAAA")
    loopback_dns.clear_overrides("mx.example.org")
    assert [r.address for r in await resolver.resolve("mx.example.org", "A")] == ["192.0.2.1"]
    assert [r.address for r in await resolver.resolve("mx.example.org", "AAAA")] == ["2001:db8::1"]
    loopback_dns.set_servfail("example.org")
    with pytest.raises(dns.resolver.NoNameservers, match="SERVFAIL"):
        await resolver.resolve("example.org", "MX")


def test_long_txt_is_chunked_and_truncation_falls_back_to_tcp(loopback_dns):
    value = "v=DKIM1; k=rsa; p=" + "A" * 1000
    loopback_dns.add("big.example.org", "TXT", value)
    loopback_dns.add("parts.example.org", "TXT", ("one", "two"))
    answer = loopback_dns.sync_resolver().resolve("big.example.org", "TXT")
    strings = answer[0].strings
    assert [len(s) for s in strings] == [255, 255, 255, 253]
    assert b"".join(strings).decode() == value
    assert loopback_dns.txt_lookup(b"parts.example.org") == b"onetwo"
    transports = [t for n, q, t in loopback_dns.queries if n == "big.example.org"]
    assert transports == ["udp", "tcp"]

    # a plain 512-byte UDP client sees TC set
    query = dns.message.make_query("big.example.org", "TXT", use_edns=False)
    reply = dns.query.udp(query, "127.0.0.1", port=loopback_dns.port, timeout=2)
    assert reply.flags & dns.flags.TC and not reply.answer
    reply = dns.query.tcp(query, "127.0.0.1", port=loopback_dns.port, timeout=2)
    assert reply.flags & dns.flags.AA and reply.answer


def test_constructor_records_context_manager_and_address():
    with LoopbackDNS({"a.example": [("A", "192.0.2.7"), ("TXT", "hello")]}) as server:
        assert server.address == f"127.0.0.1:{server.port}" and server.port > 0
        assert server.sync_resolver().resolve("A.EXAMPLE.", "A")[0].address == "192.0.2.7"
        server.remove("a.example", "TXT")
        with pytest.raises(dns.resolver.NoAnswer):
            server.sync_resolver().resolve("a.example", "TXT")
    with pytest.raises(ValueError, match="unsupported record type"):
        LoopbackDNS({"a.example": [("SRV", "x")]})


@pytest.mark.parametrize("name", ["mx.example.org", "nothing.example.org", "alias.example.org"])
def test_a_negative_answer_carries_the_zones_soa_with_the_servers_ttl(name: str) -> None:
    """NODATA (also at the end of a CNAME) and NXDOMAIN come with the zone's SOA, as from a real
    authority (RFC 2308 §3): a caching resolver keeps them for its TTL and minimum, the server's
    ttl, rather than for a default of its own (dnspython's: 300 s)."""
    records = {
        "mx.example.org": [("A", "192.0.2.1")],
        "alias.example.org": [("CNAME", "mx.example.org")],
    }
    with LoopbackDNS(records, ttl=7) as server:
        reply = dns.query.udp(
            dns.message.make_query(name, "AAAA"), "127.0.0.1", port=server.port, timeout=2
        )
        (soa,) = reply.authority
        assert soa.name.to_text() == "example.org." and soa.ttl == 7 and soa[0].minimum == 7
        assert reply.resolve_chaining().minimum_ttl == 7
