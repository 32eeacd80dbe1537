"""The message body as it goes on the wire after DATA (security-bar §2D): the delivery client's
output normalisation, pure functions on bytes.

`prepare_data` gives CRLF-only lines of at most 998 octets without NUL; `dot_stuff` adds RFC 5321
transparency; `normalise_for_wire` is both plus the terminator, exactly the octets sent after
the 354. A well-formed message (the usual case) passes every check with C-level scans and no
copy.
"""

from __future__ import annotations

import re

from relaygate.smtp.message import has_bare_cr_or_lf

__all__ = [
    "MAX_LINE_OCTETS",
    "dot_stuff",
    "header_is_ascii",
    "normalise_for_wire",
    "prepare_data",
]


MAX_LINE_OCTETS = 998  # RFC 5321 §4.5.3.1.6: 1000 octets including CRLF
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_LINE_START_DOT = re.compile(rb"(?m)^\.")
_DOT_AFTER_LF = re.compile(rb"\n\.")  # the check: 3× faster than bytes' `in` on big content
# Lines from this length on may be folded by prepare_data (dot-led lines fold from 997 octets).
_FOLD_FROM = 997


def _cut_point(line: bytes, limit: int) -> int:
    """Where to break `line` at or before `limit` without splitting a UTF-8 sequence."""
    cut = limit
    for _ in range(3):
        if 0x80 <= line[cut] <= 0xBF:  # continuation byte: the character starts earlier
            cut -= 1
        else:
            return cut
    return cut if not 0x80 <= line[cut] <= 0xBF else limit


def _fold(line: bytes, out: list[bytes]) -> None:
    # Dot-stuffing adds one octet to a line that starts with ".", so such a line gets 997.
    limit = MAX_LINE_OCTETS - 1 if line.startswith(b".") else MAX_LINE_OCTETS
    while len(line) > limit:
        cut = _cut_point(line, limit)
        out.append(line[:cut])
        line = b" " + line[cut:]
        limit = MAX_LINE_OCTETS
    out.append(line)


def _may_have_long_line(data: bytes) -> bool:
    """False when no line of `data` (CRLF-only) is `_FOLD_FROM` octets or longer.

    A line that long contains a whole aligned block of ``(_FOLD_FROM + 1) // 2`` octets, so it is
    enough that every such block holds a line feed: a few thousand C-level ``find`` calls per MB
    (0.6 ms), where ``split`` builds an object per line (7 ms) and a regex such as
    ``[^\r\n]{997}`` backtracks at every octet (~250 ms). A block without one is only a "maybe":
    the exact check decides.
    """
    half = (_FOLD_FROM + 1) // 2
    find = data.find
    for start in range(0, len(data) - half + 1, half):
        if find(b"\n", start, start + half) < 0:
            return max(map(len, data.split(b"\r\n"))) >= _FOLD_FROM
    return False


def prepare_data(data: bytes, *, crlf_only: bool = False) -> bytes:
    """The message as lines of the wire, before dot-stuffing.

    * NUL octets are removed (never valid in 7bit/8bit content; some receivers strip them and would
      then see ``<CRLF>.<CRLF>`` in ``<CRLF>NUL.<CRLF>``);
    * every CRLF, bare CR and bare LF becomes CRLF (``\\r\\r\\n`` is two line breaks);
    * a line longer than 998 octets is broken by inserting CRLF SPACE (Postfix's
      ``smtp_line_length_limit`` behaviour: in a header this is ordinary folding, in a body it keeps
      MIME parts parseable), never inside a UTF-8 sequence; continuation lines start with a space, so
      a break can never create a line that starts with ".";
    * the result ends with CRLF (an empty message is one empty line).

    A well-formed message (CRLF only, lines ≤ 998, no NUL) comes back unchanged.

    crlf_only: the caller knows that every line break is CRLF (the receiving session checked it),
    which skips the costliest scan (~3 ms per MB). The other checks still run.
    """
    # Fast path, all C-level scans: a well-formed message is returned as it is, with no per-line work.
    if (
        data.endswith(b"\r\n")
        and (crlf_only or not has_bare_cr_or_lf(data))
        and b"\x00" not in data
        and not _may_have_long_line(data)
    ):
        return data
    if b"\x00" in data:
        data = data.replace(b"\x00", b"")
    lines = _LINE_BREAK.split(data)
    if lines and lines[-1] == b"":
        lines.pop()
    out: list[bytes] = []
    for line in lines:
        if len(line) < MAX_LINE_OCTETS - 1:
            out.append(line)
        else:
            _fold(line, out)
    if not out:
        return b"\r\n"
    return b"\r\n".join(out) + b"\r\n"


def header_is_ascii(prepared: bytes) -> bool:
    """The header block (up to the first empty line; all of it if there is none) is ASCII."""
    end = prepared.find(b"\r\n\r\n")
    return (prepared if end < 0 else prepared[:end]).isascii()


def dot_stuff(prepared: bytes) -> bytes:
    """RFC 5321 §4.5.2 transparency on CRLF-only text: a line starting with "." gets another."""
    if not prepared.startswith(b".") and _DOT_AFTER_LF.search(prepared) is None:
        return prepared  # the usual case: no line starts with "." (a C-level scan, no copy)
    return _LINE_START_DOT.sub(b"..", prepared)


def normalise_for_wire(data: bytes) -> bytes:
    """Exactly the octets sent after the 354: `prepare_data`, dot-stuffed, then ``.<CRLF>``.

    Guarantees: only CRLF line breaks; no line over 1000 octets including CRLF; the only
    ``<CRLF>.<CRLF>`` is the terminator at the very end; un-stuffing gives back `prepare_data(data)`.
    """
    return dot_stuff(prepare_data(data)) + b".\r\n"
