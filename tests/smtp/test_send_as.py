"""A user's send-as list (`relaygate user add --send-as`, `relaygate user send-as`), end to end: the CLI
and the users file, real smtplib sessions that AUTH against the in-process relay, a real SMTP sink
(aiosmtpd) as the smart host (what is refused is never queued nor delivered, what is allowed
arrives), a list changed while a session is open, and `relaygate explain` giving the server's reply."""

from __future__ import annotations

import base64
import json
import logging
import smtplib
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from relaygate.config.loader import load_config
from relaygate.policy.explain import explain
from relaygate.smtp.auth import UserStore
from tests.smtp.conftest import RelayHandle, _Errors
from tests.smtp.test_allowed_addresses import Sink
from tests.smtp.test_auth import PASSWORD, auth_connector, cli
from tests.smtp.test_auth import cheap_argon2 as cheap_argon2  # the autouse fixture, here too

USER_SEND_AS = "550 5.7.1 Client does not have permissions to send as this sender"
SENDER_OK = "250 2.1.0 Sender OK"
RCPT_OK = "250 2.1.5 Recipient OK"
GONE = "421 4.3.2 Service not available"
DOMAINS = [
    {"domain": "corp.example", "domain_type": "Authoritative", "default": True},
    {"domain": "*.corp.example", "domain_type": "InternalRelay"},
]


@pytest.fixture
def sink() -> Any:
    s = Sink()
    s.controller.start()
    try:
        yield s
    finally:
        s.controller.stop()


def start(relay: Any, sink: Sink, **connector: Any) -> RelayHandle:
    """The submission connector (ExchangeUsers, BasicAuth), delivering to the sink; the senders
    of corp.example and its subdomains are in accepted domains (ExchangeUsers has no
    Accept-Any-Sender)."""
    node = relay([auth_connector(**connector)], start=False, domains=DOMAINS)
    node.doc["send_connectors"][0]["port"] = sink.controller.port
    node.doc["send_connectors"][0]["name"] = "Smart host (sink)"
    node.doc["queue"]["transient_failure_retry_interval"] = "00:00:01"
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.config = load_config(node.config_path)
    return node.start()


def add_user(r: RelayHandle, name: str, *send_as: str) -> None:
    options = [arg for pattern in send_as for arg in ("--send-as", pattern)]
    done = cli(r, "user", "add", name, "--password-stdin", *options, stdin=PASSWORD + "\n")
    assert done.exit_code == 0, done.stdout


def logged_in(r: RelayHandle, user: str) -> smtplib.SMTP:
    c = r.smtp()
    c.ehlo("laptop.corp.example")
    assert c.login(user, PASSWORD)[0] == 235
    return c


def line(reply: tuple[int, bytes]) -> str:
    code, text = reply
    return f"{code} {text.decode()}"


def message(marker: str, from_header: str) -> str:
    return f"From: {from_header}\r\nTo: it@corp.example\r\nSubject: {marker}\r\n\r\n{marker}\r\n"


def stored(r: RelayHandle, marker: bytes) -> bool:
    return any(marker in data for data in r.all_data().values())


def test_a_user_with_a_list_sends_only_as_its_addresses_in_mail_from_and_the_from_header(
    relay: Any, sink: Sink
) -> None:
    r = start(relay, sink)
    add_user(r, "Alice", "alice@corp.example", "*@sales.corp.example")
    add_user(r, "bob")  # no list: any sender the connector allows, as before the lists
    with logged_in(r, "alice") as c:
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
        assert line(c.mail("")) == USER_SEND_AS  # <> too, unless listed (as in allowed_senders)
        assert line(c.mail("alice@sales.corp.example")) == SENDER_OK  # *@sales.corp.example
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        # the envelope was allowed, the From header is someone else's: refused at end of DATA
        assert line(c.data(message("spoofed-from", "CEO <ceo@corp.example>"))) == USER_SEND_AS
        assert line(c.mail("Alice@Corp.Example")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        both = "alice@corp.example, ceo@corp.example"  # every address of the From header counts
        assert line(c.data(message("second-from", both))) == USER_SEND_AS
        assert line(c.mail("alice@corp.example")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("alice-own", '"Alice" <alice@corp.example>'))[0] == 250
    with logged_in(r, "bob") as c:
        assert line(c.mail("ceo@corp.example")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert c.data(message("bob-as-ceo", "ceo@corp.example"))[0] == 250
    sink.wait_for(b"alice-own")
    sink.wait_for(b"bob-as-ceo")
    for refused in (b"spoofed-from", b"second-from"):
        assert not stored(r, refused) and not sink.has(refused)
    log = r.protocol_log_text()
    assert (
        "MAIL refused: sender refused: <ceo@corp.example> is not in the send-as list of user alice"
        in log
    )
    assert (
        "message refused: From header refused: <ceo@corp.example> is not in the send-as list "
        "of user alice"
    ) in log


def test_the_connector_allowed_senders_and_the_user_list_both_apply(relay: Any, sink: Sink) -> None:
    r = start(relay, sink, allowed_senders=["*@corp.example", "<>"])
    add_user(r, "alice", "alice@corp.example", "alice@partner.example")
    with logged_in(r, "alice") as c:
        assert line(c.mail("alice@partner.example")) == USER_SEND_AS  # not in allowed_senders
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS  # not in alice's list
        assert line(c.mail("")) == USER_SEND_AS  # in allowed_senders, not in alice's list
        assert line(c.mail("alice@corp.example")) == SENDER_OK
        assert line(c.rcpt("it@corp.example")) == RCPT_OK
        assert line(c.data(message("partner-from", "alice@partner.example"))) == USER_SEND_AS
    assert not stored(r, b"partner-from")


def test_a_list_changed_while_a_session_is_open_applies_at_its_next_mail(
    relay: Any, sink: Sink
) -> None:
    r = start(relay, sink)
    add_user(r, "alice")
    with logged_in(r, "alice") as c:
        assert line(c.mail("ceo@corp.example")) == SENDER_OK
        c.rset()
        assert cli(r, "user", "send-as", "alice", "alice@corp.example").exit_code == 0
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
        assert line(c.mail("alice@corp.example")) == SENDER_OK
        c.rset()
        assert cli(r, "user", "send-as", "alice", "--clear").exit_code == 0
        assert line(c.mail("ceo@corp.example")) == SENDER_OK
        c.rset()
        assert cli(r, "user", "remove", "alice").exit_code == 0
        assert line(c.mail("alice@corp.example")) == GONE  # as after a reload that removes it
    assert "user alice is no longer in the users file" in r.protocol_log_text()


def test_user_cli_send_as_round_trip(relay: Any) -> None:
    r = relay([auth_connector()], start=False)
    users_file = r.data_dir / "users.json"
    # a users file from before the lists: it loads unchanged, the users have no list
    users_file.parent.mkdir(parents=True, exist_ok=True)
    users_file.write_text(json.dumps({"users": {"erp": "$argon2id$v=19$old"}}), encoding="utf-8")
    add_user(r, "Alice", "alice@corp.example", "*@Sales.Corp.Example", "alice@corp.example")
    listed = json.loads(cli(r, "user", "list", "--json").stdout)
    assert listed["users"] == ["alice", "erp"]
    assert listed["send_as"] == {
        "alice": ["alice@corp.example", "*@sales.corp.example"],
        "erp": None,
    }
    stored_file = json.loads(users_file.read_text())
    assert stored_file["users"]["erp"] == "$argon2id$v=19$old"  # untouched
    # a new password keeps the list; `send-as` replaces it and keeps the password
    hash_before = stored_file["users"]["alice"]
    add_user(r, "alice")
    assert json.loads(cli(r, "user", "list", "--json").stdout)["send_as"]["alice"] == [
        "alice@corp.example",
        "*@sales.corp.example",
    ]
    changed = cli(r, "user", "send-as", "ALICE", "<>", "*@*.corp.example")
    assert changed.exit_code == 0, changed.stdout
    assert "may send as: <>, *@*.corp.example" in changed.stdout
    after = json.loads(users_file.read_text())
    assert after["send_as"]["alice"] == ["<>", "*@*.corp.example"]
    assert after["users"]["alice"] != hash_before  # the `add` above set it again
    assert cli(r, "user", "list").stdout.splitlines() == [
        "alice  send as: <>, *@*.corp.example",
        "erp  send as: any sender the connector allows (no send-as list)",
    ]
    # bad patterns are refused naming the pattern, and nothing is written
    for bad in ("scan*@corp.example", "*corp.example", "alice@", ""):
        refused = cli(r, "user", "send-as", "alice", "alice@corp.example", bad)
        assert refused.exit_code == 1 and f"send-as pattern {bad!r}" in refused.output, bad
        added = cli(r, "user", "add", "carol", "--password-stdin", "--send-as", bad, stdin="pw\n")
        assert added.exit_code == 1 and f"send-as pattern {bad!r}" in added.output, bad
    assert json.loads(users_file.read_text()) == after
    unknown = cli(r, "user", "send-as", "nobody", "x@corp.example")
    assert unknown.exit_code == 1 and "no user 'nobody'" in unknown.output
    assert cli(r, "user", "send-as", "alice").exit_code == 1  # neither patterns nor --clear
    assert cli(r, "user", "send-as", "alice", "--clear").exit_code == 0
    assert "send_as" not in json.loads(users_file.read_text())  # as a file from before the lists
    cli(r, "user", "send-as", "alice", "alice@corp.example")
    assert cli(r, "user", "remove", "alice").exit_code == 0
    assert "send_as" not in json.loads(users_file.read_text())  # removed with its user
    # a hand-edited file with a bad pattern is refused naming the file, the user and the pattern
    users_file.write_text(
        json.dumps({"users": {"erp": "x"}, "send_as": {"erp": ["erp@*.example"]}}), encoding="utf-8"
    )
    broken = cli(r, "user", "list")
    assert broken.exit_code == 1
    assert (
        f"cannot read the users file {users_file}: send_as of user erp: "
        "send-as pattern 'erp@*.example'"
    ) in broken.output


def server_replies(r: RelayHandle, user: str, sender: str, header_from: str) -> list[str]:
    """MAIL's reply, then (when MAIL and RCPT pass) the end of DATA's, of a real session."""
    with logged_in(r, user) as c:
        out = [line(c.mail(sender))]
        if out[0] == SENDER_OK:
            assert line(c.rcpt("it@corp.example")) == RCPT_OK
            end = line(c.data(message("explain-agrees", header_from)))
            out.append("250" if end.startswith("250 ") else end)  # a queued message: its id varies
    return out


def explained(r: RelayHandle, user: str, sender: str, header_from: str) -> list[str]:
    result = explain(
        r.config,
        client_ip="127.0.0.5",
        local=("127.0.0.1", r.port),
        sender=sender,
        recipients=["it@corp.example"],
        authenticated_user=user,
        header_from=header_from,
        send_as=UserStore(r.data_dir / "users.json").send_as(user),
    ).to_dict()
    out = [result["mail"]["reply"]]
    if out[0] == SENDER_OK:
        out.append(result["header_from"]["reply"] or "250")
    return out


@pytest.mark.parametrize(
    ("sender", "header_from"),
    [
        ("ceo@corp.example", "ceo@corp.example"),
        ("<>", "alice@corp.example"),
        ("alice@corp.example", "CEO <ceo@corp.example>"),
        ("alice@corp.example", "alice@corp.example, ceo@corp.example"),
        ("alice@corp.example", "Alice <ALICE@corp.example>"),
        ("x@sales.corp.example", "x@sales.corp.example"),
    ],
)
def test_explain_gives_the_server_reply_for_a_user_with_a_list(
    relay: Any, sink: Sink, sender: str, header_from: str
) -> None:
    r = start(relay, sink, allowed_senders=["*@corp.example", "*@*.corp.example", "<>"])
    add_user(r, "alice", "alice@corp.example", "*@sales.corp.example")
    server = server_replies(r, "alice", sender, header_from)
    assert explained(r, "alice", sender, header_from) == server


def test_explain_cli_reads_the_users_file(relay: Any, sink: Sink) -> None:
    r = start(relay, sink)
    add_user(r, "alice", "alice@corp.example")
    local = f"127.0.0.1:{r.port}"
    args = ["explain", "--client-ip", "127.0.0.5", "--local", local, "--auth-user", "alice"]
    text = cli(r, *args, "--from", "ceo@corp.example", "--to", "it@corp.example").stdout
    assert "  send-as list of user alice: alice@corp.example\n" in text
    assert f"  MAIL FROM:<ceo@corp.example> → {USER_SEND_AS}\n" in text
    assert (
        "    because sender refused: <ceo@corp.example> is not in the send-as list of user alice"
        in text
    )
    data = json.loads(cli(r, *args, "--from", "alice@corp.example", "--json").stdout)
    assert data["send_as"] == ["alice@corp.example"]
    assert data["mail"]["reply"] == SENDER_OK
    assert data["mail"]["allowed_by"] == "alice@corp.example"
    with logged_in(r, "alice") as c:  # the server agrees
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
        assert line(c.mail("alice@corp.example")) == SENDER_OK


def test_users_file_path_is_the_configured_one(relay: Any, tmp_path: Path) -> None:
    """`server.users_file`: the CLI writes the lists there, and the server enforces them."""
    users = tmp_path / "elsewhere" / "smtp-users.json"
    r = relay([auth_connector()], server={"users_file": str(users)})
    add_user(r, "alice", "alice@corp.example")
    assert json.loads(users.read_text())["send_as"] == {"alice": ["alice@corp.example"]}
    with logged_in(r, "alice") as c:
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS


def test_a_users_file_broken_by_hand_keeps_the_lists_read_before(relay: Any, sink: Sink) -> None:
    """A send-as pattern the parser refuses, written into the file by hand: AUTH and a reload keep
    the users and lists read before (never a user without its list), and say why in the log."""
    r = start(relay, sink)
    add_user(r, "alice", "alice@corp.example")
    with logged_in(r, "alice") as c:
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
    users_file = r.data_dir / "users.json"
    data = json.loads(users_file.read_text())
    data["send_as"]["alice"] = ["*@*", "scan*@corp.example"]
    users_file.write_text(json.dumps(data), encoding="utf-8")
    with logged_in(r, "alice") as c:  # AUTH noticed the change, could not use it
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
    r.reconfigure([auth_connector(max_protocol_errors=7)])  # a reload reads the file again
    with logged_in(r, "alice") as c:
        assert line(c.mail("ceo@corp.example")) == USER_SEND_AS
        assert line(c.mail("alice@corp.example")) == SENDER_OK
    reason = "send_as of user alice: send-as pattern 'scan*@corp.example'"
    logged = take_logged_errors()
    assert len(logged) == 2 and all(f"users file {users_file}: {reason}" in m for m in logged)
    assert logged[1].endswith(f"; keeping the users read from {users_file}")


def take_logged_errors() -> list[str]:
    """The errors the service logged, taken from the `relay` fixture's collector (which fails the
    test on any error left there at its end): these were expected."""
    (collector,) = [
        h for h in logging.getLogger("relaygate.smtp").handlers if isinstance(h, _Errors)
    ]
    taken = [record.getMessage() for record in collector.records]
    collector.records.clear()
    return taken


def test_explain_for_a_user_not_in_the_users_file_gives_the_failed_auth_of_the_server(
    relay: Any, sink: Sink
) -> None:
    """AUTH as a name the users file does not hold fails whatever the password, and the session
    stays anonymous: explain said 235 and showed the session relaying as ExchangeUsers."""
    r = start(relay, sink)
    add_user(r, "alice")
    with r.raw() as c:
        c.greet()
        blob = base64.b64encode(f"\0nobody\0{PASSWORD}".encode()).decode()
        auth = c.cmd(f"AUTH PLAIN {blob}").text
        mail = c.cmd("MAIL FROM:<nobody@corp.example>").text
    local = f"127.0.0.1:{r.port}"
    args = ["explain", "--client-ip", "127.0.0.5", "--local", local, "--auth-user", "Nobody"]
    data = json.loads(cli(r, *args, "--from", "nobody@corp.example", "--json").stdout)
    assert data["auth"]["reply"] == auth == "535 5.7.3 Authentication unsuccessful"
    assert data["auth"]["reason"] == (
        f"user nobody is not in the users file {r.data_dir / 'users.json'}: AUTH fails whatever "
        "the password, and the session stays anonymous"
    )
    assert data["mail"]["reply"] == mail == "530 5.7.1 Client was not authenticated"
    assert "NT AUTHORITY\\ANONYMOUS LOGON" in data["principals"]
    known = json.loads(cli(r, "explain", *args[1:-1], "alice", "--json").stdout)
    assert known["auth"]["reply"] == "235 2.7.0 Authentication successful"
