"""Permission groups → rights (exchange-semantics §3.2/§3.3), then the table: rights × accepted-domain types ×
recipients → the exact RCPT reply line (§4, §5.3)."""

from __future__ import annotations

import pytest

from relaygate.addresses import parse_rcpt_to
from relaygate.config import Config, parse_text
from relaygate.policy import rights as r
from relaygate.policy.rights import SessionRights, session_rights
from relaygate.policy.verdicts import check_mail, check_rcpt, match_accepted_domain

OK = "250 2.1.5 Recipient OK"
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
NOT_AUTHENTICATED = "530 5.7.1 Client was not authenticated"

CONFIG = """
[[accepted_domains]]
domain = "corp.example"
domain_type = "Authoritative"

[[accepted_domains]]
domain = "shared.example"
domain_type = "InternalRelay"

[[accepted_domains]]
domain = "hosted.example"
domain_type = "ExternalRelay"

[[accepted_domains]]
domain = "*.wild.example"
domain_type = "Authoritative"

[[receive_connectors]]
name = "No relay right"            # what Default Frontend gives every anonymous client
usage = "Internet"
bindings = ["0.0.0.0:25"]

[[receive_connectors]]
name = "Method A"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/24"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[receive_connectors]]
name = "Method B"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.1.0/24"]
auth_mechanism = ["ExternalAuthoritative"]
permission_groups = ["ExchangeServers"]

[[receive_connectors]]
name = "Client"
usage = "Client"
remote_ip_ranges = ["0.0.0.0-255.255.255.255"]

[[receive_connectors]]
name = "Partner"
usage = "Partner"
bindings = ["0.0.0.0:2525"]
remote_ip_ranges = ["192.0.2.0/24"]

[[receive_connectors]]
name = "Custom, no groups"
bindings = ["0.0.0.0:26"]
remote_ip_ranges = ["10.0.0.0/8"]
"""


@pytest.fixture(scope="module")
def config() -> Config:
    return parse_text(CONFIG, "matrix.toml")


def _rights(config: Config, row: str) -> tuple[SessionRights, bool]:
    """(session rights, authenticated) for each row of the matrix."""
    if row == "ExchangeUsers (authenticated)":
        connector = config.connector("Client")
        assert connector is not None
        return session_rights(connector, authenticated_user="alice"), True
    if row == "Partners":
        # A partner session runs as MS Exchange\Partner Servers (after domain-secure TLS, which is how
        # Exchange authenticates partners); an anonymous session on a Partner connector has no rights.
        connector = config.connector("Partner")
        assert connector is not None
        return session_rights(connector, authenticated_user=r.PARTNER_SERVERS), False
    connector = config.connector(row)
    assert connector is not None
    return session_rights(connector), False


# --- group → rights (§3.2) ---------------------------------------------------------------------------

ANONYMOUS_SET = {
    r.HEADERS_ROUTING,
    r.ACCEPT_ANY_SENDER,
    r.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    r.SUBMIT,
}
EXTERNALLY_SECURED_SET = {
    r.HEADERS_ROUTING,
    r.BYPASS_ANTI_SPAM,
    r.BYPASS_MESSAGE_SIZE_LIMIT,
    r.ACCEPT_ANY_RECIPIENT,
    r.ACCEPT_ANY_SENDER,
    r.ACCEPT_AUTHENTICATION_FLAG,
    r.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    r.ACCEPT_EXCH50,
    r.SUBMIT,
}


def test_anonymous_users_alone_has_no_relay_right(config: Config) -> None:
    rights, _ = _rights(config, "No relay right")
    assert set(rights.rights) == ANONYMOUS_SET
    assert rights.may_submit and not rights.may_relay
    assert rights.principals == (r.ANONYMOUS, "Everyone")
    assert (
        rights.log_tokens()
        == "SMTPSubmit SMTPAcceptAnySender SMTPAcceptAuthoritativeDomainSender AcceptRoutingHeaders"
    )


def test_method_a_adds_accept_any_recipient(config: Config) -> None:
    rights, _ = _rights(config, "Method A")
    assert set(rights.rights) == ANONYMOUS_SET | {r.ACCEPT_ANY_RECIPIENT}
    assert rights.may_relay and not rights.externally_secured and not rights.bypasses_size_limit
    assert (
        dict(rights.sources)[r.ACCEPT_ANY_RECIPIENT]
        == "permission for NT AUTHORITY\\ANONYMOUS LOGON"
    )


def test_method_b_runs_as_externally_secured_servers(config: Config) -> None:
    rights, _ = _rights(config, "Method B")
    assert rights.externally_secured
    assert rights.principals[0] == r.EXTERNALLY_SECURED
    assert set(rights.rights) == EXTERNALLY_SECURED_SET  # no org/forest header rights
    assert rights.may_relay and rights.bypasses_size_limit


def test_exchange_servers_without_external_authoritative_gives_anonymous_nothing() -> None:
    config = parse_text(
        '[[receive_connectors]]\nname = "X"\nbindings = ["0.0.0.0:25"]\nremote_ip_ranges = ["10.0.0.0/24"]\n'
        'permission_groups = ["ExchangeServers"]\n',
        "x.toml",
    )
    rights = session_rights(config.receive_connectors[0])
    assert rights.rights == frozenset() and not rights.externally_secured


def test_exchange_users_need_authentication(config: Config) -> None:
    connector = config.connector("Client")
    assert connector is not None
    assert session_rights(connector).rights == frozenset()  # anonymous on the Client connector
    rights, _ = _rights(config, "ExchangeUsers (authenticated)")
    assert set(rights.rights) == {
        r.HEADERS_ROUTING,
        r.BYPASS_ANTI_SPAM,
        r.ACCEPT_ANY_RECIPIENT,
        r.SUBMIT,
    }
    assert r.AUTHENTICATED_USERS in rights.principals and "alice" in rights.principals


def test_partners_group(config: Config) -> None:
    connector = config.connector("Partner")
    assert connector is not None
    assert session_rights(connector).rights == frozenset()
    rights, _ = _rights(config, "Partners")
    assert set(rights.rights) == {r.HEADERS_ROUTING, r.SUBMIT}


def test_legacy_servers_group_equals_externally_secured_set() -> None:
    grant = r.GROUP_GRANTS["ExchangeLegacyServers"]
    assert set(grant[1]) == EXTERNALLY_SECURED_SET
    assert set(r.GROUP_GRANTS["ExchangeServers"][1]) == EXTERNALLY_SECURED_SET | {
        r.HEADERS_FOREST,
        r.HEADERS_ORGANIZATION,
    }


def test_deny_permission_removes_a_right() -> None:
    config = parse_text(
        '[[receive_connectors]]\nname = "X"\nbindings = ["0.0.0.0:25"]\nremote_ip_ranges = ["10.0.0.0/24"]\n'
        'permission_groups = ["AnonymousUsers"]\n'
        "[[receive_connectors.permissions]]\n"
        'user = "NT AUTHORITY\\\\ANONYMOUS LOGON"\n'
        'extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]\n'
        "[[receive_connectors.permissions]]\n"
        'user = "nt authority\\\\anonymous logon"\n'  # principal names are case-insensitive
        'extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient", "ms-Exch-SMTP-Submit"]\n'
        "deny = true\n",
        "deny.toml",
    )
    rights = session_rights(config.receive_connectors[0])
    assert not rights.may_relay and not rights.may_submit
    assert r.SUBMIT not in dict(rights.sources)


def test_permission_for_another_principal_does_not_apply() -> None:
    config = parse_text(
        '[[receive_connectors]]\nname = "X"\nbindings = ["0.0.0.0:25"]\nremote_ip_ranges = ["10.0.0.0/24"]\n'
        'permission_groups = ["AnonymousUsers"]\n'
        "[[receive_connectors.permissions]]\n"
        'user = "NT AUTHORITY\\\\Authenticated Users"\n'
        'extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]\n',
        "other.toml",
    )
    connector = config.receive_connectors[0]
    assert not session_rights(connector).may_relay
    assert session_rights(connector, authenticated_user="bob").may_relay


# --- MAIL: Submit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "reply"),
    [
        ("No relay right", "250 2.1.0 Sender OK"),
        ("Method A", "250 2.1.0 Sender OK"),
        ("Method B", "250 2.1.0 Sender OK"),
        ("ExchangeUsers (authenticated)", "250 2.1.0 Sender OK"),
        # Partner Servers hold Submit but no sender right: a partner may not use our authoritative domain.
        ("Partners", "550 5.7.1 Anonymous client does not have permissions to send as this sender"),
        ("Custom, no groups", NOT_AUTHENTICATED),
    ],
)
def test_mail_from_own_domain_per_row(config: Config, row: str, reply: str) -> None:
    rights, authenticated = _rights(config, row)
    sender, _ = parse_rcpt_to("TO:<printer@corp.example>")
    connector = config.receive_connectors[0]
    verdict = check_mail(
        sender,
        rights=rights,
        connector=connector,
        accepted_domains=config.accepted_domains,
        authenticated=authenticated,
    )
    assert verdict.reply.line() == reply


# --- the matrix: rights × accepted-domain types × recipients ------------------------------------------

RECIPIENTS = [
    ("user@corp.example", "Authoritative"),
    ("User@CORP.EXAMPLE", "Authoritative"),
    ("user@shared.example", "InternalRelay"),
    ("user@hosted.example", "ExternalRelay"),
    ("user@wild.example", "*.wild.example itself"),
    ("user@sub.wild.example", "*.wild.example subdomain"),
    ("user@a.b.wild.example", "*.wild.example deep subdomain"),
    ("user@sub.corp.example", "subdomain of a non-wildcard domain: external"),
    ("user@corp.example.evil.com", "suffix trick: external"),
    ("user@evilcorp.example", "shared suffix without a dot: external"),
    ("user@notwild.example", "wildcard base without a dot: external"),
    ("victim@nmap.scanme.org", "external"),
]
INTERNAL = {
    "user@corp.example",
    "User@CORP.EXAMPLE",
    "user@shared.example",
    "user@hosted.example",
    "user@wild.example",
    "user@sub.wild.example",
    "user@a.b.wild.example",
}
ROWS = {
    "No relay right": False,
    "Method A": True,
    "Method B": True,
    "ExchangeUsers (authenticated)": True,
    "Partners": False,
}
MATRIX = [
    (row, rcpt, OK if (may_relay or rcpt in INTERNAL) else RELAY_DENIED)
    for row, may_relay in ROWS.items()
    for rcpt, _ in RECIPIENTS
]


@pytest.mark.parametrize(
    ("row", "rcpt", "reply"), MATRIX, ids=[f"{row}|{rcpt}" for row, rcpt, _ in MATRIX]
)
def test_rcpt_matrix(config: Config, row: str, rcpt: str, reply: str) -> None:
    rights, authenticated = _rights(config, row)
    address, _ = parse_rcpt_to(f"TO:<{rcpt}>")
    connector = config.connector("Method A")
    assert connector is not None
    verdict = check_rcpt(
        address,
        rights=rights,
        connector=connector,
        accepted_domains=config.accepted_domains,
        accepted_count=0,
        authenticated=authenticated,
    )
    assert verdict.reply.line() == reply
    if reply == RELAY_DENIED:
        assert "lacks ms-Exch-SMTP-Accept-Any-Recipient" in verdict.reason
        # Exchange tarpits errors to unauthenticated sessions only (§5.5).
        assert verdict.tarpit == (not authenticated)


def test_matrix_covers_every_domain_type(config: Config) -> None:
    types = {d.domain_type for d in config.accepted_domains}
    assert types == {"Authoritative", "InternalRelay", "ExternalRelay"}
    assert len(MATRIX) == len(ROWS) * len(RECIPIENTS)


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("corp.example", "corp.example"),
        ("CORP.example.", "corp.example"),
        ("wild.example", "*.wild.example"),
        ("x.y.wild.example", "*.wild.example"),
        ("corp.example.evil.com", None),
        ("sub.corp.example", None),
        ("notwild.example", None),
    ],
)
def test_match_accepted_domain(config: Config, domain: str, expected: str | None) -> None:
    entry = match_accepted_domain(domain, config.accepted_domains)
    assert (entry.domain if entry else None) == expected


def test_exact_accepted_domain_beats_wildcard() -> None:
    config = parse_text(
        '[[accepted_domains]]\ndomain = "*.corp.example"\ndomain_type = "Authoritative"\n'
        '[[accepted_domains]]\ndomain = "*.eu.corp.example"\ndomain_type = "InternalRelay"\n'
        '[[accepted_domains]]\ndomain = "mail.eu.corp.example"\ndomain_type = "ExternalRelay"\n',
        "d.toml",
    )
    pick = lambda d: match_accepted_domain(d, config.accepted_domains)  # noqa: E731
    assert pick("mail.eu.corp.example").domain_type == "ExternalRelay"  # type: ignore[union-attr]
    assert pick("x.eu.corp.example").domain_type == "InternalRelay"  # type: ignore[union-attr]
    assert pick("x.corp.example").domain_type == "Authoritative"  # type: ignore[union-attr]
