"""Send connector selection (exchange-semantics.md §7.1): pure functions, no I/O."""

from __future__ import annotations

from relaygate import replies
from relaygate.config.model import SendConnector
from relaygate.delivery import routing
from relaygate.delivery.routing import (
    DELIVERY_DNS,
    DELIVERY_SMART_HOST,
    DELIVERY_UNREACHABLE,
    RouteKey,
    RouteTable,
    explain_route,
    match_address_space,
    parse_address_space,
    route_recipients,
    select_send_connector,
)

from .helpers import Connector


def names(c):
    return None if c is None else c.name


def test_address_space_matching():
    star = parse_address_space("*")
    exact = parse_address_space("corp.example")
    wild = parse_address_space("*.corp.example")
    assert match_address_space(star, "anything.test") == (0, 0)
    assert match_address_space(exact, "corp.example") == (2, 1)
    assert match_address_space(exact, "CORP.example.") == (2, 1)
    assert match_address_space(exact, "sub.corp.example") is None  # not its subdomains
    assert match_address_space(wild, "corp.example") == (2, 0)  # the domain itself
    assert match_address_space(wild, "a.b.corp.example") == (2, 0)
    assert match_address_space(wild, "notcorp.example") is None
    assert match_address_space(wild, "corp.example.evil") is None


def test_exchange_spelling_with_type_and_cost():
    s = parse_address_space("SMTP:*.contoso.com;5")
    assert (s.kind, s.domain, s.cost) == ("wildcard", "contoso.com", 5)
    assert match_address_space(parse_address_space("X400:c=US;a= ;p=Org"), "contoso.com") is None


def test_most_specific_wins():
    conns = [
        Connector("Internet", ["*"]),
        Connector("Corp wildcard", ["*.corp.example"]),
        Connector("Marketing", ["marketing.corp.example"]),
        Connector("Deep wildcard", ["*.eu.corp.example"]),
    ]
    assert names(select_send_connector(conns, "marketing.corp.example")) == "Marketing"
    assert names(select_send_connector(conns, "sales.corp.example")) == "Corp wildcard"
    assert names(select_send_connector(conns, "corp.example")) == "Corp wildcard"
    assert names(select_send_connector(conns, "x.eu.corp.example")) == "Deep wildcard"
    assert names(select_send_connector(conns, "gmail.test")) == "Internet"


def test_exact_beats_wildcard_of_same_domain():
    conns = [Connector("W", ["*.corp.example"]), Connector("E", ["corp.example"])]
    assert names(select_send_connector(conns, "corp.example")) == "E"


def test_cost_then_name_break_ties():
    conns = [
        Connector("B", ["*"], cost=5),
        Connector("C", ["*"], cost=1),
        Connector("A", ["*"], cost=1),
    ]
    assert names(select_send_connector(conns, "x.test")) == "A"
    # a per-space cost overrides the connector's
    conns2 = [Connector("A", ["*;9"], cost=1), Connector("Z", ["*"], cost=2)]
    assert names(select_send_connector(conns2, "x.test")) == "Z"


def test_disabled_ignored_and_no_match_is_none():
    conns = [Connector("Off", ["*"], enabled=False), Connector("Corp", ["corp.example"])]
    assert select_send_connector(conns, "other.test") is None
    assert names(select_send_connector(conns, "corp.example")) == "Corp"


def test_size_limit_drops_connector():
    conns = [
        Connector("Small", ["corp.example"], max_message_size=1000),
        Connector("Big", ["*"]),
    ]
    assert names(select_send_connector(conns, "corp.example", size=5000)) == "Big"
    only_small = [Connector("Small", ["*"], max_message_size=1000)]
    exp = explain_route(only_small, "a@corp.example", size=5000)
    assert exp.connector is None and exp.reply == replies.ROUTE_SIZE_LIMIT


def test_explain_names_winner_and_losers():
    conns = [
        Connector("Internet", ["*"]),
        Connector("Corp", ["*.corp.example"], cost=3),
        Connector("Corp cheap", ["*.corp.example"], cost=1),
        Connector("Off", ["*"], enabled=False),
        Connector("Partner", ["partner.test"]),
    ]
    exp = explain_route(conns, "Someone@Sales.Corp.Example")
    assert exp.domain == "sales.corp.example"
    assert exp.connector.name == "Corp cheap"
    assert "'*.corp.example'" in exp.reason
    verdicts = {c.connector: c.verdict for c in exp.candidates}
    assert verdicts == {
        "Internet": "less specific",
        "Corp": "higher cost",
        "Corp cheap": "selected",
        "Off": "disabled",
        "Partner": "no match",
    }
    assert [c.connector for c in exp.candidates] == [c.name for c in conns]


def test_explain_unreachable():
    exp = explain_route([Connector("Corp", ["corp.example"])], "a@other.test")
    assert exp.connector is None
    assert exp.reply == replies.NO_NEXT_HOP
    assert exp.route.delivery_type == DELIVERY_UNREACHABLE
    assert "other.test" in exp.reason


def test_route_recipients_groups_per_queue():
    conns = [
        Connector("Internet", ["*"], dns_routing_enabled=True),
        Connector(
            "M365", ["*.corp.example"], smart_hosts=["smtp.office365.com", "[10.0.0.5]:2525"]
        ),
        Connector("Legacy", ["legacy.test"], enabled=False),
    ]
    rcpts = [
        "a@corp.example",
        "b@x.test",
        "c@sub.corp.example",
        "d@X.test",
        "e@y.test",
        "f@legacy.test",
    ]
    groups = route_recipients(conns, rcpts)
    sh = RouteKey("M365", "smtp.office365.com,[10.0.0.5]:2525", DELIVERY_SMART_HOST)
    assert groups[sh] == ["a@corp.example", "c@sub.corp.example"]
    assert groups[RouteKey("Internet", "x.test", DELIVERY_DNS)] == ["b@x.test", "d@X.test"]
    assert groups[RouteKey("Internet", "y.test", DELIVERY_DNS)] == ["e@y.test"]
    # legacy.test falls back to "*" because its own connector is disabled
    assert groups[RouteKey("Internet", "legacy.test", DELIVERY_DNS)] == ["f@legacy.test"]
    key = next(k for k in groups if k.connector_name == "M365")
    assert key.connector is conns[1]


def test_unroutable_recipients_grouped_under_unreachable():
    groups = route_recipients([Connector("Corp", ["corp.example"])], ["a@corp.example", "b@z.test"])
    unreachable = [k for k in groups if k.is_unreachable]
    assert len(unreachable) == 1 and groups[unreachable[0]] == ["b@z.test"]


def test_idn_and_literal_domains():
    conns = [Connector("IDN", ["bücher.example"]), Connector("Any", ["*"])]
    assert names(select_send_connector(conns, "xn--bcher-kva.example")) == "IDN"
    exp = explain_route(conns, "user@[192.0.2.1]")
    assert exp.connector.name == "Any" and exp.domain == "[192.0.2.1]"


def test_works_with_the_real_config_dataclass():
    conns = [
        SendConnector(name="Internet", address_spaces=("*",)),
        SendConnector(
            name="Corp",
            address_spaces=("*.corp.example",),
            dns_routing_enabled=False,
            smart_hosts=("[10.0.0.1]",),
        ),
    ]
    assert select_send_connector(conns, "a.corp.example").name == "Corp"
    groups = route_recipients(conns, ["x@a.corp.example", "y@b.test"])
    assert {k.connector_name for k in groups} == {"Corp", "Internet"}


def test_route_table_remembers_per_domain_and_size_limits(monkeypatch):
    conns = [
        Connector("Small", ["corp.example"], smart_hosts=["[10.0.0.1]"], max_message_size=1000),
        Connector("Big", ["*"], smart_hosts=["[10.0.0.2]"]),
    ]
    calls: list[str] = []
    real = routing.explain_route

    def counting(connectors, address, *, size=None):
        calls.append(address)
        return real(connectors, address, size=size)

    monkeypatch.setattr(routing, "explain_route", counting)
    table = RouteTable(conns)
    small = RouteKey("Small", "[10.0.0.1]", DELIVERY_SMART_HOST)
    big = RouteKey("Big", "[10.0.0.2]", DELIVERY_SMART_HOST)
    rcpts = ["a@corp.example", "b@CORP.example", "c@x.test"]
    assert table.route(rcpts, size=500) == {small: rcpts[:2], big: ["c@x.test"]}
    assert calls == ["a@corp.example", "c@x.test"]  # one decision per domain
    assert table.route(["d@corp.example"], size=900) == {small: ["d@corp.example"]}
    assert len(calls) == 2  # remembered: same domain, under the same size limits
    # over Small's limit is another decision, not the remembered one
    assert table.route(["e@corp.example"], size=5000) == {big: ["e@corp.example"]}
    assert len(calls) == 3
    # the same groups as deciding each recipient afresh
    mixed = ["f@corp.example", "g@y.test", "h@corp.example"]
    for size in (None, 10, 5000):
        assert table.route(mixed, size=size) == route_recipients(conns, mixed, size=size)


def test_route_table_memory_is_bounded():
    table = RouteTable([Connector("Any", ["*"], dns_routing_enabled=True)])
    for i in range(RouteTable._MAX + 10):
        table.route([f"x@d{i}.test"])
    assert len(table._memo) <= RouteTable._MAX


def test_route_one_parses_a_domain_once_and_agrees_with_explain_route(monkeypatch):
    """Get-Queue routes every unfinished recipient: the domain text of a plain address is parsed
    once (domain_of was called per address: unique addresses defeat its cache); an address the
    parser may treat differently (quoted or long local part, brackets) is parsed on its own."""
    conns = [
        Connector("Idn", ["xn--bcher-kva.example"], smart_hosts=["[10.0.0.3]"]),
        Connector("Corp", ["corp.example"], smart_hosts=["[10.0.0.1]"], max_message_size=1000),
        Connector("Any", ["*"], dns_routing_enabled=True),
    ]
    addresses = [
        "a@corp.example",
        "b@CORP.Example.",
        "c.d+e@corp.example",
        '"q@x"@corp.example',
        "x" * 65 + "@corp.example",
        "<f@corp.example>",
        "g@Bücher.example",
        "h@xn--bcher-kva.example",
        "i@bad..domain",
        "j@[10.0.0.7]",
        "postmaster",
        "k@" + "l" * 250 + ".example",
    ]
    table = RouteTable(conns)
    for _round in range(2):  # decided afresh, then remembered: the same answers
        for address in addresses:
            for size in (None, 500, 5000):
                expected = explain_route(conns, address, size=size).route
                assert table.route_one(address, size=size) == expected, (address, size)
    parsed: list[str] = []
    real = routing.domain_of

    def counting(address):
        parsed.append(address)
        return real(address)

    monkeypatch.setattr(routing, "domain_of", counting)
    fresh = RouteTable(conns)
    for i in range(500):
        assert fresh.route_one(f"user{i}@Corp.Example", size=10).next_hop == "[10.0.0.1]"
    # the table's own parse and explain_route's, for the first address; before: 501
    assert parsed == ["user0@Corp.Example"] * 2
    fresh.route_one('"odd"@Corp.Example', size=10)
    fresh.route_one('"odd"@Corp.Example', size=10)
    assert parsed[2:] == ['"odd"@Corp.Example'] * 2  # not trusted to the domain text alone
