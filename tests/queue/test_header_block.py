"""`header_block` cuts at the first empty line before normalising (so a 1 MB body is never copied):
it must give exactly what normalising the whole message first gives."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.queue.bounce import header_block, header_value


def reference_header_block(message: bytes) -> bytes:
    """The straightforward definition: CRLF → LF over everything, then cut at the first "\\n\\n"."""
    text = message.replace(b"\r\n", b"\n")
    end = text.find(b"\n\n")
    head = text if end < 0 else text[: end + 1]
    if head.startswith(b"\n"):
        return b""
    lines = head.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return b"".join(line.rstrip(b"\r") + b"\r\n" for line in lines)


_pieces = st.lists(
    st.sampled_from([b"\r", b"\n", b"\r\n", b"Subject: x", b" folded", b"a", b":", b"\r\r\n"]),
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
