"""DNS for delivery: MX and address lookups through dnspython's asyncio resolver.

Failures carry the reply Exchange would put in the queue's LastError / the NDR
(shared/reference/exchange-semantics.md §5.6, security-bar.md §3J item 164):

* NXDOMAIN → permanent ``550 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain``;
* SERVFAIL (every server failed) → transient ``451 4.4.0 DNS query failed. The error was: ServerFailure``;
* timeout or any other resolver trouble → transient ``... The error was: ErrorRetry``;
* no MX record → the implicit MX of RFC 5321 §5.1: the domain itself at preference 0;
* null MX (RFC 7505: one MX ``0 .``) → permanent ``550 5.1.10 SMTPSEND.DNS.NullMx``.

Answers are kept (`AnswerCache`, dnspython's LRU cache) for their TTL, as Exchange's transport
keeps its own DNS cache: a message to a domain otherwise cost an MX query and A + AAAA per host,
round trips to a remote server each time. dnspython keeps NOERROR answers (NODATA too) and
NXDOMAIN, by their TTL or the SOA's negative TTL (RFC 2308); never a SERVFAIL or a timeout, so a
failed lookup is asked again at the next attempt. Each `Resolver` has its own cache, and a reload
builds a new `Resolver`: it starts empty (an operator who changed an MX record reloads).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Iterable, Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from relaygate import replies
from relaygate.config.values import parse_smart_host
from relaygate.replies import Reply

__all__ = ["AnswerCache", "DnsError", "Resolver", "no_system_server", "parse_dns_server"]

log = logging.getLogger(__name__)

#: The system resolver's configuration, read when `server.dns_servers` is empty.
SYSTEM_RESOLV_CONF = "/etc/resolv.conf"

#: Why a domain whose every MX record names an IP address (RFC 1035 §3.3.9 wants a host name)
#: gets no next hop.
MX_NAMES_ADDRESSES = "the MX records name IP addresses, not hosts"

#: Answers kept per `Resolver` (per process), the least recently used dropped first. One is about
#: 3.5 kB (the parsed reply of a few records): some 15 MB when full, the MX answers and host
#: addresses of about a thousand domains in use.
CACHE_ENTRIES = 4096
#: The longest an answer is kept, whatever its TTL (records of a day are common): an MX or A
#: record changed at the far end is used within the hour, while a relay still asks the server
#: for a busy domain only once an hour (unbound's cache-max-ttl, one day by default, lowered).
CACHE_MAX_TTL = 3600.0
#: The longest a NODATA or NXDOMAIN is kept: an NXDOMAIN returns the mail to its sender, so a
#: domain or host just created must not be refused for long (dnspython keeps a negative answer
#: without an SOA as long; Windows' DNS client keeps them 15 minutes).
CACHE_MAX_NEGATIVE_TTL = 300.0


class DnsError(Exception):
    """A lookup failed. reply: the reply for the recipients; permanent: bounce (True) or retry."""

    def __init__(self, reply: Reply, permanent: bool, name: str = "") -> None:
        super().__init__(reply.line())
        self.reply = reply
        self.permanent = permanent
        self.name = name

    def __repr__(self) -> str:
        return f"DnsError({self.reply.line()!r}, permanent={self.permanent}, name={self.name!r})"


def parse_dns_server(spec: str) -> tuple[str, int]:
    """``"host"``, ``"host:port"``, ``"[v6]"``, ``"[v6]:port"`` or a bare IPv6 → (ip, port).

    A host name is resolved once, here (configuration time), because a resolver needs addresses.
    """
    # The smart hosts' parser, which `relaygate check` applies to server.dns_servers too: an
    # entry check accepts is one the resolver can be built from (a port of 99999 or "dns" was
    # accepted by check and stopped serve with a traceback).
    host, port, is_ip = parse_smart_host(spec, 53)
    if is_ip:
        return host, port
    return str(socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0][4][0]), port


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _strip_brackets(host: str) -> str:
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
        if h.lower().startswith("ipv6:"):
            h = h[5:]
    return h


def no_system_server(path: str, exc: dns.resolver.NoResolverConfiguration) -> str:
    """Why dnspython could not build the system resolver from `path`, in a few words."""
    why = "names none" if "no nameservers" in str(exc) else "cannot be read"
    return f"no DNS server: {path} {why}"


class AnswerCache(dns.resolver.LRUCache):
    """dnspython's bounded LRU cache of answers, each kept for its TTL but no longer than
    CACHE_MAX_TTL (CACHE_MAX_NEGATIVE_TTL for a NODATA or NXDOMAIN, which has no records)."""

    def __init__(self, max_size: int = CACHE_ENTRIES) -> None:
        super().__init__(max_size)

    def put(self, key: dns.resolver.CacheKey, value: dns.resolver.Answer) -> None:
        cap = CACHE_MAX_TTL if value.rrset is not None else CACHE_MAX_NEGATIVE_TTL
        value.expiration = min(value.expiration, time.time() + cap)
        super().put(key, value)


class Resolver:
    """Asynchronous MX and address lookups with Exchange-worded failures.

    dns_servers: ``server.dns_servers`` ("host" / "host:port"); empty → the system resolver
    (/etc/resolv.conf). timeout: per server try; lifetime: per query in total. prefer_ipv6: order AAAA
    before A in `addresses`. rng: for shuffling equal-preference MX hosts and a host's addresses
    (tests pass a seeded one). The resolver it builds keeps answers (`AnswerCache`).
    resolver: an already configured ``dns.asyncresolver.Resolver`` (tests), used as it is (with
    its cache, if any). resolv_conf: the system resolver's file (default SYSTEM_RESOLV_CONF); one
    that is missing or names no server leaves the resolver `unusable`: built, every lookup
    failing for now with the reason.
    """

    def __init__(
        self,
        dns_servers: Sequence[str] | None = None,
        *,
        timeout: float = 5.0,
        lifetime: float = 15.0,
        prefer_ipv6: bool = False,
        rng: random.Random | None = None,
        resolver: dns.asyncresolver.Resolver | None = None,
        resolv_conf: str | None = None,
    ) -> None:
        #: Why no lookup can be made ("" when they can): the reply's reason for every lookup.
        self.unusable = ""
        if resolver is None:
            if dns_servers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(ip, port)
                    for ip, port in (parse_dns_server(s) for s in dns_servers)
                ]
            else:
                resolver = self._system_resolver(resolv_conf or SYSTEM_RESOLV_CONF)
            resolver.timeout = timeout
            resolver.lifetime = lifetime
            resolver.cache = AnswerCache()
        self._resolver = resolver
        self.prefer_ipv6 = prefer_ipv6
        self._rng = rng or random.Random()

    def _system_resolver(self, path: str) -> dns.asyncresolver.Resolver:
        """The system resolver from `path`; without a server there (the file empty, missing,
        unreadable: dnspython refuses to build one, which stopped the relay's start with a
        traceback) one with none, and `unusable` says why, in the log now and in every
        lookup's reply: mail routed by DNS waits (451 4.4.0) rather than the relay not
        starting, and smart hosts given as addresses still take mail."""
        try:
            return dns.asyncresolver.Resolver(filename=path)
        except dns.resolver.NoResolverConfiguration as exc:
            self.unusable = f"{no_system_server(path, exc)} and server.dns_servers is empty"
            log.error("%s: mail routed by DNS waits in the queue until one is set", self.unusable)
            return dns.asyncresolver.Resolver(configure=False)

    @classmethod
    def from_config(cls, config: Any, **kwargs: Any) -> Resolver:
        """Built from a `Config` (uses ``config.server.dns_servers``)."""
        servers = list(getattr(getattr(config, "server", None), "dns_servers", ()) or ())
        return cls(servers, **kwargs)

    @property
    def dnspython_resolver(self) -> dns.asyncresolver.Resolver:
        return self._resolver

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer, None for NODATA; raises DnsError for everything else."""
        if self.unusable:
            raise DnsError(replies.dns_query_failed(self.unusable), False, name)
        try:
            return await self._resolver.resolve(name, rdtype, search=False)
        except dns.resolver.NXDOMAIN as exc:
            raise DnsError(replies.DNS_NONEXISTENT_DOMAIN, True, name) from exc
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as exc:
            raise DnsError(replies.dns_query_failed("ServerFailure"), False, name) from exc
        except dns.exception.Timeout as exc:
            raise DnsError(replies.dns_query_failed("ErrorRetry"), False, name) from exc
        except (dns.name.EmptyLabel, dns.name.LabelTooLong, dns.name.NameTooLong) as exc:
            raise DnsError(replies.DNS_NONEXISTENT_DOMAIN, True, name) from exc
        except dns.exception.DNSException as exc:
            raise DnsError(replies.dns_query_failed("ErrorRetry"), False, name) from exc

    def _shuffle_equal(self, records: Iterable[tuple[int, str]]) -> list[tuple[int, str]]:
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            by_pref.setdefault(pref, []).append(host)
        out: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            hosts = by_pref[pref]
            self._rng.shuffle(hosts)
            out.extend((pref, h) for h in hosts)
        return out

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX hosts by preference (equal preferences shuffled); host names without trailing dot.

        No MX → ``[(0, domain)]`` (implicit MX, RFC 5321 §5.1). Null MX → DnsError(NULL_MX,
        permanent). An address literal domain (``[192.0.2.1]``) is returned as itself. A record
        whose target is an IP address is skipped; if every record is, a transient DnsError.
        """
        name = domain.strip().rstrip(".")
        if name.startswith("["):
            return [(0, name)]
        answer = await self._query(name, "MX")
        if answer is None:
            return [(0, name)]
        best: dict[str, int] = {}  # a host listed twice is tried once, at its best preference
        null_seen = False
        numeric: list[str] = []
        for rr in answer:
            target = rr.exchange.to_text(omit_final_dot=True)
            if target in ("", "."):
                null_seen = True
                continue
            if _is_ip(_strip_brackets(target)):
                # RFC 1035 §3.3.9: the exchange is a domain name. An address written there is
                # skipped, as Postfix ("numeric domain name in resource data of MX record") and
                # Exim (allow_mx_to_ip = false) do, rather than connected to as if it were a host.
                numeric.append(target)
                continue
            host, pref = target.lower(), int(rr.preference)
            best[host] = min(pref, best.get(host, pref))
        if numeric:
            log.warning("MX records of %s name IP addresses, skipped: %s", name, ", ".join(numeric))
        records = [(pref, host) for host, pref in best.items()]
        if not records:
            if null_seen:
                raise DnsError(replies.NULL_MX, True, name)
            if numeric:
                # Transient: the domain's owner may fix the records before the message expires.
                raise DnsError(replies.dns_query_failed(MX_NAMES_ADDRESSES), False, name)
            return [(0, name)]
        # RFC 7505 §3: a null MX must stand alone; a "." mixed with real hosts is ignored.
        return self._shuffle_equal(records)

    async def addresses(self, host: str) -> list[str]:
        """IPv4 then IPv6 addresses of `host` (AAAA first with prefer_ipv6), each family shuffled;
        an IP literal (bare or bracketed) is returned as is. No address at all → []. NXDOMAIN → permanent DnsError. If one
        family fails transiently and the other answers, the answer is used; both failing → the
        first error."""
        h = _strip_brackets(host)
        if _is_ip(h):
            return [str(ipaddress.ip_address(h))]
        name = h.rstrip(".")
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        v4: list[str] = []
        v6: list[str] = []
        errors: list[DnsError] = []
        for result, bucket in zip(results, (v4, v6), strict=True):
            if isinstance(result, DnsError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
            elif result is not None:
                bucket.extend(rr.address for rr in result)
        permanent = [e for e in errors if e.permanent]
        if permanent and not (v4 or v6):
            raise permanent[0]
        if errors and not (v4 or v6):
            raise errors[0]
        # Shuffled (Postfix's smtp_randomize_addresses): in the order a DNS server lists them,
        # every connection went to the first, and each attempt waited for it while it was down.
        self._rng.shuffle(v4)
        self._rng.shuffle(v6)
        return v6 + v4 if self.prefer_ipv6 else v4 + v6
