"""The MX check: the domain exists, its MX hosts (or its implicit MX) resolve, no null MX beside
mail hosts, no MX naming an alias.

One module per check family; ``diagnose`` (__init__.py) runs it first, since a domain that does
not exist makes the other checks moot.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver

from relaygate import replies
from relaygate.addresses import is_special_destination
from relaygate.delivery.dns import MX_NAMES_ADDRESSES

from .dns_records import _Lookup, _query
from .report import Report, _State


async def _check_mx(report: Report, resolver: dns.asyncresolver.Resolver, state: _State) -> None:
    domain = report.domain
    mx = await _query(resolver, domain, "MX")
    if mx.failed:
        report.add(
            "MX",
            "error",
            f"MX lookup for {domain} failed: {mx.reply}",
            "The domain's name servers did not answer (SERVFAIL or timeout). Relays keep mail for "
            f"{domain} in the retry queue with this error and receivers that check the sender "
            "domain defer mail from it.",
            f"Check the delegation and the authoritative servers: `dig +trace {domain} MX`; "
            "a broken DNSSEC chain or a lame name server are the usual causes.",
        )
        return
    if mx.status == "nxdomain":
        state.domain_missing = True
        report.add(
            "MX",
            "error",
            f"{domain} does not exist in DNS (NXDOMAIN): mail to it fails with "
            f"{replies.DNS_NONEXISTENT_DOMAIN.line()}",
            "Receivers that check the sender domain reject mail from it too "
            "(550 5.1.8 / 450 4.1.8 Sender address rejected: Domain not found).",
            "Check the spelling of the domain, and that it is registered and delegated to your "
            "name servers (NS records at the registrar).",
        )
        return
    hosts = sorted(
        (int(r.preference), r.exchange.to_text(omit_final_dot=True).lower()) for r in mx.records
    )
    if hosts and all(h in ("", ".") for _, h in hosts):
        report.add(
            "MX",
            "error",
            f"{domain} publishes a null MX: it accepts no mail ({replies.NULL_MX.line()}); "
            "receivers reject mail sent from it with 550 5.7.27 Sender address has null MX",
            "RFC 7505: a domain with MX '0 .' declares it neither receives nor should be used as "
            "a sender address; relayed mail with this From domain is refused.",
            f"Replace the null MX with your mail host: `{domain}. 3600 IN MX 10 mail.{domain}.`",
        )
        return
    if not hosts:
        a = await _query(resolver, domain, "A")
        aaaa = await _query(resolver, domain, "AAAA")
        failure = _address_failure(a, aaaa)
        if failure is not None:
            report.add(
                "MX",
                "error",
                f"{domain} has no MX record and the address lookup for the implicit MX failed: "
                f"{failure.reply}",
                f"{failure.error}. Senders queue replies and NDRs for {domain} with this error.",
                f"Fix the name servers for {domain}: `dig {domain} A` must answer; better, "
                f"publish an MX record: `{domain}. 3600 IN MX 10 <your mail host>.`",
            )
        elif own := _special_addresses(a, aaaa):
            report.add(
                "MX",
                "error",
                f"{domain} has no MX record, and its own address, which senders would use "
                f"instead (implicit MX), is one mail is not sent to: {', '.join(own)}",
                "Relays do not connect to a loopback, link-local, multicast, unspecified or "
                f"reserved address: mail to {domain} waits in their queues "
                f"({replies.MX_SPECIAL_ADDRESS.line()}) until it expires.",
                f"Publish an MX record: `{domain}. 3600 IN MX 10 <your mail host>.`",
            )
        elif a.status == "ok" or aaaa.status == "ok":
            report.add(
                "MX",
                "warning",
                f"{domain} has no MX record; senders fall back to its A/AAAA record (implicit MX)",
                "Mail to the domain (replies, NDRs) goes to the web server's address, which "
                "usually does not run SMTP.",
                f"Publish an MX record: `{domain}. 3600 IN MX 10 <your mail host>.`",
            )
        else:
            report.add(
                "MX",
                "error",
                f"{domain} has no MX and no A record: replies and NDRs cannot be delivered, and "
                "receivers that check the sender domain answer 550 5.1.8 / 450 4.1.8 Sender "
                "address rejected: Domain not found",
                "Relays route to the MX hosts, else to the domain's own address; it has neither.",
                f"Publish an MX record: `{domain}. 3600 IN MX 10 <your mail host>.`",
            )
        return
    real = [(p, h) for p, h in hosts if h not in ("", ".")]
    listing = ", ".join(f"{p} {h}" for p, h in real)
    if len(real) < len(hosts):
        report.add(
            "MX",
            "warning",
            f"{domain} publishes a null MX next to mail hosts ({listing}): RFC 7505 forbids it, "
            f"and senders that honour the null MX refuse mail to the domain "
            f"({replies.NULL_MX.line()})",
            "RFC 7505 §3: a domain with a null MX (MX 0 .) must publish no other MX record.",
            f"Remove the null MX: `{domain}. IN MX 0 .`",
        )
    numeric = [(p, h) for p, h in real if _names_address(h)]
    if numeric:
        real = [(p, h) for p, h in real if not _names_address(h)]
        _report_numeric_mx(report, domain, listing, numeric, alone=not real)
        if not real:
            return
    checks = await asyncio.gather(
        *(asyncio.gather(_query(resolver, h, "A"), _query(resolver, h, "AAAA")) for _, h in real)
    )
    failed = [
        (h, failure)
        for (_, h), (a, aaaa) in zip(real, checks, strict=True)
        if (failure := _address_failure(a, aaaa)) is not None
    ]
    unresolved = [
        h
        for (_, h), (a, aaaa) in zip(real, checks, strict=True)
        if "ok" not in (a.status, aaaa.status) and _address_failure(a, aaaa) is None
    ]
    for host, failure in failed:
        # an error when no MX host is known to resolve: mail to the domain waits in queues
        alone = len(failed) + len(unresolved) == len(real)
        report.add(
            "MX",
            "error" if alone else "warning",
            f"address lookup for MX host {host} failed: {failure.reply}",
            f"MX records: {listing}. {failure.error}. Senders skip a host they cannot resolve "
            "and queue the mail when none resolves.",
            f"Fix the name servers of {host}: `dig {host} A` must answer.",
        )
    aliases = [
        (p, h, target)
        for (p, h), (a, aaaa) in zip(real, checks, strict=True)
        if (target := _alias_target(h, a, aaaa))
    ]
    if aliases:
        report.add(
            "MX",
            "warning",
            "MX host(s) that are aliases (CNAME): "
            + ", ".join(f"{h} -> {target}" for _, h, target in aliases),
            f"MX records: {listing}. RFC 2181 §10.3: an MX must name a host, not an alias; most "
            "senders follow the CNAME, some refuse or log it as a misconfiguration.",
            "Point the MX at the host itself: "
            + "; ".join(f"`{domain}. 3600 IN MX {p} {target}.`" for p, _, target in aliases),
        )
    if unresolved:
        # No MX host with an address and no lookup failing for now: the domain takes no mail,
        # and senders say so at once (RelayGate's next hops, Postfix, Exim); not a retry.
        none = len(unresolved) == len(real)
        report.add(
            "MX",
            "error" if none else "warning",
            f"MX host(s) without an address: {', '.join(unresolved)}",
            f"MX records: {listing}. Senders skip hosts they cannot resolve"
            + (
                f"; with none left, mail to {domain} is returned to its senders at once "
                f"({replies.DNS_NONEXISTENT_DOMAIN.line()})."
                if none
                else "."
            ),
            "Publish A/AAAA records for the MX hosts, or point the MX at hosts that have them "
            "(an MX must not point at a CNAME or an IP address).",
        )
    special = [
        (h, addresses)
        for (_, h), (a, aaaa) in zip(real, checks, strict=True)
        if (addresses := _special_addresses(a, aaaa))
    ]
    if special:
        usable = len(real) - len(special) - len(unresolved) - len(failed)
        _report_special_mx(report, domain, listing, special, usable=usable)
    if not unresolved and not failed and not aliases and not special:
        report.add("MX", "ok", f"MX: {listing}", "Every MX host resolves to an address.")


def _special_addresses(a: _Lookup, aaaa: _Lookup) -> list[str]:
    """A host's addresses when every one is an address delivery does not connect to (loopback,
    link-local, ...: relaygate.delivery.nexthop); [] when it has none or one that is usable."""
    found = [r.to_text() for lookup in (a, aaaa) if lookup.status == "ok" for r in lookup.records]
    special = [ip for ip in found if is_special_destination(ipaddress.ip_address(ip))]
    return special if special and len(special) == len(found) else []


def _report_special_mx(
    report: Report, domain: str, listing: str, special: list[tuple[str, list[str]]], *, usable: int
) -> None:
    """MX hosts on loopback or other special addresses: senders do not connect there (delivery
    defers with 451 4.4.4 SpecialAddress, as it would for a misconfiguration or an attack from
    the domain's DNS); with no other MX host, mail to the domain waits in queues until it expires."""
    alone = usable == 0
    report.add(
        "MX",
        "error" if alone else "warning",
        "MX host(s) on addresses mail is not sent to (loopback, link-local, multicast, "
        "unspecified or reserved): "
        + ", ".join(f"{h} ({', '.join(addresses)})" for h, addresses in special),
        f"MX records: {listing}. Relays do not connect to such an address (RelayGate, unless "
        "a send connector's allow_loopback_mx lets loopback through for a lab)"
        + (
            f"; with no other MX host, mail to {domain} waits in their queues "
            f"({replies.MX_SPECIAL_ADDRESS.line()}) until it expires."
            if alone
            else "; the other MX hosts take the mail."
        ),
        "Point the MX records at hosts with public addresses.",
    )


def _names_address(host: str) -> bool:
    """An MX target that is an IP address (bare or as a literal), not a host name."""
    text = host.strip("[]")
    try:
        ipaddress.ip_address(text[5:] if text.lower().startswith("ipv6:") else text)
    except ValueError:
        return False
    return True


def _report_numeric_mx(
    report: Report, domain: str, listing: str, numeric: list[tuple[int, str]], *, alone: bool
) -> None:
    """MX records naming an IP address: senders skip them (RFC 1035 §3.3.9 wants a host name),
    as delivery does (relaygate.delivery.dns); with no other host, mail waits in queues."""
    report.add(
        "MX",
        "error" if alone else "warning",
        "MX record(s) naming an IP address instead of a host: " + ", ".join(h for _, h in numeric),
        f"MX records: {listing}. An MX names a host (RFC 1035 §3.3.9); senders skip an address "
        "written there (Postfix, Exim, RelayGate)"
        + (
            f"; with no other MX host, mail to {domain} waits in their queues "
            f"({replies.dns_query_failed(MX_NAMES_ADDRESSES).line()}) until it expires."
            if alone
            else "."
        ),
        "Point the MX at a host name that has the address: "
        + "; ".join(f"`{domain}. 3600 IN MX {p} mail.{domain}.`" for p, _ in numeric[:1])
        + f" and `mail.{domain}. 3600 IN A {numeric[0][1].strip('[]')}`.",
    )


def _alias_target(host: str, a: _Lookup, aaaa: _Lookup) -> str:
    """The canonical name ``host`` is a CNAME for ("" when it is a host name itself)."""
    for lookup in (a, aaaa):
        if lookup.status == "ok" and lookup.canonical and lookup.canonical != host:
            return lookup.canonical
    return ""


def _address_failure(a: _Lookup, aaaa: _Lookup) -> _Lookup | None:
    """The failed lookup when neither A nor AAAA answered: a DNS error, not a missing address."""
    if "ok" in (a.status, aaaa.status):
        return None
    return a if a.failed else aaaa if aaaa.failed else None
