"""Server TLS: certificate per connector or per server, a self-signed one generated on first start.

Contexts are built once per connector at start (and on reload), never per connection.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import warnings
from pathlib import Path

from relaygate.config.model import Config, ReceiveConnector

__all__ = ["ensure_self_signed", "server_context"]

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def ensure_self_signed(data_dir: Path, fqdn: str) -> tuple[Path, Path]:
    """data_dir/tls/selfsigned.{crt,key}, created (key mode 0600) when absent."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = data_dir / "tls"
    cert_path, key_path = folder / "selfsigned.crt", folder / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, fqdn[:64])])
    now = dt.datetime.now(dt.UTC)
    alt: list[x509.GeneralName] = [x509.DNSName(fqdn)]
    try:
        alt.append(x509.IPAddress(ipaddress.ip_address(fqdn)))
    except ValueError:
        pass
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .sign(key, hashes.SHA256())
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def server_context(config: Config, connector: ReceiveConnector) -> ssl.SSLContext:
    cert, key = connector.tls_certificate_file, connector.tls_key_file
    if cert is None:
        cert, key = config.server.tls_certificate_file, config.server.tls_key_file
    if cert is None or key is None:
        cert, key = ensure_self_signed(config.server.data_dir, config.server.fqdn)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = _VERSIONS[connector.tls_min_version]
    if version < ssl.TLSVersion.TLSv1_2:
        # Old printers: allow TLS 1.0/1.1, which OpenSSL's default security level 2 forbids.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLSv1/TLSv1_1 are deprecated names; the admin chose them
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
    ctx.load_cert_chain(str(cert), str(key))
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx
