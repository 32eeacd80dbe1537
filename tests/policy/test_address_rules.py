"""allowed_senders / allowed_recipients as pure decisions: the entry grammar, the compiled matcher (and
that it agrees with the `AddressPattern` the queue filters use), the MAIL / RCPT / From verdicts."""

from __future__ import annotations

import pytest

from relaygate.address_patterns import AddressPattern, parse_address_rule
from relaygate.addresses import Address, parse_mail_from
from relaygate.config import parse_text
from relaygate.config.model import ReceiveConnector
from relaygate.policy.address_rules import (
    AddressRules,
    compile_connector_rules,
    from_header_addresses,
)
from relaygate.policy.rights import session_rights
from relaygate.policy.verdicts import check_header_from, check_mail, check_rcpt
from relaygate.queue.store import AddressPattern as StoreAddressPattern

ANON_SEND_AS = "550 5.7.1 Anonymous client does not have permissions to send as this sender"
SEND_AS = "550 5.7.1 Client does not have permissions to send as this sender"
RCPT_NOT_ALLOWED = (
    "550 5.7.1 Client does not have permissions to send to this recipient on this connector"
)
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
BAD_FROM = "554 5.6.0 Invalid message content, the From header cannot be parsed"

CONFIG = """
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
[[accepted_domains]]
domain = "corp.example"
[[receive_connectors]]
name = "Printers"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.5"]
permission_groups = ["AnonymousUsers", "ExchangeUsers"]
allowed_senders = ["scan@corp.example", "*@erp.corp.example", "*@*.dev.corp.example"]
allowed_recipients = ["*@corp.example", "alerts@msp.example"]
[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
[[receive_connectors]]
name = "Front"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/8"]
permission_groups = ["AnonymousUsers", "ExchangeUsers"]
auth_mechanism = ["Tls", "BasicAuth"]
allowed_senders = ["<>", "*@*"]
allowed_recipients = ["*@corp.example", "*@partner.example"]
[[receive_connectors]]
name = "Open"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.6"]
permission_groups = ["AnonymousUsers"]
"""


def _connector(name: str) -> ReceiveConnector:
    connector = parse_text(CONFIG, "test.toml").connector(name)
    assert connector is not None
    return connector


def _addr(text: str) -> Address | None:
    return parse_mail_from(f"FROM:<{text}>")[0]


def _mail(connector: ReceiveConnector, sender: str, *, user: str | None = None) -> str:
    config = parse_text(CONFIG, "test.toml")
    return check_mail(
        _addr(sender),
        rights=session_rights(connector, authenticated_user=user),
        connector=connector,
        accepted_domains=config.accepted_domains,
        authenticated=user is not None,
        address_rules=compile_connector_rules(connector),
    ).reply.line()


def _rcpt(connector: ReceiveConnector, rcpt: str) -> str:
    config = parse_text(CONFIG, "test.toml")
    address = parse_mail_from(f"FROM:<{rcpt}>")[0]
    assert address is not None
    return check_rcpt(
        address,
        rights=session_rights(connector),
        connector=connector,
        accepted_domains=config.accepted_domains,
        accepted_count=0,
        authenticated=False,
    ).reply.line()


@pytest.mark.parametrize(
    ("text", "canonical", "kind"),
    [
        ("<>", "<>", "null"),
        ("Scan@Corp.Example", "scan@corp.example", "address"),
        ("<scan@corp.example.>", "scan@corp.example", "address"),
        ("*@ERP.corp.example", "*@erp.corp.example", "domain"),
        ("*@*.corp.example", "*@*.corp.example", "subdomains"),
        ("*@*", "*@*", "any"),
        ("*@bücher.example", "*@xn--bcher-kva.example", "domain"),
    ],
)
def test_rule_forms(text: str, canonical: str, kind: str) -> None:
    rule = parse_address_rule(text)
    assert (rule.text, rule.kind) == (canonical, kind)
    assert parse_address_rule(rule.text) == rule  # the canonical text reads back the same


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("*corp.example", "'*' is allowed only as"),  # would match evilcorp.example
        ("scan*@corp.example", "'*' is allowed only as"),
        ("*@corp.*", "'*' is allowed only as"),
        ("*", "'*' is allowed only as"),
        ("scanner", "no domain"),
        ("a b@corp.example", "not a valid address"),
        ("*@", "empty domain"),
        ("*@[10.0.0.1]", "address literal"),
        ("", "empty pattern"),
    ],
)
def test_rule_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        parse_address_rule(text)
    assert why in str(info.value)


ENTRIES = ["<>", "Scan@corp.example", "*@erp.corp.example", "*@*.dev.corp.example"]
ADDRESSES = [
    "",
    "scan@corp.example",
    "SCAN@CORP.EXAMPLE",
    "scan2@corp.example",
    "x@erp.corp.example",
    "x@sub.erp.corp.example",
    "x@dev.corp.example",
    "x@a.dev.corp.example",
    "x@a.b.dev.corp.example",
    "x@evildev.corp.example",
    "x@erp.corp.example.evil.example",
    '"x@erp.corp.example"@evil.example',
    "x@[10.0.0.1]",
]


@pytest.mark.parametrize("address", ADDRESSES)
def test_compiled_index_agrees_with_address_pattern(address: str) -> None:
    """The dict index answers exactly what the queue filters' AddressPattern answers, entry by entry."""
    rules = [parse_address_rule(e) for e in ENTRIES]
    compiled = AddressRules.compile("C", "allowed_senders", rules)
    parsed = _addr(address)
    expected = [r.text for r in rules if r.matches(str(parsed) if parsed else "")]
    hit = compiled.match(parsed)
    assert (hit is not None) == bool(expected)
    if hit is not None:
        assert hit in expected
    # the matcher is the queue filter's one, still importable from queue.store
    assert StoreAddressPattern is AddressPattern


def test_match_precedence_and_any() -> None:
    rules = [parse_address_rule(e) for e in ("*@*", "*@*.corp.example", "*@erp.corp.example")]
    rules.append(parse_address_rule("scan@erp.corp.example"))
    compiled = AddressRules.compile("C", "allowed_senders", rules)
    assert compiled.match(_addr("scan@erp.corp.example")) == "scan@erp.corp.example"
    assert compiled.match(_addr("x@erp.corp.example")) == "*@erp.corp.example"
    assert compiled.match(_addr("x@a.corp.example")) == "*@*.corp.example"
    assert compiled.match(_addr("x@gmail.com")) == "*@*"
    assert compiled.match(None) is None  # *@* is not the null sender
    assert not AddressRules.compile("C", "allowed_senders", ()).restricts


def test_mail_verdicts() -> None:
    printers = _connector("Printers")
    assert _mail(printers, "scan@corp.example") == "250 2.1.0 Sender OK"
    assert _mail(printers, "x@erp.corp.example") == "250 2.1.0 Sender OK"
    assert _mail(printers, "x@a.dev.corp.example") == "250 2.1.0 Sender OK"
    assert _mail(printers, "ceo@corp.example") == ANON_SEND_AS
    assert _mail(printers, "x@dev.corp.example") == ANON_SEND_AS  # subdomains only
    assert _mail(printers, "") == ANON_SEND_AS  # <> not listed
    front = _connector("Front")
    assert _mail(front, "") == "250 2.1.0 Sender OK"
    assert _mail(front, "anyone@example.org") == "250 2.1.0 Sender OK"
    # applies to authenticated sessions too, with the authenticated wording
    assert _mail(printers, "ceo@corp.example", user="alice") == SEND_AS
    # no list: nothing changes (the null sender is always accepted)
    assert _mail(_connector("Open"), "") == "250 2.1.0 Sender OK"


def test_mail_reason_names_the_connector_and_the_entry() -> None:
    printers = _connector("Printers")
    refused = check_mail(
        _addr("ceo@corp.example"),
        rights=session_rights(printers),
        connector=printers,
        accepted_domains=(),
        authenticated=False,
    )
    assert refused.reason == (
        "sender refused: <ceo@corp.example> is not in allowed_senders of connector Printers"
    )
    assert refused.tarpit
    allowed = check_mail(
        _addr("x@erp.corp.example"),
        rights=session_rights(printers),
        connector=printers,
        accepted_domains=(),
        authenticated=False,
    )
    assert allowed.matched == "*@erp.corp.example"
    assert "matches *@erp.corp.example in allowed_senders of connector Printers" in allowed.reason


def test_rcpt_narrows_never_widens() -> None:
    printers = _connector("Printers")
    assert _rcpt(printers, "it@corp.example") == "250 2.1.5 Recipient OK"
    assert _rcpt(printers, "alerts@msp.example") == "250 2.1.5 Recipient OK"
    assert _rcpt(printers, "x@gmail.com") == RCPT_NOT_ALLOWED
    front = _connector("Front")  # no relay right
    assert _rcpt(front, "it@corp.example") == "250 2.1.5 Recipient OK"
    assert _rcpt(front, "bob@partner.example") == RELAY_DENIED  # listed, still not relayed
    assert _rcpt(front, "x@gmail.com") == RELAY_DENIED  # the relay rules answer first


def _from(connector: ReceiveConnector, *values: bytes, user: bool = False) -> str:
    verdict = check_header_from(list(values), connector=connector, authenticated=user)
    return "ok" if verdict.accepted else verdict.reply.line()


def test_header_from_verdicts() -> None:
    printers = _connector("Printers")
    assert _from(printers, b" scan@corp.example\r\n") == "ok"
    assert _from(printers, b' "Scanner" <SCAN@corp.example>\r\n') == "ok"
    assert _from(printers, b" Scanner\r\n <scan@corp.example>,\r\n x@erp.corp.example\r\n") == "ok"
    assert _from(printers) == "ok"  # no From header
    assert _from(printers, b" ceo@corp.example\r\n") == ANON_SEND_AS
    assert _from(printers, b" ceo@corp.example\r\n", user=True) == SEND_AS
    assert _from(printers, b" scan@corp.example, ceo@corp.example\r\n") == ANON_SEND_AS
    assert _from(printers, b" scan@corp.example\r\n", b" ceo@corp.example\r\n") == ANON_SEND_AS
    # the display name is not the address
    assert _from(printers, b' "scan@corp.example" <ceo@corp.example>\r\n') == ANON_SEND_AS
    for bad in (
        b" scan@corp.example <ceo@corp.example>\r\n",
        b" <scan@corp.example> <ceo@corp.example>\r\n",
        b" Undisclosed: scan@corp.example;\r\n",
        b" \r\n",
        b" scanner\r\n",
        b" scan@corp.example\xff\r\n",
        b" scan@corp..example\r\n",
    ):
        assert _from(printers, bad) == BAD_FROM, bad
    # a connector without allowed_senders does not look at the header
    assert _from(_connector("Open"), b" garbage <<\r\n") == "ok"


def test_from_header_addresses_reads_smtputf8() -> None:
    (address,) = from_header_addresses([" Jörg <jörg@bücher.example>\r\n".encode()])
    assert address.domain == "xn--bcher-kva.example" and address.local == "jörg"
