"""SMTP AUTH PLAIN/LOGIN against users managed by `relaygate user`, tarpit, lockout, ExchangeUsers."""

from __future__ import annotations

import base64
import json
import os
import smtplib
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.smtp.conftest import ROOT, relay_connector
from tests.smtp.helpers import swaks

PASSWORD = "correct horse battery staple"


@pytest.fixture(autouse=True)
def cheap_argon2(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process hashes with small argon2 parameters: verification reads the parameters from each
    hash, so the server's code path is the same, only faster. `relaygate user add` run as a subprocess
    (test_auth_plain_and_login_success...) still makes a hash with the production parameters."""
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )


def cli_process(r, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`relaygate ...` as a real subprocess (what an administrator runs)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args, "--config", str(r.config_path)],
        input=stdin, capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip


def cli(r, *args: str, stdin: str = "") -> Any:
    """The same command line in-process (the CLI's start-up costs seconds per subprocess)."""
    from relaygate.cli import app

    return CliRunner().invoke(app, [*args, "--config", str(r.config_path)], input=stdin)


def add_user(r, name: str, password: str = PASSWORD, *, subprocess_: bool = False) -> None:
    run = cli_process if subprocess_ else cli
    done = run(r, "user", "add", name, "--password-stdin", stdin=password + "\n")
    code = done.returncode if isinstance(done, subprocess.CompletedProcess) else done.exit_code
    assert code == 0, done.stdout


def auth_connector(**overrides):
    """Authenticated submission only: ExchangeUsers (relay for authenticated users), no anonymous rights."""
    base = relay_connector(
        ["127.0.0.5"], name="Client Submission", auth_mechanism=["Tls", "BasicAuth"],
        permission_groups=["ExchangeUsers"], permissions=[],
    )  # fmt: skip
    base.update(overrides)
    return base


def b64(s: str | bytes) -> str:
    return base64.b64encode(s.encode() if isinstance(s, str) else s).decode()


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def test_user_cli_add_list_remove(relay):
    r = relay([auth_connector()], start=False)
    add_user(r, "Scanner")
    add_user(r, "erp")
    listed = cli(r, "user", "list", "--json")
    assert listed.exit_code == 0
    data = json.loads(listed.stdout)
    assert data["users"] == ["erp", "scanner"]
    users_file = Path(data["users_file"])
    assert users_file == r.data_dir / "users.json"
    assert users_file.stat().st_mode & 0o077 == 0
    stored = json.loads(users_file.read_text())["users"]
    assert stored["scanner"].startswith("$argon2") and PASSWORD not in users_file.read_text()
    assert cli(r, "user", "remove", "erp").exit_code == 0
    assert cli(r, "user", "remove", "erp").exit_code == 1
    assert "erp" not in cli(r, "user", "list").stdout
    empty = cli(r, "user", "add", "x", "--password-stdin", stdin="\n")
    assert empty.exit_code != 0


def test_auth_plain_and_login_success_relay_as_exchange_user(relay):
    r = relay([auth_connector()])
    # `relaygate user add` while the server runs: picked up at the next AUTH, without a restart.
    add_user(r, "scanner", subprocess_=True)
    with r.smtp() as s:
        s.ehlo()
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:  # anonymous: no Submit right
            s.sendmail("scanner@corp.example", ["x@external.example"], b"Subject: a\r\n\r\nx\r\n")
        assert (
            refused.value.smtp_code == 530
            and refused.value.smtp_error == b"5.7.1 Client was not authenticated"
        )
        s.rset()
        s.user, s.password = "scanner", PASSWORD
        code, text = s.auth("PLAIN", s.auth_plain, initial_response_ok=True)
        assert (code, text) == (235, b"2.7.0 Authentication successful")
        s.sendmail("scanner@corp.example", ["x@external.example"], b"Subject: a\r\n\r\nplain\r\n")
    with r.raw() as c:
        c.greet()
        assert c.cmd("AUTH LOGIN").text == "334 VXNlcm5hbWU6"
        assert c.cmd(b64("SCANNER")).text == "334 UGFzc3dvcmQ6"  # user names are case-insensitive
        assert c.cmd(b64(PASSWORD)).text == "235 2.7.0 Authentication successful"
        assert (
            c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)).text
            == "503 5.5.2 Auth command already specified"
        )
        assert "AUTH" not in " ".join(c.cmd("EHLO again", 250).lines)
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)
        c.cmd("RCPT TO:<y@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: b\r\n\r\nlogin\r\n.\r\n")
        c.expect(250)
    msgs = r.messages()
    assert len(msgs) == 2 and {m.auth_user for m in msgs} == {"scanner"}
    for m in msgs:
        assert b"\twith ESMTPA id " in r.data(m.queue_id)


def test_auth_plain_with_its_initial_response_may_be_pipelined_with_mail(relay):
    """RFC 4954 §4: AUTH must end a pipelined group, except with an initial response for a
    mechanism done in one round trip and without a security layer, such as PLAIN: then MAIL
    may follow in the same write. AUTH LOGIN, and PLAIN waiting for its 334, still end one."""
    r = relay([auth_connector()])
    add_user(r, "scanner")
    plain = b64("\0scanner\0" + PASSWORD)
    with r.raw() as c:
        c.greet()
        c.send(f"AUTH PLAIN {plain}\r\nMAIL FROM:<scanner@corp.example>\r\n")
        assert c.expect(235).text == "235 2.7.0 Authentication successful"
        assert c.expect(250).text == "250 2.1.0 Sender OK"  # as the authenticated user
        c.cmd("RCPT TO:<y@external.example>", 250)
    with r.raw() as c:  # a wrong password: the pipelined MAIL is the anonymous session's
        c.greet()
        wrong = b64("\0scanner\0wrong")
        c.send(f"AUTH PLAIN {wrong}\r\nMAIL FROM:<scanner@corp.example>\r\n")
        assert c.expect(535).code == 535
        assert c.expect(530).text == "530 5.7.1 Client was not authenticated"
    for pipelined in (f"AUTH LOGIN {b64('scanner')}", "AUTH PLAIN"):
        with r.raw() as c:
            c.greet()
            c.send(f"{pipelined}\r\nMAIL FROM:<scanner@corp.example>\r\n")
            assert [x.text for x in c.replies_until_close()] == [
                "554 5.5.0 Error: SMTP protocol synchronization"
            ]


def test_auth_failure_tarpit_and_lockout(relay):
    r = relay([auth_connector(auth_tarpit_interval="00:00:01", max_logon_failures=2)])
    add_user(r, "scanner")
    with r.raw() as c:
        c.greet()
        t0 = time.monotonic()
        assert (
            c.cmd("AUTH PLAIN " + b64("\0scanner\0wrong")).text
            == "535 5.7.3 Authentication unsuccessful"
        )
        assert time.monotonic() - t0 >= 0.95
        c.send(
            ("AUTH PLAIN " + b64("\0nobody\0wrong") + "\r\n").encode()
        )  # unknown user: same answer
        assert [x.text for x in c.replies_until_close()] == [
            "535 5.7.3 Authentication unsuccessful",
            "421 4.7.0 Too many errors on this connection, closing transmission channel",
        ]


def test_unrecognized_auth_type_is_tarpitted_for_anonymous_sessions(relay):
    """exchange-semantics.md §5.5, as a real Exchange 2016 receive log shows it: AUTH on a
    connector that offers none, or with a mechanism it does not know, gets
    `504 5.7.4 Unrecognized authentication type` after the tarpit, logged
    `*,Tarpit for '0.00:00:01'` before the reply."""
    r = relay(
        [
            relay_connector(["127.0.0.5"], name="No Auth", tarpit_interval="00:00:01"),
            auth_connector(remote_ip_ranges=["127.0.0.6"], tarpit_interval="00:00:01"),
        ]
    )
    for source, command in (("127.0.0.5", "AUTH LOGIN"), ("127.0.0.6", "AUTH CRAM-MD5")):
        with r.raw(source) as c:
            c.greet()
            t0 = time.monotonic()
            assert c.cmd(command).text == "504 5.7.4 Unrecognized authentication type", source
            assert time.monotonic() - t0 >= 0.95, source
            c.cmd("QUIT", 221)
    lines = r.protocol_log_text().splitlines()
    for command in ("AUTH LOGIN", "AUTH CRAM-MD5"):
        at = next(i for i, line in enumerate(lines) if line.endswith(f",<,{command},"))
        assert lines[at + 1].endswith(",*,Tarpit for '0.00:00:01',"), lines[at : at + 3]
        assert lines[at + 2].endswith(",>,504 5.7.4 Unrecognized authentication type,")


def test_auth_protocol_errors(relay):
    r = relay([auth_connector()])
    add_user(r, "scanner")
    with r.raw() as c:
        c.greet()
        assert c.cmd("AUTH CRAM-MD5").text == "504 5.7.4 Unrecognized authentication type"
        assert c.cmd("AUTH PLAIN").text == "334 "
        assert c.cmd("*").text == "501 5.7.0 Authentication cancelled"
        assert c.cmd("AUTH PLAIN !!notbase64").code == 501
        assert c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)).code == 235


@pytest.mark.parametrize("sep", ["\t", "\x0b", "\x0c"])
def test_credentials_after_auth_and_any_blank_never_reach_the_protocol_log(relay, sep):
    """ "AUTH<TAB>PLAIN <credentials>" is no AUTH command (500), but its line is logged all the
    same: the initial response is masked whatever blank follows the verb, as after a space."""
    r = relay([auth_connector()])
    add_user(r, "scanner")
    secret = b64("\0scanner\0" + PASSWORD)
    with r.raw() as c:
        c.greet()
        assert c.cmd(f"AUTH{sep}PLAIN {secret}").code == 500
        assert c.cmd(f"auth{sep}PLAIN{sep}{secret}").code == 500
        assert c.cmd(f"AUTH PLAIN {secret}").code == 235
    log = r.protocol_log_text()
    assert log.count("PLAIN <authentication response>") == 3
    assert secret not in log and PASSWORD not in log


def test_basic_auth_require_tls_never_in_clear(relay):
    r = relay([auth_connector(auth_mechanism=["Tls", "BasicAuth", "BasicAuthRequireTLS"])])
    add_user(r, "scanner")
    with r.raw() as c:
        assert not any(k.startswith("AUTH") for k in c.greet().lines)
        plain = "AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)
        assert c.cmd(plain).text == "451 5.7.3 Require STARTTLS to do basic authentication"
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.corp.example", 250).lines
        assert c.cmd(plain).code == 235
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)
        c.cmd("RCPT TO:<z@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Subject: c\r\n\r\ntls\r\n.\r\n")
        c.expect(250)
    (msg,) = r.messages()
    assert b"\twith ESMTPSA id " in r.data(msg.queue_id)


def test_removed_user_can_no_longer_authenticate(relay):
    r = relay([auth_connector()])
    add_user(r, "erp")
    with r.raw() as c:
        c.greet()
        assert c.cmd("AUTH PLAIN " + b64("\0erp\0" + PASSWORD)).code == 235
    assert cli(r, "user", "remove", "erp").exit_code == 0
    with r.raw() as c:
        c.greet()
        assert c.cmd("AUTH PLAIN " + b64("\0erp\0" + PASSWORD)).code == 535


def test_swaks_auth_plain_and_login(relay):
    r = relay([auth_connector()])
    add_user(r, "scanner")
    for mech in ("PLAIN", "LOGIN"):
        done = swaks(
            "--server", "127.0.0.1", "--port", str(r.port), "--local-interface", "127.0.0.5",
            "--auth", mech, "--auth-user", "scanner", "--auth-password", PASSWORD,
            "--from", "scanner@corp.example", "--to", "x@external.example",
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "235 2.7.0 Authentication successful" in done.stdout
    bad = swaks(
        "--server", "127.0.0.1", "--port", str(r.port), "--local-interface", "127.0.0.5",
        "--auth", "LOGIN", "--auth-user", "scanner", "--auth-password", "nope",
        "--from", "scanner@corp.example", "--to", "x@external.example",
    )  # fmt: skip
    assert bad.returncode != 0 and "535 5.7.3 Authentication unsuccessful" in bad.stdout
    assert len(r.messages()) == 2


def test_user_cli_names_that_look_like_markup_are_printed_verbatim(relay):
    r = relay([auth_connector()], start=False)
    added = cli(r, "user", "add", "a[/x]", "--password-stdin", stdin=PASSWORD + "\n")
    assert added.exit_code == 0, added.output
    assert "Added user a[/x] in " in added.stdout
    assert cli(r, "user", "list").stdout.splitlines() == [
        "a[/x]  send as: any sender the connector allows (no send-as list)"
    ]
    removed = cli(r, "user", "remove", "a[/x]")
    assert removed.exit_code == 0 and "Removed user a[/x] from " in removed.stdout


def test_auth_plain_authzid_must_be_the_authenticated_user(relay):
    """RFC 4616 §2: `ceo\\0scanner\\0<scanner's password>` must not log in (as scanner or as ceo);
    an empty authzid or the user's own name (in any case) is accepted."""
    r = relay([auth_connector()])
    add_user(r, "scanner")
    add_user(r, "ceo", "other password")
    with r.raw() as c:
        c.greet()
        c.cmd("AUTH PLAIN " + b64("ceo\0scanner\0" + PASSWORD), 535)
        c.cmd("AUTH PLAIN " + b64("scanner\0ceo\0" + PASSWORD), 535)
        c.cmd("AUTH PLAIN " + b64("SCANNER\0scanner\0" + PASSWORD), 235)
    with r.raw() as c:
        c.greet()
        c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD), 235)
    assert "LogonDenied" in r.protocol_log_text()


def _auth_reply(r, source: str, user: str, password: str) -> str:
    """AUTH PLAIN on a fresh connection from `source`: the reply line."""
    with r.raw(source) as c:
        c.greet()
        return c.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}")).text


def test_auth_failures_are_limited_per_address_across_connections(relay):
    """logon_failure_rate_limit: failures are counted per client address across connections
    (max_logon_failures only ends one connection); past the limit AUTH is refused with 450 4.7.1
    before any password is checked, even the right one, while another address still logs in.
    The default (6 per minute) applies; each connection ends at max_logon_failures (3)."""
    r = relay([auth_connector(remote_ip_ranges=["127.0.0.0/8"])])
    add_user(r, "scanner")
    for i in range(6):
        assert _auth_reply(r, "127.0.0.5", "scanner", f"wrong{i}").startswith("535 ")
    refused = "450 4.7.1 Too many AUTH commands from 127.0.0.5"
    assert _auth_reply(r, "127.0.0.5", "scanner", PASSWORD) == refused
    assert _auth_reply(r, "127.0.0.5", "scanner", "wrong") == refused
    assert _auth_reply(r, "127.0.0.6", "scanner", PASSWORD).startswith("235 ")
    assert "logon_failure_rate_limit 6 per minute reached for 127.0.0.5" in r.protocol_log_text()


def _proxied_auth_reply(r, source: str, password: str) -> str:
    """AUTH PLAIN as scanner from `source`, which the trusted proxy 127.0.0.7 names: the reply."""
    with r.raw("127.0.0.7") as c:
        c.send(f"PROXY TCP6 {source} ::1 40000 25\r\n".encode())
        c.expect(220)
        c.cmd("EHLO client.example", 250)
        return c.cmd("AUTH PLAIN " + b64(f"\0scanner\0{password}")).text


def test_ipv6_auth_failures_are_counted_per_64_by_default(relay):
    """Each address of an IPv6 /64 (one subnet: whoever holds one address holds them all) had its
    own guesses, so the limit bounded nothing over IPv6. By default failures are counted per /64,
    the reply naming it; another /64 is not affected; logon_failure_ipv6_prefix_length = 128
    counts per address again. Clients named by a trusted proxy's PROXY header (real sockets
    reach only ::1)."""
    subnet = "2001:db8:1:2::"
    r = relay(
        [auth_connector(remote_ip_ranges=["::/0"], logon_failure_rate_limit=2)],
        server={"trusted_proxies": ["127.0.0.7"]},
    )
    add_user(r, "scanner")
    assert _proxied_auth_reply(r, subnet + "1", "wrong").startswith("535 ")
    assert _proxied_auth_reply(r, subnet + "2", "wrong").startswith("535 ")
    refused = "450 4.7.1 Too many AUTH commands from 2001:db8:1:2::/64"
    assert _proxied_auth_reply(r, subnet + "abcd:3", PASSWORD) == refused
    assert _proxied_auth_reply(r, "2001:db8:1:3::1", PASSWORD).startswith("235 ")
    assert (
        "logon_failure_rate_limit 2 per minute reached for 2001:db8:1:2::/64"
        in r.protocol_log_text()
    )

    r = relay(
        [
            auth_connector(
                remote_ip_ranges=["::/0"],
                logon_failure_rate_limit=2,
                logon_failure_ipv6_prefix_length=128,
            )
        ],
        server={"trusted_proxies": ["127.0.0.7"]},
    )
    add_user(r, "scanner")
    for source in (subnet + "1", subnet + "1"):
        assert _proxied_auth_reply(r, source, "wrong").startswith("535 ")
    assert _proxied_auth_reply(r, subnet + "2", PASSWORD).startswith("235 ")
    refused = f"450 4.7.1 Too many AUTH commands from {subnet}1"
    assert _proxied_auth_reply(r, subnet + "1", PASSWORD) == refused


def test_auth_failure_limit_is_configurable(relay):
    r = relay(
        [
            auth_connector(
                remote_ip_ranges=["127.0.0.0/8"], logon_failure_rate_limit=1, max_logon_failures=0
            )
        ]
    )
    add_user(r, "scanner")
    with r.raw("127.0.0.5") as c:
        c.greet()
        c.cmd("AUTH PLAIN " + b64("\0scanner\0wrong"), 535)
        c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD), 450)


def test_auth_failure_limit_holds_for_concurrent_attempts_and_by_default(relay):
    """Attempts sent at once from one address cannot all pass the check before any is counted."""
    r = relay([auth_connector(remote_ip_ranges=["127.0.0.0/8"])])
    add_user(r, "scanner")
    clients = [r.raw("127.0.0.5") for _ in range(10)]
    try:
        for c in clients:
            c.greet()
        for i, c in enumerate(clients):
            c.send(("AUTH PLAIN " + b64(f"\0scanner\0wrong{i}") + "\r\n").encode())
        replies = [c.reply() for c in clients]
        codes = sorted(rep.code if rep is not None else 0 for rep in replies)
    finally:
        for c in clients:
            c.close()
    assert codes == [450] * 4 + [535] * 6
    assert _auth_reply(r, "127.0.0.5", "scanner", PASSWORD).startswith("450 ")


def test_require_tls_offers_and_takes_auth_only_after_starttls(relay):
    """require_tls without BasicAuthRequireTLS: RFC 3207 §4 has a server that requires TLS answer
    530 to every command but NOOP, EHLO, STARTTLS and QUIT; AUTH was offered in clear and took
    the password in clear (235), while `relaygate audit` names require_tls as the cure for it."""
    r = relay([auth_connector(require_tls=True)])
    add_user(r, "scanner")
    plain = "AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)
    with r.raw() as c:
        assert not any(k.startswith("AUTH") for k in c.greet().lines)
        assert c.cmd(plain).text == "530 5.7.0 Must issue a STARTTLS command first"
        assert c.cmd("AUTH LOGIN").text == "530 5.7.0 Must issue a STARTTLS command first"
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.corp.example", 250).lines
        assert c.cmd(plain).code == 235
    log = r.protocol_log_text()
    assert "LogonDenied" not in log and "Set Session Permissions" in log


def test_starttls_forgets_an_authentication_made_before_it(relay):
    """RFC 3207 §4.2 (security-bar 86): what the session learnt before TLS, its AUTH included, is
    discarded; the EHLO after TLS offers AUTH again and MAIL is the anonymous session's."""
    r = relay([auth_connector()])
    add_user(r, "scanner")
    with r.raw() as c:
        c.greet()
        c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD), 235)
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        assert "AUTH PLAIN LOGIN" in c.cmd("EHLO client.corp.example", 250).lines
        assert (
            c.cmd("MAIL FROM:<scanner@corp.example>").text
            == "530 5.7.1 Client was not authenticated"
        )
        c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD), 235)
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)


def test_auth_out_of_order_and_oversized_responses_are_clean_errors(relay):
    """Security-bar items 141-142: an initial response past RFC 4954's 12288-octet minimum and an
    over-long continuation are clean errors (the session goes on in step); AUTH inside a mail
    transaction and a second AUTH after success are 503."""
    r = relay(
        [
            auth_connector(
                max_protocol_errors=20, permission_groups=["AnonymousUsers", "ExchangeUsers"]
            )
        ]
    )
    add_user(r, "scanner")
    huge = b64(b"\0scanner\0" + b"x" * 20000)
    with r.raw() as c:
        c.greet()
        assert c.cmd("AUTH PLAIN " + huge).code in (500, 501, 535)
        c.cmd("NOOP", 250)
        assert c.cmd("AUTH LOGIN").code == 334
        assert c.cmd(huge).code in (500, 501, 535)
        c.cmd("NOOP", 250)
        c.cmd("MAIL FROM:<>", 250)  # an anonymous transaction: AUTH may not start inside it
        assert c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)).code == 503
        c.cmd("RSET", 250)
        c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD), 235)
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)
        assert c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)).code == 503
        c.cmd("RSET", 250)
        assert c.cmd("AUTH PLAIN " + b64("\0scanner\0" + PASSWORD)).code == 503
        c.cmd("NOOP", 250)
