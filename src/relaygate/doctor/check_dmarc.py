"""The DMARC check: the From domain's record (or its organisational domain's), its policy, and
whether relayed mail aligns through SPF or DKIM given what those checks found.

One module per check family; ``diagnose`` runs it last, on the state the SPF and DKIM checks left.
"""

from __future__ import annotations

import re

import dns.asyncresolver

from .dns_records import _txt, parse_tags, zone_txt
from .org_domain import _aligned_relaxed, _org_domain
from .report import Report, _State
from .spf_record import authorise_ip

_DMARC_REJECT = "550 5.7.509 / DMARC"


_DMARC_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(?:;|$)", re.IGNORECASE)


def _is_dmarc_record(text: str) -> bool:
    """RFC 7489 §6.6.3: a DMARC record starts with the tag v=DMARC1 (WSP allowed around '=');
    "v=DMARC10" or "v=DMARC1x" are other texts, not a second record."""
    return _DMARC_VERSION.match(text.lstrip()) is not None


async def _check_dmarc(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    state: _State,
    relay_ip: str | None,
    envelope_domain: str,
) -> None:
    domain = report.domain
    name = f"_dmarc.{domain}"
    found_at = domain
    txt = await _txt(resolver, name)
    records: list[str] = []
    if not txt.failed and txt.status == "ok":
        records = [r for r in txt.records if _is_dmarc_record(r)]
    org = _org_domain(domain)
    if not txt.failed and not records and org != domain:
        parent = await _txt(resolver, f"_dmarc.{org}")
        if parent.status == "ok":
            records = [r for r in parent.records if _is_dmarc_record(r)]
            found_at = org
        txt = parent if parent.failed else txt
    if txt.failed:
        report.add(
            "DMARC",
            "error",
            f"DMARC lookup for {name} failed ({txt.reply}): receivers get DMARC temperror and "
            "may defer the mail",
            txt.error,
            f"Fix the name servers for {domain}: `dig {name} TXT` must answer.",
        )
        return
    suggested = zone_txt(name, f"v=DMARC1; p=none; rua=mailto:dmarc-reports@{domain}")
    if not records:
        report.add(
            "DMARC",
            "warning",
            f"{domain} has no DMARC record: Gmail, Yahoo and Outlook.com expect one (550 5.7.26 / "
            "550 5.7.515 for bulk senders) and nobody can report spoofing of the domain to you",
            "Start with p=none and a report address, check the reports, then move to "
            "quarantine/reject once relayed mail aligns.",
            suggested,
        )
        return
    if len(records) > 1:
        report.add(
            "DMARC",
            "error",
            f"{len(records)} DMARC records at _dmarc.{found_at}: receivers ignore DMARC for the "
            "domain (RFC 7489 §6.6.3)",
            " | ".join(records),
            "Keep exactly one v=DMARC1 record.",
        )
        return
    tags = parse_tags(records[0])
    policy = (tags or {}).get("p", "").lower()
    if found_at != domain and tags and "sp" in tags:
        policy = tags["sp"].lower()
    if tags is None or policy not in ("none", "quarantine", "reject"):
        report.add(
            "DMARC",
            "error",
            f"DMARC record at _dmarc.{found_at} is invalid (p= missing or wrong): receivers ignore it",
            f"Record: {records[0]}",
            suggested,
        )
        return
    where = "" if found_at == domain else f" (inherited from {found_at})"
    aspf = tags.get("aspf", "r").lower()
    if aspf == "s":
        envelope_aligns = envelope_domain == domain
    else:
        envelope_aligns = _aligned_relaxed(envelope_domain, domain)
    spf_result = state.spf_result  # the envelope domain's (see _check_spf)
    at_envelope = f" at {envelope_domain}" if envelope_domain != domain else ""
    spf_aligned: bool | None
    if spf_result is None:
        spf_aligned = None if envelope_aligns else False
    else:
        spf_aligned = spf_result == "pass" and envelope_aligns
    adkim = tags.get("adkim", "r").lower()
    signing = state.signing_domain or domain
    signature_aligns = signing == domain if adkim == "s" else _aligned_relaxed(signing, domain)
    dkim_aligned = state.dkim_ok and signature_aligns
    reasons = []
    if spf_aligned is False:
        if not envelope_aligns:
            reasons.append(
                f"SPF: the envelope sender domain {envelope_domain} does not align with "
                f"{domain} (aspf={aspf})"
            )
        else:
            reasons.append(f"SPF: {spf_result} for {relay_ip}{at_envelope}")
    elif spf_aligned is None:
        reasons.append("SPF: not evaluated (pass --relay-ip)")
    if state.dkim_ok and not signature_aligns:
        reasons.append(
            f"DKIM: the relay signs with d={signing}, which does not align with {domain} "
            f"(adkim={adkim})"
        )
    elif not dkim_aligned and state.dkim_ed25519_ok:
        reasons.append(
            f"DKIM: the relay signs {signing} with Ed25519 only, which Gmail, Microsoft 365 and "
            "Yahoo do not verify"
        )
    elif not dkim_aligned:
        reasons.append("DKIM: the relay has no matching published key for " + signing)
    pct = tags.get("pct", "100")
    detail = f"Record{where}: {records[0]}. " + "; ".join(reasons)
    if pct != "100":
        detail += f". pct={pct}: the policy applies to {pct}% of failing mail"
    if spf_aligned or dkim_aligned:
        via = " and ".join(n for n, ok in (("SPF", spf_aligned), ("DKIM", dkim_aligned)) if ok)
        report.add(
            "DMARC",
            "ok",
            f"DMARC p={policy}{where}; relayed mail aligns via {via}",
            f"Record: {records[0]}",
        )
        return
    fixes = []
    if spf_aligned is not True and relay_ip and envelope_aligns and state.spf_record:
        fixes.append(zone_txt(envelope_domain, authorise_ip(state.spf_record, relay_ip)))
    if not dkim_aligned and not signature_aligns:
        fixes.append(
            f'sign with the From domain\'s key: server.dkim_domain_source = "header_from" and '
            f"a [[dkim]] entry for {domain}"
        )
    elif not dkim_aligned:
        kind = "an rsa-sha256 DKIM key" if state.dkim_ed25519_ok else "a DKIM key"
        fixes.append(
            f"sign with {kind} for {domain}: relaygate dkim new --domain {domain} "
            "--selector s1, add the [[dkim]] entry, publish its TXT record"
        )
    if policy in ("reject", "quarantine"):
        if spf_aligned is None:
            report.add(
                "DMARC",
                "warning",
                f"DMARC p={policy}{where}: relayed mail aligns only if SPF authorises the relay's "
                "IP; DKIM does not align. Run with --relay-ip to check",
                detail,
                "; ".join(fixes),
            )
            return
        verb = "reject" if policy == "reject" else "quarantine"
        report.add(
            "DMARC",
            "error",
            f"receivers will {verb} relayed mail ({_DMARC_REJECT}): neither SPF nor DKIM aligns "
            f"with From: @{domain} (p={policy}{where})",
            detail,
            "; ".join(fixes),
        )
        return
    report.add(
        "DMARC",
        "warning",
        f"DMARC p=none{where}: relayed mail does not align, so it would be refused once the "
        "policy moves to quarantine/reject",
        detail,
        "; ".join(fixes),
    )
