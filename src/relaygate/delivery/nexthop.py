"""From a send connector and a domain to the ordered list of hosts to try.

* Smart-host connectors: the smart hosts in configured order (``host``, ``host:port``, ``[ip]``,
  ``[ip]:port``, a bare IP), each name resolved to its addresses (IPv4 first); the connector's ``port``
  unless the entry names one. A smart host that does not resolve is skipped; when none resolves the
  route is deferred (``451 4.4.0 DNS query failed. The error was: ...``), never bounced: a smart host
  is the administrator's configuration, so a typo must not bounce a day of invoices.
* DNS-routed connectors: the MX hosts by preference (equal preferences shuffled by the resolver),
  then each host's addresses; no MX → the domain's own A/AAAA (implicit MX); null MX, NXDOMAIN →
  permanent; SERVFAIL/timeouts → transient (see `relaygate.delivery.dns`). MX addresses that are
  loopback, link-local (cloud metadata 169.254.169.254), unspecified, multicast or reserved are refused
  by policy (security-bar §3J 164) unless ``allow_special_addresses`` (loopback ones: the
  connector's ``allow_loopback_mx``, for labs and tests); at most ``max_hops`` addresses
  are kept (Postfix caps at 5 by default; 10 here), from the best ``2 * max_hops`` MX hosts (the
  only ones looked up).
* Loop detection: a hop whose (ip, port) is one of this relay's listening endpoints — the address
  a listener is bound to, or any address of this host (loopback included) at the port of a
  wildcard binding (0.0.0.0 / ::); 0.0.0.0 / :: as the hop's address means loopback — is this
  relay. Among MX hosts, as Postfix does, that hop and every MX of equal or worse preference are
  dropped (we are a backup MX); a smart host that is this relay is dropped. When nothing is left:
  ``554 5.4.6 ROUTING.Loop; the next hop is this relay`` (permanent), unless a better MX, or
  another smart host, gives no usable address now: then transient (``451 4.4.4
  ROUTING.NoPrimaryRelay``, the smart host's ``451 4.4.0 DNS query failed``).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from relaygate import replies
from relaygate.addresses import is_special_destination
from relaygate.config.values import parse_smart_host
from relaygate.delivery.dns import DnsError, Resolver
from relaygate.replies import Reply

__all__ = [
    "MX_SPECIAL_ADDRESS",
    "NextHop",
    "NextHopError",
    "is_local_endpoint",
    "parse_smart_host",
    "resolve_next_hops",
]

log = logging.getLogger("relaygate.delivery")

from relaygate.replies import MX_SPECIAL_ADDRESS  # noqa: E402

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class NextHopError(Exception):
    """No usable next hop. reply: for the recipients; permanent: bounce (True) or retry later."""

    def __init__(self, reply: Reply, permanent: bool) -> None:
        super().__init__(reply.line())
        self.reply = reply
        self.permanent = permanent

    def __repr__(self) -> str:
        return f"NextHopError({self.reply.line()!r}, permanent={self.permanent})"


@dataclass(frozen=True, slots=True)
class NextHop:
    """One address to connect to.

    host: the smart host or MX name (the IP for an IP literal); ip: the address to connect to;
    port: TCP port; tls_name: the name a DomainValidation certificate must carry (the connector's
    tls_domain, else host); preference: the MX preference (None for smart hosts).
    """

    host: str
    ip: str
    port: int
    tls_name: str
    preference: int | None = None

    @property
    def label(self) -> str:
        """``host[ip]:port`` (``[ip]:port`` for an IP literal), for logs and the queue's next hop."""
        if self.host == self.ip:
            return f"[{self.ip}]:{self.port}"
        return f"{self.host}[{self.ip}]:{self.port}"

    def __str__(self) -> str:
        return self.label


def _ip(text: str) -> IpAddress | None:
    t = text.strip()
    if t.startswith("[") and t.endswith("]"):
        t = t[1:-1]
    if t.lower().startswith("ipv6:"):
        t = t[5:]
    try:
        addr = ipaddress.ip_address(t)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


_LOOPBACK: dict[int, IpAddress] = {
    4: ipaddress.IPv4Address("127.0.0.1"),
    6: ipaddress.IPv6Address("::1"),
}


def is_local_endpoint(ip: str, port: int, local_endpoints: Iterable[tuple[str, int]]) -> bool:
    """True if connecting to (ip, port) would reach this relay's own listener: one bound to
    that address, or a wildcard one and the address is this host's. Another loopback address
    at one of our ports is another server (a relay on 127.0.0.1:25 is not reached at
    127.0.0.2:25 or [::1]:25): taken for this relay, its mail bounced as a loop."""
    addr = _ip(ip)
    if addr is None:
        return False
    if addr.is_unspecified:
        # The kernel connects to 0.0.0.0 / :: as to the loopback address of that family.
        addr = _LOOPBACK[addr.version]
    for lip, lport in local_endpoints:
        if lport != port:
            continue
        bound = _ip(lip) if lip not in ("", "*") else ipaddress.IPv4Address("0.0.0.0")
        if bound is None:
            continue
        if bound == addr:
            return True
        # A wildcard socket receives connections to every address of this host: 0.0.0.0 those
        # of IPv4, :: those of IPv6 (and of IPv4 when dual-stack, which a loop check assumes).
        if (
            bound.is_unspecified
            and (bound.version == addr.version or bound.version == 6)
            and is_own_address(str(addr))
        ):
            return True
    return False


@functools.lru_cache(maxsize=1024)
def is_own_address(ip: str) -> bool:
    """True if `ip` is an address of this host: only those can be bound (no packet is sent).
    Remembered: a host's addresses rarely change, and a next hop is checked per delivery."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.bind((ip, 0))
    except OSError:
        return False
    return True


async def _addresses(resolver: Resolver, host: str) -> list[str] | DnsError:
    try:
        return await resolver.addresses(host)
    except DnsError as exc:
        return exc


async def resolve_next_hops(
    connector: Any,
    domain: str,
    resolver: Resolver,
    *,
    local_endpoints: Iterable[tuple[str, int]] = (),
    local_names: Iterable[str] = (),
    allow_special_addresses: bool = False,
    max_hops: int = 10,
) -> list[NextHop]:
    """The hops to try, in order. Raises NextHopError (with reply and permanence) when there are none.

    local_endpoints: this relay's listeners (a next hop there is a loop); local_names: its own
    host names (server.fqdn, the connectors' fqdn): an MX host with one of them is looked up
    whatever the cap on MX hosts, so that its address can be checked against the listeners."""
    endpoints = list(local_endpoints)
    port_default = int(getattr(connector, "port", 25) or 25)
    tls_domain = (getattr(connector, "tls_domain", "") or "").strip()
    smart_hosts = list(getattr(connector, "smart_hosts", ()) or ())
    if not getattr(connector, "dns_routing_enabled", False):
        if not smart_hosts:
            raise NextHopError(replies.NO_NEXT_HOP, True)
        return await _smart_host_hops(
            smart_hosts, port_default, tls_domain, resolver, endpoints, max_hops
        )
    return await _mx_hops(
        domain,
        port_default,
        tls_domain,
        resolver,
        endpoints,
        allow_special_addresses,
        bool(getattr(connector, "allow_loopback_mx", False)),
        max_hops,
        frozenset(n.strip().rstrip(".").lower() for n in local_names),
    )


async def _smart_host_hops(
    smart_hosts: list[str],
    port_default: int,
    tls_domain: str,
    resolver: Resolver,
    endpoints: list[tuple[str, int]],
    max_hops: int,
) -> list[NextHop]:
    parsed = _parse_smart_hosts(tuple(smart_hosts), port_default)
    if all(is_ip for _host, _port, is_ip in parsed):
        hops = _literal_hops(
            tuple(smart_hosts), port_default, tls_domain, tuple(endpoints), max_hops
        )
        return list(hops)
    lookups = await asyncio.gather(
        *(
            _addresses(resolver, host) if not is_ip else _literal(host)
            for host, _port, is_ip in parsed
        )
    )
    return _collect_hops(parsed, lookups, tls_domain, endpoints, max_hops)


@functools.lru_cache(maxsize=256)
def _literal_hops(
    smart_hosts: tuple[str, ...],
    port_default: int,
    tls_domain: str,
    endpoints: tuple[tuple[str, int], ...],
    max_hops: int,
) -> tuple[NextHop, ...]:
    """Smart hosts that are all IP literals need no DNS: their hops are a function of the
    configuration, worked out once (an error, such as every host being this relay, is raised
    every time: lru_cache keeps no exception)."""
    parsed = _parse_smart_hosts(smart_hosts, port_default)
    lookups = [[host] for host, _port, _is_ip in parsed]
    return tuple(_collect_hops(parsed, lookups, tls_domain, list(endpoints), max_hops))


def _collect_hops(
    parsed: list[tuple[str, int, bool]],
    lookups: Sequence[list[str] | DnsError],
    tls_domain: str,
    endpoints: list[tuple[str, int]],
    max_hops: int,
) -> list[NextHop]:
    """The smart hosts' addresses in order, without this relay's own; NextHopError if none."""
    hops: list[NextHop] = []
    errors: list[DnsError] = []
    looped = 0
    for (host, port, _is_ip), result in zip(parsed, lookups, strict=True):
        if isinstance(result, DnsError):
            log.warning("smart host %s does not resolve: %s", host, result.reply.line())
            errors.append(result)
            continue
        for ip in result:
            if is_local_endpoint(ip, port, endpoints):
                log.warning("smart host %s [%s]:%d is this relay; skipped", host, ip, port)
                looped += 1
                continue
            hops.append(NextHop(host, ip, port, tls_domain or host))
    if hops:
        return hops[:max_hops]
    if errors:
        # Before the loop: a smart host that does not resolve now may later, and the mail then
        # goes to it; only when every smart host is this relay is there nothing to wait for.
        first = errors[0]
        reply = first.reply
        if first.permanent:
            reply = replies.dns_query_failed(replies.DNS_NONEXISTENT_DOMAIN.text)
        raise NextHopError(reply, False)
    if looped:
        raise NextHopError(replies.LOOP_DETECTED, True)
    raise NextHopError(replies.dns_query_failed("ErrorRetry"), False)


@functools.lru_cache(maxsize=256)
def _parse_smart_hosts(
    smart_hosts: tuple[str, ...], port_default: int
) -> list[tuple[str, int, bool]]:
    """The connector's smart hosts parsed once per configuration, not once per message."""
    return [parse_smart_host(h, port_default) for h in smart_hosts]


async def _literal(host: str) -> list[str]:
    return [host]


def _own_names_first(mx: list[tuple[int, str]], own_names: frozenset[str]) -> list[tuple[int, str]]:
    """The MX hosts (by preference, equal ones shuffled) with those named as this relay first
    among their equals: looked up whatever the cap, so that the relay among more equal hosts
    than the cap is seen (by its address) and its equals are not made next hops. Only the
    order among equals changes (it was random): a name that is another server's is a hop."""
    return sorted(mx, key=lambda record: (record[0], record[1] not in own_names))


async def _mx_hops(
    domain: str,
    port: int,
    tls_domain: str,
    resolver: Resolver,
    endpoints: list[tuple[str, int]],
    allow_special: bool,
    allow_loopback: bool,
    max_hops: int,
    own_names: frozenset[str] = frozenset(),
) -> list[NextHop]:
    try:
        mx = await resolver.mx(domain)
    except DnsError as exc:
        raise NextHopError(exc.reply, exc.permanent) from exc
    if own_names:
        mx = _own_names_first(mx, own_names)
    # Only the best hosts: at most max_hops addresses are tried, and a domain may publish
    # hundreds of MX records, each host two queries at every attempt of every message to it.
    # Twice as many hosts as addresses tried leaves room to skip hosts that do not resolve.
    mx = mx[: 2 * max_hops]
    lookups = await asyncio.gather(*(_addresses(resolver, host) for _pref, host in mx))
    candidates: list[NextHop] = []
    errors: list[DnsError] = []
    loop_pref: int | None = None
    refused = 0
    seen: set[str] = set()
    for (pref, host), result in zip(mx, lookups, strict=True):
        if isinstance(result, DnsError):
            errors.append(result)
            continue
        for ip in result:
            if ip in seen:
                # Two MX names for one address (a provider's mx1 and mx2 on one machine): one
                # hop, at its best preference; twice, a timeout there was waited for twice.
                continue
            seen.add(ip)
            if is_local_endpoint(ip, port, endpoints):
                loop_pref = pref if loop_pref is None else min(loop_pref, pref)
                continue
            addr = _ip(ip)
            if (
                addr is not None
                and is_special_destination(addr)
                and not allow_special
                and not (allow_loopback and addr.is_loopback)
            ):
                log.warning("MX %s of %s resolves to %s; refused by policy", host, domain, ip)
                refused += 1
                continue
            # An address literal ([192.0.2.1], [IPv6:2001:db8::1]) is named by its address.
            name = ip if host.startswith("[") else host
            candidates.append(NextHop(name, ip, port, tls_domain or name, pref))
    if loop_pref is not None:
        candidates = [
            h for h in candidates if h.preference is not None and h.preference < loop_pref
        ]
        if not candidates:
            if any(pref < loop_pref for pref, _host in mx):
                # A better MX exists but gives no usable address now (a DNS failure, a host
                # being renumbered): as a backup MX we wait for it, never bounce (Postfix's
                # "unable to find primary relay").
                raise NextHopError(replies.primary_relay_not_found(domain), False)
            raise NextHopError(replies.LOOP_DETECTED, True)
    if candidates:
        return candidates[:max_hops]
    if refused:
        raise NextHopError(MX_SPECIAL_ADDRESS, False)
    transient = [e for e in errors if not e.permanent]
    if transient:
        raise NextHopError(transient[0].reply, False)
    # no MX and the domain has no address (implicit MX), or no MX host exists / has an address
    raise NextHopError(replies.DNS_NONEXISTENT_DOMAIN, True)
