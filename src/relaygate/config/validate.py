"""Cross-field rules: what New-/Set-ReceiveConnector and New-SendConnector refuse, plus RelayGate's own.

Each rule yields a `Problem` naming the file, connector and key. Rules (exchange-semantics.md §1–§2):
unique names; bindings and RemoteIPRanges required (except Internet usage); no two connectors with the
same binding and the same range; ranges on a shared binding nested, never partially overlapping; a
FrontendTransport and a HubTransport connector never share a binding; an implicit-TLS and a STARTTLS
connector never share a listening socket; AuthMechanism combinations
(None alone; ExternalAuthoritative needs ExchangeServers and combines only with Tls;
BasicAuthRequireTLS needs BasicAuth and Tls; RequireTLS needs Tls); ConnectionTimeout above
ConnectionInactivityTimeout; value ranges from §1.4; banner starting with 220.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from relaygate import replies
from relaygate.addresses import AddressError, parse_path
from relaygate.config.loader import Problem
from relaygate.config.model import (
    MAX_MESSAGES_PER_CONNECTION,
    Config,
    ReceiveConnector,
    SendConnector,
)
from relaygate.config.values import (
    Binding,
    format_timespan,
    parse_smart_host,
    wildcard_covers,
)

__all__ = ["validate"]

_DOMAIN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)
_ADDRESS_SPACE = re.compile(
    r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$"
)

# (key, minimum, maximum) as §1.4 gives them; None limits ("unlimited") are skipped.
_LIMITS = (
    ("max_message_size", 65536, 2 * 1024**3),
    ("max_header_size", 1, 2 * 1024**3),
    ("max_recipients_per_message", 1, 512000),
    ("max_hop_count", 1, 500),
    ("max_local_hop_count", 0, 50),
    ("max_inbound_connection", 1, 2**31 - 1),
    ("max_inbound_connection_per_source", 1, 10000),
    ("max_inbound_connection_percentage_per_source", 1, 100),
    ("max_protocol_errors", 0, 2**31 - 1),
    ("max_logon_failures", 0, 10),
    ("logon_failure_rate_limit", 1, 2**31 - 1),
    ("logon_failure_ipv6_prefix_length", 32, 128),
    ("message_rate_limit", 1, 2**31 - 1),
)

# The log writers (logs/rotation.py LogDirectory) refuse a size of 0 when `serve` starts.
_LOG_SIZES = (
    "receive_protocol_log_max_file_size",
    "receive_protocol_log_max_directory_size",
    "message_tracking_log_max_file_size",
    "message_tracking_log_max_directory_size",
)


def _given(raw: dict[str, Any], key: str) -> bool:
    """The file gave `key` a non-empty value (its bad entries were reported by the loader already)."""
    value = raw.get(key)
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _receive_rules(c: ReceiveConnector, raw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    if not c.name.strip():
        yield "name", "must not be empty"
    if len(c.name) > 64:
        yield "name", f"is {len(c.name)} characters; Exchange allows at most 64"
    if not c.bindings and not _given(raw, "bindings"):
        yield "bindings", "is required: list the local 'IP:port' endpoints, e.g. ['0.0.0.0:25']"
    if not c.remote_ip_ranges and c.usage != "Internet" and not _given(raw, "remote_ip_ranges"):
        yield (
            "remote_ip_ranges",
            'is required (except for usage = "Internet"): list the client addresses',
        )
    auth = set(c.auth_mechanism)
    if "None" in auth and len(auth) > 1:
        yield "auth_mechanism", "'None' must be the only value"
    if "ExternalAuthoritative" in auth:
        if "ExchangeServers" not in c.permission_groups:
            yield (
                "auth_mechanism",
                "ExternalAuthoritative requires permission_groups to include 'ExchangeServers'",
            )
        others = auth - {"ExternalAuthoritative", "Tls"}
        if others:
            yield (
                "auth_mechanism",
                f"ExternalAuthoritative can be combined only with Tls, not {', '.join(sorted(others))}",
            )
    if "BasicAuthRequireTLS" in auth and not {"BasicAuth", "Tls"} <= auth:
        yield "auth_mechanism", "BasicAuthRequireTLS requires both BasicAuth and Tls"
    if c.require_tls and "Tls" not in auth:
        yield "require_tls", "require_tls = true needs 'Tls' in auth_mechanism"
    if "None" in c.permission_groups and len(c.permission_groups) > 1:
        yield "permission_groups", "'None' must be the only value"
    if c.connection_timeout <= c.connection_inactivity_timeout:
        yield (
            "connection_timeout",
            f"must be greater than connection_inactivity_timeout ({format_timespan(c.connection_timeout)} "
            f"is not above {format_timespan(c.connection_inactivity_timeout)})",
        )
    for key in ("connection_timeout", "connection_inactivity_timeout"):
        seconds = getattr(c, key).total_seconds()
        if not 1 <= seconds <= 86400:
            yield key, "must be between 00:00:01 and 1.00:00:00"
    for key, low, high in _LIMITS:
        value = getattr(c, key)
        if value is not None and not low <= value <= high:
            yield key, f"{value} is outside the allowed range {low}-{high}"
    if c.banner is not None and not c.banner.startswith("220"):
        yield "banner", "a custom banner must start with '220'"
    if c.tls_mode == "implicit" and "Tls" not in auth:
        yield "tls_mode", "tls_mode = \"implicit\" needs 'Tls' in auth_mechanism"
    if (c.tls_certificate_file is None) != (c.tls_key_file is None):
        yield "tls_certificate_file", "set both tls_certificate_file and tls_key_file, or neither"
    if len(c.remote_ip_ranges) > 1300:
        yield (
            "remote_ip_ranges",
            f"{len(c.remote_ip_ranges)} entries; Exchange's limit is about 1,300",
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
            yield f"address_spaces[{i}]", f"{space!r} is not '*', a domain or '*.domain'"
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
    if s.source_ip_address is not None:
        try:
            ipaddress.ip_address(s.source_ip_address.strip())
        except ValueError:
            yield (
                "source_ip_address",
                f"{s.source_ip_address!r} is not an IPv4 or IPv6 address (a local address of "
                "this server, e.g. '192.0.2.10')",
            )


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


def _not_an_address(text: str) -> str | None:
    """None when `text` is a mail address (name@domain), else why not (": reason" or "")."""
    try:
        address = parse_path(
            f"<{text}>",
            allow_null=False,
            allow_postmaster=False,
            error=replies.UNRECOGNIZED_COMMAND,
        )
        why = "" if address is None or address.domain else ": no domain"
    except AddressError as exc:
        address, why = None, f": {exc.reason}"
    return None if address is not None and address.domain else why


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


def _one_socket(config: Config, x: Binding, y: Binding) -> bool:
    """True when the relay receives the connections of `x` and `y` on one listening socket: the same
    binding, or a wildcard and an address it covers (smtp/server.py `listener_bindings`; two
    wildcards are two sockets)."""
    if x == y:
        return True
    if x.is_wildcard == y.is_wildcard:
        return False
    wildcard, other = (x, y) if x.is_wildcard else (y, x)
    return wildcard_covers(wildcard, other, ipv6_only=config.ipv6_only(wildcard.port))


def validate(
    config: Config, doc: dict[str, Any], positions: dict[str, list[int]] | None = None
) -> list[Problem]:
    """Cross-field problems. `positions[key][i]` is the index in the file of the i-th built item of the
    array `key` (items the loader could not build are missing from `config`); identity if omitted."""
    src = config.source
    problems: list[Problem] = []
    raw_connectors = (
        doc.get("receive_connectors", []) if isinstance(doc.get("receive_connectors"), list) else []
    )

    def at(key: str, i: int) -> int:
        known = (positions or {}).get(key)
        return known[i] if known is not None and i < len(known) else i

    seen: dict[str, int] = {}
    for i, c in enumerate(config.receive_connectors):
        fi = at("receive_connectors", i)
        path = f"receive_connectors[{fi}]"
        raw = (
            raw_connectors[fi]
            if fi < len(raw_connectors) and isinstance(raw_connectors[fi], dict)
            else {}
        )
        for key, message in _receive_rules(c, raw):
            problems.append(Problem(src, f"{path}.{key}", message, c.name))
        if c.name.lower() in seen:
            problems.append(
                Problem(
                    src,
                    f"{path}.name",
                    f"duplicates receive_connectors[{seen[c.name.lower()]}]",
                    c.name,
                )
            )
        seen.setdefault(c.name.lower(), fi)

    connectors = list(enumerate(config.receive_connectors))
    for ai, a in connectors:
        for bi, b in connectors:
            if bi <= ai:
                continue
            shared = [(x, y) for x in a.bindings for y in b.bindings if x.shares_endpoint(y)]
            if not shared:
                continue
            path = f"receive_connectors[{at('receive_connectors', bi)}]"
            by = shared[0][1]
            if a.transport_role != b.transport_role:
                problems.append(
                    Problem(
                        src,
                        f"{path}.bindings",
                        f"{b.transport_role} connector shares binding {by} with {a.transport_role} connector "
                        f'"{a.name}"; receive connectors assigned to different transport roles must listen on '
                        "unique local IP address & port bindings",
                        b.name,
                    )
                )
                continue
            tls_shared = next(
                (
                    (x, y)
                    for x, y in shared
                    if _one_socket(config, x, y)
                    and (a.tls_mode == "implicit") != (b.tls_mode == "implicit")
                ),
                None,
            )
            if tls_shared is not None:
                problems.append(
                    Problem(
                        src,
                        f"{path}.tls_mode",
                        f'tls_mode "{b.tls_mode}" on binding {tls_shared[1]}, which listens on the same socket '
                        f'as binding {tls_shared[0]} of connector "{a.name}" (tls_mode "{a.tls_mode}"): '
                        "a socket is either implicit TLS or plain text; give them different ports",
                        b.name,
                    )
                )
            # Ranges conflict on a binding both connectors hold exactly, and on two wildcards of one
            # port (0.0.0.0 and the dual-stack [::] both take IPv4 clients, and neither is preferred);
            # an exact address and a wildcard do not conflict: selection prefers the exact one. Look at
            # every shared pair, not just the first: ["0.0.0.0:25", "[::]:25"] and ["[::]:25"] share
            # [::]:25 exactly.
            same = next(
                ((x, y) for x, y in shared if x == y or (x.is_wildcard and y.is_wildcard)), None
            )
            if same is None:
                continue
            _, by = same
            for ra in a.remote_ip_ranges:
                for rb in b.remote_ip_ranges:
                    if ra.first == rb.first and ra.last == rb.last and ra.version == rb.version:
                        problems.append(
                            Problem(
                                src,
                                f"{path}.remote_ip_ranges",
                                f"binding {by} and remote range {rb} are already used by connector "
                                f'"{a.name}"; each (binding, range) pair must be unique',
                                b.name,
                            )
                        )
                    elif ra.overlaps(rb) and not (ra.contains_range(rb) or rb.contains_range(ra)):
                        problems.append(
                            Problem(
                                src,
                                f"{path}.remote_ip_ranges",
                                f'range {rb} partially overlaps {ra} of connector "{a.name}" on binding {by}; '
                                "ranges on one binding must be disjoint or nested",
                                b.name,
                            )
                        )
    for i, c in enumerate(config.receive_connectors):
        ranges = list(c.remote_ip_ranges)
        for x in range(len(ranges)):
            for y in range(x + 1, len(ranges)):
                ra, rb = ranges[x], ranges[y]
                if ra.overlaps(rb) and not (ra.contains_range(rb) or rb.contains_range(ra)):
                    problems.append(
                        Problem(
                            src,
                            f"receive_connectors[{at('receive_connectors', i)}].remote_ip_ranges[{y}]",
                            f"{rb} partially overlaps {ra}",
                            c.name,
                        )
                    )

    domains: dict[str, int] = {}
    for i, d in enumerate(config.accepted_domains):
        path = f"accepted_domains[{at('accepted_domains', i)}].domain"
        if not _DOMAIN.match(d.domain) or len(d.domain) > 256:
            problems.append(Problem(src, path, f"{d.domain!r} is not a domain or '*.domain'"))
        if d.domain in domains:
            problems.append(
                Problem(src, path, f"{d.domain!r} duplicates accepted_domains[{domains[d.domain]}]")
            )
        domains.setdefault(d.domain, at("accepted_domains", i))
    if sum(1 for d in config.accepted_domains if d.default) > 1:
        problems.append(
            Problem(src, "accepted_domains", "only one accepted domain can be the default")
        )

    send_names: dict[str, int] = {}
    for i, s in enumerate(config.send_connectors):
        si = at("send_connectors", i)
        for key, message in _send_rules(s):
            problems.append(Problem(src, f"send_connectors[{si}].{key}", message, s.name))
        if s.name.lower() in send_names:
            problems.append(
                Problem(
                    src,
                    f"send_connectors[{si}].name",
                    f"duplicates send_connectors[{send_names[s.name.lower()]}]",
                    s.name,
                )
            )
        send_names.setdefault(s.name.lower(), si)
    problems.extend(_overflow_rules(config, lambda i: at("send_connectors", i)))

    for n, k in enumerate(config.dkim):
        i = at("dkim", n)
        if not _DOMAIN.match(k.domain) or k.domain.startswith("*."):
            problems.append(Problem(src, f"dkim[{i}].domain", f"{k.domain!r} is not a domain"))
        if not re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*$", k.selector):
            problems.append(
                Problem(src, f"dkim[{i}].selector", f"{k.selector!r} is not a valid selector")
            )

    for i, entry in enumerate(config.server.dns_servers):
        try:
            parse_smart_host(entry, 53)  # the parser the resolver uses (delivery/dns.py)
        except ValueError as exc:
            problems.append(Problem(src, f"server.dns_servers[{i}]", str(exc)))

    for key in _LOG_SIZES:
        if getattr(config.server, key) <= 0:
            problems.append(Problem(src, f"server.{key}", "must be greater than 0"))

    from relaygate.config.values import parse_binding

    try:
        parse_binding(config.admin.listen)
    except ValueError as exc:
        problems.append(Problem(src, "admin.listen", str(exc)))
    problems.extend(_admin_endpoint_rules(config, lambda i: at("receive_connectors", i)))
    if config.admin.metrics_require_token and config.admin.api_token_file is None:
        problems.append(
            Problem(
                src,
                "admin.metrics_require_token",
                "admin.metrics_require_token = true needs admin.api_token_file: /metrics asks "
                "for the API's bearer token, and there is none",
            )
        )
    problems.extend(_queue_rules(config, lambda i: at("receive_connectors", i)))
    raw_server = doc.get("server")
    if not isinstance(raw_server, dict):
        raw_server = {}
    problems.extend(
        Problem(src, f"server.{key}", message) for key, message in _acme_rules(config, raw_server)
    )
    return problems


_ACME_NAME = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)


def _acme_rules(config: Config, raw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """[server] acme_*: the directory URL turns ACME on; the other keys need it; the ACME
    certificate stands for the server-wide tls_certificate_file / tls_key_file."""
    s = config.server
    if not s.acme_directory_url:
        for key in ("acme_email", "acme_domains", "acme_ca_file"):
            if _given(raw, key):
                yield key, "has no effect without server.acme_directory_url; set it or remove this"
        return
    for key in ("tls_certificate_file", "tls_key_file"):
        if getattr(s, key) is not None:
            yield (
                "acme_directory_url",
                f"set either server.acme_directory_url (the relay obtains the certificate) or "
                f"server.{key} (you supply it), not both",
            )
            break
    if not s.acme_directory_url.lower().startswith("https://"):
        yield (
            "acme_directory_url",
            f"{s.acme_directory_url!r} is not an https:// URL (RFC 8555 §6.1)",
        )
    names = s.acme_domains or (s.fqdn,)
    for i, name in enumerate(names):
        where = f"acme_domains[{i}]" if s.acme_domains else "fqdn"
        if name.startswith("*."):
            yield (
                where,
                f"{name!r}: a wildcard name needs the DNS-01 challenge; HTTP-01 cannot prove it",
            )
        elif not _ACME_NAME.match(name.lower().rstrip(".")):
            yield where, f"{name!r} is not a fully qualified host name a public CA can validate"
    if s.acme_email and not re.match(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$", s.acme_email):
        yield "acme_email", f"{s.acme_email!r} is not an email address"
    try:
        from relaygate.config.values import parse_binding

        responder = parse_binding(s.acme_http_listen)
    except ValueError as exc:
        yield "acme_http_listen", str(exc)
    else:
        for other in _listeners_sharing(config, responder):
            yield (
                "acme_http_listen",
                f"{responder} is where {other} listens: the HTTP-01 responder cannot listen "
                "there too (every order would fail); give one of them another port, or forward "
                "port 80 to a free one",
            )
    if s.acme_ca_file is not None and not s.acme_ca_file.is_file():
        yield "acme_ca_file", f"{s.acme_ca_file} is not a file"
    if s.acme_renew_before <= timedelta(0):
        yield "acme_renew_before", "must be greater than 0"
    if s.acme_check_interval < timedelta(seconds=1):
        yield "acme_check_interval", "must be at least 00:00:01"


def _listeners_sharing(config: Config, binding: Any) -> Iterator[str]:
    """The relay's other listeners (enabled receive connectors' bindings, admin.listen) on the
    endpoint of `binding`, named as a problem names them."""
    from relaygate.config.values import parse_binding

    for c in config.receive_connectors:
        if c.enabled:
            for j, other in enumerate(c.bindings):
                if other.shares_endpoint(binding):
                    yield f'receive connector "{c.name}" (bindings[{j}], {other})'
    if config.admin.enabled:
        try:
            admin = parse_binding(config.admin.listen)
        except ValueError:  # reported as admin.listen's own problem
            return
        if admin.shares_endpoint(binding):
            yield f"admin.listen ({admin})"


def _admin_endpoint_rules(config: Config, position: Callable[[int], int]) -> list[Problem]:
    """An enabled receive connector's binding on admin.listen's endpoint: `serve` cannot open both
    (it stopped with 'Address already in use' after `check` had said OK). `position(i)`: the file
    index of the i-th receive connector."""
    from relaygate.config.values import parse_binding

    if not config.admin.enabled:
        return []
    try:
        admin = parse_binding(config.admin.listen)
    except ValueError:  # reported as admin.listen's own problem
        return []
    problems: list[Problem] = []
    for i, c in enumerate(config.receive_connectors):
        if not c.enabled:
            continue
        for j, binding in enumerate(c.bindings):
            if binding.shares_endpoint(admin):
                problems.append(
                    Problem(
                        config.source,
                        f"receive_connectors[{position(i)}].bindings[{j}]",
                        f"{binding} is where admin.listen ({admin}) has the admin centre listen: "
                        "the two cannot share it; give the connector or admin.listen another port",
                        c.name,
                    )
                )
    return problems


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


#: The biggest message the PostgreSQL queue takes: a bytea value holds at most 1 GB, and the
#: stored message is the received one plus its Received header.
PG_MAX_MESSAGE_SIZE = 1023 * 1024 * 1024

#: A lease renewed every third of its length must outlast a delivery's slowest reply wait.
_MIN_LEASE = timedelta(seconds=3)
#: A server.name of the form the worker processes' lease owners take (app.worker_node_id:
#: "<server.name>-w<index>"), found whole in the name.
_WORKER_OWNER_NAME = re.compile(r"(.+)-w[0-9]+")


#: [queue] time spans that 00:00:00 makes harmful (an admin may write it for "none"), and why.
_QUEUE_SPANS_ABOVE_ZERO = (
    (
        "message_expiration_timeout",
        "which expires every message before its first delivery attempt (each gets an NDR); "
        "Exchange's default is 2.00:00:00",
    ),
    ("transient_failure_retry_interval", "which retries a failing destination without pause"),
    ("message_retry_interval", "which retries a failing destination without pause"),
)


def _cluster_name_rules(config: Config) -> list[Problem]:
    """server.name on a shared queue: not a lease owner of another node's worker. The workers
    of node "edge" lease as "edge-w<i>" and a start of "edge" drops those owners' leases, so a
    node named "edge-w1" would share its owner with one of them and lose its leases in flight to
    the other nodes: its messages delivered twice. (On SQLite the queue is this node's alone.)"""
    name = str(config.server.name)
    match = _WORKER_OWNER_NAME.fullmatch(name)
    if match is None:
        return []
    return [
        Problem(
            config.source,
            "server.name",
            f"{name!r} ends in -w<number>, the queue lease owner of the worker processes of a "
            f"node named {match.group(1)!r}: on a shared queue the two nodes would take each "
            "other's leases and deliver messages twice; choose a name without it "
            f"(e.g. {match.group(1) + '-W' + name[match.end(1) + 2 :]!r})",
        )
    ]


def _queue_rules(config: Config, position: Callable[[int], int]) -> list[Problem]:
    """[queue] keys; `position(i)`: the file index of the i-th receive connector."""
    src, q = config.source, config.queue
    problems: list[Problem] = []
    for key, harm in _QUEUE_SPANS_ABOVE_ZERO:
        if key == "transient_failure_retry_interval" and q.transient_failure_retry_count == 0:
            continue  # never waited: no fast retry is made (a file may say 00:00:00 for "none")
        if getattr(q, key) <= timedelta(0):
            problems.append(Problem(src, f"queue.{key}", f"must be greater than 00:00:00, {harm}"))
    if q.lease_duration < _MIN_LEASE:
        problems.append(
            Problem(src, "queue.lease_duration", "must be at least 00:00:03 (3 seconds)")
        )
    admin = q.admin_notification_address.strip()
    if admin:
        why = _not_an_address(admin)
        if why is not None:
            problems.append(
                Problem(
                    src,
                    "queue.admin_notification_address",
                    f"{admin!r} is not a mail address (name@domain){why}",
                )
            )
    if q.store != "postgresql":
        return problems
    problems.extend(_cluster_name_rules(config))
    for i, c in enumerate(config.receive_connectors):
        if c.max_message_size > PG_MAX_MESSAGE_SIZE:
            problems.append(
                Problem(
                    src,
                    f"receive_connectors[{position(i)}].max_message_size",
                    'at most 1023MB with queue.store = "postgresql" (PostgreSQL stores a value '
                    "of at most 1 GB: a bigger message would be accepted and never stored)",
                    c.name,
                )
            )
    if not q.database_url.strip():
        problems.append(
            Problem(
                src,
                "queue.database_url",
                'required with store = "postgresql", e.g. '
                '"postgresql://relaygate@db.corp.example/relaygate"',
            )
        )
        return problems
    url = q.database_url.strip()
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        problems.append(
            Problem(
                src,
                "queue.database_url",
                "must start with postgresql:// (or be a libpq key=value string)",
            )
        )
        return problems
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: its message names what is wrong
        # ...and quotes the offending part of the URL, which may be the password (`check`
        # prints it, `serve` and a refused reload log it): the quoted parts are left out.
        reason = _QUOTED.sub('"…"', " ".join(str(exc).split()))
        problems.append(Problem(src, "queue.database_url", f"not a valid PostgreSQL URL: {reason}"))
    return problems


#: A quoted part of a libpq error message (a token, or the whole URL).
_QUOTED = re.compile(r'"[^"]*"')
