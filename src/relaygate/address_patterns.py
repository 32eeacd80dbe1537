"""Address patterns: the one matcher of addresses against ``*`` patterns.

`AddressPattern` is the queue filter of ``relaygate queue list --from/--to`` (Get-Message -Filter's
``-like``); `AddressRule` is one entry of a receive connector's ``allowed_senders`` /
``allowed_recipients``, a stricter grammar over the same matcher (see `parse_address_rule`).
Both compare ASCII letters in any case (`ascii_lower`), the local part too, as Exchange and the
queue filters do.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaygate import replies
from relaygate.addresses import AddressError, parse_domain, parse_path

__all__ = ["AddressPattern", "AddressRule", "ascii_lower", "parse_address_rule"]

_ASCII_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def ascii_lower(text: str) -> str:
    """Lower-case the ASCII letters only (what SQLite's ``lower()`` does, and what the
    PostgreSQL store does with ``translate``): the same answer on both engines whatever the
    database's locale; other letters are compared exactly."""
    return text.translate(_ASCII_UPPER)


@dataclass(frozen=True, slots=True)
class AddressPattern:
    """An address filter as Get-Message -Filter takes them (``FromAddress -like``): an address,
    matched exactly, or with ``*`` at its start and/or end (``*@scanners.corp.example``,
    ``scanner@*``, ``*invoice*``); ``<>`` is the null sender. ASCII letters match in any case.

    ``text`` is the (ascii-lower-cased) address or the part between the stars; ``prefix`` /
    ``suffix``: a star stood at the start / at the end. A store compares :attr:`sql_value`
    with ``=`` (when not :attr:`like`) or ``LIKE ... ESCAPE '\\'`` against the ascii-lower-cased
    column (:func:`ascii_lower`)."""

    text: str
    prefix: bool = False
    suffix: bool = False

    @classmethod
    def parse(cls, pattern: str, *, name: str = "pattern") -> AddressPattern:
        """``ValueError`` naming ``name`` for an empty pattern, a ``*`` inside, spaces or
        control characters."""
        text = pattern.strip()
        if text == "<>":
            return cls("")
        if text.startswith("<") and text.endswith(">"):
            text = text[1:-1].strip()
        if not text:
            raise ValueError(f"{name} must be an address or a pattern like *@example.com")
        if any(ord(c) <= 0x20 or c in "\x7f<>" for c in text):
            raise ValueError(
                f"{name} {pattern!r}: spaces, control characters, '<' and '>' are not allowed"
            )
        core = text.strip("*")
        if "*" in core:
            raise ValueError(
                f"{name} {pattern!r}: '*' may only stand at the start or the end "
                "(like *@example.com or scanner@*)"
            )
        return cls(ascii_lower(core), text.startswith("*"), text.endswith("*"))

    @property
    def like(self) -> bool:
        return self.prefix or self.suffix

    @property
    def matches_all(self) -> bool:
        """``*`` (any address, the null sender too) or ``*@*`` (any address with a domain):
        a pattern that selects nothing out."""
        return self.prefix and self.suffix and self.text in ("", "@")

    @property
    def sql_value(self) -> str:
        if not self.like:
            return self.text
        escaped = self.text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return ("%" if self.prefix else "") + escaped + ("%" if self.suffix else "")

    def matches(self, address: str) -> bool:
        """The same test in Python."""
        value = ascii_lower(address)
        if self.prefix and self.suffix:
            return self.text in value
        if self.prefix:
            return value.endswith(self.text)
        if self.suffix:
            return value.startswith(self.text)
        return value == self.text


#: The forms `parse_address_rule` accepts, for error messages and help.
RULE_FORMS = (
    "an address, *@domain, *@*.domain (its subdomains), *@* (any address) or <> (the null sender)"
)


@dataclass(frozen=True, slots=True)
class AddressRule:
    """One entry of ``allowed_senders`` / ``allowed_recipients``.

    ``text`` is the canonical spelling (domain and ASCII letters lower-cased, IDNs as A-labels):
    ``<>``, ``scan@corp.example``, ``*@corp.example``, ``*@*.corp.example`` or ``*@*``.
    ``pattern`` is the `AddressPattern` that matches it: the exact address, ``*@domain`` as the
    suffix ``@domain``, ``*@*.domain`` as the suffix ``.domain`` (an address's domain is what
    follows its last ``@``, and a domain holds no ``@``, so the suffix can only match inside the
    domain), ``*@*`` as ``*@*``."""

    text: str
    pattern: AddressPattern

    @property
    def kind(self) -> str:
        """ "null", "address", "domain", "subdomains" or "any"."""
        p = self.pattern
        if not p.like:
            return "address" if p.text else "null"
        if p.suffix:
            return "any"
        return "domain" if p.text.startswith("@") else "subdomains"

    @property
    def value(self) -> str:
        """The address (kind "address") or the domain (kinds "domain" and "subdomains")."""
        return self.pattern.text.lstrip("@.") if self.pattern.prefix else self.pattern.text

    def matches(self, address: str) -> bool:
        """``address`` (as `str(Address)`, "" for the null sender) matches this rule."""
        if not self.pattern.like:
            return self.pattern.matches(address)
        return address != "" and self.pattern.matches(address)

    def __str__(self) -> str:
        return self.text


def parse_address_rule(text: str) -> AddressRule:
    """One ``allowed_senders`` / ``allowed_recipients`` entry. ``ValueError`` with the reason for
    anything but the forms of `RULE_FORMS`: a ``*`` elsewhere (``scan*@corp.example``,
    ``*corp.example``: which would also match ``evilcorp.example``), an address or domain the
    envelope parser refuses."""
    if not isinstance(text, str):
        raise ValueError(f"expected a string ({RULE_FORMS}), got {text!r}")
    raw = text.strip()
    if raw == "<>":
        return AddressRule("<>", AddressPattern(""))
    inner = raw[1:-1].strip() if raw.startswith("<") and raw.endswith(">") else raw
    if not inner:
        raise ValueError(f"empty pattern: use {RULE_FORMS}")
    if inner == "*@*":
        return AddressRule("*@*", AddressPattern("@", prefix=True, suffix=True))
    try:
        if inner.startswith("*@*."):
            domain = _domain(inner[4:], raw)
            return AddressRule(f"*@*.{domain}", AddressPattern(f".{domain}", prefix=True))
        if inner.startswith("*@"):
            domain = _domain(inner[2:], raw)
            return AddressRule(f"*@{domain}", AddressPattern(f"@{domain}", prefix=True))
        if "*" in inner:
            raise ValueError(f"{raw!r}: '*' is allowed only as *@domain, *@*.domain or *@*")
        address = parse_path(
            f"<{inner}>",
            smtputf8=True,
            allow_null=False,
            allow_postmaster=False,
            error=replies.INVALID_SENDER,
        )
    except AddressError as exc:
        raise ValueError(f"{raw!r} is not a valid address: {exc.reason}") from None
    assert address is not None  # allow_null=False
    if not address.domain:
        raise ValueError(f"{raw!r}: an address needs a domain")
    canonical = ascii_lower(str(address))
    return AddressRule(canonical, AddressPattern(canonical))


def _domain(text: str, raw: str) -> str:
    if "*" in text:
        raise ValueError(f"{raw!r}: '*' is allowed only as *@domain, *@*.domain or *@*")
    return parse_domain(text, smtputf8=True, allow_literal=False, error=replies.INVALID_SENDER)
