"""The certificates RelayGate holds, and when each expires.

An expired certificate is a classic outage: the listener's (clients refuse STARTTLS, or an
implicit-TLS port stops working), a send connector's client certificate (a Microsoft 365 connector
that recognises the relay by it stops accepting its mail), or an Entra ID certificate credential (no
token: everything through the connector waits in the queue). :func:`certificate_refs` lists them from
the configuration, :func:`read_expiries` reads each file's notAfter (blocking: at start, on reload and
in `relaygate audit`, never per message or per scrape); the audit's findings
(``relaygate.audit.certificate_findings``) and the metric
``relaygate_certificate_expiry_timestamp_seconds`` are made from the result.

The date is the first certificate's of the file (the leaf: what the peer checks first). A file that
cannot be read or parsed has no date here: `relaygate check` reports it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ADMIN_LISTENER",
    "CertificateExpiry",
    "CertificateRef",
    "certificate_refs",
    "read_expiries",
    "read_not_after",
]

log = logging.getLogger(__name__)

#: `use` of each kind of certificate (the metric's label; README "Certificate expiry").
LISTENER = "listener"  # server.tls_certificate_file, a receive connector's own
SMTP_CLIENT = "smtp_client"  # a send connector's tls_certificate_file
ENTRA_CREDENTIAL = "entra_credential"  # a send connector's oauth_client_certificate_file
ADMIN_LISTENER = "admin_listener"  # admin.tls_certificate_file (HTTPS on the admin listener)


@dataclass(frozen=True, slots=True)
class CertificateRef:
    """A certificate file of the configuration. `name`: the server's name (server-wide) or the
    connector's; `connector`: "" for the server-wide one, else how the audit names the connector;
    `key`: the config key, indexed as `check` names it."""

    use: str
    name: str
    connector: str
    key: str
    file: Path


@dataclass(frozen=True, slots=True)
class CertificateExpiry:
    """A certificate file and its notAfter (UTC, timezone-aware)."""

    ref: CertificateRef
    not_after: datetime

    @property
    def timestamp(self) -> float:
        return self.not_after.timestamp()


def _entra_credential(s: Any) -> bool:
    return s.delivery_method == "Graph" or (
        s.smart_host_auth_mechanism == "XOAUTH2" and s.oauth_provider == "entra"
    )


def _offers_tls(c: Any) -> bool:
    """An enabled receive connector with 'Tls' in auth_mechanism (STARTTLS, or implicit TLS,
    which needs it too): the only ones a listener certificate serves."""
    return bool(c.enabled and "Tls" in c.auth_mechanism)


def certificate_refs(config: Any) -> list[CertificateRef]:
    """Every certificate file the running relay uses: the server's listener certificate (while an
    enabled receive connector with TLS has none of its own: it is theirs), the own one of the
    enabled receive connectors with TLS ('Tls' in auth_mechanism: STARTTLS or implicit TLS), the
    enabled send connectors' client certificates (SMTP delivery), Entra ID certificate
    credentials, and the admin listener's (while the admin centre is enabled)."""
    refs: list[CertificateRef] = []
    server = config.server
    if server.tls_certificate_file is not None and any(
        _offers_tls(c) and c.tls_certificate_file is None for c in config.receive_connectors
    ):
        refs.append(
            CertificateRef(
                LISTENER, str(server.name), "", "server.tls_certificate_file",
                Path(server.tls_certificate_file),
            )
        )  # fmt: skip
    if getattr(server, "acme_directory_url", ""):
        from relaygate.acme import acme_files

        acme_cert, _key = acme_files(Path(server.data_dir))
        if acme_cert.exists():  # none yet: the audit's acme-certificate-missing says so
            refs.append(
                CertificateRef(
                    LISTENER, str(server.name), "", "server.acme_directory_url", acme_cert
                )
            )
    for i, c in enumerate(config.receive_connectors):
        if _offers_tls(c) and c.tls_certificate_file is not None:
            refs.append(
                CertificateRef(
                    LISTENER, c.name, c.name, f"receive_connectors[{i}].tls_certificate_file",
                    Path(c.tls_certificate_file),
                )
            )  # fmt: skip
    for i, s in enumerate(config.send_connectors):
        if not s.enabled:
            continue
        where = f'send connector "{s.name}"'
        if s.tls_certificate_file is not None and s.delivery_method != "Graph":
            refs.append(
                CertificateRef(
                    SMTP_CLIENT, s.name, where, f"send_connectors[{i}].tls_certificate_file",
                    Path(s.tls_certificate_file),
                )
            )  # fmt: skip
        if s.oauth_client_certificate_file is not None and _entra_credential(s):
            refs.append(
                CertificateRef(
                    ENTRA_CREDENTIAL, s.name, where,
                    f"send_connectors[{i}].oauth_client_certificate_file",
                    Path(s.oauth_client_certificate_file),
                )
            )  # fmt: skip
    admin = getattr(config, "admin", None)
    if admin is not None and admin.enabled and admin.tls_certificate_file is not None:
        refs.append(
            CertificateRef(
                ADMIN_LISTENER, str(server.name), "", "admin.tls_certificate_file",
                Path(admin.tls_certificate_file),
            )
        )  # fmt: skip
    return refs


def read_not_after(path: Path) -> datetime:
    """The notAfter of the file's first PEM certificate. OSError / ValueError when it has none."""
    from cryptography import x509

    certificates = x509.load_pem_x509_certificates(Path(path).read_bytes())
    return certificates[0].not_valid_after_utc


def read_expiries(config: Any) -> tuple[CertificateExpiry, ...]:
    """The notAfter of every certificate of :func:`certificate_refs` (blocking: file reads). A file
    that cannot be read or holds no certificate is left out, logged (`check` names it)."""
    out: list[CertificateExpiry] = []
    for ref in certificate_refs(config):
        try:
            out.append(CertificateExpiry(ref, read_not_after(ref.file)))
        except (OSError, ValueError) as exc:
            log.warning(
                "certificate expiry unknown: %s (%s) %s: %s",
                ref.key,
                ref.name,
                ref.file,
                getattr(exc, "strerror", None) or type(exc).__name__,
            )
    return tuple(out)
