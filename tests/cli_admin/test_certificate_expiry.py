"""Certificate expiry monitoring: the certificates RelayGate holds (the listener's, a receive
connector's own, a send connector's client certificate, an Entra ID certificate credential), each
with notAfter in 10 days, in the past or in a year (generated here with cryptography's builder):
the metric from a real GET /metrics of a running relay (and after a reload that replaced a file),
the audit findings (pure function, and `relaygate audit --json`), and the dashboard's findings."""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from relaygate.app import Relay
from relaygate.audit import audit, certificate_findings
from relaygate.certificates import CertificateExpiry, CertificateRef, read_expiries
from relaygate.config import load_config
from tests.delivery.test_oauth import CLIENT_ID, TENANT
from tests.delivery.test_oauth_certificate import make_certificate
from tests.queue_manager.helpers import free_port, make_config_text

METRIC = "relaygate_certificate_expiry_timestamp_seconds"


def _not_after(path: Path) -> float:
    from cryptography import x509

    return x509.load_pem_x509_certificates(path.read_bytes())[0].not_valid_after_utc.timestamp()


def write_config(tmp_path: Path) -> tuple[Path, dict[str, Path]]:
    """A config whose listener certificate (of its second receive connector, which has none of
    its own) expires in 10 days, whose first receive connector's own certificate (it offers
    STARTTLS) expired 5 days ago, whose send connector's client certificate expires in a year
    and whose Entra ID certificate credential expires in 10 days."""
    d = tmp_path / "certs"
    listener, _, listener_key, _ = make_certificate(d, "listener", days=10, key_apart=True)
    own, _, own_key, _ = make_certificate(d, "connector", days=-5, key_apart=True)
    client, _, client_key, _ = make_certificate(d, "client", days=365, key_apart=True)
    entra = make_certificate(d, "entra", days=10)[0]
    text = make_config_text(
        tmp_path / "data",
        smtp_port=free_port(),
        admin_port=free_port(),
        routes={},
        extra=f"""
[[send_connectors]]
name = "Cert Connector"
address_spaces = ["cert.example"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:9"]
tls_certificate_file = "{client}"
tls_key_file = "{client_key}"

[[send_connectors]]
name = "Outbound to Microsoft 365"
address_spaces = ["example.com"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:9"]
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
oauth_client_certificate_file = "{entra}"

[[receive_connectors]]
name = "Scanners"
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.2"]
""",
    )
    text = (
        text.replace(
            'fqdn = "relay.test"\n',
            f'fqdn = "relay.test"\ntls_certificate_file = "{listener}"\ntls_key_file = "{listener_key}"\n',
            1,
        )
        .replace('auth_mechanism = ["None"]', 'auth_mechanism = ["Tls"]', 1)
        .replace(
            'protocol_logging_level = "Verbose"\n',
            'protocol_logging_level = "Verbose"\n'
            f'tls_certificate_file = "{own}"\ntls_key_file = "{own_key}"\n',
            1,
        )
    )
    config_file = tmp_path / "relaygate.toml"
    config_file.write_text(text, encoding="utf-8")
    return config_file, {"listener": listener, "connector": own, "client": client, "entra": entra}


def parse_metric(text: str) -> dict[tuple[str, str, str], float]:
    """(use, name, file) → value of each sample of the metric (labels in any order)."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(METRIC + r"\{(.*)\} (\S+)", line.strip())
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m[1]))
            out[(labels["use"], labels["name"], labels["file"])] = float(m[2])
    return out


# ------------------------------------------------------------------------------ the pure function


def _expiry(use: str, key: str, connector: str, days: float, now: dt.datetime) -> Any:
    ref = CertificateRef(use, connector or "RELAY01", connector, key, Path(f"/etc/{use}.pem"))
    return CertificateExpiry(ref, now + dt.timedelta(days=days))


def test_certificate_findings_medium_within_30_days_high_once_expired() -> None:
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    certs = [
        _expiry("listener", "server.tls_certificate_file", "", 10, now),
        _expiry("smtp_client", "send_connectors[0].tls_certificate_file", 'send connector "A"', -1, now),
        _expiry("entra_credential", "send_connectors[1].oauth_client_certificate_file", 'send connector "M365"', 365, now),
        _expiry("listener", "receive_connectors[0].tls_certificate_file", "Printers", 30, now),
    ]  # fmt: skip
    findings = certificate_findings(certs, now)
    assert [(f.severity, f.code, f.connector, f.key) for f in findings] == [
        ("medium", "certificate-expiring", "", "server.tls_certificate_file"),
        ("high", "certificate-expired", 'send connector "A"', "send_connectors[0].tls_certificate_file"),
    ]  # fmt: skip
    assert "/etc/listener.pem expires on 2026-12-17 12:00 UTC (in 10 days)" in findings[0].message
    assert "expired on 2026-12-06 12:00 UTC" in findings[1].message
    # audit() merges them, most severe first; without dates, no certificate findings
    merged = audit(load_config(None), certificates=certs, now=now)
    assert [f.code for f in merged if f.code.startswith("certificate")] == [
        "certificate-expired",
        "certificate-expiring",
    ]
    assert not [f for f in audit(load_config(None)) if f.code.startswith("certificate")]


# ---------------------------------------------------------------------------- relaygate audit


def test_relaygate_audit_json_names_key_connector_and_date(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relaygate.cli import app

    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    config_file, files = write_config(tmp_path)
    result = CliRunner().invoke(app, ["audit", "--config", str(config_file), "--json"])
    assert result.exit_code == 1, result.output  # an expired certificate is high
    body = json.loads(result.stdout)
    found = {f["key"]: f for f in body["findings"] if f["code"].startswith("certificate")}
    assert set(found) == {
        "server.tls_certificate_file",
        "receive_connectors[0].tls_certificate_file",
        "send_connectors[1].oauth_client_certificate_file",
    }  # the client certificate, valid a year, is fine
    listener = found["server.tls_certificate_file"]
    assert listener["severity"] == "medium" and listener["connector"] == ""
    date = dt.datetime.fromtimestamp(_not_after(files["listener"]), dt.UTC).strftime("%Y-%m-%d")
    assert str(files["listener"]) in listener["message"] and date in listener["message"]
    own = found["receive_connectors[0].tls_certificate_file"]
    assert own["severity"] == "high" and own["connector"] == "Test Relay"
    assert own["code"] == "certificate-expired" and "expired on" in own["message"]
    entra = found["send_connectors[1].oauth_client_certificate_file"]
    assert entra["severity"] == "medium"
    assert entra["connector"] == 'send connector "Outbound to Microsoft 365"'
    assert "Entra ID certificate credential" in entra["message"]
    assert body["summary"]["high"] >= 1


def test_an_unreadable_certificate_is_left_to_check(tmp_path: Path) -> None:
    config_file, files = write_config(tmp_path)
    files["entra"].unlink()
    expiries = read_expiries(load_config(config_file))
    assert {e.ref.use for e in expiries} == {"listener", "smtp_client"}


def test_the_server_certificate_counts_only_while_a_receive_connector_uses_it(
    tmp_path: Path,
) -> None:
    """server.tls_certificate_file is the certificate of the enabled receive connectors that have
    none of their own (smtp/tls.py server_context): with each of them holding its own, the old
    expired server certificate left in the file is used by nothing, and is no finding (a high one
    made `audit` exit 1) nor a metric to alert on."""
    d = tmp_path / "certs"
    server, _, server_key, _ = make_certificate(d, "server", days=-5, key_apart=True)
    own, _, own_key, _ = make_certificate(d, "own", days=365, key_apart=True)
    text = make_config_text(
        tmp_path / "data", smtp_port=free_port(), admin_port=free_port(), routes={}
    )
    text = text.replace(
        'fqdn = "relay.test"\n',
        f'fqdn = "relay.test"\ntls_certificate_file = "{server}"\ntls_key_file = "{server_key}"\n',
        1,
    ).replace(
        'protocol_logging_level = "Verbose"\n',
        'protocol_logging_level = "Verbose"\n'
        f'tls_certificate_file = "{own}"\ntls_key_file = "{own_key}"\n',
        1,
    )
    other = f"""
[[receive_connectors]]
name = "Scanners"
enabled = {{enabled}}
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.2"]
"""
    config_file = tmp_path / "relaygate.toml"
    for enabled, used in (("false", False), ("true", True)):
        config_file.write_text(text + other.format(enabled=enabled), encoding="utf-8")
        config = load_config(config_file)
        expiries = read_expiries(config)
        keys = {e.ref.key for e in expiries}
        assert ("server.tls_certificate_file" in keys) is used, enabled
        codes = {f.key: f.code for f in audit(config, certificates=expiries)}
        assert (codes.get("server.tls_certificate_file") == "certificate-expired") is used
        assert "receive_connectors[0].tls_certificate_file" not in codes  # valid a year


def test_a_receive_connector_without_tls_holds_no_certificate(tmp_path: Path) -> None:
    """A receive connector offers STARTTLS (or implicit TLS) only with 'Tls' in auth_mechanism:
    without it, neither its own tls_certificate_file nor the server's is used for it, and an
    expired one is no certificate-expired finding (which made `audit` exit 1)."""
    d = tmp_path / "certs"
    server, _, server_key, _ = make_certificate(d, "server", days=-5, key_apart=True)
    own, _, own_key, _ = make_certificate(d, "own", days=-5, key_apart=True)
    text = make_config_text(
        tmp_path / "data", smtp_port=free_port(), admin_port=free_port(), routes={}
    )
    assert 'auth_mechanism = ["None"]' in text  # the helper's connector: no TLS
    text = text.replace(
        'fqdn = "relay.test"\n',
        f'fqdn = "relay.test"\ntls_certificate_file = "{server}"\ntls_key_file = "{server_key}"\n',
        1,
    ).replace(
        'protocol_logging_level = "Verbose"\n',
        'protocol_logging_level = "Verbose"\n'
        f'tls_certificate_file = "{own}"\ntls_key_file = "{own_key}"\n',
        1,
    )
    other = f"""
[[receive_connectors]]
name = "Scanners"
auth_mechanism = {{mechanism}}
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.2"]
"""
    config_file = tmp_path / "relaygate.toml"
    for mechanism, used in (('["None"]', False), ('["Tls"]', True)):
        config_file.write_text(text + other.format(mechanism=mechanism), encoding="utf-8")
        config = load_config(config_file)
        expiries = read_expiries(config)
        codes = {f.key: f.code for f in audit(config, certificates=expiries)}
        assert "receive_connectors[0].tls_certificate_file" not in codes, mechanism
        assert (codes.get("server.tls_certificate_file") == "certificate-expired") is used


# -------------------------------------------------------------------- /metrics, reload, dashboard


async def test_metrics_of_a_running_relay_and_a_reload_after_the_file_is_replaced(
    tmp_path: Path,
) -> None:
    config_file, files = write_config(tmp_path)
    config = load_config(config_file)
    relay = Relay(config, config_path=config_file)
    await relay.start()
    try:
        base = f"http://{config.admin.listen}"
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            metrics = parse_metric((await client.get("/metrics")).text)
            assert metrics == {
                ("listener", "RELAYTEST", str(files["listener"])): _not_after(files["listener"]),
                ("listener", "Test Relay", str(files["connector"])): _not_after(files["connector"]),
                ("smtp_client", "Cert Connector", str(files["client"])): _not_after(
                    files["client"]
                ),
                ("entra_credential", "Outbound to Microsoft 365", str(files["entra"])): (
                    _not_after(files["entra"])
                ),
            }
            now = dt.datetime.now(dt.UTC).timestamp()
            assert metrics[("listener", "RELAYTEST", str(files["listener"]))] - now > 9 * 86400
            assert metrics[("listener", "Test Relay", str(files["connector"]))] < now

            # the dashboard shows the findings (the admin centre has no token here)
            page = (await client.get("/")).text
            assert "certificate-expired" in page or "expired on" in page
            assert "receive_connectors[0].tls_certificate_file" in page
            assert "send_connectors[1].oauth_client_certificate_file" in page

            # the connector's certificate is renewed in place; a reload takes it up
            renewed = make_certificate(tmp_path / "renewed", "connector", days=400, key_apart=True)
            files["connector"].write_bytes(renewed[0].read_bytes())
            assert renewed[2] is not None
            own_key = Path(str(files["connector"]).removesuffix(".pem") + ".key")
            own_key.write_bytes(renewed[2].read_bytes())
            await relay.reload()
            after = parse_metric((await client.get("/metrics")).text)
            key = ("listener", "Test Relay", str(files["connector"]))
            assert after[key] == _not_after(files["connector"]) > now + 399 * 86400
            assert len(after) == 4
            page = (await client.get("/")).text
            assert "receive_connectors[0].tls_certificate_file" not in page
    finally:
        await relay.stop()


async def test_metrics_has_no_duplicate_sample_when_a_connector_is_named_like_the_server(
    tmp_path: Path,
) -> None:
    """A receive connector named like server.name with the server's certificate file gave the
    same (use, name, file) sample twice, and Prometheus rejects the whole scrape for a duplicate.
    The real /metrics, parsed with prometheus_client's parser: every sample is unique."""
    from prometheus_client.parser import text_string_to_metric_families

    config_file, files = write_config(tmp_path)
    text = config_file.read_text(encoding="utf-8")
    config_file.write_text(
        text
        + f"""
[[receive_connectors]]
name = "RELAYTEST"
auth_mechanism = ["Tls"]
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.3"]
tls_certificate_file = "{files["listener"]}"
tls_key_file = "{str(files["listener"]).removesuffix(".pem") + ".key"}"
""",
        encoding="utf-8",
    )
    config = load_config(config_file)
    assert [c.ref.name for c in read_expiries(config)].count("RELAYTEST") == 2  # the situation
    relay = Relay(config, config_path=config_file)
    await relay.start()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://{config.admin.listen}", timeout=10
        ) as client:
            body = (await client.get("/metrics")).text
    finally:
        await relay.stop()
    samples = [
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(body)
        for s in family.samples
    ]
    assert len(samples) > 20
    duplicates = {s for s in samples if samples.count(s) > 1}
    assert not duplicates, duplicates
    listener = [s for s in samples if s[0] == METRIC and ("name", "RELAYTEST") in s[1]]
    assert listener == [
        (METRIC, (("file", str(files["listener"])), ("name", "RELAYTEST"), ("use", "listener")))
    ]
    assert parse_metric(body)[("listener", "RELAYTEST", str(files["listener"]))] == _not_after(
        files["listener"]
    )


def test_certificate_expiring_within_a_day_says_hours_not_0_days() -> None:
    """A certificate expiring in less than a day said "(in 0 days)": hours, then "within an hour"."""
    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    certs = [
        _expiry("listener", "server.tls_certificate_file", "", 5.5 / 24, now),
        _expiry("listener", "receive_connectors[0].tls_certificate_file", "A", 1.2 / 24, now),
        _expiry("listener", "receive_connectors[1].tls_certificate_file", "B", 0.5 / 24, now),
        _expiry("listener", "receive_connectors[2].tls_certificate_file", "C", 1.5, now),
    ]
    messages = [f.message for f in certificate_findings(certs, now)]
    assert "expires on 2026-12-07 17:30 UTC (in 5 hours)" in messages[0]
    assert "(in 1 hour)" in messages[1]
    assert "expires on 2026-12-07 12:30 UTC (within an hour)" in messages[2]
    assert "(in 1 day)" in messages[3]
    assert not [m for m in messages if "0 days" in m]


# ---------------------------------------------------------------------- the admin listener's pair


async def test_the_admin_certificate_is_tracked_like_the_listeners(tmp_path: Path) -> None:
    """admin.tls_certificate_file expiring in 10 days, its key left 0644 by a copy: it was no
    finding, no /metrics sample and not on the dashboard (when it expires, browsers and
    `relaygate queue` refuse the admin listener), and the key was not among the secret files
    the audit checks. Now each is there, over the listener's own HTTPS."""
    from relaygate.cli.queue import pinned_tls_context

    cert, _, key, _ = make_certificate(tmp_path / "admin", "admin", days=10, key_apart=True)
    assert key is not None
    key.chmod(0o644)
    text = make_config_text(
        tmp_path / "data",
        smtp_port=free_port(),
        admin_port=free_port(),
        routes={},
        admin_extra=f'tls_certificate_file = "{cert}"\ntls_key_file = "{key}"',
    )
    config_file = tmp_path / "relaygate.toml"
    config_file.write_text(text, encoding="utf-8")
    config = load_config(config_file)
    found = {f.key: f for f in audit(config, certificates=read_expiries(config))}
    admin = found["admin.tls_certificate_file"]
    assert admin.severity == "medium" and admin.code == "certificate-expiring", admin
    assert str(cert) in admin.message and "admin listener" in admin.message, admin.message
    readable = found["admin.tls_key_file"]
    assert readable.code == "secret-file-readable" and str(key) in readable.message, readable
    assert "admin listener" in readable.message, readable.message

    relay = Relay(config, config_path=config_file)
    await relay.start()
    try:
        base = f"https://{config.admin.listen}"
        verify = pinned_tls_context(cert)
        async with httpx.AsyncClient(base_url=base, timeout=10, verify=verify) as client:
            metrics = parse_metric((await client.get("/metrics")).text)
            assert metrics == {("admin_listener", "RELAYTEST", str(cert)): _not_after(cert)}
            page = (await client.get("/")).text
            assert "admin.tls_certificate_file" in page

        # renewed in place (no reload): the listener takes it, and its date follows
        renewed = make_certificate(tmp_path / "renewed", "admin", days=400, key_apart=True)
        assert renewed[2] is not None
        key.write_bytes(renewed[2].read_bytes())
        cert.write_bytes(renewed[0].read_bytes())
        await relay.watch_admin_certificate()
        verify = pinned_tls_context(cert)
        async with httpx.AsyncClient(base_url=base, timeout=10, verify=verify) as client:
            metrics = parse_metric((await client.get("/metrics")).text)
            assert metrics == {("admin_listener", "RELAYTEST", str(cert)): _not_after(cert)}
            assert _not_after(cert) > dt.datetime.now(dt.UTC).timestamp() + 399 * 86400
            assert "admin.tls_certificate_file" not in (await client.get("/")).text
    finally:
        await relay.stop()
