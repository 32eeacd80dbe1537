"""Review findings: the renewal decision (AcmeManager.due) and the challenge responder's bounds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relaygate.acme import AcmeManager, acme_files
from relaygate.config import parse_text

CONFIG = """\
[server]
fqdn = "relay.acme.test"
data_dir = "{data}"
acme_directory_url = "https://127.0.0.1:1/dir"
{extra}
"""


def _config(tmp_path: Path, extra: str = "") -> object:
    return parse_text(CONFIG.format(data=tmp_path, extra=extra), source="relaygate.toml")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _install(
    data: Path, *, lifetime: timedelta, key_matches: bool = True, age: timedelta = timedelta(0)
) -> None:
    """A certificate for relay.acme.test in <data>/acme, as the manager writes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.acme.test")])
    start = datetime.now(UTC) - age
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.acme.test")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = acme_files(data)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    other = key if key_matches else ec.generate_private_key(ec.SECP256R1())
    key_path.write_bytes(_pem_key(other))


def test_a_fresh_matching_certificate_is_not_due(tmp_path: Path) -> None:
    _install(tmp_path, lifetime=timedelta(days=90))
    assert AcmeManager(_config(tmp_path)).due() is None


def test_a_key_that_does_not_match_the_chain_is_due(tmp_path: Path) -> None:
    # A crash between the two renames of _install (key first, then chain) leaves the new key
    # beside the old chain: the listeners cannot load the pair, so it must be ordered anew
    # rather than kept until it expires.
    _install(tmp_path, lifetime=timedelta(days=90), key_matches=False)
    reason = AcmeManager(_config(tmp_path)).due()
    assert reason is not None and "key" in reason


def test_a_short_lived_certificate_is_not_reordered_at_every_check(tmp_path: Path) -> None:
    # A CA issuing 24-hour certificates (step-ca's default) with the default acme_renew_before
    # (30 days): a certificate just obtained must not be due at once, else the relay orders a
    # new one at every acme_check_interval.
    _install(tmp_path, lifetime=timedelta(hours=24))
    assert AcmeManager(_config(tmp_path)).due() is None
    # ... but it is renewed in the last third of its life
    _install(tmp_path, lifetime=timedelta(hours=24), age=timedelta(hours=17))
    assert AcmeManager(_config(tmp_path)).due() is not None
