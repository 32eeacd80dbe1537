"""`relaygate audit` and the admin centre's findings name an RSA DKIM key of a size RFC 8301 §3.2
advises against: the service log warned at start, but the audit (the administrator's review of the
configuration) said nothing. Under 1024 bits verifiers must not accept the signature (high), under
2048 signers should not use it (low), over 4096 a verifier need not handle it (medium)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaygate.audit import Finding, audit
from relaygate.config import parse_text
from relaygate.dkim.keys import rsa_key_sizes
from tests.admin_web.test_web import RelayThread
from tests.cli_admin.helpers import run, write

CLEAN = """
[server]
name = "RELAY01"
data_dir = "{data_dir}"

[[accepted_domains]]
domain = "corp.example"
"""

KEY = """
[[dkim]]
domain = "corp.example"
selector = "{selector}"
key_file = "{key_file}"
algorithm = "{algorithm}"
enabled = {enabled}
"""


def key_entry(key_file: Path, selector: str = "s1", *, ed25519_key: bool = False) -> str:
    algorithm = "ed25519-sha256" if ed25519_key else "rsa-sha256"
    return KEY.format(selector=selector, key_file=key_file, algorithm=algorithm, enabled="true")


def rsa_key(path: Path, bits: int) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


def sized(findings: list[Finding]) -> list[tuple[str, str]]:
    return [(f.severity, f.key) for f in findings if f.code == "dkim-rsa-key-size"]


def config_text(tmp_path: Path, *entries: str) -> str:
    return textwrap.dedent(CLEAN.format(data_dir=tmp_path / "data")) + "".join(entries)


def test_each_size_band_has_its_severity(tmp_path: Path) -> None:
    text = config_text(tmp_path, key_entry(tmp_path / "a.key"), key_entry(tmp_path / "b.key", "s2"))
    config = parse_text(text, "test.toml")
    assert sized(audit(config)) == []  # sizes not given: nothing to judge
    assert sized(audit(config, dkim_key_sizes={0: 2048, 1: 4096})) == []
    assert sized(audit(config, dkim_key_sizes={0: 1024, 1: 3072})) == [("low", "dkim[0].key_file")]
    assert sized(audit(config, dkim_key_sizes={0: 512})) == [("high", "dkim[0].key_file")]
    assert sized(audit(config, dkim_key_sizes={1: 8192})) == [("medium", "dkim[1].key_file")]
    (high,) = [f for f in audit(config, dkim_key_sizes={0: 768}) if f.code == "dkim-rsa-key-size"]
    assert "corp.example (selector s1)" in high.message and "768 bits" in high.message
    assert "no DKIM pass anywhere" in high.message
    assert "relaygate dkim new --domain corp.example" in high.fix


def test_the_sizes_are_read_from_the_enabled_rsa_keys_that_can_be_read(tmp_path: Path) -> None:
    small = rsa_key(tmp_path / "small.key", 1024)
    good = rsa_key(tmp_path / "good.key", 2048)
    ed = tmp_path / "ed.key"
    ed.write_bytes(
        ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    disabled = KEY.format(selector="off", key_file=small, algorithm="rsa-sha256", enabled="false")
    text = config_text(
        tmp_path,
        key_entry(small),
        key_entry(good, "s2"),
        key_entry(ed, "ed1", ed25519_key=True),
        disabled,
        key_entry(tmp_path / "missing.key", "gone"),
    )
    assert rsa_key_sizes(parse_text(text, "test.toml")) == {0: 1024, 1: 2048}


def test_relaygate_audit_names_a_1024_bit_key(tmp_path: Path) -> None:
    small = rsa_key(tmp_path / "small.key", 1024)
    path = write(tmp_path / "relaygate.toml", config_text(tmp_path, key_entry(small)))
    r = run("audit", "-c", str(path), "--json")
    assert r.code == 0, r.out + r.err  # low: not a failing audit
    found = [f for f in r.json()["findings"] if f["code"] == "dkim-rsa-key-size"]
    assert [(f["severity"], f["key"]) for f in found] == [("low", "dkim[0].key_file")]
    assert "RSA key of 1024 bits" in found[0]["message"]
    rsa_key(small, 2048)
    r = run("audit", "-c", str(path), "--json")
    assert not [f for f in r.json()["findings"] if f["code"] == "dkim-rsa-key-size"], r.out


def test_the_admin_centre_shows_it_and_a_reload_reads_the_keys_again(tmp_path: Path) -> None:
    small = rsa_key(tmp_path / "small.key", 1024)
    config_file = tmp_path / "relaygate.toml"
    node = RelayThread(tmp_path / "data", extra=key_entry(small), config_file=config_file)
    try:
        assert "RSA key of 1024 bits" in node.api("GET", "/").text  # the dashboard's findings
        rsa_key(small, 2048)
        node.call(node.relay.reload())
        assert "RSA key of" not in node.api("GET", "/").text
    finally:
        node.stop()
