"""OAuth 2.0 access tokens for SMTP AUTH XOAUTH2 (Microsoft 365 and other Entra ID clouds), with msal.

A send connector with ``smart_host_auth_mechanism = "XOAUTH2"`` authenticates as an Entra ID app
registration with the client-credentials grant: ``oauth_tenant_id``, ``oauth_client_id`` and a client
secret from ``oauth_client_secret_file`` or ``oauth_client_secret_env``, or a certificate credential
(``oauth_client_certificate_file``, optionally ``oauth_client_key_file``: a client assertion JWT
signed with the certificate's key, see entra_certificate.py); the token's scope is
``oauth_scope`` (Exchange Online's ``https://outlook.office365.com/.default``) and its authority
``oauth_authority_host``/tenant (``https://login.microsoftonline.com``; national clouds have their own
host). msal keeps the token in its in-memory cache until shortly before it expires, so one token serves
every delivery of the connector for about an hour.

msal's HTTP calls block, so they run in a thread, one at a time per connector (a burst of deliveries
after a restart asks for one token, not fifty). Failures become :class:`TokenError` with Entra ID's
error code and the first line of its description; the secret (or the private key, or the signed
assertion) is never part of a message or a log.

A reload keeps the provider (its msal application and cached token) while nothing it is built from
changed, the content of the credential's files included: a renewed certificate or a new secret put
in place of the old one is taken up by the reload (the next token is asked for with it).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_AUTHORITY_HOST",
    "DEFAULT_SCOPE",
    "OAuthTokenProvider",
    "SharedFailure",
    "TokenError",
    "TokenProvider",
    "auth_label",
    "build_token_provider",
]

log = logging.getLogger(__name__)

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_SCOPE = "https://outlook.office365.com/.default"
#: Seconds msal's requests (the tenant's discovery, the token request) wait to connect and between
#: two reads of an answer. msal's own default is no limit: an endpoint or a proxy that took the
#: request and never answered held the provider's lock, and every delivery of the connector, for ever.
TOKEN_REQUEST_TIMEOUT = 30.0

# Hosts msal knows (public cloud, US Government, China, Germany): it validates the authority against
# them through instance discovery. Any other host (a private or test authority) is used as it is.
_KNOWN_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoft.com",
        "login.windows.net",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.microsoftonline.de",
    }
)


#: msal's token client: on an answer that is not JSON it logs the whole answer (a proxy's HTML
#: page, kilobytes) with a traceback at ERROR. The TokenError's one line says what happened.
_MSAL_TOKEN_LOGGER = "msal.oauth2cli.oauth2"
_MSAL_NOT_JSON = "Token response is not in json format"


class _DropMsalNotJson(logging.Filter):
    """Drops msal's "Token response is not in json format: <the page>" record (its other
    records pass): the provider's TokenError says "the answer is not JSON", on one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_MSAL_NOT_JSON)


_MSAL_FILTER = _DropMsalNotJson()


def _quiet_msal_not_json() -> None:
    """Installs the filter on msal's token client logger (once: the same instance is not added
    twice). A logger's filter applies to the records logged on it, before any handler."""
    logging.getLogger(_MSAL_TOKEN_LOGGER).addFilter(_MSAL_FILTER)


class TokenError(Exception):
    """No access token: the text names the connector and Entra ID's error, never the secret."""


class TokenProvider(Protocol):
    """What the SMTP client and Graph use of a connector's token source (Entra ID's msal client
    credentials here, a Google service account in google_oauth.py)."""

    connector_name: str

    async def __call__(self) -> str: ...

    async def invalidate(self, token: str | None = None) -> None: ...

    @property
    def signature(self) -> tuple[Any, ...]: ...


def build_token_provider(connector: Any, *, scope: str | None = None) -> TokenProvider:
    """The token provider of an XOAUTH2 (or Graph) send connector, by its ``oauth_provider``:
    "entra" (the default) or "google". `scope`: instead of the connector's own."""
    if str(getattr(connector, "oauth_provider", "entra") or "entra") == "google":
        from relaygate.delivery.google_oauth import GoogleTokenProvider

        return GoogleTokenProvider.from_connector(connector, scope=scope)
    return OAuthTokenProvider.from_connector(connector, scope=scope)


def auth_label(connector: Any) -> str | None:
    """How `explain`, `send-connector list` and the admin centre name a send connector's
    authentication to its smart host; None when it does not authenticate. A Google service
    account is named by its key file's client_email (read for display; "?" when unreadable)."""
    if str(getattr(connector, "delivery_method", "SMTP") or "SMTP") == "Graph":
        return "OAuth (Graph)"
    mech = str(getattr(connector, "smart_host_auth_mechanism", "None") or "None")
    if mech == "None":
        return None
    user = str(getattr(connector, "auth_username", "") or "")
    if mech == "XOAUTH2" and getattr(connector, "oauth_provider", "entra") == "google":
        from relaygate.delivery.google_oauth import read_client_email

        email = read_client_email(getattr(connector, "oauth_service_account_file", None))
        return f"XOAUTH2 (Google service account {email or '?'} as {user or '?'})"
    return mech


class OAuthTokenProvider:
    """``await provider()`` → an access token for the connector's app registration."""

    def __init__(
        self,
        *,
        connector_name: str,
        tenant_id: str,
        client_id: str,
        secret_file: Path | None = None,
        secret_env: str = "",
        certificate_file: Path | None = None,
        key_file: Path | None = None,
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        scope: str = DEFAULT_SCOPE,
        environ: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.connector_name = connector_name
        self.timeout = TOKEN_REQUEST_TIMEOUT if timeout is None else timeout
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.secret_file = secret_file
        self.secret_env = secret_env
        self.certificate_file = certificate_file
        self.key_file = key_file
        #: the credential files' content as the provider was built (start, reload): a renewed
        #: certificate, or a secret rotated in its file, makes a new provider (msal's
        #: application keeps the credential it was built with)
        self.credential_digest = _digest(secret_file, certificate_file, key_file)
        self.authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self.scope = scope
        self._environ = environ
        self._app: Any = None
        self._token: str | None = None  # the last token msal gave (see invalidate)
        self._lock = asyncio.Lock()
        self._waits = SharedFailure()
        self.requests = 0  # tokens asked of msal (cache hits included), for the tests and /metrics

    @classmethod
    def from_connector(cls, connector: Any, *, scope: str | None = None) -> OAuthTokenProvider:
        """`scope`: instead of the connector's oauth_scope (a Graph connector's Graph scope)."""
        return cls(
            connector_name=str(connector.name),
            tenant_id=str(connector.oauth_tenant_id),
            client_id=str(connector.oauth_client_id),
            secret_file=connector.oauth_client_secret_file,
            secret_env=str(connector.oauth_client_secret_env or ""),
            certificate_file=getattr(connector, "oauth_client_certificate_file", None),
            key_file=getattr(connector, "oauth_client_key_file", None),
            authority_host=str(connector.oauth_authority_host or DEFAULT_AUTHORITY_HOST),
            scope=scope or str(connector.oauth_scope or DEFAULT_SCOPE),
        )

    @property
    def signature(self) -> tuple[Any, ...]:
        """What the provider is built from: a reload keeps it (and its token) when unchanged."""
        return (
            "entra",
            self.authority,
            self.client_id,
            self.scope,
            self.secret_file,
            self.secret_env,
            self.certificate_file,
            self.key_file,
            self.credential_digest,
        )

    @property
    def token_endpoint(self) -> str:
        """Entra ID's v2.0 token endpoint of the tenant as configured (a client assertion's
        audience is the one msal discovers, by the tenant's id: see _application)."""
        return f"{self.authority}/oauth2/v2.0/token"

    async def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (the resource refused it: revoked, or its rights changed):
        the next call asks Entra ID for a new one. With `token` (the one refused), only while
        it is still the cached one: deliveries that were refused the same token at once then
        ask for one new token, not one each (a late refusal would drop the new token)."""
        async with self._lock:
            if token is not None and token != self._token:
                return
            self._app = None
            self._token = None

    async def __call__(self) -> str:
        turn = self._waits.turn()
        async with self._lock:
            self._waits.raise_if_failed_since(turn)
            with self._waits.outcome():
                return await asyncio.to_thread(self._acquire)

    # -- blocking part (a worker thread) ----------------------------------------------------------

    def _secret(self) -> str:
        name = self.connector_name
        if self.secret_file is not None:
            try:
                raw = Path(self.secret_file).read_bytes()
            except OSError as exc:
                raise TokenError(
                    f"send connector {name!r}: cannot read oauth_client_secret_file "
                    f"{str(self.secret_file)!r}: {exc.strerror}"
                ) from None
            try:
                # utf-8-sig: a BOM (Notepad's "UTF-8 with BOM") is not part of the secret
                text = raw.decode("utf-8-sig")
            except UnicodeDecodeError:
                # Never chained nor repr'd: the error holds the file's bytes, the secret.
                raise TokenError(
                    f"send connector {name!r}: oauth_client_secret_file {str(self.secret_file)!r} "
                    "is not UTF-8 text (save the secret as UTF-8)"
                ) from None
            return text.removesuffix("\n").removesuffix("\r")
        env = os.environ if self._environ is None else self._environ
        value = env.get(self.secret_env) if self.secret_env else None
        if not value:
            raise TokenError(
                f"send connector {name!r}: environment variable {self.secret_env!r} is not set"
            )
        return value

    def _certificate_credential(self, audience: list[str]) -> dict[str, Any]:
        """msal's client_credential for a certificate credential: a callable that signs a new
        client assertion (new jti, iat/nbf/exp) for each token request. `audience`: filled with
        the token endpoint msal posts to, once its application has discovered it."""
        from relaygate.delivery.entra_certificate import (
            CertificateCredentialError,
            load_certificate_credential,
            sign_client_assertion,
        )

        assert self.certificate_file is not None
        try:
            credential = load_certificate_credential(self.certificate_file, self.key_file)
        except CertificateCredentialError as exc:
            raise TokenError(f"send connector {self.connector_name!r}: {exc}") from None
        client_id, fallback = self.client_id, self.token_endpoint

        def assertion() -> str:
            return sign_client_assertion(
                credential,
                client_id=client_id,
                audience=audience[0] if audience else fallback,
                now=time.time(),
            )

        return {"client_assertion": assertion}

    def _application(self) -> Any:
        if self._app is None:
            import msal  # imported on first use: only XOAUTH2 connectors need it

            _quiet_msal_not_json()

            known = (urlsplit(self.authority).hostname or "") in _KNOWN_HOSTS
            # A client assertion's aud must be the token endpoint it is posted to: the one Entra
            # ID's discovery gives (by the tenant's id, on login.microsoftonline.com for the
            # login.windows.net alias), not one built from oauth_tenant_id, as msal's own do.
            audience: list[str] = []
            app = msal.ConfidentialClientApplication(
                self.client_id,
                client_credential=(
                    self._secret()
                    if self.certificate_file is None
                    else self._certificate_credential(audience)
                ),
                authority=self.authority,
                validate_authority=known,
                instance_discovery=known,
                timeout=self.timeout,
            )
            audience.append(str(app.authority.token_endpoint))
            self._app = app
        return self._app

    def _acquire(self) -> str:
        self.requests += 1
        try:
            result = self._application().acquire_token_for_client(scopes=[self.scope])
        except TokenError:
            raise
        except Exception as exc:  # network errors, an authority that does not answer OIDC
            self._app = None  # start over next time (a fixed secret file, a reachable network)
            raise TokenError(
                f"send connector {self.connector_name!r}: token request to {self.authority} "
                f"failed: {self._failure(exc)}"
            ) from None
        token = result.get("access_token") if isinstance(result, dict) else None
        if token:
            self._token = str(token)
            return self._token
        error, description = "no access_token", ""
        if isinstance(result, dict):
            error = str(result.get("error", error))
            lines = str(result.get("error_description", "")).strip().splitlines()
            description = lines[0] if lines else ""
        # Refused (an expired or revoked secret or certificate...): the next request reads the
        # secret (the certificate) again, so one replaced in its file is used without a restart.
        self._app = None
        raise TokenError(
            f"send connector {self.connector_name!r}: {self.authority} refused the token "
            f"request: {error}" + (f" ({description})" if description else "")
        )

    def _failure(self, exc: Exception) -> str:
        """What went wrong with a token request that got no answer from Entra ID, in words (the
        type alone otherwise: an exception's text may quote the request)."""
        import requests
        from msal.exceptions import MsalServiceError

        if isinstance(exc, requests.exceptions.Timeout):
            return f"no answer within {self.timeout:g} s"
        if isinstance(exc, requests.exceptions.SSLError):
            verify = _cert_verification_error(exc)
            if verify is not None:
                return f"certificate validation failed: {verify.verify_message or verify.reason}"
            return "TLS handshake failed"
        if isinstance(exc, MsalServiceError):  # msal's "HTTP Error: 502" (a 5xx: not parsed)
            status = str(exc.args[0] if exc.args else "").removeprefix("HTTP Error: ")
            if status.isdigit():
                return f"HTTP {status}"
        if isinstance(exc, json.JSONDecodeError):
            return "the answer is not JSON (a proxy's or gateway's page?)"
        return type(exc).__name__


class SharedFailure:
    """A provider's token calls wait for each other (one request at a time); those that waited
    for one that failed get its TokenError without a request of their own. Else each made its
    own after the one before it failed: a burst of deliveries with a refused secret made as many
    requests, and with an endpoint that does not answer waited for as many timeouts in a row."""

    def __init__(self) -> None:
        self._done = 0  # token calls completed
        self._failed: TokenError | None = None  # the last one's error, if it failed

    def turn(self) -> int:
        """Taken before waiting for the provider's lock."""
        return self._done

    def raise_if_failed_since(self, turn: int) -> None:
        """Under the lock: the error of a call that failed while this one waited."""
        if self._done != turn and self._failed is not None:
            raise TokenError(*self._failed.args)

    @contextlib.contextmanager
    def outcome(self) -> Iterator[None]:
        """Around the call made under the lock: records how it ended."""
        try:
            yield
        except TokenError as exc:
            self._failed = exc
            raise
        except BaseException:  # cancelled, or not worded: the next waiter asks for itself
            self._failed = None
            raise
        else:
            self._failed = None
        finally:
            self._done += 1


def _cert_verification_error(exc: BaseException) -> ssl.SSLCertVerificationError | None:
    """The certificate verification error under requests' and urllib3's wrappers, if any."""
    pending: list[object] = [exc]
    seen: set[int] = set()
    while pending:
        item = pending.pop()
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, ssl.SSLCertVerificationError):
            return item
        pending += [item.__cause__, item.__context__, getattr(item, "reason", None), *item.args]
    return None


def _digest(*paths: Path | None) -> str:
    """SHA-256 of the files' content ("" without files; "unreadable" for one that cannot be read:
    the token request says why)."""
    if not any(p is not None for p in paths):
        return ""
    h = hashlib.sha256()
    for path in paths:
        if path is None:
            continue
        try:
            h.update(Path(path).read_bytes())
        except OSError:
            return "unreadable"
        h.update(b"\0")
    return h.hexdigest()
