"""SPF records as text: RFC 7208 syntax problems, the count of DNS-querying terms (the limit of
10) through includes and redirects, the macros that name the sender, and adding the relay's IP to
a record.

Kept apart from the SPF check (check_spf.py), which words findings from these results: this is
the grammar, that is the advice.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field

import dns.asyncresolver

from .dns_records import _txt

_MACRO = re.compile(r"%(?:\{[slodiphcrtv]\d*r?[.\-+,/_=]*\}|%|_|-)", re.IGNORECASE)
# RFC 7208 §7.1: a domain-spec without macros is macro-literals (visible ASCII but '%') ending in
# "." toplabel; the toplabel is alphanumeric with a letter, or has inner hyphens. Stricter host
# name rules would call records receivers accept a permerror.
_SPEC_LABEL = re.compile(r"[\x21-\x24\x26-\x7e]{1,63}")
_TOPLABEL = re.compile(r"[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9]", re.IGNORECASE)
_MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
_LOOKUP_TERMS = ("include", "a", "mx", "ptr", "exists", "redirect")


def _valid_domain_spec(spec: str) -> bool:
    if "%" in spec:
        return not _MACRO.sub("", spec).count("%")
    labels = (spec[:-1] if spec.endswith(".") else spec).split(".")
    return (
        len(labels) >= 2
        and _TOPLABEL.fullmatch(labels[-1]) is not None
        and all(_SPEC_LABEL.fullmatch(label) for label in labels)
    )


def _split_cidr(value: str) -> tuple[str, list[str]]:
    parts = value.split("/")
    return parts[0], parts[1:]


def _parse_term(term: str) -> tuple[str, str, str, str]:
    """``(kind, name, value, qualifier)``: kind is "mechanism" or "modifier"."""
    m = re.match(r"^([a-z][a-z0-9_.\-]*)=(.*)$", term, re.IGNORECASE)
    if m:
        return "modifier", m.group(1).lower(), m.group(2), ""
    qualifier = term[0] if term[:1] in "+-~?" else ""
    body = term[len(qualifier) :]
    name, sep, value = body.partition(":")
    if not sep and "/" in name:
        name, slash, rest = name.partition("/")
        value = slash + rest
        return "mechanism", name.lower(), value, qualifier
    return "mechanism", name.lower(), (":" + value) if sep else "", qualifier


def spf_syntax_problems(record: str) -> list[str]:
    """RFC 7208 §4.6/§12 syntax problems of one ``v=spf1`` record (empty list: valid)."""
    terms = record.split()
    problems: list[str] = []
    if not terms or terms[0].lower() != "v=spf1":
        return ["the record must start with 'v=spf1'"]
    modifiers: dict[str, int] = {}
    for term in terms[1:]:
        kind, name, value, _ = _parse_term(term)
        if kind == "modifier":
            modifiers[name] = modifiers.get(name, 0) + 1
            if name in ("redirect", "exp") and not _valid_domain_spec(value):
                problems.append(f"'{term}': {name}= needs a domain")
            continue
        if name not in _MECHANISMS:
            problems.append(f"'{term}': unknown mechanism '{name}'")
            continue
        arg = value[1:] if value.startswith(":") else ""
        cidr_text = value if value.startswith("/") else ""
        if name == "all":
            if value:
                problems.append(f"'{term}': 'all' takes no argument")
        elif name in ("include", "exists"):
            if not arg or not _valid_domain_spec(arg):
                problems.append(f"'{term}': {name} needs a domain, as {name}:example.com")
        elif name in ("ip4", "ip6"):
            address, cidrs = _split_cidr(arg)
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                problems.append(f"'{term}': {address!r} is not an IP address")
                continue
            if (name == "ip4") != (ip.version == 4):
                problems.append(f"'{term}': {name} with an IPv{ip.version} address")
                continue
            limit = 32 if name == "ip4" else 128
            if len(cidrs) > 1 or (
                cidrs and not (cidrs[0].isdigit() and 0 <= int(cidrs[0]) <= limit)
            ):
                problems.append(f"'{term}': bad prefix length (0-{limit})")
        else:  # a, mx, ptr
            target, cidr_part = (arg, "") if not arg else _split_domain_cidr(arg)
            if cidr_text:
                cidr_part = cidr_text
            if target and not _valid_domain_spec(target):
                problems.append(f"'{term}': {target!r} is not a domain")
            if name == "ptr" and cidr_part:
                problems.append(f"'{term}': ptr takes no prefix length")
            elif cidr_part and not re.fullmatch(r"(/\d{1,2})?(//\d{1,3})?", cidr_part):
                problems.append(f"'{term}': bad prefix length")
            elif cidr_part:
                nums = re.findall(r"(//?)(\d+)", cidr_part)
                for slash, num in nums:
                    if int(num) > (128 if slash == "//" else 32):
                        problems.append(f"'{term}': bad prefix length")
    for name in ("redirect", "exp"):
        if modifiers.get(name, 0) > 1:
            problems.append(f"{name}= appears {modifiers[name]} times (at most once)")
    return problems


def _split_domain_cidr(arg: str) -> tuple[str, str]:
    idx = arg.find("/")
    return (arg, "") if idx == -1 else (arg[:idx], arg[idx:])


def _spf_records(txts: list[str]) -> list[str]:
    return [t for t in txts if t.lower() == "v=spf1" or t.lower().startswith("v=spf1 ")]


@dataclass
class SpfCount:
    """Result of :func:`count_spf_lookups`."""

    total: int = 0
    per_term: list[tuple[str, int]] = field(default_factory=list)  # top-level term -> lookups
    problems: list[str] = field(default_factory=list)  # permerror for every receiver
    temporary: list[str] = field(default_factory=list)  # a lookup failed: temperror for now
    #: (domain whose record has it, macro) for each macro naming the sender (%{s}, %{l}): the
    #: verdict then depends on the MAIL FROM address, not only on its domain
    sender_macros: list[tuple[str, str]] = field(default_factory=list)


async def count_spf_lookups(
    resolver: dns.asyncresolver.Resolver, domain: str, record: str
) -> SpfCount:
    """DNS-querying terms in ``record`` and everything it includes or redirects to (RFC 7208 §4.6.4).

    include, a, mx, ptr, exists and redirect count one each; include and redirect targets are
    fetched and counted recursively. Targets with macros cannot be expanded here and count one.
    """
    result = SpfCount()
    budget = [60]  # stop runaway chains (each fetch costs one)

    async def walk(rec: str, stack: tuple[str, ...]) -> int:
        total = 0
        terms = rec.split()[1:]
        has_all = any(_parse_term(t)[1] == "all" for t in terms if _parse_term(t)[0] == "mechanism")
        for term in terms:
            kind, name, value, _ = _parse_term(term)
            if kind == "mechanism" and name == "all":
                break  # RFC 7208 §5.1: mechanisms after "all" are never evaluated
            if name != "exp":  # (exp= only words the explanation)
                result.sender_macros.extend((stack[-1], m) for m in _sender_macros(term))
            if name not in _LOOKUP_TERMS or (kind == "modifier") != (name == "redirect"):
                continue
            if name == "redirect" and has_all:
                continue  # ignored when an 'all' is present
            n = 1
            target = value if name == "redirect" else value[1:] if value.startswith(":") else ""
            if name in ("include", "redirect") and target and "%" not in target:
                target = target.rstrip(".").lower()
                if target in stack:
                    result.problems.append(f"{name}:{target} loops back ({' -> '.join(stack)})")
                elif budget[0] > 0:
                    budget[0] -= 1
                    sub = await _txt(resolver, target)
                    recs = _spf_records(sub.records) if sub.status == "ok" else []
                    if sub.failed:
                        result.temporary.append(f"{name}:{target}: {sub.reply}")
                    elif len(recs) != 1:
                        what = "no SPF record" if not recs else f"{len(recs)} SPF records"
                        result.problems.append(
                            f"{name}:{target} has {what} (a permerror for every receiver)"
                        )
                    else:
                        n += await walk(recs[0], (*stack, target))
            if len(stack) == 1:
                result.per_term.append((term, n))
            total += n
        return total

    result.total = await walk(record, (domain.lower(),))
    return result


# RFC 7208 §7.2: s is the MAIL FROM address, l its local part (upper case: URL-escaped)
_SENDER_MACRO = re.compile(r"%\{([sl])[^}]*\}", re.IGNORECASE)


def _sender_macros(term: str) -> list[str]:
    """The macros of ``term`` that name the sender's address or local part ("%{l}", "%{s}")."""
    return [f"%{{{m.group(1).lower()}}}" for m in _SENDER_MACRO.finditer(term)]


def authorise_ip(record: str, ip: str) -> str:
    """``record`` with ``ip4:IP`` / ``ip6:IP`` after its leading pass ``ip4:``/``ip6:`` terms.

    Before every other term: mechanisms are evaluated in order and the first match decides, so
    an earlier ``?ip4:`` / ``-include:`` covering the relay, or the lookups of earlier terms
    reaching the limit of 10, would otherwise still decide against it.
    """
    version = ipaddress.ip_address(ip).version
    mechanism = f"ip{version}:{ip}"
    terms = record.split()
    position = 1
    for term in terms[1:]:
        kind, name, _, qualifier = _parse_term(term)
        if kind != "mechanism" or name not in ("ip4", "ip6") or qualifier not in ("", "+"):
            break
        position += 1
    return " ".join([*terms[:position], mechanism, *terms[position:]])
