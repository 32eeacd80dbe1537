"""The findings about receive connectors: relay ranges too wide or catch-all, externally secured
hosts, missing abuse limits and TLS, and nested ranges on a shared binding, where one connector
takes another's clients (`_shadow_findings`).

The largest group of rules, apart from the server-wide ones."""

from __future__ import annotations

from collections.abc import Iterator

from relaygate.audit.findings import Finding
from relaygate.audit.ranges import (
    _LOOPBACK_V4,
    _LOOPBACK_V6,
    _address,
    _families_covered,
    _family_name,
    _is_all,
    _is_loopback_only,
    _overlap_text,
)
from relaygate.audit.relay_grants import _AUTH_OFFERING, RelayGrant, relay_grant
from relaygate.audit.server import _covers_public_suffix
from relaygate.config.model import Config, ReceiveConnector
from relaygate.policy.rights import is_externally_secured
from relaygate.policy.verdicts import match_accepted_domain

MAX_RANGES = 5  # the seed's heuristic: more than five RemoteIPRanges entries deserves a look
MAX_EXTERNALLY_SECURED_HOSTS = 4


def _state(connector: ReceiveConnector) -> str:
    return (
        ""
        if connector.enabled
        else " (the connector is disabled now, but would do this once enabled)"
    )


def _listed_recipients(c: ReceiveConnector) -> tuple[str, ...]:
    """The entries of allowed_recipients when they narrow what a relay session may send to;
    () when the relay is open to every recipient: no list, `*@*`, or `*@*.<public suffix>`
    (`*@*.com`: every address under .com)."""
    for rule in c.allowed_recipients:
        if rule.kind == "any":
            return ()
        if rule.kind == "subdomains" and _covers_public_suffix(f"*.{rule.value}"):
            return ()
    return tuple(rule.text for rule in c.allowed_recipients)


def _outside_domains(c: ReceiveConnector, config: Config) -> list[str]:
    """The allowed_recipients entries that admit a whole domain (`*@partner.example`) or its
    subdomains outside the accepted domains: anyone the connector relays for may send to every
    mailbox there, through this relay's address and reputation (a relay for that domain)."""
    outside = []
    for rule in c.allowed_recipients:
        if rule.kind == "domain":
            probe = rule.value
        elif rule.kind == "subdomains":
            probe = f"relaygate-audit.{rule.value}"  # any name under it
        else:
            continue
        if match_accepted_domain(probe, config.accepted_domains) is None:
            outside.append(rule.text)
    return outside


def _recipients_text(listed: tuple[str, ...]) -> str:
    shown = ", ".join(listed[:5]) + (f" and {len(listed) - 5} more" if len(listed) > 5 else "")
    return f"the recipients allowed_recipients lists ({shown})"


def _catch_all_finding(
    c: ReceiveConnector,
    families: list[int],
    narrowed: tuple[str, ...],
    outside: list[str],
    grant: RelayGrant,
    note: str,
) -> Finding:
    """A connector every address of a family reaches grants relay: an open relay for anyone, or,
    when allowed_recipients narrows it, a relay for anyone to the listed recipients only."""
    every = f"every {' and '.join(f'IPv{v}' for v in families)} address"
    reach = ", ".join(str(b) for b in c.bindings) or "it"
    if not narrowed:
        return Finding(
            "high",
            "catch-all-relay",
            c.name,
            "permissions" if grant.method_a else "permission_groups",
            f"catch-all connector ({every}) grants relay ({grant.describe()}): it is an open relay for "
            f"anyone who can reach {reach}{note}",
            "never add relay rights to a catch-all connector (like Exchange's Default Frontend): "
            "remove the relay grant here and create a dedicated relay connector whose "
            "remote_ip_ranges list only the devices",
        )
    senders = (
        f"as the senders allowed_senders lists ({', '.join(r.text for r in c.allowed_senders)})"
        if c.allowed_senders
        else "as any sender"
    )
    domains = (
        f" ({', '.join(outside)}: every mailbox of a domain that is not an accepted domain, an "
        "open relay to it)"
        if outside
        else ""
    )
    return Finding(
        # a whole outside domain open to anyone is an open relay to it; listed addresses are not
        "high" if outside else "medium",
        "catch-all-relay-to-listed-recipients",
        c.name,
        "allowed_recipients",
        f"catch-all connector ({every}) grants relay ({grant.describe()}), narrowed by allowed_recipients: "
        f"anyone who can reach {reach} may send to {_recipients_text(narrowed)}{domains}, "
        f"{senders}, and to no other address{note}",
        "if only some devices need to reach these recipients, give them a dedicated relay "
        "connector whose remote_ip_ranges list them and remove the relay grant here; else keep "
        "allowed_recipients this short and set allowed_senders",
    )


def _connector_findings(
    c: ReceiveConnector, config: Config, max_prefix_v4: int, max_prefix_v6: int
) -> Iterator[Finding]:
    grant = relay_grant(c)
    note = _state(c)
    # As the server selects: usage = "Internet" without remote_ip_ranges was given every IPv4
    # address by the loader; written empty, it admits nobody.
    ranges = list(c.remote_ip_ranges)

    if grant.anonymous:
        narrowed = _listed_recipients(c)
        outside = _outside_domains(c, config) if narrowed else []
        catch_all = _families_covered(ranges)
        if catch_all:
            yield _catch_all_finding(c, catch_all, narrowed, outside, grant, note)
        wide = False
        for entry in ranges:
            limit = max_prefix_v4 if entry.version == 4 else max_prefix_v6
            prefix = entry.prefix_length()
            if _is_all(entry):
                what = f"every {_family_name(entry)} address" + (
                    "" if narrowed else " (open relay)"
                )
            elif prefix < limit and not _is_loopback_only(entry):
                what = f"{entry.size:,} addresses (as wide as a /{prefix}, wider than /{limit})"
            else:
                continue
            wide = True
            to_whom = f" to {_recipients_text(narrowed)} only" if narrowed else ""
            yield Finding(
                # to listed addresses only: not the open relay a wide range is otherwise
                "medium" if narrowed and not outside else "high",
                "relay-range-too-wide",
                c.name,
                "remote_ip_ranges",
                f"remote range {entry.text} lets {what} relay through this connector{to_whom} "
                f"({grant.describe()}){note}",
                f"replace {entry.text} with the exact addresses of the printers and applications that relay "
                f'(`relaygate connector set "{c.name}" --remove-remote-ip-ranges {entry.text} '
                "--add-remote-ip-ranges <device IPs>`)",
            )
        if wide and not c.allowed_senders:
            yield Finding(
                "info",
                "relay-without-allowed-senders",
                c.name,
                "allowed_senders",
                "this relay connector accepts a wide range of clients and lets them send as anyone: "
                "allowed_senders is empty",
                "until the range is narrowed, limit the senders the devices really use "
                f'(`relaygate connector set "{c.name}" --allowed-senders scan@corp.example,'
                "*@erp.corp.example`), and the recipients with allowed_recipients",
            )
        if grant.method_a and grant.method_b:
            yield Finding(
                "medium",
                "relay-both-methods",
                c.name,
                "permissions",
                "relay is granted both ways: an explicit Accept-Any-Recipient permission (method A) and "
                "ExternalAuthoritative + ExchangeServers (method B) — use one method, never both",
                "keep method A (AnonymousUsers + permission) unless the hosts really need full trust; then "
                "remove the other grant",
            )
        if c.protocol_logging_level == "None":
            yield Finding(
                "medium",
                "protocol-logging-off",
                c.name,
                "protocol_logging_level",
                "relay connector without protocol logging: nobody can tell later which device sent what",
                f'set protocol_logging_level = "Verbose" (`relaygate connector set "{c.name}" '
                "--protocol-logging-level Verbose`)",
            )
        if "Tls" not in c.auth_mechanism:
            yield Finding(
                "medium",
                "tls-not-offered",
                c.name,
                "auth_mechanism",
                "relay connector does not offer STARTTLS: messages cross the network in clear text",
                f'add Tls to auth_mechanism (`relaygate connector set "{c.name}" --add-auth-mechanism Tls`)',
            )
        elif c.tls_min_version in ("1.0", "1.1"):
            yield Finding(
                "medium",
                "tls-min-version",
                c.name,
                "tls_min_version",
                f"relay connector accepts TLS {c.tls_min_version}, which is deprecated (RFC 8996)",
                'set tls_min_version = "1.2"; if an old device needs TLS 1.0, give it its own connector '
                "listing only that device",
            )
        if c.max_inbound_connection_per_source is None:
            yield Finding(
                "low",
                "per-source-connections-unlimited",
                c.name,
                "max_inbound_connection_per_source",
                "relay connector has no per-source connection limit: one misbehaving client can take every slot",
                "set max_inbound_connection_per_source (Exchange's default is 20)",
            )
        if c.message_rate_limit is None:
            yield Finding(
                "low",
                "message-rate-unlimited",
                c.name,
                "message_rate_limit",
                "relay connector has no message rate limit: a compromised device can send without bound",
                "set message_rate_limit (messages per minute per source), e.g. 60 for printers and scanners",
            )

    if len(c.remote_ip_ranges) > MAX_RANGES:
        yield Finding(
            "info",
            "many-ranges",
            c.name,
            "remote_ip_ranges",
            f"{len(c.remote_ip_ranges)} remote ranges (more than {MAX_RANGES}): review that each one is still "
            "a device that needs this connector",
            "remove ranges of retired devices; `relaygate import exchange` on protocol logs shows which "
            "client IPs really send",
        )

    if is_externally_secured(c):
        hosts = sum(r.size for r in ranges)
        if hosts > MAX_EXTERNALLY_SECURED_HOSTS:
            yield Finding(
                "high",
                "externally-secured-too-many-hosts",
                c.name,
                "auth_mechanism",
                f"ExternalAuthoritative (externally secured) trusts {hosts:,} addresses fully: their mail is "
                "treated as internal and authenticated, any of them can spoof any internal sender, and "
                f"anti-spam and size limits are bypassed{note}",
                "keep ExternalAuthoritative for a short list of hosts secured outside the relay (IPsec, a "
                "dedicated link); move other devices to a method A connector (AnonymousUsers + "
                "Accept-Any-Recipient permission)",
            )

    if (
        "BasicAuth" in c.auth_mechanism
        and "BasicAuthRequireTLS" not in c.auth_mechanism
        and not c.require_tls
        and c.tls_mode != "implicit"  # TLS from the first byte: AUTH is never in clear
    ):
        yield Finding(
            "medium",
            "basic-auth-cleartext",
            c.name,
            "auth_mechanism",
            "BasicAuth is offered before STARTTLS: passwords can cross the network in clear text",
            "add BasicAuthRequireTLS (and Tls) to auth_mechanism, or set require_tls = true",
        )

    if "BasicAuth" in c.auth_mechanism and c.logon_failure_rate_limit is None:
        yield Finding(
            "medium",
            "logon-failures-unlimited",
            c.name,
            "logon_failure_rate_limit",
            "BasicAuth is offered with no limit on failed logons per client address: a client can "
            "guess passwords on fresh connections without bound (max_logon_failures counts per "
            "connection only)",
            "set logon_failure_rate_limit (failed AUTH per minute per address; the default is 6)",
        )

    if "ExchangeUsers" in c.permission_groups and not _AUTH_OFFERING & set(c.auth_mechanism):
        yield Finding(
            "info",
            "exchange-users-without-auth",
            c.name,
            "permission_groups",
            "ExchangeUsers grants relay only to authenticated sessions, but this connector offers no AUTH "
            "(BasicAuth; RelayGate has no Integrated): the group has no effect",
            "remove ExchangeUsers, or offer BasicAuth + BasicAuthRequireTLS if clients should authenticate",
        )

    if grant.anonymous:
        yield from _proxy_in_relay_range(c, config)

    if config.server.trusted_proxies and grant.anonymous:
        loopback = [r for r in ranges if r.overlaps(_LOOPBACK_V4) or r.overlaps(_LOOPBACK_V6)]
        if loopback:
            proxies = ", ".join(p.text for p in config.server.trusted_proxies)
            yield Finding(
                "high",
                "loopback-relay-with-proxies",
                c.name,
                "remote_ip_ranges",
                f"relay ranges include loopback ({', '.join(r.text for r in loopback)}) while "
                f"server.trusted_proxies is set ({proxies}): a proxy or port-forward on this host that "
                "does not send a PROXY header makes every client it forwards appear as loopback, and relay",
                "remove loopback from this relay connector's remote_ip_ranges (use a separate loopback "
                "connector without relay rights for local monitoring), and make the proxy send PROXY headers",
            )


def _proxy_in_relay_range(c: ReceiveConnector, config: Config) -> Iterator[Finding]:
    """A trusted proxy whose own address a relay connector's ranges hold: a PROXY header that
    names no client (v1 UNKNOWN, v2 LOCAL) keeps the proxy's address, so what it forwards that
    way relays. Loopback is `loopback-relay-with-proxies`' (high)."""
    pairs = [
        (proxy, entry)
        for proxy in config.server.trusted_proxies
        for entry in c.remote_ip_ranges
        if proxy.overlaps(entry)
        and not (entry.overlaps(_LOOPBACK_V4) or entry.overlaps(_LOOPBACK_V6))
    ]
    if not pairs:
        return
    shown = ", ".join(f"{proxy.text} in {entry.text}" for proxy, entry in pairs)
    yield Finding(
        "medium",
        "trusted-proxy-in-relay-range",
        c.name,
        "remote_ip_ranges",
        f"server.trusted_proxies and this relay connector's remote ranges share addresses "
        f"({shown}): a PROXY header that names no client (v1 UNKNOWN, v2 LOCAL) keeps the "
        "proxy's own address, so every connection the proxy forwards that way relays, whoever "
        "the client behind it is",
        "remove the proxies' own addresses from this connector's remote_ip_ranges: the devices "
        "behind a proxy arrive with their own addresses in the PROXY header",
    )


def _shadow_findings(config: Config) -> Iterator[Finding]:
    """Nested ranges on a shared binding: the narrower connector takes those clients (info)."""
    connectors = [c for c in config.receive_connectors if c.enabled]
    reported: set[tuple[str, str, str, str]] = set()
    for i, a in enumerate(connectors):
        for b in connectors[i + 1 :]:
            if a.transport_role != b.transport_role:
                continue
            shared = [(x, y) for x in a.bindings for y in b.bindings if x.shares_endpoint(y)]
            if not shared:
                continue
            for ra in a.remote_ip_ranges:
                for rb in b.remote_ip_ranges:
                    if not ra.overlaps(rb) or (ra.first, ra.last) == (rb.first, rb.last):
                        continue
                    x, y = shared[0]
                    if x.is_wildcard != y.is_wildcard:
                        # An exact local address beats a wildcard whatever the ranges.
                        winner, loser = (a, b) if not x.is_wildcard else (b, a)
                        rw, rl = (ra, rb) if winner is a else (rb, ra)
                        bw = x if winner is a else y
                        why = f"it is bound to the exact address {bw}"
                    else:
                        if ra.size == rb.size:
                            continue
                        winner, loser = (a, b) if ra.size < rb.size else (b, a)
                        rw, rl = (ra, rb) if winner is a else (rb, ra)
                        why = f"its range {rw.text} is narrower than {rl.text}"
                    key = (winner.name, loser.name, rw.text, rl.text)
                    if key in reported:
                        continue
                    reported.add(key)
                    binding = y if x.is_wildcard else x
                    gw, gl = relay_grant(winner).anonymous, relay_grant(loser).anonymous
                    effect = ""
                    if gl and not gw:
                        effect = (
                            f' — they lose relay: "{loser.name}" grants Accept-Any-Recipient, '
                            f'"{winner.name}" does not'
                        )
                    elif gw and not gl:
                        effect = f' — they gain relay from "{winner.name}"'
                    yield Finding(
                        "info",
                        "shadowed-range",
                        loser.name,
                        "remote_ip_ranges",
                        f"clients in {_overlap_text(rw, rl)} on binding {binding} are taken by connector "
                        f'"{winner.name}" ({why}), not by "{loser.name}": its settings and rights never '
                        f"apply to them{effect}",
                        f'if those clients belong on "{loser.name}", remove {rw.text} from "{winner.name}"; '
                        f"check with `relaygate explain --client-ip {_address(rw.version, max(rw.first, rl.first))}`",
                    )
