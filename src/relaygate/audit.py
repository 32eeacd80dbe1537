"""`relaygate audit`: what the Exchange playbooks check by hand, as findings with a severity and a fix.

Pure: `audit(config)` reads a validated `Config` and returns `Finding`s; it uses the same rights and
selection code as the server (`relaygate.policy`), so "this connector relays" means what the server does.

A *relay connector* is one whose anonymous sessions hold ms-Exch-SMTP-Accept-Any-Recipient, by either
recipe of exchange-semantics.md §3.3: method A (AnonymousUsers plus an explicit permission for
ANONYMOUS LOGON) or method B (ExternalAuthoritative + ExchangeServers, "externally secured").

Certificates: `audit(config, certificates=...)` adds a finding for each certificate that expires within
CERTIFICATE_WARNING_DAYS (medium) or has expired (high); the caller reads the dates
(`relaygate.certificates.read_expiries`: the CLI when it runs, the server at start and reload), so the
function stays pure (but for one existence check, `_acme_findings`, and the permission bits of
the secret files, `_secret_file_findings`).

Severities: high (an open or nearly open relay, full trust for too many hosts; `audit` exits 1),
medium (weakens security or forensics), low (missing abuse limits), info (worth a look).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relaygate.certificates import ENTRA_CREDENTIAL, LISTENER, SMTP_CLIENT, CertificateExpiry
from relaygate.config.model import Config, ReceiveConnector
from relaygate.config.values import IPRange, parse_binding, parse_ip_range, parse_smart_host
from relaygate.file_modes import mode_granting
from relaygate.policy.rights import (
    ACCEPT_ANY_RECIPIENT,
    ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    is_externally_secured,
    session_rights,
)
from relaygate.public_suffix import is_public_suffix

__all__ = [
    "SEVERITIES",
    "Finding",
    "RelayGrant",
    "audit",
    "certificate_findings",
    "has_high",
    "relay_grant",
    "summary",
]

SEVERITIES = ("high", "medium", "low", "info")
MAX_RANGES = 5  # the seed's heuristic: more than five RemoteIPRanges entries deserves a look
MAX_EXTERNALLY_SECURED_HOSTS = 4
#: A certificate that expires within this many days is a medium finding (expired: high).
CERTIFICATE_WARNING_DAYS = 30
_LOOPBACK_V4 = parse_ip_range("127.0.0.0/8")
_LOOPBACK_V6 = parse_ip_range("::1")
#: The auth_mechanism values for which the server offers AUTH. Not Integrated (NTLM/Kerberos needs
#: Active Directory): a connector with only that offers no AUTH at all (smtp.session).
_AUTH_OFFERING = frozenset({"BasicAuth"})


@dataclass(frozen=True, slots=True)
class Finding:
    """One audit result. `connector` is "" for server-wide findings; `key` is the config key to change."""

    severity: str
    code: str
    connector: str
    key: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "connector": self.connector,
            "key": self.key,
            "message": self.message,
            "fix": self.fix,
        }


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """How a connector lets clients relay.

    anonymous: anonymous sessions hold Accept-Any-Recipient (the connector relays for its ranges).
    method_a: explicit permissions granting it to ANONYMOUS LOGON / Everyone (Add-ADPermission).
    method_b: ExternalAuthoritative + ExchangeServers (externally secured, full trust).
    authenticated: sessions that AUTH relay (ExchangeUsers with an AUTH mechanism offered).
    """

    anonymous: bool
    method_a: tuple[str, ...]
    method_b: bool
    authenticated: bool

    def describe(self) -> str:
        parts = []
        if self.method_b:
            parts.append("method B: ExternalAuthoritative + ExchangeServers")
        if self.method_a:
            parts.append(f"method A: permission for {', '.join(self.method_a)}")
        if self.anonymous and not parts:
            parts.append("anonymous grant")
        if not self.anonymous and self.authenticated:
            parts.append("after AUTH only")
        return "; ".join(parts) if parts else "no"


def relay_grant(connector: ReceiveConnector) -> RelayGrant:
    """A session relays when it holds Accept-Any-Recipient and Submit: without Submit its MAIL is
    refused (check_mail), so the relay right alone lets nothing through."""
    anon = session_rights(connector)
    anonymous = anon.may_relay and anon.may_submit
    principals = {p.lower() for p in anon.principals}
    method_a = tuple(
        dict.fromkeys(
            p.user
            for p in connector.permissions
            if not p.deny
            and ACCEPT_ANY_RECIPIENT in p.extended_rights
            and p.user.lower() in principals
        )
    )
    method_b = is_externally_secured(connector) and anonymous
    offers_auth = bool(_AUTH_OFFERING & set(connector.auth_mechanism))
    user = session_rights(connector, authenticated_user="relaygate-audit")
    authenticated = offers_auth and user.may_relay and user.may_submit
    return RelayGrant(anonymous, method_a if anonymous else (), method_b, authenticated)


def _is_all(entry: IPRange) -> bool:
    return entry.prefix_length() == 0


def _families_covered(ranges: Sequence[IPRange]) -> list[int]:
    """The address families (4, 6) every address of which some entry contains: 0.0.0.0/0, and
    also 0.0.0.0/1 + 128.0.0.0/1 or any other set of entries that leaves no gap."""
    covered = []
    for version, last in ((4, 2**32 - 1), (6, 2**128 - 1)):
        reached = -1  # every address up to here is in some entry
        for entry in sorted((r for r in ranges if r.version == version), key=lambda r: r.first):
            if entry.first > reached + 1:
                break
            reached = max(reached, entry.last)
        if reached >= last:
            covered.append(version)
    return covered


def _is_loopback_only(entry: IPRange) -> bool:
    """127.0.0.0/8 or ::1: this machine only, however many addresses it spells (its processes, or
    a proxy on it: `loopback-relay-with-proxies`)."""
    return _LOOPBACK_V4.contains_range(entry) or _LOOPBACK_V6.contains_range(entry)


def _family_name(entry: IPRange) -> str:
    return "IPv4" if entry.version == 4 else "IPv6"


def _address(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _overlap_text(a: IPRange, b: IPRange) -> str:
    first, last = max(a.first, b.first), min(a.last, b.last)
    if first == last:
        return _address(a.version, first)
    return f"{_address(a.version, first)}-{_address(a.version, last)}"


def _state(connector: ReceiveConnector) -> str:
    return (
        ""
        if connector.enabled
        else " (the connector is disabled now, but would do this once enabled)"
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
        catch_all = _families_covered(ranges)
        if catch_all:
            families = " and ".join(f"IPv{v}" for v in catch_all)
            yield Finding(
                "high",
                "catch-all-relay",
                c.name,
                "permissions" if grant.method_a else "permission_groups",
                f"catch-all connector (every {families} address) grants relay ({grant.describe()}): it is an "
                f"open relay for anyone who can reach {', '.join(str(b) for b in c.bindings) or 'it'}{note}",
                "never add relay rights to a catch-all connector (like Exchange's Default Frontend): remove the "
                "relay grant here and create a dedicated relay connector whose remote_ip_ranges list only the "
                "devices",
            )
        wide = False
        for entry in ranges:
            limit = max_prefix_v4 if entry.version == 4 else max_prefix_v6
            prefix = entry.prefix_length()
            if _is_all(entry):
                what = f"every {_family_name(entry)} address (open relay)"
            elif prefix < limit and not _is_loopback_only(entry):
                what = f"{entry.size:,} addresses (as wide as a /{prefix}, wider than /{limit})"
            else:
                continue
            wide = True
            yield Finding(
                "high",
                "relay-range-too-wide",
                c.name,
                "remote_ip_ranges",
                f"remote range {entry.text} lets {what} relay through this connector "
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


def _covers_public_suffix(wildcard: str) -> bool:
    """`*.com`, `*.co.uk`: a wildcard accepted domain whose base is a public suffix."""
    base = wildcard.removeprefix("*.")
    # A single label needs no list; else the list is read once (about 20 ms) and cached.
    return "." not in base or is_public_suffix(base)


def _accepted_domain_findings(config: Config) -> Iterator[Finding]:
    """Every client that may submit may send to an accepted domain, relay right or not (check_rcpt):
    one that covers a public suffix makes the relay open to every address under it."""
    for i, d in enumerate(config.accepted_domains):
        if not d.is_wildcard or not _covers_public_suffix(d.domain):
            continue
        suffix = d.domain.removeprefix("*.")
        anonymous = [
            c.name
            for c in config.receive_connectors
            if c.enabled and session_rights(c).may_submit and not session_rights(c).may_relay
        ]
        who = (
            f"anonymous clients of {', '.join(anonymous)} (no relay right)"
            if anonymous
            else "every client that may submit mail, with or without the relay right"
        )
        yield Finding(
            "high",
            "accepted-domain-public-suffix",
            "",
            f"accepted_domains[{i}].domain",
            f"accepted domain {d.domain} ({d.domain_type}) covers the whole public suffix "
            f".{suffix}: {who} may send to any address under .{suffix}, as if it were the "
            f"organisation's own (an open relay for .{suffix})",
            f'remove it (`relaygate domain remove "{d.domain}"`) and list the organisation\'s '
            "own domains (`*.corp.example` covers a domain and its subdomains)",
        )


def _server_findings(config: Config) -> Iterator[Finding]:
    s = config.server
    if s.workers > 1 and s.worker_balance == "connection":
        yield Finding(
            "low",
            "per-source-limits-per-worker",
            "",
            "server.worker_balance",
            f'worker_balance = "connection" with {s.workers} workers: each worker counts '
            "max_inbound_connection_per_source on its own, so one source can hold up to "
            f"{s.workers} times that many connections (message_rate_limit and "
            "logon_failure_rate_limit are counted for the node)",
            'keep worker_balance = "client_address" (the default) unless one busy client must use '
            "every worker, or divide max_inbound_connection_per_source by the number of workers",
        )


def _proxy_findings(config: Config, max_prefix_v4: int, max_prefix_v6: int) -> Iterator[Finding]:
    """server.trusted_proxies wider than a few load balancers: every host in it may send a PROXY
    header naming any client address, and so choose the connector (and the relay rights) its
    connection gets."""
    broad = [
        p
        for p in config.server.trusted_proxies
        if p.prefix_length() < (max_prefix_v4 if p.version == 4 else max_prefix_v6)
    ]
    if not broad:
        return
    everyone = bool(_families_covered(broad))
    yield Finding(
        "high" if everyone else "medium",
        "trusted-proxies-broad",
        "",
        "server.trusted_proxies",
        f"server.trusted_proxies includes {', '.join(p.text for p in broad)}: any host there may "
        "send a PROXY header naming any client address, and get the connector and relay rights "
        "of that address"
        + (
            " (every client can: an open relay for anyone who knows a relay client's address)"
            if everyone
            else ""
        ),
        "list only the load balancers' or proxies' own addresses",
    )


def _acme_findings(config: Config) -> Iterator[Finding]:
    """ACME on: the last certificate the CA returned was refused (<data_dir>/acme/refused.json,
    written by the ACME client); no certificate obtained yet (whether
    <data_dir>/acme/certificate.pem exists): STARTTLS is not offered."""
    s = config.server
    if not s.acme_directory_url:
        return
    from relaygate.acme import acme_domains, acme_files
    from relaygate.acme.files import read_refused

    cert, key = acme_files(Path(s.data_dir))
    have = cert.exists() and key.exists()
    refused = read_refused(Path(s.data_dir))
    if refused is not None:
        names = ", ".join(str(d) for d in refused.get("domains") or acme_domains(s))
        yield Finding(
            "medium",
            "acme-certificate-refused",
            "",
            "server.acme_directory_url",
            f"the certificate {refused.get('directory_url') or s.acme_directory_url} returned "
            f"for {names} at {refused.get('at', '?')} was not installed "
            f"({refused.get('check', '?')} check): {refused.get('detail', '')}; "
            + (
                "the listeners keep the current certificate"
                if have
                else "there is no certificate yet"
            ),
            "the ACME client retries with back-off (see the relay's log, relaygate.acme); if the "
            "CA keeps returning such a certificate, ask its operator, or point "
            "server.acme_directory_url at another CA",
        )
    if have:
        return
    withheld = [
        c.name
        for c in config.receive_connectors
        if c.enabled and "Tls" in c.auth_mechanism and c.tls_certificate_file is None
    ]
    yield Finding(
        "medium",
        "acme-certificate-missing",
        "",
        "server.acme_directory_url",
        f"no ACME certificate for {', '.join(acme_domains(s))} has been obtained yet from "
        f"{s.acme_directory_url} ({cert} does not exist): STARTTLS is not offered"
        + (f" on {', '.join(withheld)}" if withheld else "")
        + " and implicit-TLS listeners present the self-signed certificate",
        "see the relay's log for the CA's error (relaygate.acme); the CA must reach "
        f"server.acme_http_listen ({s.acme_http_listen}) as port 80 of each name",
    )


#: What a reader of each secret file can do (the finding's message).
_SECRET_EFFECT = {
    "tls_key_file": "read the private key and pose as the relay to its clients",
    "auth_password_file": "read the smart host's password and send as the relay's account",
    "oauth_client_secret_file": "read the app's client secret and get tokens for the mailbox",
    "oauth_client_key_file": "read the app's private key and get tokens for the mailbox",
    "oauth_client_certificate_file": "read the app's private key and get tokens for the mailbox",
    "oauth_service_account_file": "read the service account's key and act as the mailbox",
    "key_file": "read the DKIM private key and sign mail as the domain",
    "users_file": "read the AUTH users' password hashes and guess them offline",
    "api_token_file": "read the admin API token and manage the queue",
}


def _secret_files(config: Config) -> Iterator[tuple[str, str, Path]]:
    """(connector, key, path) of every configured file that holds a secret."""
    s = config.server
    for key in ("tls_key_file", "users_file"):
        if (path := getattr(s, key)) is not None:
            yield "", f"server.{key}", path
    for c in config.receive_connectors:
        if c.tls_key_file is not None:
            yield c.name, "tls_key_file", c.tls_key_file
    for i, sc in enumerate(config.send_connectors):
        keys = ["auth_password_file", "oauth_client_secret_file", "oauth_service_account_file"]
        keys += ["tls_key_file", "oauth_client_key_file"]
        if sc.oauth_client_key_file is None:  # the key is in the certificate file
            keys.append("oauth_client_certificate_file")
        for key in keys:
            if (path := getattr(sc, key)) is not None:
                yield f'send connector "{sc.name}"', f"send_connectors[{i}].{key}", path
    for i, k in enumerate(config.dkim):
        if k.key_file is not None:
            yield "", f"dkim[{i}].key_file", k.key_file
    if config.admin.api_token_file is not None:
        yield "", "admin.api_token_file", config.admin.api_token_file


def _secret_file_findings(config: Config) -> Iterator[Finding]:
    """A secret file readable or writable by every local user (`cp` keeps 0644). Group access
    is left alone (0640 root:relaygate, the packaged layout). One stat per file, like
    `_acme_findings`' existence check; a file that cannot be examined is `check`'s to report."""
    for connector, key, path in _secret_files(config):
        mode = mode_granting(path, 0o007)
        if mode is None:
            continue
        effect = _SECRET_EFFECT[key.rpartition(".")[2]]
        yield Finding(
            "medium",
            "secret-file-readable",
            connector,
            key,
            f"{path} has mode {mode:04o}: every local user can {effect}",
            f"chmod o-rwx {path}",
        )


def _queue_findings(config: Config) -> Iterator[Finding]:
    q = config.queue
    if q.store != "postgresql" or not q.database_url:
        return
    from psycopg.conninfo import conninfo_to_dict

    try:
        has_password = bool(conninfo_to_dict(q.database_url).get("password"))
    except Exception:  # `check` reports a malformed URL
        return
    if has_password:
        yield Finding(
            "low",
            "database-password-in-config",
            "",
            "queue.database_url",
            "queue.database_url holds the database password in the configuration file, where "
            "whoever reads the file (a backup, a support bundle) reads the password",
            "take it out of the URL: libpq reads it from a password file "
            '(database_url = "postgresql://relaygate@db/relaygate?passfile=/etc/relaygate/pgpass", '
            "mode 0600) or from the PGPASSWORD environment variable of relaygate serve",
        )


# Microsoft 365's SMTP AUTH endpoints (client submission), where one mailbox signs in.
_M365_SUBMISSION = ("smtp.office365.com", "smtp-legacy.office365.com", "smtp.office365.us")


#: A tenant's MX endpoint (contoso-com.mail.protection.outlook.com; the newer *.mx.microsoft):
#: relaying there without AUTH is Microsoft 365's connector-based relay (exchange-semantics §9.3).
_M365_MX_SUFFIXES = (".mail.protection.outlook.com", ".mx.microsoft")


def _m365_connector_finding(s: Any, i: int) -> Finding:
    where = f'send connector "{s.name}"'
    if s.tls_certificate_file is not None:
        how = (
            f"by this connector's client certificate ({s.tls_certificate_file}): the tenant's "
            "inbound connector must name its subject (TlsSenderCertificateName)"
        )
        key, fix = (
            "tls_certificate_file",
            "keep the certificate's subject and the inbound connector's "
            "TlsSenderCertificateName the same; renew it before it expires, then reload",
        )
    else:
        how = (
            "by this relay's public IP address (SenderIPAddresses), since no client "
            "certificate is set (tls_certificate_file)"
        )
        key, fix = (
            "tls_certificate_file",
            "create a partner inbound connector in Exchange admin center for this relay's "
            "public IP address; or set tls_certificate_file and tls_key_file to a certificate "
            "whose subject the inbound connector names (TlsSenderCertificateName)",
        )
    return Finding(
        "info",
        "m365-connector-relay",
        where,
        f"send_connectors[{i}].{key}",
        "relays to Microsoft 365's MX without AUTH: mail to other organisations is only "
        f"accepted when the tenant's inbound connector recognises the relay, {how} "
        "(else 550 5.7.64 TenantAttribution; Relay Access Denied)",
        fix,
    )


def _smart_host_auth_cleartext(s: Any, i: int) -> Finding | None:
    """BasicAuth on a send connector that does not require TLS: delivery uses STARTTLS only when
    offered (and retries in clear after a failed handshake), so the password can cross in clear,
    to a smart host without STARTTLS or through anyone who strips it (delivery.client)."""
    if (
        not s.enabled
        or s.delivery_method != "SMTP"
        or s.smart_host_auth_mechanism != "BasicAuth"
        or s.require_tls
        or s.implicit_tls
        or s.tls_auth_level != "EncryptionOnly"
    ):
        return None
    when = (
        "always in clear: ignore_starttls is set"
        if s.ignore_starttls
        else "in clear when the smart host does not offer STARTTLS, or when anyone on the way "
        "strips it or breaks the handshake"
    )
    return Finding(
        "medium",
        "smart-host-auth-cleartext",
        f'send connector "{s.name}"',
        f"send_connectors[{i}].smart_host_auth_mechanism",
        f"BasicAuth without required TLS sends the smart host password ({s.auth_username or 'the account'}) "
        f"{when}",
        f'set smart_host_auth_mechanism = "BasicAuthRequireTLS" (`relaygate send-connector set '
        f'"{s.name}" --smart-host-auth-mechanism BasicAuthRequireTLS`), or require_tls = true',
    )


def _send_connector_findings(config: Config) -> Iterator[Finding]:
    """Microsoft 365 SMTP AUTH through one mailbox: what it refuses that a relay can avoid; a
    smart host password that may cross in clear."""
    by_name = {c.name.lower(): c for c in config.send_connectors}
    for i, s in enumerate(config.send_connectors):
        if (cleartext := _smart_host_auth_cleartext(s, i)) is not None:
            yield cleartext
        overflow = by_name.get(s.overflow_connector.lower()) if s.overflow_connector else None
        if s.enabled and overflow is not None and not overflow.enabled:
            # `check` accepts it (disabling a route must not break the file that names it)
            yield Finding(
                "low",
                "overflow-disabled",
                f'send connector "{s.name}"',
                f"send_connectors[{i}].overflow_connector",
                f'the overflow connector "{overflow.name}" is disabled: what this connector\'s '
                "pacing holds back waits in the queue instead of spilling over",
                f'enable send connector "{overflow.name}", or name another overflow_connector',
            )
        hosts = set()
        for entry in s.smart_hosts:
            try:  # as `check` and delivery read it: any case, a final dot, a port
                hosts.add(parse_smart_host(entry, s.port)[0])
            except ValueError:
                continue  # `check` names it
        if (
            s.enabled
            and s.delivery_method == "SMTP"
            and s.smart_host_auth_mechanism == "None"
            and any(h.endswith(_M365_MX_SUFFIXES) for h in hosts)
        ):
            yield _m365_connector_finding(s, i)
        if (
            not s.enabled
            or s.smart_host_auth_mechanism == "None"
            or not hosts & set(_M365_SUBMISSION)
        ):
            continue
        mailbox = s.auth_username or "the mailbox"
        where = f'send connector "{s.name}"'
        if not s.send_as:
            yield Finding(
                "info",
                "m365-send-as",
                where,
                f"send_connectors[{i}].send_as",
                f"Microsoft 365 accepts over SMTP AUTH only senders {mailbox} may send as "
                "(554 5.2.252 SendAsDenied): the devices' own From addresses are refused unless "
                "the mailbox has Send As rights for each of them",
                f'set send_as = "{s.auth_username or "relay@your.domain"}" to send every message '
                "as the mailbox (the writer is kept as display name and Reply-To)",
            )
        missing = [
            key
            for key in ("max_messages_per_minute", "max_recipients_per_day")
            if getattr(s, key) is None
        ]
        if missing:
            yield Finding(
                "info",
                "m365-quota",
                where,
                f"send_connectors[{i}].{missing[0]}",
                "Microsoft 365 takes 30 messages a minute and 10,000 recipients a day per "
                "mailbox over SMTP AUTH; past them it refuses mail, some of it permanently "
                "(554 5.2.0 ...SubmissionQuotaExceededException bounces it)",
                "set max_messages_per_minute = 30 and max_recipients_per_day = 10000: mail then "
                "waits in the queue instead",
            )


def admin_exposed(config: Config) -> bool:
    """The admin listener answers beyond this machine (not a loopback address) with no API token:
    whoever reaches it can read the queue (senders, recipients, Subjects) and remove messages."""
    return config.admin.api_token_file is None and _admin_on_network(config)


def metrics_exposed(config: Config) -> bool:
    """The admin listener answers beyond this machine and its /metrics needs no token
    (``admin.metrics_require_token`` off): whoever reaches it reads the receive and send connector
    names, certificate file paths, and the queue's and connectors' traffic figures."""
    return not config.admin.metrics_require_token and _admin_on_network(config)


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


def _graph_findings(config: Config) -> Iterator[Finding]:
    """A Graph send connector without a fixed mailbox calls sendMail as each envelope sender."""
    for i, s in enumerate(config.send_connectors):
        if not s.enabled or s.delivery_method != "Graph" or s.graph_mailbox or s.send_as:
            continue
        yield Finding(
            "info",
            "graph-mailbox",
            f'send connector "{s.name}"',
            f"send_connectors[{i}].graph_mailbox",
            "Microsoft Graph sends from the message's envelope sender's mailbox: a device "
            "whose sender is not a mailbox of the tenant gets an NDR (404 or 403 from Graph), "
            "and reports with the null sender cannot be sent at all",
            'set graph_mailbox = "relay@your.domain" (and send_as to the same address to send '
            "every message as it)",
        )


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


_CERTIFICATE_ROLE = {
    LISTENER: (
        "the listener's TLS certificate",
        "clients that verify it refuse STARTTLS (and implicit TLS) with this relay",
    ),
    SMTP_CLIENT: (
        "the client certificate presented to smart hosts",
        "a Microsoft 365 connector or smart host that recognises the relay by it refuses its mail",
    ),
    ENTRA_CREDENTIAL: (
        "the Entra ID certificate credential",
        "Entra ID refuses its token requests and the connector's mail waits in the queue",
    ),
}


def _time_left(left: timedelta) -> str:
    """ "in 12 days", "in 5 hours" under a day (it said "in 0 days"), "within an hour"."""
    if left.days >= 1:
        return f"in {left.days} day{'s' if left.days != 1 else ''}"
    hours = int(left.total_seconds() // 3600)
    if hours >= 1:
        return f"in {hours} hour{'s' if hours != 1 else ''}"
    return "within an hour"


def certificate_findings(
    certificates: Iterable[CertificateExpiry],
    now: datetime,
    *,
    warning_days: int = CERTIFICATE_WARNING_DAYS,
) -> list[Finding]:
    """A finding per certificate expired at `now` (high) or expiring within `warning_days`
    (medium), naming the key, the connector and the date."""
    findings = []
    for cert in certificates:
        ref = cert.ref
        left = cert.not_after - now
        if left >= timedelta(days=warning_days):
            continue
        role, effect = _CERTIFICATE_ROLE.get(ref.use, ("the certificate", "TLS with it fails"))
        date = cert.not_after.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= timedelta(0):
            severity, code = "high", "certificate-expired"
            when = f"expired on {date}"
            effect_text = f": {effect}"
        else:
            severity, code = "medium", "certificate-expiring"
            when = f"expires on {date} ({_time_left(left)})"
            effect_text = f"; after that {effect}"
        findings.append(
            Finding(
                severity,
                code,
                ref.connector,
                ref.key,
                f"{role} {ref.file} {when}{effect_text}",
                (
                    "RelayGate renews it itself (server.acme_renew_before ahead): see the log for "
                    "why it has not (relaygate.acme)"
                    if ref.key == "server.acme_directory_url"
                    else f"renew it, replace {ref.file} and reload (systemctl reload relaygate)"
                )
                + (
                    "; upload the new certificate to the app registration first"
                    if ref.use == ENTRA_CREDENTIAL
                    else ""
                ),
            )
        )
    return findings


def audit(
    config: Config,
    *,
    max_prefix_v4: int = 24,
    max_prefix_v6: int = 64,
    certificates: Sequence[CertificateExpiry] = (),
    now: datetime | None = None,
    users_without_send_as: Sequence[str] = (),
) -> list[Finding]:
    """Every finding for `config`, most severe first (stable within a severity: file order).
    `certificates`: the expiry dates read from the configuration's certificate files (none: no
    certificate findings); `now`: the time they are judged at (default: the current time);
    `users_without_send_as`: the users file's users that have no send-as list (the caller reads
    the file: `UserStore.without_send_as`)."""
    findings: list[Finding] = []
    for connector in config.receive_connectors:
        findings.extend(_connector_findings(connector, config, max_prefix_v4, max_prefix_v6))
    findings.extend(_shadow_findings(config))
    findings.extend(_accepted_domain_findings(config))
    findings.extend(_server_findings(config))
    findings.extend(_proxy_findings(config, max_prefix_v4, max_prefix_v6))
    findings.extend(_acme_findings(config))
    findings.extend(_admin_findings(config))
    findings.extend(_queue_findings(config))
    findings.extend(_secret_file_findings(config))
    findings.extend(_send_connector_findings(config))
    findings.extend(_graph_findings(config))
    findings.extend(_dkim_findings(config))
    findings.extend(_send_as_findings(config, users_without_send_as))
    if certificates:
        findings.extend(certificate_findings(certificates, now or datetime.now(UTC)))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


def _dkim_findings(config: Config) -> Iterator[Finding]:
    """A connector open to every address whose anonymous sessions may send as the organisation:
    anyone can hand in a From of its domains, and RelayGate signs it with their keys (a spoof
    that passes DMARC). A session denied the right is never signed (`relaygate.smtp.session`)."""
    if not any(k.enabled for k in config.dkim):
        return
    for c in config.receive_connectors:
        if not c.enabled or not _families_covered(c.remote_ip_ranges):
            continue
        if not session_rights(c).has(ACCEPT_AUTHORITATIVE_DOMAIN_SENDER):
            continue
        yield Finding(
            "medium",
            "dkim-anyone-signed",
            c.name,
            "permissions",
            f"every address may connect and its anonymous sessions hold "
            f"{ACCEPT_AUTHORITATIVE_DOMAIN_SENDER}: anyone can send From an address of your "
            "domains and RelayGate signs it with their DKIM key, so the spoof passes DMARC",
            f'deny the right to anonymous clients (`relaygate permission add "{c.name}" '
            '--user "NT AUTHORITY\\ANONYMOUS LOGON" --extended-rights '
            f"{ACCEPT_AUTHORITATIVE_DOMAIN_SENDER} --deny`, Exchange's anti-spoofing step); "
            "their messages are then not signed",
        )


def _send_as_findings(config: Config, unlisted: Sequence[str]) -> Iterator[Finding]:
    """A BasicAuth connector where users without a send-as list may submit: each may send as any
    sender the connector allows (any address of your domains, with ExchangeUsers), and with DKIM
    on, RelayGate signs what it wrote. Medium when that holds (signing on, no allowed_senders),
    low otherwise."""
    if not unlisted:
        return
    signing = any(k.enabled for k in config.dkim)
    for c in config.receive_connectors:
        if not c.enabled or "BasicAuth" not in c.auth_mechanism:
            continue
        users = [u for u in unlisted if session_rights(c, authenticated_user=u).may_submit]
        if not users:
            continue
        shown = ", ".join(users[:5]) + (f" and {len(users) - 5} more" if len(users) > 5 else "")
        scope = (
            f"any sender allowed_senders lists ({', '.join(r.text for r in c.allowed_senders)})"
            if c.allowed_senders
            else "any sender the connector's rights allow"
        )
        signed = " and RelayGate DKIM-signs what they write" if signing else ""
        yield Finding(
            "medium" if signing and not c.allowed_senders else "low",
            "auth-users-without-send-as",
            c.name,
            "users_file (send_as)",
            f"user(s) {shown} have no send-as list: after AUTH on this connector each may send "
            f"as {scope}{signed}",
            f"give each user the addresses it sends as: `relaygate user send-as {users[0]} "
            f"'{users[0]}@yourdomain'` (patterns as in allowed_senders)",
        )


def has_high(findings: list[Finding]) -> bool:
    return any(f.severity == "high" for f in findings)


def summary(findings: list[Finding]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
