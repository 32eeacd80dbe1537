"""The DNS doctor: MX, SPF, DKIM and DMARC for a sending domain, worded with the error admins see.

``await diagnose(domain, resolver=..., relay_ip=..., selector=..., local_dkim_public=...)`` returns
a :class:`Report` of :class:`Finding` s. Each finding names the check (``MX``, ``SPF``, ``DKIM``,
``DMARC``), a severity (``ok`` < ``info`` < ``warning`` < ``error``), a one-line summary that quotes
the reply a sender or receiver gives (``451 4.4.0 DNS query failed. The error was: ServerFailure``,
``550 5.7.23``, ``550 5.7.509``...), a detail and the fix, as the exact record to publish where one
can be given.

All DNS goes through the resolver passed in (the CLI builds it from ``--dns-server`` or
``server.dns_servers``). The SPF evaluation is pyspf's (a real RFC 7208 check of the relay's IP);
pyspf does its own lookups through a module-level ``spf.DNSLookup``, which pyspf_hook.py replaces
once with a dispatcher: inside a doctor run the dispatcher answers from a blocking twin of the
given resolver (same name servers and ports), outside it defers to pyspf's own lookup, so other
users of pyspf in the process are unaffected. The evaluation runs in a worker thread.

A package, one module per check family: check_mx.py, check_spf.py, check_dkim.py,
check_dmarc.py; beside them report.py (the report model), dns_records.py (lookups, zone-file
lines, tag lists), org_domain.py (the organisational domain, from relaygate.public_suffix),
spf_record.py (SPF syntax and lookup count) and pyspf_hook.py (pyspf's DNS). This module holds the entry point, ``diagnose``,
and the normalising of its arguments, and re-exports the public names.
"""

from __future__ import annotations

import asyncio
import ipaddress

import dns.asyncresolver

from relaygate import public_suffix, replies
from relaygate.addresses import AddressError, parse_domain, parse_path

from .check_dkim import _check_dkim, dkim_key_tags
from .check_dmarc import _check_dmarc
from .check_helo import _check_helo, helo_not_checked
from .check_mx import _check_mx
from .check_spf import SPF_LOOKUP_LIMIT as SPF_LOOKUP_LIMIT
from .check_spf import _check_spf
from .dns_records import parse_tags, zone_txt
from .report import SEVERITIES, Finding, Report, _State
from .spf_record import SpfCount as SpfCount
from .spf_record import authorise_ip, count_spf_lookups, spf_syntax_problems

__all__ = [
    "SEVERITIES",
    "Finding",
    "Report",
    "ascii_domain",
    "authorise_ip",
    "count_spf_lookups",
    "diagnose",
    "dkim_key_tags",
    "envelope_address",
    "parse_tags",
    "relay_address",
    "spf_syntax_problems",
    "zone_txt",
]


def ascii_domain(text: str) -> str:
    """``text`` as DNS, zone files and the DKIM signer spell it: lower-case A-labels, no final dot
    (ValueError naming the domain if it cannot be encoded)."""
    name = text.strip()
    try:  # the envelope parser's spelling (IDNA 2008): the relay signs and routes by it
        return parse_domain(name, smtputf8=True, allow_literal=False, error=replies.INVALID_DOMAIN)
    except AddressError as exc:
        raise ValueError(f"{text!r} is not a valid domain name ({exc.reason})") from exc


def envelope_address(text: str) -> str:
    """A MAIL FROM address as the relay sends it: the local part as written, the domain as
    lower-case A-labels (ValueError naming the address if it is not one)."""
    try:
        address = parse_path(
            f"<{text.strip()}>",
            smtputf8=True,
            allow_null=False,
            allow_postmaster=False,
            error=replies.INVALID_SENDER,
        )
    except AddressError as exc:
        raise ValueError(f"{text!r} is not a valid sender address ({exc.reason})") from exc
    assert address is not None  # (allow_null=False)
    if address.is_literal:
        raise ValueError(f"{text!r}: SPF needs a sender address with a domain name")
    return str(address)


def relay_address(text: str) -> str:
    """The relay's IP as SPF sees it: an IPv4-mapped IPv6 address is its IPv4 address.

    RFC 7208 §5: a client connecting over IPv6 with an IPv4-mapped address is evaluated as the
    IPv4 address, so only an ip4: term can authorise it (ValueError if ``text`` is no IP).
    """
    ip = ipaddress.ip_address(text.strip())
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


async def diagnose(
    domain: str,
    *,
    resolver: dns.asyncresolver.Resolver,
    relay_ip: str | None = None,
    selector: str | None = None,
    local_dkim_public: str | None = None,
    dkim_keys: list[tuple[str, str | None]] | None = None,
    envelope_domain: str | None = None,
    signing_domain: str | None = None,
    envelope_sender: str | None = None,
    helo_names: dict[str, list[str]] | None = None,
    helo_source_ips: dict[str, str] | None = None,
) -> Report:
    """Run the MX, SPF, DKIM and DMARC checks for ``domain``.

    relay_ip: the relay's public IP as receivers see it (SPF evaluation; None skips it).
    selector: the DKIM selector the relay signs with (None: reported as not signing).
    local_dkim_public: the relay's key, as a TXT record value (``v=DKIM1; k=...; p=...``) or the
    bare ``p=`` base64; the published record must match it.
    dkim_keys: every (selector, local public record or None) the relay signs with, in place of
    ``selector`` and ``local_dkim_public`` (the relay signs with each enabled key of the domain).
    envelope_domain: the MAIL FROM domain of relayed mail, for SPF alignment (default: the
    sender's domain, else ``domain``).
    envelope_sender: the MAIL FROM address of relayed mail: SPF's %{l} and %{s} macros expand from
    it (default: postmaster@ the envelope domain, with a warning when the record uses them).
    signing_domain: the d= domain the relay signs with (default: ``domain``; the envelope domain
    under ``server.dkim_domain_source = "envelope_sender"``); the selector and key are its.
    helo_names: each name the relay says in EHLO, with the send connectors that say it: SPF is
    checked for it too (check ``HELO``), the only identity of the relay's null-sender mail.
    helo_source_ips: the send connectors (by name) that leave from their own public address
    (source_ip_address): their HELO name is judged by that address, not ``relay_ip``.
    """
    domain = ascii_domain(domain)
    if relay_ip is not None:
        relay_ip = relay_address(relay_ip)
    if envelope_sender is not None:
        envelope_sender = envelope_address(envelope_sender)
        sender_domain = envelope_sender.rpartition("@")[2]
        if envelope_domain is not None and ascii_domain(envelope_domain) != sender_domain:
            raise ValueError(
                f"the envelope sender {envelope_sender} is not in the envelope domain "
                f"{envelope_domain}"
            )
        envelope_domain = sender_domain
    envelope = ascii_domain(envelope_domain or domain)
    signing = ascii_domain(signing_domain or domain)
    if dkim_keys is None:
        dkim_keys = [(selector, local_dkim_public)] if selector else []
    keys = [(sel.strip().lower(), local) for sel, local in dkim_keys]
    report = Report(
        domain=domain,
        relay_ip=relay_ip,
        selector=keys[0][0] if keys else None,
        selectors=[sel for sel, _ in keys],
        envelope_domain=envelope,
        signing_domain=signing,
        envelope_sender=envelope_sender,
    )
    state = _State(signing_domain=signing)
    await _check_mx(report, resolver, state)
    if state.domain_missing:
        for check in ("SPF", "DKIM", "DMARC"):
            report.add(check, "info", f"{check} not checked: {domain} does not exist")
        helo_not_checked(report, domain, helo_names or {})
        return report
    await asyncio.gather(
        _check_spf(report, resolver, state, relay_ip),
        _check_helo(report, resolver, relay_ip, helo_names or {}, helo_source_ips),
        _check_dkim(report, resolver, state, keys),
    )
    await asyncio.to_thread(
        public_suffix.suffix_rules, public_suffix.PUBLIC_SUFFIX_LIST
    )  # reads the file once
    await _check_dmarc(report, resolver, state, relay_ip, envelope)
    order = {c: i for i, c in enumerate(("MX", "SPF", "HELO", "DKIM", "DMARC"))}
    report.findings.sort(key=lambda f: order.get(f.check, 99))
    return report
