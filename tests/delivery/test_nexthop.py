"""Next hops: smart hosts in order, MX by preference, implicit MX, loop detection."""

from __future__ import annotations

import ipaddress

import pytest

from relaygate import replies
from relaygate.delivery.dns import Resolver
from relaygate.delivery.nexthop import (
    MX_SPECIAL_ADDRESS,
    NextHop,
    NextHopError,
    is_local_endpoint,
    parse_smart_host,
    resolve_next_hops,
)

from .helpers import Connector

OURS = {("0.0.0.0", 25), ("127.0.0.1", 2525)}


def res(server) -> Resolver:
    return Resolver([server.address], lifetime=2.0, timeout=1.0)


def test_parse_smart_host():
    assert parse_smart_host("smtp.office365.com", 587) == ("smtp.office365.com", 587, False)
    assert parse_smart_host("Relay.Corp.Test:2525", 25) == ("relay.corp.test", 2525, False)
    assert parse_smart_host("[10.0.0.1]", 25) == ("10.0.0.1", 25, True)
    assert parse_smart_host("[10.0.0.1]:587", 25) == ("10.0.0.1", 587, True)
    assert parse_smart_host("10.0.0.2:26", 25) == ("10.0.0.2", 26, True)
    assert parse_smart_host("[2001:db8::1]:26", 25) == ("2001:db8::1", 26, True)
    assert parse_smart_host("2001:db8::1", 25) == ("2001:db8::1", 25, True)


def test_is_local_endpoint():
    assert is_local_endpoint("127.0.0.1", 2525, OURS)
    assert is_local_endpoint("127.0.0.3", 25, OURS)  # loopback + one of our ports
    assert is_local_endpoint("::ffff:127.0.0.1", 2525, OURS)
    assert is_local_endpoint("10.0.0.9", 25, {("10.0.0.9", 25)})
    assert not is_local_endpoint("127.0.0.1", 26, OURS)
    assert not is_local_endpoint("192.0.2.1", 2525, OURS)


def test_another_loopback_address_at_our_port_is_another_server():
    """Only a listener bound to the address, or a wildcard one, takes a connection to it: a
    relay on 127.0.0.1:25 alone is not at 127.0.0.2:25 nor at [::1]:25 (any loopback address
    with one of our ports counted). 0.0.0.0 / :: as a next hop is the loopback address."""
    only_127_0_0_1 = {("127.0.0.1", 25)}
    assert not is_local_endpoint("127.0.0.2", 25, only_127_0_0_1)
    assert not is_local_endpoint("::1", 25, only_127_0_0_1)
    assert is_local_endpoint("0.0.0.0", 25, only_127_0_0_1)
    assert not is_local_endpoint("0.0.0.0", 25, {("10.0.0.9", 25)})
    assert is_local_endpoint("::", 25, {("::1", 25)})
    assert is_local_endpoint("127.0.0.2", 25, {("0.0.0.0", 25)})  # a wildcard takes all of 127/8
    assert is_local_endpoint("127.0.0.2", 25, {("::", 25)})  # dual-stack


def _own_interface_address() -> str:
    """An address of this host on a real interface: the source address the kernel would pick for
    a TEST-NET destination (a UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        return str(s.getsockname()[0])


def test_a_wildcard_listener_makes_every_address_of_this_host_local():
    """A smart host or MX on this machine's own interface address, with a listener on 0.0.0.0
    or [::] at that port, is this relay: before, only 0.0.0.0 itself matched, and the relay
    delivered to itself until the hop count stopped it (review, reproduced)."""
    own = _own_interface_address()
    assert not ipaddress.ip_address(own).is_loopback  # the machine has a non-loopback address
    assert is_local_endpoint(own, 25, [("0.0.0.0", 25)])
    assert is_local_endpoint("::ffff:" + own, 25, [("::", 25)])
    assert not is_local_endpoint(own, 26, [("0.0.0.0", 25)])  # another port: another server
    assert not is_local_endpoint("198.51.100.77", 25, [("0.0.0.0", 25)])  # not ours


async def test_smart_hosts_in_configured_order(loopback_dns):
    loopback_dns.add("sh1.test", "A", "127.0.0.11")
    loopback_dns.add("sh2.test", "A", "127.0.0.12")
    loopback_dns.add("sh2.test", "AAAA", "::1")
    conn = Connector(smart_hosts=["sh2.test:2600", "[127.0.0.13]", "sh1.test"], port=587)
    hops = await resolve_next_hops(conn, "ignored.test", res(loopback_dns))
    assert hops == [
        NextHop("sh2.test", "127.0.0.12", 2600, "sh2.test"),
        NextHop("sh2.test", "::1", 2600, "sh2.test"),
        NextHop("127.0.0.13", "127.0.0.13", 587, "127.0.0.13"),
        NextHop("sh1.test", "127.0.0.11", 587, "sh1.test"),
    ]
    assert hops[2].label == "[127.0.0.13]:587"
    assert hops[0].label == "sh2.test[127.0.0.12]:2600"


async def test_smart_host_tls_domain(loopback_dns):
    conn = Connector(smart_hosts=["[127.0.0.1]"], tls_domain="mail.protection.outlook.com")
    hops = await resolve_next_hops(conn, "x.test", res(loopback_dns))
    assert hops[0].tls_name == "mail.protection.outlook.com"


async def test_unresolvable_smart_host_skipped_then_deferred(loopback_dns):
    loopback_dns.add("good.test", "A", "127.0.0.20")
    conn = Connector(smart_hosts=["missing.test", "good.test"])
    hops = await resolve_next_hops(conn, "x.test", res(loopback_dns))
    assert [h.ip for h in hops] == ["127.0.0.20"]
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(
            Connector(smart_hosts=["missing.test"]), "x.test", res(loopback_dns)
        )
    assert not info.value.permanent  # a typo in the config must not bounce mail
    assert info.value.reply.line().startswith("451 4.4.0 DNS query failed")


async def test_a_smart_host_that_is_this_relay_beside_one_not_resolving_now_defers(
    loopback_dns,
):
    """Smart hosts: this relay (skipped) and another whose lookup fails for now. The mail
    waits for the other one, as for a smart host alone that does not resolve; it bounced
    with 554 5.4.6 ROUTING.Loop, as if every smart host were this relay."""
    loopback_dns.add("self.relay.test", "A", "127.0.0.1")
    loopback_dns.set_servfail("peer.relay.test")
    conn = Connector(smart_hosts=["self.relay.test:2525", "peer.relay.test:2525"])
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(conn, "x.test", res(loopback_dns), local_endpoints=OURS)
    assert not info.value.permanent
    assert info.value.reply == replies.dns_query_failed("ServerFailure")


async def test_no_smart_hosts_and_no_dns_routing_is_no_next_hop(loopback_dns):
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(Connector(), "x.test", res(loopback_dns))
    assert info.value.permanent and info.value.reply == replies.NO_NEXT_HOP


async def test_mx_by_preference_then_addresses(loopback_dns):
    loopback_dns.add("dest.test", "MX", (20, "mx2.dest.test"))
    loopback_dns.add("dest.test", "MX", (10, "mx1.dest.test"))
    loopback_dns.add("mx1.dest.test", "A", "127.0.0.31")
    loopback_dns.add("mx1.dest.test", "A", "127.0.0.32")
    loopback_dns.add("mx2.dest.test", "A", "127.0.0.33")
    conn = Connector(dns_routing_enabled=True, port=2500)
    hops = await resolve_next_hops(
        conn, "dest.test", res(loopback_dns), allow_special_addresses=True
    )
    assert [(h.host, h.preference, h.port) for h in hops] == [
        ("mx1.dest.test", 10, 2500),
        ("mx1.dest.test", 10, 2500),
        ("mx2.dest.test", 20, 2500),
    ]
    assert sorted(h.ip for h in hops[:2]) == ["127.0.0.31", "127.0.0.32"]
    assert hops[2].ip == "127.0.0.33"


async def test_an_address_behind_two_mx_hosts_is_one_next_hop(loopback_dns):
    """Two MX host names for one address (a provider's mx1 and mx2 on one machine): that
    address was a next hop twice, so while it timed out each attempt waited for it twice."""
    loopback_dns.add("shared.test", "MX", (10, "mx1.shared.test"))
    loopback_dns.add("shared.test", "MX", (20, "mx2.shared.test"))
    loopback_dns.add("mx1.shared.test", "A", "192.0.2.5")
    loopback_dns.add("mx2.shared.test", "A", "192.0.2.5")
    loopback_dns.add("mx2.shared.test", "A", "192.0.2.6")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True), "shared.test", res(loopback_dns)
    )
    assert [(h.host, h.ip, h.preference) for h in hops] == [
        ("mx1.shared.test", "192.0.2.5", 10),
        ("mx2.shared.test", "192.0.2.6", 20),
    ]


async def test_mx_host_without_address_is_skipped(loopback_dns):
    loopback_dns.add("part.test", "MX", (10, "dead.part.test"))
    loopback_dns.add("part.test", "MX", (20, "alive.part.test"))
    loopback_dns.add("alive.part.test", "A", "127.0.0.40")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True),
        "part.test",
        res(loopback_dns),
        allow_special_addresses=True,
    )
    assert [h.host for h in hops] == ["alive.part.test"]


async def test_implicit_mx_uses_the_domain_address(loopback_dns):
    loopback_dns.add("bare.test", "A", "127.0.0.41")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True),
        "bare.test",
        res(loopback_dns),
        allow_special_addresses=True,
    )
    assert hops == [NextHop("bare.test", "127.0.0.41", 25, "bare.test", 0)]


async def test_implicit_mx_without_address_is_permanent(loopback_dns):
    loopback_dns.add("txt.test", "TXT", "no mail here")
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(Connector(dns_routing_enabled=True), "txt.test", res(loopback_dns))
    assert info.value.permanent and info.value.reply == replies.DNS_NONEXISTENT_DOMAIN


@pytest.mark.parametrize(
    ("setup", "permanent", "reply"),
    [
        (lambda d: d.add("nullmx.test", "MX", (0, ".")), True, replies.NULL_MX),
        (lambda d: None, True, replies.DNS_NONEXISTENT_DOMAIN),
        (
            lambda d: (d.add("nullmx.test", "MX", (10, "x.test")), d.set_servfail("nullmx.test")),
            False,
            replies.dns_query_failed("ServerFailure"),
        ),
    ],
    ids=["null-mx", "nxdomain", "servfail"],
)
async def test_dns_failures_propagate(loopback_dns, setup, permanent, reply):
    setup(loopback_dns)
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(
            Connector(dns_routing_enabled=True), "nullmx.test", res(loopback_dns)
        )
    assert info.value.permanent is permanent
    assert info.value.reply == reply


async def test_mx_to_loopback_refused_by_default(loopback_dns):
    loopback_dns.add("evil.test", "MX", (10, "mx.evil.test"))
    loopback_dns.add("mx.evil.test", "A", "127.0.0.1")
    loopback_dns.add("meta.test", "A", "169.254.169.254")
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(Connector(dns_routing_enabled=True), "evil.test", res(loopback_dns))
    assert info.value.reply == MX_SPECIAL_ADDRESS and not info.value.permanent
    with pytest.raises(NextHopError):
        await resolve_next_hops(Connector(dns_routing_enabled=True), "meta.test", res(loopback_dns))


async def test_allow_loopback_mx_allows_loopback_only_and_a_loop_is_still_a_loop(loopback_dns):
    loopback_dns.add("lab.test", "MX", (10, "mx.lab.test"))
    loopback_dns.add("mx.lab.test", "A", "127.0.0.2")
    loopback_dns.add("mx.lab.test", "AAAA", "::1")
    loopback_dns.add("meta.test", "A", "169.254.169.254")
    loopback_dns.add("self.test", "A", "127.0.0.1")
    lab = Connector(dns_routing_enabled=True, port=2600, allow_loopback_mx=True)
    hops = await resolve_next_hops(lab, "lab.test", res(loopback_dns), local_endpoints=OURS)
    assert [h.label for h in hops] == ["mx.lab.test[127.0.0.2]:2600", "mx.lab.test[::1]:2600"]
    with pytest.raises(NextHopError) as info:  # link-local (a cloud's metadata service): no
        await resolve_next_hops(lab, "meta.test", res(loopback_dns), local_endpoints=OURS)
    assert info.value.reply == MX_SPECIAL_ADDRESS
    looping = Connector(dns_routing_enabled=True, port=2525, allow_loopback_mx=True)
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(looping, "self.test", res(loopback_dns), local_endpoints=OURS)
    assert info.value.reply == replies.LOOP_DETECTED


@pytest.mark.parametrize(
    "aaaa",
    [
        "2002:7f00:1::1",  # 6to4 of 127.0.0.1
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254 (a cloud metadata service)
        "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    ],
)
async def test_an_mx_aaaa_embedding_a_special_ipv4_address_is_refused(loopback_dns, aaaa):
    """An IPv6 address that carries a loopback or link-local IPv4 address (6to4, Teredo) is
    refused as that address is, as the receiving side refuses it in an address literal; only the
    IPv4-mapped form (::ffff:0:0/96, itself reserved) was."""
    loopback_dns.add("evil6.test", "MX", (10, "mx.evil6.test"))
    loopback_dns.add("mx.evil6.test", "AAAA", aaaa)
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(
            Connector(dns_routing_enabled=True), "evil6.test", res(loopback_dns)
        )
    assert info.value.reply == MX_SPECIAL_ADDRESS and not info.value.permanent


async def test_loop_smart_host_is_this_relay(loopback_dns):
    conn = Connector(smart_hosts=["[127.0.0.1]:2525"])
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(conn, "x.test", res(loopback_dns), local_endpoints=OURS)
    assert info.value.permanent and info.value.reply == replies.LOOP_DETECTED
    # a looping smart host among others is dropped
    conn2 = Connector(smart_hosts=["[127.0.0.1]:2525", "[127.0.0.50]:2600"])
    hops = await resolve_next_hops(conn2, "x.test", res(loopback_dns), local_endpoints=OURS)
    assert [h.label for h in hops] == ["[127.0.0.50]:2600"]


async def test_loop_mx_is_this_relay(loopback_dns):
    loopback_dns.add("self.test", "MX", (10, "relay.self.test"))
    loopback_dns.add("relay.self.test", "A", "127.0.0.1")
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(
            Connector(dns_routing_enabled=True),
            "self.test",
            res(loopback_dns),
            local_endpoints=OURS,
            allow_special_addresses=True,
        )
    assert info.value.permanent and info.value.reply == replies.LOOP_DETECTED


async def test_we_are_backup_mx_keeps_better_preferences(loopback_dns):
    loopback_dns.add("backup.test", "MX", (10, "primary.backup.test"))
    loopback_dns.add("backup.test", "MX", (20, "us.backup.test"))
    loopback_dns.add("backup.test", "MX", (30, "worse.backup.test"))
    loopback_dns.add("primary.backup.test", "A", "192.0.2.60")
    loopback_dns.add("us.backup.test", "A", "127.0.0.1")
    loopback_dns.add("worse.backup.test", "A", "192.0.2.61")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True),
        "backup.test",
        res(loopback_dns),
        local_endpoints=OURS,
        allow_special_addresses=True,
    )
    assert [h.host for h in hops] == ["primary.backup.test"]


async def test_max_hops_cap(loopback_dns):
    for i in range(20):
        loopback_dns.add("many.test", "MX", (i, f"mx{i}.many.test"))
        loopback_dns.add(f"mx{i}.many.test", "A", f"127.0.1.{i + 1}")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True),
        "many.test",
        res(loopback_dns),
        allow_special_addresses=True,
        max_hops=5,
    )
    assert [h.preference for h in hops] == [0, 1, 2, 3, 4]


async def test_a_huge_mx_set_is_looked_up_only_as_far_as_it_can_be_used(loopback_dns):
    """A domain publishing hundreds of MX records had every host's A and AAAA looked up, all
    at once, at every attempt of every message to it (400 queries through the resolver for
    200 hosts) although at most max_hops addresses are tried. The best 2 x max_hops hosts are
    looked up: enough to skip some that do not resolve."""
    for i in range(200):
        loopback_dns.add("huge.test", "MX", (10 + i, f"mx{i}.huge.test"))
        loopback_dns.add(f"mx{i}.huge.test", "A", f"192.0.2.{i + 1}")
    loopback_dns.set_servfail("mx0.huge.test")
    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True), "huge.test", res(loopback_dns), max_hops=5
    )
    assert [h.host for h in hops] == [f"mx{i}.huge.test" for i in range(1, 6)]
    hosts_asked = {name for name, rtype, _ in loopback_dns.queries if rtype in ("A", "AAAA")}
    assert hosts_asked == {f"mx{i}.huge.test" for i in range(10)}


async def test_this_relay_among_many_equal_mx_hosts_is_found_before_the_cap(loopback_dns):
    """30 MX hosts of one preference, this relay (by its name) one of them: only the best
    2 x max_hops hosts are looked up, so after the shuffle the relay was mostly not among them
    and its equal-preference peers got the mail (which, as backups of each other, may send it
    back). A host with one of the relay's own names is looked up whatever the cap: its address
    decides (a loop here: no peer of equal preference is a next hop, 554 5.4.6 at once)."""
    import random

    for i in range(30):
        loopback_dns.add("eq.test", "MX", (10, f"mx{i}.eq.test"))
        loopback_dns.add(f"mx{i}.eq.test", "A", f"192.0.2.{i + 1}")
    loopback_dns.add("eq.test", "MX", (10, "relay.eq.test"))
    loopback_dns.add("relay.eq.test", "A", "127.0.0.1")
    connector = Connector(dns_routing_enabled=True, port=2525)
    for seed in range(8):
        resolver = Resolver(
            [loopback_dns.address], lifetime=2.0, timeout=1.0, rng=random.Random(seed)
        )
        with pytest.raises(NextHopError) as info:
            await resolve_next_hops(
                connector,
                "eq.test",
                resolver,
                local_endpoints=OURS,
                local_names={"RELAY.eq.test."},
                max_hops=5,
            )
        assert info.value.reply == replies.LOOP_DETECTED, seed
    # a name of this relay whose address is another server's is an ordinary next hop
    loopback_dns.remove("relay.eq.test")
    loopback_dns.add("relay.eq.test", "A", "192.0.2.200")
    hops = await resolve_next_hops(
        connector, "eq.test", res(loopback_dns), local_endpoints=OURS,
        local_names={"relay.eq.test"}, max_hops=5,
    )  # fmt: skip
    assert hops[0].host == "relay.eq.test" and len(hops) == 5


async def test_ip_literal_smart_hosts_are_worked_out_once_per_configuration(loopback_dns):
    from relaygate.delivery import nexthop

    nexthop._literal_hops.cache_clear()
    conn = Connector(smart_hosts=["[127.0.0.1]:2525", "[127.0.0.51]:2600"], tls_domain="t.test")
    first = await resolve_next_hops(conn, "x.test", res(loopback_dns), local_endpoints=OURS)
    assert [h.label for h in first] == ["[127.0.0.51]:2600"]  # this relay's own port skipped
    assert nexthop._literal_hops.cache_info().currsize == 1
    first.clear()  # a caller's list is its own: the remembered hops are not affected
    again = await resolve_next_hops(conn, "y.test", res(loopback_dns), local_endpoints=OURS)
    assert again == [NextHop("127.0.0.51", "127.0.0.51", 2600, "t.test")]
    # other listening endpoints are another configuration: now the second host is this relay
    other = await resolve_next_hops(
        conn, "x.test", res(loopback_dns), local_endpoints={("127.0.0.51", 2600)}
    )
    assert [h.label for h in other] == ["[127.0.0.1]:2525"]
    assert nexthop._literal_hops.cache_info().currsize == 2
    # every smart host looping is an error each time, never remembered as an empty list
    looping = Connector(smart_hosts=["[127.0.0.1]:2525"])
    for _ in range(2):
        with pytest.raises(NextHopError):
            await resolve_next_hops(looping, "x.test", res(loopback_dns), local_endpoints=OURS)
    assert nexthop._literal_hops.cache_info().currsize == 2


@pytest.mark.parametrize(
    "primary",
    [
        lambda d: d.set_servfail("primary.backup2.test"),  # its lookup fails for now
        lambda d: d.add("primary.backup2.test", "TXT", "address removed for a renumbering"),
    ],
    ids=["servfail", "no-address"],
)
async def test_we_are_backup_mx_and_the_primary_does_not_resolve_defers(loopback_dns, primary):
    """As backup MX, with the better MX not resolving at that moment, the mail waits for it
    (Postfix: 4.4.4 "unable to find primary relay"): before, only our own MX was left, so the
    message bounced with ROUTING.Loop as if the relay were the domain's only MX (reproduced)."""
    loopback_dns.add("backup2.test", "MX", (10, "primary.backup2.test"))
    loopback_dns.add("backup2.test", "MX", (20, "us.backup2.test"))
    loopback_dns.add("us.backup2.test", "A", "127.0.0.1")
    primary(loopback_dns)
    with pytest.raises(NextHopError) as info:
        await resolve_next_hops(
            Connector(dns_routing_enabled=True),
            "backup2.test",
            res(loopback_dns),
            local_endpoints=OURS,
            allow_special_addresses=True,
        )
    assert not info.value.permanent
    assert info.value.reply == replies.primary_relay_not_found("backup2.test")


@pytest.mark.parametrize(
    ("recipient", "ip"),
    [("bob@[192.0.2.7]", "192.0.2.7"), ("bob@[IPv6:2001:DB8::7]", "2001:db8::7")],
)
async def test_an_address_literal_recipient_is_its_address(loopback_dns, recipient, ip):
    """An address-literal domain goes to its address, with no DNS. The IPv6 form's next hop
    was named "IPv6:2001:db8::7": the queue showed IPv6:2001:db8::7[2001:db8::7]:25 and TLS
    sent that text as the server name (SNI), which is no host name."""
    from relaygate.delivery.routing import domain_of

    hops = await resolve_next_hops(
        Connector(dns_routing_enabled=True), domain_of(recipient), res(loopback_dns)
    )
    assert hops == [NextHop(ip, ip, 25, ip, 0)]
    assert hops[0].label == f"[{ip}]:25"
    assert loopback_dns.queries == []
