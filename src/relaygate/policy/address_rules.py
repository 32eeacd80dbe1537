"""A receive connector's `allowed_senders` / `allowed_recipients`, compiled for matching.

`AddressRules.compile` indexes the entries of one key once (per config load: the server keeps the
result per connector, `relaygate explain` compiles for its one question): exact addresses and
`*@domain` in dicts, `*@*.domain` looked up label by label, so a MAIL or RCPT costs a few dict
look-ups whatever the list's length. The answer is always that of `AddressRule.matches` (the
`AddressPattern` matcher the queue filters use); the tests check the two agree.

`SendAsList` is an SMTP AUTH user's own list (the users file's `send_as`), in the same pattern
language and with the same matcher. `from_header_addresses` reads the From header's addresses for the
end-of-DATA (P2) check. Pure: no I/O anywhere here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import AddressHeader, BaseHeader, HeaderRegistry

from relaygate import replies
from relaygate.address_patterns import AddressRule, ascii_lower, parse_address_rule
from relaygate.addresses import Address, AddressError, parse_path
from relaygate.config.model import ReceiveConnector

__all__ = [
    "AddressRules",
    "ConnectorAddressRules",
    "SendAsList",
    "compile_connector_rules",
    "from_header_addresses",
    "parse_send_as",
]


@dataclass(frozen=True, slots=True)
class AddressRules:
    """The entries of one key (`key`) of connector `connector`, indexed."""

    connector: str
    key: str
    rules: tuple[AddressRule, ...] = ()
    _exact: dict[str, str] = field(default_factory=dict)
    _domains: dict[str, str] = field(default_factory=dict)
    _subdomains: dict[str, str] = field(default_factory=dict)
    _any: str | None = None
    _null: str | None = None

    @classmethod
    def compile(cls, connector: str, key: str, rules: Sequence[AddressRule]) -> AddressRules:
        exact: dict[str, str] = {}
        domains: dict[str, str] = {}
        subdomains: dict[str, str] = {}
        any_rule: str | None = None
        null: str | None = None
        for rule in rules:
            kind = rule.kind
            if kind == "null":
                null = null or rule.text
            elif kind == "any":
                any_rule = any_rule or rule.text
            elif kind == "address":
                exact.setdefault(rule.value, rule.text)
            elif kind == "domain":
                domains.setdefault(rule.value, rule.text)
            else:
                subdomains.setdefault(rule.value, rule.text)
        return cls(connector, key, tuple(rules), exact, domains, subdomains, any_rule, null)

    @property
    def restricts(self) -> bool:
        """False for an empty key: no restriction at all."""
        return bool(self.rules)

    def match(self, address: Address | None) -> str | None:
        """The entry (its canonical text) that `address` matches, None if none does. `None` stands
        for the null sender `<>`. An exact address beats `*@domain`, which beats `*@*.domain`
        (the nearest parent first), which beats `*@*`."""
        if address is None:
            return self._null
        if not address.domain:  # <postmaster>: no domain, matched only by its exact spelling
            return self._exact.get(ascii_lower(address.local))
        hit = self._exact.get(ascii_lower(str(address))) if self._exact else None
        if hit is not None:
            return hit
        domain = address.domain  # lower-case A-labels already (addresses.py)
        hit = self._domains.get(domain)
        if hit is not None:
            return hit
        if self._subdomains:
            at = domain.find(".")
            while at >= 0:
                hit = self._subdomains.get(domain[at + 1 :])
                if hit is not None:
                    return hit
                at = domain.find(".", at + 1)
        return self._any


@dataclass(frozen=True, slots=True)
class ConnectorAddressRules:
    """Both keys of one receive connector."""

    senders: AddressRules
    recipients: AddressRules


@dataclass(frozen=True, slots=True)
class SendAsList:
    """The addresses SMTP AUTH user `user` may send as (Postfix's smtpd_sender_login_maps, Exchange's
    Send-As on the mailbox): MAIL FROM and every From header address must match one entry."""

    user: str
    rules: AddressRules

    @classmethod
    def compile(cls, user: str, rules: Sequence[AddressRule]) -> SendAsList:
        return cls(user, AddressRules.compile("", f"send-as list of user {user}", rules))

    @property
    def texts(self) -> list[str]:
        return [rule.text for rule in self.rules.rules]

    def match(self, address: Address | None) -> str | None:
        """The entry `address` matches (None: the null sender `<>`), None if none does."""
        return self.rules.match(address)


def parse_send_as(patterns: Sequence[str]) -> tuple[AddressRule, ...]:
    """A send-as list as `allowed_senders` entries (the same parser, duplicates dropped).
    ValueError naming the first pattern that is not one of the forms `allowed_senders` takes."""
    rules: list[AddressRule] = []
    for pattern in patterns:
        try:
            rule = parse_address_rule(pattern)
        except ValueError as exc:
            reason = str(exc)  # most of the parser's reasons name the pattern already
            named = reason if repr(pattern) in reason else f"{pattern!r}: {reason}"
            raise ValueError(f"send-as pattern {named}") from None
        if rule not in rules:
            rules.append(rule)
    return tuple(rules)


def compile_connector_rules(connector: ReceiveConnector) -> ConnectorAddressRules:
    return ConnectorAddressRules(
        AddressRules.compile(connector.name, "allowed_senders", connector.allowed_senders),
        AddressRules.compile(connector.name, "allowed_recipients", connector.allowed_recipients),
    )


_REGISTRY = HeaderRegistry()
_FOLD = re.compile(r"\r?\n(?=[ \t])")


def _parse_address_header(text: str) -> BaseHeader:
    """The standard library's RFC 5322 parse of an address field's value. That parser raises
    IndexError, AttributeError or TypeError on some malformed values (``<``, ``<@``): any
    exception of its own is a value that cannot be parsed (ValueError), never a failed session."""
    try:
        header = _REGISTRY("from", text)
    except Exception as exc:  # the parser's own bugs: whatever it raises
        raise ValueError(
            f"the From header {text!r} cannot be parsed ({type(exc).__name__})"
        ) from None
    return header


def from_header_addresses(values: Sequence[bytes]) -> list[Address]:
    """The addresses of the From header fields `values` (each the raw text after `From:`, folded
    lines and all). `ValueError` with the reason when any field cannot be read strictly: not
    UTF-8, a defect reported by the standard library's RFC 5322 parser (the display name is its
    business, not ours), a group, no address, or an addr-spec the envelope parser
    (`relaygate.addresses`) refuses. Every field is read: RFC 5322 allows one From field, and a
    message with two must not pass on the strength of the one a checker happens to read."""
    found: list[Address] = []
    for raw in values:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError("the From header is not valid UTF-8") from None
        text = _FOLD.sub("", text).strip()
        if "\r" in text or "\n" in text or "\x00" in text:
            raise ValueError("the From header holds a bare CR, LF or NUL")
        header = _parse_address_header(text)
        assert isinstance(header, AddressHeader)  # the registry's class for "from"
        defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
        if defects:
            raise ValueError(f"the From header {text!r} is malformed: {defects[0]}")
        if any(g.display_name is not None for g in header.groups):
            raise ValueError(f"the From header {text!r} holds a group, not mailboxes")
        if not header.addresses:
            raise ValueError(f"the From header {text!r} holds no address")
        for mailbox in header.addresses:
            spec = mailbox.addr_spec
            try:
                address = parse_path(
                    f"<{spec}>",
                    smtputf8=True,
                    allow_null=False,
                    allow_postmaster=False,
                    error=replies.INVALID_FROM_HEADER,
                )
            except AddressError as exc:
                raise ValueError(f"the From address {spec!r} is invalid: {exc.reason}") from None
            if address is None or not address.domain:
                raise ValueError(f"the From address {spec!r} has no domain")
            found.append(address)
    return found
