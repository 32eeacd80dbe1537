"""The one strict parser of SMTP envelope addresses (RFC 5321 §4.1.2, RFC 6531 for SMTPUTF8).

Policy, routing, `explain` and the session all take their addresses from here, so that there is exactly
one interpretation of what a client sent. The rules are deliberately narrow: anything the grammar does
not allow, or that some other MTA might read differently, is refused with the exact reply to send;
nothing is ever guessed, repaired or truncated.

* Path = "<" [ A-d-l ":" ] Mailbox ">"; source routes are accepted and dropped (RFC 5321 §3.3 / C).
* Local-part = Dot-string / Quoted-string. `%`, `!` and quoted `@` are ordinary characters and never
  interpreted; `Address.has_routing_chars` lets policy refuse sender-specified routing.
* Domain = LDH labels (lower-cased, one trailing dot dropped) or an IPv4 / `IPv6:` address literal
  checked by `ipaddress`. General-address-literals, numeric domains without brackets, comments,
  display names, nested brackets, control characters and unquoted double `@` are all errors.
* Non-ASCII only with SMTPUTF8 (else 553 5.6.7); U-labels become A-labels in `Address.domain`.
* Limits (RFC 5321 §4.5.3.1): local part 64, domain 255, label 63, path 256 octets.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
import unicodedata
from dataclasses import dataclass

import idna

from relaygate import replies
from relaygate.replies import Reply

__all__ = [
    "MAX_DOMAIN",
    "MAX_LABEL",
    "MAX_LOCAL_PART",
    "MAX_PATH",
    "Address",
    "AddressError",
    "is_ascii",
    "parse_domain",
    "parse_mail_from",
    "parse_path",
    "parse_rcpt_to",
    "split_args",
]

MAX_LOCAL_PART = 64  # octets, RFC 5321 §4.5.3.1.1
MAX_DOMAIN = 255  # octets, §4.5.3.1.2
MAX_LABEL = 63  # octets, RFC 1035 §2.3.4
MAX_PATH = 256  # octets including the angle brackets, §4.5.3.1.3

# --- grammar, compiled once ---------------------------------------------------------------------------
# atext (RFC 5322 §3.2.3) and, for SMTPUTF8, UTF8-non-ascii (RFC 6531 §3.3). Explicit ASCII classes:
# never \d or \w, which match non-ASCII digits and letters.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_NON_ASCII = "\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOT_STRING_UTF8 = re.compile(rf"[{_ATEXT}{_NON_ASCII}]+(?:\.[{_ATEXT}{_NON_ASCII}]+)*")
# Quoted-string: DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE; qtextSMTP = %d32-33 / %d35-91 / %d93-126
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_QUOTED_UTF8 = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_NON_ASCII}]|\\[\x20-\x7e])*"')
_QUOTED_PAIR = re.compile(r"\\([\x20-\x7e])")
# sub-domain = Let-dig [Ldh-str]
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_ALL_DIGITS = re.compile(r"[0-9]+")
_IPV4_LITERAL = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_BODY = re.compile(r"[0-9A-Fa-f:.]+")
_IPV6_TAG = "ipv6:"
# A-d-l = At-domain *( "," At-domain ); At-domain = "@" Domain (validated label by label below)
_ROUTE_ITEM = re.compile(r"@([^@,:]+)")
# ESMTP parameters (RFC 5321 §4.1.2): esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-");
# esmtp-value = 1*(%d33-60 / %d62-126)
_PARAM_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*")
_PARAM_VALUE = re.compile(r"[\x21-\x3c\x3e-\x7e]+")
# C0 controls (NUL, TAB, CR, LF, ...) and DEL; the C1 range is handled with the other non-ASCII checks.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Label separators that IDNA 2003 treats like "." (RFC 3490 §3.1); never let them hide inside a label.
_IDNA_DOTS = frozenset("\u3002\uff0e\uff61")


class AddressError(ValueError):
    """An envelope address or its parameters are refused.

    reply: the exact reply the session sends.
    reason: a short explanation for the protocol log and `explain`.
    """

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(reason)
        self.reply = reply
        self.reason = reason

    def __repr__(self) -> str:
        return f"AddressError({self.reply.line()!r}, {self.reason!r})"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed envelope mailbox.

    local: the local part exactly as on the wire (quotes and quoted-pairs kept), case preserved.
    domain: lower-case ASCII (A-labels), no trailing dot; an address literal stays bracketed and
        canonical ("[192.0.2.1]", "[IPv6:2001:db8::1]"); "" only for the special <postmaster>.
    """

    local: str
    domain: str

    @property
    def is_postmaster(self) -> bool:
        """The domain-less <postmaster> of RFC 5321 §4.1.1.3."""
        return self.domain == ""

    @property
    def is_literal(self) -> bool:
        return self.domain.startswith("[")

    @property
    def literal_ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The IP of an address literal, None for a domain.

        An IPv4-mapped IPv6 literal ([IPv6:::ffff:127.0.0.1]) is returned as the IPv4 address it
        carries, so that checks such as `is_loopback` cannot be sidestepped by the IPv6 spelling.
        """
        if not self.is_literal:
            return None
        body = self.domain[1:-1]
        if body[: len(_IPV6_TAG)].lower() == _IPV6_TAG:
            ip6 = ipaddress.IPv6Address(body[len(_IPV6_TAG) :])
            return ip6.ipv4_mapped or ip6
        return ipaddress.IPv4Address(body)

    @property
    def local_unquoted(self) -> str:
        """The local part with the quoting removed (`"a\\"b"` -> `a"b`); for display and matching."""
        if len(self.local) >= 2 and self.local.startswith('"') and self.local.endswith('"'):
            return _QUOTED_PAIR.sub(r"\1", self.local[1:-1])
        return self.local

    @property
    def has_routing_chars(self) -> bool:
        """True if the local part (quoted or not) contains `%`, `!` or `@`: sender-specified routing
        that some MTAs would interpret (percent hack, bang paths, `user@domain@domain`)."""
        return any(c in self.local for c in "%!@")

    def __str__(self) -> str:
        if not self.domain:
            return self.local
        return f"{self.local}@{self.domain}"


def is_ascii(s: str) -> bool:
    """True if every character of s is 7-bit ASCII."""
    return s.isascii()


# --- helpers ----------------------------------------------------------------------------------------


def _octets(s: str) -> int:
    # Only called after _check_chars, so s holds no lone surrogates.
    return len(s.encode("utf-8"))


def _check_chars(text: str, *, smtputf8: bool, error: Reply, what: str) -> None:
    """Refuse control characters always, and non-ASCII unless SMTPUTF8 (and even then the invisible,
    spacing, unassigned or ASCII-punctuation-compatible characters a downstream could read differently)."""
    if _CONTROL.search(text):
        raise AddressError(error, f"control character in {what}")
    if text.isascii():
        return
    if not smtputf8:
        raise AddressError(replies.SMTPUTF8_REQUIRED, f"non-ASCII {what} without SMTPUTF8")
    for ch in text:
        if ch.isascii():
            continue
        if ch == "\ufffd":  # what invalid UTF-8 decodes to with "replace": never an address
            raise AddressError(error, f"replacement character U+FFFD in {what}")
        cat = unicodedata.category(ch)
        # Cc (C1 controls), Cf (bidi, zero-width), Cs (lone surrogates), Co, Cn; Zs/Zl/Zp spaces
        if cat[0] in "CZ":
            raise AddressError(error, f"forbidden character U+{ord(ch):04X} in {what}")
        if ch in _IDNA_DOTS:
            raise AddressError(error, f"ideographic or full-width dot U+{ord(ch):04X} in {what}")
        # A character whose compatibility form holds ASCII punctuation (fullwidth @ % ! . " < >) would
        # become a different address after a downstream NFKC: refuse it.
        norm = unicodedata.normalize("NFKC", ch)
        if any(c.isascii() and not c.isalnum() for c in norm):
            raise AddressError(
                error, f"character U+{ord(ch):04X} folds to ASCII punctuation in {what}"
            )


def _domain_label(label: str, *, smtputf8: bool, error: Reply) -> str:
    """Validate one label, return it as a lower-case A-label / LDH label."""
    if not label:
        raise AddressError(error, "empty domain label")
    if label.isascii():
        if _octets(label) > MAX_LABEL:
            raise AddressError(error, f"domain label longer than {MAX_LABEL} octets")
        if not _LDH_LABEL.fullmatch(label):
            raise AddressError(error, f"invalid domain label {label!r}")
        label = label.lower()
        if label.startswith("xn--"):
            try:  # a valid IDNA 2008 label, and the canonical A-label of it
                canonical = idna.alabel(idna.ulabel(label)).decode("ascii") == label
            except (idna.IDNAError, UnicodeError):
                canonical = False
            if not canonical:
                raise AddressError(error, f"invalid A-label {label!r}")
        return label
    if not smtputf8:
        raise AddressError(replies.SMTPUTF8_REQUIRED, "non-ASCII domain without SMTPUTF8")
    ulabel = label.lower()
    # IDNA 2008 (RFC 5891), as registries and DNS use it: no mapping (fullwidth letters, a soft
    # hyphen, a zero-width space are refused, never mapped to another spelling of a label), its
    # hyphen, contextual and bidi rules, and "ß" its own letter (IDNA 2003 made it "ss").
    try:
        alabel = idna.alabel(ulabel).decode("ascii")
    except (idna.IDNAError, UnicodeError) as exc:
        raise AddressError(error, f"invalid internationalised label {label!r}") from exc
    if not alabel.startswith("xn--"):
        raise AddressError(error, f"internationalised label {label!r} is not in canonical form")
    if len(alabel) > MAX_LABEL or not _LDH_LABEL.fullmatch(alabel):
        raise AddressError(error, f"invalid internationalised label {label!r}")
    return alabel


def _address_literal(text: str, *, error: Reply) -> str:
    """`[IPv4]` or `[IPv6:...]` -> canonical bracketed form; everything else refused."""
    body = text[1:-1]
    if _IPV4_LITERAL.fullmatch(body):
        try:
            ip4 = ipaddress.IPv4Address(body)  # refuses octets > 255 and leading zeros
        except ValueError as exc:
            raise AddressError(error, f"invalid IPv4 address literal {text!r}") from exc
        return f"[{ip4}]"
    if body[: len(_IPV6_TAG)].lower() == _IPV6_TAG:
        v6 = body[len(_IPV6_TAG) :]
        if not _IPV6_BODY.fullmatch(v6):  # also refuses "%zone" scope ids and blanks
            raise AddressError(error, f"invalid IPv6 address literal {text!r}")
        try:
            ip6 = ipaddress.IPv6Address(v6)
        except ValueError as exc:
            raise AddressError(error, f"invalid IPv6 address literal {text!r}") from exc
        return f"[IPv6:{ip6.compressed}]"
    if body and all(c in "0123456789." for c in body):
        raise AddressError(error, f"invalid IPv4 address literal {text!r}")
    raise AddressError(error, f"unsupported address literal {text!r}")


# A relay sees the same few domains in every HELO, MAIL and RCPT: a valid one's canonical form is
# remembered (the checks are ~10 µs per domain). lru_cache keeps no exception, so a refusal is
# checked (and raised) every time; the bound holds whatever a client sends.
@functools.lru_cache(maxsize=4096)
def parse_domain(
    text: str, *, smtputf8: bool = False, allow_literal: bool = True, error: Reply
) -> str:
    """Validate a Domain (or address-literal) and return its canonical form (see `Address.domain`).

    Refused: empty, over-long (255 octets, 63 per label), non-LDH, all-numeric last label or anything
    `inet_aton` would read as an IPv4 address (`203.0.113.9`, `0x7f000001`, `127.1`), malformed or
    general address literals, non-ASCII without SMTPUTF8.
    """
    _check_chars(text, smtputf8=smtputf8, error=error, what="domain")
    if not text:
        raise AddressError(error, "empty domain")
    if _octets(text) > MAX_DOMAIN:
        raise AddressError(error, f"domain longer than {MAX_DOMAIN} octets")
    if text.startswith("["):
        if not allow_literal:
            raise AddressError(error, "address literal not allowed here")
        if not text.endswith("]") or len(text) < 2:
            raise AddressError(error, "unterminated address literal")
        return _address_literal(text, error=error)
    if text.endswith("."):
        text = text[:-1]  # one trailing dot: "x@LOCAL." is "x@local"
    labels = [_domain_label(label, smtputf8=smtputf8, error=error) for label in text.split(".")]
    domain = ".".join(labels)
    if len(domain) > MAX_DOMAIN:
        raise AddressError(error, f"domain longer than {MAX_DOMAIN} octets")
    if _ALL_DIGITS.fullmatch(labels[-1]):
        raise AddressError(error, f"numeric domain {domain!r} must be an address literal")
    try:
        socket.inet_aton(domain)
    except OSError:
        pass
    else:
        raise AddressError(error, f"numeric domain {domain!r} must be an address literal")
    return domain


def _mailbox(text: str, *, smtputf8: bool, error: Reply) -> Address:
    """Mailbox = Local-part "@" ( Domain / address-literal )."""
    if text.startswith('"'):
        m = (_QUOTED_UTF8 if smtputf8 else _QUOTED).match(text)
        if m is None:
            raise AddressError(error, "malformed quoted local part")
    else:
        m = (_DOT_STRING_UTF8 if smtputf8 else _DOT_STRING).match(text)
        if m is None:
            raise AddressError(error, "empty or malformed local part")
    local = m.group()
    rest = text[m.end() :]
    if not rest:
        raise AddressError(error, "address has no domain")
    if rest[0] != "@":
        raise AddressError(error, f"unexpected {rest[0]!r} in local part")
    if _octets(local) > MAX_LOCAL_PART:
        raise AddressError(error, f"local part longer than {MAX_LOCAL_PART} octets")
    domain_text = rest[1:]
    if not domain_text:
        raise AddressError(error, "empty domain")
    domain = parse_domain(domain_text, smtputf8=smtputf8, error=error)
    return Address(local, domain)


def parse_path(
    path: str,
    *,
    smtputf8: bool = False,
    allow_null: bool,
    allow_postmaster: bool,
    error: Reply,
) -> Address | None:
    """Parse a Path including its angle brackets.

    Returns None for "<>" when allow_null; Address("postmaster", "") for "<postmaster>" (any case) when
    allow_postmaster. A source route is validated and dropped. Raises AddressError, never anything else.
    """
    _check_chars(path, smtputf8=smtputf8, error=error, what="address")
    if _octets(path) > MAX_PATH:
        raise AddressError(error, f"path longer than {MAX_PATH} octets")
    if len(path) < 2 or path[0] != "<" or path[-1] != ">":
        raise AddressError(error, "address must be enclosed in <>")
    inner = path[1:-1]
    if not inner:
        if allow_null:
            return None
        raise AddressError(error, "null address <> not allowed here")
    if allow_postmaster and inner.isascii() and inner.lower() == "postmaster":
        return Address("postmaster", "")
    if inner[0] == "@":
        # A-d-l: ':' cannot occur in a Domain, so the first ':' ends the route.
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError(error, "source route without ':'")
        for item in route.split(","):
            m = _ROUTE_ITEM.fullmatch(item)
            if m is None:
                raise AddressError(error, "malformed source route")
            parse_domain(m.group(1), smtputf8=smtputf8, allow_literal=False, error=error)
        if not inner:
            raise AddressError(error, "source route without mailbox")
    return _mailbox(inner, smtputf8=smtputf8, error=error)


def _default_error(keyword: str) -> Reply:
    kw = keyword.upper()
    if kw == "FROM":
        return replies.INVALID_SENDER
    if kw == "TO":
        return replies.INVALID_RECIPIENT
    return replies.UNRECOGNIZED_PARAMETER


def _find_path_end(text: str) -> int:
    """Index of the '>' closing the path that starts at text[0] == '<', honouring quoted strings;
    -1 if none."""
    in_quote = False
    i = 1
    n = len(text)
    while i < n:
        c = text[i]
        if in_quote:
            if c == "\\":
                i += 2
                continue
            if c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            return i
        i += 1
    return -1


def _parse_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    bad = replies.UNRECOGNIZED_PARAMETER
    for token in text.split(" "):
        if not token:
            continue  # runs of SP between parameters and trailing SP are tolerated
        if not token.isascii():
            raise AddressError(bad, "non-ASCII parameter")
        key, eq, value = token.partition("=")
        if not _PARAM_KEYWORD.fullmatch(key):
            raise AddressError(bad, f"invalid parameter keyword {key!r}")
        if eq and not _PARAM_VALUE.fullmatch(value):
            raise AddressError(bad, f"invalid value for parameter {key.upper()}")
        key = key.upper()
        if key in params:
            raise AddressError(bad, f"duplicate parameter {key}")
        params[key] = value if eq else None
    return params


def split_args(
    arg: str, keyword: str, *, error: Reply | None = None
) -> tuple[str, dict[str, str | None]]:
    """Split `FROM:<a@b> SIZE=10 BODY=8BITMIME` into ("<a@b>", {"SIZE": "10", "BODY": "8BITMIME"}).

    keyword is matched case-insensitively and must be followed directly by ':'; one SP after the colon
    is tolerated. Parameter keys are upper-cased; values are kept. Errors in the keyword or the path
    use `error` (default: INVALID_SENDER for FROM, INVALID_RECIPIENT for TO); errors in the parameters
    use UNRECOGNIZED_PARAMETER. The path itself is not validated: pass it to parse_path.
    """
    err = error or _default_error(keyword)
    if _CONTROL.search(arg):
        raise AddressError(err, "control character in command arguments")
    prefix = keyword.upper() + ":"
    head = arg[: len(prefix)]
    if not (head.isascii() and head.upper() == prefix):
        raise AddressError(err, f"expected {prefix}")
    rest = arg[len(prefix) :]
    if rest.startswith(" "):
        rest = rest[1:]
    if not rest.startswith("<"):
        raise AddressError(err, "address must be enclosed in <>")
    end = _find_path_end(rest)
    if end < 0:
        raise AddressError(err, "unterminated address: missing '>'")
    path, tail = rest[: end + 1], rest[end + 1 :]
    if tail and tail[0] != " ":
        raise AddressError(err, f"unexpected {tail[0]!r} after address")
    return path, _parse_params(tail)


def parse_mail_from(arg: str) -> tuple[Address | None, dict[str, str | None]]:
    """Parse everything after "MAIL ". Returns (None, params) for the null sender <>.

    The path may be non-ASCII only if the same command carries the SMTPUTF8 parameter (RFC 6531);
    whether SMTPUTF8 (or any other parameter) is acceptable is the session's decision.
    """
    path, params = split_args(arg, "FROM", error=replies.INVALID_SENDER)
    smtputf8 = "SMTPUTF8" in params
    if smtputf8 and params["SMTPUTF8"] is not None:
        raise AddressError(replies.UNRECOGNIZED_PARAMETER, "SMTPUTF8 takes no value")
    sender = parse_path(
        path,
        smtputf8=smtputf8,
        allow_null=True,
        allow_postmaster=False,
        error=replies.INVALID_SENDER,
    )
    return sender, params


def parse_rcpt_to(arg: str, *, smtputf8: bool = False) -> tuple[Address, dict[str, str | None]]:
    """Parse everything after "RCPT ". <> is refused; <postmaster> gives Address("postmaster", "").

    smtputf8: the transaction's MAIL FROM carried SMTPUTF8.
    """
    path, params = split_args(arg, "TO", error=replies.INVALID_RECIPIENT)
    rcpt = parse_path(
        path,
        smtputf8=smtputf8,
        allow_null=False,
        allow_postmaster=True,
        error=replies.INVALID_RECIPIENT,
    )
    if rcpt is None:  # unreachable with allow_null=False; keeps the type honest without assert
        raise AddressError(replies.INVALID_RECIPIENT, "null address <> not allowed here")
    return rcpt, params


def is_special_destination(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """An address mail must not be sent to on a remote party's word (an address literal, an MX
    record): loopback, link-local (a cloud's metadata service), multicast, unspecified or
    reserved, also as the IPv4 address an IPv6 one carries: IPv4-mapped, 6to4 (2002::/16) or a
    Teredo client (NAT64 and IPv4-compatible forms are in ::/8, reserved)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _special_ip(ip.ipv4_mapped)  # ::ffff:0:0/96 itself is "reserved"
    if _special_ip(ip):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        return any(v4 is not None and _special_ip(v4) for v4 in embedded)
    return False


def _special_ip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return bool(
        ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified or ip.is_reserved
    )


def ascii_domain(domain: str) -> str:
    """`domain` (from a header, a next hop's answer, the command line: not parsed as an envelope
    domain) in the envelope's spelling: lower case, each non-ASCII label its IDNA 2008 A-label
    as the parser makes it ("straße" -> "xn--strae-oqa"); a label IDNA 2008 refuses gets IDNA
    2003's ("strasse"), else stays as it is. For comparing and looking up, never for refusing."""
    labels = domain.lower().split(".")
    if domain.isascii():
        return ".".join(labels)
    out = []
    for label in labels:
        if not label.isascii():
            try:
                label = idna.alabel(label).decode("ascii")
            except (idna.IDNAError, UnicodeError):
                try:
                    label = label.encode("idna").decode("ascii")
                except UnicodeError:
                    pass
        out.append(label)
    return ".".join(out)
