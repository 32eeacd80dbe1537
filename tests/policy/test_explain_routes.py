"""`explain` shows, per accepted recipient, the route the queue manager will take (issue 4)."""

from __future__ import annotations

import pytest

from relaygate.config import parse_text
from relaygate.policy.explain import explain
from tests.smtp.conftest import relay, relay_connector  # noqa: F401

CONFIG = """
[[accepted_domains]]
domain = "corp.example"
domain_type = "InternalRelay"

[[receive_connectors]]
name = "Relay"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/24"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "To Microsoft 365"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["corp-example.mail.protection.outlook.com"]

[[send_connectors]]
name = "Partner by MX"
address_spaces = ["*.partner.example"]
dns_routing_enabled = true
"""


def test_each_recipient_gets_its_route() -> None:
    cfg = parse_text(CONFIG, "routes.toml")
    result = explain(
        cfg,
        client_ip="10.0.0.5",
        local=("0.0.0.0", 25),
        sender="scanner@corp.example",
        recipients=["a@gmail.com", "b@eu.partner.example", "c@corp.example", "d@elsewhere.example"],
    ).to_dict()
    routes = {r["address"]: r["route"] for r in result["recipients"]}
    assert routes["a@gmail.com"]["connector"] == "To Microsoft 365"
    assert routes["a@gmail.com"]["delivery_type"] == "SmartHostConnectorDelivery"
    assert routes["a@gmail.com"]["next_hop"] == "corp-example.mail.protection.outlook.com"
    # The more specific address space wins over "*", and is routed by MX to the recipient's domain.
    partner = routes["b@eu.partner.example"]
    assert partner["connector"] == "Partner by MX"
    assert partner["delivery_type"] == "DnsConnectorDelivery"
    assert partner["next_hop"] == "eu.partner.example"
    verdicts = {c["connector"]: c["verdict"] for c in partner["candidates"]}
    assert verdicts == {"Partner by MX": "selected", "To Microsoft 365": "less specific"}
    # An InternalRelay accepted domain is routed out through the send connectors too.
    assert routes["c@corp.example"]["connector"] == "To Microsoft 365"


def test_no_route_is_unreachable_with_exchanges_reason() -> None:
    cfg = parse_text(
        CONFIG.replace('address_spaces = ["*"]', 'address_spaces = ["corp.example"]'), "r.toml"
    )
    result = explain(
        cfg, client_ip="10.0.0.5", local=("0.0.0.0", 25), sender=None, recipients=["x@gmail.com"]
    ).to_dict()
    (rcpt,) = result["recipients"]
    assert rcpt["reply"] == "250 2.1.5 Recipient OK"  # accepted at RCPT: the relay right is there
    assert rcpt["route"]["connector"] is None
    assert rcpt["route"]["delivery_type"] == "Unreachable"
    assert rcpt["route"]["reply"] == "550 5.4.4 ROUTING.NoNextHop; unable to route"


@pytest.mark.parametrize("literal", ["127.0.0.1", "127.0.0.2"])
def test_explain_and_the_server_agree_on_the_relays_own_literal(relay, literal):  # noqa: F811
    """On a connector bound to 0.0.0.0, RCPT TO:<x@[ip]> for an address of the relay gets the same
    reply from `explain` (no local address known) as from the live server: both ask
    relay_local_ips (loopbacks, specific bindings, the host's addresses, the connection's address)."""
    h = relay([relay_connector(["127.0.0.0/8"], bindings=["0.0.0.0:{port}"])])
    with h.raw("127.0.0.5", host=literal) as c:
        c.greet()
        c.cmd("MAIL FROM:<app@corp.example>", 250)
        server = c.cmd(f"RCPT TO:<victim@[{literal}]>").text
    local = literal if literal != "127.0.0.1" else "0.0.0.0"
    result = explain(
        h.config,
        client_ip="127.0.0.5",
        local=(local, h.port),
        sender="app@corp.example",
        recipients=[f"victim@[{literal}]"],
    )
    assert server == result.recipients[0]["reply"] == "550 5.1.1 User unknown"


def test_an_ipv4_mapped_client_is_explained_as_the_ipv4_client_the_server_sees() -> None:
    from relaygate.policy.explain import endpoints_for
    from relaygate.policy.selection import select_connector

    cfg = parse_text(CONFIG, "routes.toml")
    client = "::ffff:10.0.0.5"
    endpoints = endpoints_for(cfg, client)
    assert endpoints == [("0.0.0.0", 25)]
    expected = select_connector(
        cfg.receive_connectors, local_ip="10.0.0.1", local_port=25, client_ip=client
    )
    assert expected.connector is not None and expected.connector.name == "Relay"
    result = explain(cfg, client_ip=client, local=endpoints[0], sender=None, recipients=[])
    assert result.selection.connector is not None
    assert result.selection.connector.name == expected.connector.name


def test_the_route_shows_the_send_connectors_pacing() -> None:
    paced = CONFIG.replace(
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n',
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n'
        "max_messages_per_minute = 30\nmax_recipients_per_day = 10000\n",
    )
    cfg = parse_text(paced, "routes.toml")
    result = explain(
        cfg,
        client_ip="10.0.0.5",
        local=("0.0.0.0", 25),
        sender="scanner@corp.example",
        recipients=["a@gmail.com", "b@eu.partner.example", "d@elsewhere.example"],
    ).to_dict()
    routes = {r["address"]: r["route"] for r in result["recipients"]}
    assert routes["a@gmail.com"]["pacing"] == "30 messages/minute, 10000 recipients/day"
    assert routes["b@eu.partner.example"]["pacing"] == "unlimited"


def test_the_route_shows_the_send_connectors_overflow_connector() -> None:
    spill = CONFIG.replace(
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n',
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n'
        'max_recipients_per_day = 10000\noverflow_connector = "Partner by MX"\n',
    )
    result = explain(
        parse_text(spill, "routes.toml"),
        client_ip="10.0.0.5",
        local=("0.0.0.0", 25),
        sender="scanner@corp.example",
        recipients=["a@gmail.com"],
    ).to_dict()
    (route,) = [r["route"] for r in result["recipients"]]
    assert route["connector"] == "To Microsoft 365"
    assert route["pacing"] == (
        '10000 recipients/day, then via "Partner by MX" (overflow_connector)'
    )


def test_the_route_shows_the_send_connectors_send_as() -> None:
    as_mailbox = CONFIG.replace(
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n',
        'smart_hosts = ["corp-example.mail.protection.outlook.com"]\n'
        'send_as = "relay@corp.example"\n',
    )
    result = explain(
        parse_text(as_mailbox, "routes.toml"),
        client_ip="10.0.0.5",
        local=("0.0.0.0", 25),
        sender="scanner@corp.example",
        recipients=["a@gmail.com", "b@eu.partner.example"],
    ).to_dict()
    routes = {r["address"]: r["route"] for r in result["recipients"]}
    assert routes["a@gmail.com"]["send_as"] == "relay@corp.example"
    assert routes["b@eu.partner.example"]["send_as"] is None
