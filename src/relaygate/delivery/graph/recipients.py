"""The recipients of a route's copy as Graph must be told them, read from the message's header.

Graph takes the recipients from the MIME header (To, Cc, Bcc), not from an envelope: this module
compares the header with the envelope (`recipient_plan`), reads the Message-ID that Graph keeps
as internetMessageId (`message_id`), and spells addresses for comparing with Graph's.
"""

from __future__ import annotations

import email.header
import email.utils
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from email.policy import compat32
from typing import Any

from relaygate.addresses import ascii_domain

#: The message's Message-ID field (its value folded onto the next line too), in the header.
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(?:\r\n[ \t]+)?(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE
)


def _decoded(name: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(name)))
    except Exception:  # a malformed encoded word: the raw text
        return name


def _header_addresses(data: bytes, names: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 4]
    # Read as UTF-8 (RFC 6532, SMTPUTF8): as ASCII, an 8-bit address never matched its envelope
    # recipient and names came out as U+FFFD.
    parsed = HeaderParser(policy=compat32).parsestr(head.decode("utf-8", "replace"))
    out: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        values = [str(v) for v in parsed.get_all(name, [])]
        out[name] = [
            (_decoded(display), address.strip())
            for display, address in email.utils.getaddresses(values)
            if "@" in address
        ]
    return out


@dataclass(frozen=True)
class RecipientPlan:
    """The recipients Graph must send this route's copy to (each (display name, address))."""

    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]


def recipient_plan(
    data: bytes, recipients: Sequence[str], *, always: bool = False
) -> RecipientPlan | None:
    """None when the header's To, Cc and Bcc addresses are exactly `recipients` (sendMail as it
    is) and not `always`; else the recipient lists for a draft: To ∩ envelope, Cc ∩ envelope,
    envelope − To − Cc. Addresses compare case-insensitively."""
    wanted = {r.casefold(): r for r in recipients}
    found = _header_addresses(data, ("To", "Cc", "Bcc"))
    in_header = {a.casefold() for field_ in found.values() for _n, a in field_}
    if in_header == set(wanted) and not always:
        return None
    taken: set[str] = set()

    def keep(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for display, address in entries:
            key = address.casefold()
            if key in wanted and key not in taken:
                taken.add(key)
                out.append((display, address))
        return out

    to = keep(found["To"])
    cc = keep(found["Cc"])
    bcc = [("", r) for key, r in wanted.items() if key not in taken]
    return RecipientPlan(to, cc, bcc)


def message_id(data: bytes) -> str:
    """The Message-ID of `data` (the octets on the wire), with its angle brackets, or "": what
    Graph keeps as the sent copy's internetMessageId. The relay adds none to a message that
    has none (a lost answer to such a message's sendMail is not looked up: sent again)."""
    end = data.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(data, 0, len(data) if end < 0 else end + 2)
    if found is None:
        return ""
    try:
        return found.group(1).decode("utf-8")  # RFC 6532 allows UTF-8 in it
    except UnicodeDecodeError:
        return ""


def _recipients_json(entries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out = []
    for display, address in entries:
        mail: dict[str, str] = {"address": address}
        if display:
            mail["name"] = display
        out.append({"emailAddress": mail})
    return out


def _comparable_address(address: str) -> str:
    """One spelling of `address` for comparing the envelope's (its domain an A-label, as the
    parser keeps it) with Graph's (Exchange Online may name an internationalised domain in
    Unicode): the domain's labels as A-labels, all of it case-folded."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address.casefold()
    return f"{local}@{ascii_domain(domain)}".casefold()
