"""Delivery status notifications: NDRs and delay notices as RFC 3464 ``multipart/report``.

The report has three parts:

1. ``text/plain``: Exchange's wording (``Delivery has failed to these recipients or groups:``, then
   ``Diagnostic information for administrators:`` with the generating server and
   ``Remote Server returned '<reply>'`` per recipient), so the people used to Exchange NDRs read it
   at a glance;
2. ``message/delivery-status``: ``Reporting-MTA: dns; <fqdn>``, ``Arrival-Date``, and per recipient
   ``Final-Recipient``, ``Action`` (failed | delayed), ``Status``, ``Diagnostic-Code: smtp; <reply>``,
   ``Remote-MTA`` when a remote host answered, ``Last-Attempt-Date``, ``Will-Retry-Until`` (delayed);
3. ``text/rfc822-headers``: the header block of the original message (never its body: the original
   may be large or sensitive, and devices often send to addresses nobody reads), its first
   `HEADER_COPY_LIMIT` octets of whole fields;
   ``message/global-headers`` when it holds UTF-8 (RFC 6533), quoted-printable so that the report
   stays 7-bit (as ``message/global-delivery-status`` is, for a UTF-8 address).

What a remote server answered never makes the report 8-bit, so that it reaches a sender whose route
has no 8BITMIME: the text part is quoted-printable UTF-8 when it holds non-ASCII text, and the
reply's non-ASCII characters in ``Diagnostic-Code`` (and ``Remote-MTA``, ``X-Last-Error``) are
written as RFC 6533's ``\\x{HHHH}`` (the code point in hex; octets that were not UTF-8 arrive as
U+FFFD, ``\\x{FFFD}``), in a message/global-delivery-status too: its UTF-8 is for addresses, which
only an SMTPUTF8 original has.

The report comes ``From: Mail Delivery System <postmaster>``, the postmaster address the caller
gives (the queue manager's is the default accepted domain's, as Exchange's, so that the domain's
DKIM key signs it; ``postmaster@<reporting MTA>`` when none is given), and is sent with the null
envelope sender ``<>`` so that it can never cause another report. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import binascii
import json
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime, formatdate

from relaygate.header_section import header_end
from relaygate.queue.model import DSN_NOTIFY, DSN_ORCPT
from relaygate.replies import Reply

__all__ = [
    "DsnRecipient",
    "build_dsn",
    "dsn_parameter_error",
    "header_block",
    "header_value",
    "notify_allows",
    "notify_union",
    "original_recipients",
    "parse_notify",
    "status_of",
]

_FOLD = re.compile(rb"\r?\n[ \t]+")
# C0 controls but TAB, DEL, and the C1 controls (U+0080-U+009F, which a UTF-8 Subject can hold:
# U+009B is a terminal's CSI), so header text shown by `relaygate queue show` or copied into a
# report cannot drive a terminal or forge lines.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
# xtext's "+XX" (RFC 3461 §4) and utf-8-addr-xtext's "\x{HHHH}" (RFC 6533 §3)
_XTEXT_CHAR = re.compile(r"\+([0-9A-Fa-f]{2})|\\x\{([0-9A-Fa-f]{1,6})\}")
_NOTIFY_CONDITIONS = frozenset(("SUCCESS", "FAILURE", "DELAY"))
# RFC 3461 §4: xtext is printable ASCII but "+" and "=", with "+XX" for any other octet. The SMTP
# parameter parser already keeps a value to printable ASCII without "=", so only "+" is checked.
_XTEXT = re.compile(r"(?:[^+]|\+[0-9A-Fa-f]{2})*")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
# RFC 6533 §3: a utf-8 ORCPT's utf-8-addr-xtext, "\x{HHHH}" for a non-ASCII character (and
# xtext's "+XX", which the decoder takes too)
_UTF8_ADDR_XTEXT = re.compile(r"(?:[^+\\]|\+[0-9A-Fa-f]{2}|\\x\{[0-9A-Fa-f]{1,6}\})*")
# RFC 3461 §4.2: addr-type is an atom (RFC 5322 atext)
_ADDR_TYPE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Where a long field may be folded: at a space before a word (unfolding gives the text back) or,
# in a run without one (a reply in Chinese), before an RFC 6533 escape, never inside one.
_FOLD_POINT = re.compile(r" (?=\S)|(?<=\S)(?=\\x\{)")
_FOLD_WIDTH = 78  # RFC 5322 §2.1.1's SHOULD
_MAX_LINE = 998  # RFC 5322 §2.1.1's MUST (octets, without CRLF)
#: The most of the original's header a report returns, in octets (Postfix's bounce_size_limit):
#: the header may be as big as max_header_size (256 KB by default), and the report carries it
#: twice; a report bigger than its route's max_message_size was refused, and lost.
HEADER_COPY_LIMIT = 50_000


@dataclass(frozen=True, slots=True)
class DsnRecipient:
    """One recipient of the report. remote_mta: the host that answered (empty if none did)."""

    address: str
    reply: Reply
    remote_mta: str = ""
    last_attempt: float | None = None
    last_error: str = ""  # the last remote error, shown beside an expiry
    original_recipient: str = ""  # the client's ORCPT (``rfc822;john+40corp.example``), as given


def header_block(message: bytes) -> bytes:
    """The header section of ``message``, CRLF line ends, ending in CRLF.

    It ends at the first line that is neither a header field (``name:``) nor a continuation of
    one: the empty line, or the first body line of a message that has no empty line, as the
    receiving session decides (`relaygate.smtp.message.scan_headers`, Postfix's rule). A message
    without an empty line is not all header: a report gives its sender the header, never the body.
    """
    head = message[: header_end(message)]  # the body, however big, is never copied
    text = head.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)


def _as_utf8(headers: bytes) -> bytes:
    """``headers`` with octets that are not UTF-8 (an undeclared Latin-1 Subject) as U+FFFD: the
    report carries them as message/global-headers and in a charset=utf-8 text part, both UTF-8."""
    if headers.isascii():
        return headers
    return headers.decode("utf-8", "replace").encode("utf-8")


def _lines_fitted(headers: bytes) -> tuple[bytes, int]:
    """``headers`` (CRLF lines, UTF-8) with no line over 998 octets (RFC 5322 §2.1.1), and how
    many lines were cut short. Copied as they were, such lines were broken by the wire where the
    count fell (inside a word: unfolded, the value had a space the client never wrote). A long
    line is folded at its white space (unfolding gives the value back); a run without any that
    is longer than a line is cut at 998 octets, the rest of that line left out."""
    lines = headers.split(b"\r\n")
    if max(map(len, lines)) <= _MAX_LINE:
        return headers, 0
    out: list[bytes] = []
    cut = 0
    for line in lines:
        while len(line) > _MAX_LINE:
            fold = _fold_point(line)
            if fold > 0:
                out.append(line[:fold])
                line = line[fold:]  # starts with the white space it was folded at
            else:
                line = line[: _utf8_boundary(line, _MAX_LINE)]
                cut += 1
        out.append(line)
    return b"\r\n".join(out), cut


def _fold_point(line: bytes) -> int:
    """Where ``line`` (over 998 octets) may be folded so its first line fits: its last space or
    tab within the limit that leaves a line with more than white space (0: none)."""
    fold = max(line.rfind(b" ", 1, _MAX_LINE + 1), line.rfind(b"\t", 1, _MAX_LINE + 1))
    return fold if fold > 0 and line[:fold].strip() else 0


def _utf8_boundary(data: bytes, limit: int) -> int:
    """The largest end <= ``limit`` that does not split a UTF-8 sequence of ``data``."""
    end = limit
    while end > 0 and data[end] & 0xC0 == 0x80:
        end -= 1
    return end


def _returned_header(headers: bytes) -> bytes:
    """The first whole fields of ``headers`` (CRLF lines) that fit in `HEADER_COPY_LIMIT` octets
    (the whole lines that fit of a first field bigger than that)."""
    if len(headers) <= HEADER_COPY_LIMIT:
        return headers
    last_line_end = headers.rfind(b"\r\n", 0, HEADER_COPY_LIMIT - 1)
    end = last_line_end
    while end >= 0 and headers[end + 2 : end + 3] in (b" ", b"\t"):  # a field goes on: not here
        end = headers.rfind(b"\r\n", 0, end)
    if end < 0:
        end = last_line_end
    return headers[: end + 2] if end >= 0 else b""


def header_value(message: bytes, name: str) -> str:
    """The unfolded value of the first ``name`` header ("" if absent), undecoded, C0 (but TAB) and
    C1 controls removed."""
    head = _FOLD.sub(b" ", header_block(message))
    wanted = name.lower().encode("ascii") + b":"
    for line in head.split(b"\r\n"):
        if line.lower().startswith(wanted):
            value = line[len(wanted) :].decode("utf-8", "replace").strip()
            return _CTL.sub("", value)
    return ""


def parse_notify(value: str | None) -> str | None:
    """A NOTIFY parameter (RFC 3461 §4.1) as ``NEVER`` or its conditions sorted and joined by
    ``,``; None for a malformed one (ignored, as every NOTIFY was before it was honoured)."""
    conditions = [c.strip().upper() for c in (value or "").split(",")]
    if conditions == ["NEVER"]:
        return "NEVER"
    if len(set(conditions)) != len(conditions) or not set(conditions) <= _NOTIFY_CONDITIONS:
        return None
    return ",".join(sorted(conditions))


def notify_union(first: str, second: str) -> str:
    """Two NOTIFY values (`parse_notify`'s form) as one asking for every report either asks for
    (``NEVER`` asks for none): a recipient given twice in a transaction is one recipient."""
    conditions = {c for v in (first, second) for c in v.split(",") if c != "NEVER"}
    return ",".join(sorted(conditions)) if conditions else "NEVER"


def dsn_parameter_error(key: str, value: str | None) -> str:
    """Why an RFC 3461 parameter's value is malformed ("" when it is not): RET is FULL or HDRS,
    ENVID xtext, ORCPT ``addr-type;xtext`` and NOTIFY ``NEVER`` or a list of SUCCESS, FAILURE and
    DELAY (§4.1-4.4). Refused with 501 at MAIL or RCPT, as Postfix does: taken as it was, a
    malformed NOTIFY was ignored (the reports it asked not to get were sent) and a malformed ENVID
    or ORCPT came back in the report as something the client never sent."""
    if value is None or not value:
        return f"{key} needs a value"
    if key == "RET":
        return "" if value.upper() in ("FULL", "HDRS") else "RET must be FULL or HDRS"
    if key == "NOTIFY":
        return (
            ""
            if parse_notify(value) is not None
            else "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY"
        )
    if key == "ENVID":
        return _envid_error(value)
    if key == "ORCPT":
        return _orcpt_error(value)
    return ""


def _envid_error(value: str) -> str:
    if not _XTEXT.fullmatch(value):
        return "ENVID is not xtext (a '+' not followed by two hex digits)"
    # Decoded, it comes back in the report as it is: printable ASCII only, as Postfix requires
    # (a "+0D+0A" would have been dropped from it, a "+C3+A9" made the report's status UTF-8).
    decoded = _XTEXT_HEX.sub(_hex_octet, value)
    if not (decoded.isascii() and decoded.isprintable()):
        return "ENVID decodes to more than printable ASCII"
    return ""


def _hex_octet(m: re.Match[str]) -> str:
    return chr(int(m.group(1), 16))


def _orcpt_error(value: str) -> str:
    address_type, semicolon, address = value.partition(";")
    if not semicolon or not _ADDR_TYPE.fullmatch(address_type) or not address:
        return "ORCPT must be addr-type;address"
    text = _UTF8_ADDR_XTEXT if address_type.lower() == "utf-8" else _XTEXT
    return "" if text.fullmatch(address) else "ORCPT's address is not xtext"


def notify_allows(metadata: Mapping[str, str], address: str, action: str) -> bool:
    """Whether the recipient's NOTIFY asks for a report of ``action`` (``failed`` needs FAILURE,
    ``delayed`` DELAY); a recipient without NOTIFY gets both, the relay's default."""
    notify = _recipient_map(metadata, DSN_NOTIFY).get(address)
    if notify is None:
        return True
    return ("FAILURE" if action == "failed" else "DELAY") in notify.split(",")


def original_recipients(metadata: Mapping[str, str]) -> dict[str, str]:
    """The ORCPT each recipient was given with, by address."""
    return _recipient_map(metadata, DSN_ORCPT)


def _recipient_map(metadata: Mapping[str, str], key: str) -> dict[str, str]:
    raw = metadata.get(key)
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}


def _xtext_char(m: re.Match[str]) -> str:
    code = int(m.group(1) or m.group(2), 16)
    return chr(code) if code <= 0x10FFFF else m.group()


def _xtext_decoded(text: str) -> str:
    return _clean(_XTEXT_CHAR.sub(_xtext_char, text))


def _printable_octet(m: re.Match[str]) -> str:
    """An xtext ``+XX`` decoded when it is printable ASCII, else kept as it is."""
    char = chr(int(m.group(1), 16))
    return char if " " <= char <= "~" else m.group()


def _original_recipient(orcpt: str) -> str:
    """ORCPT's ``type;xtext`` as an Original-Recipient value (RFC 3464 §2.3.1), decoded: a
    utf-8 one's ``\\x{HHHH}`` too (RFC 6533 §3), any other type's xtext alone, where a
    backslash is an ordinary character; its ``+XX`` only when that is printable ASCII (an rfc822
    address is ASCII: a decoded octet would make the status part 8-bit, a CR forge a line)."""
    address_type, _, address = orcpt.partition(";")
    address_type, address = _clean(address_type.strip()), address.strip()
    if address_type.lower() == "utf-8":
        return f"{address_type}; {_xtext_decoded(address)}"
    return f"{address_type}; {_clean(_XTEXT_HEX.sub(_printable_octet, address))}"


def status_of(reply: Reply) -> str:
    """The RFC 3463 status for a reply: its enhanced code, else ``X.0.0`` from the basic code."""
    if reply.enhanced:
        return reply.enhanced
    return f"{reply.code // 100}.0.0"


def _reported_status(reply: Reply, action: str) -> str:
    """The Status of a recipient in a report of ``action``: a delayed one is still tried, so its
    status is of class 4 (RFC 3463 "persistent transient failure") whatever the reply it waits
    with (the Unreachable queue's is Exchange's ``550 5.4.4 ROUTING.NoNextHop``): a 5.x.x status
    in a delay notice reads as a dead address to the sender's bounce processing."""
    status = status_of(reply)
    if action == "delayed" and not status.startswith("4."):
        return "4." + status.partition(".")[2]
    return status


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def _span_words(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = []
    if days:
        parts.append(f"{days} day{'s' if days != 1 else ''}")
    if hours:
        parts.append(f"{hours} hour{'s' if hours != 1 else ''}")
    if minutes:
        parts.append(f"{minutes} minute{'s' if minutes != 1 else ''}")
    if secs or not parts:
        parts.append(f"{secs} second{'s' if secs != 1 else ''}")
    return ", ".join(parts)


def _user_text(reply: Reply) -> str:
    """What Exchange tells the sender, by the kind of failure."""
    line = reply.line()
    if "QUEUE.Expired" in line:
        return (
            "Your message couldn't be delivered. Delivery was attempted until the message expired "
            "in the queue; the destination server didn't accept it in time."
        )
    if "QUEUE.Admin" in line:
        return "Your message was deleted from the queue by the administrator of the relay."
    # 5.3.4 (RFC 3463 "message too big for system"): the relay's route limit or the next hop's
    if reply.enhanced == "5.3.4" or "ROUTING.SizeLimit" in line:
        return (
            "Your message couldn't be delivered because it's too large for the way to the "
            "recipient. Make it smaller (fewer or smaller attachments) and send it again."
        )
    if "ROUTING.Loop" in line:
        return (
            "Your message couldn't be delivered because of a configuration problem of the relay: "
            "it would have been sent back to the relay itself. Contact your administrator."
        )
    if "SMTPSEND.DNS.NullMx" in line:
        # RFC 7505: the domain publishes that it takes no mail; retrying or re-routing won't help
        return (
            "Your message couldn't be delivered because the recipient's domain doesn't accept "
            "email (it publishes a null MX record). Check the recipient's address."
        )
    if "ROUTING." in line or "SMTPSEND.DNS" in line:
        return (
            "Your message couldn't be delivered because no route or mail server was found for "
            "the recipient's domain."
        )
    return (
        "Your message couldn't be delivered. The recipient's email system rejected it; "
        "the reason is shown below."
    )


def _clean(text: str) -> str:
    return _CTL.sub("", text)


def _code_point_escape(m: re.Match[str]) -> str:
    return f"\\x{{{ord(m.group()):X}}}"


def _folded(field: str) -> str:
    """``Name: value`` folded (CRLF SP) so that no line of the report is over 998 octets: the
    wire's limit would otherwise break it wherever the count fell, inside a word or an escape.
    At a space, lines of at most 78 characters (unfolding gives the text back); before an escape
    only when the line would be too long (unfolding adds a space there). A run with no fold
    point longer than a line may be is cut (an ENVID of 2 000 characters, say)."""
    if len(field) <= _FOLD_WIDTH:
        return field
    lines: list[str] = []
    current = ""
    start = 0
    for point in [m.start() for m in _FOLD_POINT.finditer(field)] + [len(field)]:
        piece = field[start:point]
        start = point
        width = _FOLD_WIDTH if piece.startswith(" ") else _MAX_LINE - 1
        if current and len(current) + len(piece) > width:
            lines.append(current)
            current = piece if piece.startswith(" ") else " " + piece
        else:
            current += piece
    lines.append(current)
    return "\r\n".join(_cut(line) for line in lines)


def _cut(line: str) -> str:
    """A line with no fold point, cut into continuation lines that fit (rare: see `_folded`)."""
    if len(line.encode("utf-8")) <= _MAX_LINE:
        return line
    # each continuation line starts with the SP that folds it; a character is up to 4 octets
    step = _MAX_LINE - 1 if line.isascii() else (_MAX_LINE - 1) // 4
    chunks = [line[i : i + step] for i in range(0, len(line), step)]
    return "\r\n ".join(chunks)


def _transfer_encoding(content: bytes) -> str:
    return f"Content-Transfer-Encoding: {'7bit' if content.isascii() else 'quoted-printable'}"


def _seven_bit(content: bytes) -> bytes:
    """`content` as it goes in the report: as it is when ASCII, else quoted-printable (its CRLFs
    kept as line breaks, long lines soft-broken)."""
    return content if content.isascii() else binascii.b2a_qp(content, istext=True)


def _ascii_field(text: str) -> str:
    """A remote server's text for a delivery-status field: cleaned, non-ASCII as ``\\x{HHHH}``
    (RFC 6533 §3's notation), so that a reply in UTF-8 or Latin-1 never makes the report 8-bit."""
    return _NON_ASCII.sub(_code_point_escape, _clean(text))


def _text_part(body: bytes) -> tuple[str, bytes]:
    """(Content-Transfer-Encoding, body) of the human-readable part: 7bit when it is ASCII, else
    quoted-printable (a remote reply's or the original header's UTF-8 must not need 8BITMIME)."""
    if body.isascii():
        return "7bit", body
    # istext: line breaks stay CRLF (the body's own) and are not encoded as =0D=0A
    return "quoted-printable", binascii.b2a_qp(body, istext=True)


def build_dsn(
    *,
    action: str,
    reporting_mta: str,
    to: str,
    original: bytes,
    recipients: Sequence[DsnRecipient],
    received_at: float,
    queue_id: str = "",
    will_retry_until: float | None = None,
    now: float | None = None,
    postmaster: str | None = None,
    message_id: str | None = None,
    envelope_id: str = "",
) -> bytes:
    """The report as bytes (CRLF line ends, 7-bit headers of its own).

    action: ``failed`` (NDR) or ``delayed`` (delay notice). to: the original envelope sender (the
    ``To`` header). original: the original message (only its header block is used).
    envelope_id: the client's ENVID (xtext), given back decoded as Original-Envelope-Id.
    """
    if action not in ("failed", "delayed"):
        raise ValueError(f"action must be 'failed' or 'delayed', not {action!r}")
    now = time.time() if now is None else now
    fqdn = reporting_mta
    postmaster = postmaster or f"postmaster@{fqdn}"
    message_id = message_id or f"<{secrets.token_hex(12).upper()}@{fqdn}>"
    boundary = f"=_relaygate_{secrets.token_hex(12)}"
    orig_headers, lines_cut = _lines_fitted(_as_utf8(header_block(original)))
    subject = header_value(original, "Subject")
    orig_msgid = header_value(original, "Message-ID")
    prefix = "Undeliverable" if action == "failed" else "Delivery delayed"
    nl = "\r\n"

    # ---------------------------------------------------------------- human-readable part
    text: list[str] = []
    if action == "failed":
        text.append("Delivery has failed to these recipients or groups:")
        text.append("")
        for r in recipients:
            text.append(_clean(r.address))
            text.append(_user_text(r.reply))
            text.append("")
    else:
        text.append("Delivery is delayed to these recipients or groups:")
        text.append("")
        for r in recipients:
            text.append(_clean(r.address))
        text.append("")
        if subject:
            text.append(_folded(f"Subject: {subject}"))
            text.append("")
        text.append(
            "This message hasn't been delivered yet. Delivery will continue to be attempted."
        )
        if will_retry_until is not None:
            text.append(
                "The server will keep trying to deliver this message for the next "
                f"{_span_words(will_retry_until - now)}. You'll be notified if the message "
                "can't be delivered by that time."
            )
        text.append("")
    text.append("")
    text.append("")
    text.append("Diagnostic information for administrators:")
    text.append("")
    text.append(f"Generating server: {fqdn}")
    if queue_id:
        text.append(f"Queue ID: {queue_id}")
    text.append("")
    for r in recipients:
        text.append(_clean(r.address))
        remote = f"Remote server {r.remote_mta} " if r.remote_mta else "Remote Server "
        text.append(f"{remote}returned '{_clean(r.reply.line())}'")
        if r.last_error and r.last_error != r.reply.line():
            text.append(f"Last error: '{_clean(r.last_error)}'")
        text.append("")
    text.append("Original message headers:")
    text.append("")
    returned = _returned_header(orig_headers)
    if len(returned) < len(orig_headers):
        text.append(
            f"({len(orig_headers) - len(returned):,} of the original header's "
            f"{len(orig_headers):,} octets are left out: a report returns at most "
            f"{HEADER_COPY_LIMIT:,}.)"
        )
        text.append("")
    if lines_cut:
        text.append(
            f"({lines_cut} line{'s' if lines_cut != 1 else ''} of the original header "
            f"{'were' if lines_cut != 1 else 'was'} longer than {_MAX_LINE} octets with no "
            "space to fold at, and cut short.)"
        )
        text.append("")
    orig_headers = returned
    human = nl.join(text).encode("utf-8") + b"\r\n" + orig_headers

    # ---------------------------------------------------------------- delivery-status part
    status: list[str] = []
    if envelope_id:
        status.append(_folded(f"Original-Envelope-Id: {_xtext_decoded(envelope_id)}"))
    status.append(f"Reporting-MTA: dns; {fqdn}")
    status.append(f"Arrival-Date: {_date(received_at)}")
    if queue_id:  # extension fields come last (RFC 3464 §2.2, §2.3)
        status.append(f"X-RelayGate-Queue-Id: {queue_id}")
    status.append("")
    for r in recipients:
        # RFC 6533 §3: a UTF-8 address is of type utf-8 (the part is then
        # message/global-delivery-status), an ASCII one rfc822.
        address_type = "rfc822" if r.address.isascii() else "utf-8"
        if r.original_recipient:
            status.append(
                _folded(f"Original-Recipient: {_original_recipient(r.original_recipient)}")
            )
        status.append(_folded(f"Final-Recipient: {address_type}; {_clean(r.address)}"))
        status.append(f"Action: {action}")
        status.append(f"Status: {_reported_status(r.reply, action)}")
        if r.remote_mta:
            status.append(_folded(f"Remote-MTA: dns; {_ascii_field(r.remote_mta)}"))
        status.append(_folded(f"Diagnostic-Code: smtp; {_ascii_field(r.reply.line())}"))
        if r.last_attempt is not None:
            status.append(f"Last-Attempt-Date: {_date(r.last_attempt)}")
        if action == "delayed" and will_retry_until is not None:
            status.append(f"Will-Retry-Until: {_date(will_retry_until)}")
        if r.last_error and r.last_error != r.reply.line():
            status.append(_folded(f"X-Last-Error: {_ascii_field(r.last_error)}"))
        status.append("")
    delivery_status = nl.join(status).encode("utf-8")
    utf8_status = not delivery_status.isascii()

    # ---------------------------------------------------------------- the message
    subject_text = f"{prefix}: {subject}" if subject else prefix
    if not subject_text.isascii():  # a UTF-8 (or undeclared 8-bit) original Subject: RFC 2047
        subject_text = Header(subject_text, "utf-8", header_name="Subject").encode(linesep=nl)
        subject_field = f"Subject: {subject_text}"
    else:
        subject_field = _folded(f"Subject: {subject_text}")
    head = [
        f"From: Mail Delivery System <{postmaster}>",
        f"To: <{_clean(to)}>",
        subject_field,
        f"Date: {formatdate(now, localtime=False, usegmt=True)}",
        f"Message-ID: {message_id}",
    ]
    # Only an ASCII one: a UTF-8 Message-ID would make the report's own header UTF-8, and the
    # report then needs SMTPUTF8 (RFC 6531) to reach a sender who may well not have it. Nor one
    # too long for a line: a msg-id cannot be folded, and the wire would break it.
    if orig_msgid and orig_msgid.isascii() and len(orig_msgid) <= _MAX_LINE - len("In-Reply-To: "):
        head.append(f"In-Reply-To: {orig_msgid}")
        head.append(f"References: {orig_msgid}")
    head += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
        "Content-Language: en-US",
    ]
    if action == "failed":
        head.append("X-MS-Exchange-Message-Is-Ndr: ")
    out = bytearray()
    out += nl.join(head).encode("utf-8") + b"\r\n\r\n"
    out += b"This is a MIME-formatted message. Portions of this message may be unreadable "
    out += b"without a MIME-capable mail program.\r\n\r\n"
    b = boundary.encode("ascii")

    def part(headers: list[str], body: bytes) -> None:
        out.extend(b"--" + b + b"\r\n")
        out.extend(nl.join(headers).encode("ascii") + b"\r\n\r\n")
        out.extend(body)
        if not body.endswith(b"\r\n"):
            out.extend(b"\r\n")
        out.extend(b"\r\n")  # the CRLF before a boundary belongs to the boundary (RFC 2046)

    cte_human, human_body = _text_part(human)
    part(
        ["Content-Type: text/plain; charset=utf-8", f"Content-Transfer-Encoding: {cte_human}"],
        human_body,
    )
    # RFC 6533 §3: a UTF-8 address makes the status message/global-delivery-status, and the header
    # of an internationalized message comes back as message/global-headers. Both quoted-printable
    # (§6.2-6.3 allow it): 8bit would make the report need 8BITMIME on its way to the sender, and a
    # report that fails is never reported on.
    part(
        [
            "Content-Type: "
            + ("message/global-delivery-status" if utf8_status else "message/delivery-status"),
            _transfer_encoding(delivery_status),
        ],
        _seven_bit(delivery_status),
    )
    ascii_orig = orig_headers.isascii()
    part(
        [
            "Content-Type: " + ("text/rfc822-headers" if ascii_orig else "message/global-headers"),
            _transfer_encoding(orig_headers),
        ],
        _seven_bit(orig_headers) or b"\r\n",
    )
    out += b"--" + b + b"--\r\n"
    return bytes(out)
