"""The rules of send connectors that sign in to a cloud: Entra ID credentials
(`_entra_credential_rules`), Google (`_google_rules`), Microsoft Graph (`_graph_rules`).

Apart from the other send connector rules: each needs keys only these connectors take."""

from __future__ import annotations

from collections.abc import Iterator

from relaygate.config.model import SendConnector
from relaygate.config.validate_values import _not_an_address

_ENTRA_ONLY = (
    "oauth_tenant_id",
    "oauth_client_id",
    "oauth_client_secret_env",
    "oauth_client_secret_file",
    "oauth_client_certificate_file",
    "oauth_client_key_file",
)


def _entra_credential_rules(s: SendConnector, why: str) -> Iterator[tuple[str, str]]:
    """The app registration's credential: exactly one of a client secret (oauth_client_secret_env
    or oauth_client_secret_file) or a certificate (oauth_client_certificate_file, its key in it or
    in oauth_client_key_file). The certificate file itself is read by `relaygate check`."""
    secret = bool(s.oauth_client_secret_env) or s.oauth_client_secret_file is not None
    certificate = s.oauth_client_certificate_file is not None
    if secret and certificate:
        given = (
            "oauth_client_secret_env" if s.oauth_client_secret_env else "oauth_client_secret_file"
        )
        yield (
            "oauth_client_certificate_file",
            f"set either a client secret ({given}) or oauth_client_certificate_file, not both: "
            "Entra ID signs the connector in with one credential",
        )
    elif not secret and not certificate:
        yield (
            "oauth_client_secret_env",
            "set oauth_client_secret_env or oauth_client_secret_file (a client secret), or "
            f"oauth_client_certificate_file (a certificate credential) for {why}",
        )
    if s.oauth_client_key_file is not None and not certificate:
        yield (
            "oauth_client_key_file",
            "is the private key of oauth_client_certificate_file: set that too, or remove it",
        )


def _google_rules(s: SendConnector) -> Iterator[tuple[str, str]]:
    """XOAUTH2 with oauth_provider = "google": a service account with domain-wide delegation
    acting as auth_username. The key file itself is read by `relaygate check` (like the TLS and
    DKIM key files), not by the loader."""
    from relaygate.delivery.oauth import DEFAULT_AUTHORITY_HOST

    if not s.auth_username:
        yield (
            "auth_username",
            "is required for oauth_provider = 'google': the Workspace mailbox the service "
            "account sends as (the XOAUTH2 user)",
        )
    else:
        why = _not_an_address(s.auth_username)
        if why is not None:
            yield (
                "auth_username",
                f"{s.auth_username!r} is not a mail address (name@domain){why}: with "
                "oauth_provider = 'google' it is the Workspace mailbox the service account acts as",
            )
    if s.oauth_service_account_file is None:
        yield (
            "oauth_service_account_file",
            "is required for oauth_provider = 'google' (the service account's JSON key file)",
        )
    for key in _ENTRA_ONLY:
        if getattr(s, key):
            yield (
                key,
                "is for oauth_provider = 'entra' (Entra ID); a Google service account signs in "
                "with oauth_service_account_file (remove it)",
            )
    if s.oauth_authority_host != DEFAULT_AUTHORITY_HOST:
        yield (
            "oauth_authority_host",
            "is for oauth_provider = 'entra'; Google's token endpoint is the token_uri of the "
            "service account's key file (remove it)",
        )
    if not s.oauth_scope.strip() or any(
        not part.startswith("https://") for part in s.oauth_scope.split()
    ):
        yield (
            "oauth_scope",
            f"{s.oauth_scope!r} is not a Google OAuth scope (Gmail's SMTP needs "
            "'https://mail.google.com/', the default)",
        )


def _graph_rules(s: SendConnector) -> Iterator[tuple[str, str]]:
    """delivery_method = "Graph": HTTPS to graph_endpoint with the oauth_* app registration.
    Smart hosts are refused (they would never be used); dns_routing_enabled, port and the SMTP
    TLS keys other than tls_ca_file are ignored (documented)."""
    from urllib.parse import urlsplit

    from relaygate.delivery.graph import is_graph_scope

    if s.smart_hosts:
        yield (
            "smart_hosts",
            "must be empty with delivery_method = 'Graph' (Graph delivers over HTTPS to "
            "graph_endpoint); use another send connector for smart hosts",
        )
    if s.smart_host_auth_mechanism not in ("None", "XOAUTH2"):
        yield (
            "smart_host_auth_mechanism",
            f"{s.smart_host_auth_mechanism!r} cannot be used with delivery_method = 'Graph', "
            "which signs in with the oauth_* keys (leave it unset)",
        )
    for key in ("oauth_tenant_id", "oauth_client_id"):
        if not getattr(s, key):
            yield key, "is required for delivery_method = 'Graph'"
    yield from _entra_credential_rules(s, "delivery_method = 'Graph'")
    if not s.oauth_authority_host.startswith("https://"):
        yield "oauth_authority_host", "must be an https:// URL (the client secret is sent there)"
    url = urlsplit(s.graph_endpoint.strip())
    if url.scheme != "https" or not url.hostname:
        yield (
            "graph_endpoint",
            f"{s.graph_endpoint!r} must be an https:// URL such as "
            "'https://graph.microsoft.com/v1.0' (the access token is sent there)",
        )
    elif not is_graph_scope(s.oauth_scope, s.graph_endpoint):
        yield (
            "oauth_scope",
            f"{s.oauth_scope!r} is not a Microsoft Graph scope; with delivery_method = 'Graph' "
            "leave it unset (https://graph.microsoft.com/.default) or give the Graph of your "
            "cloud, e.g. 'https://graph.microsoft.us/.default'",
        )
    if s.graph_mailbox:
        why = _not_an_address(s.graph_mailbox)
        if why is not None:
            yield "graph_mailbox", f"{s.graph_mailbox!r} is not a mail address (name@domain){why}"
