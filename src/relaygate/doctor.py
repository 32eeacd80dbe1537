"""The DNS doctor: MX, SPF, DKIM and DMARC for a sending domain, worded with the error admins see.

``await diagnose(domain, resolver=..., relay_ip=..., selector=..., local_dkim_public=...)`` returns
a :class:`Report` of :class:`Finding` s. Each finding names the check (``MX``, ``SPF``, ``DKIM``,
``DMARC``), a severity (``ok`` < ``info`` < ``warning`` < ``error``), a one-line summary that quotes
the reply a sender or receiver gives (``451 4.4.0 DNS query failed. The error was: ServerFailure``,
``550 5.7.23``, ``550 5.7.509``...), a detail and the fix, as the exact record to publish where one
can be given.

All DNS goes through the resolver passed in (the CLI builds it from ``--dns-server`` or
``server.dns_servers``). The SPF evaluation is pyspf's (a real RFC 7208 check of the relay's IP);
pyspf does its own lookups through a module-level ``spf.DNSLookup``, which this module replaces once
with a dispatcher: inside a doctor run the dispatcher answers from a blocking twin of the given
resolver (same name servers and ports), outside it defers to pyspf's own lookup, so other users of
pyspf in the process are unaffected. The evaluation runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import ipaddress
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import spf
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import load_der_public_key

from relaygate import replies
from relaygate.addresses import AddressError, parse_domain, parse_path
from relaygate.addresses import ascii_domain as ascii_spelling

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

SEVERITIES = ("ok", "info", "warning", "error")
SPF_LOOKUP_LIMIT = 10
_SPF_REJECT = "550 5.7.23 / 550 5.7.1"
_DMARC_REJECT = "550 5.7.509 / DMARC"


# ============================================================================== report
@dataclass
class Finding:
    check: str
    severity: str
    summary: str
    detail: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Report:
    domain: str
    relay_ip: str | None = None
    selector: str | None = None  # the first of `selectors`
    findings: list[Finding] = field(default_factory=list)
    envelope_domain: str | None = None  # MAIL FROM domain checked for SPF alignment
    signing_domain: str | None = None  # the d= of the relay's signatures (DKIM alignment)
    envelope_sender: str | None = None
    selectors: list[str] = field(default_factory=list)  # every DKIM selector checked

    def add(
        self, check: str, severity: str, summary: str, detail: str = "", fix: str = ""
    ) -> Finding:
        assert severity in SEVERITIES, severity
        finding = Finding(check, severity, summary, detail, fix)
        self.findings.append(finding)
        return finding

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="ok")

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}
        return {
            "domain": self.domain,
            "relay_ip": self.relay_ip,
            "envelope_domain": self.envelope_domain,
            "signing_domain": self.signing_domain,
            "envelope_sender": self.envelope_sender,
            "selector": self.selector,
            "selectors": self.selectors,
            "worst": self.worst,
            "counts": counts,
            "findings": [f.to_dict() for f in self.findings],
        }


# ============================================================================= DNS
@dataclass
class _Lookup:
    status: str  # ok | nodata | nxdomain | servfail | timeout | error
    records: list[Any] = field(default_factory=list)
    error: str = ""
    canonical: str = ""  # the name the records are at, after CNAMEs (lower case, no final dot)

    @property
    def failed(self) -> bool:
        return self.status in ("servfail", "timeout", "error")

    @property
    def reply(self) -> str:
        """The line Exchange (and this relay) would log for this failure."""
        if self.status == "nxdomain":
            return replies.DNS_NONEXISTENT_DOMAIN.line()
        reason = "ServerFailure" if self.status == "servfail" else "ErrorRetry"
        return replies.dns_query_failed(reason).line()


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rtype: str) -> _Lookup:
    try:
        qname = dns.name.from_text(name)
        answer = await resolver.resolve(qname, rtype, search=False)
    except dns.resolver.NXDOMAIN:
        return _Lookup("nxdomain")
    except dns.resolver.NoAnswer:
        return _Lookup("nodata")
    except dns.resolver.NoNameservers as exc:
        return _Lookup("servfail", error=str(exc))
    except dns.exception.Timeout as exc:
        return _Lookup("timeout", error=str(exc))
    except dns.exception.DNSException as exc:
        return _Lookup("error", error=str(exc))
    canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
    return _Lookup("ok", list(answer), canonical=canonical)


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> _Lookup:
    result = await _query(resolver, name, "TXT")
    if result.status == "ok":
        result.records = [b"".join(r.strings).decode("utf-8", "replace") for r in result.records]
    return result


def zone_txt(name: str, value: str, ttl: int = 3600) -> str:
    """A zone-file line for a TXT record; values over 255 bytes split into quoted strings."""
    owner = name if name.endswith(".") else name + "."
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    if len(chunks) > 1:
        quoted = f"( {quoted} )"
    return f"{owner} {ttl} IN TXT {quoted}"


# The Public Suffix List as Debian's "publicsuffix" package installs it. Without it the
# organisational domain falls back to the last two labels, which is wrong under multi-label
# suffixes (example.co.uk would be "co.uk").
PUBLIC_SUFFIX_LIST = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(frozen=True)
class _SuffixRules:
    """The rules of the Public Suffix List (https://publicsuffix.org/list/), as A-labels."""

    exact: frozenset[str]
    wildcard: frozenset[str]  # "ck" for the rule "*.ck"
    exception: frozenset[str]  # "www.ck" for the rule "!www.ck"


def _parse_suffix_list(text: str) -> _SuffixRules:
    exact: set[str] = set()
    wildcard: set[str] = set()
    exception: set[str] = set()
    for line in text.splitlines():
        rule = line.strip().split(" ", 1)[0].lower()
        if not rule or rule.startswith("//"):
            continue
        target = exact
        if rule.startswith("!"):
            target, rule = exception, rule[1:]
        elif rule.startswith("*."):
            target, rule = wildcard, rule[2:]
        target.add(ascii_spelling(rule))  # as the domains it is matched with are spelled
    return _SuffixRules(frozenset(exact), frozenset(wildcard), frozenset(exception))


@functools.cache
def _suffix_rules(path: Path) -> _SuffixRules | None:
    """The list at ``path``, read once (None when it is not installed). Blocking: call it in a
    thread first (:func:`diagnose` does), later calls return the cached rules."""
    try:
        return _parse_suffix_list(path.read_text("utf-8"))
    except OSError:
        return None


def _public_suffix_length(labels: list[str], rules: _SuffixRules) -> int:
    """How many trailing labels form the public suffix (the PSL algorithm; default rule "*")."""
    for start in range(len(labels)):
        name = ".".join(labels[start:])
        if name in rules.exception:
            return len(labels) - start - 1
        if name in rules.exact:
            return len(labels) - start
        if start + 1 < len(labels) and ".".join(labels[start + 1 :]) in rules.wildcard:
            return len(labels) - start
    return 1


def _org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix and one label more."""
    labels = domain.lower().rstrip(".").split(".")
    rules = _suffix_rules(PUBLIC_SUFFIX_LIST)
    suffix = _public_suffix_length(labels, rules) if rules else 1
    return ".".join(labels[-(suffix + 1) :])


def _aligned_relaxed(one: str, other: str) -> bool:
    """DMARC relaxed alignment (RFC 7489 §3.1): the same organisational domain."""
    return _org_domain(one) == _org_domain(other)


# ============================================================================= SPF syntax
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


# ===================================================================== pyspf resolver hook
_spf_lookup: contextvars.ContextVar[Callable[..., list] | None] = contextvars.ContextVar(
    "relaygate_spf_lookup", default=None
)
_original_spf_lookup = spf.DNSLookup


def _spf_dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list:
    lookup = _spf_lookup.get()
    if lookup is None:
        return _original_spf_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype, timeout)


def _install_spf_hook() -> None:
    if spf.DNSLookup is not _spf_dispatch:
        spf.DNSLookup = _spf_dispatch


def _blocking_twin(resolver: dns.asyncresolver.Resolver) -> dns.resolver.Resolver:
    sync = dns.resolver.Resolver(configure=False)
    sync.nameservers = list(resolver.nameservers)
    sync.port = resolver.port
    sync.timeout = resolver.timeout
    sync.lifetime = resolver.lifetime
    return sync


def _spf_lookup_with(sync: dns.resolver.Resolver) -> Callable[..., list]:
    """A pyspf ``DNSLookup`` answering from ``sync`` (same result shapes as pyspf's own)."""

    def lookup(name: str, qtype: str, timeout: float = 30) -> list:
        try:
            answer = sync.resolve(
                dns.name.from_text(name), qtype, lifetime=min(timeout, sync.lifetime), search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers as exc:
            raise spf.TempError(f"DNS ServerFailure: {exc}") from exc
        except dns.exception.Timeout as exc:
            raise spf.TempError(f"DNS timeout: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        out: list = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    return lookup


def _evaluate_spf(
    sync: dns.resolver.Resolver, ip: str, sender: str, domain: str
) -> tuple[str, str]:
    """pyspf's verdict for mail from ``sender`` (its macros %{l}, %{s}, %{o} are expanded from
    it) by ``ip``."""
    token = _spf_lookup.set(_spf_lookup_with(sync))
    try:
        result, explanation = spf.check2(
            i=ip, s=sender, h=domain, querytime=max(sync.lifetime * 5, 10)
        )
    finally:
        _spf_lookup.reset(token)
    return str(result), str(explanation)


# ========================================================================== checks
@dataclass
class _State:
    """What later checks need from earlier ones."""

    domain_missing: bool = False
    spf_result: str | None = None  # pyspf result for the relay IP, None = not evaluated
    spf_record: str | None = None
    signing_domain: str = ""  # d= of the relay's signatures
    dkim_ok: bool = False  # published key matches the relay's local key
    dkim_detail: str = ""


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
        report.add(
            "MX",
            "warning",
            f"MX host(s) without an address: {', '.join(unresolved)}",
            f"MX records: {listing}. Senders skip hosts they cannot resolve; if all fail, mail "
            "queues with '451 4.4.0 DNS query failed'.",
            "Publish A/AAAA records for the MX hosts, or point the MX at hosts that have them "
            "(an MX must not point at a CNAME or an IP address).",
        )
    elif not failed and not aliases:
        report.add("MX", "ok", f"MX: {listing}", "Every MX host resolves to an address.")


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
) -> None:
    """SPF for each name the relay says in EHLO (RFC 7208 §2.3): receivers may check it for all
    mail, and for the relay's own null-sender mail it is the only identity they can check. A
    problem is a warning: ordinary mail is decided by the envelope domain's record (above)."""
    for name, connectors in helo_names.items():
        await _check_helo_name(report, resolver, relay_ip, name, connectors)


async def _check_helo_name(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    relay_ip: str | None,
    name: str,
    connectors: list[str],
) -> None:
    why = (
        f"The {_connectors_saying(name, connectors)}. RFC 7208 §2.3: receivers check SPF for "
        f"the HELO name, and for mail with the null sender only for it (as postmaster@{name})."
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
    try:
        domain = ascii_domain(name)
    except ValueError:
        return None
    return domain if "." in domain else None


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


def parse_tags(record: str) -> dict[str, str] | None:
    """A ``tag=value; tag=value`` list (DKIM, DMARC); None if malformed or a tag repeats."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in tags:
            return None
        tags[name] = re.sub(r"\s+", "", value) if name in ("p", "b", "bh") else value.strip()
    return tags


_DKIM_KEY_TAGS = ("v", "h", "k", "n", "p", "s", "t")
_DKIM_TAG_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_WHITESPACE = re.compile(r"\s+")


def dkim_key_tags(record: str) -> dict[str, str] | None:
    """A DKIM key record's tags as verifiers read them (None if malformed or a tag repeats).

    RFC 6376 §3.2: tag names are case-sensitive ("K=" is not "k=", an unknown tag verifiers
    ignore, §3.6.1) and so are values unless a tag says otherwise; whitespace around values is
    not part of them, and p= is base64 in which whitespace (folding, the joints of TXT strings)
    is ignored. So dkimpy reads it, and so receivers verify the relay's signatures.
    """
    tags: dict[str, str] = {}
    for part in record.split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not _DKIM_TAG_NAME.fullmatch(name) or name in tags:
            return None
        tags[name] = _WHITESPACE.sub("", value) if name == "p" else value.strip()
    return tags


def _miscased_tags(tags: dict[str, str]) -> str:
    """A note on tags written in capitals that verifiers take for unknown ones ("K=", "P=")."""
    miscased = [t for t in tags if t.lower() in _DKIM_KEY_TAGS and t not in _DKIM_KEY_TAGS]
    if not miscased:
        return ""
    spelled = ", ".join(f"{t}= is not {t.lower()}=" for t in miscased)
    return f"; tag names are case-sensitive (RFC 6376 §3.2): {spelled}"


def _local_public(local: str) -> tuple[str | None, str]:
    """``(k, p)`` of the relay's key given as a record value or as the bare ``p=`` base64."""
    if "p=" in local:
        tags = parse_tags(local) or {}
        return tags.get("k", "rsa").lower(), tags.get("p", "")
    return None, re.sub(r"\s+", "", local)


async def _check_dkim(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    state: _State,
    keys: list[tuple[str, str | None]],
) -> None:
    """The published key of each (selector, the relay's public record) the relay signs with.
    Every enabled key of the signing domain signs (a rotation, RSA beside Ed25519), so each
    has its own findings; DKIM aligns for DMARC if one of them verifies."""
    domain = state.signing_domain or report.domain  # the key receivers fetch is d='s
    if not keys:
        report.add(
            "DKIM",
            "warning",
            f"relayed mail from {domain} is not DKIM-signed: no selector configured",
            "Without a signature DMARC relies on SPF alone, and Gmail/Outlook.com junk or refuse "
            "unauthenticated mail (550 5.7.26).",
            f"relaygate dkim new --domain {domain} --selector s1; add the [[dkim]] entry it "
            "prints, publish the TXT record, then run the doctor with --selector s1",
        )
        return
    for selector, local_public in keys:  # in order: each selector's findings together
        await _check_selector(report, resolver, state, domain, selector, local_public)


async def _check_selector(
    report: Report,
    resolver: dns.asyncresolver.Resolver,
    state: _State,
    domain: str,
    selector: str,
    local_public: str | None,
) -> None:
    name = f"{selector}._domainkey.{domain}"
    publish = zone_txt(name, local_public) if local_public and "p=" in local_public else ""
    publish_fix = (
        f"Publish: {publish}"
        if publish
        else f"Publish the record `relaygate dkim show` prints for {name}"
    )
    txt = await _txt(resolver, name)
    if txt.failed:
        report.add(
            "DKIM",
            "error",
            f"DKIM key lookup for {name} failed ({txt.reply}): receivers report dkim=temperror",
            txt.error,
            f"Fix the name servers for {domain}: `dig {name} TXT` must answer.",
        )
        return
    records = [r for r in txt.records if _is_dkim_record(r)] if txt.status == "ok" else []
    if not records:
        report.add(
            "DKIM",
            "error",
            f"no DKIM record at {name}: receivers report dkim=permerror (no key for signature), "
            f"so DMARC cannot pass on DKIM ({_DMARC_REJECT} under p=reject)",
            "Signed mail carries s="
            + selector
            + "; receivers fetch the public key from this name.",
            publish_fix,
        )
        return
    if len(txt.records) > 1:
        # RFC 6376 §3.6.2.2: several TXT records at the name give undefined results; another
        # text there is no less a candidate than a second key (dkimpy takes the first one)
        kind = "DKIM" if len(records) == len(txt.records) else "TXT"
        report.add(
            "DKIM",
            "error",
            f"{len(txt.records)} {kind} records at {name}: receivers may pick either and fail the "
            "signature",
            " | ".join(txt.records),
            f"Keep only one record at {name}" + (f": {publish}" if publish else "."),
        )
        return
    tags = dkim_key_tags(records[0])
    problem = ""
    key_type = ""
    if tags is None:
        problem = "the record is not a valid tag=value list"
    elif tags.get("v", "DKIM1") != "DKIM1":
        problem = f"v={tags['v']} (must be DKIM1)"
    else:
        key_type = tags.get("k", "rsa")
        p = tags.get("p", "")
        if "p" not in tags:
            problem = "no p= tag: the record holds no key"
        elif not p:
            problem = "p= is empty: the key is revoked"
        elif key_type.lower() in ("rsa", "ed25519") and key_type not in ("rsa", "ed25519"):
            problem = (
                f"k={key_type}: verifiers compare the key type as written (k={key_type.lower()})"
            )
        elif key_type not in ("rsa", "ed25519"):
            problem = f"unknown key type k={key_type}"
        else:
            try:
                raw = base64.b64decode(p, validate=True)
            except ValueError:
                problem = "p= is not valid base64"
            else:
                problem = _key_problem(key_type, raw) or _usage_problem(tags)
        problem += _miscased_tags(tags) if problem else ""
    if problem:
        report.add(
            "DKIM",
            "error",
            f"DKIM record at {name} is unusable ({problem}): receivers report dkim=permerror",
            f"Record: {records[0]}",
            publish_fix,
        )
        return
    assert tags is not None
    if local_public:
        local_k, local_p = _local_public(local_public)
        if local_p != tags["p"] or (local_k and local_k != key_type):
            report.add(
                "DKIM",
                "error",
                f"DKIM key mismatch at {name}: the published key is not the relay's key, so "
                f"receivers report dkim=fail (signature did not verify) and DMARC fails "
                f"({_DMARC_REJECT} under p=reject)",
                f"Published: {records[0][:80]}... The relay signs with a different key (rotated "
                "key not yet published, or the record was copied from another selector).",
                publish_fix,
            )
            return
        state.dkim_ok = True
        report.add(
            "DKIM",
            "ok",
            f"DKIM record at {name} matches the relay's {key_type} key",
            "testing mode (t=y): some receivers ignore failures"
            if "y" in tags.get("t", "")
            else "",
        )
        return
    report.add(
        "DKIM",
        "info",
        f"DKIM record at {name} is valid ({key_type}); no local key to compare it with",
        "The relay has no key for this domain and selector, so it does not sign with it.",
        "relaygate dkim show (or --config) to compare with the relay's key",
    )


_DKIM_VERSION = re.compile(r"\s*v\s*=\s*DKIM1\s*(?:;|$)", re.IGNORECASE)


def _is_dkim_record(text: str) -> bool:
    """A key record: it starts with v=DKIM1 or carries a p= tag (v= is optional, RFC 6376 §3.6.1)."""
    return "p=" in text or _DKIM_VERSION.match(text) is not None


def _usage_problem(tags: dict[str, str]) -> str:
    """A restriction in the key record that makes receivers refuse the relay's signatures.

    RFC 6376 §3.6.1: h= lists the hashes the key may be used with (the relay signs rsa-sha256 and
    ed25519-sha256) and s= the services (``email`` or ``*``); a signature outside either fails
    verification (§6.1.2) however well the key matches.
    """
    hashes = [h.strip().lower() for h in tags.get("h", "sha256").split(":")]
    if "sha256" not in hashes:
        return f"h={tags['h']} does not allow sha256, the hash the relay signs with"
    services = [v.strip().lower() for v in tags.get("s", "*").split(":")]
    if "*" not in services and "email" not in services:
        return f"s={tags['s']}: the key is not for email"
    return ""


def _key_problem(key_type: str, raw: bytes) -> str:
    if key_type == "ed25519":
        return "" if len(raw) == 32 else f"an Ed25519 key is 32 bytes, p= has {len(raw)}"
    try:
        key = load_der_public_key(raw)
    except ValueError:
        return "p= is not an RSA public key"
    if not isinstance(key, rsa.RSAPublicKey):
        return "p= is not an RSA public key"
    if key.key_size < 1024:
        return f"RSA key of {key.key_size} bits (receivers ignore keys under 1024 bits)"
    return ""


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
        fixes.append(
            f"sign with a DKIM key for {domain}: relaygate dkim new --domain {domain} "
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


# ========================================================================== entry point
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
        return report
    await asyncio.gather(
        _check_spf(report, resolver, state, relay_ip),
        _check_helo(report, resolver, relay_ip, helo_names or {}),
        _check_dkim(report, resolver, state, keys),
    )
    await asyncio.to_thread(_suffix_rules, PUBLIC_SUFFIX_LIST)  # reads the file once
    await _check_dmarc(report, resolver, state, relay_ip, envelope)
    order = {c: i for i, c in enumerate(("MX", "SPF", "HELO", "DKIM", "DMARC"))}
    report.findings.sort(key=lambda f: order.get(f.check, 99))
    return report


_install_spf_hook()
