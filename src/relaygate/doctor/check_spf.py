"""The SPF check: the envelope domain's record (one, valid, within the 10 lookups, not open to the
whole Internet) and pyspf's verdict for the relay's IP, with the record to publish.

One module per check family; the record grammar is in spf_record.py, pyspf's DNS in pyspf_hook.py.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver

from .dns_records import _txt, zone_txt
from .pyspf_hook import _blocking_twin, _evaluate_spf
from .report import Report, _State
from .spf_record import (
    _parse_term,
    _spf_records,
    authorise_ip,
    count_spf_lookups,
    spf_syntax_problems,
)

SPF_LOOKUP_LIMIT = 10
_SPF_REJECT = "550 5.7.23 / 550 5.7.1"


async def _check_spf(
    report: Report, resolver: dns.asyncresolver.Resolver, state: _State, relay_ip: str | None
) -> None:
    # receivers evaluate the MAIL FROM domain's record (RFC 7208 §2.4), so that is the one that
    # decides the relay's fate and DMARC's SPF alignment; From's matters only when they are one
    domain = report.envelope_domain or report.domain
    if domain != report.domain:
        report.add(
            "SPF",
            "info",
            f"SPF checked for the envelope (MAIL FROM) domain {domain}: receivers evaluate its "
            f"record, not {report.domain}'s",
            "--envelope-domain (or --sender) names it; mail sent with a MAIL FROM in the From "
            "domain is checked "
            f"against {report.domain}'s record (run the doctor without --envelope-domain).",
        )
    if relay_ip and _is_private(relay_ip):
        report.add(
            "SPF",
            "warning",
            f"--relay-ip {relay_ip} is a private address: receivers see the relay's public (NAT) "
            "address, or the smart host's, so this SPF verdict does not apply to them",
            "Internet hosts never connect from RFC 1918, CGNAT (100.64.0.0/10), loopback, "
            "link-local or unique-local (fc00::/7) addresses.",
            "Run the doctor with the address receivers log for the relay's mail "
            "(the Received: header they add, or `curl -s https://ifconfig.me` from the relay).",
        )
    txt = await _txt(resolver, domain)
    if txt.failed:
        report.add(
            "SPF",
            "error",
            f"SPF lookup for {domain} failed ({txt.reply}): receivers get SPF temperror and "
            "defer the mail (451 4.4.3 / 451 4.7.x) or treat it as failed",
            txt.error,
            f"Fix the name servers for {domain}: `dig {domain} TXT` must answer.",
        )
        state.spf_result = "temperror" if relay_ip else None
        return
    records = _spf_records(txt.records)
    ip_term = f"ip{ipaddress.ip_address(relay_ip).version}:{relay_ip}" if relay_ip else None
    if not records:
        value = f"v=spf1 {ip_term} -all" if ip_term else "v=spf1 mx ip4:<relay public IP> -all"
        report.add(
            "SPF",
            "error",
            f"{domain} has no SPF record: external recipients will answer {_SPF_REJECT} "
            "(SPF none) or file relayed mail as spam",
            "Gmail, Yahoo and Outlook.com require SPF or DKIM on every message, and DMARC cannot "
            "pass on SPF without a record. Add include:spf.protection.outlook.com if Microsoft 365 "
            "also sends for the domain.",
            zone_txt(domain, value),
        )
        state.spf_result = "none" if relay_ip else None
        return
    if len(records) > 1:
        merged = _merge_spf(records)
        report.add(
            "SPF",
            "error",
            f"{domain} has {len(records)} SPF records: receivers treat this as SPF permerror and "
            f"answer {_SPF_REJECT}",
            "RFC 7208 §4.5: exactly one TXT record may start with v=spf1. Found: "
            + " | ".join(records),
            "Replace them with one record: "
            + zone_txt(domain, authorise_ip(merged, relay_ip) if relay_ip else merged),
        )
        state.spf_result = "permerror" if relay_ip else None
        return
    record = records[0]
    state.spf_record = record
    problems = spf_syntax_problems(record)
    if problems:
        report.add(
            "SPF",
            "error",
            f"SPF record of {domain} is invalid: receivers answer {_SPF_REJECT} (SPF permerror)",
            f"Record: {record}. Problems: " + "; ".join(problems),
            "Correct the terms listed (see RFC 7208 §5); for example: "
            + zone_txt(domain, f"v=spf1 {ip_term or 'mx'} -all"),
        )
        state.spf_result = "permerror" if relay_ip else None
        return
    _warn_open_spf(report, domain, record, relay_ip)
    count = await count_spf_lookups(resolver, domain, record)
    structural = False
    if count.total > SPF_LOOKUP_LIMIT:
        structural = True
        heavy = ", ".join(f"{t} ({n})" for t, n in sorted(count.per_term, key=lambda x: -x[1]) if n)
        report.add(
            "SPF",
            "error",
            f"SPF record of {domain} needs {count.total} DNS lookups (limit {SPF_LOOKUP_LIMIT}): "
            f"receivers stop with SPF permerror and answer {_SPF_REJECT}",
            f"Record: {record}. Lookups per term: {heavy}.",
            "Remove includes for services you no longer use, or replace an include with the "
            "ip4:/ip6: ranges it publishes; ip4:/ip6: terms cost no lookup"
            + (f" (the relay needs only {ip_term})." if ip_term else "."),
        )
    if count.problems:
        structural = True
        report.add(
            "SPF",
            "error",
            f"SPF record of {domain} includes broken records: receivers get SPF permerror and "
            f"answer {_SPF_REJECT}",
            f"Record: {record}. " + "; ".join(count.problems),
            "Remove or correct the includes listed.",
        )
    if count.temporary:
        structural = True
        report.add(
            "SPF",
            "error",
            f"SPF record of {domain} includes records whose lookup failed: receivers get SPF "
            "temperror and defer the mail (451 4.4.3 / 451 4.7.x) or treat it as failed",
            f"Record: {record}. " + "; ".join(count.temporary),
            "Fix the name servers of the domains listed (`dig NAME TXT` must answer), or remove "
            "the includes of services you no longer use.",
        )
    if not structural:
        report.add(
            "SPF",
            "ok",
            f"SPF record is valid and needs {count.total} of {SPF_LOOKUP_LIMIT} DNS lookups",
            f"Record: {record}",
        )
    if not relay_ip:
        report.add(
            "SPF",
            "info",
            "SPF not evaluated for the relay: pass --relay-ip with the relay's public IP",
            "The IP receivers see is the relay's public (NAT) address, or the smart host's.",
        )
        return
    sender = report.envelope_sender or f"postmaster@{domain}"
    if count.sender_macros and not report.envelope_sender:
        _warn_sender_dependent(report, domain, count.sender_macros, sender)
    result, explanation = await asyncio.to_thread(
        _evaluate_spf, _blocking_twin(resolver), relay_ip, sender, domain
    )
    state.spf_result = result
    if result == "pass":
        detail = f"pyspf, for {sender}: {explanation}" if explanation else ""
        if structural:
            detail = (
                f"{detail}. The relay's IP matches before the lookup limit or the failing "
                "include is reached; senders matched later in the record get an error."
            ).lstrip(". ")
        report.add("SPF", "ok", f"SPF authorises {relay_ip} (pass)", detail)
        return
    if structural and result in ("permerror", "temperror"):
        return  # already reported with its cause
    fix = zone_txt(domain, authorise_ip(record, relay_ip))
    if result in ("fail", "softfail", "neutral", "none"):
        summary = (
            f"external recipients will answer {_SPF_REJECT} because SPF does not authorise "
            f"{relay_ip} (SPF {result})"
        )
        detail = (
            f"Record: {record}. pyspf, for {sender}: {result} ({explanation}). A softfail or "
            "neutral also fails DMARC's SPF check; with a DMARC quarantine/reject policy the mail "
            "is junked or refused."
        )
    else:
        summary = (
            f"SPF check for {relay_ip} gives {result}: external recipients will answer "
            f"{_SPF_REJECT} (permerror) or defer (temperror)"
        )
        detail = f"Record: {record}. pyspf, for {sender}: {explanation}"
    report.add("SPF", "error", summary, detail, fix)


def _warn_sender_dependent(
    report: Report, domain: str, macros: list[tuple[str, str]], sender: str
) -> None:
    """A record whose verdict depends on the MAIL FROM address (%{l}, %{s}) was evaluated for an
    address the doctor made up: mail from the real senders may get another verdict."""
    where, macro = macros[0]
    whose = "its" if where == domain else f"{where}'s"
    report.add(
        "SPF",
        "warning",
        f"the SPF verdict for {domain} depends on the sender's address ({macro} in {whose} "
        f"record): checked for {sender} only",
        "RFC 7208 §7: %{l} and %{s} expand to the local part and the address of MAIL FROM, so "
        "each sender of the domain can get its own verdict.",
        "Run the doctor with --sender ADDRESS, the MAIL FROM address of the relayed mail.",
    )


def _warn_open_spf(report: Report, domain: str, record: str, relay_ip: str | None) -> None:
    """A pass ``all`` authorises the whole Internet: the relay passes, and so does any spoofer."""
    terms = record.split()
    parsed = [_parse_term(term) for term in terms[1:]]
    alls = [
        i
        for i, (kind, name, _, _) in enumerate(parsed, start=1)
        if kind == "mechanism" and name == "all"
    ]
    if not alls or parsed[alls[0] - 1][3] not in ("", "+"):
        return  # no all, or the first (the one that counts) fails, softfails or is neutral
    idx = alls[0]
    term = terms[idx]
    closed = " ".join([*terms[:idx], "-all", *terms[idx + 1 :]])
    report.add(
        "SPF",
        "warning",
        f"SPF record of {domain} ends in '{term}': it authorises every IP address, so "
        f"anyone can send as {domain} and pass SPF",
        f"Record: {record}. Such a record protects nothing: DMARC cannot tell your mail from "
        "spoofed mail by SPF, and some receivers score '+all' as suspicious.",
        zone_txt(domain, authorise_ip(closed, relay_ip) if relay_ip else closed),
    )


# Addresses an Internet receiver never sees a client connect from. Not ipaddress's is_private:
# that also covers the documentation ranges (192.0.2.0/24...), which examples use as public.
_PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in (
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "fc00::/7",
        "fe80::/10",
        "::1/128",
    )
)


def _is_private(ip: str) -> bool:
    address = ipaddress.ip_address(ip)
    return any(address in net for net in _PRIVATE_NETWORKS if net.version == address.version)


def _merge_spf(records: list[str]) -> str:
    terms: list[str] = []
    tail: list[str] = []
    for rec in records:
        for term in rec.split()[1:]:
            kind, name, _, _ = _parse_term(term)
            if kind == "mechanism" and name == "all":
                if not tail:
                    tail = [term]
            elif term not in terms:
                terms.append(term)
    return " ".join(["v=spf1", *terms, *(tail or ["~all"])])
