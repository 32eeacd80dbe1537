"""Cross-field rules: what New-/Set-ReceiveConnector and New-SendConnector refuse, plus RelayGate's own.

Each rule yields a `Problem` naming the file, connector and key. Rules (exchange-semantics.md §1–§2):
unique names; bindings and RemoteIPRanges required (except Internet usage); no two connectors with the
same binding and the same range; ranges on a shared binding nested, never partially overlapping; a
FrontendTransport and a HubTransport connector never share a binding; an implicit-TLS and a STARTTLS
connector never share a listening socket; AuthMechanism combinations
(None alone; ExternalAuthoritative needs ExchangeServers and combines only with Tls;
BasicAuthRequireTLS needs BasicAuth and Tls; RequireTLS needs Tls); ConnectionTimeout above
ConnectionInactivityTimeout; value ranges from §1.4; banner starting with 220.

This module holds `validate` (the rules between connectors, accepted domains, DKIM, [server] and
[admin] keys) and calls the rules of its sibling modules, one seam each: validate_receive.py (one
receive connector), validate_send.py (one send connector, overflow connectors), validate_cloud.py
(Entra ID, Google and Graph connectors), validate_server.py (ACME, admin.listen's endpoint),
validate_queue.py ([queue]), validate_values.py (the questions they share).
"""

from __future__ import annotations

import re
from typing import Any

import idna

from relaygate.config.loader import Problem
from relaygate.config.model import Config
from relaygate.config.validate_queue import PG_MAX_MESSAGE_SIZE as PG_MAX_MESSAGE_SIZE
from relaygate.config.validate_queue import _queue_rules
from relaygate.config.validate_receive import _receive_rules
from relaygate.config.validate_send import _overflow_rules, _send_rules
from relaygate.config.validate_server import _acme_rules, _admin_endpoint_rules
from relaygate.config.values import Binding, parse_smart_host, wildcard_covers

__all__ = ["validate"]


_DOMAIN = re.compile(
    r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)

# The log writers (logs/rotation.py LogDirectory) refuse a size of 0 when `serve` starts.
_LOG_SIZES = (
    "receive_protocol_log_max_file_size",
    "receive_protocol_log_max_directory_size",
    "message_tracking_log_max_file_size",
    "message_tracking_log_max_directory_size",
)


def _one_socket(config: Config, x: Binding, y: Binding) -> bool:
    """True when the relay receives the connections of `x` and `y` on one listening socket: the same
    binding, or a wildcard and an address it covers (smtp/listener_sockets.py
    `listener_bindings`; two wildcards are two sockets)."""
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
            problems.append(
                Problem(
                    src,
                    path,
                    f"{d.domain!r} is not a domain or '*.domain'{_a_label_hint(d.domain)}",
                )
            )
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
            problems.append(
                Problem(
                    src,
                    f"dkim[{i}].domain",
                    f"{k.domain!r} is not a domain{_a_label_hint(k.domain)}",
                )
            )
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
    if (config.admin.tls_certificate_file is None) != (config.admin.tls_key_file is None):
        problems.append(
            Problem(
                src,
                "admin.tls_certificate_file",
                "set both admin.tls_certificate_file and admin.tls_key_file (HTTPS on the admin "
                "listener), or neither",
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


def _a_label_hint(domain: str) -> str:
    """For a domain written with U-labels (`bücher.example`): the A-label form to write instead,
    as DNS and the wire carry it (IDNA 2008); "" for anything else."""
    if domain.isascii():
        return ""
    wildcard, name = ("*.", domain[2:]) if domain.startswith("*.") else ("", domain)
    try:
        a_labels = idna.encode(name.lower()).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return ""
    return f" (write it as its A-label form {wildcard + a_labels!r})"
