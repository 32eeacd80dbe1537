"""`relaygate connector ...` as a subprocess against temporary configs: text, --json, comments kept,
refused edits leave the file byte-identical."""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path

import pytest

from tests.cli_admin.helpers import run, write

CONFIG = """
# RelayGate config for the test office
[server]
name = "RELAY01"          # appears in logs
fqdn = "relay.corp.example"

[[accepted_domains]]
domain = "corp.example"   # our own domain
domain_type = "Authoritative"
default = true

# Printers and scanners
[[receive_connectors]]
name = "SMTP Relay Internal"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = [
  "10.0.0.5",   # copier, 1st floor
  "10.0.0.6",   # scanner
]
permission_groups = ["AnonymousUsers"]
protocol_logging_level = "Verbose"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

# Everyone else on the LAN: accepted domains only
[[receive_connectors]]
name = "Default Frontend"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/8"]
permission_groups = ["AnonymousUsers"]

# Outbound through Microsoft 365
[[send_connectors]]
name = "Outbound to Microsoft 365"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["corp-example.mail.protection.outlook.com"]  # the tenant MX
"""

COMMENTS = [
    "# RelayGate config for the test office",
    "# appears in logs",
    "# our own domain",
    "# Printers and scanners",
    "# copier, 1st floor",
    "# scanner",
    "# Everyone else on the LAN: accepted domains only",
    "# Outbound through Microsoft 365",
    "# the tenant MX",
]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write(tmp_path / "relaygate.toml", CONFIG)


def load(path: Path) -> dict:
    return tomllib.loads(path.read_text(encoding="utf-8-sig"))


def connector(path: Path, name: str) -> dict:
    return next(c for c in load(path)["receive_connectors"] if c["name"] == name)


def assert_comments_kept(path: Path) -> None:
    text = path.read_text()
    for comment in COMMENTS:
        assert comment in text, f"comment lost: {comment}\n{text}"


def assert_valid(path: Path) -> None:
    r = run("check", "--config", str(path))
    assert r.code == 0, r.out + r.err


# -- list / show ---------------------------------------------------------------------------------------


def test_list_text(cfg: Path) -> None:
    r = run("connector", "list", "--config", str(cfg))
    assert r.code == 0, r.err
    assert "RELAY01\\SMTP Relay Internal" in r.out
    assert "RELAY01\\Default Frontend" in r.out
    assert "method A" in r.out  # the relay column says how relay is granted


def test_list_json(cfg: Path) -> None:
    r = run("connector", "list", "--config", str(cfg), "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert [c["name"] for c in data] == ["SMTP Relay Internal", "Default Frontend"]
    relay = data[0]
    assert relay["identity"] == "RELAY01\\SMTP Relay Internal"
    assert relay["remote_ip_ranges"] == ["10.0.0.5", "10.0.0.6"]
    assert relay["relay"]["anonymous"] is True
    assert data[1]["relay"]["anonymous"] is False
    assert relay["max_message_size"] == 37748736  # the Exchange default, in bytes


def test_show_text_includes_defaults(cfg: Path) -> None:
    r = run("connector", "show", "smtp relay internal", "--config", str(cfg))
    assert r.code == 0, r.err
    assert "max_message_size" in r.out and "36MB (37,748,736 bytes)" in r.out
    assert "message_rate_limit" in r.out and "unlimited" in r.out
    assert "connection_timeout" in r.out and "00:10:00" in r.out


def test_show_json(cfg: Path) -> None:
    data = run("connector", "show", "SMTP Relay Internal", "--config", str(cfg), "--json").json()
    assert data["name"] == "SMTP Relay Internal"
    assert data["permissions"] == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
            "deny": False,
        }
    ]
    assert data["connection_inactivity_timeout"] == "00:05:00"


def test_show_unknown_connector(cfg: Path) -> None:
    r = run("connector", "show", "Nope", "--config", str(cfg))
    assert r.code == 1
    assert "no receive connector named 'Nope'" in r.err
    assert "SMTP Relay Internal" in r.err


def test_list_uses_relaygate_config_env(cfg: Path, tmp_path: Path) -> None:
    r = run("connector", "list", "--json", cwd=tmp_path, env={"RELAYGATE_CONFIG": str(cfg)})
    assert len(r.json()) == 2


def test_list_without_file_shows_embedded_default(tmp_path: Path) -> None:
    r = run("connector", "list", "--json", cwd=tmp_path)
    assert r.code == 0, r.err
    assert r.json()[0]["name"] == "Default Loopback Relay"


# -- set -------------------------------------------------------------------------------------------------


def test_set_scalars_keeps_comments(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "--config",
        str(cfg),
        "--max-message-size",
        "25MB",
        "--max-recipients-per-message",
        "100",
        "--connection-timeout",
        "00:20:00",
        "--fqdn",
        "mail.corp.example",
        "--banner",
        "220 mail.corp.example ready",
    )
    assert r.code == 0, r.err
    assert "Updated receive connector 'SMTP Relay Internal'" in r.out
    assert "max_message_size: 36MB (37,748,736 bytes) → 25MB (26,214,400 bytes)" in r.out
    c = connector(cfg, "SMTP Relay Internal")
    assert c["max_message_size"] == "25MB"
    assert c["max_recipients_per_message"] == 100
    assert c["connection_timeout"] == "00:20:00"
    assert c["fqdn"] == "mail.corp.example"
    assert_comments_kept(cfg)
    assert_valid(cfg)


def test_set_bool_flags(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--require-tls",
        "--no-pipelining-enabled",
    )
    assert r.code == 0, r.err
    c = connector(cfg, "SMTP Relay Internal")
    assert c["require_tls"] is True and c["pipelining_enabled"] is False
    r = run("connector", "set", "SMTP Relay Internal", "-c", str(cfg), "--no-require-tls")
    assert connector(cfg, "SMTP Relay Internal")["require_tls"] is False


def test_set_unlimited_and_reset(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--max-inbound-connection-per-source",
        "unlimited",
    )
    assert r.code == 0, r.err
    assert connector(cfg, "SMTP Relay Internal")["max_inbound_connection_per_source"] == "unlimited"
    data = run("connector", "show", "SMTP Relay Internal", "-c", str(cfg), "--json").json()
    assert data["max_inbound_connection_per_source"] is None
    # "" removes the key: the default (20) applies again
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--max-inbound-connection-per-source",
        "",
    )
    assert r.code == 0, r.err
    assert "max_inbound_connection_per_source" not in connector(cfg, "SMTP Relay Internal")


def test_set_multivalued_add_remove_replace(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--add-remote-ip-ranges",
        "10.0.0.7,10.0.0.8",
    )
    assert r.code == 0, r.err
    assert connector(cfg, "SMTP Relay Internal")["remote_ip_ranges"] == [
        "10.0.0.5",
        "10.0.0.6",
        "10.0.0.7",
        "10.0.0.8",
    ]
    assert "# copier, 1st floor" in cfg.read_text()  # comments inside the array survive an append
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--remove-remote-ip-ranges",
        "10.0.0.6",
    )
    assert r.code == 0, r.err
    assert connector(cfg, "SMTP Relay Internal")["remote_ip_ranges"] == [
        "10.0.0.5",
        "10.0.0.7",
        "10.0.0.8",
    ]
    # adding an entry that is already there (written differently) is a no-op for that entry
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--add-remote-ip-ranges",
        "10.0.0.5/32",
    )
    assert connector(cfg, "SMTP Relay Internal")["remote_ip_ranges"] == [
        "10.0.0.5",
        "10.0.0.7",
        "10.0.0.8",
    ]
    # replace: repeated flags
    r = run(
        "connector", "set", "SMTP Relay Internal", "-c", str(cfg),
        "--remote-ip-ranges", "10.0.0.20", "--remote-ip-ranges", "10.0.0.21",
        "--bindings", "0.0.0.0:25", "--add-bindings", "[::]:25",
        "--add-auth-mechanism", "BasicAuth", "--add-auth-mechanism", "BasicAuthRequireTLS",
    )  # fmt: skip
    assert r.code == 0, r.err
    c = connector(cfg, "SMTP Relay Internal")
    assert c["remote_ip_ranges"] == ["10.0.0.20", "10.0.0.21"]
    assert c["bindings"] == ["0.0.0.0:25", "[::]:25"]
    assert c["auth_mechanism"] == [
        "Tls",
        "BasicAuth",
        "BasicAuthRequireTLS",
    ]  # the default Tls kept
    assert_valid(cfg)


def test_set_permission_groups_add_remove(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "Default Frontend",
        "-c",
        str(cfg),
        "--add-permission-groups",
        "ExchangeUsers",
    )
    assert r.code == 0, r.err
    assert connector(cfg, "Default Frontend")["permission_groups"] == [
        "AnonymousUsers",
        "ExchangeUsers",
    ]
    r = run(
        "connector",
        "set",
        "Default Frontend",
        "-c",
        str(cfg),
        "--remove-permission-groups",
        "anonymoususers",
    )
    assert r.code == 0, r.err
    assert connector(cfg, "Default Frontend")["permission_groups"] == ["ExchangeUsers"]


def test_set_remove_missing_entry_is_refused(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--remove-remote-ip-ranges",
        "10.9.9.9",
    )
    assert r.code == 1
    assert "'10.9.9.9' is not in remote_ip_ranges" in r.err
    assert cfg.read_bytes() == before


def test_set_rename(cfg: Path) -> None:
    r = run(
        "connector", "set", "Default Frontend", "-c", str(cfg), "--name", "LAN Clients", "--json"
    )
    assert r.code == 0, r.err
    data = r.json()
    assert data["ok"] is True and data["receive_connector"]["name"] == "LAN Clients"
    assert data["changes"]["name"] == {"from": "Default Frontend", "to": "LAN Clients"}
    assert [c["name"] for c in load(cfg)["receive_connectors"]] == [
        "SMTP Relay Internal",
        "LAN Clients",
    ]


def test_set_json_reports_changes(cfg: Path) -> None:
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--message-rate-limit",
        "60",
        "--json",
    )
    assert r.code == 0, r.err
    data = r.json()
    assert data["changed"] is True
    assert data["changes"] == {"message_rate_limit": {"from": None, "to": 60}}


def test_set_same_value_does_not_rewrite(cfg: Path) -> None:
    before = cfg.read_bytes()
    mtime = cfg.stat().st_mtime_ns
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--protocol-logging-level",
        "Verbose",
    )
    assert r.code == 0, r.err
    assert "no change" in r.out
    assert cfg.read_bytes() == before and cfg.stat().st_mtime_ns == mtime


def test_set_nothing_given(cfg: Path) -> None:
    r = run("connector", "set", "SMTP Relay Internal", "-c", str(cfg))
    assert r.code == 1 and "nothing to change" in r.err


# -- refused edits: the file stays byte-identical -----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--remote-ip-ranges", "10.0.0.9-10.0.0.1"],
            'receive_connectors[0] "SMTP Relay Internal": remote_ip_ranges[0]: '
            "'10.0.0.9-10.0.0.1' is a reversed range",
        ),
        (
            # straddles the edge of Default Frontend's 10.0.0.0/8 on the same binding
            ["--add-remote-ip-ranges", "9.255.255.0-10.0.0.10"],
            "partially overlaps",
        ),
        (
            ["--max-recipients-per-message", "abc"],
            "max_recipients_per_message: expected a whole number",
        ),
        (
            ["--protocol-logging-level", "Loud"],
            "protocol_logging_level: 'Loud' is not one of None, Verbose",
        ),
        (["--add-auth-mechanism", "None"], "auth_mechanism: 'None' must be the only value"),
        (
            ["--connection-timeout", "00:01:00"],
            "must be greater than connection_inactivity_timeout",
        ),
        (["--banner", "hello"], "banner: a custom banner must start with '220'"),
    ],
)
def test_invalid_edit_refused_file_byte_identical(
    cfg: Path, args: list[str], expected: str
) -> None:
    before = cfg.read_bytes()
    r = run("connector", "set", "SMTP Relay Internal", "--config", str(cfg), *args)
    assert r.code == 1, r.out
    assert expected in r.err
    assert (
        f"{cfg}: receive_connectors" in r.err
    )  # the file: connector: key: message form of `check`
    assert "left unchanged" in r.err
    assert cfg.read_bytes() == before
    assert [p.name for p in cfg.parent.iterdir()] == [cfg.name]  # no temp file left behind


def test_refusal_message_matches_check(cfg: Path, tmp_path: Path) -> None:
    """The refused edit prints exactly the lines `check` prints for the same invalid file."""
    before = cfg.read_bytes()
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--remote-ip-ranges",
        "10.0.0.9-10.0.0.1",
    )
    assert r.code == 1
    assert cfg.read_bytes() == before
    broken = cfg.read_text().replace(
        '"10.0.0.5",   # copier, 1st floor\n  "10.0.0.6",   # scanner\n', '"10.0.0.9-10.0.0.1"\n'
    )
    cfg.write_text(broken)
    c = run("check", "-c", str(cfg))
    assert c.code == 1
    problem_lines = [
        line for line in c.out.splitlines() if line.startswith(f"{cfg}: receive_connectors")
    ]
    assert problem_lines and all(line in r.err.splitlines() for line in problem_lines)


def test_invalid_edit_json(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run(
        "connector",
        "set",
        "SMTP Relay Internal",
        "-c",
        str(cfg),
        "--remote-ip-ranges",
        "10.0.0.9-10.0.0.1",
        "--json",
    )
    assert r.code == 1
    data = r.json()
    assert data["ok"] is False
    assert data["errors"][0]["connector"] == "SMTP Relay Internal"
    assert data["errors"][0]["path"] == "receive_connectors[0].remote_ip_ranges[0]"
    assert cfg.read_bytes() == before


def test_edit_of_missing_file_is_an_error(tmp_path: Path) -> None:
    r = run("connector", "set", "X", "--config", str(tmp_path / "nope.toml"), "--fqdn", "a.example")
    assert r.code == 1 and "no such config file" in r.err
    assert not (tmp_path / "nope.toml").exists()


def test_default_path_is_relaygate_toml_in_cwd(cfg: Path) -> None:
    r = run("connector", "disable", "Default Frontend", cwd=cfg.parent)
    assert r.code == 0, r.err
    assert connector(cfg, "Default Frontend")["enabled"] is False


# -- new / remove / enable / disable -------------------------------------------------------------------------


def test_new_connector_positional_name(cfg: Path) -> None:
    r = run(
        "connector", "new", "Scanners 2nd floor", "-c", str(cfg),
        "--bindings", "0.0.0.0:25", "--remote-ip-ranges", "10.0.2.0/24",
        "--permission-groups", "AnonymousUsers", "--protocol-logging-level", "Verbose",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "Created receive connector 'Scanners 2nd floor'" in r.out
    c = connector(cfg, "Scanners 2nd floor")
    assert c["usage"] == "Custom" and c["transport_role"] == "FrontendTransport"
    assert c["auth_mechanism"] == ["Tls"]  # seeded by usage, written explicitly
    assert c["remote_ip_ranges"] == ["10.0.2.0/24"]
    assert_comments_kept(cfg)
    assert_valid(cfg)
    # the send connector's section comment still heads the send connectors
    text = cfg.read_text()
    assert text.index("# Outbound through Microsoft 365") > text.index(
        'name = "Scanners 2nd floor"'
    )
    assert text.index("# Outbound through Microsoft 365") < text.index("[[send_connectors]]")


def test_new_connector_name_option_and_usage_client(cfg: Path) -> None:
    r = run(
        "connector", "new", "--name", "Client Submission", "--usage", "Client", "-c", str(cfg),
        "--remote-ip-ranges", "10.0.0.0/8", "--json",
    )  # fmt: skip
    assert r.code == 0, r.err
    data = r.json()
    assert data["ok"] and data["action"] == "created"
    c = data["receive_connector"]
    assert c["bindings"] == ["0.0.0.0:587"]
    assert c["permission_groups"] == ["ExchangeUsers"]
    assert c["relay"]["authenticated"] is True and c["relay"]["anonymous"] is False


def test_new_duplicate_name_refused(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run(
        "connector",
        "new",
        "smtp relay internal",
        "-c",
        str(cfg),
        "--bindings",
        "0.0.0.0:2525",
        "--remote-ip-ranges",
        "10.1.0.1",
    )
    assert r.code == 1 and "already exists" in r.err
    assert cfg.read_bytes() == before


def test_new_invalid_refused(cfg: Path) -> None:
    before = cfg.read_bytes()
    # no bindings / ranges: New-ReceiveConnector -Custom requires both
    r = run("connector", "new", "Broken", "-c", str(cfg))
    assert r.code == 1
    assert 'receive_connectors[2] "Broken": bindings: is required' in r.err
    assert cfg.read_bytes() == before


def test_new_creates_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "fresh.toml"
    r = run(
        "connector", "new", "Printers", "-c", str(path),
        "--bindings", "127.0.0.1:2525", "--remote-ip-ranges", "10.0.0.5",
        "--permission-groups", "AnonymousUsers",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "(new file)" in r.out
    assert path.exists()
    assert load(path)["receive_connectors"][0]["name"] == "Printers"
    assert path.read_text().startswith("# RelayGate configuration")
    assert stat.S_IMODE(path.stat().st_mode) & 0o600 == 0o600
    assert_valid(path)


def test_new_creates_default_file_in_cwd(tmp_path: Path) -> None:
    r = run(
        "connector",
        "new",
        "P",
        "--bindings",
        "0.0.0.0:25",
        "--remote-ip-ranges",
        "10.0.0.5",
        cwd=tmp_path,
    )
    assert r.code == 0, r.err
    assert (tmp_path / "relaygate.toml").exists()


def test_remove_connector(cfg: Path) -> None:
    r = run("connector", "remove", "default frontend", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "Removed receive connector 'Default Frontend'" in r.out
    assert [c["name"] for c in load(cfg)["receive_connectors"]] == ["SMTP Relay Internal"]
    text = cfg.read_text()
    assert "# Outbound through Microsoft 365" in text  # the next section's heading survives
    assert "# Printers and scanners" in text
    assert_valid(cfg)


def test_remove_connector_json_and_unknown(cfg: Path) -> None:
    r = run("connector", "remove", "SMTP Relay Internal", "-c", str(cfg), "--json")
    assert r.code == 0, r.err
    data = r.json()
    assert (
        data["action"] == "removed" and data["receive_connector"]["name"] == "SMTP Relay Internal"
    )
    # the permission sub-table went with it
    assert all("permissions" not in c for c in load(cfg)["receive_connectors"])
    r = run("connector", "remove", "SMTP Relay Internal", "-c", str(cfg), "--json")
    assert r.code == 1 and r.json()["ok"] is False


def test_enable_disable(cfg: Path) -> None:
    r = run("connector", "disable", "SMTP Relay Internal", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "enabled: true → false" in r.out
    assert connector(cfg, "SMTP Relay Internal")["enabled"] is False
    data = run("connector", "list", "-c", str(cfg), "--json").json()
    assert data[0]["enabled"] is False
    r = run("connector", "enable", "SMTP Relay Internal", "-c", str(cfg), "--json")
    assert r.code == 0 and r.json()["changes"] == {"enabled": {"from": False, "to": True}}
    assert connector(cfg, "SMTP Relay Internal")["enabled"] is True
    assert_comments_kept(cfg)


def test_file_mode_preserved(cfg: Path) -> None:
    os.chmod(cfg, 0o640)
    r = run("connector", "set", "SMTP Relay Internal", "-c", str(cfg), "--comment", "printers")
    assert r.code == 0, r.err
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o640


def test_every_model_field_has_a_flag() -> None:
    """The flag set is generated from model.py: every key can be set from the command line."""
    import dataclasses

    from relaygate.config.model import ReceiveConnector, SendConnector

    r = run("connector", "new", "--help")
    s = run("send-connector", "set", "--help")
    for f in dataclasses.fields(ReceiveConnector):
        if f.name in ("name", "permissions"):
            continue
        assert "--" + f.name.replace("_", "-") in r.out, f.name
    for f in dataclasses.fields(SendConnector):
        if f.name == "name":
            continue
        assert "--" + f.name.replace("_", "-") in s.out, f.name
    assert "--add-remote-ip-ranges" in r.out and "--remove-bindings" in r.out
    assert "--add-smart-hosts" in s.out and "--remove-address-spaces" in s.out


def test_remove_first_connector_takes_its_own_heading_and_keeps_the_next(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        # office relay
        [server]
        name = "RELAY01"

        # Printers (CHG-1001)
        [[receive_connectors]]
        name = "Printers"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.5"]

        # ERP (CHG-1002)
        [[receive_connectors]]
        name = "ERP"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.6"]
        """,
    )
    r = run("connector", "remove", "Printers", "-c", str(cfg))
    assert r.code == 0, r.err
    text = cfg.read_text()
    assert "CHG-1001" not in text
    assert text == (
        "# office relay\n"
        "[server]\n"
        'name = "RELAY01"\n'
        "\n"
        "# ERP (CHG-1002)\n"
        "[[receive_connectors]]\n"
        'name = "ERP"\n'
        'bindings = ["0.0.0.0:25"]\n'
        'remote_ip_ranges = ["10.0.0.6"]\n'
    )
    assert_valid(cfg)


def test_names_that_look_like_markup_are_printed_verbatim(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [server]
        name = "RELAY01"

        [[receive_connectors]]
        name = "Relay [floor 2]"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.5"]
        """,
    )
    r = run("connector", "show", "Relay [floor 2]", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "RELAY01\\Relay [floor 2]" in r.out
    r = run("connector", "show", "[/x]", "-c", str(cfg))
    assert r.code == 1
    assert "Traceback" not in r.err and "no receive connector named '[/x]'" in r.err


def test_a_name_with_a_trailing_dot_is_found(tmp_path: Path) -> None:
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [server]
        name = "RELAY01"

        [[receive_connectors]]
        name = "Relay."
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.5"]
        permission_groups = ["AnonymousUsers"]
        """,
    )
    for query in ("Relay.", "relay"):
        r = run("connector", "show", query, "-c", str(cfg), "--json")
        assert r.code == 0, r.err
        assert r.json()["name"] == "Relay."
    r = run("permission", "list", "Relay.", "-c", str(cfg), "--json")
    assert r.code == 0, r.err
    assert {row["connector"] for row in r.json()} == {"Relay."}
    r = run("connector", "set", "Relay.", "--banner", "220 hi", "-c", str(cfg))
    assert r.code == 0, r.err
    assert connector(cfg, "Relay.")["banner"] == "220 hi"


def test_lists_fit_a_narrow_terminal(cfg: Path) -> None:
    """At 80 columns (a terminal, or piped output) `connector list`, `send-connector list` and
    `permission list` print one line per row, names whole, long values cut; 300 shows all."""
    narrow = {"COLUMNS": "80"}
    receive = run("connector", "list", "--config", str(cfg), env=narrow)
    send = run("send-connector", "list", "--config", str(cfg), env=narrow)
    wide = run("connector", "list", "--config", str(cfg))
    for r in (receive, send, wide):
        assert r.code == 0, r.err
    for r in (receive, send):
        assert all(len(line) <= 80 for line in r.out.splitlines()), r.out
        assert "narrow terminal" in r.out and "--json" in r.out
    rows = [line for line in receive.out.splitlines() if line.startswith("RELAY01\\")]
    assert [row.split("  ")[0] for row in rows] == [
        "RELAY01\\SMTP Relay Internal",
        "RELAY01\\Default Frontend",
    ]
    assert "method A" in rows[0] and "PermissionGroups" not in receive.out
    names = [c["name"] for c in load(cfg)["send_connectors"]]
    for name in names:  # one line each, the name whole
        assert len([line for line in send.out.splitlines() if line.startswith(name)]) == 1
    assert "PermissionGroups" in wide.out and "narrow terminal" not in wide.out


def test_a_file_saved_with_a_byte_order_mark_can_be_edited_and_keeps_it(cfg: Path) -> None:
    """Windows Notepad saves UTF-8 with a byte order mark: `check` and `serve` read such a file, so
    the editing verbs must too (they refused it as 'not valid TOML: Empty key at line 1')."""
    bom = b"\xef\xbb\xbf"
    cfg.write_bytes(bom + cfg.read_bytes())
    assert_valid(cfg)
    r = run("connector", "set", "SMTP Relay Internal", "--banner", "220 hi", "-c", str(cfg))
    assert r.code == 0, r.err
    r = run("domain", "add", "branch.example", "-c", str(cfg), "--json")
    assert r.code == 0, r.out + r.err
    assert r.json()["created"] is False
    data = cfg.read_bytes()
    assert data.startswith(bom) and data.count(bom) == 1  # the file keeps its encoding
    assert connector(cfg, "SMTP Relay Internal")["banner"] == "220 hi"
    assert_comments_kept(cfg)
    assert_valid(cfg)
    # the same setting again is no change: the file is not rewritten
    mtime = cfg.stat().st_mtime_ns
    r = run("connector", "set", "SMTP Relay Internal", "--banner", "220 hi", "-c", str(cfg))
    assert r.code == 0 and "no change" in r.out, r.out + r.err
    assert cfg.stat().st_mtime_ns == mtime


def test_a_name_given_exactly_wins_over_one_that_only_differs_by_a_trailing_dot(
    tmp_path: Path,
) -> None:
    """ "Relay" and "Relay." are two connectors to the loader; the verbs compare names without a
    trailing dot and took the first of the two: `connector remove "Relay."` removed "Relay"."""
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [[receive_connectors]]
        name = "Relay"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.5"]
        permission_groups = ["AnonymousUsers"]

        [[receive_connectors]]
        name = "Relay."
        bindings = ["0.0.0.0:26"]
        remote_ip_ranges = ["10.0.0.6"]
        permission_groups = ["AnonymousUsers"]
        """,
    )
    r = run("connector", "show", "Relay.", "-c", str(cfg), "--json")
    assert r.code == 0 and r.json()["name"] == "Relay.", r.out + r.err
    r = run("permission", "list", "relay.", "-c", str(cfg), "--json")
    assert r.code == 0 and {row["connector"] for row in r.json()} == {"Relay."}, r.out + r.err
    r = run("connector", "set", "relay.", "--banner", "220 dot", "-c", str(cfg))
    assert r.code == 0, r.err
    assert connector(cfg, "Relay.")["banner"] == "220 dot"
    assert "banner" not in connector(cfg, "Relay")
    r = run("connector", "remove", "Relay.", "-c", str(cfg))
    assert r.code == 0 and "Removed receive connector 'Relay.'" in r.out, r.out + r.err
    assert [c["name"] for c in load(cfg)["receive_connectors"]] == ["Relay"]


def test_remove_takes_every_spelling_of_the_entry_away(tmp_path: Path) -> None:
    """A range listed twice in two spellings (an import, two admins): --remove-remote-ip-ranges
    took the first away, reported the connector updated, and the other spelling still let the
    address relay."""
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [[receive_connectors]]
        name = "Relay"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = [
          "10.0.0.5",     # old copier
          "10.0.0.9",
          "10.0.0.5/32",  # old copier again, from the import
        ]
        permission_groups = ["AnonymousUsers"]
        """,
    )
    r = run("connector", "set", "Relay", "-c", str(cfg), "--remove-remote-ip-ranges", "10.0.0.5")
    assert r.code == 0, r.err
    assert connector(cfg, "Relay")["remote_ip_ranges"] == ["10.0.0.9"]
    r = run("explain", "-c", str(cfg), "--client-ip", "10.0.0.5", "--to", "a@example.org", "--json")
    assert r.code == 0, r.err
    assert all(e["connector"] is None for e in r.json()["endpoints"])
