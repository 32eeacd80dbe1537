"""The ACME client proper (RFC 8555): the account key, JWS ES256 signing, nonces, and one order
from newOrder through the HTTP-01 challenges to the certificate (:class:`AcmeClient`).

Kept apart because it is the protocol, and nothing else: it knows neither when to order (the
manager) nor where the files go beyond the account key it is handed. Blocking; httpx and
cryptography only.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from relaygate.acme.files import write_private
from relaygate.acme.responder import ChallengeResponder

#: One HTTP request to the CA; one order from newOrder to the certificate.
REQUEST_TIMEOUT = 15.0
ORDER_TIMEOUT = 120.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class AcmeError(Exception):
    """An order failed; the message carries the CA's problem document (RFC 8555 §6.7) when it
    sent one, else what went wrong on the way (connection, timeout). `retry_after`: the seconds
    the CA asked to wait before the next request (its Retry-After: a rate limit, §6.6, or a
    CA down for maintenance), None if it did not say."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """A Retry-After header (RFC 9110 §10.2.3: seconds, or an HTTP date) in seconds from now;
    None if absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # (an HTTP date is GMT)
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def _problem(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if not isinstance(doc, dict):
        return f"HTTP {response.status_code}"
    parts = [f"{doc.get('type', 'error')}: {doc.get('detail', '')}".strip()]
    for sub in doc.get("subproblems") or ():
        if isinstance(sub, dict):
            who = (sub.get("identifier") or {}).get("value", "")
            parts.append(f"{who}: {sub.get('type', '')}: {sub.get('detail', '')}")
    return f"HTTP {response.status_code} " + "; ".join(parts)


# ----------------------------------------------------------------------------- keys and JWS


def _load_or_create_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(path, _key_pem(key))
    return key


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _jwk(key: Any) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def _thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without white space."""
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return _b64(hashlib.sha256(canonical).digest())


def _sign_es256(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate obtained: its chain (PEM, leaf first) and key (PEM), the leaf's serial and
    notAfter."""

    chain_pem: bytes
    key_pem: bytes
    serial: int
    not_after: datetime


class AcmeClient:
    """One ACME account at one CA (blocking; run in the manager's thread)."""

    def __init__(
        self,
        directory_url: str,
        account_key: Any,
        *,
        email: str = "",
        ca_file: Path | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        #: set when the relay stops: a pending order gives up at its next poll
        self.stop = stop or threading.Event()
        self.directory_url = directory_url
        self.key = account_key
        self.jwk = _jwk(account_key)
        self.email = email
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self.http = httpx.Client(
            verify=verify,
            timeout=REQUEST_TIMEOUT,
            headers={"User-Agent": "RelayGate-ACME"},
            follow_redirects=False,
        )
        self.directory: dict[str, Any] = {}
        self.kid = ""
        self._nonce = ""

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise AcmeError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        nonce = response.headers.get("Replay-Nonce")
        if nonce:
            self._nonce = nonce
        return response

    def _new_nonce(self) -> str:
        if self._nonce:
            nonce, self._nonce = self._nonce, ""
            return nonce
        response = self._request("HEAD", self.directory["newNonce"])
        nonce, self._nonce = self._nonce, ""
        if not nonce:
            raise AcmeError(f"newNonce: no Replay-Nonce (HTTP {response.status_code})")
        return nonce

    def post(self, url: str, payload: Any, *, jwk: bool = False) -> httpx.Response:
        """A JWS-signed POST (payload None: POST-as-GET), retried on badNonce (RFC 8555 §6.5)."""
        for _attempt in range(5):
            protected: dict[str, Any] = {"alg": "ES256", "nonce": self._new_nonce(), "url": url}
            if jwk:
                protected["jwk"] = self.jwk
            else:
                protected["kid"] = self.kid
            body64 = "" if payload is None else _b64(json.dumps(payload).encode())
            head64 = _b64(json.dumps(protected).encode())
            signature = _sign_es256(self.key, f"{head64}.{body64}".encode("ascii"))
            response = self._request(
                "POST",
                url,
                content=json.dumps(
                    {"protected": head64, "payload": body64, "signature": _b64(signature)}
                ),
                headers={"Content-Type": "application/jose+json"},
            )
            if response.status_code == 400 and "badNonce" in response.text:
                continue
            if response.status_code >= 400:
                raise AcmeError(
                    f"{url}: {_problem(response)}",
                    retry_after=retry_after_seconds(response.headers.get("Retry-After")),
                )
            return response
        raise AcmeError(f"{url}: the CA refused five nonces in a row (badNonce)")

    def register(self) -> None:
        response = self._request("GET", self.directory_url)
        if response.status_code != 200:
            raise AcmeError(
                f"directory {self.directory_url}: {_problem(response)}",
                retry_after=retry_after_seconds(response.headers.get("Retry-After")),
            )
        try:
            self.directory = response.json()
            self.directory["newNonce"], self.directory["newAccount"], self.directory["newOrder"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AcmeError(f"directory {self.directory_url}: not an ACME directory") from exc
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if self.email:
            payload["contact"] = [f"mailto:{self.email}"]
        response = self.post(self.directory["newAccount"], payload, jwk=True)
        self.kid = response.headers.get("Location", "")
        if not self.kid:
            raise AcmeError("newAccount: the CA gave no account URL")

    def _poll(self, url: str, done: Callable[[dict[str, Any]], bool], deadline: float) -> Any:
        while True:
            response = self.post(url, None)
            doc = response.json()
            if done(doc):
                return doc
            if time.monotonic() >= deadline:
                raise AcmeError(f"{url}: still {doc.get('status')!r} after {ORDER_TIMEOUT:.0f} s")
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            if self.stop.wait(min(max(wait, 0.2), 5.0, max(0.0, deadline - time.monotonic()))):
                raise AcmeError("the relay is stopping: order abandoned")

    def order(self, domains: tuple[str, ...], responder: ChallengeResponder) -> Issued:
        """newOrder → HTTP-01 for each authorization → finalize with a new key → the chain."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        deadline = time.monotonic() + ORDER_TIMEOUT
        identifiers = [{"type": "dns", "value": d} for d in domains]
        response = self.post(self.directory["newOrder"], {"identifiers": identifiers})
        order_url = response.headers.get("Location", "")
        order = response.json()
        thumbprint = _thumbprint(self.jwk)
        for authz_url in order.get("authorizations", ()):
            authz = self.post(authz_url, None).json()
            name = (authz.get("identifier") or {}).get("value", "?")
            if authz.get("status") == "valid":
                continue
            challenge = next(
                (c for c in authz.get("challenges", ()) if c.get("type") == "http-01"), None
            )
            if challenge is None:
                raise AcmeError(f"{name}: the CA offers no http-01 challenge")
            token = str(challenge["token"])
            responder.add(token, f"{token}.{thumbprint}")
            self.post(challenge["url"], {})
            authz = self._poll(
                authz_url, lambda a: a.get("status") not in ("pending", "processing"), deadline
            )
            if authz.get("status") != "valid":
                errors = [
                    c.get("error") for c in authz.get("challenges", ()) if c.get("error")
                ] or [authz.get("error")]
                detail = "; ".join(
                    f"{e.get('type', '')}: {e.get('detail', '')}"
                    for e in errors
                    if isinstance(e, dict)
                )
                raise AcmeError(
                    f"{name}: authorization {authz.get('status')}: {detail or 'no detail'}"
                )
        key = ec.generate_private_key(ec.SECP256R1())
        # The CN: the first name that fits one (ub-common-name 64), else none (the SANs are
        # what counts; a truncated name would be one more identifier the CA refuses).
        cn = next((d for d in domains if len(d) <= 64), None)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name(subject))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        der = csr.public_bytes(serialization.Encoding.DER)
        order = self.post(order["finalize"], {"csr": _b64(der)}).json()
        if order.get("status") != "valid":
            if not order_url:
                raise AcmeError("newOrder: the CA gave no order URL")
            order = self._poll(
                order_url, lambda o: o.get("status") not in ("pending", "processing", "ready"),
                deadline,
            )  # fmt: skip
        if order.get("status") != "valid" or not order.get("certificate"):
            raise AcmeError(
                f"order {order.get('status')}: {order.get('error') or 'no certificate'}"
            )
        response = self.post(order["certificate"], None)
        chain = response.content
        from relaygate.acme.verify import parse_chain

        leaf = parse_chain(chain)[0]  # the other checks: the manager's, before it installs
        return Issued(chain, _key_pem(key), leaf.serial_number, leaf.not_valid_after_utc)
