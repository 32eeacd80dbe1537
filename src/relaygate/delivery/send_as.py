"""A send connector's ``send_as``: mail leaves as one mailbox, whoever wrote it.

Microsoft 365 (SMTP AUTH with one licensed mailbox, the usual way a relay reaches it) refuses a
message whose sender is not that mailbox: ``554 5.2.252 SendAsDenied; relay@corp.example not
allowed to send as scanner@corp.example``, and so do Outlook.com, SES and others. The printers
and applications behind a relay write their own From. With ``send_as`` set on the connector that
reaches such a host, a message through it is sent with:

* MAIL FROM ``<send_as>`` (the null sender of a report too: such a host takes no other);
* its ``From:`` address replaced by ``send_as``, the display name kept (the old address becomes
  the display name when there was none), so the recipient still sees who wrote it;
* a ``Reply-To:`` with the original From when the message has none, so replies reach the writer;
* a ``Sender:`` header's address replaced too (it would otherwise be checked the same way; one
  that cannot be read becomes ``Sender: <send_as>``).

Only the header section is rewritten (the body is never copied beyond the one join). A From
with no address to keep (a group such as ``undisclosed-recipients:;``, a name without a domain)
becomes ``From: <send_as>``, a message without one gets it (RFC 5322 requires it, and the host
checks it), and a second From field is dropped (one is allowed).
The queue keeps the original envelope: RelayGate's own NDRs and delay notices still go to the
original sender, and the tracking log shows it; only what the remote host sees changes.
"""

from __future__ import annotations

import re
from email.utils import getaddresses

from relaygate.delivery.wire import MAX_LINE_OCTETS
from relaygate.header_section import header_end

__all__ = ["rewrite_headers"]

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.IGNORECASE)
# A display name safe to write as a quoted-string: printable ASCII or UTF-8 text without quotes,
# backslashes or controls (anything else is dropped from the name, never passed through raw).
# A written From/Sender is folded at its spaces past this many octets (RFC 5322's 78), and a
# display name with a word longer than _MAX_NAME_OCTETS is cut there: every line then fits in
# 998 octets, with any address.
_FOLD_AT = 78
_MAX_NAME_OCTETS = 640
_UNSAFE_NAME = re.compile(r'["\\\x00-\x1f\x7f]')
# RFC 2047 encoded-words as a phrase may hold them (§5 (3)): a charset token, then B's base64
# alphabet or Q's letters, digits and "!*+-/=_" only. Anything looser (a comma, "<", ">", ";",
# ":" or "@" between "=?" and "?=") would be read as structure once written unquoted: a second
# mailbox in the new From, of the writer's choosing.
_ENCODED_WORDS = re.compile(
    r"(?:=\?[!#$%&'*+\-0-9A-Z^_`a-z{|}~]+\?(?:[bB]\?[A-Za-z0-9+/=]*|[qQ]\?[A-Za-z0-9!*+\-/=_]*)"
    r"\?=(?:[ \t]+|$))+"
)


def _fields(header: bytes) -> list[bytes]:
    """The header section's fields, each with its continuation lines and line endings."""
    out: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and out:
            out[-1] += line
        else:
            out.append(line)
    return out


def _name_of(field: bytes) -> bytes:
    match = _FIELD.match(field)
    return match.group(1).lower() if match else b""


def _mailbox(field: bytes) -> tuple[str, str] | None:
    """(display name, address) of a From/Sender field's first mailbox, None if unreadable."""
    value = field.split(b":", 1)[1].decode("utf-8", "replace")
    value = " ".join(value.split())  # unfolded
    found = getaddresses([value])
    if not found or "@" not in found[0][1]:
        return None
    return found[0]


def _folded(line: bytes) -> bytes:
    """``line`` (no CRLF) folded at its spaces into lines of at most _FOLD_AT octets where a
    word allows it, and CRLF-ended. A written field is signed as it is here: the delivery client
    would otherwise fold a line over 998 octets anywhere, after the signature (DKIM fails)."""
    if len(line) <= _FOLD_AT:
        return line + b"\r\n"
    out: list[bytes] = []
    name, first, *words = line.split(b" ")
    current = name + b" " + first  # never a line of the field name alone
    for word in words:
        if len(current) + 1 + len(word) > _FOLD_AT:
            out.append(current)
            current = word
        else:
            current += b" " + word
    out.append(current)
    return b"\r\n ".join(out) + b"\r\n"


def _field(name: str, display: str, address: str) -> bytes:
    display = _UNSAFE_NAME.sub("", display).strip()
    # a name longer than a line can hold (no space to fold at) is cut, never split by the client
    if display and max(map(len, display.encode().split(b" "))) > _MAX_NAME_OCTETS:
        display = display.encode()[:_MAX_NAME_OCTETS].decode("utf-8", "ignore").strip()
    if not display:
        value = f"<{address}>"
    elif _ENCODED_WORDS.fullmatch(display):
        value = f"{display} <{address}>"  # RFC 2047: an encoded-word is never quoted
    else:
        value = f'"{display}" <{address}>'
    return _folded(f"{name}: {value}".encode())


def rewrite_headers(prepared: bytes, send_as: str) -> bytes:
    """``prepared`` (CRLF lines, as `relaygate.delivery.wire.prepare_data` gives them) with its
    From and Sender addresses replaced by ``send_as`` and a Reply-To added (see the module)."""
    end = header_end(prepared)
    fields = _fields(prepared[:end])
    names = [_name_of(f) for f in fields]
    out: list[bytes] = []
    original_from: bytes | None = None
    seen_from = False
    for field, name in zip(fields, names, strict=True):
        if name == b"from" and seen_from:
            continue  # RFC 5322 allows one From: a second would be the mailbox again
        if name in (b"from", b"sender"):
            mailbox = _mailbox(field)
            if mailbox is None:
                # No address to keep (a group such as "undisclosed-recipients:;", no domain):
                # the field is the mailbox's all the same, since the host checks it.
                out.append(_field("From" if name == b"from" else "Sender", "", send_as))
                seen_from = seen_from or name == b"from"
                continue
            display, address = mailbox
            if name == b"from":
                seen_from = True
                original_from = field.split(b":", 1)[1].strip()
                display = display or address
            out.append(_field("From" if name == b"from" else "Sender", display, send_as))
        else:
            out.append(field)
    if not seen_from:  # none at all (RFC 5322 requires one): the host would refuse it
        out.append(_field("From", "", send_as))
    if b"reply-to" not in names and original_from is not None:
        # Its first line was "From: ..." (at most 998 octets): "Reply-To: " is 4 octets longer.
        first = original_from.split(b"\r\n", 1)[0]
        fold = b"\r\n " if len(b"Reply-To: " + first) > MAX_LINE_OCTETS else b" "
        out.append(b"Reply-To:" + fold + original_from + b"\r\n")
    return b"".join(out) + prepared[end:]
