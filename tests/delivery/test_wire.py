"""Output normalisation: the relay must never smuggle (security-bar §2D items 79-82)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.delivery.wire import (
    MAX_LINE_OCTETS,
    dot_stuff,
    normalise_for_wire,
    prepare_data,
)

SMUGGLING_SEQUENCES = [
    b"\n.\n",
    b"\n.\r",
    b"\r.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r.\r\n",
    b"\r\n.\r\r\n",
    b"\r\r\n.\r\r\n",
    b"\r\n\x00.\r\n",
    b"\r\n.\n",
    b"\r\n.\r",
]


def unstuff(wire: bytes) -> bytes:
    """What a receiver reconstructs: lines up to the terminator, leading dot removed."""
    assert wire.endswith(b".\r\n")
    body = wire[:-3]
    lines = body.split(b"\r\n")
    assert lines[-1] == b""
    out = [line[1:] if line.startswith(b".") else line for line in lines[:-1]]
    return b"".join(line + b"\r\n" for line in out)


def check_wire(wire: bytes) -> None:
    # the only <CRLF>.<CRLF> is the terminator (an empty message is "\r\n.\r\n" itself)
    assert wire.find(b"\r\n.\r\n") == len(wire) - 5
    assert not wire.startswith(b".\r\n")
    # no bare CR, no bare LF
    assert re.search(rb"\r(?!\n)", wire) is None
    assert re.search(rb"(?<!\r)\n", wire) is None
    assert b"\x00" not in wire
    lines = wire.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert len(line) + 2 <= 1000
    # every body line starting with "." is stuffed
    for line in lines[:-2]:
        if line.startswith(b"."):
            assert line.startswith(b"..")


def test_well_formed_message_passes_unchanged():
    msg = b"From: a@x.example\r\nSubject: hi\r\n\r\nline one\r\nline two\r\n"
    assert prepare_data(msg) == msg
    assert normalise_for_wire(msg) == msg + b".\r\n"


def test_dots_are_stuffed_and_terminated():
    msg = b"Subject: x\r\n\r\n.\r\n..two\r\n.start\r\nend\r\n"
    wire = normalise_for_wire(msg)
    assert wire == b"Subject: x\r\n\r\n..\r\n...two\r\n..start\r\nend\r\n.\r\n"
    assert unstuff(wire) == msg


def test_missing_final_crlf_is_added():
    assert normalise_for_wire(b"body") == b"body\r\n.\r\n"


def test_empty_message():
    assert prepare_data(b"") == b"\r\n"
    assert normalise_for_wire(b"") == b"\r\n.\r\n"


@pytest.mark.parametrize("seq", SMUGGLING_SEQUENCES)
def test_smuggling_sequences_never_appear_raw(seq):
    msg = b"Subject: test\r\n\r\nSMUGGLINGSTART" + seq + b"MAIL FROM:<evil@x>\r\nSMUGGLINGEND\r\n"
    wire = normalise_for_wire(msg)
    check_wire(wire)
    body = wire[:-5]
    for raw in SMUGGLING_SEQUENCES:
        assert raw not in body


def test_bare_cr_and_lf_become_crlf():
    assert prepare_data(b"a\rb\nc\r\nd\r\r\ne") == b"a\r\nb\r\nc\r\nd\r\n\r\ne\r\n"


def test_nul_removed_so_hidden_dot_is_stuffed():
    wire = normalise_for_wire(b"a\r\n\x00.\r\nb\r\n")
    assert wire == b"a\r\n..\r\nb\r\n.\r\n"


def test_long_line_is_folded_with_crlf_space():
    line = b"x" * 2500
    out = prepare_data(line + b"\r\n")
    parts = out.split(b"\r\n")[:-1]
    assert [len(p) for p in parts] == [998, 998, 506]
    assert parts[1].startswith(b" ") and parts[2].startswith(b" ")
    assert b"".join(p.removeprefix(b" ") if i else p for i, p in enumerate(parts)) == line


def test_long_dot_line_leaves_room_for_the_stuffed_dot():
    line = b"." + b"y" * 1200
    wire = normalise_for_wire(line)
    check_wire(wire)
    first = wire.split(b"\r\n")[0]
    assert len(first) == MAX_LINE_OCTETS and first.startswith(b"..")


def test_exactly_998_is_kept_but_998_with_dot_is_folded():
    assert prepare_data(b"z" * 998) == b"z" * 998 + b"\r\n"
    assert prepare_data(b"." * 998).count(b"\r\n") == 2


def test_fold_never_splits_utf8():
    line = "é".encode() * 800  # 1600 octets, 2 per character
    out = prepare_data(line)
    for part in out.split(b"\r\n")[:-1]:
        part.removeprefix(b" ").decode("utf-8")  # raises if a sequence were split


def test_dot_stuff_only_at_line_start():
    assert dot_stuff(b"a.b\r\n.c\r\n") == b"a.b\r\n..c\r\n"


_alphabet = st.sampled_from([b"\r", b"\n", b".", b"\x00", b"a", b" ", b"\xc3\xa9", b"\r\n"])
_chunks = st.lists(
    st.one_of(_alphabet, st.binary(max_size=40), st.just(b"q" * 1100), st.just(b"." * 999)),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(_chunks)
def test_property_wire_is_always_safe(parts):
    data = b"".join(parts)
    wire = normalise_for_wire(data)
    check_wire(wire)
    # receiver reconstructs exactly prepare_data(data)
    assert unstuff(wire) == prepare_data(data)
    # idempotent: preparing prepared data changes nothing
    assert prepare_data(prepare_data(data)) == prepare_data(data)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.binary(max_size=200).map(
            lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"")
        ),
        max_size=30,
    )
)
def test_property_well_formed_is_byte_exact(lines):
    lines = [line[:998] for line in lines]
    msg = b"".join(line + b"\r\n" for line in lines)
    if not msg:
        return
    assert prepare_data(msg) == msg


@pytest.mark.parametrize("offset", [0, 1, 2, 497, 498, 499, 500, 997, 1000, 4096])
@pytest.mark.parametrize("length", [996, 997, 998, 999, 1500])
def test_the_fast_path_finds_every_long_line_wherever_it_sits(offset: int, length: int) -> None:
    """The fast path's aligned-block check must see a long line at any offset: lines over 998
    octets are folded; 997 and 998 leave the fast path and are kept by the exact one."""
    short = b"s" * 17 + b"\r\n"
    head = (short * (offset // len(short) + 1))[:offset]
    head = head[: head.rfind(b"\r\n") + 2] if b"\r\n" in head else b""
    data = head + b"L" * length + b"\r\n" + short * 3
    out = prepare_data(data)
    assert (out != data) == (length > 998)
    assert max(len(line) for line in out.split(b"\r\n")) <= 998
