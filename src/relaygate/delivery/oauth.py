"""OAuth 2.0 access tokens for SMTP AUTH XOAUTH2 (Microsoft 365 and other Entra ID clouds), with msal.

A send connector with ``smart_host_auth_mechanism = "XOAUTH2"`` authenticates as an Entra ID app
registration with the client-credentials grant: ``oauth_tenant_id``, ``oauth_client_id`` and a client
secret from ``oauth_client_secret_file`` or ``oauth_client_secret_env``; the token's scope is
``oauth_scope`` (Exchange Online's ``https://outlook.office365.com/.default``) and its authority
``oauth_authority_host``/tenant (``https://login.microsoftonline.com``; national clouds have their own
host). msal keeps the token in its in-memory cache until shortly before it expires, so one token serves
every delivery of the connector for about an hour.

msal's HTTP calls block, so they run in a thread, one at a time per connector (a burst of deliveries
after a restart asks for one token, not fifty). Failures become :class:`TokenError` with Entra ID's
error code and the first line of its description; the secret is never part of a message or a log.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_AUTHORITY_HOST",
    "DEFAULT_SCOPE",
    "OAuthTokenProvider",
    "TokenError",
    "TokenProvider",
    "auth_label",
    "build_token_provider",
]

log = logging.getLogger(__name__)

DEFAULT_AUTHORITY_HOST = "https://login.microsoftonline.com"
DEFAULT_SCOPE = "https://outlook.office365.com/.default"

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


class TokenError(Exception):
    """No access token: the text names the connector and Entra ID's error, never the secret."""


class TokenProvider(Protocol):
    """What the SMTP client and Graph use of a connector's token source (Entra ID's msal client
    credentials here, a Google service account in google_oauth.py)."""

    connector_name: str

    async def __call__(self) -> str: ...

    async def invalidate(self) -> None: ...

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
        authority_host: str = DEFAULT_AUTHORITY_HOST,
        scope: str = DEFAULT_SCOPE,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.connector_name = connector_name
        self.tenant_id = tenant_id
        self.client_id = client_id
        self.secret_file = secret_file
        self.secret_env = secret_env
        self.authority = f"{authority_host.rstrip('/')}/{tenant_id}"
        self.scope = scope
        self._environ = environ
        self._app: Any = None
        self._lock = asyncio.Lock()
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
        )

    async def invalidate(self) -> None:
        """Forget the cached token (the resource refused it: revoked, or its rights changed):
        the next call asks Entra ID for a new one."""
        async with self._lock:
            self._app = None

    async def __call__(self) -> str:
        async with self._lock:
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
            return raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
        env = os.environ if self._environ is None else self._environ
        value = env.get(self.secret_env) if self.secret_env else None
        if not value:
            raise TokenError(
                f"send connector {name!r}: environment variable {self.secret_env!r} is not set"
            )
        return value

    def _application(self) -> Any:
        if self._app is None:
            import msal  # imported on first use: only XOAUTH2 connectors need it

            known = (urlsplit(self.authority).hostname or "") in _KNOWN_HOSTS
            self._app = msal.ConfidentialClientApplication(
                self.client_id,
                client_credential=self._secret(),
                authority=self.authority,
                validate_authority=known,
                instance_discovery=known,
            )
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
                f"failed: {type(exc).__name__}"
            ) from None
        token = result.get("access_token") if isinstance(result, dict) else None
        if token:
            return str(token)
        error, description = "no access_token", ""
        if isinstance(result, dict):
            error = str(result.get("error", error))
            lines = str(result.get("error_description", "")).strip().splitlines()
            description = lines[0] if lines else ""
        # Refused (an expired or revoked secret...): the next request reads the secret again,
        # so a secret replaced in its file is used without a restart.
        self._app = None
        raise TokenError(
            f"send connector {self.connector_name!r}: {self.authority} refused the token "
            f"request: {error}" + (f" ({description})" if description else "")
        )
