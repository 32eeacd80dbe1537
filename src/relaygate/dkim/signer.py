"""DKIM signing at delivery time (dkimpy), after the Received header is added.

Key choice (documented behaviour, also shown by the tracking log):

* ``domain_source="header_from"`` (the default): the domain of the single address in the message's
  ``From`` header, because that is the domain DMARC aligns with. If the message has no ``From``
  header, more than one, a ``From`` with several addresses (or a group), or one the strict parser
  cannot read, the envelope sender's domain is used instead when ``envelope_fallback`` is on (the
  default); otherwise the message goes out unsigned. It is not used when a From field names
  another domain (``From: a@corp.example`` and ``From: ceo@bank.example``): the envelope's key
  never vouches for a message From someone else's domain; such a message goes out unsigned.
* ``domain_source="envelope_sender"``: the envelope sender's (MAIL FROM) domain; for the null
  sender, which has none (the relay's own NDRs and delay notices), the single ``From``'s.
* Keys match the **exact** domain, unless their entry says ``subdomains = true``: a key for
  ``corp.example`` signs mail from ``sub.corp.example`` only then (``d=corp.example``, which DMARC's
  default relaxed alignment accepts and strict alignment does not), and only for a subdomain with
  no ``[[dkim]]`` entry of its own (``relaygate.dkim.domains``, the doctor's rule too).
* Every enabled key of the chosen domain signs (so an Ed25519 and an RSA key for one domain give
  the dual signature RFC 8463 recommends): RSA signatures topmost, then Ed25519 ones, each in
  configuration order.

Canonicalisation is relaxed/relaxed. The fields a message has at most once (From, Subject, To,
Content-Type...) are signed one extra time, so that a second one added above (the one a reader
shows; RFC 6376 §8.15) breaks the signature; From, Reply-To and Subject even when absent. Keys
are read and checked once, when the signer is built; ``sign`` is a pure CPU-bound function: call
it in a thread (``asyncio.to_thread``) from the event loop. A message that is not signed
carries a human-readable ``reason`` for the tracking log.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dkim
from relaygate.addresses import ascii_domain
from relaygate.dkim.defaults import ALWAYS_SIGNED, SIGNED_HEADERS, SINGLE_FIELDS
from relaygate.dkim.domains import signing_domain_for
from relaygate.dkim.keys import (
    DkimKeyError,
    LoadedKey,
    key_file_mode_warning,
    key_path,
    key_size_warning,
    load_private_key,
)
from relaygate.header_section import header_end, with_empty_line

__all__ = [
    "DEFAULT_SIGNED_HEADERS",
    "DOMAIN_SOURCES",
    "DkimConfigError",
    "DkimKeyConfig",
    "DkimSigner",
    "SignResult",
    "from_header_domain",
]

DEFAULT_SIGNED_HEADERS = SIGNED_HEADERS
DOMAIN_SOURCES = ("header_from", "envelope_sender")
# Headers RFC 6376 says must not be signed (they change in transit); dkimpy refuses them.
_NEVER_SIGN = frozenset(h.decode() for h in dkim.DKIM.SHOULD_NOT)
_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_LINE_END = re.compile(r"\r?\n")
# A field name with white space before its colon (RFC 5322 obs-optional: "Subject : x").
_SPACED_NAME = re.compile(rb"^([!-9;-~]+)[ \t]+:", re.MULTILINE)
_AT_DOMAIN = re.compile(r"@([^\s<>()\[\]\",;:@\\]+)")


class DkimKeyConfig(Protocol):
    """What the signer needs from one ``[[dkim]]`` config entry."""

    domain: str
    selector: str
    key_file: Path | None
    algorithm: str
    headers: list[str]
    enabled: bool
    subdomains: bool


class DkimConfigError(DkimKeyError):
    """The ``[[dkim]]`` configuration cannot be used; ``problems`` lists every reason."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


@dataclass(frozen=True)
class SignResult:
    """Outcome of :meth:`DkimSigner.sign`.

    ``data`` is the message to send (with the DKIM-Signature header(s) on top when ``signed``,
    unchanged otherwise). ``domain`` is the domain the key was chosen by (empty if none could be
    found); ``selector`` is the selector used, or several joined by ``","`` for dual signing.
    ``reason`` says why in words the tracking log can show. ``subdomain``: the domain whose mail
    ``domain``'s ``subdomains = true`` key signed ("" when the key is the domain's own).
    """

    data: bytes
    signed: bool
    domain: str
    selector: str
    reason: str
    subdomain: str = ""


@dataclass(frozen=True)
class _Key:
    domain: str
    selector: str
    algorithm: str
    headers: tuple[str, ...]
    loaded: LoadedKey
    subdomains: bool = False


def _normalise_domain(domain: str) -> str | None:
    domain = domain.strip().rstrip(".")
    if not domain:
        return None
    domain = ascii_domain(domain)  # the envelope's spelling (IDNA 2008): the keys' domains
    labels = domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    return domain


def _address_domain(address: str) -> str | None:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    local, at, domain = address.rpartition("@")
    if not at or not local or any(c.isspace() for c in address):
        return None
    if domain.startswith("["):  # address literal: no DKIM domain
        return None
    return _normalise_domain(domain)


def from_header_domain(value: str) -> tuple[str | None, str]:
    """Parse one ``From`` field body strictly; return ``(domain, "")`` or ``(None, why)``.

    Accepts exactly one mailbox, ``addr-spec`` or ``[display-name] <addr-spec>``, with comments
    and quoted strings. Groups, several addresses, several angle addresses, unbalanced quotes,
    brackets or parentheses and address literals are refused.
    """
    in_quote = False
    escaped = False
    comment = 0
    angle_parts: list[str] = []
    bare: list[str] = []
    current: list[str] | None = None
    for ch in value:
        if escaped:
            escaped = False
            if current is not None:
                current.append(ch)
            continue
        if in_quote:
            if ch == "\\":
                escaped = True
            elif ch == '"':
                in_quote = False
            if current is not None:
                current.append(ch)
            continue
        if comment:
            if ch == "\\":
                escaped = True
            elif ch == "(":
                comment += 1
            elif ch == ")":
                comment -= 1
            continue
        if ch == "(":
            comment = 1
        elif ch == '"':
            in_quote = True
            if current is not None:
                current.append(ch)
        elif ch == "<":
            if current is not None:
                return None, "From header has a '<' inside an address"
            current = []
        elif ch == ">":
            if current is None:
                return None, "From header has an unmatched '>'"
            angle_parts.append("".join(current))
            current = None
        elif ch == ",":
            return None, "From header has more than one address"
        elif ch in ":;":
            if current is None:
                return None, "From header uses group syntax"
            current.append(ch)
        elif current is not None:
            current.append(ch)
        else:
            bare.append(ch)
    if in_quote or comment or current is not None:
        return None, "From header has an unbalanced quote, comment or angle bracket"
    if len(angle_parts) > 1:
        return None, "From header has more than one address"
    address = angle_parts[0] if angle_parts else "".join(bare)
    if not address.strip():
        return None, "From header has no address"
    domain = _address_domain(address)
    if domain is None:
        return None, f"From header address {address.strip()!r} has no usable domain"
    return domain, ""


def _from_values(message: bytes) -> list[str]:
    """The values of the message's From fields."""
    return [v for n, v in _header_block(message) if n.lower() == "from"]


def _single_from_domain(froms: Sequence[str]) -> tuple[str | None, str]:
    """The domain of the message's one From field (its values ``froms``), or ``(None, why)``."""
    if not froms:
        return None, "message has no From header"
    if len(froms) > 1:
        return None, f"message has {len(froms)} From headers"
    return from_header_domain(froms[0])


def _named_domains(values: Iterable[str]) -> set[str]:
    """Every domain written after an ``@`` in ``values`` (From fields the strict parser refused),
    display names and comments included: the domains a lenient reader may take the From for."""
    found = (_normalise_domain(m.group(1)) for v in values for m in _AT_DOMAIN.finditer(v))
    return {domain for domain in found if domain is not None}


def _tight_field_names(message: bytes) -> bytes:
    """``message`` with the white space between a header field's name and its colon dropped.

    dkimpy reads ``Subject : x`` as no field at all: it refused the message (sent unsigned) and,
    for ``From : x`` (an mbox "From " line to it), signed as if there were no From, a signature
    that fails at every receiver that reads the field. Relaxed canonicalisation drops that space
    anyway, so the signature is the same; the message sent is the one signed."""
    end = header_end(message)
    head = message[:end]
    if _SPACED_NAME.search(head) is None:
        return message  # the usual case: no copy
    return _SPACED_NAME.sub(rb"\1:", head) + message[end:]


def _header_block(message: bytes) -> list[tuple[str, str]]:
    """Unfolded ``(name, value)`` pairs of the header section (names as written).

    The section ends where `header_end` says, as for the signature (`with_empty_line`) and the
    receiving session: in a message without an empty line, a body line such as ``From: ...``
    is body, not a second From that would hand the choice to the envelope sender's domain."""
    text = message[: header_end(message)].decode("utf-8", errors="replace")
    fields: list[tuple[str, str]] = []
    for line in _LINE_END.split(text):
        if line[:1] in (" ", "\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, value + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            fields.append((name.strip(), value.strip()))
    return fields


def _signed_fields(headers: Iterable[str], present: dict[str, int]) -> list[bytes]:
    """The h= list: each of ``headers`` as many times as the message has it (lowercase names
    ``present``), then once more for a field a message has at most once (when it has it, or
    always for From, Reply-To and Subject), so that one added later breaks the signature."""
    signed: list[bytes] = []
    extra: list[bytes] = []
    for header in headers:
        name = header.strip().lower()
        count = present.get(name, 0)
        signed.extend([name.encode()] * count)
        if name in ALWAYS_SIGNED or (count and name in SINGLE_FIELDS):
            extra.append(name.encode())
    return signed + extra


def _ed25519_only_warnings(keys: dict[str, list[_Key]]) -> list[str]:
    """A warning per domain whose every key is Ed25519: Gmail, Microsoft 365 and Yahoo do not
    verify ed25519-sha256 (RFC 8463), so its mail has no DKIM pass there and DMARC rests on SPF."""
    return [
        f"[[dkim]] {domain}: signed with Ed25519 only (selector "
        f"{', '.join(k.selector for k in domain_keys)}): Gmail, Microsoft 365 and Yahoo do not "
        "verify ed25519-sha256 signatures, so DMARC cannot pass on DKIM there; add an "
        "rsa-sha256 key for the domain (both sign)"
        for domain, domain_keys in keys.items()
        if all(k.algorithm == "ed25519-sha256" for k in domain_keys)
    ]


class DkimSigner:
    """Signs messages with the configured keys; build it once at start-up.

    ``keys`` are objects with the :class:`DkimKeyConfig` attributes (the config module's
    ``DkimKey``). An entry without ``key_file`` uses ``<data_dir>/dkim/<domain>/<selector>.key``
    (where ``relaygate dkim new`` writes). Disabled entries are ignored. Every problem with enabled keys (missing or
    unreadable file, wrong key type, duplicate domain+selector, unknown algorithm, a header that
    must not be signed) is collected and raised together as :class:`DkimConfigError`.

    ``skip_unusable`` (the running relay): an entry with a problem is left out instead, and the
    problems are kept in ``problems``; every usable key still signs. One bad entry (a rotation's
    new key whose file is not there yet, a typo) must not send every domain's mail unsigned.

    ``warnings``: keys that are used but should be looked at (a key file every local user can
    read); the running relay logs them.
    """

    def __init__(
        self,
        keys: Iterable[Any],
        *,
        domain_source: str = "header_from",
        envelope_fallback: bool = True,
        data_dir: Path | None = None,
        skip_unusable: bool = False,
    ) -> None:
        if domain_source not in DOMAIN_SOURCES:
            raise DkimConfigError(
                [f"dkim_domain_source {domain_source!r}: use one of {', '.join(DOMAIN_SOURCES)}"]
            )
        self.domain_source = domain_source
        self.envelope_fallback = envelope_fallback
        self._keys: dict[str, list[_Key]] = {}
        self._disabled: dict[str, list[str]] = {}
        self._unusable: dict[str, list[str]] = {}
        self._configured: set[str] = set()  # every domain with an entry: its own keys decide
        self._subdomain_parents: set[str] = set()  # an enabled entry says subdomains = true
        problems: list[str] = []
        self.warnings: list[str] = []
        seen: set[tuple[str, str]] = set()
        for entry in keys:
            domain = _normalise_domain(str(entry.domain))
            selector = str(entry.selector).strip().lower()
            label = f"[[dkim]] {entry.domain} selector {entry.selector}"
            if domain is None:
                problems.append(f"{label}: invalid domain")
                continue
            self._configured.add(domain)
            if not getattr(entry, "enabled", True):
                self._disabled.setdefault(domain, []).append(selector)
                continue
            if getattr(entry, "subdomains", False):
                self._subdomain_parents.add(domain)
            before = len(problems)
            self._add_key(entry, domain, selector, label, seen, data_dir, problems)
            if len(problems) > before:
                self._unusable.setdefault(domain, []).append(selector)
        for domain_keys in self._keys.values():
            # RSA first (a stable sort: configuration order within each algorithm): a verifier
            # that checks only the topmost signature may know no Ed25519 (dkimpy's dkim.verify
            # without PyNaCl; Microsoft 365 reports dkim=fail).
            domain_keys.sort(key=lambda k: k.algorithm != "rsa-sha256")
        self.warnings.extend(_ed25519_only_warnings(self._keys))
        self.problems = problems
        if problems and not skip_unusable:
            raise DkimConfigError(problems)

    def _add_key(
        self,
        entry: Any,
        domain: str,
        selector: str,
        label: str,
        seen: set[tuple[str, str]],
        data_dir: Path | None,
        problems: list[str],
    ) -> None:
        """Load one enabled entry into ``_keys``, or append why it cannot be used to ``problems``."""
        if (domain, selector) in seen:
            problems.append(f"{label}: configured twice")
            return
        seen.add((domain, selector))
        headers = tuple(getattr(entry, "headers", None) or DEFAULT_SIGNED_HEADERS)
        bad = [h for h in headers if h.strip().lower() in _NEVER_SIGN]
        if bad:
            problems.append(f"{label}: header(s) {', '.join(bad)} must not be signed")
            return
        if not any(h.strip().lower() == "from" for h in headers):
            headers = ("From", *headers)
        key_file = getattr(entry, "key_file", None)
        if key_file is None:
            if data_dir is None:
                problems.append(f"{label}: key_file is not set")
                return
            key_file = key_path(data_dir, domain, selector)
        try:
            loaded = load_private_key(Path(key_file), str(entry.algorithm))
        except DkimKeyError as exc:
            problems.append(f"{label}: {exc}")
            return
        for warning in (
            key_file_mode_warning(Path(key_file), domain),
            key_size_warning(Path(key_file), loaded),
        ):
            if warning is not None:
                self.warnings.append(f"{label}: {warning}")
        if loaded.algorithm == "ed25519-sha256":
            try:
                import nacl.signing  # noqa: F401  (dkimpy signs Ed25519 with PyNaCl)
            except ImportError:
                problems.append(f"{label}: ed25519-sha256 needs the PyNaCl package")
                return
        self._keys.setdefault(domain, []).append(
            _Key(
                domain,
                selector,
                loaded.algorithm,
                headers,
                loaded,
                bool(getattr(entry, "subdomains", False)),
            )
        )

    @classmethod
    def from_config(cls, config: Any, *, skip_unusable: bool = False) -> DkimSigner:
        """Build from a loaded ``Config`` (``config.dkim`` and ``config.server.dkim_domain_source``)."""
        server = getattr(config, "server", None)
        source = getattr(server, "dkim_domain_source", None) or "header_from"
        data_dir = getattr(server, "data_dir", None)
        return cls(
            getattr(config, "dkim", None) or [],
            domain_source=source,
            data_dir=Path(data_dir) if data_dir is not None else None,
            skip_unusable=skip_unusable,
        )

    @property
    def domains(self) -> list[str]:
        """Domains with at least one enabled key."""
        return sorted(self._keys)

    def selectors(self, domain: str) -> list[str]:
        return [k.selector for k in self._keys.get(domain.lower(), [])]

    def public_record(self, domain: str, selector: str) -> str | None:
        """The TXT value the loaded key for (domain, selector) needs in DNS (for the doctor)."""
        for key in self._keys.get(domain.lower().rstrip("."), []):
            if key.selector == selector.lower():
                return key.loaded.record
        return None

    # -------------------------------------------------------------------- choose
    def choose_domain(self, message: bytes, envelope_sender: str) -> tuple[str | None, str]:
        """The domain whose key should sign, or ``(None, reason)``."""
        if self.domain_source == "envelope_sender":
            domain, why = self._envelope_domain(envelope_sender, "")
            if domain is not None or envelope_sender.strip() not in ("", "<>"):
                return domain, why
            # The null sender has no domain: the From's signs (a report: the relay's NDRs come
            # from its postmaster so that the organisation's key signs them).
            domain, from_why = _single_from_domain(_from_values(message))
            return domain, f"{why}; {from_why}" if domain is None else ""
        froms = _from_values(message)
        domain, why = _single_from_domain(froms)
        if domain is not None:
            return domain, ""
        if not self.envelope_fallback:
            return None, why
        domain, fallback_why = self._envelope_domain(envelope_sender, why)
        # The fallback is for a From without a domain of its own (none, a group, a literal):
        # the envelope's key must not vouch for a From naming another domain (two From fields
        # are the DMARC bypass of receivers that check one and show the other).
        others = sorted(_named_domains(froms) - {domain}) if domain is not None else []
        if others:
            return None, (
                f"{why}; From names {', '.join(others)}, not the envelope sender's domain {domain}"
            )
        return domain, fallback_why

    @staticmethod
    def _envelope_domain(envelope_sender: str, why: str) -> tuple[str | None, str]:
        prefix = f"{why}; " if why else ""
        sender = envelope_sender.strip()
        if sender in ("", "<>"):
            return None, f"{prefix}the envelope sender is empty (null sender)"
        domain = _address_domain(sender)
        if domain is None:
            return None, f"{prefix}envelope sender {sender!r} has no usable domain"
        return domain, ""

    # ---------------------------------------------------------------------- sign
    def sign(self, message: bytes, *, envelope_sender: str) -> SignResult:
        """Sign ``message`` (bytes as it will be sent); never raises for a message problem."""
        domain, why = self.choose_domain(message, envelope_sender)
        if domain is None:
            return SignResult(message, False, "", "", f"not signed: {why}")
        keys = self._keys.get(domain)
        subdomain = ""
        if not keys:
            signing = signing_domain_for(domain, self._configured, self._subdomain_parents)
            if signing is None or signing == domain:
                return SignResult(message, False, domain, "", self._no_key_reason(domain))
            # A parent's `subdomains = true` keys sign, with d= the parent.
            keys = [k for k in self._keys.get(signing, ()) if k.subdomains]
            if not keys:
                reason = self._no_key_reason(signing, f" (which signs {domain}'s mail)")
                return SignResult(message, False, signing, "", reason)
            subdomain, domain = domain, signing
        linesep = b"\r\n" if b"\r\n" in message else b"\n"
        # dkimpy refuses a header followed by a body line with no empty line between them
        # ("Unexpected characters in RFC822 header"), and the message went out unsigned: the
        # empty line is inserted where the header ends, and what is signed is what is sent.
        message = _tight_field_names(with_empty_line(message, linesep))
        present: dict[str, int] = {}
        for name, _ in _header_block(message):
            present[name.lower()] = present.get(name.lower(), 0) + 1
        signatures: list[bytes] = []
        for key in keys:
            include = _signed_fields(key.headers, present)
            try:
                signature = dkim.sign(
                    message,
                    key.selector.encode(),
                    key.domain.encode(),
                    key.loaded.dkimpy_key,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm.encode(),
                    include_headers=include,
                    linesep=linesep,
                )
            except (dkim.DKIMException, ValueError) as exc:
                return SignResult(
                    message,
                    False,
                    domain,
                    key.selector,
                    f"DKIM signing failed for {domain} (selector {key.selector}): {exc}",
                )
            signatures.append(signature)
        selectors = ",".join(k.selector for k in keys)
        algorithms = ",".join(k.algorithm for k in keys)
        for_subdomain = f" for {subdomain} (subdomains = true)" if subdomain else ""
        # The first key's signature is topmost (the one simple verifiers check): an RSA one.
        data = b"".join(signatures) + message
        return SignResult(
            data,
            True,
            domain,
            selectors,
            f"signed d={domain} s={selectors} a={algorithms}{for_subdomain}",
            subdomain,
        )

    def _no_key_reason(self, domain: str, what: str = "") -> str:
        """Why ``domain`` has no key to sign with: unusable, disabled or none at all."""
        if domain in self._unusable:
            selectors = ", ".join(self._unusable[domain])
            return f"DKIM key for domain {domain}{what} cannot be used (selector {selectors})"
        if domain in self._disabled:
            selectors = ", ".join(self._disabled[domain])
            return f"DKIM key for domain {domain}{what} is disabled (selector {selectors})"
        return f"no DKIM key for domain {domain}"
