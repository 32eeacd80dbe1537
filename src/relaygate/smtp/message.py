"""What the session does to message bytes: scan the header block, count hops, build the Received header.

Everything here works on whole byte strings with C-level operations (find, count, regex over the header
block only): no per-line Python work on DATA.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = [
    "DataReader",
    "HeaderScan",
    "firewalled_fields",
    "from_fields",
    "has_bare_cr_or_lf",
    "local_hops",
    "own_received_pattern",
    "received_header",
    "remove_header_fields",
    "scan_headers",
]

# The header block: field lines ("name:", the name printable ASCII without ":", blanks allowed before
# the colon) and their continuation lines, up to the first line that is neither, as Postfix's cleanup
# decides (is_header): the blank line, or the first body line of a message without one. One anchored
# match; the alternatives start with different octets, so it never backtracks past a line.
_HEADER_BLOCK = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*\n(?:[ \t][^\n]*\n)*)*")
_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
# No control octet in it (a msg-id has none): a NUL cannot even be stored in PostgreSQL's text.
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(<[^>\x00-\x1f\x7f]{1,900}>)", re.IGNORECASE | re.MULTILINE
)

# A From field and its continuation lines (the value, folded, with its line ends).
_FROM = re.compile(rb"^from[ \t]*:([^\n]*\n(?:[ \t][^\n]*\n)*)", re.IGNORECASE | re.MULTILINE)
# A Received field's value, the same way.
_RECEIVED_FIELD = re.compile(
    rb"^received[ \t]*:([^\n]*\n(?:[ \t][^\n]*\n)*)", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class HeaderScan:
    """Facts about a message's header block. `header_size` counts its lines, with their line ends:
    up to the blank line, or to the first line that is not a header field or a continuation."""

    header_size: int
    hops: int
    message_id: str


def scan_headers(content: bytes) -> HeaderScan:
    """The header block's size, its Received fields (hops) and its Message-ID.

    A message without a blank line is not all header: a script's report with no header field at
    all has an empty header block (it was measured whole against max_header_size)."""
    match = _HEADER_BLOCK.match(content)
    header = content[: match.end()] if match else b""
    hops = len(_RECEIVED.findall(header))
    m = _MESSAGE_ID.search(header)
    # UTF-8 (RFC 6532 allows it in an SMTPUTF8 message's id): tracked and traced as written
    message_id = m.group(1).decode("utf-8", "replace") if m else ""
    return HeaderScan(len(header), hops, message_id)


def own_received_pattern(names: Iterable[str]) -> re.Pattern[bytes] | None:
    """What finds, in a Received field's value, a `by` clause naming one of `names` (this relay's:
    server.fqdn and the connectors' fqdn), in any case and with or without a trailing dot, and not
    a longer name ending in one of them; None without a name. Compiled once per configuration."""
    unique = {n.strip().rstrip(".").lower() for n in names if n and n.strip()}
    if not unique:
        return None
    alternatives = b"|".join(re.escape(n.encode("utf-8")) for n in sorted(unique))
    return re.compile(
        rb"(?<![!-~])by[ \t\r\n]+(?:" + alternatives + rb")\.?(?![A-Za-z0-9.-])", re.IGNORECASE
    )


def local_hops(content: bytes, header_size: int, own: re.Pattern[bytes]) -> int:
    """How many Received fields of the header block (its `header_size` first octets, as
    `scan_headers` found it) this relay wrote: Exchange's local hops (MaxLocalHopCount). Only
    the fields are searched, in place (no copy of the header)."""
    return sum(
        1
        for field in _RECEIVED_FIELD.finditer(content, 0, header_size)
        if own.search(content, field.start(1), field.end(1))
    )


# A header field name after a fixed prefix: printable ASCII without ":" (as _HEADER_BLOCK reads one).
_NAME_REST = rb"[!-9;-~]*"


@functools.lru_cache(maxsize=8)
def firewalled_fields(
    *, routing: bool, organization: bool, forest: bool
) -> re.Pattern[bytes] | None:
    """What Exchange's header firewall removes from a session that lacks the right to send it
    (exchange-semantics.md §3.1): `routing` (no ms-Exch-Accept-Headers-Routing) the Received and
    Resent-* fields, `organization` (no -Organization) X-MS-Exchange-Organization-*, `forest`
    (no -Forest) X-MS-Exchange-Forest-*. Each field with its continuation lines; None: nothing
    to remove. Compiled once per combination."""
    names: list[bytes] = []
    if routing:
        names += [rb"received", rb"resent-" + _NAME_REST]
    if organization:
        names.append(rb"x-ms-exchange-organization-" + _NAME_REST)
    if forest:
        names.append(rb"x-ms-exchange-forest-" + _NAME_REST)
    if not names:
        return None
    return re.compile(
        rb"^(?:" + b"|".join(names) + rb")[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*",
        re.IGNORECASE | re.MULTILINE,
    )


def remove_header_fields(content: bytes, header_size: int, fields: re.Pattern[bytes]) -> bytes:
    """`content` without the header fields `fields` finds (`firewalled_fields`), looked for up
    to `header_end` (where a lenient reader may still take a line for a header field). One
    search of the header when there is none, the usual case: `content` is returned as it is."""
    end = header_end(content, header_size)
    if fields.search(content, 0, end) is None:
        return content
    return fields.sub(b"", content[:end]) + content[end:]


def header_end(content: bytes, header_size: int) -> int:
    """Where a reader may stop taking lines for header fields: the end of the header block
    (`header_size`, as `scan_headers` found it) when a blank line or the end follows it; else
    (it ended at a line that is no header field) the first empty line, since not every reader
    stops where Postfix's rule does (Python's email parser reads on past a ":" line)."""
    if header_size < len(content) and not content.startswith((b"\r\n", b"\n"), header_size):
        return _first_empty_line(content, header_size)
    return header_size


def from_fields(content: bytes) -> list[bytes]:
    """The raw value of every From field a reader may take for a header, folded lines kept: those
    of the header block (`scan_headers`'), and when that block ends at a line that is not a header
    field (":", "no colon", a control octet in a name) rather than at the empty line, those up to
    the first empty line too. Not every reader stops where Postfix's rule does (Python's email
    parser reads on past a ":" line): a From field there must not escape the allowed_senders
    check. A "From:" line after the empty line is body."""
    match = _HEADER_BLOCK.match(content)
    end = header_end(content, match.end() if match else 0)
    if not end:
        return []
    return _FROM.findall(content, 0, end)


def _first_empty_line(content: bytes, start: int) -> int:
    """Where the first empty line at or after the line starting at `start` (not itself empty)
    begins; the content's length when there is none. Two C-level searches, no per-line work."""
    ends = [
        at + 1 for at in (content.find(b"\n\r\n", start), content.find(b"\n\n", start)) if at >= 0
    ]
    return min(ends) if ends else len(content)


_TERMINATOR = b"\r\n.\r\n"
# Regex searches for these short patterns run 2-3× faster on big content than bytes' `in`
# (sre scans for the literal's first octet; `in` is a general substring search).
_DOT_LED_LINE = re.compile(rb"\r\n\.")
_BARE_CR = re.compile(rb"\r(?!\n)")


class DataReader:
    """The octets after DATA as they arrive, up to CRLF.CRLF (RFC 5321 §4.1.1.4).

    `feed` each read until it returns True; `result` then gives the dot-unstuffed content, whether
    it was over `limit` (the octets past it are not kept), and what followed the terminator.
    Unstuffing is RFC 5321 §4.5.2's: a line's leading period is deleted whatever follows it, so
    ".foo" from a client that did not stuff is "foo" (as Postfix reads it), not only ".." → ".".

    The chunks are kept as they arrive and joined once (growing one bytearray cost ~2 ms per MB in
    reallocations), and a chunk is searched for the terminator only when it holds a "." (a memchr):
    base64 attachments, most of a big message, hold none.
    """

    __slots__ = (
        "_chunks",
        "_counted",
        "_dotted",
        "_dropped",
        "_edge",
        "_end",
        "_last",
        "_limit",
        "_size",
        "_stuffed",
        "_tail",
    )

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0  # octets in _chunks
        self._dropped = False
        self._dotted = False  # a "." in the content so far: dot-unstuffing may be needed
        # The CRLF that ended the DATA line belongs to the terminator search: an empty message
        # is ".\r\n". The tail: up to the last 4 octets fed, for a terminator split by a read.
        self._tail = b"\r\n"
        self._last = b""  # the chunk holding the end of the terminator
        self._end = 0  # where the content ends, relative to _last (< 0: in an earlier chunk)
        # The periods dot-stuffing added to the kept chunks, which the size does not count (RFC
        # 1870): counted only once the octets kept pass the limit (see _count_stuffing).
        self._stuffed = 0
        self._counted = 0  # chunks counted so far
        self._edge = b"\r\n"  # the last two octets of those chunks: a stuffed line may start there

    def feed(self, more: bytes) -> bool:
        """Take the next octets; True when they complete the terminator."""
        tail = self._tail
        if b"." in more or b"." in tail:
            at = (tail + more[:4]).find(_TERMINATOR)
            if at >= 0:  # it starts in the tail: the content may end in an earlier chunk
                return self._found(more, at + 2 - len(tail))
            at = more.find(_TERMINATOR)
            if at >= 0:
                return self._found(more, at + 2)
            self._dotted = True
        if more:
            if (
                not self._dropped
            ):  # once dropping, nothing more is held (the budget no longer counts it)
                self._chunks.append(more)
                self._size += len(more)
            self._tail = (tail + more)[-4:]
        if not self._dropped and self._size > self._limit + 6 + self._stuffed:
            self._count_stuffing()
        if not self._dropped and self._size > self._limit + 6 + self._stuffed:
            # Past the limit: keep only the tail, made of real octets by now, never the synthetic
            # leading CRLF: "\r\n" + ".\r\nM" would look like CRLF.CRLF and turn the rest of the
            # message into commands (smuggling).
            self._dropped = True
            self._chunks.clear()
            self._size = 0
        return False

    def _count_stuffing(self) -> None:
        """Count the stuffed periods (a line starting with one: CRLF ".") of the chunks not counted
        yet, those starting across a read's edge too. Done only past the limit, so a message
        under it costs nothing; one at the limit on the wire because of its stuffed lines
        (the size RFC 1870 means is the unstuffed one) is still kept whole."""
        edge, stuffed = self._edge, 0
        for chunk in self._chunks[self._counted :]:
            stuffed += (edge + chunk[:2]).count(b"\r\n.") + chunk.count(b"\r\n.")
            edge = (edge + chunk)[-2:] if len(chunk) < 2 else chunk[-2:]
        self._stuffed += stuffed
        self._counted = len(self._chunks)
        self._edge = edge

    @property
    def kept(self) -> int:
        """Octets held so far (the chunk that completes the terminator is not counted yet)."""
        return self._size

    @property
    def dropping(self) -> bool:
        """True once content is no longer kept (over the limit, or `stop_keeping`)."""
        return self._dropped

    def stop_keeping(self) -> None:
        """Keep no more content (the memory for messages in transit is spent, smtp/limits.py): the
        terminator is still found, and `result` reports the content as over the limit."""
        self._limit = -7  # every feed from now on is past it (the check at the end of feed)
        self._dropped = True
        self._chunks.clear()
        self._size = 0

    def _found(self, more: bytes, end: int) -> bool:
        self._last = more
        self._end = end
        return True

    def result(self) -> tuple[bytes, bool, bytes]:
        """(content, over the limit, the octets after the terminator); content is b"" when over."""
        more, end = self._last, self._end
        rest = more[end + 3 :]
        if self._dropped:
            return b"", True, rest
        chunks: list[bytes | memoryview] = list(self._chunks)
        if end > 0:
            chunks.append(memoryview(more)[:end])
            self._dotted = self._dotted or more.find(b".", 0, end) >= 0
        content = b"".join(chunks)
        if end < 0:  # the terminator's first CRLF ends the last chunk kept
            content = content[:end]
        if self._dotted and (content.startswith(b".") or _DOT_LED_LINE.search(content)):
            # Only a period after CRLF goes: the CRs and LFs stay where they were, so the bare
            # CR/LF check (before or after this) sees the same line breaks, and no CR is moved
            # next to an LF. ("\r\n.\r\n" cannot be here: it ended the content.)
            if content.startswith(b"."):
                content = content[1:]
            content = content.replace(b"\r\n.", b"\r\n")
        return content, len(content) > self._limit, rest


def has_bare_cr_or_lf(content: bytes) -> bool:
    """True when a CR or LF appears outside a CRLF pair (C-level passes, no loop).

    With no CR outside a pair, every CR starts a CRLF, so the LFs are all paired exactly when
    there are as many LFs as CRs. Two one-octet counts and one regex search for a CR without its
    LF: 1.0 ms per MB, where counting the two-octet CRLF (a substring search, not a memchr) and a
    `translate` cost 1.8 (docs/benchmarks.md, eleventh session).
    """
    return content.count(b"\r") != content.count(b"\n") or _BARE_CR.search(content) is not None


# What a HELO name keeps in the Received field: the octets of a domain (underscores too: device
# names have them) or an address literal. A ";" would end the field's tokens before the date, a
# '"' open a quoted string, "<" ">" "(" ")" an address or a comment, none of them closed.
_NOT_IN_A_HELO_NAME = re.compile(r"[^A-Za-z0-9._:\[\]-]")

_date_cache: list[tuple[int, str]] = [(-1, "")]


def _date_now() -> str:
    """The RFC 5322 date of this second, formatted once per second (every message needs one)."""
    second = int(time.time())
    cached = _date_cache[0]
    if cached[0] != second:
        cached = (second, format_datetime(datetime.fromtimestamp(second, UTC).astimezone()))
        _date_cache[0] = cached
    return cached[1]


def received_header(
    *,
    helo: str,
    client_ip: str,
    fqdn: str,
    connector: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    now: datetime | None = None,
) -> bytes:
    """One RFC 5321 §4.4 trace header: the real peer address, HELO shown but not trusted."""
    when = format_datetime(now) if now is not None else _date_now()
    safe_helo = _NOT_IN_A_HELO_NAME.sub("", helo)[:255] or "unknown"
    ip = client_ip if ":" not in client_ip else f"IPv6:{client_ip}"
    header = (
        f"Received: from {safe_helo} ([{ip}])\r\n"
        f"\tby {fqdn} (RelayGate; {connector.replace('(', '').replace(')', '')})\r\n"
        f"\twith {protocol} id {queue_id}"
    )
    if recipient:
        header += f"\r\n\tfor <{recipient}>"
    return (header + f"; {when}\r\n").encode("utf-8", "replace")
