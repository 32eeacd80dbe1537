"""Entra ID certificate credentials: the client assertion of the client-credentials grant.

Organisations that forbid client secrets on app registrations upload a certificate instead. The
token request then carries ``client_assertion_type=urn:ietf:params:oauth:client-assertion-type:
jwt-bearer`` and ``client_assertion``, a JWT (Microsoft identity platform, "certificate
credentials"; RFC 7523):

* header ``alg`` PS256 (RSASSA-PSS with SHA-256, salt as long as the hash: RFC 7518 3.5; the page
  says it "Should be PS256", and msal signs its own so for Entra ID), ``typ`` JWT, ``x5t#S256``
  (base64url SHA-256 of the certificate's DER) and ``x5t`` (the SHA-1 one, which Entra ID also
  accepts);
* claims ``aud`` = the tenant's token endpoint, ``iss`` = ``sub`` = the client (application) id,
  ``jti`` unique, ``nbf`` = ``iat`` = now, ``exp`` ten minutes later.

The credential is a PEM file holding the certificate and its private key (as ``openssl pkcs12
-nodes`` writes it), or the certificate alone with the key in ``oauth_client_key_file``. The key is
RSA and not encrypted (protect the file as the secret file would be). :func:`load_certificate_credential`
checks that the key is the certificate's; its errors name the file and the problem, never the key.
"""

from __future__ import annotations

import base64
import json
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "ASSERTION_LIFETIME",
    "CLIENT_ASSERTION_TYPE",
    "CertificateCredential",
    "CertificateCredentialError",
    "load_certificate_credential",
    "sign_client_assertion",
]

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
#: exp - iat of an assertion (Microsoft's examples use ten minutes).
ASSERTION_LIFETIME = 600
#: A PEM private key block: PKCS#8 ("PRIVATE KEY", "ENCRYPTED PRIVATE KEY") or PKCS#1 ("RSA ...").
_PRIVATE_KEY_PEM = re.compile(
    rb"-----BEGIN ((?:ENCRYPTED |RSA |EC )?)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
    re.DOTALL,
)


class CertificateCredentialError(ValueError):
    """The certificate credential cannot be used; the text names the file and the problem."""


@dataclass(frozen=True)
class CertificateCredential:
    """A loaded certificate credential: what the assertion's header and signature need."""

    certificate_file: Path
    x5t_s256: str  # base64url SHA-256 of the DER certificate
    x5t: str  # base64url SHA-1 of it
    not_after: datetime
    subject: str
    private_key: Any = field(repr=False, compare=False)  # an RSAPrivateKey


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _read(path: Path, key_name: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CertificateCredentialError(
            f"{key_name} {str(path)!r}: cannot read: {exc.strerror or exc}"
        ) from None


def load_certificate_credential(
    certificate_file: Path | str,
    key_file: Path | str | None = None,
    *,
    certificate_key: str = "oauth_client_certificate_file",
    key_key: str = "oauth_client_key_file",
) -> CertificateCredential:
    """Read and check a certificate credential (blocking: call it from a thread). The first
    certificate of the file is the one registered with Entra ID (a chain may follow it)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key

    cert_path = Path(certificate_file)
    raw = _read(cert_path, certificate_key)
    where = f"{certificate_key} {str(cert_path)!r}"
    try:
        certificate = x509.load_pem_x509_certificates(raw)[0]
    except (ValueError, IndexError):
        hint = (
            ""
            if b"-----BEGIN" in raw
            else " (it is not PEM: a .pfx/.p12 or DER .cer? convert it with "
            "openssl pkcs12 -in app.pfx -nodes -out app.pem, or openssl x509 -inform der)"
        )
        raise CertificateCredentialError(
            f"{where}: holds no PEM certificate (-----BEGIN CERTIFICATE-----){hint}"
        ) from None
    if key_file is not None:
        key_path = Path(key_file)
        key_raw, key_where = _read(key_path, key_key), f"{key_key} {str(key_path)!r}"
    else:
        key_raw, key_where = raw, where
    match = _PRIVATE_KEY_PEM.search(key_raw)
    key: Any = None
    if match is not None:
        block = match.group(0)
        if match.group(1) == b"ENCRYPTED " or b"Proc-Type: 4,ENCRYPTED" in block:
            raise CertificateCredentialError(
                f"{key_where}: the private key is encrypted; RelayGate needs it without a "
                "passphrase (openssl pkey -in key.pem -out plain.pem)"
            )
        try:
            key = load_pem_private_key(block, password=None)
        except Exception as exc:  # ValueError, TypeError, UnsupportedAlgorithm
            raise CertificateCredentialError(
                f"{key_where}: the private key cannot be loaded ({type(exc).__name__})"
            ) from None
    if key is None:
        hint = "" if key_file is not None else f" (or give it in {key_key})"
        raise CertificateCredentialError(
            f"{key_where}: holds no PEM private key (-----BEGIN PRIVATE KEY-----){hint}"
        )
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CertificateCredentialError(
            f"{key_where}: the private key is not an RSA key (Entra ID's PS256 needs one)"
        )
    public = certificate.public_key()
    if not isinstance(public, rsa.RSAPublicKey) or (
        public.public_numbers() != key.public_key().public_numbers()
    ):
        raise CertificateCredentialError(
            f"{key_where}: the private key does not belong to the certificate in {where}"
        )
    der = certificate.public_bytes(Encoding.DER)
    sha256, sha1 = hashes.Hash(hashes.SHA256()), hashes.Hash(hashes.SHA1())
    sha256.update(der)
    sha1.update(der)
    return CertificateCredential(
        certificate_file=cert_path,
        x5t_s256=_b64(sha256.finalize()),
        x5t=_b64(sha1.finalize()),
        not_after=certificate.not_valid_after_utc,
        subject=certificate.subject.rfc4514_string(),
        private_key=key,
    )


def sign_client_assertion(
    credential: CertificateCredential, *, client_id: str, audience: str, now: float
) -> str:
    """The PS256 client assertion for one token request (a new jti each time)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = {"alg": "PS256", "typ": "JWT", "x5t#S256": credential.x5t_s256, "x5t": credential.x5t}
    issued = int(now)
    claims = {
        "aud": audience,
        "iss": client_id,
        "sub": client_id,
        "jti": str(uuid.uuid4()),
        "nbf": issued,
        "iat": issued,
        "exp": issued + ASSERTION_LIFETIME,
    }
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = credential.private_key.sign(
        signing_input.encode("ascii"),
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH),
        hashes.SHA256(),
    )
    return signing_input + "." + _b64(signature)
