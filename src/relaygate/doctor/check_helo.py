"""The HELO check of `relaygate doctor`: SPF for each name the relay says in EHLO on its send
connectors (RFC 7208 §2.3). Separate from the envelope domain's SPF check (check_spf.py) because it
judges another identity, the only one receivers can check for the relay's null-sender mail."""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver

from .check_spf import _merge_spf
from .dns_records import _txt, zone_txt
from .pyspf_hook import _blocking_twin, _evaluate_spf
from .report import Report
from .spf_record import _spf_records, authorise_ip

__all__ = ["_check_helo", "helo_not_checked"]


# The mail whose SPF verdict rests on the HELO identity alone (RFC 7208 §2.4: an empty MAIL FROM
# is checked as postmaster@<HELO name>).
_NULL_SENDER_MAIL = "the relay's NDRs and DSNs (MAIL FROM:<>, checked by the HELO name alone)"


def _connectors_saying(name: str, connectors: list[str]) -> str:
    quoted = ", ".join(f'"{c}"' for c in connectors)
    if len(connectors) == 1:
        return f"send connector {quoted} says EHLO {name}"
    return f"send connectors {quoted} say EHLO {name}"


async def _check_helo(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    relay_ip: str | None,
    helo_names: dict[str, list[str]],
    source_ips: dict[str, str] | None = None,
) -> None:
    """SPF for each name the relay says in EHLO (RFC 7208 §2.3): receivers may check it for all
    mail, and for the relay's own null-sender mail it is the only identity they can check. A
    problem is a warning: ordinary mail is decided by the envelope domain's record (above).
    `source_ips`: the send connectors that leave from their own public address
    (source_ip_address), judged by it instead of `relay_ip`."""
    own = source_ips or {}
    for name, connectors in helo_names.items():
        by_ip: dict[str | None, list[str]] = {}
        for connector in connectors:
            by_ip.setdefault(own.get(connector) or relay_ip, []).append(connector)
        for ip, group in by_ip.items():
            note = (
                f" It leaves from its source_ip_address {ip}, which is judged here."
                if ip is not None and all(own.get(c) == ip for c in group) and ip != relay_ip
                else ""
            )
            await _check_helo_name(report, resolver, ip, name, group, note)


def helo_not_checked(report: Report, domain: str, helo_names: dict[str, list[str]]) -> None:
    """DOMAIN does not exist and the checks stop: say that the HELO names were not looked up
    either, rather than leave them out as if they had passed."""
    for name, connectors in helo_names.items():
        quoted = ", ".join(f'"{c}"' for c in connectors)
        which = "send connector" if len(connectors) == 1 else "send connectors"
        report.add(
            "HELO",
            "info",
            f"HELO not checked: {domain} does not exist (the HELO name {name} of {which} "
            f"{quoted} was not looked up)",
        )


async def _check_helo_name(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    relay_ip: str | None,
    name: str,
    connectors: list[str],
    note: str = "",
) -> None:
    why = (
        f"The {_connectors_saying(name, connectors)}.{note} RFC 7208 §2.3: receivers check SPF "
        f"for the HELO name, and for mail with the null sender only for it (as postmaster@{name})."
    )
    domain = _fully_qualified(name)
    if domain is None:
        report.add(
            "HELO",
            "warning",
            f"the HELO name {name} is not a fully qualified domain name: receivers cannot check "
            "SPF for the relay's NDRs and DSNs (MAIL FROM:<>), and many refuse such a HELO",
            why,
            "Set fqdn on the send connector (or server.fqdn) to the relay's name in DNS, with an "
            "A record and an SPF record that authorises the relay's public IP.",
        )
        return
    ip_term = f"ip{ipaddress.ip_address(relay_ip).version}:{relay_ip}" if relay_ip else None
    txt = await _txt(resolver, domain)
    if txt.failed:
        report.add(
            "HELO",
            "warning",
            f"SPF lookup for the HELO name {domain} failed ({txt.reply}): receivers get SPF "
            f"temperror for {_NULL_SENDER_MAIL}",
            f"{why} {txt.error}",
            f"Fix the name servers for {domain}: `dig {domain} TXT` must answer.",
        )
        return
    records = _spf_records(txt.records)
    if len(records) != 1:
        if records:
            summary = (
                f"the HELO name {domain} has {len(records)} SPF records: {_NULL_SENDER_MAIL} "
                "get SPF permerror"
            )
            value = _merge_spf(records)
        else:
            summary = f"the HELO name {domain} has no SPF record: {_NULL_SENDER_MAIL} get SPF none"
            value = f"v=spf1 {ip_term or 'ip4:<relay public IP>'} -all"
        report.add("HELO", "warning", summary, why, zone_txt(domain, value))
        return
    record = records[0]
    if not relay_ip:
        report.add(
            "HELO",
            "info",
            f"SPF for the HELO name {domain} not evaluated for the relay: pass --relay-ip with "
            "the relay's public IP",
            f"{why} Record: {record}",
        )
        return
    result, explanation = await asyncio.to_thread(
        _evaluate_spf, _blocking_twin(resolver), relay_ip, f"postmaster@{domain}", domain
    )
    if result == "pass":
        report.add(
            "HELO",
            "ok",
            f"SPF for the HELO name {domain} authorises {relay_ip} (pass)",
            f"{why} pyspf: {explanation}" if explanation else why,
        )
        return
    if result in ("fail", "softfail", "neutral", "none"):
        summary = (
            f"SPF for the HELO name {domain} does not authorise {relay_ip} (SPF {result}): "
            f"{_NULL_SENDER_MAIL} fail SPF"
        )
    else:
        summary = (
            f"SPF check of the HELO name {domain} for {relay_ip} gives {result}: "
            f"{_NULL_SENDER_MAIL} get SPF {result}"
        )
    report.add(
        "HELO",
        "warning",
        summary,
        f"{why} Record: {record}. pyspf: {result} ({explanation})",
        zone_txt(domain, authorise_ip(record, relay_ip)),
    )


def _fully_qualified(name: str) -> str | None:
    """``name`` as DNS spells it if it is a domain of two labels or more, else None (a bare host
    name, an address literal or not a name at all)."""
    from relaygate.doctor import ascii_domain  # the package's refusing spelling (no cycle at call)

    try:
        domain = ascii_domain(name)
    except ValueError:
        return None
    return domain if "." in domain else None
