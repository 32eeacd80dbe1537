"""MAIL/RCPT verdicts: the seed scenario (before/after, both methods), sender rules and limits, and the
address vectors of security-bar.md §1B items 5-36 through the parser AND the policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.addresses import Address, AddressError, parse_mail_from, parse_rcpt_to
from relaygate.config import Config, load_config, parse_text
from relaygate.config.model import ReceiveConnector
from relaygate.policy.explain import explain
from relaygate.policy.rights import SessionRights, session_rights
from relaygate.policy.selection import select_connector
from relaygate.policy.verdicts import Verdict, check_mail, check_rcpt

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
LOCAL = "corp.example"
EXT = "nmap.scanme.org"
RIP = "10.0.0.1"  # the relay's own address

SENDER_OK = "250 2.1.0 Sender OK"
OK = "250 2.1.5 Recipient OK"
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
NOT_AUTHENTICATED = "530 5.7.1 Client was not authenticated"
BAD_RCPT = "501 5.1.3 Invalid address"
BAD_SENDER = "501 5.1.7 Invalid address"
LITERAL_REFUSED = "550 5.7.1 Recipient address literal not accepted"
USER_UNKNOWN = "550 5.1.1 User unknown"
SMTPUTF8_REQUIRED = "553 5.6.7 Must declare SMTPUTF8 to send unicode address"
ANON_SEND_AS = "550 5.7.1 Anonymous client does not have permissions to send as this sender"


# --- a tiny pure "session": select → rights → MAIL → RCPT, exactly the functions the server calls -------


def _session(
    config: Config, client: str, local: str = "0.0.0.0", port: int = 25
) -> tuple[ReceiveConnector, SessionRights]:
    selection = select_connector(
        config.receive_connectors, local_ip=local, local_port=port, client_ip=client
    )
    assert selection.connector is not None, f"no connector for {client}"
    return selection.connector, session_rights(selection.connector)


def _rcpt(
    config: Config, connector: ReceiveConnector, rights: SessionRights, arg: str, **kw: object
) -> Verdict:
    address, _ = parse_rcpt_to(arg, smtputf8=bool(kw.pop("smtputf8", False)))
    return check_rcpt(
        address,
        rights=rights,
        connector=connector,
        accepted_domains=config.accepted_domains,
        accepted_count=int(kw.pop("accepted_count", 0)),  # type: ignore[call-overload]
        authenticated=False,
        local_ips=(RIP,),
    )


def _mail(
    config: Config,
    connector: ReceiveConnector,
    rights: SessionRights,
    arg: str,
    size: int | None = None,
) -> Verdict:
    sender, _ = parse_mail_from(arg)
    return check_mail(
        sender,
        rights=rights,
        connector=connector,
        accepted_domains=config.accepted_domains,
        authenticated=False,
        declared_size=size,
    )


def _reply(
    config: Config, client: str, rcpt: str, sender: str = f"scanner@{LOCAL}"
) -> tuple[str, str, str]:
    """(connector name, MAIL reply, RCPT reply) for one transaction."""
    connector, rights = _session(config, client)
    mail = _mail(config, connector, rights, f"FROM:<{sender}>")
    if not mail.accepted:
        return connector.name, mail.reply.line(), "503 5.5.2 Need mail command"
    return (
        connector.name,
        mail.reply.line(),
        _rcpt(config, connector, rights, f"TO:<{rcpt}>").reply.line(),
    )


# --- the seed scenario --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def before() -> Config:
    return load_config(EXAMPLES / "seed-before.toml")


@pytest.fixture(scope="module", params=["seed-after-method-a.toml", "seed-after-method-b.toml"])
def after(request: pytest.FixtureRequest) -> Config:
    return load_config(EXAMPLES / request.param)


@pytest.mark.parametrize("client", ["10.0.0.5", "192.168.12.5", "203.0.113.7"])
def test_seed_before_external_recipient_is_refused(before: Config, client: str) -> None:
    assert _reply(before, client, "someone@gmail.com") == (
        "Default Frontend EXCH01",
        SENDER_OK,
        RELAY_DENIED,
    )
    assert _reply(before, client, f"it@{LOCAL}") == ("Default Frontend EXCH01", SENDER_OK, OK)


@pytest.mark.parametrize("client", ["10.0.0.5", "10.0.0.255", "192.168.12.5", "::ffff:10.0.0.5"])
def test_seed_after_client_in_range_may_relay(after: Config, client: str) -> None:
    assert _reply(after, client, "someone@gmail.com") == ("SMTP Relay EXCH01", SENDER_OK, OK)
    assert _reply(after, client, f"it@{LOCAL}") == ("SMTP Relay EXCH01", SENDER_OK, OK)


@pytest.mark.parametrize(
    "client", ["10.0.1.5", "192.168.12.6", "192.168.12.4", "203.0.113.7", "2001:db8::5"]
)
def test_seed_after_client_outside_ranges_still_may_not(after: Config, client: str) -> None:
    assert _reply(after, client, "someone@gmail.com") == (
        "Default Frontend EXCH01",
        SENDER_OK,
        RELAY_DENIED,
    )


def test_seed_methods_differ_as_exchange_documents() -> None:
    a = load_config(EXAMPLES / "seed-after-method-a.toml")
    b = load_config(EXAMPLES / "seed-after-method-b.toml")
    _, rights_a = _session(a, "10.0.0.5")
    _, rights_b = _session(b, "10.0.0.5")
    assert not rights_a.externally_secured and not rights_a.bypasses_size_limit
    assert rights_b.externally_secured and rights_b.bypasses_size_limit
    # Method A stays anonymous, so its relay denials would be tarpitted; method B is trusted (no tarpit).
    assert rights_a.principals[0] == "NT AUTHORITY\\ANONYMOUS LOGON"
    assert rights_b.principals[0] == "MS Exchange\\Externally Secured Servers"


def test_explain_agrees_with_the_functions(after: Config) -> None:
    result = explain(
        after, client_ip="10.0.0.5", local=("0.0.0.0", 25), sender=None, recipients=["x@gmail.com"]
    )
    assert (
        result.selection.connector is not None
        and result.selection.connector.name == "SMTP Relay EXCH01"
    )
    assert result.recipients[0]["reply"] == OK
    outside = explain(
        after, client_ip="10.0.1.5", local=("0.0.0.0", 25), sender=None, recipients=["x@gmail.com"]
    )
    assert outside.recipients[0]["reply"] == RELAY_DENIED


def test_mail_without_submit_is_530() -> None:
    # The classic mistake: a -Custom connector whose PermissionGroups were never set.
    text = (EXAMPLES / "seed-after-method-a.toml").read_text(encoding="utf-8")
    text = text.replace('permission_groups = ["AnonymousUsers"]\n', "")
    config = parse_text(text, "custom-no-groups.toml")
    connector, rights = _session(config, "10.0.0.5")
    assert connector.name == "SMTP Relay EXCH01" and connector.permission_groups == ()
    verdict = _mail(config, connector, rights, f"FROM:<scanner@{LOCAL}>")
    assert verdict.reply.line() == NOT_AUTHENTICATED
    assert _mail(config, connector, rights, "FROM:<>").reply.line() == NOT_AUTHENTICATED


# --- sender rules, size, recipient limit, reserved domains ----------------------------------------------

RULES = f"""
[[accepted_domains]]
domain = "{LOCAL}"

[[accepted_domains]]
domain = "shared.example"
domain_type = "InternalRelay"

[[receive_connectors]]
name = "Internet"
usage = "Internet"
bindings = ["0.0.0.0:25"]

[[receive_connectors]]
name = "No spoofing of our domain"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.1.0.0/16"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"]
deny = true

[[receive_connectors]]
name = "Only our senders"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.2.0.0/16"]
permission_groups = ["AnonymousUsers"]
max_message_size = "10MB"
max_recipients_per_message = 3

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Sender"]
deny = true

[[receive_connectors]]
name = "Relay, reserved domains refused"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.4.0.0/16"]
permission_groups = ["AnonymousUsers"]
reject_reserved_top_level_recipient_domains = true
reject_reserved_second_level_recipient_domains = true
reject_single_label_recipient_domains = true

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[receive_connectors]]
name = "Externally secured"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.3.0.0/16"]
auth_mechanism = ["ExternalAuthoritative"]
permission_groups = ["ExchangeServers"]
max_message_size = "10MB"
max_recipients_per_message = 3
"""


@pytest.fixture(scope="module")
def rules() -> Config:
    return parse_text(RULES, "rules.toml")


@pytest.mark.parametrize(
    ("client", "sender", "reply"),
    [
        ("203.0.113.9", "<>", SENDER_OK),  # item 24: the null sender MUST be accepted
        (
            "203.0.113.9",
            f"<ceo@{LOCAL}>",
            SENDER_OK,
        ),  # AnonymousUsers keeps Authoritative-Domain-Sender
        ("203.0.113.9", "<x@evil.example>", SENDER_OK),
        ("10.1.0.9", f"<ceo@{LOCAL}>", ANON_SEND_AS),  # the classic anti-spoofing setting
        ("10.1.0.9", "<x@evil.example>", SENDER_OK),  # still has Accept-Any-Sender
        ("10.1.0.9", "<>", SENDER_OK),
        ("10.2.0.9", f"<app@{LOCAL}>", SENDER_OK),  # item 50: only our senders
        ("10.2.0.9", "<app@shared.example>", SENDER_OK),
        ("10.2.0.9", "<x@evil.example>", ANON_SEND_AS),
        ("10.2.0.9", f"<x@{LOCAL}.evil.example>", ANON_SEND_AS),  # suffix trick
        ("10.2.0.9", "<>", SENDER_OK),
        ("10.3.0.9", "<x@evil.example>", SENDER_OK),
    ],
)
def test_sender_rules(rules: Config, client: str, sender: str, reply: str) -> None:
    connector, rights = _session(rules, client)
    assert _mail(rules, connector, rights, f"FROM:{sender}").reply.line() == reply


def test_authenticated_client_may_send_as_own_domain() -> None:
    config = parse_text(
        f'[[accepted_domains]]\ndomain = "{LOCAL}"\n'
        '[[receive_connectors]]\nname = "Client"\nusage = "Client"\nremote_ip_ranges = ["10.0.0.0/8"]\n',
        "client.toml",
    )
    connector = config.receive_connectors[0]
    rights = session_rights(connector, authenticated_user="alice")
    sender, _ = parse_mail_from(f"FROM:<alice@{LOCAL}>")
    kw = {"rights": rights, "connector": connector, "accepted_domains": config.accepted_domains}
    assert check_mail(sender, authenticated=True, **kw).reply.line() == SENDER_OK  # type: ignore[arg-type]
    outsider, _ = parse_mail_from("FROM:<alice@gmail.com>")
    assert (
        check_mail(outsider, authenticated=True, **kw).reply.line()  # type: ignore[arg-type]
        == "550 5.7.1 Client does not have permissions to send as this sender"
    )


def test_forged_local_sender_does_not_grant_relay(rules: Config) -> None:
    # item 25: relay permission never depends on the sender address (RFC 2505 §2.1)
    connector, rights = _session(rules, "203.0.113.9")
    assert _mail(rules, connector, rights, f"FROM:<ceo@{LOCAL}>").accepted
    assert _rcpt(rules, connector, rights, f"TO:<victim@{EXT}>").reply.line() == RELAY_DENIED


def test_null_sender_accepted_but_relay_still_refused(rules: Config) -> None:
    # item 24 / Nmap row 1
    connector, rights = _session(rules, "203.0.113.9")
    assert _mail(rules, connector, rights, "FROM:<>").reply.line() == SENDER_OK
    assert _rcpt(rules, connector, rights, f"TO:<victim@{EXT}>").reply.line() == RELAY_DENIED


def test_declared_size(rules: Config) -> None:
    connector, rights = _session(rules, "10.2.0.9")
    too_big = "552 5.3.4 Message size exceeds fixed maximum message size"
    assert (
        _mail(rules, connector, rights, f"FROM:<a@{LOCAL}>", size=10 * 1024**2).reply.line()
        == SENDER_OK
    )
    assert (
        _mail(rules, connector, rights, f"FROM:<a@{LOCAL}>", size=10 * 1024**2 + 1).reply.line()
        == too_big
    )
    # Externally secured sessions hold ms-Exch-Bypass-Message-Size-Limit (§3.3 method B).
    connector_b, rights_b = _session(rules, "10.3.0.9")
    assert (
        _mail(rules, connector_b, rights_b, f"FROM:<a@{LOCAL}>", size=50 * 1024**2).reply.line()
        == SENDER_OK
    )


@pytest.mark.parametrize("client", ["10.2.0.9", "10.3.0.9"])
def test_max_recipients_is_452_for_each_extra_rcpt(rules: Config, client: str) -> None:
    connector, rights = _session(rules, client)
    replies_ = [
        _rcpt(rules, connector, rights, f"TO:<u{i}@{LOCAL}>", accepted_count=i).reply.line()
        for i in range(5)
    ]
    assert replies_ == [
        OK,
        OK,
        OK,
        "452 4.5.3 Too many recipients",
        "452 4.5.3 Too many recipients",
    ]


@pytest.mark.parametrize(
    ("rcpt", "reply"),
    [
        ("user@printer.test", "550 5.1.4 Recipient address reserved by RFC 2606"),
        ("user@host.localhost", "550 5.1.4 Recipient address reserved by RFC 2606"),
        ("user@example.com", "550 5.1.5 Recipient address reserved by RFC 2606"),
        ("user@mail.example.org", "550 5.1.5 Recipient address reserved by RFC 2606"),
        ("user@printserver", "550 5.1.6 Recipient addresses in single label domains not accepted"),
        ("user@gmail.com", OK),
    ],
)
def test_reserved_and_single_label_domains(rules: Config, rcpt: str, reply: str) -> None:
    connector, rights = _session(rules, "10.4.0.9")
    assert rights.may_relay  # the reserved-domain rules apply even to sessions that may relay
    assert _rcpt(rules, connector, rights, f"TO:<{rcpt}>").reply.line() == reply


# --- security-bar §1B items 5-36 ------------------------------------------------------------------------
# (T): a trusted connector that may deliver only to LOCAL (AnonymousUsers, no relay right);
# (U): an untrusted client on Default Frontend. Expected: refused, or kept at LOCAL; never routed to EXT.

VECTORS = f"""
[[accepted_domains]]
domain = "{LOCAL}"

[[accepted_domains]]
domain = "xn--bcher-kva.example"

[[receive_connectors]]
name = "Default Frontend"
usage = "Internet"
bindings = ["0.0.0.0:25"]

[[receive_connectors]]
name = "Trusted, LOCAL only"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/24"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors]]
name = "Relay (method A)"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.1.0/24"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
"""
TRUSTED, UNTRUSTED, RELAY = "10.0.0.50", "203.0.113.50", "10.0.1.50"

# (item, RCPT argument, expected reply, the address policy judged or None when the parser refused it)
ITEMS: list[tuple[str, str, str, str | None]] = [
    ("5 percent hack", f"TO:<victim%{EXT}@{LOCAL}>", RELAY_DENIED, f"victim%{EXT}@{LOCAL}"),
    ("6 chained percent", f"TO:<a%b%{EXT}@{LOCAL}>", RELAY_DENIED, f"a%b%{EXT}@{LOCAL}"),
    ("7 bang path via LOCAL", f"TO:<{EXT}!victim@{LOCAL}>", RELAY_DENIED, f"{EXT}!victim@{LOCAL}"),
    ("7 bare bang path", f"TO:<{LOCAL}!{EXT}!victim>", BAD_RCPT, None),
    (
        "8 multi-hop source route",
        f"TO:<@{LOCAL},@hop2.example:victim@{EXT}>",
        RELAY_DENIED,
        f"victim@{EXT}",
    ),
    ("9 reverse source route", f"TO:<@{EXT}:user@{LOCAL}>", OK, f"user@{LOCAL}"),
    ("10 quoted @", f'TO:<"victim@{EXT}"@{LOCAL}>', RELAY_DENIED, f'"victim@{EXT}"@{LOCAL}'),
    ("11 quoted %", f'TO:<"victim%{EXT}"@{LOCAL}>', RELAY_DENIED, f'"victim%{EXT}"@{LOCAL}'),
    ("12 double @ EXT@LOCAL", f"TO:<victim@{EXT}@{LOCAL}>", BAD_RCPT, None),
    ("12 double @ LOCAL@EXT", f"TO:<victim@{LOCAL}@{EXT}>", BAD_RCPT, None),
    ("13 own IP literal", f"TO:<victim@[{RIP}]>", USER_UNKNOWN, f"victim@[{RIP}]"),
    (
        "13 own IP literal, mapped",
        f"TO:<victim@[IPv6:::ffff:{RIP}]>",
        USER_UNKNOWN,
        "victim@[IPv6:::ffff:a00:1]",
    ),
    ("14 external literal", "TO:<victim@[203.0.113.9]>", RELAY_DENIED, "victim@[203.0.113.9]"),
    ("15 malformed literal 999", "TO:<victim@[999.1.1.1]>", BAD_RCPT, None),
    ("15 malformed literal short", "TO:<victim@[1.2.3]>", BAD_RCPT, None),
    ("15 malformed literal IPv6", "TO:<victim@[IPv6:zz::1]>", BAD_RCPT, None),
    ("15 malformed literal blanks", "TO:<victim@[ 10.0.0.1 ]>", BAD_RCPT, None),
    ("15 loopback literal", "TO:<victim@[127.0.0.1]>", LITERAL_REFUSED, "victim@[127.0.0.1]"),
    (
        "15 mapped loopback literal",
        "TO:<victim@[IPv6:::ffff:127.0.0.1]>",
        LITERAL_REFUSED,
        "victim@[IPv6:::ffff:7f00:1]",
    ),
    (
        "15 metadata literal",
        "TO:<victim@[169.254.169.254]>",
        LITERAL_REFUSED,
        "victim@[169.254.169.254]",
    ),
    ("15 IPv6 loopback literal", "TO:<victim@[IPv6:::1]>", LITERAL_REFUSED, "victim@[IPv6:::1]"),
    ("16 numeric domain", "TO:<victim@203.0.113.9>", BAD_RCPT, None),
    ("16 inet_aton numeric domain", "TO:<victim@127.1>", BAD_RCPT, None),
    ("17 trailing dot EXT", f"TO:<victim@{EXT}.>", RELAY_DENIED, f"victim@{EXT}"),
    ("17 trailing dot LOCAL", f"TO:<user@{LOCAL}.>", OK, f"user@{LOCAL}"),
    ("18 case", "TO:<User@CoRp.ExAmPlE>", OK, f"User@{LOCAL}"),
    (
        "19 A-label of an accepted IDN",
        "TO:<user@xn--bcher-kva.example>",
        OK,
        "user@xn--bcher-kva.example",
    ),
    ("19 U-label without SMTPUTF8", "TO:<user@bücher.example>", SMTPUTF8_REQUIRED, None),
    ("19 Cyrillic homoglyph without SMTPUTF8", "TO:<user@сorp.example>", SMTPUTF8_REQUIRED, None),
    ("20 null domain", "TO:<victim@>", BAD_RCPT, None),
    ("21 unqualified", "TO:<victim>", BAD_RCPT, None),
    ("22 postmaster", "TO:<postmaster>", OK, "postmaster"),
    ("22 postmaster any case", "TO:<PostMaster>", OK, "postmaster"),
    ("23 null recipient", "TO:<>", BAD_RCPT, None),
    ("27 space after colon", f"TO: <victim@{EXT}>", RELAY_DENIED, f"victim@{EXT}"),
    ("27 no angle brackets", f"TO:victim@{EXT}", BAD_RCPT, None),
    ("27 lower-case keyword", f"to:<victim@{EXT}>", RELAY_DENIED, f"victim@{EXT}"),
    ("27 trailing blank", f"TO:<victim@{EXT}> ", RELAY_DENIED, f"victim@{EXT}"),
    ("27 double brackets", f"TO:<<victim@{EXT}>>", BAD_RCPT, None),
    ("27 display name", f"TO:<Name <victim@{EXT}>>", BAD_RCPT, None),
    ("28 comment after quoted local", f'TO:<"user"@{LOCAL}(x){EXT}>', BAD_RCPT, None),
    ("28 comment in domain", f"TO:<user@{LOCAL} (c) .{EXT}>", BAD_RCPT, None),
    ("28 comment holding an address", f"TO:<victim@{EXT}(<user@{LOCAL}>)>", BAD_RCPT, None),
    (
        "29 quoted @ and space",
        f'TO:<"victim@{EXT} x"@{LOCAL}>',
        RELAY_DENIED,
        f'"victim@{EXT} x"@{LOCAL}',
    ),
    ("30 parseaddr 1", f"TO:alice@{LOCAL})<victim@{EXT}>", BAD_RCPT, None),
    ("30 parseaddr 2", f"TO:<alice@{LOCAL}(<victim@{EXT}>>", BAD_RCPT, None),
    ("30 parseaddr 3", f"TO:<alice@{LOCAL}<<victim@{EXT}>>", BAD_RCPT, None),
    ("31 NUL before @", f"TO:<victim@{EXT}\x00@{LOCAL}>", BAD_RCPT, None),
    ("31 NUL in domain", f"TO:<user@{LOCAL}\x00.{EXT}>", BAD_RCPT, None),
    ("31 TAB in local part", f"TO:<user\t@{LOCAL}>", BAD_RCPT, None),
    ("32 bare LF joins two commands", f"TO:<user@{LOCAL}>\nRCPT TO:<victim@{EXT}>", BAD_RCPT, None),
    ("33 local part 65", f"TO:<{'a' * 65}@{LOCAL}>", BAD_RCPT, None),
    ("33 label 64", f"TO:<a@{'b' * 64}.{LOCAL}>", BAD_RCPT, None),
    ("33 domain over 255", f"TO:<a@{('b' * 60 + '.') * 5}{LOCAL}>", BAD_RCPT, None),
    ("33 path over 256", f"TO:<{'a' * 64}@{('b' * 60 + '.') * 3}{LOCAL}>", BAD_RCPT, None),
    ("34 unicode without SMTPUTF8", f"TO:<用户@{EXT}>", SMTPUTF8_REQUIRED, None),
]


@pytest.fixture(scope="module")
def vectors() -> Config:
    return parse_text(VECTORS, "vectors.toml")


def _judge(
    config: Config, client: str, arg: str, smtputf8: bool = False
) -> tuple[str, Address | None]:
    connector, rights = _session(config, client)
    try:
        address, _ = parse_rcpt_to(arg, smtputf8=smtputf8)
    except AddressError as exc:
        return exc.reply.line(), None
    verdict = check_rcpt(
        address,
        rights=rights,
        connector=connector,
        accepted_domains=config.accepted_domains,
        accepted_count=0,
        authenticated=False,
        local_ips=(RIP,),
    )
    return verdict.reply.line(), address


@pytest.mark.parametrize("client", [TRUSTED, UNTRUSTED], ids=["T", "U"])
@pytest.mark.parametrize(("item", "arg", "reply", "judged"), ITEMS, ids=[i[0] for i in ITEMS])
def test_address_vector(
    vectors: Config, client: str, item: str, arg: str, reply: str, judged: str | None
) -> None:
    got, address = _judge(vectors, client, arg)
    assert got == reply, item
    assert (str(address) if address is not None else None) == judged
    if got.startswith("2"):
        # accepted only ever for LOCAL (or the domain-less postmaster): never routed to EXT
        assert address is not None and address.domain in (LOCAL, "xn--bcher-kva.example", "")
        assert EXT not in address.domain


def test_relay_session_keeps_routing_characters_at_local(vectors: Config) -> None:
    # A session that may relay accepts the percent hack, but for LOCAL with the local part untouched.
    got, address = _judge(vectors, RELAY, f"TO:<victim%{EXT}@{LOCAL}>")
    assert got == OK and address == Address(f"victim%{EXT}", LOCAL)
    got, address = _judge(vectors, RELAY, f'TO:<"victim@{EXT} x"@{LOCAL}>')
    assert got == OK and address is not None and address.domain == LOCAL


@pytest.mark.parametrize(
    "literal", ["[127.0.0.1]", "[IPv6:::ffff:127.0.0.1]", "[169.254.169.254]", "[0.0.0.0]"]
)
def test_dangerous_literals_refused_even_when_relay_is_allowed(
    vectors: Config, literal: str
) -> None:
    assert _judge(vectors, RELAY, f"TO:<victim@{literal}>")[0] == LITERAL_REFUSED


def test_external_literal_from_relay_session_is_a_documented_policy(vectors: Config) -> None:
    # item 14 (T): a session with Accept-Any-Recipient may use a routable literal, like any other domain.
    assert _judge(vectors, RELAY, "TO:<victim@[203.0.113.9]>")[0] == OK
    assert _judge(vectors, RELAY, f"TO:<victim@[{RIP}]>")[0] == USER_UNKNOWN


def test_trailing_dot_gets_the_same_decision(vectors: Config) -> None:
    for client in (TRUSTED, UNTRUSTED, RELAY):
        for address in (f"victim@{EXT}", f"user@{LOCAL}"):
            assert (
                _judge(vectors, client, f"TO:<{address}.>")[0]
                == _judge(vectors, client, f"TO:<{address}>")[0]
            )


def test_idn_equivalence_and_homoglyph_with_smtputf8(vectors: Config) -> None:
    # item 19: the U-label is the accepted A-label domain; the Cyrillic homoglyph is another domain.
    got, address = _judge(vectors, TRUSTED, "TO:<user@bücher.example>", smtputf8=True)
    assert got == OK and address is not None and address.domain == "xn--bcher-kva.example"
    got, address = _judge(vectors, TRUSTED, "TO:<user@сorp.example>", smtputf8=True)
    assert got == RELAY_DENIED and address is not None and address.domain != LOCAL


def test_smtputf8_recipient_refused_like_ascii(vectors: Config) -> None:
    # item 34
    assert _judge(vectors, UNTRUSTED, f"TO:<用户@{EXT}>", smtputf8=True)[0] == RELAY_DENIED


def test_mixed_recipients_are_judged_independently(vectors: Config) -> None:
    # item 35: the refused recipient is not accepted along with the good one
    result = explain(
        vectors,
        client_ip=TRUSTED,
        local=("0.0.0.0", 25),
        sender=f"app@{LOCAL}",
        recipients=[f"a@{LOCAL}", f"b@{EXT}"],
    )
    assert [r["reply"] for r in result.recipients] == [OK, RELAY_DENIED]


def test_mail_from_vectors(vectors: Config) -> None:
    connector, rights = _session(vectors, UNTRUSTED)
    assert _mail(vectors, connector, rights, "FROM:<>").reply.line() == SENDER_OK
    for bad in (f"FROM:<a@{EXT}@{LOCAL}>", "FROM:<a@>", "FROM:<postmaster>", "FROM:a@b.example"):
        with pytest.raises(AddressError) as info:
            parse_mail_from(bad)
        assert info.value.reply.line() == BAD_SENDER


# Items 26 (HELO spoofing) and 36 (RSET) are session behaviour: selection takes only the local
# endpoint and the client IP, and verdicts keep no state. They are tested against a running server in
# tests/smtp/test_session.py (test_helo_spoofing_never_grants_relay, test_rset_re_evaluates_every_recipient).


def test_explain_knows_the_relays_own_literal(vectors: Config) -> None:
    # item 13 through explain: with an exact local address, [RIP] is this relay (550 5.1.1), as in the server
    result = explain(
        vectors, client_ip=RELAY, local=(RIP, 25), sender=None, recipients=[f"victim@[{RIP}]"]
    )
    assert result.recipients[0]["reply"] == USER_UNKNOWN
