"""The rules of one send connector (`_send_rules`): address spaces, smart hosts, the SMTP options
and AUTH (`_send_smtp_option_rules`), and the overflow connectors between them (`_overflow_rules`).

Apart from the receive side; the rules of Graph and OAuth connectors are in validate_cloud.py."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator

from relaygate.config.loader import Problem
from relaygate.config.model import MAX_MESSAGES_PER_CONNECTION, Config, SendConnector
from relaygate.config.validate_cloud import _entra_credential_rules, _google_rules, _graph_rules
from relaygate.config.validate_values import _not_an_address
from relaygate.config.values import parse_smart_host
from relaygate.delivery.routing import parse_address_space

#: An address space's cost, as New-SendConnector takes it (exchange-semantics.md §7.1).
MIN_COST, MAX_COST = 1, 100

_ADDRESS_SPACE = re.compile(
    r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$"
)


def _send_rules(s: SendConnector) -> Iterator[tuple[str, str]]:
    if not s.name.strip():
        yield "name", "must not be empty"
    if not s.address_spaces:
        yield (
            "address_spaces",
            "is required: '*' or domains such as 'corp.example' / '*.corp.example'",
        )
    for i, space in enumerate(s.address_spaces):
        if not _ADDRESS_SPACE.match(space.lower()):
            yield f"address_spaces[{i}]", _address_space_problem(space)
    graph = s.delivery_method == "Graph"
    if graph:
        yield from _graph_rules(s)
    elif s.dns_routing_enabled and s.smart_hosts:
        yield "smart_hosts", "set dns_routing_enabled = false to route through smart hosts"
    elif not s.dns_routing_enabled and not s.smart_hosts:
        yield "smart_hosts", "is required when dns_routing_enabled = false"
    for i, host in enumerate(s.smart_hosts):
        try:
            parse_smart_host(host, s.port)  # the parser delivery uses (delivery/nexthop.py)
        except ValueError as exc:
            yield f"smart_hosts[{i}]", str(exc)
    if not 0 < s.port < 65536:
        yield "port", "must be 1-65535"
    if not MIN_COST <= s.cost <= MAX_COST:
        yield "cost", f"{s.cost} is outside the allowed range {MIN_COST}-{MAX_COST}"
    if s.smart_host_auth_mechanism in ("BasicAuth", "BasicAuthRequireTLS") and not graph:
        if not s.auth_username:
            yield (
                "auth_username",
                f"is required for smart_host_auth_mechanism = {s.smart_host_auth_mechanism!r}",
            )
        if s.auth_password_file is None and not s.auth_password_env:
            yield (
                "auth_password_file",
                "set auth_password_file or auth_password_env for smart-host AUTH",
            )
    google = s.oauth_provider == "google"
    if google and (graph or s.smart_host_auth_mechanism != "XOAUTH2"):
        yield (
            "oauth_provider",
            "'google' signs in to Gmail's SMTP with XOAUTH2: set smart_host_auth_mechanism = "
            "'XOAUTH2'"
            + (" (delivery_method = 'Graph' signs in with Entra ID only)" if graph else ""),
        )
    elif google:
        yield from _google_rules(s)
    elif s.oauth_service_account_file is not None and (
        graph or s.smart_host_auth_mechanism == "XOAUTH2"
    ):
        yield (
            "oauth_service_account_file",
            "is for oauth_provider = 'google' (a Google service account); Entra ID signs in with "
            "oauth_tenant_id, oauth_client_id and the client secret",
        )
    if s.smart_host_auth_mechanism == "XOAUTH2" and not graph and not google:
        for key in ("auth_username", "oauth_tenant_id", "oauth_client_id"):
            if not getattr(s, key):
                yield key, "is required for smart_host_auth_mechanism = 'XOAUTH2'"
        if not s.oauth_authority_host.startswith("https://"):
            yield (
                "oauth_authority_host",
                "must be an https:// URL (the client secret is sent there)",
            )
        yield from _entra_credential_rules(s, "smart_host_auth_mechanism = 'XOAUTH2'")
    if s.send_as:
        why = _not_an_address(s.send_as)
        if why is not None:
            yield "send_as", f"{s.send_as!r} is not a mail address (name@domain){why}"
    if s.max_message_size == 0:  # None is "unlimited"
        yield (
            "max_message_size",
            "0 bytes would refuse every message (each would get an NDR); give a size such as "
            "'35MB', or 'unlimited' for no limit",
        )
    for key in ("max_messages_per_minute", "max_recipients_per_day"):
        # the loader has refused non-integers and negative numbers already
        if getattr(s, key) == 0:
            yield key, "must be at least 1 (or 'unlimited' for no limit)"
    if s.tls_auth_level != "EncryptionOnly" and not s.require_tls and not graph:
        yield (
            "tls_auth_level",
            "certificate validation needs require_tls = true (else a stripped STARTTLS bypasses it)",
        )
    if not graph:
        yield from _send_smtp_option_rules(s)


def _address_space_problem(space: str) -> str:
    """Why `space` is no address space, saying what to write for Exchange's own spelling
    `[SMTP:]space[;cost]` (exchange-semantics.md §7.1), which an administrator may paste from
    Get-SendConnector: here the space stands alone and the cost is the connector's `cost`."""
    not_one = f"{space!r} is not '*', a domain or '*.domain'"
    parsed = parse_address_space(space)
    if parsed.kind == "other":
        return f"{not_one} (only SMTP address spaces are routed)"
    plain = (
        "*" if parsed.kind == "any" else ("*." if parsed.kind == "wildcard" else "") + parsed.domain
    )
    if plain == space.strip().lower() or not _ADDRESS_SPACE.match(plain):
        return not_one
    cost = f" (and cost = {parsed.cost})" if parsed.cost is not None else ""
    return f"{space!r} is Exchange's [SMTP:]space[;cost] spelling: write {plain!r}{cost}"


_AUTH_NEEDS_TLS = ("BasicAuthRequireTLS", "XOAUTH2")
_AUTH_NEEDS_EHLO = ("BasicAuth", "BasicAuthRequireTLS", "XOAUTH2")


def _send_smtp_option_rules(s: SendConnector) -> Iterator[tuple[str, str]]:
    """tls_certificate_file/tls_key_file, ignore_starttls, force_helo,
    smtp_max_messages_per_connection, source_ip_address (Exchange's TlsCertificateName,
    IgnoreSTARTTLS, ForceHELO, SmtpMaxMessagesPerConnection, SourceIPAddress)."""
    if (s.tls_certificate_file is None) != (s.tls_key_file is None):
        yield "tls_certificate_file", "set both tls_certificate_file and tls_key_file, or neither"
    tls_needed = [
        why
        for why, needed in (
            ("require_tls = true", s.require_tls),
            (f"tls_auth_level = {s.tls_auth_level!r}", s.tls_auth_level != "EncryptionOnly"),
            (
                f"smart_host_auth_mechanism = {s.smart_host_auth_mechanism!r}",
                s.smart_host_auth_mechanism in _AUTH_NEEDS_TLS,
            ),
        )
        if needed
    ]
    if not s.implicit_tls and tls_needed:
        if s.ignore_starttls:
            yield (
                "ignore_starttls",
                f"cannot be true with {tls_needed[0]}, which requires TLS (STARTTLS would never "
                "be used: every message would wait in the queue)",
            )
        if s.force_helo:
            yield (
                "force_helo",
                f"cannot be true with {tls_needed[0]}, which requires TLS: after HELO no "
                "STARTTLS is possible (use implicit_tls, or EHLO)",
            )
    if s.force_helo and s.smart_host_auth_mechanism in _AUTH_NEEDS_EHLO:
        yield (
            "force_helo",
            f"cannot be true with smart_host_auth_mechanism = {s.smart_host_auth_mechanism!r}: "
            "AUTH is an ESMTP extension, never offered after HELO",
        )
    if not 1 <= s.smtp_max_messages_per_connection <= MAX_MESSAGES_PER_CONNECTION:
        yield (
            "smtp_max_messages_per_connection",
            f"must be 1-{MAX_MESSAGES_PER_CONNECTION:,}",
        )
    for key in ("connect_timeout", "greeting_timeout"):
        if not 1 <= getattr(s, key).total_seconds() <= 86400:
            yield key, "must be between 00:00:01 and 1.00:00:00"
    if s.source_ip_address is not None:
        try:
            ipaddress.ip_address(s.source_ip_address.strip())
        except ValueError:
            yield (
                "source_ip_address",
                f"{s.source_ip_address!r} is not an IPv4 or IPv6 address (a local address of "
                "this server, e.g. '192.0.2.10')",
            )


def _overflow_rules(config: Config, position: Callable[[int], int]) -> list[Problem]:
    """``overflow_connector``: another send connector's name (any case), not the connector's own.
    A disabled one is accepted (disabling a route must not break the file that names it): it is
    skipped while disabled, and ``relaygate audit`` says so."""
    src = config.source
    names = {s.name.lower() for s in config.send_connectors}
    problems: list[Problem] = []
    for i, s in enumerate(config.send_connectors):
        target = s.overflow_connector
        if not target:
            continue
        path = f"send_connectors[{position(i)}].overflow_connector"
        if target.lower() == s.name.lower():
            problems.append(
                Problem(
                    src, path, "names the connector itself; name another send connector", s.name
                )
            )
        elif target.lower() not in names:
            known = ", ".join(repr(c.name) for c in config.send_connectors if c is not s)
            problems.append(
                Problem(
                    src,
                    path,
                    f"{s.overflow_connector!r} is not a send connector"
                    + (f" (send connectors: {known})" if known else ""),
                    s.name,
                )
            )
    return problems
