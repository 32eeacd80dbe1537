"""`relaygate doctor` as a subprocess against the loopback DNS server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from relaygate.dkim.keys import load_private_key, write_key
from tests.support.dns_server import LoopbackDNS
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401


def relaygate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    env["COLUMNS"] = "300"
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def publish(server: LoopbackDNS, dkim_record: str) -> None:
    server.add("corp.example", "MX", (10, "mx1.corp.example"))
    server.add("mx1.corp.example", "A", "192.0.2.10")
    server.add("corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    server.add("s1._domainkey.corp.example", "TXT", dkim_record)
    server.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=reject")


def test_doctor_json_healthy_with_key_from_data_dir(tmp_path, loopback_dns):
    key = write_key(tmp_path / "data", "corp.example", "s1")
    publish(loopback_dns, load_private_key(key, "rsa-sha256").record)
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--dns-server", loopback_dns.address,
        "--data-dir", str(tmp_path / "data"), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["domain"] == "corp.example"
    assert report["selector"] == "s1"  # found under data_dir
    assert report["worst"] == "ok"
    assert [(f["check"], f["severity"]) for f in report["findings"]] == [
        ("MX", "ok"), ("SPF", "ok"), ("SPF", "ok"), ("DKIM", "ok"), ("DMARC", "ok"),
    ]  # fmt: skip


def test_doctor_json_errors_exit_1(tmp_path, loopback_dns):
    other = write_key(tmp_path / "other", "corp.example", "s1")
    write_key(tmp_path / "data", "corp.example", "s1")
    publish(loopback_dns, load_private_key(other, "rsa-sha256").record)  # not the relay's key
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "198.51.100.9", "--selector", "s1",
        "--dns-server", loopback_dns.address, "--data-dir", str(tmp_path / "data"), "--json",
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    findings = {
        f["check"]: f for f in json.loads(proc.stdout)["findings"] if f["severity"] == "error"
    }
    assert "does not authorise 198.51.100.9" in findings["SPF"]["summary"]
    assert "ip4:203.0.113.7 ip4:198.51.100.9 -all" in findings["SPF"]["fix"]
    assert findings["DKIM"]["summary"].startswith("DKIM key mismatch")
    assert findings["DMARC"]["summary"].startswith(
        "receivers will reject relayed mail (550 5.7.509"
    )


def test_doctor_table_and_dns_servers_from_config(tmp_path, loopback_dns):
    loopback_dns.set_servfail("corp.example")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\ndns_servers = ["{loopback_dns.address}"]\n'
    )
    proc = relaygate("doctor", "corp.example", "--config", str(config), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    flat = " ".join(proc.stdout.replace("│", " ").split())
    assert "DNS doctor: corp.example" in proc.stdout
    assert "451 4.4.0 DNS query failed. The error was: ServerFailure" in flat
    assert ("corp.example", "MX", "udp") in loopback_dns.queries
    assert "\nFixes:\n  [MX] Check the delegation" in proc.stdout


def test_doctor_bad_arguments(tmp_path):
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "not-an-ip", "--data-dir", ".", cwd=tmp_path
    )
    assert proc.returncode == 2 and "not an IP address" in proc.stderr


def test_doctor_json_names_the_envelope_domain_it_checked(tmp_path, loopback_dns):
    """The JSON says which MAIL FROM domain the SPF alignment verdict is about."""
    publish(loopback_dns, "v=DKIM1; k=rsa; p=")
    loopback_dns.add("bounces.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--envelope-domain",
        "Bounces.Corp.Example.", "--dns-server", loopback_dns.address, "--data-dir",
        str(tmp_path), "--json", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["envelope_domain"] == "bounces.corp.example", report
    dmarc = [f for f in report["findings"] if f["check"] == "DMARC"]
    assert dmarc[0]["summary"] == "DMARC p=reject; relayed mail aligns via SPF"


def test_doctor_checks_the_key_of_the_domain_the_relay_signs_with(tmp_path, loopback_dns):
    """server.dkim_domain_source = "envelope_sender": the relay signs with MAIL FROM's domain, so
    the From domain's key (published and matching) makes nothing align with From."""
    key = write_key(tmp_path / "data", "corp.example", "s1")
    publish(loopback_dns, load_private_key(key, "rsa-sha256").record)
    loopback_dns.add("bounces.relay.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\ndkim_domain_source = "envelope_sender"\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\n'
    )
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--envelope-domain",
        "bounces.relay.example", "--dns-server", loopback_dns.address, "--config", str(config),
        "--json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    assert report["signing_domain"] == "bounces.relay.example"
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["DKIM"]["summary"] == (
        "relayed mail from bounces.relay.example is not DKIM-signed: no selector configured"
    )
    assert by_check["DMARC"]["summary"].startswith("receivers will reject relayed mail")


def test_doctor_key_on_disk_without_a_dkim_entry_does_not_sign(tmp_path, loopback_dns):
    """The relay signs only with [[dkim]] entries: a key file `dkim new` left in data_dir, with no
    entry in the config, signs nothing, so it cannot make DMARC align."""
    key = write_key(tmp_path / "data", "corp.example", "s1")
    publish(loopback_dns, load_private_key(key, "rsa-sha256").record)
    config = tmp_path / "relaygate.toml"
    config.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "198.51.100.9", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["DKIM"]["summary"] == (
        "relayed mail from corp.example is not DKIM-signed: no selector configured"
    )
    assert by_check["DMARC"]["summary"].startswith("receivers will reject relayed mail")


def test_doctor_refuses_a_domain_that_is_not_one(tmp_path):
    proc = relaygate("doctor", "corp..example", "--data-dir", ".", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "'corp..example' is not a valid domain name" in proc.stderr


def _per_sender_spf(server: LoopbackDNS, authorised: str) -> None:
    """corp.example authorises each sender by name (%{l}): only `authorised`@ from the relay."""
    server.remove("corp.example", "TXT")
    server.add("corp.example", "TXT", "v=spf1 exists:%{l}.%{i}._spf.%{d} -all")
    server.add(f"{authorised}.203.0.113.7._spf.corp.example", "A", "127.0.0.2")


def _spf_verdict(proc: subprocess.CompletedProcess[str]) -> dict[str, str]:
    report = json.loads(proc.stdout)
    return [f for f in report["findings"] if f["check"] == "SPF"][-1]


def test_doctor_evaluates_spf_for_the_sender_given(tmp_path, loopback_dns):
    publish(loopback_dns, "v=DKIM1; k=rsa; p=")
    _per_sender_spf(loopback_dns, "scanner")
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--sender", "scanner@Corp.Example",
        "--dns-server", loopback_dns.address, "--data-dir", str(tmp_path), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["envelope_sender"] == "scanner@corp.example"
    assert _spf_verdict(proc)["summary"] == "SPF authorises 203.0.113.7 (pass)"


def test_doctor_evaluates_spf_for_the_configured_send_as(tmp_path, loopback_dns):
    """A send connector's send_as is the MAIL FROM of the mail it sends: SPF is checked for it."""
    publish(loopback_dns, "v=DKIM1; k=rsa; p=")
    _per_sender_spf(loopback_dns, "relay")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[[send_connectors]]\nname = "Microsoft 365"\ndns_routing_enabled = false\nsmart_hosts = ["smtp.office365.com"]\n'
        'port = 587\nsend_as = "relay@corp.example"\n'
    )
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert _spf_verdict(proc)["summary"] == "SPF authorises 203.0.113.7 (pass)", proc.stderr
    assert json.loads(proc.stdout)["envelope_sender"] == "relay@corp.example"


def test_doctor_refuses_a_sender_outside_the_envelope_domain(tmp_path):
    proc = relaygate(
        "doctor", "corp.example", "--sender", "scanner@corp.example", "--envelope-domain",
        "bounces.corp.example", "--data-dir", ".", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--sender scanner@corp.example is not in --envelope-domain bounces.corp.example" in (
        proc.stderr
    )


def test_doctor_checks_every_selector_the_relay_signs_with(tmp_path, loopback_dns):
    """Two [[dkim]] entries for the domain (a rotation, or RSA beside Ed25519): the relay signs
    with both, so both published keys are checked and each is reported."""
    data = tmp_path / "data"
    old = write_key(data, "corp.example", "s1")
    write_key(data, "corp.example", "s2", "ed25519-sha256")  # new key, not published yet
    publish(loopback_dns, load_private_key(old, "rsa-sha256").record)
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s2"\nalgorithm = "ed25519-sha256"\n'
    )
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    dkim = [(f["severity"], f["summary"]) for f in report["findings"] if f["check"] == "DKIM"]
    assert dkim == [
        ("ok", "DKIM record at s1._domainkey.corp.example matches the relay's rsa key"),
        ("error", "no DKIM record at s2._domainkey.corp.example: receivers report dkim=permerror "
         "(no key for signature), so DMARC cannot pass on DKIM (550 5.7.509 / DMARC under "
         "p=reject)"),
    ], proc.stderr  # fmt: skip
    assert report["selectors"] == ["s1", "s2"]
    assert proc.returncode == 1
    # DMARC aligns through the key that is published
    dmarc = [f for f in report["findings"] if f["check"] == "DMARC"]
    assert dmarc[0]["summary"] == "DMARC p=reject; relayed mail aligns via SPF and DKIM"

    # --selector narrows the check to one of them
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--selector", "S1", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["selectors"] == ["s1"]


def test_doctor_checks_spf_for_the_send_connectors_helo_names(tmp_path, loopback_dns):
    """The names the send connectors say in EHLO (their fqdn, else server.fqdn) are checked: the
    relay's NDRs carry no other identity. Before, a HELO name without SPF went unnoticed."""
    publish(loopback_dns, "v=DKIM1; k=rsa; p=")
    loopback_dns.add("out.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nfqdn = "relay.corp.example"\n\n'
        '[[send_connectors]]\nname = "Internet"\naddress_spaces = ["*"]\n\n'
        '[[send_connectors]]\nname = "Partners"\naddress_spaces = ["partner.example"]\n'
        'fqdn = "out.corp.example"\n\n'
        '[[send_connectors]]\nname = "Old"\naddress_spaces = ["old.example"]\n'
        'fqdn = "old.corp.example"\nenabled = false\n'
    )
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    helo = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "HELO"]
    assert [(f["severity"], f["summary"]) for f in helo] == [
        ("warning", "the HELO name relay.corp.example has no SPF record: the relay's NDRs and "
         "DSNs (MAIL FROM:<>, checked by the HELO name alone) get SPF none"),
        ("ok", "SPF for the HELO name out.corp.example authorises 203.0.113.7 (pass)"),
    ], proc.stderr  # fmt: skip
    assert 'send connector "Internet" says EHLO relay.corp.example' in helo[0]["detail"]
    assert proc.returncode == 0  # warnings only


def test_doctor_judges_a_send_connector_with_its_own_source_address_by_that_address(
    tmp_path, loopback_dns
):
    """A send connector with source_ip_address leaves from that address: the HELO name's SPF
    must authorise it, not --relay-ip. Before, every connector was judged by --relay-ip, and a
    record that left the connector's own address out was reported ok."""
    publish(loopback_dns, "v=DKIM1; k=rsa; p=")
    loopback_dns.add("out.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nfqdn = "out.corp.example"\n\n'
        '[[send_connectors]]\nname = "Internet"\naddress_spaces = ["*"]\n\n'
        '[[send_connectors]]\nname = "Partners"\naddress_spaces = ["partner.example"]\n'
        'source_ip_address = "198.51.100.20"\n'
    )
    proc = relaygate(
        "doctor", "corp.example", "--relay-ip", "203.0.113.7", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    helo = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "HELO"]
    assert [(f["severity"], f["summary"]) for f in helo] == [
        ("ok", "SPF for the HELO name out.corp.example authorises 203.0.113.7 (pass)"),
        ("warning", "SPF for the HELO name out.corp.example does not authorise 198.51.100.20 "
         "(SPF fail): the relay's NDRs and DSNs (MAIL FROM:<>, checked by the HELO name alone) "
         "fail SPF"),
    ], proc.stdout + proc.stderr  # fmt: skip
    assert 'send connector "Internet" says EHLO' in helo[0]["detail"]
    assert 'send connector "Partners" says EHLO' in helo[1]["detail"]
    assert "source_ip_address 198.51.100.20" in helo[1]["detail"]
    assert "ip4:198.51.100.20" in helo[1]["fix"]


def test_doctor_says_the_helo_check_was_skipped_for_a_domain_that_does_not_exist(
    tmp_path, loopback_dns
):
    """The HELO names were not checked when DOMAIN does not exist, and the report said nothing
    about them (SPF, DKIM and DMARC each said "not checked")."""
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\nfqdn = "out.corp.example"\n\n'
        '[[send_connectors]]\nname = "Internet"\naddress_spaces = ["*"]\n'
    )
    proc = relaygate(
        "doctor", "nonexistent.example", "--relay-ip", "203.0.113.7", "--dns-server",
        loopback_dns.address, "--config", str(config), "--json", cwd=tmp_path,
    )  # fmt: skip
    helo = [f for f in json.loads(proc.stdout)["findings"] if f["check"] == "HELO"]
    assert [(f["severity"], f["summary"]) for f in helo] == [
        ("info", "HELO not checked: nonexistent.example does not exist (the HELO name "
         "out.corp.example of send connector \"Internet\" was not looked up)"),
    ], proc.stdout  # fmt: skip


def test_doctor_without_any_dns_server_says_so(tmp_path, monkeypatch):
    """No --dns-server, no config's server.dns_servers and a system resolv.conf that names no
    server (dnspython reads an empty file for /etc/resolv.conf here): the doctor ended with a
    traceback (NoResolverConfiguration); it says what is missing, exit 2."""
    import dns.resolver
    from typer.testing import CliRunner

    from relaygate.cli import app

    empty = tmp_path / "resolv.conf"
    empty.write_text("", encoding="utf-8")
    read = dns.resolver.BaseResolver.read_resolv_conf

    def read_empty(self, f="/etc/resolv.conf"):
        read(self, str(empty) if f == "/etc/resolv.conf" else f)

    monkeypatch.setattr(dns.resolver.BaseResolver, "read_resolv_conf", read_empty)
    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    done = CliRunner().invoke(app, ["doctor", "corp.example", "--data-dir", str(tmp_path)])
    assert done.exit_code == 2, (done.output, done.exception)
    assert "no DNS server: /etc/resolv.conf names none" in done.output
    assert "--dns-server" in done.output


def test_doctor_of_a_subdomain_checks_the_parent_key_that_signs_it(tmp_path, loopback_dns):
    """`subdomains = true` on corp.example's s1: the relay signs alerts.corp.example's mail with
    d=corp.example, so the doctor checks s1._domainkey.corp.example (not corp.example's other
    key, s2, which signs only corp.example) and DMARC alignment under adkim: relaxed aligns,
    strict does not. Before, it reported that nothing signs alerts.corp.example."""
    data = tmp_path / "data"
    key = write_key(data, "corp.example", "s1")
    write_key(data, "corp.example", "s2")  # not published: checking it would be an error
    loopback_dns.add(
        "s1._domainkey.corp.example", "TXT", load_private_key(key, "rsa-sha256").record
    )
    loopback_dns.add("alerts.corp.example", "MX", (10, "mx1.corp.example"))
    loopback_dns.add("mx1.corp.example", "A", "192.0.2.10")
    loopback_dns.add("alerts.corp.example", "TXT", "v=spf1 ip4:203.0.113.7 -all")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=reject")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\nsubdomains = true\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s2"\n'
    )
    args = ("doctor", "alerts.corp.example", "--relay-ip", "203.0.113.7", "--dns-server",
            loopback_dns.address, "--config", str(config), "--json")  # fmt: skip
    proc = relaygate(*args, cwd=tmp_path)
    report = json.loads(proc.stdout)
    assert report["signing_domain"] == "corp.example", proc.stdout + proc.stderr
    assert report["selectors"] == ["s1"]
    by_check = {f["check"]: f for f in report["findings"]}
    assert by_check["DKIM"]["severity"] == "ok", by_check["DKIM"]
    assert by_check["DMARC"]["summary"] == (
        "DMARC p=reject (inherited from corp.example); relayed mail aligns via SPF and DKIM"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # strict DKIM alignment: d=corp.example does not align with alerts.corp.example, so only SPF
    loopback_dns.remove("_dmarc.corp.example", "TXT")
    loopback_dns.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=reject; adkim=s")
    report = json.loads(relaygate(*args, cwd=tmp_path).stdout)
    dmarc = [f for f in report["findings"] if f["check"] == "DMARC"]
    assert dmarc[0]["summary"] == (
        "DMARC p=reject (inherited from corp.example); relayed mail aligns via SPF"
    )
