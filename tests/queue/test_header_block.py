"""`header_block` finds the end of the header on the raw bytes (so a 1 MB body is never copied): it
must give exactly what normalising the whole message first, then reading it line by line, gives."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.header_section import header_end, header_of_head
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


def _field_starts(message: bytes) -> set[int]:
    """Where the fields of the message's header start, and where the header ends."""
    end = header_end(message)
    starts = {0, end}
    for at in range(end):
        if message[at : at + 1] == b"\n" and message[at + 1 : at + 2] not in (b" ", b"\t"):
            starts.add(at + 1)
    return {at for at in starts if at <= end}


@settings(max_examples=500, deadline=None)
@given(_pieces, st.integers(min_value=0, max_value=400))
def test_a_header_read_in_part_shows_whole_fields_only(parts: list[bytes], cut: int) -> None:
    """The view of a message reads its first bytes only (``Store.read_head``): what it shows of
    the header is whole fields of the whole message's header, never a field cut short, and the
    whole header when the whole message was read."""
    message = b"".join(parts)
    head = message[:cut]
    shown = header_of_head(head, whole=len(head) == len(message))
    assert message.startswith(shown)
    assert len(shown) in _field_starts(message)
    if cut >= len(message):
        assert shown == message[: header_end(message)]


def test_a_subject_cut_by_the_limit_is_left_out_not_shown_in_part() -> None:
    message = b"From: a@b.example\r\nSubject: Quarterly\r\n report\r\n\r\nbody\r\n"
    cut_in_line = message[: message.index(b"terly")]
    assert header_of_head(cut_in_line, whole=False) == b"From: a@b.example\r\n"
    before_fold = message[: message.index(b" report")]  # " report" may follow, or not
    assert header_of_head(before_fold, whole=False) == b"From: a@b.example\r\n"
    before_empty_line = message[: message.index(b"\r\n\r\n") + 2]
    assert header_of_head(before_empty_line, whole=False) == b"From: a@b.example\r\n"
    with_empty_line = message[: message.index(b"\r\n\r\n") + 4]
    assert header_value(header_of_head(with_empty_line, whole=False), "Subject") == (
        "Quarterly report"
    )
    assert header_of_head(message[:-2], whole=True) == message[: header_end(message)]
