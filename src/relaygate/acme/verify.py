"""What the CA returned, checked before it is installed (:func:`check_issued`): the chain parses,
its leaf names every ordered name, holds the key the CSR was made with, is valid now (a notBefore
up to CLOCK_SKEW ahead is taken) and not already due for renewal, and each certificate of the
chain is signed by the next.

Kept apart because it is the one gate between the CA's answer and the listeners: the manager
calls it before it writes a file or swaps a TLS context, and a refusal (:class:`CertificateRefused`,
an :class:`AcmeError`) takes the failure path (logged, retried with back-off; the listeners keep
the certificate they have). The renewal rule (:func:`renewal_time`) is here too, as the manager's
``due`` and this check must agree on it: a certificate installed must not be due at once.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from relaygate.acme.protocol import AcmeError

#: The checks, in the order they are made (the name a refusal carries).
CHECKS = ("pem", "names", "key", "validity", "renewal", "chain")

#: How far ahead of this host's clock a notBefore may be: a CA that does not backdate it, and
#: a clock a little behind the CA's, must not have every certificate refused (and ordered anew
#: at each retry, against the CA's rate limits). Clients check notBefore by their own clocks.
CLOCK_SKEW = timedelta(minutes=10)


class CertificateRefused(AcmeError):
    """The CA's certificate failed `check` (one of CHECKS): it is not installed."""

    def __init__(self, check: str, detail: str) -> None:
        super().__init__(f"the CA's certificate was refused ({check} check): {detail}")
        self.check = check
        self.detail = detail


def normalise(name: str) -> str:
    """A DNS name as the CA and the certificate write it: lower case, no final dot."""
    return name.lower().rstrip(".")


def parse_chain(chain_pem: bytes) -> list[Any]:
    """The certificates of a PEM chain, leaf first; CertificateRefused("pem") if there is none
    or one does not parse."""
    from cryptography import x509

    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
    except ValueError as exc:
        shown = chain_pem[:60].decode("ascii", "backslashreplace")
        raise CertificateRefused(
            "pem", f"not a PEM certificate chain ({exc}; it begins {shown!r})"
        ) from exc
    if not chain:  # (load_pem_x509_certificates raises first; kept for safety)
        raise CertificateRefused("pem", "no certificate in the CA's answer")
    return chain


def dns_names(cert: Any) -> set[str]:
    """The dNSName subjectAltNames of `cert`, normalised (none: an empty set)."""
    from cryptography import x509

    with contextlib.suppress(x509.ExtensionNotFound):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return {normalise(n) for n in san.get_values_for_type(x509.DNSName)}
    return set()


def renewal_time(cert: Any, renew_before: timedelta) -> datetime:
    """When `cert` is due for renewal: ``renew_before`` ahead of its notAfter, or two thirds of
    its life ahead if that is shorter (a CA's short-lived certificates, step-ca's 24 hours, are
    not ordered anew at every check)."""
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    return cert.not_valid_after_utc - min(renew_before, lifetime * 2 / 3)


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _who(cert: Any) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number:x}"


def check_issued(
    chain_pem: bytes,
    key_pem: bytes,
    domains: Iterable[str],
    *,
    renew_before: timedelta | None,
    now: datetime | None = None,
) -> Any:
    """The leaf of `chain_pem` if the chain may be installed with the private key `key_pem` for
    `domains`; else CertificateRefused naming the check. `renew_before` None: no renewal check
    (a certificate another node of the cluster obtained: that node renews it)."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    chain = parse_chain(chain_pem)
    leaf = chain[0]
    wanted = {normalise(d) for d in domains}
    names = dns_names(leaf)
    missing = sorted(wanted - names)
    if missing:
        raise CertificateRefused(
            "names",
            f"the certificate does not name {', '.join(missing)} "
            f"(its DNS names: {', '.join(sorted(names)) or 'none'})",
        )
    try:
        private = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # ours, not the CA's: still nothing to install
        raise CertificateRefused("key", f"the certificate's key cannot be read: {exc}") from exc
    if _spki(leaf.public_key()) != _spki(private.public_key()):
        raise CertificateRefused(
            "key", "the certificate is for another public key than the one the CSR was made with"
        )
    now = now or datetime.now(UTC)
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    stamp = "%Y-%m-%d %H:%M:%SZ"
    if not start - CLOCK_SKEW <= now < end:
        raise CertificateRefused(
            "validity",
            f"the certificate is valid from {start:{stamp}} to {end:{stamp}}, "
            f"not now ({now:{stamp}})",
        )
    if renew_before is not None and renewal_time(leaf, renew_before) <= now:
        raise CertificateRefused(
            "renewal",
            f"the certificate expires {end:{stamp}}, already within acme_renew_before "
            "(it would be ordered anew at once)",
        )
    for i, (cert, issuer) in enumerate(itertools.pairwise(chain)):
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as exc:
            why = str(exc) or "bad signature"
            raise CertificateRefused(
                "chain",
                f"certificate {i + 1} of the chain ({_who(cert)}) is not signed by certificate "
                f"{i + 2} ({_who(issuer)}): {why}",
            ) from exc
    return leaf
