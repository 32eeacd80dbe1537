"""`relaygate permission ...`, `domain ...` and `send-connector ...` as subprocesses."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.cli_admin.helpers import run, write

CONFIG = """
# office relay
[server]
name = "RELAY01"

[[accepted_domains]]
domain = "corp.example"  # primary
default = true

[[accepted_domains]]
domain = "*.corp.example"
domain_type = "InternalRelay"

[[receive_connectors]]
name = "Printers"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.5"]
permission_groups = ["AnonymousUsers"]  # method A: add the relay right below

# outbound
[[send_connectors]]
name = "Internet"
address_spaces = ["*"]
"""


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write(tmp_path / "relaygate.toml", CONFIG)


def load(path: Path) -> dict:
    return tomllib.loads(path.read_text())


# -- permission -------------------------------------------------------------------------------------------


def test_permission_add_list_remove(cfg: Path) -> None:
    r = run(
        "permission", "add", "Printers", "--config", str(cfg),
        "--user", "NT AUTHORITY\\ANONYMOUS LOGON", "--extended-rights", "ms-exch-smtp-accept-any-recipient",
    )  # fmt: skip
    assert r.code == 0, r.err
    perms = load(cfg)["receive_connectors"][0]["permissions"]
    assert perms == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
        }
    ]
    text = cfg.read_text()
    assert "# method A: add the relay right below" in text and "# outbound" in text
    assert text.index("# outbound") > text.index("[[receive_connectors.permissions]]")

    # the connector now relays (method A)
    data = run("connector", "show", "Printers", "-c", str(cfg), "--json").json()
    assert data["relay"]["anonymous"] is True and data["relay"]["method_a"] == [
        "NT AUTHORITY\\ANONYMOUS LOGON"
    ]

    # adding a second right merges into the same entry
    r = run(
        "permission",
        "add",
        "Printers",
        "-c",
        str(cfg),
        "--user",
        "nt authority\\anonymous logon",
        "--extended-rights",
        "ms-Exch-Bypass-Anti-Spam",
    )
    assert r.code == 0, r.err
    perms = load(cfg)["receive_connectors"][0]["permissions"]
    assert len(perms) == 1 and perms[0]["extended_rights"] == [
        "ms-Exch-SMTP-Accept-Any-Recipient",
        "ms-Exch-Bypass-Anti-Spam",
    ]

    r = run("permission", "list", "Printers", "-c", str(cfg))
    assert r.code == 0, r.err
    assert (
        "ms-Exch-SMTP-Accept-Any-Recipient" in r.out and "PermissionGroups AnonymousUsers" in r.out
    )

    rows = run("permission", "list", "-c", str(cfg), "--json").json()
    explicit = [row for row in rows if not row["inherited"]]
    inherited = [row for row in rows if row["inherited"]]
    assert explicit[0]["connector"] == "Printers"
    assert inherited[0]["user"] == "NT AUTHORITY\\ANONYMOUS LOGON"
    assert "ms-Exch-SMTP-Submit" in inherited[0]["extended_rights"]

    r = run(
        "permission",
        "remove",
        "Printers",
        "-c",
        str(cfg),
        "--user",
        "NT AUTHORITY\\ANONYMOUS LOGON",
        "--extended-rights",
        "ms-Exch-Bypass-Anti-Spam",
    )
    assert r.code == 0, r.err
    assert load(cfg)["receive_connectors"][0]["permissions"][0]["extended_rights"] == [
        "ms-Exch-SMTP-Accept-Any-Recipient"
    ]
    r = run(
        "permission",
        "remove",
        "Printers",
        "-c",
        str(cfg),
        "--user",
        "NT AUTHORITY\\ANONYMOUS LOGON",
        "--json",
    )
    assert r.code == 0, r.err
    assert r.json()["receive_connector"]["permissions"] == []
    assert "permissions" not in load(cfg)["receive_connectors"][0]
    assert run("check", "-c", str(cfg)).code == 0


def test_permission_unknown_right_refused_byte_identical(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run(
        "permission",
        "add",
        "Printers",
        "-c",
        str(cfg),
        "--user",
        "Everyone",
        "--extended-rights",
        "ms-Exch-SMTP-Accept-Any-Recipent",
    )
    assert r.code == 1
    assert 'receive_connectors[0] "Printers": permissions[0].extended_rights[0]' in r.err
    assert "did you mean 'ms-Exch-SMTP-Accept-Any-Recipient'" in r.err
    assert cfg.read_bytes() == before


def test_permission_remove_absent(cfg: Path) -> None:
    r = run("permission", "remove", "Printers", "-c", str(cfg), "--user", "Everyone")
    assert r.code == 1 and "no permission for 'Everyone'" in r.err


def test_permission_deny_entry(cfg: Path) -> None:
    r = run(
        "permission",
        "add",
        "Printers",
        "-c",
        str(cfg),
        "--user",
        "NT AUTHORITY\\ANONYMOUS LOGON",
        "--extended-rights",
        "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
        "--deny",
        "--json",
    )
    assert r.code == 0, r.err
    perms = r.json()["receive_connector"]["permissions"]
    assert perms == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"],
            "deny": True,
        }
    ]


# -- domain ---------------------------------------------------------------------------------------------


def test_domain_list(cfg: Path) -> None:
    r = run("domain", "list", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "corp.example" in r.out and "InternalRelay" in r.out
    data = run("domain", "list", "-c", str(cfg), "--json").json()
    assert data == [
        {"domain": "corp.example", "domain_type": "Authoritative", "default": True},
        {"domain": "*.corp.example", "domain_type": "InternalRelay", "default": False},
    ]


def test_domain_list_in_a_narrow_terminal_does_not_claim_it_cut_anything(cfg: Path) -> None:
    """The accepted domains table shows every column and value at 80 columns: the hint of the
    cut list tables ("long values cut, some columns left out") was untrue there."""
    r = run("domain", "list", "-c", str(cfg), env={"COLUMNS": "80"})
    assert r.code == 0, r.err
    assert "*.corp.example" in r.out and "InternalRelay" in r.out and "Default" in r.out
    assert "narrow terminal" not in r.out + r.err, r.out


def test_domain_add_set_remove(cfg: Path) -> None:
    r = run("domain", "add", "Partner.Example.", "--domain-type", "ExternalRelay", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "Added accepted domain partner.example" in r.out
    assert load(cfg)["accepted_domains"][-1] == {
        "domain": "partner.example",
        "domain_type": "ExternalRelay",
    }
    assert "# primary" in cfg.read_text()

    r = run("domain", "set", "partner.example", "--default", "-c", str(cfg), "--json")
    assert r.code == 0, r.err
    domains = load(cfg)["accepted_domains"]
    assert [d.get("default", False) for d in domains] == [False, False, True]

    # the default domain cannot be removed while others exist
    before = cfg.read_bytes()
    r = run("domain", "remove", "partner.example", "-c", str(cfg))
    assert r.code == 1 and "default accepted domain" in r.err
    assert cfg.read_bytes() == before

    r = run("domain", "remove", "*.corp.example", "-c", str(cfg), "--json")
    assert r.code == 0, r.err
    assert r.json()["action"] == "removed"
    assert [d["domain"] for d in load(cfg)["accepted_domains"]] == [
        "corp.example",
        "partner.example",
    ]
    assert run("check", "-c", str(cfg)).code == 0


def test_domain_add_invalid_and_duplicate(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run("domain", "add", "bad_domain!", "-c", str(cfg))
    assert r.code == 1 and "accepted_domains[2].domain: 'bad_domain!' is not a domain" in r.err
    r = run("domain", "add", "corp.example", "-c", str(cfg))
    assert r.code == 1 and "already an accepted domain" in r.err
    r = run("domain", "add", "x.example", "--domain-type", "Relay", "-c", str(cfg))
    assert r.code == 1 and "domain_type" in r.err
    assert cfg.read_bytes() == before


# -- send-connector ---------------------------------------------------------------------------------------


def test_send_connector_list_show(cfg: Path) -> None:
    r = run("send-connector", "list", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "Internet" in r.out and "MX (DNS)" in r.out
    data = run("send-connector", "show", "internet", "-c", str(cfg), "--json").json()
    assert data["name"] == "Internet" and data["dns_routing_enabled"] is True and data["port"] == 25
    r = run("send-connector", "show", "Internet", "-c", str(cfg))
    assert "smart_host_auth_mechanism" in r.out


def test_send_connector_new_set_remove(cfg: Path) -> None:
    r = run(
        "send-connector", "new", "Microsoft 365", "-c", str(cfg),
        "--address-spaces", "corp.example", "--smart-hosts", "smtp.office365.com", "--port", "587",
        "--require-tls", "--smart-host-auth-mechanism", "BasicAuth",
        "--auth-username", "relay@corp.example", "--auth-password-env", "RELAY_PW",
    )  # fmt: skip
    assert r.code == 0, r.err
    s = load(cfg)["send_connectors"][-1]
    assert s["dns_routing_enabled"] is False  # smart hosts given: route through them
    assert s["smart_hosts"] == ["smtp.office365.com"] and s["port"] == 587
    assert "# outbound" in cfg.read_text()

    r = run(
        "send-connector",
        "set",
        "Microsoft 365",
        "-c",
        str(cfg),
        "--add-smart-hosts",
        "smtp2.office365.com",
        "--add-address-spaces",
        "*.corp.example",
        "--cost",
        "5",
        "--json",
    )
    assert r.code == 0, r.err
    data = r.json()
    assert data["send_connector"]["smart_hosts"] == ["smtp.office365.com", "smtp2.office365.com"]
    assert data["send_connector"]["address_spaces"] == ["corp.example", "*.corp.example"]
    assert data["changes"]["cost"] == {"from": 1, "to": 5}

    # invalid: smart hosts with DNS routing on
    before = cfg.read_bytes()
    r = run("send-connector", "set", "Microsoft 365", "-c", str(cfg), "--dns-routing-enabled")
    assert r.code == 1
    assert (
        'send_connectors[1] "Microsoft 365": smart_hosts: set dns_routing_enabled = false' in r.err
    )
    assert cfg.read_bytes() == before

    r = run("send-connector", "remove", "microsoft 365", "-c", str(cfg))
    assert r.code == 0, r.err
    assert [s["name"] for s in load(cfg)["send_connectors"]] == ["Internet"]
    assert run("check", "-c", str(cfg)).code == 0


def test_send_connector_missing_auth_refused(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run(
        "send-connector",
        "new",
        "M365",
        "-c",
        str(cfg),
        "--smart-hosts",
        "smtp.office365.com",
        "--smart-host-auth-mechanism",
        "XOAUTH2",
        "--json",
    )
    assert r.code == 1
    keys = {e["path"] for e in r.json()["errors"]}
    assert "send_connectors[1].oauth_tenant_id" in keys
    assert cfg.read_bytes() == before


def test_permission_remove_only_entry_takes_its_comment_and_keeps_the_next_heading(
    tmp_path: Path,
) -> None:
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [server]
        name = "RELAY01"

        [[receive_connectors]]
        name = "Printers"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.5"]
        permission_groups = ["AnonymousUsers"]

        # relay right (CHG-1001)
        [[receive_connectors.permissions]]
        user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
        extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

        # outbound
        [[send_connectors]]
        name = "Internet"
        address_spaces = ["*"]
        """,
    )
    r = run(
        "permission", "remove", "Printers", "-c", str(cfg), "--user", "NT AUTHORITY\\ANONYMOUS LOGON"
    )  # fmt: skip
    assert r.code == 0, r.err
    text = cfg.read_text()
    assert "CHG-1001" not in text
    assert text.endswith(
        'permission_groups = ["AnonymousUsers"]\n'
        "\n"
        "# outbound\n"
        "[[send_connectors]]\n"
        'name = "Internet"\n'
        'address_spaces = ["*"]\n'
    )
    assert run("check", "-c", str(cfg)).code == 0


def test_permission_user_short_spelling_is_canonicalised_and_grants_the_right(cfg: Path) -> None:
    def relays() -> bool:
        r = run(
            "explain", "-c", str(cfg), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25",
            "--to", "someone@gmail.com", "--json",
        )  # fmt: skip
        assert r.code == 0, r.err
        return r.json()["recipients"][0]["reply"] == "250 2.1.5 Recipient OK"

    assert not relays()
    r = run(
        "permission", "add", "Printers", "-c", str(cfg), "--user", "ANONYMOUS LOGON",
        "--extended-rights", "ms-Exch-SMTP-Accept-Any-Recipient",
    )  # fmt: skip
    assert r.code == 0, r.err
    assert "NT AUTHORITY\\ANONYMOUS LOGON" in r.out
    perms = load(cfg)["receive_connectors"][0]["permissions"]
    assert [p["user"] for p in perms] == ["NT AUTHORITY\\ANONYMOUS LOGON"]
    assert relays()
    r = run("permission", "remove", "Printers", "-c", str(cfg), "--user", "anonymous logon")
    assert r.code == 0, r.err
    assert "NT AUTHORITY\\ANONYMOUS LOGON" in r.out
    assert "permissions" not in load(cfg)["receive_connectors"][0]
    assert not relays()


def test_send_connector_list_shows_each_smart_host_with_the_port_it_is_reached_on(
    tmp_path: Path,
) -> None:
    """A smart host with its own port was shown with the connector's port appended as well
    ("smtp.corp.example:2525:25"), which is neither the port used nor a valid entry."""
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [[send_connectors]]
        name = "Out"
        dns_routing_enabled = false
        smart_hosts = ["smtp.corp.example:2525", "[2001:db8::1]:587", "10.0.0.9", "[IPv6:2001:db8::2]"]
        port = 26
        """,
    )
    r = run("send-connector", "list", "-c", str(cfg))
    assert r.code == 0, r.err
    assert "smtp.corp.example:2525, [2001:db8::1]:587, 10.0.0.9:26, [2001:db8::2]:26" in r.out, (
        r.out
    )


def test_permission_add_on_inline_permissions_names_the_table_to_write(tmp_path: Path) -> None:
    """The refusal said 'rewrite it as [[permissions]] tables': a [[permissions]] table at the
    top level is an unknown section; the connector's grants are [[receive_connectors.permissions]]."""
    cfg = write(
        tmp_path / "relaygate.toml",
        """
        [[receive_connectors]]
        name = "A"
        bindings = ["0.0.0.0:25"]
        remote_ip_ranges = ["10.0.0.1"]
        permissions = [{user = "NT AUTHORITY\\\\ANONYMOUS LOGON", extended_rights = ["ms-Exch-SMTP-Submit"]}]
        """,
    )
    before = cfg.read_bytes()
    r = run("permission", "add", "A", "--user", "ANONYMOUS LOGON",
            "--extended-rights", "ms-Exch-SMTP-Accept-Any-Recipient", "-c", str(cfg))  # fmt: skip
    assert r.code == 1
    assert "rewrite it as [[receive_connectors.permissions]] tables" in r.err, r.err
    assert cfg.read_bytes() == before
