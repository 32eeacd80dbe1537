"""Where a message's header section ends: one rule for every part that reads a header.

The header ends at the first line that is neither a header field (``name:``) nor a continuation
of one: the empty line, or the first body line of a message that has no empty line (Postfix's
rule, and the receiving session's: `relaygate.smtp.message.scan_headers`). A line ends at LF; a
CR before it is part of the line, as after CRLF → LF. One anchored match over the raw bytes, so
a body however big is never copied.
"""

from __future__ import annotations

import re

__all__ = ["header_end", "header_of_head", "with_empty_line"]

_HEADER_LINES = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*")


def header_end(message: bytes) -> int:
    """The offset just past the header section's last line (0: no header at all)."""
    match = _HEADER_LINES.match(message)
    return match.end() if match else 0


def header_of_head(head: bytes, *, whole: bool) -> bytes:
    """The header section of a message of which ``head`` is the first bytes (``whole``: all of
    them), as far as ``head`` shows its fields whole. When ``head`` ends inside the header, its
    last field may go on past the cut, in the rest of its line or in a continuation line: it is
    left out, so that no field is shown cut short (half a Subject would read as the Subject).
    A line after the fields that is not one (the empty line, or a cut line such as ``X-Lo``)
    means the fields before it are whole, whatever that line turns out to be."""
    end = header_end(head)
    if whole or end < len(head):
        return head[:end]
    return head[: _last_field_start(head, end)]


def _last_field_start(head: bytes, end: int) -> int:
    """Where the last field of the header ``head[:end]`` starts: its first line, the last one
    that does not start with a space or a tab (a continuation)."""
    start = end
    while start > 0:
        start = head.rfind(b"\n", 0, start - 1) + 1
        if head[start : start + 1] not in (b" ", b"\t"):
            return start
    return 0


def with_empty_line(message: bytes, linesep: bytes = b"\r\n") -> bytes:
    """``message`` with the empty line between header and body that RFC 5322 requires, inserted
    where the header ends if the sender left it out (as Postfix's cleanup does). Unchanged when
    it is there, or when the message is all header."""
    end = header_end(message)
    if end == len(message) or message.startswith((b"\r\n", b"\n"), end):
        return message  # the usual case: no copy of the body
    return message[:end] + linesep + message[end:]
