"""`relaygate test send` / `test smtp` against real in-test SMTP servers (aiosmtpd on 127.0.0.1:0).

All traffic stays on 127.0.0.x; `--source-ip 127.0.0.5` is bound and the server must see that peer.
"""

from __future__ import annotations

import base64
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from tests.cli_admin.helpers import RELAY_DENIED, Recorder, SMTPServer, run
from tests.smtp.conftest import (  # noqa: F401 - `relay` is a fixture
    RelayHandle,
    relay,
    relay_connector,
)
from tests.support.ports import free_port


@pytest.fixture
def accepting() -> Iterator[SMTPServer]:
    with SMTPServer(Recorder()) as server:
        yield server


@pytest.fixture
def refusing() -> Iterator[SMTPServer]:
    with SMTPServer(Recorder(refuse={"outside.example"})) as server:
        yield server


def send(
    server: SMTPServer,
    *extra: str,
    to: tuple[str, ...] = ("alice@corp.example",),
    env: dict | None = None,
):
    args = [
        "test",
        "send",
        "--server",
        server.address,
        "--from",
        "scanner@corp.example",
        "--timeout",
        "10",
    ]
    for rcpt in to:
        args += ["--to", rcpt]
    return run(*args, *extra, env=env)


def test_send_accepted_from_source_ip(accepting: SMTPServer) -> None:
    r = send(
        accepting,
        "--source-ip",
        "127.0.0.5",
        "--subject",
        "Scan to mail",
        "--body",
        "page 1\n.hidden dot",
        to=("a@corp.example", "b@partner.example"),
    )
    assert r.code == 0, r.out + r.err
    handler = accepting.handler
    assert handler.peers and handler.peers[0][0] == "127.0.0.5"  # the server saw the bound source
    message = handler.messages[0]
    assert message["peer"][0] == "127.0.0.5"
    assert message["to"] == ["a@corp.example", "b@partner.example"]
    assert "Subject: Scan to mail" in message["data"]
    assert "\n.hidden dot" in message["data"]  # dot-stuffed on the wire, unstuffed by the server
    # the transcript: every line both ways, C:/S: prefixed
    lines = r.out.splitlines()
    assert any(line.startswith("S: 220 ") for line in lines)
    assert "C: EHLO " in r.out
    assert "C: MAIL FROM:<scanner@corp.example>" in lines
    assert "C: RCPT TO:<b@partner.example>" in lines
    assert "S: 250 2.1.5 Recipient OK" in lines
    assert "C: DATA" in lines and "C: Subject: Scan to mail" in lines and "C: ..hidden dot" in lines
    assert "C: ." in lines and "C: QUIT" in lines
    assert (
        "Relayed: the server accepted the message for all 2 recipient(s) (queue id 4242)" in r.out
    )
    # testing from loopback: the false-positive warning
    assert "warning: You are testing from a loopback address (127.0.0.5)" in r.out


def test_send_refused_550_5_7_54(refusing: SMTPServer) -> None:
    r = send(refusing, "--source-ip", "127.0.0.5", to=("bob@outside.example",))
    assert r.code == 1, r.out + r.err
    assert refusing.handler.peers[0][0] == "127.0.0.5"
    assert f"S: {RELAY_DENIED}" in r.out.splitlines()
    assert "C: DATA" not in r.out  # nothing accepted: no DATA
    assert f"Refused: {RELAY_DENIED}" in r.out
    assert "ms-Exch-SMTP-Accept-Any-Recipient" in r.out
    assert "relaygate explain --client-ip 127.0.0.5" in r.out
    assert refusing.handler.messages == []


def test_send_partial_exit_2_json(refusing: SMTPServer) -> None:
    r = send(
        refusing, "--source-ip", "127.0.0.5", "--json", to=("a@corp.example", "b@outside.example")
    )
    assert r.code == 2, r.out + r.err
    data = r.json()
    assert data["outcome"] == "partial" and data["exit_code"] == 2
    assert data["source"].startswith("127.0.0.5:")
    assert data["queue_id"] == "4242"
    assert data["recipients"] == [
        {"address": "a@corp.example", "reply": "250 2.1.5 Recipient OK", "accepted": True},
        {"address": "b@outside.example", "reply": RELAY_DENIED, "accepted": False},
    ]
    assert data["verdict"].startswith("Partly accepted")
    assert data["warnings"] and "loopback" in data["warnings"][0]
    directions = {line["direction"] for line in data["transcript"]}
    assert {"C", "S"} <= directions
    assert refusing.handler.messages[0]["to"] == ["a@corp.example"]


def test_send_auth_payload_masked() -> None:
    handler = Recorder()
    with SMTPServer(handler, auth_require_tls=False, authenticator=handler.authenticator) as server:
        r = send(
            server,
            "--auth",
            "printer",
            "--password-env",
            "PRINTER_PW",
            "--helo",
            "printer.corp.example",
            env={"PRINTER_PW": "s3cret-Pa55"},
        )
    assert r.code == 0, r.out + r.err
    assert handler.logins == [("printer", "s3cret-Pa55")]
    assert "C: AUTH PLAIN ********" in r.out
    assert "S: 235 2.7.0 Authentication successful" in r.out
    secret_forms = ["s3cret-Pa55", base64.b64encode(b"\0printer\0s3cret-Pa55").decode()]
    assert not any(s in r.out or s in r.err for s in secret_forms)
    assert "C: EHLO printer.corp.example" in r.out


def test_send_auth_failure() -> None:
    handler = Recorder()
    with SMTPServer(handler, auth_require_tls=False, authenticator=handler.authenticator) as server:
        r = send(server, "--auth", "printer", "--password-env", "PW", "--json", env={"PW": "wrong"})
    assert r.code == 1
    data = r.json()
    assert data["outcome"] == "refused" and "authentication failed" in data["verdict"]
    assert all("wrong" not in line["text"] for line in data["transcript"])


def test_send_starttls_not_offered(accepting: SMTPServer) -> None:
    r = send(accepting, "--starttls")
    assert r.code == 1
    assert "does not offer STARTTLS" in r.out


def test_send_connection_refused() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    r = run(
        "test",
        "send",
        "--server",
        f"127.0.0.1:{port}",
        "--from",
        "a@corp.example",
        "--to",
        "b@corp.example",
    )
    assert r.code == 1
    assert "Could not connect to 127.0.0.1" in r.out


def test_send_no_banner_explains_selection() -> None:
    """A server that closes without a banner (no connector matches the client) gets a plain-words verdict."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    seen: list[str] = []

    def serve() -> None:
        conn, peer = listener.accept()
        seen.append(peer[0])
        conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        r = run(
            "test",
            "send",
            "--server",
            f"127.0.0.1:{port}",
            "--source-ip",
            "127.0.0.9",
            "--from",
            "a@corp.example",
            "--to",
            "b@corp.example",
        )
    finally:
        thread.join(5)
        listener.close()
    assert r.code == 1
    assert seen == ["127.0.0.9"]
    assert "before sending a banner" in r.out and "relaygate explain --client-ip 127.0.0.9" in r.out


def test_send_bad_source_ip(accepting: SMTPServer) -> None:
    r = send(accepting, "--source-ip", "192.0.2.77")
    assert r.code == 1
    assert "192.0.2.77 is not an address of this machine" in r.out


def test_smtp_interactive_piped(accepting: SMTPServer) -> None:
    script = "EHLO tester\nMAIL FROM:<a@corp.example>\nRCPT TO:<b@corp.example>\nDATA\nSubject: by hand\n\nhello\n.\nQUIT\n"
    r = run("test", "smtp", "--server", accepting.address, "--source-ip", "127.0.0.5", stdin=script)
    assert r.code == 0, r.out + r.err
    lines = r.out.splitlines()
    assert lines.index("C: EHLO tester") < lines.index("S: 250-relay.test")
    assert "S: 354 End data with <CR><LF>.<CR><LF>" in lines
    assert "C: hello" in lines
    assert any(line.startswith("S: 250 2.6.0") for line in lines)
    assert lines[-1].startswith("S: 221")
    assert accepting.handler.messages[0]["peer"][0] == "127.0.0.5"
    assert "Subject: by hand" in accepting.handler.messages[0]["data"]


def test_smtp_interactive_eof_sends_quit(accepting: SMTPServer) -> None:
    r = run("test", "smtp", "--server", accepting.address, stdin="NOOP\n")
    assert r.code == 0, r.out + r.err
    lines = r.out.splitlines()
    assert "C: NOOP" in lines and "C: QUIT" in lines and lines[-1].startswith("S: 221")


def test_smtp_interactive_masks_auth() -> None:
    handler = Recorder()
    token = base64.b64encode(b"\0printer\0s3cret-Pa55").decode()
    with SMTPServer(handler, auth_require_tls=False, authenticator=handler.authenticator) as server:
        r = run(
            "test", "smtp", "--server", server.address, stdin=f"EHLO x\nAUTH PLAIN {token}\nQUIT\n"
        )
    assert r.code == 0
    assert "C: AUTH PLAIN ********" in r.out and token not in r.out
    assert handler.logins == [("printer", "s3cret-Pa55")]


def test_send_warning_names_connector_from_config(accepting: SMTPServer, tmp_path) -> None:
    """With the relay's config at hand, the loopback warning says which connector took the test."""
    from tests.cli_admin.helpers import write

    cfg = write(
        tmp_path / "relaygate.toml",
        f"""
        [[receive_connectors]]
        name = "Loopback"
        bindings = ["127.0.0.1:{accepting.port}"]
        remote_ip_ranges = ["127.0.0.0/8"]
        permission_groups = ["AnonymousUsers"]

        [[receive_connectors.permissions]]
        user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
        extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

        [[receive_connectors]]
        name = "Printers"
        bindings = ["0.0.0.0:{accepting.port}"]
        remote_ip_ranges = ["10.0.0.5"]
        permission_groups = ["AnonymousUsers"]
        """,
    )
    r = send(accepting, "--source-ip", "127.0.0.5", "--config", str(cfg), "--json")
    assert r.code == 0, r.out + r.err
    warning = r.json()["warnings"][0]
    assert 'taken by connector "Loopback" (range 127.0.0.0/8), which grants relay' in warning


def test_a_sender_refused_at_mail_is_not_explained_as_missing_submit(
    relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    """550 5.7.1 '... permissions to send as this sender' to MAIL is the connector's allowed_senders
    (or an authoritative domain's sender without the right): test send told the admin the
    connector lacked ms-Exch-SMTP-Submit and to add AnonymousUsers, which it already has."""
    handle = relay([relay_connector(("127.0.0.5",), allowed_senders=["scan@corp.example"])])
    r = run("test", "send", "--server", f"127.0.0.1:{handle.port}", "--source-ip", "127.0.0.5",
            "--from", "someone@elsewhere.example", "--to", "a@corp.example", "--json")  # fmt: skip
    assert r.code == 1, r.out + r.err
    verdict = r.json()["verdict"]
    assert "550 5.7.1 Anonymous client does not have permissions to send as this sender" in verdict
    assert "AnonymousUsers" not in verdict and "ms-Exch-SMTP-Submit" not in verdict, verdict
    assert "allowed_senders" in verdict and "--from" in verdict
    # the sender it allows goes through
    ok = run("test", "send", "--server", f"127.0.0.1:{handle.port}", "--source-ip", "127.0.0.5",
             "--from", "scan@corp.example", "--to", "a@corp.example", "--json")  # fmt: skip
    assert ok.code == 0, ok.out + ok.err


def test_smtp_interactive_json(accepting: SMTPServer) -> None:
    """`test smtp --json` (every verb that prints data takes it): the session's transcript as
    JSON, the AUTH response masked as in the text form; an unreachable server is exit 1 with the
    error in the transcript, still JSON and nothing on stderr."""
    script = "EHLO tester\nNOOP\nQUIT\n"
    r = run("test", "smtp", "--server", accepting.address, "--json", stdin=script)
    assert r.code == 0, r.out + r.err
    data = r.json()
    assert data["server"] == accepting.address and data["exit_code"] == 0
    lines = [(line["direction"], line["text"]) for line in data["transcript"]]
    assert ("C", "EHLO tester") in lines and ("C", "NOOP") in lines
    assert lines[-1][0] == "S" and lines[-1][1].startswith("221")
    refused = run("test", "smtp", "--server", f"127.0.0.1:{free_port()}", "--json", stdin="")
    assert refused.code == 1 and refused.err == "", refused.out + refused.err
    assert any("error:" in line["text"] for line in refused.json()["transcript"]), refused.out


def test_a_source_ip_that_is_no_address_is_a_usage_error_naming_it(accepting: SMTPServer) -> None:
    """`--source-ip bogus` was looked up as a host name and reported as "Could not connect to
    SERVER: Name or service not known": the server blamed for the option's error. It is refused
    as `test relay` refuses it (exit 2, naming the option), as JSON with --json."""
    for verb, extra in (
        ("send", ("--from", "a@corp.example", "--to", "b@corp.example")),
        ("smtp", ()),
    ):
        r = run(
            "test", verb, "--server", accepting.address, "--source-ip", "bogus", *extra, "--json"
        )
        assert r.code == 2, r.out + r.err
        assert r.json() == {"ok": False, "error": "--source-ip 'bogus': not an IP address"}
        assert r.err == ""
