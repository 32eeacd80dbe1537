"""`relaygate import exchange` as a subprocess: dry run (text and --json) and --write."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
FL = FIXTURES / "receive_connectors_fl.txt"
CSV = FIXTURES / "receive_connectors.csv"
JSON_EXPORT = FIXTURES / "receive_connectors.json"
ACL_FL = FIXTURES / "adpermission_fl.txt"
ACL_CSV = FIXTURES / "adpermission.csv"
SEND_FL = FIXTURES / "send_connectors_fl.txt"
SEND_CSV = FIXTURES / "send_connectors.csv"
SEND_JSON = FIXTURES / "send_connectors.json"
LOGS = FIXTURES / "logs"

CONFIG = """\
# RelayGate at Corp: managed by IT (keep this line)
[server]
name = "RELAY01"   # shows in logs as RELAY01\\<connector>
fqdn = "relay.corp.example"

[[accepted_domains]]
domain = "corp.example"
domain_type = "Authoritative"

[[receive_connectors]]
name = "Loopback"  # health checks
bindings = ["127.0.0.1:2525"]
remote_ip_ranges = ["127.0.0.1"]
permission_groups = ["AnonymousUsers"]

[[send_connectors]]
name = "Outbound"  # MX delivery
address_spaces = ["*"]
"""


def run(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    environ.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "import", "exchange", *map(str, args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )


def config_validation_available() -> bool:
    try:
        from relaygate.config import parse_config

        parse_config({}, "<probe>")
    except ImportError:
        return False
    return True


def test_dry_run_json(tmp_path: Path) -> None:
    proc = run(FL, CSV, "--permissions", ACL_FL, "--permissions", ACL_CSV, "--logs", LOGS,
               "--accepted-domain", "corp.example", "--json", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"connectors", "send_connectors", "permissions", "warnings", "skipped", "errors",
                        "sources", "usage", "written", "disabled", "problems"}  # fmt: skip
    assert out["send_connectors"] == []
    assert [c["name"] for c in out["connectors"]] == [
        "Relay Printers",
        "App Relay",
        "Default Frontend EX02",
    ]
    assert out["connectors"][0]["permissions"] == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
        },
        {
            "user": "CORP\\svc-scan",
            "extended_rights": ["ms-Exch-SMTP-Submit", "ms-Exch-SMTP-Accept-Any-Recipient"],
        },
    ]
    assert out["permissions"]["App Relay"][0]["user"] == "MS Exchange\\Externally Secured Servers"
    assert out["errors"] == [] and out["written"] is None
    relay = next(c for c in out["usage"]["connectors"] if c["name"] == "Relay Printers")
    assert relay["proposed_remote_ip_ranges"] == [
        "10.10.5.11-10.10.5.13",
        "192.168.20.7",
        "2001:db8:10::25",
    ]
    by_ip = {c["ip"]: c for c in relay["clients"]}
    assert by_ip["10.10.5.11"]["relayed"] is True
    assert by_ip["10.10.5.13"]["relayed"] is True  # accounting.corp.example is not corp.example
    assert list(tmp_path.iterdir()) == []  # a dry run writes nothing


def test_dry_run_text_detects_logs_among_files(tmp_path: Path) -> None:
    proc = run(
        FL, ACL_FL, LOGS / "RECV2024031409-1.LOG", LOGS / "RECV2024031410-1.LOG", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    toml_part = text.split("\nwarning:", 1)[0]
    parsed = tomllib.loads(toml_part)
    assert [c["name"] for c in parsed["receive_connectors"]] == ["Relay Printers", "App Relay"]
    assert parsed["receive_connectors"][0]["permissions"][0] == {
        "user": "NT AUTHORITY\\ANONYMOUS LOGON",
        "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
    }
    assert "# imported from Exchange EX01\\Relay Printers" in text
    assert "Protocol-log usage: EX01\\Relay Printers" in text
    assert "proposed remote_ip_ranges: 10.10.5.11-10.10.5.13, 192.168.20.7, 2001:db8:10::25" in text
    assert "connected without sending (not in the proposal): 10.10.5.30" in text
    assert "relayed = ?" in text  # no accepted domains known
    # The hint names the TOML table to add, brackets and all (not eaten as console markup).
    assert "a config with [[accepted_domains]] to tell" in text
    assert re.search(
        r"^read 2 protocol log file\(s\), 0\.0 MB, 123 lines in \d+\.\d s$", text, re.M
    )
    assert "reading protocol logs" not in proc.stderr  # the progress bar is for terminals only


def test_write_merges_and_keeps_comments(tmp_path: Path) -> None:
    config = tmp_path / "relaygate.toml"
    config.write_text(CONFIG)
    proc = run(
        FL, "--permissions", ACL_FL, "--write", cwd=tmp_path
    )  # default path: ./relaygate.toml
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 connector(s)" in proc.stdout
    written = config.read_text()
    lines = written.splitlines()
    position = 0
    for line in CONFIG.splitlines():  # every original line survives, in order
        position = lines.index(line, position) + 1
    doc = tomllib.loads(written)
    assert [c["name"] for c in doc["receive_connectors"]] == [
        "Loopback",
        "Relay Printers",
        "App Relay",
    ]
    assert [c["name"] for c in doc["send_connectors"]] == ["Outbound"]
    assert doc["receive_connectors"][1]["remote_ip_ranges"][0] == "192.168.20.0/24"
    assert [p["user"] for p in doc["receive_connectors"][1]["permissions"]] == [
        "NT AUTHORITY\\ANONYMOUS LOGON",
        "CORP\\svc-scan",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name != "relaygate.toml"]  # no temp file left
    if config_validation_available():
        from relaygate.config import parse_config

        parse_config(doc, str(config))


def test_write_with_env_config_and_narrowed_ranges(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "relay.toml"
    config.parent.mkdir()
    config.write_text(CONFIG)
    proc = run(FL, "--permissions", ACL_FL, "--logs", LOGS, "--narrow-ranges", "--write", "--json", cwd=tmp_path,
               env={"RELAYGATE_CONFIG": str(config)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["written"] == str(config)
    doc = tomllib.loads(config.read_text())
    relay = next(c for c in doc["receive_connectors"] if c["name"] == "Relay Printers")
    assert relay["remote_ip_ranges"] == ["10.10.5.11-10.10.5.13", "192.168.20.7", "2001:db8:10::25"]
    app = next(c for c in doc["receive_connectors"] if c["name"] == "App Relay")
    assert app["remote_ip_ranges"] == [
        "10.20.30.41",
        "10.20.30.40",
    ]  # no log data: left as exported
    assert any("no accepted message in the protocol logs" in w for w in out["warnings"])


def test_write_refuses_a_name_already_present(tmp_path: Path) -> None:
    config = tmp_path / "relaygate.toml"
    original = CONFIG + '\n[[receive_connectors]]\nname = "relay printers"\nbindings = ["10.0.0.9:25"]\n' \
        'remote_ip_ranges = ["10.9.9.9"]\n'  # fmt: skip
    config.write_bytes(original.encode())
    proc = run(FL, "--write", "--config", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert config.read_bytes() == original.encode()
    assert "a receive connector named 'Relay Printers' already exists" in proc.stderr
    assert "was not changed" in proc.stderr


def test_write_refuses_an_invalid_result_and_leaves_the_file_identical(tmp_path: Path) -> None:
    if not config_validation_available():
        pytest.skip(
            "relaygate.config.parse_config is not available yet: --write validation not testable"
        )
    config = tmp_path / "relaygate.toml"
    # An Exchange 2013-era mistake: a HubTransport connector on port 25 next to the FE relay connector.
    original = CONFIG.replace(
        'name = "Loopback"  # health checks\nbindings = ["127.0.0.1:2525"]',
        'name = "Hub 25"  # legacy\ntransport_role = "HubTransport"\nbindings = ["0.0.0.0:25"]',
    ).encode()
    config.write_bytes(original)
    proc = run(FL, "--write", "--config", config, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout
    assert config.read_bytes() == original
    assert "unique local IP address & port bindings" in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["relaygate.toml"]


def test_write_refuses_conflicting_copies(tmp_path: Path) -> None:
    csv_copy = tmp_path / "ex02.csv"
    csv_copy.write_text(CSV.read_text().replace("10.10.5.40 10.10.5.13", "10.10.5.40 10.10.5.99"))
    config = tmp_path / "relaygate.toml"
    config.write_text(CONFIG)
    proc = run(FL, csv_copy, "--write", "--config", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert config.read_text() == CONFIG
    assert "two different connectors are named 'Relay Printers'" in proc.stderr


def test_unreadable_input_is_an_error(tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("just some notes\nnothing exported here\n")
    proc = run(junk, cwd=tmp_path)
    assert proc.returncode == 1
    assert "notes.txt" in proc.stderr and "not a Format-List" in proc.stderr
    proc = run(tmp_path / "missing.json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "missing.json: cannot read" in proc.stderr


def test_write_appends_after_the_last_connector_below_no_other_heading(tmp_path: Path) -> None:
    config = tmp_path / "relaygate.toml"
    original = CONFIG.replace(
        "[[send_connectors]]", "# Outbound through the smarthost (CHG-2002)\n[[send_connectors]]"
    )
    config.write_text(original)
    proc = run(FL, "--write", "--config", config, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = config.read_text()
    # the send connector's heading still heads it: the imported connectors went above it
    assert "# Outbound through the smarthost (CHG-2002)\n[[send_connectors]]" in written
    assert written.index('name = "App Relay"') < written.index("# Outbound through the smarthost")
    assert written.index('name = "Loopback"') < written.index('name = "Relay Printers"')


@pytest.mark.parametrize("kind", ["not utf-8", "directory"])
def test_write_or_logs_with_an_unreadable_config_is_a_clear_error(
    tmp_path: Path, kind: str
) -> None:
    config = tmp_path / "relaygate.toml"
    if kind == "directory":
        config.mkdir()
    else:
        config.write_bytes(b"\xff\xfe[server]\nname = 'R'\n")
    for args in (["--write"], ["--logs", LOGS]):
        proc = run(FL, *args, "--config", config, cwd=tmp_path)
        assert proc.returncode == 1, proc.stdout
        assert "Traceback" not in proc.stderr
        assert f"{config}:" in proc.stderr
        assert ("not UTF-8" if kind == "not utf-8" else "Is a directory") in proc.stderr


def test_receive_and_send_exports_in_one_call_write_a_loadable_config(tmp_path: Path) -> None:
    from relaygate.config import load_config

    config = tmp_path / "relaygate.toml"
    config.write_text(CONFIG)
    proc = run(FL, SEND_JSON, SEND_CSV, "--permissions", ACL_FL, "--write", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["written"] == "relaygate.toml" and out["problems"] == [] and out["errors"] == []
    assert [c["name"] for c in out["connectors"]] == ["Relay Printers", "App Relay"]
    assert [c["name"] for c in out["send_connectors"]] == ["Outbound to Office 365", "Internet"]
    assert out["send_connectors"][0]["smart_hosts"] == ["smtp.office365.com"]
    assert out["send_connectors"][0]["port"] == 587
    assert out["send_connectors"][1]["source_ip_address"] == "10.0.0.5"
    assert any("SmartHostAuthMechanism BasicAuthRequireTLS" in w for w in out["warnings"])
    assert any(s.startswith("Internet: ErrorPolicies = ") for s in out["skipped"])
    loaded = load_config(config)
    assert [c.name for c in loaded.receive_connectors] == [
        "Loopback",
        "Relay Printers",
        "App Relay",
    ]
    assert [s.name for s in loaded.send_connectors] == [
        "Outbound",
        "Outbound to Office 365",
        "Internet",
    ]
    office, internet = loaded.send_connectors[1:]
    assert office.smart_hosts == ("smtp.office365.com",) and not office.dns_routing_enabled
    assert office.require_tls and office.smtp_max_messages_per_connection == 20
    assert not office.enabled  # until its credential is set
    assert internet.dns_routing_enabled and internet.ignore_starttls
    assert internet.fqdn == "mail.corp.example" and internet.source_ip_address == "10.0.0.5"
    assert "# imported from Exchange Internet" in config.read_text()


def test_dry_run_text_prints_send_connectors_toml(tmp_path: Path) -> None:
    proc = run(SEND_FL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "# send connectors to add to relaygate.toml (dry run; --write to merge)" in proc.stdout
    assert "# receive connectors to add" not in proc.stdout
    toml_text = proc.stdout.split("(dry run; --write to merge)\n", 1)[1].split("warning:", 1)[0]
    doc = tomllib.loads(toml_text)
    assert [s["name"] for s in doc["send_connectors"]] == ["Outbound to Office 365", "Internet"]


def test_a_verbose_send_connector_is_told_that_no_send_protocol_log_is_written(
    tmp_path: Path,
) -> None:
    """Exchange's send connector logs to SmtpSend with ProtocolLoggingLevel Verbose; RelayGate
    keeps the key but writes no send protocol log: the import says so for that connector only,
    in text and in --json."""
    proc = run(SEND_FL, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout + proc.stderr
    assert (
        "Outbound to Office 365: ProtocolLoggingLevel Verbose is imported, but RelayGate writes "
        "no SMTP send protocol log (SmtpSend)"
    ) in out, out
    assert "Internet: ProtocolLoggingLevel" not in out  # its level is None
    proc = run(SEND_JSON, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    warnings = json.loads(proc.stdout)["warnings"]
    assert [w for w in warnings if "no SMTP send protocol log" in w] == [
        "Outbound to Office 365: ProtocolLoggingLevel Verbose is imported, but RelayGate writes "
        "no SMTP send protocol log (SmtpSend): each delivery shows in the message tracking log "
        "(relaygate trace) and the queue's LastError"
    ], warnings


def test_write_refuses_a_send_connector_name_already_present(tmp_path: Path) -> None:
    config = tmp_path / "relaygate.toml"
    original = CONFIG + '\n[[send_connectors]]\nname = "internet"\naddress_spaces = ["*"]\n'
    config.write_bytes(original.encode())
    proc = run(SEND_FL, "--write", "--config", config, cwd=tmp_path)
    assert proc.returncode == 1
    assert config.read_bytes() == original.encode()
    assert "a send connector named 'Internet' already exists" in proc.stderr


def test_ad_permissions_from_convertto_json_objects(tmp_path: Path) -> None:
    # ConvertTo-Json in a local Exchange shell writes User, ExtendedRights and Identity as objects
    # (IdParameters with RawIdentity), not as the strings remoting gives.
    aces = [
        {
            "User": {
                "RawIdentity": "NT AUTHORITY\\ANONYMOUS LOGON",
                "SecurityIdentifier": "S-1-5-7",
            },
            "Identity": "EX01\\Relay Printers",
            "ExtendedRights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
            "AccessRights": [256],
            "Deny": False,
            "IsInherited": False,
        },
        {
            "User": "CORP\\svc-scan",
            "Identity": {"RawIdentity": "EX01\\Relay Printers"},
            "ExtendedRights": [{"RawIdentity": "ms-Exch-SMTP-Submit"}],
            "Deny": False,
            "IsInherited": False,
        },
        {
            "User": {"SecurityIdentifier": {"Value": "S-1-5-7"}},
            "Identity": {"DistinguishedName": None},
            "ExtendedRights": [{"RawIdentity": "ms-Exch-SMTP-Accept-Any-Sender"}],
            "Deny": True,
            "IsInherited": False,
        },
    ]
    acl = tmp_path / "acl.json"
    acl.write_text(json.dumps(aces), encoding="utf-8")
    proc = run(FL, "--permissions", acl, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["connectors"][0]["permissions"] == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
        },
        {"user": "CORP\\svc-scan", "extended_rights": ["ms-Exch-SMTP-Submit"]},
    ]
    # The Deny ACE names no connector: said, never dropped in silence.
    assert (
        "an AD permission entry (Deny ms-Exch-SMTP-Accept-Any-Sender for NT AUTHORITY\\ANONYMOUS "
        "LOGON) names no connector in its Identity; not imported"
    ) in out["warnings"]


def test_a_log_among_the_files_is_told_by_its_header_not_read_whole(tmp_path: Path) -> None:
    import tracemalloc

    from relaygate.cli.importer import _classify

    log = tmp_path / "RECV2024031409-1.LOG"
    head = (LOGS / "RECV2024031409-1.LOG").read_bytes()
    with log.open("wb") as out:
        out.write(head)
        for _ in range(1000):  # ~10 MB
            out.write(head.split(b"\n", 5)[5])
    tracemalloc.start()
    try:
        exports, logs = _classify([log, FL])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert logs == [log] and [path for path, _ in exports] == [FL]
    assert peak < log.stat().st_size / 10, f"peak {peak:,} bytes"


OPEN_RELAY = """
Identity         : EX01\\Relay Printers
Bindings         : {0.0.0.0:25}
RemoteIPRanges   : {0.0.0.0-255.255.255.255}
AuthMechanism    : Tls
PermissionGroups : AnonymousUsers
TransportRole    : FrontendTransport
Enabled          : True

User           : NT AUTHORITY\\ANONYMOUS LOGON
ExtendedRights : {ms-Exch-SMTP-Accept-Any-Recipient}
Deny           : False
IsInherited    : False
Identity       : EX01\\Relay Printers
"""


def test_write_never_puts_an_open_relay_live(tmp_path: Path) -> None:
    # A running server reloads the config as soon as it changes: an enabled open relay would relay
    # for the whole Internet from the moment of the write.
    export = tmp_path / "open.txt"
    export.write_text(OPEN_RELAY)
    config = tmp_path / "relaygate.toml"
    config.write_text(CONFIG)
    proc = run(export, "--write", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    relay = next(
        c
        for c in tomllib.loads(config.read_text())["receive_connectors"]
        if c["name"] == "Relay Printers"
    )
    assert relay["enabled"] is False
    assert relay["remote_ip_ranges"] == ["0.0.0.0-255.255.255.255"]
    assert (
        "warning: EX01\\Relay Printers: grants relay to (nearly) all addresses: this is an OPEN RELAY, "
        "so it is imported disabled. Narrow remote_ip_ranges to the devices that send (see the "
        "protocol-log usage report), then set enabled = true"
    ) in proc.stdout


def test_an_open_relay_narrowed_from_the_logs_is_imported_enabled(tmp_path: Path) -> None:
    export = tmp_path / "open.txt"
    export.write_text(OPEN_RELAY)
    proc = run(export, "--logs", LOGS, "--narrow-ranges", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    [relay] = out["connectors"]
    assert relay["remote_ip_ranges"] == ["10.10.5.11-10.10.5.13", "192.168.20.7", "2001:db8:10::25"]
    assert relay["enabled"] is True
    assert (
        "Relay Printers: enabled again: the ranges narrowed from the protocol logs no longer make it an "
        "open relay"
    ) in out["warnings"]


def test_narrow_ranges_leaves_a_connector_that_does_not_relay_as_exported(tmp_path: Path) -> None:
    # Default Frontend takes the organisation's mail from the whole Internet: narrowed to the one
    # partner seen in the logs, it would refuse mail from every other sender after the cut-over.
    export = tmp_path / "frontend.txt"
    export.write_text(
        """
Identity         : EX01\\Default Frontend EX01
Bindings         : {[::]:25, 0.0.0.0:25}
RemoteIPRanges   : {::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff, 0.0.0.0-255.255.255.255}
AuthMechanism    : Tls, Integrated, BasicAuth, BasicAuthRequireTLS, ExchangeServer
PermissionGroups : AnonymousUsers, ExchangeServers, ExchangeLegacyServers
TransportRole    : FrontendTransport
"""
    )
    proc = run(export, "--logs", LOGS, "--narrow-ranges", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    [frontend] = out["connectors"]
    assert frontend["remote_ip_ranges"] == [
        "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        "0.0.0.0-255.255.255.255",
    ]
    assert (
        "Default Frontend EX01: remote_ip_ranges not narrowed: anonymous clients cannot relay through "
        "it (it takes mail for the accepted domains, or relays after AUTH only), so narrowing it to the "
        "1 address(es) seen in the protocol logs would refuse every other sender"
    ) in out["warnings"]


def test_the_accepted_domains_of_a_config_saved_with_a_byte_order_mark_are_used(
    tmp_path: Path,
) -> None:
    """check and serve read a config that Windows Notepad saved (a UTF-8 byte order mark first);
    the protocol-log analysis read it as invalid TOML, silently knew no accepted domain and
    answered 'relayed = ?' for every client."""
    config = tmp_path / "relaygate.toml"
    config.write_bytes(b"\xef\xbb\xbf" + CONFIG.encode("utf-8"))
    proc = run(FL, "--logs", LOGS, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    relay = next(
        c for c in json.loads(proc.stdout)["usage"]["connectors"] if c["name"] == "Relay Printers"
    )
    by_ip = {c["ip"]: c for c in relay["clients"]}
    assert by_ip["10.10.5.11"]["relayed"] is True


def test_the_summary_names_a_connector_written_disabled(tmp_path: Path) -> None:
    """An open relay is written with enabled = false (b4ee017), but the last line said 'wrote 1
    connector(s) to relaygate.toml: Relay Printers' as for a live one: an admin reading the
    summary took the devices' connector for working. --json lists the disabled ones by name."""
    export = tmp_path / "open.txt"
    export.write_text(OPEN_RELAY)
    config = tmp_path / "relaygate.toml"
    config.write_text(CONFIG)
    proc = run(export, "--write", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (
        "wrote 1 connector(s) to relaygate.toml: Relay Printers (disabled: enabled = false, "
        "see the warnings above)"
    ) in proc.stdout
    config.write_text(CONFIG)
    out = json.loads(run(export, "--write", "--json", cwd=tmp_path).stdout)
    assert out["disabled"] == ["Relay Printers"]
    assert out["written"] == "relaygate.toml"
