"""MX / address lookups against a real DNS server on loopback (tests/support/dns_server.py)."""

from __future__ import annotations

import random
import socket
import time

import pytest

from relaygate import replies
from relaygate.delivery.dns import (
    CACHE_MAX_NEGATIVE_TTL,
    CACHE_MAX_TTL,
    AnswerCache,
    DnsError,
    Resolver,
    parse_dns_server,
)


def resolver_for(server, **kw) -> Resolver:
    return Resolver([server.address], lifetime=2.0, timeout=1.0, **kw)


def test_parse_dns_server():
    assert parse_dns_server("127.0.0.1") == ("127.0.0.1", 53)
    assert parse_dns_server("127.0.0.1:5353") == ("127.0.0.1", 5353)
    assert parse_dns_server("[::1]:5300") == ("::1", 5300)
    assert parse_dns_server("::1") == ("::1", 53)


async def test_mx_sorted_by_preference(loopback_dns):
    loopback_dns.add("corp.test", "MX", (20, "backup.corp.test"))
    loopback_dns.add("corp.test", "MX", (5, "primary.corp.test"))
    loopback_dns.add("corp.test", "MX", (10, "second.corp.test"))
    mx = await resolver_for(loopback_dns).mx("corp.test")
    assert mx == [(5, "primary.corp.test"), (10, "second.corp.test"), (20, "backup.corp.test")]


async def test_a_host_listed_twice_is_tried_once_at_its_best_preference(loopback_dns):
    """Duplicate MX records (the same host twice, or at two preferences) made the same host a
    next hop twice: a host that timed out was waited for twice (Postfix removes duplicates)."""
    loopback_dns.add("dup.test", "MX", (10, "mx.dup.test"))
    loopback_dns.add("dup.test", "MX", (30, "MX.dup.test"))
    loopback_dns.add("dup.test", "MX", (20, "backup.dup.test"))
    mx = await resolver_for(loopback_dns).mx("dup.test")
    assert mx == [(10, "mx.dup.test"), (20, "backup.dup.test")]


async def test_equal_preferences_are_shuffled(loopback_dns):
    for i in range(6):
        loopback_dns.add("eq.test", "MX", (10, f"mx{i}.eq.test"))
    loopback_dns.add("eq.test", "MX", (1, "first.eq.test"))
    seen = set()
    for seed in range(8):
        mx = await resolver_for(loopback_dns, rng=random.Random(seed)).mx("eq.test")
        assert mx[0] == (1, "first.eq.test")
        assert sorted(mx[1:]) == [(10, f"mx{i}.eq.test") for i in range(6)]
        seen.add(tuple(mx))
    assert len(seen) > 1


async def test_a_hosts_addresses_are_spread(loopback_dns):
    """A host with several addresses (a Microsoft 365 MX has a few) was always tried at the
    address its DNS server listed first: every connection went there, and while that address
    dropped connections each attempt waited for it first. They are shuffled now, per family
    (IPv4 still before IPv6), as Postfix's smtp_randomize_addresses does."""
    v4 = [f"192.0.2.{i}" for i in range(1, 7)]
    for ip in v4:
        loopback_dns.add("many.test", "A", ip)
    loopback_dns.add("many.test", "AAAA", "2001:db8::1")
    loopback_dns.add("many.test", "AAAA", "2001:db8::2")
    firsts = set()
    for seed in range(8):
        got = await resolver_for(loopback_dns, rng=random.Random(seed)).addresses("many.test")
        assert sorted(got[:6]) == v4 and sorted(got[6:]) == ["2001:db8::1", "2001:db8::2"]
        firsts.add(got[0])
    assert len(firsts) > 1


async def test_no_mx_gives_implicit_mx(loopback_dns):
    loopback_dns.add("plain.test", "A", "127.0.0.9")
    r = resolver_for(loopback_dns)
    assert await r.mx("plain.test") == [(0, "plain.test")]
    assert await r.addresses("plain.test") == ["127.0.0.9"]


async def test_null_mx_is_permanent(loopback_dns):
    loopback_dns.add("nomail.test", "MX", (0, "."))
    with pytest.raises(DnsError) as info:
        await resolver_for(loopback_dns).mx("nomail.test")
    assert info.value.permanent
    assert info.value.reply == replies.NULL_MX
    assert info.value.reply.line().startswith("550 5.1.10")


async def test_nxdomain_is_permanent(loopback_dns):
    with pytest.raises(DnsError) as info:
        await resolver_for(loopback_dns).mx("missing.test")
    assert info.value.permanent
    assert info.value.reply.line() == (
        "550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain"
    )


async def test_servfail_is_transient(loopback_dns):
    loopback_dns.add("broken.test", "MX", (10, "mx.broken.test"))
    loopback_dns.set_servfail("broken.test")
    with pytest.raises(DnsError) as info:
        await resolver_for(loopback_dns).mx("broken.test")
    assert not info.value.permanent
    assert info.value.reply.line() == "451 4.4.0 DNS query failed. The error was: ServerFailure"


async def test_timeout_is_transient_error_retry():
    # a UDP socket that never answers
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        port = silent.getsockname()[1]
        r = Resolver([f"127.0.0.1:{port}"], timeout=0.2, lifetime=0.4)
        with pytest.raises(DnsError) as info:
            await r.mx("slow.test")
    assert not info.value.permanent
    assert info.value.reply == replies.dns_query_failed("ErrorRetry")


async def test_addresses_ipv4_first_and_prefer_ipv6(loopback_dns):
    loopback_dns.add("dual.test", "AAAA", "::1")
    loopback_dns.add("dual.test", "A", "127.0.0.2")
    assert await resolver_for(loopback_dns).addresses("dual.test") == ["127.0.0.2", "::1"]
    assert await resolver_for(loopback_dns, prefer_ipv6=True).addresses("dual.test") == [
        "::1",
        "127.0.0.2",
    ]


async def test_addresses_of_literals_need_no_dns(loopback_dns):
    r = resolver_for(loopback_dns)
    assert await r.addresses("[127.0.0.5]") == ["127.0.0.5"]
    assert await r.addresses("[IPv6:::1]") == ["::1"]
    assert await r.addresses("10.1.2.3") == ["10.1.2.3"]
    assert loopback_dns.queries == []


async def test_addresses_nodata_is_empty_and_nxdomain_raises(loopback_dns):
    loopback_dns.add("txtonly.test", "TXT", "hello")
    r = resolver_for(loopback_dns)
    assert await r.addresses("txtonly.test") == []
    with pytest.raises(DnsError) as info:
        await r.addresses("nohost.test")
    assert info.value.permanent


async def test_from_config(loopback_dns):
    class Server:
        dns_servers = (loopback_dns.address,)

    class Config:
        server = Server()

    loopback_dns.add("cfg.test", "MX", (10, "mx.cfg.test"))
    assert await Resolver.from_config(Config(), lifetime=2.0).mx("cfg.test") == [
        (10, "mx.cfg.test")
    ]


async def test_mx_records_naming_ip_addresses_are_skipped(loopback_dns):
    """An MX target must be a host name (RFC 1035 §3.3.9). One written as an address was taken for
    a host and connected to; Postfix and Exim skip such records."""
    loopback_dns.add("mixed.test", "MX", (5, "192.0.2.7."))
    loopback_dns.add("mixed.test", "MX", (7, "[192.0.2.8]."))
    loopback_dns.add("mixed.test", "MX", (10, "mx.mixed.test"))
    assert await resolver_for(loopback_dns).mx("mixed.test") == [(10, "mx.mixed.test")]


async def test_only_mx_records_naming_ip_addresses_is_transient(loopback_dns):
    loopback_dns.add("numeric.test", "MX", (10, "127.0.0.9."))
    loopback_dns.add("numeric.test", "A", "127.0.0.10")
    with pytest.raises(DnsError) as info:
        await resolver_for(loopback_dns).mx("numeric.test")
    assert not info.value.permanent
    assert info.value.reply.line() == (
        "451 4.4.0 DNS query failed. The error was: the MX records name IP addresses, not hosts"
    )


@pytest.mark.parametrize("resolv_conf", ["empty", "missing"])
async def test_a_system_resolver_without_servers_defers_lookups_saying_why(
    tmp_path, resolv_conf: str
):
    """No server.dns_servers and a resolv.conf that is empty or missing: dnspython refuses to
    build a resolver (NoResolverConfiguration), which stopped the relay's start with a
    traceback. The resolver is built; each lookup fails for now, naming the file and the key."""
    path = tmp_path / "resolv.conf"
    if resolv_conf == "empty":
        path.write_text("", encoding="utf-8")
    resolver = Resolver(resolv_conf=str(path), lifetime=2.0, timeout=1.0)
    with pytest.raises(DnsError) as info:
        await resolver.mx("corp.test")
    assert not info.value.permanent
    assert info.value.reply.code == 451
    assert f"no DNS server: {path}" in info.value.reply.text
    assert "server.dns_servers" in info.value.reply.text
    with pytest.raises(DnsError):
        await resolver.addresses("mx.corp.test")


class Clock:
    """time.time() made to stand still, moved on by the test (dnspython dates its cache by it)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(time, "time", fake)
    return fake


def asked(server, name: str, rtype: str) -> int:
    return sum(1 for n, t, _ in list(server.queries) if (n, t) == (name, rtype))


async def test_answers_are_kept_for_their_ttl_at_most_an_hour(loopback_dns, clock):
    """A record of a day is asked for again after an hour (CACHE_MAX_TTL): a record changed at
    the far end is used within the hour. One of a minute, after its minute."""
    loopback_dns.ttl = 86400
    loopback_dns.add("day.test", "A", "192.0.2.1")
    r = resolver_for(loopback_dns)
    for step in (0, CACHE_MAX_TTL - 1):
        clock.now += step
        assert await r.addresses("day.test") == ["192.0.2.1"]
        assert asked(loopback_dns, "day.test", "A") == 1
    clock.now += 2
    await r.addresses("day.test")
    assert asked(loopback_dns, "day.test", "A") == 2
    loopback_dns.ttl = 60
    loopback_dns.add("minute.test", "MX", (10, "mx.minute.test"))
    for step, count in ((0, 1), (59, 1), (2, 2)):
        clock.now += step
        assert await r.mx("minute.test") == [(10, "mx.minute.test")]
        assert asked(loopback_dns, "minute.test", "MX") == count


async def test_a_negative_answer_is_kept_five_minutes_at_most(loopback_dns, clock):
    """An NXDOMAIN returns the mail to its sender: one whose SOA says a day is kept 300 s
    (CACHE_MAX_NEGATIVE_TTL), so a domain just created is not refused for a day. NODATA too."""
    loopback_dns.ttl = 86400
    loopback_dns.add("v4only.test", "A", "192.0.2.1")
    r = resolver_for(loopback_dns)
    for step, count in ((0, 1), (CACHE_MAX_NEGATIVE_TTL - 1, 1), (2, 2)):
        clock.now += step
        with pytest.raises(DnsError) as info:
            await r.mx("new.test")
        assert info.value.permanent
        assert await r.addresses("v4only.test") == ["192.0.2.1"]
        assert asked(loopback_dns, "new.test", "MX") == count
        assert asked(loopback_dns, "v4only.test", "AAAA") == count  # NODATA
    loopback_dns.add("new.test", "MX", (10, "mx.new.test"))
    clock.now += CACHE_MAX_NEGATIVE_TTL + 1
    assert await r.mx("new.test") == [(10, "mx.new.test")]


async def test_a_servfail_or_a_timeout_is_not_kept(loopback_dns):
    loopback_dns.add("broken.test", "MX", (10, "mx.broken.test"))
    loopback_dns.set_servfail("broken.test")
    r = resolver_for(loopback_dns)
    for _ in range(2):
        with pytest.raises(DnsError) as info:
            await r.mx("broken.test")
        assert not info.value.permanent
    assert asked(loopback_dns, "broken.test", "MX") == 2
    loopback_dns.clear_overrides("broken.test")
    assert await r.mx("broken.test") == [(10, "mx.broken.test")]
    assert await r.mx("broken.test") == [(10, "mx.broken.test")]
    assert asked(loopback_dns, "broken.test", "MX") == 3


async def test_a_resolver_given_is_used_as_it_is(loopback_dns):
    """A test that passes its own dnspython resolver gets it as it is: no cache is added."""
    loopback_dns.add("given.test", "A", "192.0.2.9")
    r = Resolver(resolver=loopback_dns.resolver())
    for _ in range(2):
        assert await r.addresses("given.test") == ["192.0.2.9"]
    assert asked(loopback_dns, "given.test", "A") == 2
    assert r.dnspython_resolver.cache is None
    assert isinstance(resolver_for(loopback_dns).dnspython_resolver.cache, AnswerCache)
