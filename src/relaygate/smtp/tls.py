"""Server TLS: certificate per connector or per server, a self-signed one generated on first start.

Contexts are built once per connector at start (and on reload), never per connection.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import logging
import os
import ssl
import warnings
from pathlib import Path

from relaygate.config.model import Config, ReceiveConnector
from relaygate.file_modes import mode_granting

__all__ = [
    "AcmePending",
    "ensure_self_signed",
    "key_mode_warning",
    "listener_files",
    "server_context",
]

logger = logging.getLogger("relaygate.smtp")

_VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1,
    "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2,
    "1.3": ssl.TLSVersion.TLSv1_3,
}


def ensure_self_signed(data_dir: Path, fqdn: str) -> tuple[Path, Path]:
    """data_dir/tls/selfsigned.{crt,key}, created (key mode 0600) when absent."""
    folder = data_dir / "tls"
    cert_path, key_path = folder / "selfsigned.crt", folder / "selfsigned.key"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    folder.mkdir(parents=True, exist_ok=True)
    # Workers start at once: without the lock two of them could each write a key and a
    # certificate, leaving one's key beside the other's certificate (seen in 6 of 40 runs).
    with open(folder / ".selfsigned.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (cert_path.exists() and key_path.exists()):
            _write_self_signed(cert_path, key_path, fqdn)
    return cert_path, key_path


def _write_self_signed(cert_path: Path, key_path: Path, fqdn: str) -> None:
    """A new key and certificate, each written to a temporary file and renamed into place, the
    key first: a reader that finds the certificate finds its key."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

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
    pem_key = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_replace(key_path, pem_key, 0o600)
    _write_replace(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _write_replace(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class AcmePending(OSError):
    """server.acme_directory_url is set and no certificate has been obtained yet: STARTTLS is
    not offered (an implicit-TLS listener uses the self-signed certificate meanwhile)."""

    def __init__(self, config: Config, connector: ReceiveConnector) -> None:
        super().__init__(
            f'receive connector "{connector.name}": no ACME certificate obtained yet from '
            f"{config.server.acme_directory_url} (server.acme_directory_url): STARTTLS not offered"
        )

    def __str__(self) -> str:
        return str(self.args[0])


#: `listener_files`' sources
CONNECTOR, SERVER, ACME, SELF_SIGNED = "connector", "server", "acme", "self-signed"


def listener_files(
    config: Config, connector: ReceiveConnector, *, implicit: bool = False
) -> tuple[Path, Path, str] | None:
    """The certificate and key `connector` presents, and where they come from: its own files,
    the server's, the ACME certificate, or the self-signed one (not created here). None: ACME is
    on and has no certificate yet (an implicit-TLS listener then takes the self-signed one)."""
    if connector.tls_certificate_file is not None and connector.tls_key_file is not None:
        return connector.tls_certificate_file, connector.tls_key_file, CONNECTOR
    s = config.server
    if s.tls_certificate_file is not None and s.tls_key_file is not None:
        return s.tls_certificate_file, s.tls_key_file, SERVER
    if s.acme_directory_url:
        from relaygate.acme import acme_files

        cert, key = acme_files(Path(s.data_dir))
        if cert.exists() and key.exists():
            return cert, key, ACME
        if not implicit:
            return None
    folder = Path(s.data_dir) / "tls"
    return folder / "selfsigned.crt", folder / "selfsigned.key", SELF_SIGNED


def server_context(
    config: Config, connector: ReceiveConnector, *, implicit: bool = False
) -> ssl.SSLContext:
    """The TLS context of `connector` (`implicit`: for its implicit-TLS socket). AcmePending
    (an OSError) when ACME has no certificate yet for a STARTTLS connector."""
    files = listener_files(config, connector, implicit=implicit)
    if files is None:
        raise AcmePending(config, connector)
    cert, key, source = files
    if source == SELF_SIGNED:
        cert, key = ensure_self_signed(config.server.data_dir, config.server.fqdn)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    version = _VERSIONS[connector.tls_min_version]
    if version < ssl.TLSVersion.TLSv1_2:
        # Old printers: allow TLS 1.0/1.1, which OpenSSL's default security level 2 forbids.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():  # TLSv1/TLSv1_1 are deprecated names; the admin chose them
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = version
    if source == ACME:  # the two files are replaced together under this lock (relaygate.acme)
        from relaygate.acme import files_lock

        with files_lock(Path(config.server.data_dir), exclusive=False):
            ctx.load_cert_chain(str(cert), str(key))
    else:
        ctx.load_cert_chain(str(cert), str(key))
    ctx.options |= ssl.OP_NO_COMPRESSION
    if (warning := key_mode_warning(key, connector)) is not None:
        logger.warning("%s", warning)  # used, not refused: refusing would leave mail in clear
    return ctx


def key_mode_warning(key: Path, connector: ReceiveConnector) -> str | None:
    """A warning when the TLS key file is readable or writable by every local user (a copy keeps
    `cp`'s 0644): any of them can then pose as the relay to its clients, and read what they send
    with cipher suites without forward secrecy. Group access is left alone (0640
    root:relaygate, the packaged layout). None otherwise, or when it cannot be examined."""
    mode = mode_granting(key, 0o007)
    if mode is None:
        return None
    return (
        f'receive connector "{connector.name}": TLS key {key} has mode {mode:04o}: every local '
        f"user can read the private key and pose as the relay to its clients; chmod o-rwx {key}"
    )
