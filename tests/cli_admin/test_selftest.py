"""`relaygate test relay` (the open-relay self-test) against a real RelayGate on 127.0.0.1.

The relay (tests/smtp/conftest.py `relay`, in-process) has two connectors: 127.0.0.5 may submit to
the accepted domain corp.example only; 127.0.0.9 has ms-Exch-SMTP-Accept-Any-Recipient for
ANONYMOUS LOGON (an anonymous relay). Its only send connector's smart host is a real SMTP sink
(aiosmtpd on 127.0.0.1:0), which must receive nothing: the self-test never sends DATA.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tomlkit

from relaygate.config import load_config
from tests.cli_admin.helpers import PYTHON, Recorder, SMTPServer, run
from tests.smtp.conftest import (  # noqa: F401 - `relay` is a fixture
    RelayHandle,
    relay,
    relay_connector,
)
from tests.smtp.helpers import free_port

RESTRICTED = "127.0.0.5"
OPEN = "127.0.0.9"


def internal_connector(**overrides: Any) -> dict[str, Any]:
    """127.0.0.5: anonymous submission to the accepted domains, no relay right."""
    c: dict[str, Any] = {
        "name": "Internal Apps",
        "bindings": ["127.0.0.1:{port}"],
        "remote_ip_ranges": [RESTRICTED],
        "auth_mechanism": ["Tls"],
        "permission_groups": ["AnonymousUsers"],
    }
    c.update(overrides)
    return c


@pytest.fixture
def sink() -> Iterator[SMTPServer]:
    """The smart host: a real SMTP server on loopback that records every MAIL and message."""
    with SMTPServer(Recorder()) as server:
        yield server


@pytest.fixture
def make_relay(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: SMTPServer,
) -> Callable[..., RelayHandle]:
    """Start the relay with the given 127.0.0.5 connector overrides; its smart host is `sink`."""

    def start(**internal: Any) -> RelayHandle:
        handle = relay(
            [internal_connector(**internal), relay_connector((OPEN,), name="Anonymous Relay")],
            start=False,
        )
        handle.doc["send_connectors"][0]["port"] = sink.port
        handle.config_path.write_text(tomlkit.dumps(handle.doc), encoding="utf-8")
        handle.config = load_config(handle.config_path)
        return handle.start()

    return start


def relay_test(handle: RelayHandle, *args: str) -> Any:
    return run(
        "test", "relay", "--server", f"127.0.0.1:{handle.port}", "--config",
        str(handle.config_path), "--timeout", "5", *args,
    )  # fmt: skip


def assert_nothing_relayed(handle: RelayHandle, sink: SMTPServer, data: dict[str, Any]) -> None:
    assert sink.handler.peers == [] and sink.handler.messages == []  # the sink saw no MAIL at all
    assert handle.messages() == []  # and nothing was queued for it
    for source in data["sources"]:
        sent = [line["text"] for line in source["transcript"] if line["direction"] == "C"]
        assert sent and not any(text.upper().startswith(("DATA", "BDAT")) for text in sent)


def test_restricted_client_every_vector_refused_exit_0(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay()
    r = relay_test(handle, "--source-ip", RESTRICTED, "--json")
    assert r.code == 0, r.out + r.err
    data = r.json()
    assert data["open_relay"] is False and data["exit_code"] == 0
    assert data["local_domain"] == "corp.example"  # the first Authoritative domain of --config
    (source,) = data["sources"]
    assert source["local"] == RESTRICTED and source["error"] is None
    attempts = source["attempts"]
    assert len(attempts) >= 30
    assert {a["verdict"] for a in attempts} == {"refused"}, [
        (a["vector"], a["reply"], a["note"]) for a in attempts if a["verdict"] != "refused"
    ]
    by_id = {a["vector"]: a for a in attempts}
    expected = {
        "plain", "null-sender", "forged-local-sender", "server-name-sender", "percent-local",
        "percent-chained", "percent-literal", "quoted-at-local", "quoted-percent-local",
        "double-at-literal", "source-route-literal", "source-route-local", "bang", "bang-local",
        "external-literal", "case", "trailing-dot", "smtputf8", "helo-server-name",
        "helo-localhost", "helo-literal",
    }  # fmt: skip
    assert expected <= set(by_id)
    plain = by_id["plain"]
    assert plain["command"] == "RCPT TO:<relaytest@nmap.scanme.org>"
    assert plain["stage"] == "RCPT" and plain["code"] == 550
    assert plain["reply"].startswith("550 5.7.54")
    assert by_id["percent-local"]["command"] == ("RCPT TO:<relaytest%nmap.scanme.org@corp.example>")
    assert by_id["percent-literal"]["command"] == (
        "RCPT TO:<relaytest%nmap.scanme.org@[127.0.0.1]>"
    )
    assert by_id["helo-server-name"]["helo"] == "relay.corp.example"
    assert by_id["null-sender"]["commands"][0] == "MAIL FROM:<>"
    mixed = by_id["mixed-transaction"]
    assert mixed["commands"][1:] == [
        "RCPT TO:<postmaster@corp.example>",
        "RCPT TO:<relaytest@nmap.scanme.org>",
    ]
    assert mixed["stage"] == "RCPT" and mixed["reply"].startswith("550 5.7.54")
    # the control: the local recipient is accepted (the relay is up), reported apart
    control = source["control"]
    assert control["command"] == "RCPT TO:<postmaster@corp.example>"
    assert control["verdict"] == "accepted" and control["reply"].startswith("250")
    # RelayGate closes after max_protocol_errors (5): the test reconnected and went on
    assert sum(1 for line in source["transcript"] if line["text"].startswith("connected to")) > 3
    assert_nothing_relayed(handle, sink, data)


def test_restricted_client_human_output(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay()
    r = relay_test(handle, "--source-ip", RESTRICTED)
    assert r.code == 0, r.out + r.err
    assert f"From {RESTRICTED} to 127.0.0.1:{handle.port} (relay.corp.example)" in r.out
    assert "control: RCPT TO:<postmaster@corp.example> -> 250" in r.out
    assert "RCPT TO:<relaytest@nmap.scanme.org>" in r.out
    assert "550 5.7.54" in r.out
    assert f"no relay accepted from {RESTRICTED} (" in r.out
    assert "│ refused │" in r.out and "│ accepted │" not in r.out
    assert sink.handler.peers == [] and handle.messages() == []


def test_open_client_plain_vector_accepted_exit_1(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay()
    r = relay_test(handle, "--source-ip", OPEN, "--json")
    assert r.code == 1, r.out + r.err
    data = r.json()
    assert data["open_relay"] is True and data["exit_code"] == 1
    (source,) = data["sources"]
    assert source["local"] == OPEN and source["open_relay"] is True
    by_id = {a["vector"]: a for a in source["attempts"]}
    plain = by_id["plain"]
    assert plain["verdict"] == "accepted"
    assert plain["command"] == "RCPT TO:<relaytest@nmap.scanme.org>"
    assert plain["code"] == 250 and plain["stage"] == "RCPT"
    assert source["accepted"] == sum(1 for a in source["attempts"] if a["verdict"] == "accepted")
    assert source["summary"] == (
        f"open relay: {source['accepted']} of {source['attempted']} attempts accepted from {OPEN}"
    )
    assert_nothing_relayed(handle, sink, data)
    # an accepted RCPT is reset, never followed by DATA
    sent = [line["text"] for line in source["transcript"] if line["direction"] == "C"]
    i = sent.index("RCPT TO:<relaytest@nmap.scanme.org>")
    assert sent[i + 1] == "RSET"


def test_open_client_human_output_and_two_sources(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay()
    r = relay_test(handle, "--source-ip", RESTRICTED, "--source-ip", OPEN)
    assert r.code == 1, r.out + r.err
    assert f"no relay accepted from {RESTRICTED} (" in r.out
    assert f"attempts accepted from {OPEN}" in r.out and "open relay: " in r.out
    assert f"open relay from {OPEN}" in r.out
    lines = r.out.splitlines()
    plain = [line for line in lines if "RCPT TO:<relaytest@nmap.scanme.org>" in line]
    assert any("│ refused" in line for line in plain) and any(
        "│ accepted" in line for line in plain
    )
    assert sink.handler.peers == [] and handle.messages() == []


def test_unreachable_server_exit_2_names_server_and_source() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    r = run("test", "relay", "--server", f"127.0.0.1:{port}", "--source-ip", RESTRICTED,
            "--local-domain", "corp.example", "--timeout", "3")  # fmt: skip
    assert r.code == 2, r.out + r.err
    assert f"cannot connect to 127.0.0.1:{port} from {RESTRICTED}" in r.err
    assert "refused" in r.err.lower()
    assert time.monotonic() - started < 30
    j = run("test", "relay", "--server", f"127.0.0.1:{port}", "--source-ip", RESTRICTED,
            "--local-domain", "corp.example", "--json")  # fmt: skip
    assert j.code == 2
    (source,) = j.json()["sources"]
    assert source["error"].startswith(f"cannot connect to 127.0.0.1:{port} from {RESTRICTED}")


def test_dropped_client_exit_2(make_relay: Callable[..., RelayHandle]) -> None:
    """127.0.0.7 is on no connector: RelayGate drops it silently; the test says why it stopped."""
    handle = make_relay()
    r = relay_test(handle, "--source-ip", "127.0.0.7")
    assert r.code == 2, r.out + r.err
    assert "closed the connection from 127.0.0.7 before greeting" in r.err


def test_a_source_in_trusted_proxies_is_told_the_relay_waits_for_a_proxy_header(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: SMTPServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """server.trusted_proxies covers the tester's address: the relay waits for a PROXY header
    (no banner) and closes at its timeout. The test said "no receive connector takes 127.0.0.5
    there?", though one does: it now names trusted_proxies from --config, and the way out."""
    import relaygate.smtp.server as smtp_server

    monkeypatch.setattr(smtp_server, "PROXY_HEADER_TIMEOUT", 1.0)
    handle = relay(
        [internal_connector()], start=False, server={"trusted_proxies": ["127.0.0.0/29"]}
    )
    handle.doc["send_connectors"][0]["port"] = sink.port
    handle.config_path.write_text(tomlkit.dumps(handle.doc), encoding="utf-8")
    handle.config = load_config(handle.config_path)
    handle.start()
    for timeout in ("5", "0.5"):  # the relay closes first; the tester gives up first
        r = run("test", "relay", "--server", f"127.0.0.1:{handle.port}", "--config",
                str(handle.config_path), "--timeout", timeout, "--source-ip", RESTRICTED)  # fmt: skip
        assert r.code == 2, r.out + r.err
        err = " ".join(r.err.split())
        assert "no receive connector takes" not in err, err
        assert (
            f"{RESTRICTED} is in server.trusted_proxies (127.0.0.0/29) of {handle.config_path}: "
            "the relay waits for a PROXY header from it"
        ) in err, err
        assert "--source-ip" in err
    assert sink.handler.peers == []


def test_tarpit_is_bounded_by_max_time(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay(tarpit_interval="00:00:01")
    started = time.monotonic()
    r = relay_test(handle, "--source-ip", RESTRICTED, "--max-time", "3", "--json")
    elapsed = time.monotonic() - started
    assert r.code == 2, r.out + r.err
    assert elapsed < 20
    (source,) = r.json()["sources"]
    verdicts = [a["verdict"] for a in source["attempts"]]
    assert "refused" in verdicts and "accepted" not in verdicts
    late = [a for a in source["attempts"] if a["verdict"] == "error"]
    assert late and all("--max-time 3s ran out" in a["note"] for a in late)
    assert "could not be completed" in source["summary"]
    assert sink.handler.peers == []


def test_no_local_domain_skips_control_with_note(
    make_relay: Callable[..., RelayHandle], tmp_path: Any
) -> None:
    handle = make_relay()
    r = run(
        "test",
        "relay",
        "--server",
        f"127.0.0.1:{handle.port}",
        "--source-ip",
        RESTRICTED,
        "--timeout",
        "5",
        "--json",
    )  # fmt: skip  (no --config, no ./relaygate.toml)
    assert r.code == 0, r.out + r.err
    data = r.json()
    assert data["local_domain"] is None
    assert any("no local domain" in note for note in data["notes"])
    (source,) = data["sources"]
    assert source["control"] is None
    skipped = {a["vector"] for a in source["attempts"] if a["verdict"] == "skipped"}
    assert {"percent-local", "forged-local-sender", "bang-local"} <= skipped
    assert {a["verdict"] for a in source["attempts"]} == {"refused", "skipped"}


def test_external_domain_that_is_accepted_is_a_usage_error(
    make_relay: Callable[..., RelayHandle],
) -> None:
    handle = make_relay()
    r = relay_test(handle, "--source-ip", RESTRICTED, "--external-domain", "Corp.Example")
    assert r.code == 2
    assert "--external-domain corp.example is accepted domain corp.example" in r.err
    bad = relay_test(handle, "--external-domain", "not a domain")
    assert bad.code == 2 and "--external-domain 'not a domain'" in bad.err
    reserved = relay_test(
        handle, "--source-ip", RESTRICTED, "--external-domain", "victim.example.net", "--json"
    )
    assert reserved.code == 0, reserved.out + reserved.err
    data = reserved.json()
    assert any("victim.example.net is a reserved name" in note for note in data["notes"])
    by_id = {a["vector"]: a for a in data["sources"][0]["attempts"]}
    assert by_id["plain"]["command"] == "RCPT TO:<relaytest@victim.example.net>"


def test_battery_never_holds_data_and_targets_the_external_domain() -> None:
    from relaygate.selftest import BATTERY, battery

    assert len(BATTERY) == 43  # as README and --help say
    vectors, skipped = battery(
        external="ext.example.net", sender="a@ext.example.net", local="corp.example",
        server_name="relay.corp.example", server_ip="::1", external_ip="203.0.113.25",
    )  # fmt: skip
    assert skipped == []
    assert len({v.id for v in vectors}) == len(vectors)
    for v in vectors:
        assert v.mail.upper().startswith("MAIL FROM:") and v.rcpt.upper().startswith("RCPT TO:")
        assert "ext" in v.rcpt.lower() or "203.0.113.25" in v.rcpt
    by_id = {v.id: v for v in vectors}
    assert by_id["percent-literal"].rcpt == "RCPT TO:<relaytest%ext.example.net@[IPv6:::1]>"
    assert by_id["bang"].rcpt == "RCPT TO:<ext.example.net!relaytest>"
    assert by_id["source-route-local"].rcpt == (
        "RCPT TO:<@corp.example,@ext.example.net:relaytest@ext.example.net>"
    )
    # security-bar §1B vectors that were missing (7, 12, 16, 27, 28, 29, 35)
    assert by_id["double-at-local-first"].rcpt == "RCPT TO:<relaytest@corp.example@ext.example.net>"
    assert by_id["bang-chain-local"].rcpt == "RCPT TO:<corp.example!ext.example.net!relaytest>"
    assert by_id["numeric-domain"].rcpt == "RCPT TO:<relaytest@203.0.113.25>"
    assert by_id["syntax-trailing-blank"].rcpt == "RCPT TO:<relaytest@ext.example.net> "
    mixed = by_id["mixed-transaction"]
    assert mixed.before == ("RCPT TO:<postmaster@corp.example>",)
    assert mixed.rcpt == "RCPT TO:<relaytest@ext.example.net>"
    assert all(v.before == () for v in vectors if v is not mixed)


def test_require_tls_needs_starttls_and_starttls_reaches_the_relay_decision(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    """A connector with require_tls answers 530 to MAIL in clear: that is no relay decision, and
    the test says so; with --starttls (self-signed certificate: --insecure) RCPT decides."""
    handle = make_relay(require_tls=True)
    clear = relay_test(handle, "--source-ip", RESTRICTED, "--json")
    (source,) = clear.json()["sources"]
    assert {a["stage"] for a in source["attempts"]} == {"MAIL"}
    assert source["attempts"][0]["reply"] == "530 5.7.0 Must issue a STARTTLS command first"
    assert any("--starttls" in note for note in source["notes"])
    untrusted = relay_test(handle, "--source-ip", RESTRICTED, "--starttls")  # self-signed
    assert untrusted.code == 2, untrusted.out + untrusted.err
    assert "CERTIFICATE_VERIFY_FAILED (use --insecure to test anyway)" in untrusted.err
    r = relay_test(handle, "--source-ip", RESTRICTED, "--starttls", "--insecure", "--json")
    assert r.code == 0, r.out + r.err
    (source,) = r.json()["sources"]
    assert source["notes"] == []
    assert source["control"]["verdict"] == "accepted"
    by_id = {a["vector"]: a for a in source["attempts"]}
    assert by_id["plain"]["stage"] == "RCPT" and by_id["plain"]["reply"].startswith("550 5.7.54")
    assert {a["verdict"] for a in source["attempts"]} == {"refused"}
    assert any(line["text"].startswith("TLS established") for line in source["transcript"])
    assert sink.handler.peers == [] and handle.messages() == []


def test_narrow_terminal_keeps_commands_and_replies_whole(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer
) -> None:
    handle = make_relay()
    r = run("test", "relay", "--server", f"127.0.0.1:{handle.port}", "--source-ip", OPEN,
            "--local-domain", "corp.example", env={"COLUMNS": "80"})  # fmt: skip
    assert r.code == 1, r.out + r.err
    lines = r.out.splitlines()
    i = lines.index(" 1 plain accepted")
    assert lines[i + 1 : i + 3] == [
        "   RCPT TO:<relaytest@nmap.scanme.org>",
        "   250 2.1.5 Recipient OK",
    ]
    j = lines.index(" 2 null-sender accepted")
    assert lines[j + 1] == "   MAIL FROM:<>"
    assert "   RCPT TO:<relaytest%nmap.scanme.org%corp.example@corp.example>" in lines
    assert sink.handler.peers == []


def test_open_relay_behind_require_tls_is_not_passed_in_clear(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: SMTPServer,
) -> None:
    """An anonymous relay connector with require_tls answers 530 to every MAIL in clear: the test
    in clear said "no relay accepted" with exit 0 (a note only), though any client that issues
    STARTTLS may relay. Without --starttls it decides nothing: exit 2."""
    handle = relay(
        [internal_connector(), relay_connector((OPEN,), name="Anonymous Relay", require_tls=True)],
        start=False,
    )
    handle.doc["send_connectors"][0]["port"] = sink.port
    handle.config_path.write_text(tomlkit.dumps(handle.doc), encoding="utf-8")
    handle.config = load_config(handle.config_path)
    handle.start()
    clear = relay_test(handle, "--source-ip", OPEN, "--json")
    assert clear.code == 2, clear.out + clear.err
    (source,) = clear.json()["sources"]
    assert any("--starttls" in note for note in source["notes"])
    assert "incomplete" in source["summary"]
    tls = relay_test(handle, "--source-ip", OPEN, "--starttls", "--insecure", "--json")
    assert tls.code == 1, tls.out + tls.err  # what a TLS client gets: an open relay
    assert sink.handler.peers == [] and handle.messages() == []


def test_a_resolver_that_hangs_does_not_hang_the_tool(
    make_relay: Callable[..., RelayHandle], sink: SMTPServer, tmp_path: Any
) -> None:
    """socket.getfqdn() has no timeout: the EHLO name (and server.fqdn's default, when the config
    file has none) called it before any bound of the tool applied, and a broken resolver hung
    `relaygate test relay`. Run with a getfqdn that never returns and a config without
    server.fqdn: the battery runs and ends well within its bounds, greeting with gethostname()."""
    handle = make_relay()
    doc = tomlkit.parse(handle.config_path.read_text(encoding="utf-8"))
    doc["server"].pop("fqdn", None)
    config = tmp_path / "no-fqdn.toml"
    config.write_text(tomlkit.dumps(doc), encoding="utf-8")
    hang = (
        "import socket, time\n"
        "def hang(*args, **kwargs):\n"
        "    time.sleep(600)\n"
        "socket.getfqdn = hang\n"
        "from relaygate.cli import main\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    started = time.monotonic()
    proc = subprocess.run(
        [PYTHON, "-c", hang, "test", "relay", "--server", f"127.0.0.1:{handle.port}",
         "--config", str(config), "--source-ip", RESTRICTED, "--timeout", "5",
         "--max-time", "40", "--json"],
        capture_output=True, text=True, env=env, timeout=50,
    )  # fmt: skip
    assert time.monotonic() - started < 45
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(proc.stdout)
    assert data["local_domain"] == "corp.example"  # the config was read
    (source,) = data["sources"]
    name = socket.gethostname()
    expected = (
        name if "." in name and not name.lower().startswith("localhost")
        else "relaygate-selftest.invalid"
    )  # fmt: skip
    assert {a["vector"]: a for a in source["attempts"]}["plain"]["helo"] == expected


def test_a_relay_that_refuses_every_sender_at_mail_is_not_passed(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: SMTPServer,
) -> None:
    """An anonymous relay connector with allowed_senders refuses every MAIL FROM of the battery
    (550 5.7.1: not a sender it allows): no RCPT is ever decided, yet the test said "no relay
    accepted" with exit 0, while any client that sends as the allowed address relays to anyone.
    A 5xx to MAIL that is not an authentication requirement (530) decides nothing: exit 2, and
    --from with the devices' address reaches the relay decision."""
    handle = relay(
        [
            internal_connector(permission_groups=[]),  # 127.0.0.5: anonymous may not submit
            relay_connector((OPEN,), name="Anonymous Relay", allowed_senders=["scan@corp.example"]),
        ],
        start=False,
    )
    handle.doc["send_connectors"][0]["port"] = sink.port
    handle.config_path.write_text(tomlkit.dumps(handle.doc), encoding="utf-8")
    handle.config = load_config(handle.config_path)
    handle.start()
    r = relay_test(handle, "--source-ip", OPEN, "--json")
    assert r.code == 2, r.out + r.err
    (source,) = r.json()["sources"]
    assert {a["stage"] for a in source["attempts"]} == {"MAIL"}
    assert source["attempts"][0]["reply"].startswith("550 5.7.1 ")
    assert "incomplete" in source["summary"] and "--from" in source["summary"]
    assert any("--from" in note for note in source["notes"])
    human = relay_test(handle, "--source-ip", OPEN)
    assert human.code == 2, human.out + human.err
    assert "AUTH required?" not in human.out  # that note is for 530 refusals
    allowed = relay_test(handle, "--source-ip", OPEN, "--from", "scan@corp.example", "--json")
    assert allowed.code == 1, allowed.out + allowed.err  # what a device's sender gets: it relays
    # a connector that wants AUTH answers 530 to every MAIL: that is the decision (exit 0)
    auth = relay_test(handle, "--source-ip", RESTRICTED)
    assert auth.code == 0, auth.out + auth.err
    assert "530 5.7.1 Client was not authenticated" in auth.out and "AUTH required?" in auth.out
    assert sink.handler.peers == [] and handle.messages() == []


def test_a_test_from_the_relay_s_own_address_gets_the_note_test_send_gives() -> None:
    """Run on the relay against its own non-loopback address, the test is taken by the connector
    of that address (not the devices'): `test send` said so, `test relay` only noted loopback.
    (Unit level: the tests reach 127.0.0.0/8 only, and no non-loopback address is the relay's.)"""
    from relaygate.cli.relaytest import tested_from_notes
    from relaygate.selftest import SourceResult

    own = SourceResult(source_ip=None, local="192.0.2.25", peer="192.0.2.25")
    looped = SourceResult(source_ip=None, local="127.0.0.1", peer="127.0.0.1")
    device = SourceResult(source_ip=None, local="192.0.2.40", peer="192.0.2.25")
    (note,) = tested_from_notes([own, device])
    assert note.startswith("tested from the relay's own address (192.0.2.25): the result holds")
    assert "--source-ip" in note
    (note,) = tested_from_notes([looped])
    assert note.startswith("tested from loopback (127.0.0.1): the result holds")
    assert tested_from_notes([device]) == []
