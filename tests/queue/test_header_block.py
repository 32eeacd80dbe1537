"""`header_block` finds the end of the header on the raw bytes (so a 1 MB body is never copied): it
must give exactly what normalising the whole message first, then reading it line by line, gives."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.queue.bounce import header_block, header_value


def reference_header_block(message: bytes) -> bytes:
    """The straightforward definition: CRLF → LF over everything, then the lines up to the first
    one that is neither a header field nor a continuation (the empty line, or a body line)."""
    text = message.replace(b"\r\n", b"\n")
    lines = text.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    head: list[bytes] = []
    for line in lines:
        if re.match(rb"[!-9;-~]+[ \t]*:", line) or (head and line[:1] in (b" ", b"\t")):
            head.append(line)
        else:
            break
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in head)


_pieces = st.lists(
    st.sampled_from(
        [b"\r", b"\n", b"\r\n", b"Subject: x", b" folded", b"a", b":", b"\r\r\n", b"\t", b"X :"]
    ),
    max_size=40,
)


@settings(max_examples=500, deadline=None)
@given(_pieces)
def test_header_block_matches_the_reference(parts: list[bytes]) -> None:
    message = b"".join(parts)
    assert header_block(message) == reference_header_block(message)


def test_a_big_body_is_not_part_of_the_header() -> None:
    message = b"Subject: Invoice\r\nFrom: a@b.example\r\n\r\n" + b"Subject: not this\r\n" * 60000
    assert header_block(message) == b"Subject: Invoice\r\nFrom: a@b.example\r\n"
    assert header_value(message, "Subject") == "Invoice"


def test_a_message_without_an_empty_line_is_not_all_header() -> None:
    """A script's report with no empty line: the header ends at its first body line (as the
    receiving session measures it), so an NDR never returns the body."""
    message = (
        b"Subject: Nightly report\r\nFrom: a@b.example\r\n" + b"secret=1 in the body\r\n" * 1000
    )
    assert header_block(message) == b"Subject: Nightly report\r\nFrom: a@b.example\r\n"
    assert header_block(b"no header at all\r\nSubject: not this\r\n") == b""
    assert header_value(b"Subject: x\r\nbody\r\nMessage-ID: <no@t>\r\n", "Message-ID") == ""


def test_header_value_drops_c0_and_c1_controls() -> None:
    """U+009B (CSI) in a UTF-8 Subject reached `relaygate queue show`'s terminal and NDRs as is."""
    message = "Subject: Scan\u009b31m red\u0085 \x1b[2J done\tok\r\n\r\nbody\r\n".encode()
    assert header_value(message, "Subject") == "Scan31m red [2J done\tok"
