"""The findings about the admin listener (reachable from the network without a token, or in
plain HTTP), and `admin_exposed` / `metrics_exposed`, which the admin server asks at start.

Apart so that the admin server imports these two questions and not the whole audit."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

from relaygate.audit.findings import Finding
from relaygate.config.model import Config
from relaygate.config.values import parse_binding


def admin_exposed(config: Config) -> bool:
    """The admin listener answers beyond this machine (not a loopback address) with no API token:
    whoever reaches it can read the queue (senders, recipients, Subjects) and remove messages."""
    return config.admin.api_token_file is None and _admin_on_network(config)


def metrics_exposed(config: Config) -> bool:
    """The admin listener answers beyond this machine and its /metrics needs no token
    (``admin.metrics_require_token`` off): whoever reaches it reads the receive and send connector
    names, certificate file paths, and the queue's and connectors' traffic figures."""
    return not config.admin.metrics_require_token and _admin_on_network(config)


def admin_without_tls(config: Config) -> bool:
    """The admin listener answers beyond this machine in plain HTTP: the API token and the
    session cookie can be read on the way (and replayed)."""
    return config.admin.tls_certificate_file is None and _admin_on_network(config)


def _admin_on_network(config: Config) -> bool:
    """The admin listener is enabled on an address that is not a loopback address."""
    admin = config.admin
    if not admin.enabled:
        return False
    try:
        address = ipaddress.ip_address(parse_binding(admin.listen).address)
    except ValueError:
        return False  # `check` reports a malformed admin.listen
    return not address.is_loopback


def _admin_findings(config: Config) -> Iterator[Finding]:
    if admin_exposed(config):
        yield Finding(
            "high",
            "admin-exposed-without-token",
            "",
            "admin.listen",
            f"the admin listener is on {config.admin.listen} (reachable from the network) and "
            "admin.api_token_file is not set: anyone who reaches it can list the queue and "
            "retry, suspend or remove messages",
            'keep admin.listen = "127.0.0.1:8025" (the default), or set admin.api_token_file '
            "and restrict access to a management network",
        )
    if admin_without_tls(config):
        yield Finding(
            "medium",
            "admin-listener-without-tls",
            "",
            "admin.tls_certificate_file",
            f"the admin listener is on {config.admin.listen} (reachable from the network) and "
            "speaks plain HTTP: the API token, the admin centre's session cookie and the queue's "
            "addresses and Subjects cross the network in clear",
            "set admin.tls_certificate_file and admin.tls_key_file (HTTPS; relaygate queue then "
            'trusts that certificate), or keep admin.listen = "127.0.0.1:8025" (the default)',
        )
    if metrics_exposed(config):
        yield Finding(
            "low",
            "admin-metrics-without-token",
            "",
            "admin.metrics_require_token",
            f"the admin listener is on {config.admin.listen} (reachable from the network) and "
            "/metrics answers without a token: anyone who reaches it reads the connector names, "
            "certificate file paths and the relay's queue and traffic figures",
            "set admin.metrics_require_token = true (it needs admin.api_token_file) and give "
            "the scraper the token (Prometheus: authorization.credentials_file), or keep "
            'admin.listen = "127.0.0.1:8025" (the default)',
        )
