"""The receive path's byte checks against their plain definitions (hypothesis)."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaygate.smtp.message import (
    DataReader,
    has_bare_cr_or_lf,
    local_hops,
    own_received_pattern,
    received_header,
    scan_headers,
)

_BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"a", b"\n\r", b"."]), max_size=30))
def test_has_bare_cr_or_lf_matches_its_definition(parts: list[bytes]) -> None:
    content = b"".join(parts)
    assert has_bare_cr_or_lf(content) == bool(_BARE.search(content))


def _reference_read(stream: bytes) -> tuple[bytes, bytes] | None:
    """RFC 5321 §4.1.1.4 and §4.5.2 as plainly as possible: the first CRLF.CRLF after the DATA
    line's CRLF ends the content; the first character of a line that starts with a period is
    deleted, whatever follows it (".foo" is "foo", not only ".." is ".")."""
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")
    if end < 0:
        return None
    lines = stream[:end].split(b"\r\n")
    content = b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)
    return content, stream[end + 3 :]


_OCTETS = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"a", b".", b"..", b"\r\n.", b"\r\n.\r\n", b"xyz", b".a"]
)


def _feed(reader: DataReader, stream: bytes, bounds: list[int]) -> tuple[bytes, bool, bytes] | None:
    """Feed `stream` cut at `bounds`; (content, too big, everything after the terminator)."""
    for a, b in itertools.pairwise(bounds):
        if reader.feed(stream[a:b]):
            content, too_big, rest = reader.result()
            return content, too_big, rest + stream[b:]  # the rest of this read, then what follows
    return None


@settings(max_examples=2000, deadline=None)
@given(
    parts=st.lists(_OCTETS, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=8),
)
def test_data_reader_matches_the_plain_definition_however_the_reads_fall(
    parts: list[bytes], cuts: list[int]
) -> None:
    stream = b"".join(parts)
    expected = _reference_read(stream)
    bounds = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    got = _feed(DataReader(10_000), stream, bounds)
    if expected is None:
        assert got is None
    else:
        assert got == (expected[0], False, expected[1])


@settings(max_examples=2000, deadline=None)
@given(
    parts=st.lists(_OCTETS, max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12),
    limit=st.integers(min_value=0, max_value=40),
)
def test_data_reader_is_over_the_limit_exactly_when_the_unstuffed_content_is(
    parts: list[bytes], cuts: list[int], limit: int
) -> None:
    stream = b"".join(parts)
    expected = _reference_read(stream)
    bounds = sorted({c for c in cuts if c < len(stream)} | {0, len(stream)})
    got = _feed(DataReader(limit), stream, bounds)
    if expected is None:
        assert got is None
        return
    assert got is not None and got[1:] == (len(expected[0]) > limit, expected[1])
    assert got[1] or got[0] == expected[0]


def test_data_reader_keeps_nothing_past_the_limit_and_still_finds_the_end() -> None:
    body = b"x" * 97 + b"\r\n"
    stream = body * 50 + b".\r\nQUIT\r\n"
    reader = DataReader(1000)
    bounds = [*range(0, len(stream), 7), len(stream)]
    assert _feed(reader, stream, bounds) == (b"", True, b"QUIT\r\n")
    assert reader._size <= 1000 + 6 + 7  # what it holds never grows past the limit
    # Under the limit, the same stream read the same way is returned whole.
    assert _feed(DataReader(10_000), stream, bounds) == (body * 50, False, b"QUIT\r\n")


@pytest.mark.parametrize("step", [1, 7, 100, 100_000])
def test_a_message_at_the_limit_is_kept_however_many_of_its_lines_were_dot_stuffed(
    step: int,
) -> None:
    """RFC 1870: the size is the message's, not counting the periods added by dot-stuffing; a
    message exactly max_message_size long with 40 stuffed lines is accepted (the reader
    dropped it as soon as the octets on the wire passed the limit), one octet more is not."""
    line = b".stuffed\r\n"
    for extra, too_big in ((0, False), (1, True)):
        content = line * 40 + b"x" * (1000 - 40 * len(line) - 2 + extra) + b"\r\n"
        stream = content.replace(b"\r\n.", b"\r\n..")
        stream = b"." + stream + b".\r\nQUIT\r\n"  # its first line starts with a period too
        assert len(content) == 1000 + extra and len(stream) > 1040
        bounds = [*range(0, len(stream), step), len(stream)]
        got = _feed(DataReader(1000), stream, bounds)
        assert got is not None and got[1:] == (too_big, b"QUIT\r\n")
        assert too_big or got[0] == content


def test_data_reader_past_the_limit_holds_nothing_more_while_the_message_goes_on() -> None:
    """Once over the limit nothing is held, read after read: the session stops counting the
    message against the memory budget then (before, each oversize message held up to
    max_message_size again, uncounted: ten 15 MB sessions grew RSS by 74 MB against 8 MB)."""
    reader = DataReader(1000)
    assert not reader.feed(b"x" * 1007)
    assert reader.dropping and reader.kept == 0
    for _ in range(30):
        assert not reader.feed(b"y" * 100)
        assert reader.kept == 0
    assert reader.feed(b"z\r\n.\r\n")
    assert reader.result() == (b"", True, b"")


def test_data_reader_told_to_stop_keeping_drops_everything_and_still_finds_the_end() -> None:
    body = b"y" * 98 + b"\r\n"
    stream = body * 20 + b".\r\nQUIT\r\n"
    reader = DataReader(10_000)
    assert not reader.feed(stream[:500])
    assert not reader.dropping
    reader.stop_keeping()  # the process's memory for messages in transit is spent
    assert reader.dropping
    assert not reader.feed(stream[500:1500])
    assert reader._size == 0  # nothing more is kept
    assert reader.feed(stream[1500:])
    assert reader.result() == (b"", True, b"QUIT\r\n")


def _header_size(content: bytes) -> int:
    """The plain definition: lines up to the first one that is neither a field nor a continuation."""
    size = 0
    for i, line in enumerate(content.splitlines(keepends=True)):
        if not line.endswith(b"\n"):
            break
        name, colon, _ = line.partition(b":")
        field = colon and name.rstrip(b" \t") and all(33 <= o <= 126 for o in name.rstrip(b" \t"))
        if not (field or (i and size and line[:1] in (b" ", b"\t"))):
            break
        size += len(line)
    return size


@settings(max_examples=1000, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            [
                b"Subject: x\r\n",
                b"Received: from a\r\n",
                b"\tcontinued\r\n",
                b" more\n",
                b"\r\n",
                b"body line\r\n",
                b"X-\xc3\xa9: y\r\n",
                b"Bad Name: z\r\n",
                b"Name : spaced\r\n",
                b":\r\n",
                b"no colon",
                b"Message-ID: <a@b>\r\n",
            ]
        ),
        max_size=12,
    )
)
def test_scan_headers_ends_the_header_where_the_plain_definition_does(lines: list[bytes]) -> None:
    content = b"".join(lines)
    assert scan_headers(content).header_size == _header_size(content)


def test_a_message_without_a_blank_line_is_not_all_header() -> None:
    """Postfix's cleanup: the header ends at the first line that is not a header field."""
    report = b"".join(b"report line %06d, no header fields here\r\n" % i for i in range(6000))
    assert scan_headers(report).header_size == 0
    content = b"Subject: r\r\nReceived: from a\r\n\tby b\r\n" + report
    scan = scan_headers(content)
    assert scan.header_size == len(b"Subject: r\r\nReceived: from a\r\n\tby b\r\n")
    assert scan.hops == 1
    # Neither a Received nor a Message-ID field after the header block counts.
    later = b"Subject: r\r\nbody\r\nReceived: x\r\nMessage-ID: <m@x>\r\n"
    assert (scan_headers(later).hops, scan_headers(later).message_id) == (0, "")
    ok = b"Message-ID: <m@x>\r\nReceived: x\r\n\r\nReceived: y\r\n"
    assert (scan_headers(ok).hops, scan_headers(ok).message_id) == (1, "<m@x>")


def test_local_hops_counts_the_header_blocks_received_fields_by_this_relays_names() -> None:
    own = own_received_pattern(["Relay.Corp.Example.", "mx2.corp.example", ""])
    assert own is not None and own_received_pattern(["", " "]) is None
    content = (
        b"Received: from a ([10.0.0.1])\r\n\tby relay.corp.example (RelayGate; x); date\r\n"
        b"Received: from b by MX2.corp.example. with ESMTP; date\r\n"
        b"Received: from c\r\n by relay.corp.example.evil.example; date\r\n"  # a longer name
        b"Received: from relay.corp.example by gw.partner.example; date\r\n"  # from, not by
        b"X-Note: by relay.corp.example\r\n"  # not a Received field
        b"\r\nReceived: by relay.corp.example; in the body\r\n"
    )
    scan = scan_headers(content)
    assert scan.hops == 4
    assert local_hops(content, scan.header_size, own) == 2


def test_the_received_field_shows_only_the_helo_octets_a_domain_or_literal_has() -> None:
    """The HELO is the client's word (a device may say `HP#Laser;1`): in the Received field only
    letters, digits and `.-_:[]` of it are kept, so no `;` ends its tokens before the date, no `"`
    opens a quoted string and no `<`, `>`, `(` or `)` an address or a comment that would run on
    (RFC 5322 §3.6.7). The protocol log keeps what was sent."""
    header = received_header(
        helo='a;b"c<d>(e)\\f#g_h.example[IPv6:2001:db8::1]',
        client_ip="10.0.0.1", fqdn="relay.corp.example", connector="C", protocol="ESMTP",
        queue_id="1-1", recipient=None,
    )  # fmt: skip
    assert header.startswith(b"Received: from abcdefg_h.example[IPv6:2001:db8::1] ([10.0.0.1])\r\n")
    assert header.replace(b"(RelayGate; C)", b"").count(b";") == 1  # the one before the date
    for helo in ("", ";;", "\x00"):
        assert b"from unknown ([10.0.0.1])" in received_header(
            helo=helo, client_ip="10.0.0.1", fqdn="r.example", connector="C",
            protocol="SMTP", queue_id="1-1", recipient=None,
        )  # fmt: skip
