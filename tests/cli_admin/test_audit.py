"""`relaygate audit`: one crafted config per finding, a clean config with none, and the CLI."""

from __future__ import annotations

import smtplib
import socket
import ssl
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import tomlkit

from relaygate.audit import Finding, audit, has_high, relay_grant
from relaygate.config import load_config, parse_text
from tests.cli_admin.helpers import Recorder, SMTPServer, run, write
from tests.smtp.conftest import RelayHandle, relay_connector
from tests.smtp.conftest import relay as running_relay  # noqa: F401 - the `relay` fixture
from tests.smtp.helpers import wait_for

# A relay connector that passes every check: method A, narrow ranges, logging, TLS, limits.
CLEAN = """
[server]
name = "RELAY01"

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Printers"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.5", "10.0.0.6", "10.0.1.0/24"]
permission_groups = ["AnonymousUsers"]
auth_mechanism = ["Tls"]
protocol_logging_level = "Verbose"
message_rate_limit = 60
max_inbound_connection_per_source = 20

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
"""

RELAY_DEFAULTS = """
protocol_logging_level = "Verbose"
message_rate_limit = 60
"""


def config(text: str):
    return parse_text(textwrap.dedent(text), "test.toml")


def relay(
    name: str = "Relay",
    ranges: str = '["10.0.0.5"]',
    extra: str = RELAY_DEFAULTS,
    groups: str = '["AnonymousUsers"]',
    permission: bool = True,
    bindings: str = '["0.0.0.0:25"]',
) -> str:
    text = f"""
[[receive_connectors]]
name = "{name}"
bindings = {bindings}
remote_ip_ranges = {ranges}
permission_groups = {groups}
{extra}
"""
    if permission:
        text += """
[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
"""
    return text


def codes(findings: list[Finding]) -> list[tuple[str, str, str]]:
    return [(f.severity, f.code, f.connector) for f in findings]


def only(findings: list[Finding], code: str) -> list[Finding]:
    return [f for f in findings if f.code == code]


def test_clean_config_has_no_findings() -> None:
    assert audit(config(CLEAN)) == []


def test_open_relay_all_ipv4() -> None:
    found = audit(config(relay(ranges='["0.0.0.0/0"]')))
    wide = only(found, "relay-range-too-wide")
    assert [(f.severity, f.key) for f in wide] == [("high", "remote_ip_ranges")]
    assert "every IPv4 address" in wide[0].message and "open relay" in wide[0].message
    assert has_high(found)


def test_open_relay_all_ipv6() -> None:
    found = audit(config(relay(ranges='["::/0"]', bindings='["[::]:25"]')))
    wide = only(found, "relay-range-too-wide")
    assert wide and wide[0].severity == "high" and "every IPv6 address" in wide[0].message


def test_range_wider_than_prefix() -> None:
    found = audit(config(relay(ranges='["10.0.0.0/16"]')))
    wide = only(found, "relay-range-too-wide")
    assert wide[0].severity == "high"
    assert "10.0.0.0/16" in wide[0].message and "wider than /24" in wide[0].message
    # a configurable prefix: /16 allowed
    assert not only(
        audit(config(relay(ranges='["10.0.0.0/16"]')), max_prefix_v4=16), "relay-range-too-wide"
    )
    # a range written as a-b is measured by its size
    assert only(audit(config(relay(ranges='["10.0.0.1-10.0.2.1"]'))), "relay-range-too-wide")


def test_ipv6_range_wider_than_prefix() -> None:
    found = audit(config(relay(ranges='["2001:db8::/48"]', bindings='["[::]:25"]')))
    assert only(found, "relay-range-too-wide")
    assert not only(
        audit(config(relay(ranges='["2001:db8::/64"]', bindings='["[::]:25"]'))),
        "relay-range-too-wide",
    )


def test_wide_range_without_relay_is_fine() -> None:
    # AnonymousUsers without the relay right: accepted domains only, not an open relay
    found = audit(config(relay(ranges='["0.0.0.0/0"]', permission=False)))
    assert not [f for f in found if f.severity == "high"]


def test_method_b_wide_range_is_flagged() -> None:
    found = audit(
        config(
            relay(
                ranges='["10.0.0.0/16"]',
                groups='["ExchangeServers"]',
                permission=False,
                extra=RELAY_DEFAULTS + 'auth_mechanism = ["ExternalAuthoritative"]\n',
            )
        )
    )
    assert ("high", "relay-range-too-wide", "Relay") in codes(found)
    assert "method B" in only(found, "relay-range-too-wide")[0].message


def test_catch_all_connector_with_relay() -> None:
    found = audit(config(relay(name="Default Frontend", ranges='["0.0.0.0-255.255.255.255"]')))
    catch = only(found, "catch-all-relay")
    assert [(f.severity, f.connector) for f in catch] == [("high", "Default Frontend")]
    assert "open relay" in catch[0].message


def test_internet_usage_with_relay_is_catch_all() -> None:
    text = """
    [[receive_connectors]]
    name = "Internet"
    usage = "Internet"
    bindings = ["0.0.0.0:25"]
    protocol_logging_level = "Verbose"
    message_rate_limit = 60

    [[receive_connectors.permissions]]
    user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
    extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
    """
    assert only(audit(config(text)), "catch-all-relay")


def test_more_than_five_ranges_is_info() -> None:
    ranges = '["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]'
    found = audit(config(relay(ranges=ranges)))
    assert codes(found) == [("info", "many-ranges", "Relay")]
    assert not has_high(found)
    five = '["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"]'
    assert audit(config(relay(ranges=five))) == []


def test_externally_secured_on_many_hosts() -> None:
    extra = RELAY_DEFAULTS + 'auth_mechanism = ["ExternalAuthoritative", "Tls"]\n'
    found = audit(
        config(
            relay(
                ranges='["10.0.0.0/29"]',
                groups='["ExchangeServers"]',
                permission=False,
                extra=extra,
            )
        )
    )
    ext = only(found, "externally-secured-too-many-hosts")
    assert [(f.severity, f.key) for f in ext] == [("high", "auth_mechanism")]
    assert "8 addresses" in ext[0].message and "spoof" in ext[0].message
    # a short list of hosts is the intended use
    few = audit(
        config(
            relay(
                ranges='["10.0.0.10", "10.0.0.11"]',
                groups='["ExchangeServers"]',
                permission=False,
                extra=extra,
            )
        )
    )
    assert few == []


def test_protocol_logging_off() -> None:
    found = audit(config(relay(extra="message_rate_limit = 60\n")))
    assert codes(found) == [("medium", "protocol-logging-off", "Relay")]
    assert "--protocol-logging-level Verbose" in found[0].fix


def test_tls_not_offered() -> None:
    found = audit(config(relay(extra=RELAY_DEFAULTS + 'auth_mechanism = ["None"]\n')))
    assert codes(found) == [("medium", "tls-not-offered", "Relay")]


def test_tls_min_version_below_1_2() -> None:
    found = audit(config(relay(extra=RELAY_DEFAULTS + 'tls_min_version = "1.0"\n')))
    assert codes(found) == [("medium", "tls-min-version", "Relay")]


def test_per_source_connections_unlimited() -> None:
    found = audit(
        config(relay(extra=RELAY_DEFAULTS + 'max_inbound_connection_per_source = "unlimited"\n'))
    )
    assert codes(found) == [("low", "per-source-connections-unlimited", "Relay")]


def test_message_rate_unlimited() -> None:
    found = audit(config(relay(extra='protocol_logging_level = "Verbose"\n')))
    assert codes(found) == [("low", "message-rate-unlimited", "Relay")]


def test_shadowed_range_names_both_connectors() -> None:
    text = relay(name="Printers", ranges='["10.0.0.0/24"]') + relay(
        name="Accounting PC", ranges='["10.0.0.77"]', permission=False
    )
    found = audit(config(text))
    shadow = only(found, "shadowed-range")
    assert [(f.severity, f.connector) for f in shadow] == [("info", "Printers")]
    msg = shadow[0].message
    assert '"Accounting PC"' in msg and '"Printers"' in msg and "10.0.0.77" in msg
    assert "they lose relay" in msg


def test_shadowing_by_exact_binding() -> None:
    text = relay(name="Wide", ranges='["10.0.0.5"]') + relay(
        name="Exact", ranges='["10.0.0.0/24"]', bindings='["10.1.1.1:25"]'
    )
    shadow = only(audit(config(text)), "shadowed-range")
    assert (
        shadow
        and shadow[0].connector == "Wide"
        and "exact address 10.1.1.1:25" in shadow[0].message
    )


def test_no_shadowing_on_other_port() -> None:
    text = relay(name="A", ranges='["10.0.0.0/24"]') + relay(
        name="B", ranges='["10.0.0.77"]', bindings='["0.0.0.0:587"]'
    )
    assert not only(audit(config(text)), "shadowed-range")


def test_loopback_in_relay_ranges_with_trusted_proxies() -> None:
    text = '[server]\ntrusted_proxies = ["10.0.0.10"]\n' + relay(ranges='["127.0.0.1", "10.0.0.5"]')
    found = audit(config(text))
    loop = only(found, "loopback-relay-with-proxies")
    assert [(f.severity, f.key) for f in loop] == [("high", "remote_ip_ranges")]
    assert "127.0.0.1" in loop[0].message and "10.0.0.10" in loop[0].message
    # without trusted proxies loopback relay is the embedded default and fine
    assert not only(
        audit(config(relay(ranges='["127.0.0.1", "10.0.0.5"]'))), "loopback-relay-with-proxies"
    )
    # ::1 counts too
    v6 = '[server]\ntrusted_proxies = ["10.0.0.10"]\n' + relay(
        ranges='["::1"]', bindings='["[::]:25"]'
    )
    assert only(audit(config(v6)), "loopback-relay-with-proxies")


@pytest.mark.parametrize(
    ("proxies", "severity"),
    [
        ('["0.0.0.0/0"]', "high"),
        ('["::/0"]', "high"),
        ('["0.0.0.0/1", "128.0.0.0/1"]', "high"),  # every address too (was medium)
        ('["10.0.0.0/8"]', "medium"),
        ('["10.0.0.10", "2001:db8::/32"]', "medium"),
    ],
)
def test_broad_trusted_proxies_are_flagged(proxies: str, severity: str) -> None:
    """Any host in server.trusted_proxies may send a PROXY header naming any client address, and
    so choose the connector, and the relay rights, its connection gets: 0.0.0.0/0 lets every
    client relay by claiming a relay client's address. A range wider than the ranges' own limits
    (/24, /64) is flagged too; the load balancers' own addresses are not. Here no connector
    relays (with one that does, a broad range is high: the test below)."""
    text = f"[server]\ntrusted_proxies = {proxies}\n" + relay(
        ranges='["10.0.0.5"]', permission=False
    )
    found = only(audit(config(text)), "trusted-proxies-broad")
    assert [(f.severity, f.key) for f in found] == [(severity, "server.trusted_proxies")]
    assert "PROXY header" in found[0].message
    narrow = '[server]\ntrusted_proxies = ["10.0.0.10", "10.0.1.0/28", "2001:db8::10"]\n'
    assert not only(audit(config(narrow + relay(ranges='["10.0.0.5"]'))), "trusted-proxies-broad")


def test_relay_granted_both_ways() -> None:
    extra = RELAY_DEFAULTS + 'auth_mechanism = ["ExternalAuthoritative"]\n'
    found = audit(config(relay(groups='["ExchangeServers"]', extra=extra)))
    both = only(found, "relay-both-methods")
    assert [(f.severity, f.connector) for f in both] == [("medium", "Relay")]
    assert "use one method, never both" in both[0].message


def test_basic_auth_before_tls() -> None:
    text = """
    [[receive_connectors]]
    name = "Submission"
    bindings = ["0.0.0.0:587"]
    remote_ip_ranges = ["10.0.0.0/8"]
    permission_groups = ["ExchangeUsers"]
    auth_mechanism = ["Tls", "BasicAuth"]
    """
    found = audit(config(text))
    assert codes(found) == [("medium", "basic-auth-cleartext", "Submission")]


def test_exchange_users_without_auth() -> None:
    text = """
    [[receive_connectors]]
    name = "Users"
    bindings = ["0.0.0.0:587"]
    remote_ip_ranges = ["10.0.0.0/8"]
    permission_groups = ["ExchangeUsers"]
    auth_mechanism = ["Tls"]
    """
    assert codes(audit(config(text))) == [("info", "exchange-users-without-auth", "Users")]


def test_disabled_connector_still_reported() -> None:
    found = audit(config(relay(ranges='["0.0.0.0/0"]', extra=RELAY_DEFAULTS + "enabled = false\n")))
    assert (
        only(found, "relay-range-too-wide")
        and "disabled" in only(found, "relay-range-too-wide")[0].message
    )


def test_findings_sorted_by_severity() -> None:
    found = audit(config(relay(ranges='["0.0.0.0/0"]', extra="")))
    order = ["high", "medium", "low", "info"]
    assert [order.index(f.severity) for f in found] == sorted(
        order.index(f.severity) for f in found
    )


# -- CLI ------------------------------------------------------------------------------------------------------


@pytest.fixture
def clean(tmp_path: Path) -> Path:
    return write(tmp_path / "clean.toml", CLEAN)


def test_cli_clean_exit_0(clean: Path) -> None:
    r = run("audit", "--config", str(clean))
    assert r.code == 0, r.out + r.err
    assert "no findings" in r.out
    data = run("audit", "--config", str(clean), "--json").json()
    assert data["findings"] == [] and data["exit_code"] == 0


def test_cli_high_exit_1_text_and_json(tmp_path: Path) -> None:
    path = write(tmp_path / "open.toml", relay(name="Open", ranges='["0.0.0.0/0"]', extra=""))
    r = run("audit", "-c", str(path))
    assert r.code == 1
    assert "HIGH" in r.out and "Open" in r.out and "remote_ip_ranges" in r.out
    r = run("audit", "-c", str(path), "--json")
    assert r.code == 1
    data = r.json()
    assert data["summary"]["high"] >= 1 and data["exit_code"] == 1
    first = data["findings"][0]
    assert set(first) == {"severity", "code", "connector", "key", "message", "fix"}
    assert first["severity"] == "high" and first["connector"] == "Open"


def test_cli_max_prefix_options(tmp_path: Path) -> None:
    path = write(tmp_path / "wide.toml", relay(ranges='["10.0.0.0/20"]'))
    assert run("audit", "-c", str(path)).code == 1
    r = run("audit", "-c", str(path), "--max-prefix-v4", "20", "--json")
    assert r.code == 0 and r.json()["findings"] == []


def test_cli_medium_only_exit_0(tmp_path: Path) -> None:
    path = write(tmp_path / "nolog.toml", relay(extra="message_rate_limit = 60\n"))
    r = run("audit", "-c", str(path))
    assert r.code == 0
    assert "MEDIUM" in r.out and "protocol_logging_level" in r.out


def test_worker_balance_connection_is_no_finding() -> None:
    """The workers count open connections for the node (relaygate.node_connections), message
    rates and AUTH failures too: one source holds max_inbound_connection_per_source whatever
    worker each of its connections reaches (tests/workers/test_workers.py). The audit said it
    could hold workers times as many (per-source-limits-per-worker)."""
    text = CLEAN.replace('name = "RELAY01"', 'name = "RELAY01"\nworkers = 4')
    assert audit(config(text)) == []
    assert (
        audit(config(text.replace("workers = 4", 'workers = 4\nworker_balance = "connection"')))
        == []
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:8025", "10.0.0.1:8025", "[::]:8025"])
def test_admin_listener_on_the_network_without_a_token_is_high(listen: str, tmp_path: Path) -> None:
    """Before, `audit` said nothing: anyone reaching it could list and remove queued mail."""
    exposed = CLEAN + f'\n[admin]\nlisten = "{listen}"\n'
    found = audit(config(exposed))
    # /metrics is open as well (the low finding of the next test), in plain HTTP
    # (tests/cli_admin/test_audit_admin_tls.py)
    assert codes(found) == [
        ("high", "admin-exposed-without-token", ""),
        ("medium", "admin-listener-without-tls", ""),
        ("low", "admin-metrics-without-token", ""),
    ]
    assert found[0].key == "admin.listen" and listen in found[0].message
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)  # else secret-file-readable
    with_token = exposed + f'api_token_file = "{token}"\nmetrics_require_token = true\n'
    assert codes(audit(config(with_token))) == [("medium", "admin-listener-without-tls", "")]
    for safe in ("127.0.0.1:8025", "127.0.0.9:18025", "[::1]:8025"):
        assert audit(config(CLEAN + f'\n[admin]\nlisten = "{safe}"\n')) == []
    assert audit(config(exposed + "enabled = false\n")) == []


@pytest.mark.parametrize("listen", ["0.0.0.0:8025", "10.0.0.1:8025", "[::]:8025"])
def test_metrics_open_on_the_network_is_low(listen: str, tmp_path: Path) -> None:
    """Before, `audit` said nothing of /metrics: with the API token set it still answered
    anyone on the network (connector names, certificate paths, queue figures)."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)  # else secret-file-readable
    with_token = CLEAN + f'\n[admin]\nlisten = "{listen}"\napi_token_file = "{token}"\n'
    found = audit(config(with_token))
    assert codes(found) == [
        ("medium", "admin-listener-without-tls", ""),  # test_audit_admin_tls.py
        ("low", "admin-metrics-without-token", ""),
    ]
    (finding,) = only(found, "admin-metrics-without-token")
    assert finding.key == "admin.metrics_require_token"
    assert listen in finding.message and "/metrics" in finding.message
    assert "metrics_require_token = true" in finding.fix
    assert not has_high(found)
    assert only(audit(config(with_token + "metrics_require_token = true\n")), finding.code) == []
    # on loopback, or with the admin centre off, nobody else reaches /metrics
    for safe in ("127.0.0.1:8025", "[::1]:8025"):
        assert audit(config(CLEAN + f'\n[admin]\nlisten = "{safe}"\n')) == []
    assert audit(config(with_token + "enabled = false\n")) == []
    # the CLI: listed with its severity, exit 0 (not high)
    path = write(tmp_path / "relaygate.toml", with_token)
    r = run("audit", "-c", str(path), "--json")
    assert r.code == 0, r.err
    listed = [f for f in r.json()["findings"] if f["code"] == "admin-metrics-without-token"]
    assert [(f["severity"], f["key"]) for f in listed] == [("low", "admin.metrics_require_token")]


def test_basic_auth_without_a_logon_failure_rate_limit_is_medium() -> None:
    text = """
    [[receive_connectors]]
    name = "Submission"
    bindings = ["0.0.0.0:587"]
    remote_ip_ranges = ["10.0.0.0/8"]
    permission_groups = ["ExchangeUsers"]
    auth_mechanism = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]
    """
    assert audit(config(text)) == []  # the default limit (6 a minute per address) is on
    found = audit(config(text + 'logon_failure_rate_limit = "unlimited"\n'))
    assert codes(found) == [("medium", "logon-failures-unlimited", "Submission")]
    assert found[0].key == "logon_failure_rate_limit"


def test_a_database_password_in_the_config_file_is_low(tmp_path: Path) -> None:
    queue = '\n[queue]\nstore = "postgresql"\ndatabase_url = "{}"\n'
    found = audit(config(CLEAN + queue.format("postgresql://relay:s3cret@db.corp.example/q")))
    assert codes(found) == [("low", "database-password-in-config", "")]
    assert found[0].key == "queue.database_url" and "s3cret" not in found[0].message
    for clean in (
        "postgresql://relay@db.corp.example/q?passfile=/etc/relaygate/pgpass",
        "host=db.corp.example user=relay dbname=q",
    ):
        assert audit(config(CLEAN + queue.format(clean))) == []
    with_keyword = "host=db user=relay password=s3cret dbname=q"
    assert codes(audit(config(CLEAN + queue.format(with_keyword)))) == [
        ("low", "database-password-in-config", "")
    ]


def test_allow_loopback_mx_is_a_finding_on_a_connector_routing_by_mx() -> None:
    """allow_loopback_mx is for labs: in production it lets any recipient domain's DNS point
    the relay at a server that listens on this host's loopback only."""
    lab = """
[[send_connectors]]
name = "Outbound"
address_spaces = ["*"]
allow_loopback_mx = true
"""
    findings = audit(config(CLEAN + lab))
    assert codes(findings) == [("low", "loopback-mx-allowed", 'send connector "Outbound"')]
    (finding,) = findings
    assert finding.key == "send_connectors[0].allow_loopback_mx"
    assert audit(config(CLEAN + lab.replace("true", "false"))) == []
    smart = lab + 'dns_routing_enabled = false\nsmart_hosts = ["[127.0.0.1]:2525"]\n'
    assert audit(config(CLEAN + smart)) == []  # no MX lookup: the key does nothing


M365 = """
[[send_connectors]]
name = "Outbound to Microsoft 365"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["smtp.office365.com"]
port = 587
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.example"
oauth_tenant_id = "t"
oauth_client_id = "c"
oauth_client_secret_env = "SECRET"
require_tls = true
"""


def test_microsoft_365_through_one_mailbox_without_send_as_or_pacing() -> None:
    findings = audit(config(CLEAN + M365))
    assert codes(findings) == [
        ("info", "m365-send-as", 'send connector "Outbound to Microsoft 365"'),
        ("info", "m365-quota", 'send connector "Outbound to Microsoft 365"'),
    ]
    (send_as,) = only(findings, "m365-send-as")
    assert send_as.key == "send_connectors[0].send_as"
    assert "554 5.2.252 SendAsDenied" in send_as.message
    assert 'set send_as = "relay@corp.example"' in send_as.fix
    tuned = M365 + (
        'send_as = "relay@corp.example"\nmax_messages_per_minute = 30\n'
        "max_recipients_per_day = 10000\n"
    )
    assert audit(config(CLEAN + tuned)) == []
    # a smart host that is not Microsoft 365's submission endpoint, or no AUTH: nothing to say
    assert audit(config(CLEAN + M365.replace("smtp.office365.com", "smtp.partner.example"))) == []


def test_microsoft_365_is_recognised_as_check_reads_the_host_and_the_key_is_the_missing_one() -> (
    None
):
    # The smart host as `check` and delivery take it (parse_smart_host): any case, a final dot,
    # a port. It was compared as written, and such a connector was not pointed at.
    for host in ("SMTP.Office365.com.", "smtp.office365.com.:587"):
        findings = audit(config(CLEAN + M365.replace('"smtp.office365.com"', f'"{host}"')))
        assert [f.code for f in findings] == ["m365-send-as", "m365-quota"], host
    # Only the daily limit missing: the finding names that key, not the one that is set.
    per_minute = M365 + 'send_as = "relay@corp.example"\nmax_messages_per_minute = 30\n'
    (quota,) = audit(config(CLEAN + per_minute))
    assert quota.key == "send_connectors[0].max_recipients_per_day"
    per_day = M365 + 'send_as = "relay@corp.example"\nmax_recipients_per_day = 10000\n'
    (quota,) = audit(config(CLEAN + per_day))
    assert quota.key == "send_connectors[0].max_messages_per_minute"


def test_an_overflow_connector_that_is_disabled_is_low() -> None:
    """`check` accepts a disabled overflow_connector (it is skipped while disabled): audit
    says that nothing spills over meanwhile."""
    text = CLEAN + (
        '[[send_connectors]]\nname = "M365"\naddress_spaces = ["*"]\n'
        'max_recipients_per_day = 10000\noverflow_connector = "ESP"\n'
        '[[send_connectors]]\nname = "ESP"\naddress_spaces = ["esp.example"]\n'
    )
    assert audit(config(text)) == []
    (finding,) = audit(config(text + "enabled = false\n"))
    assert (finding.severity, finding.code, finding.connector) == (
        "low",
        "overflow-disabled",
        'send connector "M365"',
    )
    assert finding.key == "send_connectors[0].overflow_connector"
    assert '"ESP" is disabled' in finding.message


def test_wide_relay_without_allowed_senders_gets_a_suggestion() -> None:
    found = audit(config(relay(ranges='["10.0.0.0/16"]')))
    (hint,) = only(found, "relay-without-allowed-senders")
    assert (hint.severity, hint.key) == ("info", "allowed_senders")
    assert "--allowed-senders" in hint.fix
    limited = relay(
        ranges='["10.0.0.0/16"]', extra=RELAY_DEFAULTS + 'allowed_senders = ["*@corp.example"]\n'
    )
    assert not only(audit(config(limited)), "relay-without-allowed-senders")
    # a narrow relay connector: no suggestion (the CLEAN config stays without findings)
    assert not only(audit(config(relay())), "relay-without-allowed-senders")


M365_CONNECTOR = """
[[send_connectors]]
name = "To Microsoft 365"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["{host}"]
require_tls = true
"""


@pytest.mark.parametrize(
    "host", ["corp-example.mail.protection.outlook.com", "corp.example.x1y2z3.mx.microsoft"]
)
def test_connector_based_relay_to_microsoft_365_says_how_the_tenant_matches_it(
    host: str, tmp_path: Path
) -> None:
    """exchange-semantics §9.3: the tenant's inbound connector matches the relay by IP or by
    its certificate's subject; audit says which this connector relies on."""
    text = CLEAN + M365_CONNECTOR.format(host=host)
    (finding,) = audit(config(text))
    assert (finding.severity, finding.code, finding.connector) == (
        "info",
        "m365-connector-relay",
        'send connector "To Microsoft 365"',
    )
    assert finding.key == "send_connectors[0].tls_certificate_file"
    assert "public IP address" in finding.message and "tls_certificate_file" in finding.message
    cert, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    with_cert = text + f"tls_certificate_file = '{cert}'\ntls_key_file = '{key}'\n"
    (finding,) = audit(config(with_cert))
    assert str(cert) in finding.message and "TlsSenderCertificateName" in finding.message
    # SMTP AUTH, another smart host, or a disabled connector: not this finding
    other = CLEAN + M365_CONNECTOR.format(host="smtp.partner.example")
    assert only(audit(config(other)), "m365-connector-relay") == []
    assert only(audit(config(text + "enabled = false\n")), "m365-connector-relay") == []


INTERNET_INBOUND = """
[[receive_connectors]]
name = "Internet"
usage = "Internet"
bindings = ["0.0.0.0:25"]
protocol_logging_level = "Verbose"
message_rate_limit = 60
"""
DKIM_KEY = """
[[dkim]]
domain = "corp.example"
selector = "s1"
key_file = "/etc/relaygate/s1.key"
"""
DENY_AUTHORITATIVE_SENDER = """
[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"]
deny = true
"""


def test_dkim_with_a_connector_where_anyone_may_send_as_the_organisation() -> None:
    """An Internet-facing connector keeps AnonymousUsers' Accept-Authoritative-Domain-Sender by
    default: anyone can hand in `From: ceo@corp.example` and the organisation's DKIM key signs
    it (DMARC then passes). Nothing said so. Denying the right (Exchange's anti-spoofing step)
    clears it, and so does a connector for the devices' own addresses."""
    base = CLEAN
    found = only(audit(config(base + INTERNET_INBOUND + DKIM_KEY)), "dkim-anyone-signed")
    assert [(f.severity, f.connector, f.key) for f in found] == [
        ("medium", "Internet", "permissions")
    ]
    assert "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender" in found[0].message
    assert "--deny" in found[0].fix
    assert not only(
        audit(config(base + INTERNET_INBOUND + DENY_AUTHORITATIVE_SENDER + DKIM_KEY)),
        "dkim-anyone-signed",
    )
    assert not only(audit(config(base + INTERNET_INBOUND)), "dkim-anyone-signed")  # no key
    assert not only(audit(config(base + DKIM_KEY)), "dkim-anyone-signed")  # devices only


ED25519_KEY = """
[[dkim]]
domain = "corp.example"
selector = "ed1"
key_file = "/etc/relaygate/ed1.key"
algorithm = "ed25519-sha256"
"""


def test_a_domain_signed_with_ed25519_only_is_a_finding() -> None:
    """Gmail, Microsoft 365 and Yahoo do not verify ed25519-sha256: a domain whose every enabled
    key is Ed25519 has no DKIM pass there, and under DMARC p=reject its mail is refused unless
    SPF aligns. The service log and the doctor said so; the audit, the administrator's review of
    the configuration, did not. An RSA key beside it (both sign) clears it; a disabled RSA key
    does not."""
    found = only(audit(config(CLEAN + ED25519_KEY)), "dkim-ed25519-only")
    assert [(f.severity, f.key) for f in found] == [("medium", "dkim[0].algorithm")]
    assert "ed1" in found[0].message and "Gmail" in found[0].message
    assert "rsa-sha256" in found[0].fix and "relaygate dkim new" in found[0].fix
    assert not only(audit(config(CLEAN + ED25519_KEY + DKIM_KEY)), "dkim-ed25519-only")
    disabled_rsa = DKIM_KEY + "enabled = false\n"
    assert only(audit(config(CLEAN + ED25519_KEY + disabled_rsa)), "dkim-ed25519-only")
    assert not only(audit(config(CLEAN + DKIM_KEY)), "dkim-ed25519-only")  # RSA alone


SUBMISSION = """
[server]
name = "RELAY01"
data_dir = "{data_dir}"

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Submission"
bindings = ["0.0.0.0:587"]
remote_ip_ranges = ["10.0.0.0/8"]
permission_groups = ["ExchangeUsers"]
auth_mechanism = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]
"""


def test_auth_users_without_a_send_as_list_are_low_and_medium_when_signed() -> None:
    text = SUBMISSION.format(data_dir="/var/lib/relaygate")
    assert audit(config(text)) == []  # no users file read: nothing to say
    found = audit(config(text), users_without_send_as=["bob", "carol"])
    assert codes(found) == [("low", "auth-users-without-send-as", "Submission")]
    assert "user(s) bob, carol have no send-as list" in found[0].message
    assert "relaygate user send-as bob 'bob@yourdomain'" in found[0].fix
    # with DKIM on, what they write is signed with the organisation's key
    signed = audit(config(text + DKIM_KEY), users_without_send_as=["bob"])
    assert codes(only(signed, "auth-users-without-send-as")) == [
        ("medium", "auth-users-without-send-as", "Submission")
    ]
    assert "DKIM-signs" in only(signed, "auth-users-without-send-as")[0].message
    # a connector that offers no AUTH, or whose authenticated users may not submit: no finding
    no_auth = text.replace('"Tls", "BasicAuth", "BasicAuthRequireTLS"', '"Tls"')
    assert not only(
        audit(config(no_auth), users_without_send_as=["bob"]), "auth-users-without-send-as"
    )


def test_cli_audit_reads_the_users_file_for_users_without_a_send_as_list(tmp_path: Path) -> None:
    path = write(tmp_path / "submission.toml", SUBMISSION.format(data_dir=tmp_path / "data"))
    for name, options in (("alice", ["--send-as", "alice@corp.example"]), ("bob", [])):
        added = run(
            "user", "add", name, "--password-stdin", *options, "-c", str(path), stdin="pw\n"
        )
        assert added.code == 0, added.err
    found = run("audit", "-c", str(path), "--json").json()["findings"]
    (finding,) = [f for f in found if f["code"] == "auth-users-without-send-as"]
    assert finding["severity"] == "low" and "user(s) bob have no send-as list" in finding["message"]
    done = run("user", "send-as", "bob", "bob@corp.example", "-c", str(path))
    assert done.code == 0, done.err
    found = run("audit", "-c", str(path), "--json").json()["findings"]
    assert not [f for f in found if f["code"] == "auth-users-without-send-as"]


@pytest.mark.parametrize("wildcard", ["*.org", "*.co.uk"])
def test_an_accepted_domain_covering_a_public_suffix_is_an_open_relay(
    wildcard: str,
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # An accepted domain is a recipient domain every client that may submit can send to: one
    # covering a whole top-level (or public) suffix lets an anonymous client with no relay right
    # relay to every address under it. The real relay accepts it; audit must say so.
    handle = running_relay(
        [
            {
                "name": "Internal Apps",
                "bindings": ["127.0.0.1:{port}"],
                "remote_ip_ranges": ["127.0.0.5"],
                "permission_groups": ["AnonymousUsers"],
            }
        ],
        domains=[
            {"domain": "corp.example", "domain_type": "Authoritative", "default": True},
            {"domain": wildcard, "domain_type": "InternalRelay"},
        ],
    )
    outside = "victim@mail." + wildcard.removeprefix("*.")
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.5", 0)) as client:
        client.ehlo("app.corp.example")
        assert client.mail("spammer@elsewhere.net")[0] == 250
        assert client.rcpt(outside)[0] == 250  # the server relays it
        client.rset()
    r = run("audit", "--config", str(handle.config_path), "--json")
    assert r.code == 1, r.out + r.err
    found = [f for f in r.json()["findings"] if f["code"] == "accepted-domain-public-suffix"]
    assert [(f["severity"], f["key"]) for f in found] == [("high", "accepted_domains[1].domain")], (
        r.out
    )
    assert wildcard in found[0]["message"] and "Internal Apps" in found[0]["message"]
    assert "relaygate domain remove" in found[0]["fix"]
    # the organisation's own subdomains are what a wildcard is for: no finding
    assert not only(
        audit(config(CLEAN + '[[accepted_domains]]\ndomain = "*.corp.example"\n')),
        "accepted-domain-public-suffix",
    )


def test_the_embedded_default_loopback_relay_is_not_a_wide_range(tmp_path: Path) -> None:
    # With no config file, `serve` relays for this machine only (127.0.0.0/8 and ::1 on
    # 127.0.0.1:2525): audit called that a range of 16,777,216 addresses, high, exit 1, on the
    # product's own safe default. Loopback is one host, not a network.
    r = run("audit", "--json", cwd=tmp_path)  # no ./relaygate.toml, no $RELAYGATE_CONFIG
    assert r.code == 0, r.out + r.err
    data = r.json()
    assert data["source"] == "<embedded default>"
    assert not [f for f in data["findings"] if f["severity"] == "high"], r.out
    assert not only(audit(config(relay(ranges='["127.0.0.0/8", "::1"]'))), "relay-range-too-wide")
    # a range that reaches beyond loopback is still measured
    wide = only(audit(config(relay(ranges='["126.0.0.0/7"]'))), "relay-range-too-wide")
    assert [f.severity for f in wide] == ["high"]


def test_the_relay_right_without_submit_is_no_relay(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # Accept-Any-Recipient given to Everyone on a connector without AnonymousUsers: anonymous
    # sessions lack ms-Exch-SMTP-Submit, so the server refuses their MAIL (530) and nothing is
    # relayed; audit called it a catch-all open relay (high, exit 1), a false alarm.
    handle = running_relay(
        [
            {
                "name": "Right Only",
                "bindings": ["127.0.0.1:{port}"],
                "remote_ip_ranges": ["0.0.0.0/0"],
                "permission_groups": [],
                "permissions": [
                    {"user": "Everyone", "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"]}
                ],
            }
        ]
    )
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.5", 0)) as client:
        client.ehlo("app.corp.example")
        assert client.mail("spammer@elsewhere.net")[0] == 530  # the server relays nothing
    r = run("audit", "--config", str(handle.config_path), "--json")
    assert r.code == 0, r.out + r.err
    assert not [f for f in r.json()["findings"] if f["severity"] == "high"], r.out
    # with AnonymousUsers (Submit) the same right is an open relay again
    text = relay(ranges='["0.0.0.0/0"]', permission=False) + (
        '[[receive_connectors.permissions]]\nuser = "Everyone"\n'
        'extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]\n'
    )
    assert only(audit(config(text)), "catch-all-relay")


def test_secret_files_every_local_user_can_read(tmp_path: Path) -> None:
    # A password or private key copied with `cp` keeps 0644: every local user reads the smart
    # host's password, or can sign as the domain. audit said nothing about it.
    password = tmp_path / "m365.password"
    password.write_text("s3cret\n", encoding="utf-8")
    password.chmod(0o644)
    made = run("dkim", "new", "--domain", "corp.example", "--selector", "s1", "--algorithm",
               "ed25519-sha256", "--data-dir", str(tmp_path), "--json")  # fmt: skip
    dkim = Path(made.json()["key_file"])
    dkim.chmod(0o604)
    cfg = write(
        tmp_path / "relaygate.toml",
        CLEAN
        + f"""
        [[send_connectors]]
        name = "Smart Host"
        address_spaces = ["*"]
        dns_routing_enabled = false
        smart_hosts = ["smtp.corp.example"]
        smart_host_auth_mechanism = "BasicAuthRequireTLS"
        auth_username = "relay@corp.example"
        auth_password_file = "{password}"

        [[dkim]]
        domain = "corp.example"
        selector = "s1"
        key_file = "{dkim}"
        algorithm = "ed25519-sha256"
        """,
    )
    r = run("audit", "--config", str(cfg), "--json")
    assert r.code == 0, r.out + r.err  # medium: exit 0
    found = [f for f in r.json()["findings"] if f["code"] == "secret-file-readable"]
    assert [(f["severity"], f["connector"], f["key"]) for f in found] == [
        ("medium", 'send connector "Smart Host"', "send_connectors[0].auth_password_file"),
        ("medium", "", "dkim[0].key_file"),
    ], r.out
    assert str(password) in found[0]["message"] and "0644" in found[0]["message"]
    assert found[0]["fix"] == f"chmod o-rwx {password}"
    # group access is the packaged layout (0640 root:relaygate): no finding
    password.chmod(0o640)
    dkim.chmod(0o600)
    r = run("audit", "--config", str(cfg), "--json")
    assert not [f for f in r.json()["findings"] if f["code"] == "secret-file-readable"], r.out


def test_a_smart_host_password_that_may_cross_in_clear(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
    tmp_path: Path,
) -> None:
    # smart_host_auth_mechanism = "BasicAuth" uses STARTTLS only when offered: a smart host that
    # does not offer it (or a man in the middle that strips it) gets the password in clear. The
    # receive side's BasicAuth-before-TLS was a finding; the send side said nothing.
    handler = Recorder()
    with SMTPServer(handler, auth_require_tls=False, authenticator=handler.authenticator) as host:
        password = tmp_path / "smarthost.password"
        password.write_text("s3cret-Pa55\n", encoding="utf-8")
        password.chmod(0o600)
        handle = running_relay(
            [relay_connector(("127.0.0.5",))], start=False
        )  # fmt: skip
        handle.doc["send_connectors"][0].update(
            {
                "port": host.port,
                "smart_host_auth_mechanism": "BasicAuth",
                "auth_username": "printer",
                "auth_password_file": str(password),
            }
        )
        handle.config_path.write_text(tomlkit.dumps(handle.doc), encoding="utf-8")
        handle.config = load_config(handle.config_path)
        handle.start()
        with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.5", 0)) as client:
            client.sendmail(
                "scan@corp.example", ["someone@example.net"], b"Subject: t\r\n\r\nx\r\n"
            )
        assert wait_for(lambda: handler.messages, timeout=30)
        assert handler.logins == [("printer", "s3cret-Pa55")]  # read off a connection in clear
    r = run("audit", "--config", str(handle.config_path), "--json")
    found = [f for f in r.json()["findings"] if f["code"] == "smart-host-auth-cleartext"]
    assert [(f["severity"], f["connector"], f["key"]) for f in found] == [
        (
            "medium",
            'send connector "Outbound (unreachable)"',
            "send_connectors[0].smart_host_auth_mechanism",
        )
    ], r.out
    assert "BasicAuthRequireTLS" in found[0]["fix"]
    # BasicAuthRequireTLS (or require_tls) never sends it in clear: no finding
    for safe in ('smart_host_auth_mechanism = "BasicAuthRequireTLS"', "require_tls = true"):
        text = handle.config_path.read_text(encoding="utf-8")
        if safe.startswith("smart"):
            text = text.replace('smart_host_auth_mechanism = "BasicAuth"', safe)
        else:
            text = text.replace('smart_host_auth_mechanism = "BasicAuth"', f"{safe}\n" + (
                'smart_host_auth_mechanism = "BasicAuth"'))  # fmt: skip
        other = write(tmp_path / "safe.toml", text)
        r = run("audit", "--config", str(other), "--json")
        assert not [f for f in r.json()["findings"] if f["code"] == "smart-host-auth-cleartext"], (
            r.out
        )


@pytest.mark.parametrize(
    ("ranges", "family"),
    [
        ('["0.0.0.0/1", "128.0.0.0/1"]', "IPv4"),
        ('["0.0.0.0-127.255.255.255", "::ffff:128.0.0.0/97"]', "IPv4"),
        ('["::/1", "8000::/1"]', "IPv6"),
    ],
)
def test_every_address_written_as_several_ranges_is_a_catch_all(ranges: str, family: str) -> None:
    # Two halves admit every client as 0.0.0.0/0 does: audit reported two wide ranges but not
    # the catch-all open relay (nor, with DKIM keys, anyone's mail signed).
    bindings = '["[::]:25"]' if family == "IPv6" else '["0.0.0.0:25"]'
    found = audit(config(relay(ranges=ranges, bindings=bindings)))
    catch = only(found, "catch-all-relay")
    assert [(f.severity, f.connector) for f in catch] == [("high", "Relay")]
    assert f"every {family} address" in catch[0].message
    # half of the addresses is wide, not a catch-all
    assert not only(audit(config(relay(ranges='["0.0.0.0/1"]'))), "catch-all-relay")


def test_integrated_auth_is_no_auth_offered(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # AuthMechanism Integrated (NTLM/Kerberos) needs Active Directory: RelayGate offers no AUTH
    # for it, so ExchangeUsers grants nothing; audit counted it as AUTH offered (no finding)
    # and the admin centre showed the connector relaying "after AUTH only".
    handle = running_relay(
        [
            {
                "name": "Users",
                "bindings": ["127.0.0.1:{port}"],
                "remote_ip_ranges": ["127.0.0.5"],
                "permission_groups": ["ExchangeUsers"],
                "auth_mechanism": ["Tls", "Integrated"],
            }
        ]
    )
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.5", 0)) as client:
        client.ehlo("app.corp.example")
        assert not client.has_extn("auth")  # the server offers no AUTH
    found = audit(handle.config)
    assert ("info", "exchange-users-without-auth", "Users") in codes(found)
    assert relay_grant(handle.config.receive_connectors[0]).describe() == "no"


def test_basic_auth_on_an_implicit_tls_listener_is_not_clear_text(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # tls_mode = "implicit" (port 465): TLS from the first byte, AUTH included; audit said
    # "BasicAuth is offered before STARTTLS: passwords can cross in clear text", a false alarm.
    handle = running_relay(
        [
            {
                "name": "Submission 465",
                "bindings": ["127.0.0.1:{port}"],
                "remote_ip_ranges": ["127.0.0.5"],
                "permission_groups": ["ExchangeUsers"],
                "auth_mechanism": ["Tls", "BasicAuth"],
                "tls_mode": "implicit",
            }
        ]
    )
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the self-signed one
    with smtplib.SMTP_SSL(
        "127.0.0.1", handle.port, source_address=("127.0.0.5", 0), context=context, timeout=10
    ) as client:
        client.ehlo("app.corp.example")
        assert client.has_extn("auth") and client.sock is not None
        assert client.sock.version() is not None  # AUTH is offered inside TLS only
    assert not only(audit(handle.config), "basic-auth-cleartext")
    # the same connector on STARTTLS offers AUTH before it: reported
    starttls = CLEAN + (
        '[[receive_connectors]]\nname = "Submission"\nbindings = ["0.0.0.0:587"]\n'
        'remote_ip_ranges = ["10.0.0.0/24"]\npermission_groups = ["ExchangeUsers"]\n'
        'auth_mechanism = ["Tls", "BasicAuth"]\n'
    )
    assert only(audit(config(starttls)), "basic-auth-cleartext")


def test_an_internet_connector_with_its_ranges_removed_admits_nobody(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # usage = "Internet" gets 0.0.0.0-255.255.255.255 when remote_ip_ranges is not written; once
    # written empty (every range removed) it admits no client at all, but audit still read it as
    # every IPv4 address: a catch-all open relay (high, exit 1), a false alarm.
    spec = {
        "name": "Internet",
        "usage": "Internet",
        "bindings": ["127.0.0.1:{port}"],
        "remote_ip_ranges": [],
        "permissions": [
            {"user": "Everyone", "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"]}
        ],
    }
    handle = running_relay([spec, {**spec, "name": "Loopback", "usage": "Custom",
                                   "remote_ip_ranges": ["127.0.0.9"], "permissions": []}])  # fmt: skip
    with pytest.raises(smtplib.SMTPServerDisconnected):  # no connector takes 127.0.0.5
        smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.5", 0), timeout=10)
    found = audit(handle.config)
    assert not only(found, "catch-all-relay") and not has_high(found), codes(found)
    # not written: the Internet default, every IPv4 address
    text = CLEAN + (
        '[[receive_connectors]]\nname = "Internet"\nusage = "Internet"\nbindings = ["0.0.0.0:25"]\n'
        '[[receive_connectors.permissions]]\nuser = "Everyone"\n'
        'extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]\n'
    )
    assert only(audit(config(text)), "catch-all-relay")


def _proxied_smtp(port: int, source: str, claimed: str) -> smtplib.SMTP:
    """An SMTP client connected from `source` that first sends a PROXY v1 header naming `claimed`
    as the client (what a trusted load balancer sends), then reads the greeting."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    sock.sendall(f"PROXY TCP4 {claimed} 127.0.0.1 40000 {port}\r\n".encode())
    client = smtplib.SMTP()
    client.sock = sock
    code, _ = client.getreply()
    assert code == 220
    return client


def test_broad_trusted_proxies_beside_a_relay_connector_are_an_open_relay(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # Every host in server.trusted_proxies may name any client address in a PROXY header: with a
    # relay connector for 10.0.0.5, a host of 0.0.0.0/1 that claims 10.0.0.5 relays to anyone.
    # audit rated it medium (exit 0), below a relay range of the same width (high).
    handle = running_relay(
        [relay_connector(["10.0.0.5"])], server={"trusted_proxies": ["0.0.0.0/1"]}
    )
    with _proxied_smtp(handle.port, "127.0.0.9", claimed="10.0.0.5") as client:
        client.ehlo("outside.example.net")
        assert client.mail("spammer@elsewhere.net")[0] == 250
        assert client.rcpt("victim@outside.example.org")[0] == 250  # the server relays it
        client.rset()
    r = run("audit", "--config", str(handle.config_path), "--json")
    assert r.code == 1, r.out + r.err
    found = [f for f in r.json()["findings"] if f["code"] == "trusted-proxies-broad"]
    assert [(f["severity"], f["key"]) for f in found] == [("high", "server.trusted_proxies")]
    assert "SMTP Relay Internal" in found[0]["message"], found[0]["message"]
    # without a connector that relays, a proxy naming an address chooses a connector, no relay
    no_relay = '[server]\ntrusted_proxies = ["0.0.0.0/1"]\n' + relay(permission=False)
    assert [f.severity for f in only(audit(config(no_relay)), "trusted-proxies-broad")] == [
        "medium"
    ]


def test_a_catch_all_relay_narrowed_by_allowed_recipients_says_to_whom(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # A catch-all connector with the relay right whose allowed_recipients lists an alert box and
    # the organisation's domain: anyone may send to those, to nobody else. audit called it "an
    # open relay for anyone" (high), the same finding as a relay to everyone.
    listed = ["alerts@msp.example", "*@corp.example"]
    handle = running_relay(
        [relay_connector(["0.0.0.0/0"], name="Alerts", allowed_recipients=listed)]
    )
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.9", 0)) as client:
        client.ehlo("outside.example.net")
        assert client.mail("someone@elsewhere.net")[0] == 250
        assert client.rcpt("victim@outside.example.org")[0] == 550  # not relayed
        assert client.rcpt("alerts@msp.example")[0] == 250
        client.rset()
    r = run("audit", "--config", str(handle.config_path), "--json")
    found = r.json()["findings"]
    assert not [f for f in found if f["severity"] == "high"], r.out
    assert r.code == 0, r.out + r.err
    (finding,) = [f for f in found if f["code"] == "catch-all-relay-to-listed-recipients"]
    assert finding["severity"] == "medium" and finding["connector"] == "Alerts"
    assert "open relay for anyone" not in finding["message"]
    assert "alerts@msp.example" in finding["message"] and "every IPv4 address" in finding["message"]
    assert finding["key"] == "allowed_recipients"
    # a list that admits every .com address is an open relay still (the server relays it)
    handle = running_relay(
        [relay_connector(["0.0.0.0/0"], name="Dotcom", allowed_recipients=["*@*.com"])]
    )
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.9", 0)) as client:
        client.ehlo("outside.example.net")
        assert client.mail("someone@elsewhere.net")[0] == 250
        assert client.rcpt("victim@mail.example.com")[0] == 250
        client.rset()
    r = run("audit", "--config", str(handle.config_path), "--json")
    assert r.code == 1, r.out + r.err
    highs = {f["code"] for f in r.json()["findings"] if f["severity"] == "high"}
    assert "catch-all-relay" in highs, r.out


def test_a_catch_all_relay_to_a_whole_outside_domain_stays_high(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # allowed_recipients = ["*@partner.example"] on a catch-all relay connector: anyone may send
    # to every mailbox of a domain the organisation does not own, through this relay (an open
    # relay to that domain). Rated medium like a list of addresses, it would pass the audit.
    handle = running_relay(
        [relay_connector(["0.0.0.0/0"], name="Partner", allowed_recipients=["*@partner.example"])]
    )
    with smtplib.SMTP("127.0.0.1", handle.port, source_address=("127.0.0.9", 0)) as client:
        client.ehlo("outside.example.net")
        assert client.mail("spammer@elsewhere.net")[0] == 250
        assert client.rcpt("anyone@partner.example")[0] == 250  # the server relays it
        client.rset()
    r = run("audit", "--config", str(handle.config_path), "--json")
    assert r.code == 1, r.out + r.err
    (finding,) = [
        f for f in r.json()["findings"] if f["code"] == "catch-all-relay-to-listed-recipients"
    ]
    assert finding["severity"] == "high", r.out
    assert "*@partner.example" in finding["message"] and "open relay to it" in finding["message"]
    # the organisation's own domain in the list is no outside domain: listed addresses stay medium
    own = relay(
        ranges='["0.0.0.0/0"]', extra='allowed_recipients = ["*@corp.example", "a@x.example"]'
    )
    found = only(audit(config(CLEAN + own)), "catch-all-relay-to-listed-recipients")
    assert [f.severity for f in found] == ["medium"]


def test_a_trusted_proxy_inside_a_relay_range_relays_what_it_forwards_unnamed(
    running_relay: Callable[..., RelayHandle],  # noqa: F811
) -> None:
    # A PROXY header that names no client (v1 UNKNOWN, v2 LOCAL) keeps the proxy's own address:
    # with that address in a relay connector's ranges, whatever the proxy forwards that way
    # relays (README: keep it out). audit said nothing unless the address was loopback.
    handle = running_relay(
        [relay_connector(["127.0.0.9"])], server={"trusted_proxies": ["127.0.0.9"]}
    )
    sock = socket.create_connection(("127.0.0.1", handle.port), 10, ("127.0.0.9", 0))
    sock.sendall(b"PROXY UNKNOWN\r\n")
    with smtplib.SMTP() as client:
        client.sock = sock
        assert client.getreply()[0] == 220
        client.ehlo("unknown-client.example.net")
        assert client.mail("spammer@elsewhere.net")[0] == 250
        assert client.rcpt("victim@outside.example.org")[0] == 250  # relayed as the proxy
        client.rset()
    text = '[server]\ntrusted_proxies = ["10.0.0.10"]\n' + relay(ranges='["10.0.0.0/28"]')
    found = only(audit(config(text)), "trusted-proxy-in-relay-range")
    assert [(f.severity, f.connector, f.key) for f in found] == [
        ("medium", "Relay", "remote_ip_ranges")
    ]
    assert "10.0.0.10" in found[0].message and "10.0.0.0/28" in found[0].message
    assert "UNKNOWN" in found[0].message
    # the proxy outside the relay ranges: nothing to say
    apart = '[server]\ntrusted_proxies = ["10.0.0.10"]\n' + relay(ranges='["10.0.0.5"]')
    assert not only(audit(config(apart)), "trusted-proxy-in-relay-range")


def test_a_config_file_every_local_user_may_write(tmp_path: Path) -> None:
    # The relay applies an edit of its config file on its own (the supervisor watches it): a file
    # every local user may write lets any of them give a connector relay rights for every
    # address. audit examined the secret files' modes, not the config file's.
    cfg = write(tmp_path / "relaygate.toml", CLEAN)
    cfg.chmod(0o666)
    r = run("audit", "--config", str(cfg), "--json")
    found = [f for f in r.json()["findings"] if f["code"] == "config-file-writable"]
    assert [(f["severity"], f["key"]) for f in found] == [("medium", "(file)")], r.out
    assert str(cfg) in found[0]["message"] and "0666" in found[0]["message"]
    assert found[0]["fix"] == f"chmod o-w {cfg}"
    cfg.chmod(0o644)  # readable is the packaged layout's business (0640): no finding
    r = run("audit", "--config", str(cfg), "--json")
    assert not [f for f in r.json()["findings"] if f["code"] == "config-file-writable"], r.out
