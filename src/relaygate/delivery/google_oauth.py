"""OAuth 2.0 access tokens for SMTP AUTH XOAUTH2 to Google Workspace, with a service account.

A send connector with ``smart_host_auth_mechanism = "XOAUTH2"`` and ``oauth_provider = "google"``
signs in as a Google Cloud service account to which the Workspace administrator has granted
domain-wide delegation for ``https://mail.google.com/``. Google's "OAuth 2.0 for Server to Server
Applications" (the JWT bearer grant, RFC 7523):

* a JWT signed RS256 with the service account's private key (header ``kid`` = ``private_key_id``),
  claims ``iss`` = ``client_email``, ``scope``, ``aud`` = ``token_uri``, ``iat`` and ``exp`` (one hour
  later, Google's maximum) and ``sub`` = the mailbox impersonated (the connector's ``auth_username``,
  which is also the XOAUTH2 user);
* ``POST token_uri`` with ``grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer&assertion=<JWT>``
  over HTTPS (certificates verified: the system store, or the connector's ``tls_ca_file``);
* ``{"access_token": ..., "expires_in": 3599}`` back: kept until shortly before it expires, so one
  token serves every delivery of the connector for about an hour.

The key file (``oauth_service_account_file``, the JSON key as Google Cloud issues it) is read for
each new token, so a rotated key is used without a restart. One token request at a time per
connector; reading the file and signing run in a worker thread, the HTTP request on httpx's async
client. Failures become :class:`TokenError` with Google's ``error`` and the first line of its
``error_description``: never the private key, never the assertion.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from relaygate.delivery.oauth import SharedFailure, TokenError

__all__ = [
    "GOOGLE_SCOPE",
    "GOOGLE_TOKEN_URI",
    "GoogleTokenProvider",
    "ServiceAccount",
    "ServiceAccountError",
    "load_service_account",
    "read_client_email",
]

log = logging.getLogger(__name__)

GOOGLE_SCOPE = "https://mail.google.com/"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
#: Google refuses an assertion whose exp is more than an hour after its iat.
ASSERTION_LIFETIME = 3600
#: A token response is a few hundred bytes; more is not read.
MAX_RESPONSE_OCTETS = 64 * 1024
_REQUIRED = ("type", "client_email", "private_key", "private_key_id", "token_uri")


class ServiceAccountError(ValueError):
    """The key file cannot be used; the text names the file and the problem, never the key."""


@dataclass(frozen=True)
class ServiceAccount:
    client_email: str
    private_key_id: str
    token_uri: str
    private_key: Any = field(repr=False, compare=False)  # an RSAPrivateKey


def load_service_account(path: Path | str) -> ServiceAccount:
    """Read and check a service account's JSON key file (blocking: call it from a thread)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ServiceAccountError(f"cannot read {where!r}: {exc.strerror or exc}") from None
    try:
        info = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ServiceAccountError(
            f"{where!r} is not JSON (expected a service account key file from Google Cloud)"
        ) from None
    if not isinstance(info, dict):
        raise ServiceAccountError(f"{where!r} is not a JSON object")
    missing = [k for k in _REQUIRED if not isinstance(info.get(k), str) or not info.get(k)]
    if missing:
        raise ServiceAccountError(f"{where!r} lacks {', '.join(missing)}")
    if info["type"] != "service_account":
        raise ServiceAccountError(
            f"{where!r} has type {info['type']!r}, not 'service_account' (an OAuth client or a "
            "user's credentials cannot use domain-wide delegation)"
        )
    if "@" not in info["client_email"]:
        raise ServiceAccountError(f"{where!r}: client_email is not an address")
    url = urlsplit(info["token_uri"])
    if url.scheme != "https" or not url.hostname:
        raise ServiceAccountError(
            f"{where!r}: token_uri {info['token_uri']!r} must be an https:// URL "
            "(the signed assertion is sent there)"
        )
    try:
        key = load_pem_private_key(info["private_key"].encode(), password=None)
    except Exception as exc:  # ValueError, TypeError, UnsupportedAlgorithm
        raise ServiceAccountError(
            f"{where!r}: private_key is not a PEM private key without a password "
            f"({type(exc).__name__})"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ServiceAccountError(f"{where!r}: private_key is not an RSA key (RS256 needs one)")
    return ServiceAccount(
        client_email=info["client_email"],
        private_key_id=info["private_key_id"],
        token_uri=info["token_uri"],
        private_key=key,
    )


def read_client_email(path: Path | str | None) -> str:
    """The key file's client_email for display (`explain`, `send-connector list`), "" if unreadable.
    Only the JSON is parsed: the private key is not loaded."""
    if path is None:
        return ""
    try:
        info = json.loads(Path(path).read_bytes())
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    email = info.get("client_email") if isinstance(info, dict) else None
    return email if isinstance(email, str) else ""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def sign_assertion(account: ServiceAccount, *, subject: str, scope: str, now: float) -> str:
    """The RS256 JWT of the jwt-bearer grant."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    header = {"alg": "RS256", "typ": "JWT", "kid": account.private_key_id}
    iat = int(now)
    claims = {
        "iss": account.client_email,
        "scope": scope,
        "aud": account.token_uri,
        "iat": iat,
        "exp": iat + ASSERTION_LIFETIME,
        "sub": subject,
    }
    signing_input = (
        _b64(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64(json.dumps(claims, separators=(",", ":")).encode())
    )
    signature = account.private_key.sign(
        signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
    )
    return signing_input + "." + _b64(signature)


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


def _first_line(value: Any, limit: int = 200) -> str:
    lines = str(value or "").strip().splitlines()
    text = "".join(ch if ch.isprintable() else " " for ch in (lines[0] if lines else ""))
    return text if len(text) <= limit else text[: limit - 3] + "..."


class GoogleTokenProvider:
    """``await provider()`` → an access token for the service account acting as `subject`."""

    def __init__(
        self,
        *,
        connector_name: str,
        key_file: Path,
        subject: str,
        scope: str = GOOGLE_SCOPE,
        ca_file: Path | None = None,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.connector_name = connector_name
        self.key_file = key_file
        self.subject = subject
        self.scope = scope
        self.ca_file = ca_file
        self.timeout = timeout
        self._clock = clock  # wall time: the JWT's iat/exp, and the cached token's expiry
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self._waits = SharedFailure()
        self.requests = 0  # tokens asked of the token endpoint, for the tests and /metrics

    @classmethod
    def from_connector(cls, connector: Any, *, scope: str | None = None) -> GoogleTokenProvider:
        return cls(
            connector_name=str(connector.name),
            key_file=Path(connector.oauth_service_account_file),
            subject=str(connector.auth_username),
            scope=scope or google_scope(connector),
            ca_file=getattr(connector, "tls_ca_file", None),
        )

    @property
    def signature(self) -> tuple[Any, ...]:
        """What the provider is built from: a reload keeps it (and its token) when unchanged."""
        return ("google", self.key_file, self.subject, self.scope, self.ca_file)

    async def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (the SMTP server refused it): the next call asks for a new one.
        With `token` (the one refused), only while it is still the cached one: deliveries refused
        the same token at once ask for one new token, not one each."""
        async with self._lock:
            if token is not None and token != self._token:
                return
            self._token = None
            self._expires_at = 0.0

    async def __call__(self) -> str:
        turn = self._waits.turn()
        async with self._lock:
            if self._token is not None and self._clock() < self._expires_at:
                return self._token
            self._waits.raise_if_failed_since(turn)
            self._token = None
            with self._waits.outcome():
                token, lifetime = await self._fetch()
            # Renewed ahead of expiry (5 minutes for Google's hour, a tenth of a shorter one):
            # a token must not run out between AUTH and the end of a long transaction.
            self._expires_at = self._clock() + lifetime - min(300.0, lifetime / 10)
            self._token = token
            return token

    async def _fetch(self) -> tuple[str, float]:
        import httpx  # imported on first use: only Google connectors need it here

        name = self.connector_name
        now = self._clock()

        def prepare() -> tuple[ServiceAccount, str, ssl.SSLContext]:
            try:
                account = load_service_account(self.key_file)
            except ServiceAccountError as exc:
                raise TokenError(
                    f"send connector {name!r}: oauth_service_account_file {exc}"
                ) from None
            assertion = sign_assertion(account, subject=self.subject, scope=self.scope, now=now)
            ca = str(self.ca_file) if self.ca_file else None
            return account, assertion, _tls_context(ca)

        # The file, the RSA signature and the trust store (~20 ms): not on the event loop.
        account, assertion, ctx = await asyncio.to_thread(prepare)
        uri = account.token_uri
        self.requests += 1
        raw = b""
        try:
            # self.timeout bounds the whole request (httpx's bounds each read: a body trickled a
            # byte at a time would hold the lock, and every delivery of the connector, forever),
            # and the body is read up to MAX_RESPONSE_OCTETS.
            async with asyncio.timeout(self.timeout):
                # trust_env: HTTPS_PROXY / NO_PROXY, as the Graph and msal requests honour them.
                async with (
                    httpx.AsyncClient(
                        verify=ctx, follow_redirects=False, trust_env=True, timeout=self.timeout
                    ) as client,
                    client.stream(
                        "POST",
                        uri,
                        data={"grant_type": JWT_BEARER, "assertion": assertion},
                        headers={"Accept": "application/json"},
                    ) as response,
                ):
                    async for chunk in response.aiter_bytes():
                        raw += chunk
                        if len(raw) > MAX_RESPONSE_OCTETS:
                            raise TokenError(
                                f"send connector {name!r}: token request to {uri} failed: "
                                f"the response is over {MAX_RESPONSE_OCTETS} bytes"
                            )
        except TimeoutError:
            raise TokenError(
                f"send connector {name!r}: token request to {uri} failed: "
                f"no complete answer within {self.timeout:g} s"
            ) from None
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
            cause: BaseException | None = exc
            while cause is not None:
                if isinstance(cause, ssl.SSLCertVerificationError):
                    reason = (
                        f"certificate validation failed: {cause.verify_message or cause.reason}"
                    )
                    break
                cause = cause.__cause__ or cause.__context__
            raise TokenError(
                f"send connector {name!r}: token request to {uri} failed: {reason}"
            ) from None
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            body = {}
        token = body.get("access_token")
        if response.status_code == 200 and isinstance(token, str) and token:
            lifetime = _lifetime(body.get("expires_in"))
            log.info(
                "send connector %r: Google access token for %s as %s (valid %d s)",
                name,
                account.client_email,
                self.subject,
                int(lifetime),
            )
            return token, lifetime
        error = _first_line(body.get("error")) or f"HTTP {response.status_code}"
        description = _first_line(body.get("error_description"))
        raise TokenError(
            f"send connector {name!r}: {uri} refused the token request for "
            f"{account.client_email} as {self.subject}: {error}"
            + (f" ({description})" if description else "")
        )


def _lifetime(expires_in: Any) -> float:
    """A token response's expires_in as seconds between 0 and a day: Google's hour when it is
    missing or not a finite number (NaN, which json reads, would make every comparison false)."""
    try:
        lifetime = float(expires_in if expires_in is not None else 3600)
    except (TypeError, ValueError):
        lifetime = 3600.0
    if not math.isfinite(lifetime):
        lifetime = 3600.0
    return min(max(lifetime, 0.0), 24 * 3600.0)


def google_scope(connector: Any) -> str:
    """A Google connector's token scope: oauth_scope when set to something else than the
    Exchange Online default the key carries, else https://mail.google.com/."""
    from relaygate.delivery.oauth import DEFAULT_SCOPE

    scope = str(getattr(connector, "oauth_scope", "") or "")
    return GOOGLE_SCOPE if not scope or scope == DEFAULT_SCOPE else scope
