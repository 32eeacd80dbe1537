"""Taking the big attachments out of a message, for Microsoft Graph's large-message path.

Graph takes a message's MIME in one request of at most 4 MB (base64), but attachments of up to
150 MB through upload sessions. `split_attachments` finds the MIME parts that can go as file
attachments (a filename, an ``attachment`` disposition or, but for a text part, a Content-ID:
never a text body) and takes out the biggest ones until the rest is under a target size. The rest is the message's own
octets with those parts cut out (their delimiter line and the part, nothing else): headers,
bodies and the other parts are byte for byte what the relay would have sent. A multipart left
with no part gets one empty ``text/plain`` part (RFC 2046 wants at least one).

Pure functions on the CRLF octets of the wire (`relaygate.delivery.wire.prepare_data`); only
offsets are kept, a part's content is decoded when it is uploaded (`Attachment.content`).
"""

from __future__ import annotations

import binascii
import email.header
import mimetypes
import re
from collections import Counter
from dataclasses import dataclass
from email.message import Message
from email.parser import HeaderParser
from email.policy import compat32

__all__ = ["Attachment", "Split", "Unsplittable", "split_attachments"]

#: Bounds on the parse of a hostile message: nesting depth and parts in all.
MAX_DEPTH = 20
MAX_PARTS = 2000
#: A part smaller than this is never worth an upload session of its own.
MIN_PART_OCTETS = 1024
#: A bigger part's base64 or quoted-printable is decoded this much at a time: binascii keeps the
#: GIL through one call, so a worker thread decoding 100 MB in one call would stall the event
#: loop as long as decoding on it (~0.5 s); between pieces the loop gets its turn.
DECODE_PIECE_OCTETS = 1024 * 1024

_EMPTY_PART = b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
#: The transfer encodings `Attachment.content` decodes (RFC 2045's; no x-uuencode and the like).
_DECODED = frozenset({"7bit", "8bit", "binary", "base64", "quoted-printable"})
#: A header line: a field name and its colon, or a folded line (email.feedparser's headerRE).
_HEADER_LINE = re.compile(rb"[\x21-\x39\x3b-\x7e]*:|[\t ]")
#: Multiparts whose parts are covered by a signature or encrypted (RFC 1847: S/MIME, PGP/MIME):
#: taking a part out would break the signature silently, so they are never split.
_SEALED = frozenset({"multipart/signed", "multipart/encrypted"})


@dataclass(frozen=True, slots=True)
class Attachment:
    """A part taken out of the message.

    start, end: the part's body (its encoded content) in the message's octets.
    encoding: its Content-Transfer-Encoding (lower case; ``7bit`` when none).
    name, content_type: as Graph's AttachmentItem wants them.
    content_id: without the angle brackets, for an inline part (``""`` otherwise).
    """

    start: int
    end: int
    encoding: str
    name: str
    content_type: str
    content_id: str

    def content(self, data: bytes | memoryview) -> bytes | bytearray:
        """The part's decoded octets (one copy of the attachment; the message is not copied)."""
        view = memoryview(data)[self.start : self.end]
        if self.encoding == "base64":
            if len(view) > DECODE_PIECE_OCTETS:
                return _base64_in_pieces(view)
            try:
                return binascii.a2b_base64(view)  # ignores the line breaks, as a reader does
            except binascii.Error:  # its "=" padding left out, or its last group cut short
                return _lenient_base64(view)
        if self.encoding == "quoted-printable":
            if len(view) > DECODE_PIECE_OCTETS:
                return _qp_in_pieces(view)
            return binascii.a2b_qp(view)
        return bytes(view)

    @property
    def estimated_size(self) -> int:
        """The decoded size before decoding (base64: 3 octets per 4, line breaks included)."""
        encoded = self.end - self.start
        return encoded * 3 // 4 if self.encoding == "base64" else encoded


_NOT_BASE64 = bytes(
    set(range(256)) - set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
)


def _lenient_base64(view: memoryview) -> bytes:
    """Base64 that binascii refuses, decoded as readers do (email's decode_b): the padding
    added; a last group of one character (no octet in it) dropped."""
    clean = bytes(view).translate(None, _NOT_BASE64)
    if len(clean) % 4 == 1:
        clean = clean[:-1]
    return binascii.a2b_base64(clean + b"=" * (-len(clean) % 4))


def _base64_in_pieces(view: memoryview) -> bytearray:
    """Base64 decoded DECODE_PIECE_OCTETS at a time, as `_lenient_base64` decodes it (what is
    not of the alphabet ignored, the padding implied): each piece's groups of 4 characters, the
    characters left over carried to the next. Appended to one buffer piece by piece: neither
    a copy of the whole nor its allocation at once (a 100 MB buffer's pages are faulted in
    under the GIL: ~0.1 s)."""
    out = bytearray()
    carry = b""
    for start in range(0, len(view), DECODE_PIECE_OCTETS):
        clean = carry + bytes(view[start : start + DECODE_PIECE_OCTETS]).translate(
            None, _NOT_BASE64
        )
        whole = len(clean) - len(clean) % 4
        out += binascii.a2b_base64(clean[:whole])
        carry = clean[whole:]
    if len(carry) > 1:  # a last group of one character holds no octet
        out += binascii.a2b_base64(carry + b"=" * (-len(carry) % 4))
    return out


def _qp_in_pieces(view: memoryview) -> bytearray:
    """Quoted-printable decoded about DECODE_PIECE_OCTETS at a time, each piece ending after a
    line break (an ``=XX`` or a soft break never spans one), or, in a line longer than a piece,
    before an ``=`` its last two octets hold."""
    out = bytearray()
    start = 0
    while start < len(view):
        end = min(start + DECODE_PIECE_OCTETS, len(view))
        if end < len(view):
            cut = bytes(view[start:end]).rfind(b"\n")
            if cut >= 0:
                end = start + cut + 1
            else:  # a line longer than a piece: not through an "=XX" nor a soft break's "="
                end -= 2 if view[end - 2] == 0x3D else 1 if view[end - 1] == 0x3D else 0
        out += binascii.a2b_qp(view[start:end])
        start = end
    return out


@dataclass(frozen=True, slots=True)
class Split:
    """rest: the message without the parts; parts: what was taken out, in message order."""

    rest: bytes
    parts: tuple[Attachment, ...]


@dataclass(frozen=True, slots=True)
class Unsplittable:
    """Why the message cannot be brought under the limit (for the NDR)."""

    reason: str


@dataclass(slots=True)
class _Leaf:
    cut_start: int  # the CRLF before its delimiter line
    cut_end: int  # the CRLF before the next delimiter line
    parent: int  # the index of its multipart
    attachment: Attachment | None  # None: not a file attachment (a text body, an alternative)
    size: int  # the octets the cut removes
    label: str


def _decoded(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except Exception:  # a malformed encoded word: the raw text
        return value


def _headers(data: bytes, start: int, end: int) -> tuple[Message, int]:
    """A part's header (parsed) and where its body starts: after the empty line, or, when a
    line that is no header field comes first (no empty line), at that line, as readers take it
    (Python's parser: MissingHeaderBodySeparatorDefect)."""
    if data.startswith(b"\r\n", start):
        return Message(), start + 2
    pos = body = start
    while pos < end:
        eol = data.find(b"\r\n", pos, end)
        eol = end if eol < 0 else eol
        if eol == pos:  # the empty line
            body = min(eol + 2, end)
            break
        if not _HEADER_LINE.match(data, pos, eol):
            body = pos
            break
        pos = body = min(eol + 2, end)
    head = data[start:body].decode("utf-8", "replace")
    return HeaderParser(policy=compat32).parsestr(head), body


def _describe(head: Message, body_start: int, end: int) -> tuple[str, Attachment | None]:
    """A label for the NDR, and the part as an attachment when it can be one."""
    ctype = head.get_content_type()
    if ctype in _SEALED:
        return f"{ctype}, whose parts its signature or encryption covers", None
    filename = head.get_filename() or head.get_param("name")
    name = _decoded(str(filename)) if isinstance(filename, str) else ""
    disposition = head.get_content_disposition()
    cid = str(head.get("Content-ID", "") or "").strip().strip("<>").strip()
    label = f'"{name}" ({ctype})' if name else ctype
    # A Content-ID alone makes an inline image an attachment, not a text part: the root of a
    # multipart/related may have one (RFC 2387's start=), and it is the body.
    referenced = bool(cid) and head.get_content_maintype() != "text"
    if not (name or disposition == "attachment" or referenced):
        return label, None  # a body: it stays in the message
    encoding = str(head.get("Content-Transfer-Encoding", "7bit") or "7bit").strip().lower()
    if encoding not in _DECODED:
        return label, None  # x-uuencode and the like: uploaded, its octets would not be the file
    if not name:
        name = "attachment" + (mimetypes.guess_extension(ctype) or ".bin")
    inline = disposition == "inline" or (disposition is None and bool(cid))
    return label, Attachment(
        start=body_start,
        end=end,
        encoding=encoding,
        name=name,
        content_type=ctype,
        content_id=cid if inline and cid else "",
    )


def _walk(data: bytes) -> tuple[list[_Leaf], dict[int, tuple[int, bytes, int]], str]:
    """The leaf parts of the message's multiparts (recursively), each multipart as (its first
    delimiter's CRLF, its boundary, number of parts), and the top part's label when the message
    is not multipart."""
    leaves: list[_Leaf] = []
    multiparts: dict[int, tuple[int, bytes, int]] = {}
    head, body = _headers(data, 0, len(data))
    if head.get_content_maintype() != "multipart" or head.get_content_type() in _SEALED:
        return leaves, multiparts, _describe(head, body, len(data))[0]
    stack: list[tuple[Message, int, int, int]] = [(head, body, len(data), 0)]
    count = 0
    while stack:
        head, body, end, depth = stack.pop()
        boundary = head.get_param("boundary")
        if not isinstance(boundary, str) or not boundary or depth >= MAX_DEPTH:
            continue
        delimiter = b"\r\n--" + boundary.encode("utf-8", "replace")
        index = len(multiparts)
        # The CRLF before the first delimiter is the header's blank line's.
        pos = data.find(delimiter, body - 2, end)
        first = pos
        parts = 0
        while pos >= 0 and count < MAX_PARTS:
            after = pos + len(delimiter)
            if data.startswith(b"--", after):
                break  # the close delimiter
            line_end = data.find(b"\r\n", after, end)
            if line_end < 0:
                break
            start = line_end + 2
            nxt = data.find(delimiter, start - 2, end)
            if nxt < 0:  # no close delimiter: the part runs to the end
                nxt = end
            part_head, part_body = _headers(data, start, nxt)
            count += 1
            parts += 1
            if (
                part_head.get_content_maintype() == "multipart"
                and part_head.get_content_type() not in _SEALED
            ):
                stack.append((part_head, part_body, nxt, depth + 1))
            else:
                label, attachment = _describe(part_head, part_body, nxt)
                leaves.append(_Leaf(pos, nxt, index, attachment, nxt - pos, label))
            if nxt >= end:
                break
            pos = nxt
        if first >= 0:
            multiparts[index] = (first, delimiter, parts)
    return leaves, multiparts, ""


def split_attachments(data: bytes, target: int, limit: int) -> Split | Unsplittable:
    """Take the biggest attachment parts out of `data` until what is left is at most `target`
    octets (never out of a multipart/signed or multipart/encrypted). Unsplittable when what is left after taking out every attachment (of at least
    MIN_PART_OCTETS) would still be over `limit`."""
    leaves, multiparts, single = _walk(data)
    candidates = sorted(
        (leaf for leaf in leaves if leaf.attachment and leaf.size >= MIN_PART_OCTETS),
        key=lambda leaf: leaf.size,
        reverse=True,
    )
    left = len(data)
    taken: list[_Leaf] = []
    for leaf in candidates:
        if left <= target:
            break
        taken.append(leaf)
        left -= leaf.size
    if left > limit:
        if single:
            why = f"it is one part ({single}), not an attachment that can be uploaded apart"
        else:
            out = {id(leaf) for leaf in taken}  # by identity: thousands of parts stay linear
            kept = [leaf for leaf in leaves if id(leaf) not in out]
            biggest = max(kept, key=lambda leaf: leaf.size, default=None)
            why = f"{left} octets are left without its attachments"
            if biggest is not None:
                why += f", the biggest part {biggest.label} ({biggest.size} octets)"
        return Unsplittable(why)
    taken.sort(key=lambda leaf: leaf.cut_start)
    taken_of = Counter(leaf.parent for leaf in taken)
    emptied = {parent for parent, n in taken_of.items() if n == multiparts[parent][2]}
    view = memoryview(data)
    pieces: list[bytes | memoryview] = []
    at = 0
    placed: set[int] = set()
    for leaf in taken:
        pieces.append(view[at : leaf.cut_start])
        if leaf.parent in emptied and leaf.parent not in placed:
            placed.add(leaf.parent)
            pieces += [multiparts[leaf.parent][1], b"\r\n", _EMPTY_PART]
        at = leaf.cut_end
    pieces.append(view[at:])
    rest = b"".join(pieces)
    parts = tuple(leaf.attachment for leaf in taken if leaf.attachment is not None)
    return Split(rest, parts)
