"""Where a message's header section ends: one rule for every part that reads a header.

The header ends at the first line that is neither a header field (``name:``) nor a continuation
of one: the empty line, or the first body line of a message that has no empty line (Postfix's
rule, and the receiving session's: `relaygate.smtp.message.scan_headers`). A line ends at LF; a
CR before it is part of the line, as after CRLF → LF. One anchored match over the raw bytes, so
a body however big is never copied.
"""

from __future__ import annotations

import re

__all__ = ["header_end", "with_empty_line"]

_HEADER_LINES = re.compile(rb"(?:[!-9;-~]+[ \t]*:[^\n]*(?:\n|\Z)(?:[ \t][^\n]*(?:\n|\Z))*)*")


def header_end(message: bytes) -> int:
    """The offset just past the header section's last line (0: no header at all)."""
    match = _HEADER_LINES.match(message)
    return match.end() if match else 0


def with_empty_line(message: bytes, linesep: bytes = b"\r\n") -> bytes:
    """``message`` with the empty line between header and body that RFC 5322 requires, inserted
    where the header ends if the sender left it out (as Postfix's cleanup does). Unchanged when
    it is there, or when the message is all header."""
    end = header_end(message)
    if end == len(message) or message.startswith((b"\r\n", b"\n"), end):
        return message  # the usual case: no copy of the body
    return message[:end] + linesep + message[end:]
