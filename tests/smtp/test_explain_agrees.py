"""`relaygate explain` and the server give the same reply to the same client (security-bar §1B/§1C).

Each case runs a real SMTP session to the in-process server, the client bound to a 127.0.0.x source
address, and asks `relaygate.policy.explain.explain` (what the CLI and the admin centre show) the
same question on the same loaded config: the replies must be equal, byte for byte.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from relaygate.policy.explain import explain
from tests.smtp.conftest import default_frontend, relay_connector

PASSWORD = "correct horse battery staple"
ON_LIST = "127.0.0.5"  # inside the relay connector's RemoteIPRanges
OFF_LIST = "127.0.0.9"  # only the catch-all Default Frontend


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small argon2 parameters for the hashes made here (verification reads them from the hash)."""
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )


@pytest.fixture
def two_connectors(relay):
    """A catch-all without relay (AnonymousUsers + ExchangeUsers, AUTH not offered) and a method-A
    relay connector for 127.0.0.5, both on one binding."""
    return relay(
        [
            default_frontend(
                permission_groups=["AnonymousUsers", "ExchangeUsers"], max_protocol_errors=50
            ),
            relay_connector([ON_LIST], max_protocol_errors=50),
        ],
        domains=[
            {"domain": "corp.example", "domain_type": "Authoritative", "default": True},
            {"domain": "*.branch.example", "domain_type": "InternalRelay"},
        ],
    )


def server_replies(r, source: str, mail: str, rcpts: list[str], *, auth: str = "") -> list[str]:
    """The MAIL reply then each RCPT reply of one real session (AUTH PLAIN first when `auth`)."""
    with r.raw(source) as c:
        c.greet()
        if auth:
            blob = base64.b64encode(f"\0{auth}\0{PASSWORD}".encode()).decode()
            c.cmd(f"AUTH PLAIN {blob}")
        out = [c.cmd(f"MAIL FROM:{mail}").text]
        out += [c.cmd(f"RCPT TO:<{rcpt}>").text for rcpt in rcpts]
        c.cmd("QUIT")
    return out


def explain_replies(
    r, source: str, sender: str, rcpts: list[str], *, auth: str | None = None
) -> list[str]:
    result = explain(
        r.config,
        client_ip=source,
        local=("127.0.0.1", r.port),
        sender=sender,
        recipients=rcpts,
        authenticated_user=auth,
    ).to_dict()
    return [result["mail"]["reply"], *(rc["reply"] for rc in result["recipients"])]


TRICKS = [
    "victim%evil.example@corp.example",
    "a%b%evil.example@corp.example",
    "evil.example!victim@corp.example",
    "@corp.example,@hop2.example:victim@evil.example",
    "@evil.example:user@corp.example",
    '"victim@evil.example"@corp.example',
    '"victim@evil.example x"@corp.example',
    "victim@evil.example@corp.example",
    "victim@[203.0.113.9]",
    "victim@[127.0.0.1]",
    "victim@[IPv6:::ffff:127.0.0.1]",
    "victim@[169.254.169.254]",
    "victim@203.0.113.9",
    "user@corp.example.",
    "user@CoRp.ExAmPlE",
    "victim@evil.corp.example",
    "victim@corp.example.evil.example",
    "victim@a.branch.example",
    "victim@branch.example",
    "victim@",
    "postmaster",
    "victim@evil.example",
    "v" * 65 + "@corp.example",
    "u" * 60 + "@" + ".".join(["label"] * 40) + ".corp.example",
    "victim@[IPv6:fe80::1]",
    "victim@[IPv6:::1]",
    "victim@[0.0.0.0]",
    "victim@[1.2.3]",
    "victim@[ 10.0.0.1 ]",
    "victim@[IPv6:zz::1]",
    "victim@localhost",
    "victim@corp",
    "user@corp.example(x)evil.example",
]


@pytest.mark.parametrize("source", [OFF_LIST, ON_LIST])
def test_relay_tricks_get_the_same_reply_from_explain_and_the_server(two_connectors, source):
    r = two_connectors
    for rcpt in TRICKS:
        server = server_replies(r, source, "<app@corp.example>", [rcpt])
        assert explain_replies(r, source, "app@corp.example", [rcpt]) == server, rcpt


def test_an_external_recipient_is_refused_off_the_list_and_relayed_on_it(two_connectors):
    """The two connectors are the ones the cases above mean (not both refusing, not both relaying)."""
    rcpt = ["victim@evil.example"]
    off = server_replies(two_connectors, OFF_LIST, "<app@corp.example>", rcpt)
    on = server_replies(two_connectors, ON_LIST, "<app@corp.example>", rcpt)
    assert off[1].startswith("550 5.7.54")
    assert on[1] == "250 2.1.5 Recipient OK"


def add_user(r, name: str) -> None:
    from typer.testing import CliRunner

    from relaygate.cli import app

    done = CliRunner().invoke(
        app,
        ["user", "add", name, "--password-stdin", "--config", str(r.config_path)],
        input=PASSWORD + "\n",
    )
    assert done.exit_code == 0, done.stdout


def explain_cli(r, *args: str) -> str:
    """`relaygate explain ... --local 127.0.0.1:PORT` (text) on the relay's config."""
    from typer.testing import CliRunner

    from relaygate.cli import app

    local = f"127.0.0.1:{r.port}"
    done = CliRunner().invoke(
        app,
        ["explain", "--config", str(r.config_path), "--local", local, *args],
        env={"COLUMNS": "250", "NO_COLOR": "1"},
    )
    assert done.exit_code == 0, done.stdout
    return done.stdout


def explained_for_alice(r: Any, rcpts: list[str], server: list[str]) -> dict[str, Any]:
    """explain's answer for a session from OFF_LIST authenticated as alice, checked to give the
    server's own replies (MAIL, then each RCPT)."""
    result = explain(
        r.config,
        client_ip=OFF_LIST,
        local=("127.0.0.1", r.port),
        sender="alice@corp.example",
        recipients=rcpts,
        authenticated_user="alice",
    ).to_dict()
    assert [result["mail"]["reply"], *(rc["reply"] for rc in result["recipients"])] == server
    return result


def test_auth_user_on_a_connector_that_offers_no_auth_is_explained_as_the_server_treats_it(
    two_connectors,
):
    """Default Frontend grants ExchangeUsers (relay for authenticated users) but its auth_mechanism
    has no BasicAuth: the server answers AUTH with 504 and the session stays anonymous, so explain
    --auth-user must not show alice relaying there."""
    r = two_connectors
    add_user(r, "alice")
    rcpts = ["victim@evil.example", "it@corp.example"]
    server = server_replies(r, OFF_LIST, "<alice@corp.example>", rcpts, auth="alice")
    assert server[1].startswith("550 5.7.54")  # the session could not authenticate
    result = explained_for_alice(r, rcpts, server)
    assert result["auth"] == {
        "user": "alice",
        "reply": "504 5.7.4 Unrecognized authentication type",
        "reason": "receive connector Default Frontend does not offer AUTH (its auth_mechanism has "
        "no BasicAuth): the session stays anonymous",
    }
    assert "NT AUTHORITY\\ANONYMOUS LOGON" in result["principals"]
    text = explain_cli(r, "--client-ip", OFF_LIST, "--auth-user", "alice", "--to", rcpts[0])
    assert "  AUTH as alice → 504 5.7.4 Unrecognized authentication type\n" in text
    assert "    because receive connector Default Frontend does not offer AUTH" in text
    assert "  RCPT TO:<victim@evil.example> → 550 5.7.54" in text


def test_auth_user_on_a_connector_that_offers_auth_relays_in_both(relay):
    r = relay(
        [
            default_frontend(
                name="Client Submission",
                auth_mechanism=["Tls", "BasicAuth"],
                permission_groups=["ExchangeUsers"],
            )
        ]
    )
    add_user(r, "alice")
    rcpts = ["victim@evil.example"]
    server = server_replies(r, OFF_LIST, "<alice@corp.example>", rcpts, auth="alice")
    assert server == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    result = explained_for_alice(r, rcpts, server)
    assert result["auth"] == {
        "user": "alice",
        "reply": "235 2.7.0 Authentication successful",
        "reason": "receive connector Client Submission offers AUTH PLAIN LOGIN",
    }


@pytest.mark.parametrize(
    ("sender", "rcpt"),
    [
        ("app@corp.example", "用户@corp.example"),
        ("app@corp.example", "用户@evil.example"),
        ("app@corp.example", "user@bücher.example"),
        ("用户@corp.example", "it@corp.example"),
        ("app@corp.example", "user@xn--bcher-kva.example"),
    ],
)
@pytest.mark.parametrize("source", [OFF_LIST, ON_LIST])
def test_an_smtputf8_address_gets_the_reply_a_client_declaring_smtputf8_gets(
    two_connectors, source, sender, rcpt
):
    """A client sending a non-ASCII address must declare SMTPUTF8 (RFC 6531), and then the policy
    decides: explain must show that decision, not the 553 5.6.7 of a client that forgot it."""
    server = server_replies(two_connectors, source, f"<{sender}> SMTPUTF8", [rcpt])
    assert explain_replies(two_connectors, source, sender, [rcpt]) == server


def test_a_sender_given_with_its_smtputf8_parameter_is_not_given_it_twice(two_connectors):
    r = two_connectors
    rcpt = ["用户@corp.example"]
    server = server_replies(r, OFF_LIST, "<app@corp.example> SMTPUTF8", rcpt)
    assert server == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK"]
    assert explain_replies(r, OFF_LIST, "<app@corp.example> SMTPUTF8", rcpt) == server


@pytest.mark.parametrize(
    ("sender", "rcpt"),
    [("jürgen@corp.example", "a@corp.example"), ("a@corp.example", "用户@x.example")],
)
def test_smtputf8_on_a_connector_without_8bitmime_is_explained_as_the_server_refuses_it(
    relay, sender, rcpt
):
    """Such a connector does not offer SMTPUTF8 (RFC 6531 §3.1: only with 8BITMIME): the client
    declaring it gets 501 5.5.4 at MAIL, and explain says so."""
    r = relay([relay_connector([ON_LIST], eight_bit_mime_enabled=False)])
    server = server_replies(r, ON_LIST, f"<{sender}> SMTPUTF8", [rcpt])
    assert server == ["501 5.5.4 Unrecognized parameter", "503 5.5.2 Need mail command"]
    assert explain_replies(r, ON_LIST, sender, [rcpt]) == server


def test_explain_tells_that_a_require_tls_connector_refuses_mail_before_starttls(relay):
    """A printer that never sends STARTTLS gets 530 5.7.0 at MAIL on a require_tls connector:
    explain says so next to the replies a client gets after STARTTLS."""
    r = relay([relay_connector([ON_LIST], require_tls=True)])
    server = server_replies(r, ON_LIST, "<app@corp.example>", [])
    assert server == ["530 5.7.0 Must issue a STARTTLS command first"]
    result = explain(
        r.config,
        client_ip=ON_LIST,
        local=("127.0.0.1", r.port),
        sender="app@corp.example",
        recipients=["victim@evil.example"],
    ).to_dict()
    assert result["tls"] == {
        "required": True,
        "reply_before_starttls": server[0],
        "reason": "receive connector SMTP Relay Internal has require_tls: a session that has not "
        "sent STARTTLS gets this at MAIL (and AUTH); the replies shown are those after STARTTLS",
    }
    text = explain_cli(r, "--client-ip", ON_LIST, "--from", "app@corp.example")
    assert f"  TLS required: MAIL before STARTTLS → {server[0]}\n" in text


def test_auth_user_on_a_require_tls_connector_is_explained_as_after_starttls(relay):
    """require_tls keeps AUTH until STARTTLS, as BasicAuthRequireTLS does: explain says so."""
    r = relay(
        [
            default_frontend(
                name="Client Submission",
                auth_mechanism=["Tls", "BasicAuth"],
                permission_groups=["ExchangeUsers"],
                require_tls=True,
            )
        ]
    )
    add_user(r, "alice")
    with r.raw(OFF_LIST) as c:
        c.greet()
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {blob}").text == "530 5.7.0 Must issue a STARTTLS command first"
    result = explain(
        r.config,
        client_ip=OFF_LIST,
        local=("127.0.0.1", r.port),
        sender="alice@corp.example",
        recipients=["victim@evil.example"],
        authenticated_user="alice",
    ).to_dict()
    assert result["auth"]["reason"] == (
        "receive connector Client Submission offers AUTH PLAIN LOGIN after STARTTLS (require_tls)"
    )
