"""The rules of one receive connector on its own (`_receive_rules`): name, bindings and ranges
required, AuthMechanism combinations, time-outs, the value ranges of §1.4 (`_LIMITS`), banner, TLS.

Apart from `validate`, which adds the rules between connectors (bindings, ranges, names)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from relaygate.config.model import ReceiveConnector
from relaygate.config.validate_values import _given
from relaygate.config.values import format_timespan

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
