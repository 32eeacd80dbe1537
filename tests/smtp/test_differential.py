"""Differential smuggling fuzz against Postfix (security-bar items 194 and 188, the SEC Consult
method automated): the same seeded random byte streams, cut into the same writes, sent to a real
`relaygate serve` and to a private Postfix started by the test (`smtpd_forbid_bare_newline =
reject`, from a client address it does not exclude), each relaying to its own loopback sink; then
what each delivered compared stream by stream (tests/support/differential.py says how).

`make test` runs 40 streams per mode, `make soak` 1,000. RELAYGATE_DIFF_SEED sets the seed (a
failure prints it, with the stream's index, bytes and both outcomes); RELAYGATE_DIFF_STREAMS=3,17
runs only those streams of the run. Each run prints a summary line (`pytest -s`): how many streams
both delivered, and in how many the relay was stricter (refused what Postfix took). The
meta-checks show the comparison bites: the same harness, given a Postfix that still ends data at a
bare `<LF>.<LF>` as the MTA under test, reports the smuggled second message.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.logs.test_address_privacy import Sink, write_config
from tests.smtp.conftest import RelayHandle, relay_connector
from tests.support.differential import (
    CLIENT_IP,
    Delivered,
    Group,
    Outcome,
    Stream,
    Transcript,
    compare,
    delivered_by_stream,
    loosely,
    make_stream,
    run_all,
    sender,
)
from tests.support.ports import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from postfix_sut import PostfixSystem
from postfix_sut import available as postfix_available

SEED = int(os.environ.get("RELAYGATE_DIFF_SEED", "20261208"))
#: "167,217": only these streams of the run (a failure names its stream), for replaying one.
ONLY = [int(i) for i in os.environ.get("RELAYGATE_DIFF_STREAMS", "").split(",") if i.strip()]
#: How long all deliveries may take to reach the sinks after the last stream.
SETTLE_TIMEOUT = 60.0

# The reference: Postfix's SMTP smuggling fix at its strictest, for every client (the exclusions
# default to $mynetworks, where the test's client is: excluded, nothing would be tested), and, as
# from Postfix 3.9 on, a client that sends commands or content before a reply allows it (after
# EHLO or DATA, RFC 2920) disconnected as RelayGate does (554 5.5.0). No error sleeps (smtpd
# would pause a second per error past the soft limit: slower, and no other messages).
REFERENCE = {
    "smtpd_forbid_bare_newline": "reject",
    "smtpd_forbid_bare_newline_exclusions": "",
    "smtpd_forbid_unauth_pipelining": "yes",
    "smtpd_error_sleep_time": "0",
    "smtpd_soft_error_limit": "100",
    "smtpd_hard_error_limit": "100",
}
# The reference for RelayGate's connector with bare_linefeed_rejection_enabled = false: Postfix's
# `normalize` (the default from 3.9): a bare LF read as CRLF, but only CRLF.CRLF ends the data.
NORMALIZE = "-o smtpd_forbid_bare_newline=normalize"
LENIENT_CLIENT = "127.0.0.6"
# The meta-check's MTA under test: the same Postfix with the pre-fix behaviour (CVE-2023-51764),
# a bare LF taken as CRLF, so `<LF>.<LF>` ends the data, and the smuggled DATA's content, sent
# before its 354, taken too (forbidding that was Postfix's short-term workaround).
VULNERABLE = "-o smtpd_forbid_bare_newline=no -o smtpd_forbid_unauth_pipelining=no"


@dataclass
class Harness:
    relay: RelayHandle
    relay_sink: Sink
    postfix: PostfixSystem
    postfix_sink: Sink
    vulnerable_port: int
    normalize_port: int


@pytest.fixture
def harness(relay: Callable[..., RelayHandle]) -> Iterator[Harness]:
    reason = postfix_available()
    assert reason is None, reason  # Postfix is in the Makefile's DEBS; the suite runs as root
    with contextlib.ExitStack() as stack:
        relay_sink, postfix_sink = Sink(), Sink()
        for s in (relay_sink, postfix_sink):
            s.controller.start()
            stack.callback(s.controller.stop)
        # Postfix's processes run as the postfix user: pytest's tmp_path (under a root-only 0700
        # folder) is out of their reach.
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="relaygate-diff-")))
        workdir.chmod(0o755)
        vulnerable_port, normalize_port = free_port(), free_port()
        postfix = PostfixSystem(
            workdir,
            postfix_sink.controller.port,
            port=free_port(),
            settings=REFERENCE,
            services={vulnerable_port: VULNERABLE, normalize_port: NORMALIZE},
        )
        stack.callback(postfix.stop)
        postfix.start()
        lenient = relay_connector(
            [LENIENT_CLIENT], name="SMTP Relay Lenient", bare_linefeed_rejection_enabled=False
        )
        node = relay([relay_connector([CLIENT_IP]), lenient], mode="process", start=False)
        node.doc["send_connectors"][0]["port"] = relay_sink.controller.port
        node.doc["queue"]["transient_failure_retry_interval"] = "00:00:01"
        write_config(node)
        node.start()
        yield Harness(node, relay_sink, postfix, postfix_sink, vulnerable_port, normalize_port)


def _settle(targets: list[tuple[Sink, int]], postfix: PostfixSystem) -> None:
    """Until each sink has at least the messages its MTA acknowledged, Postfix's queue is empty
    and no sink has received anything for a second (an unacknowledged injected message would
    come in that second), or SETTLE_TIMEOUT."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last: list[int] = []
    quiet_since = time.monotonic()
    while time.monotonic() < deadline:
        counts = [len(sink.messages) for sink, _ in targets]
        if counts != last:
            last, quiet_since = counts, time.monotonic()
        done = all(c >= acked for c, (_, acked) in zip(counts, targets, strict=True))
        if done and postfix.queue_empty() and time.monotonic() - quiet_since > 1.0:
            return
        time.sleep(0.1)


Target = tuple[int, str, Sink]  # a server's port, the client address to send from, its sink


def _run(h: Harness, streams: list[Stream], targets: list[Target]) -> list[list[Outcome]]:
    """Every stream sent to every target at once; then, once the deliveries have settled, each
    stream's outcome on each target. Each sink must be one target's alone."""
    transcripts = [run_all([(port, source) for port, source, _ in targets], s) for s in streams]
    acked = [sum(t[i].acks() for t in transcripts) for i in range(len(targets))]
    _settle([(sink, a) for (_, _, sink), a in zip(targets, acked, strict=True)], h.postfix)
    by_stream = [delivered_by_stream(list(sink.messages)) for _, _, sink in targets]
    for delivered in by_stream:
        assert -1 not in delivered, f"a delivery no stream sent: {delivered[-1]}"
    return [
        [Outcome(t, delivered.get(s.index, [])) for t, delivered in zip(ts, by_stream, strict=True)]
        for s, ts in zip(streams, transcripts, strict=True)
    ]


def _report(stream: Stream, tested: Outcome, reference: Outcome, problems: list[str]) -> str:
    return (
        f"RELAYGATE_DIFF_SEED={SEED} stream {stream.index}: {problems}\n"
        f"stream: {[g.data for g in stream.groups]!r}\n"
        f"tested replies ({tested.transcript.short_waits} short waits): "
        f"{tested.transcript.received!r}\n"
        f"tested delivered: {tested.delivered}\n"
        f"reference replies ({reference.transcript.short_waits} short waits): "
        f"{reference.transcript.received!r}\n"
        f"reference delivered: {reference.delivered}"
    )


@dataclass
class Tally:
    failures: list[str]
    stricter: int = 0
    uncompared: int = 0
    replies_lost: int = 0
    both: int = 0
    #: Messages both delivered alike whose content held a fake end with a marker behind it.
    fake_ends_kept: int = 0


def _tally(
    streams: list[Stream], outcomes: list[tuple[Outcome, Outcome]], *, exact: bool = True
) -> Tally:
    t = Tally([])
    for stream, (tested, reference) in zip(streams, outcomes, strict=True):
        verdict = compare(stream, tested, reference, exact=exact)
        if verdict.problems:
            t.failures.append(_report(stream, tested, reference, verdict.problems))
        t.stricter += verdict.stricter
        t.uncompared += verdict.uncompared
        t.replies_lost += verdict.replies_lost
        t.both += bool(tested.delivered and reference.delivered)
        if not verdict.problems:
            t.fake_ends_kept += sum(len(d.markers) > 1 for d in tested.delivered)
    return t


@pytest.mark.parametrize("lenient", [False, True], ids=["strict", "lenient"])
@pytest.mark.parametrize(
    "count",
    [
        pytest.param(40, id="bounded"),
        pytest.param(1000, id="soak", marks=[pytest.mark.slow, pytest.mark.timeout(3600)]),
    ],
)
def test_relay_delivers_nothing_postfix_would_not(
    harness: Harness, count: int, lenient: bool
) -> None:
    """strict: the relay's default connector (bare CR/LF refused) against Postfix's `reject`;
    lenient: its connector with bare_linefeed_rejection_enabled = false against Postfix's
    `normalize`, where both take bare LFs and only the line breaks they deliver differ."""
    h = harness
    if lenient:
        tested, reference = (h.relay.port, LENIENT_CLIENT), (h.normalize_port, LENIENT_CLIENT)
    else:
        tested, reference = (h.relay.port, CLIENT_IP), (h.postfix.port, CLIENT_IP)
    streams = [make_stream(SEED, i) for i in ONLY or range(count)]
    outcomes = _run(h, streams, [(*tested, h.relay_sink), (*reference, h.postfix_sink)])
    t = _tally(streams, [(o[0], o[1]) for o in outcomes], exact=not lenient)
    print(
        f"\ndifferential fuzz, seed {SEED}, {'lenient' if lenient else 'strict'}: {len(streams)} "
        f"streams; both delivered in {t.both}, {t.fake_ends_kept} messages with a fake end inside "
        f"alike; the relay refused what Postfix delivered (stricter) in {t.stricter}; "
        f"{t.uncompared} relay deliveries after Postfix had hung up (not compared); "
        f"{t.replies_lost} 250s the client never read (the relay ended the session while the "
        "client still wrote: lost to the RST)"
    )
    assert not t.failures, "\n\n".join(t.failures)
    assert t.fake_ends_kept, "no message with a fake end inside was delivered by both"
    # Not vacuous: both MTAs delivered messages, and compared them, in a good part of the streams.
    assert t.both >= len(streams) // 5, f"only {t.both} of {len(streams)} delivered on both"


def _sequentially(h: Harness, streams: list[Stream]) -> list[tuple[Outcome, Outcome]]:
    """The streams to Postfix's vulnerable listener, then to its strict one (one sink for both:
    emptied in between)."""
    vulnerable = _run(h, streams, [(h.vulnerable_port, CLIENT_IP, h.postfix_sink)])
    with h.postfix_sink.lock:
        h.postfix_sink.messages.clear()
    strict = _run(h, streams, [(h.postfix.port, CLIENT_IP, h.postfix_sink)])
    return [(v[0], s[0]) for v, s in zip(vulnerable, strict, strict=True)]


# SEC Consult's payload: a message, `<LF>.<LF>`, a second transaction, the real end, in one write.
SEC_CONSULT = Stream(
    0,
    [
        Group(b"EHLO client.corp.example\r\n", [], 1),
        Group(b"MAIL FROM:<%s>\r\nRCPT TO:<user@remote.example>\r\nDATA\r\n" % sender(0), [], 3),
        Group(
            b"Subject: legit\r\n\r\nmarker MARK0x0\r\n\n.\n"
            b"MAIL FROM:<%s>\r\nRCPT TO:<other@remote.example>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nmarker MARK0x1\r\n.\r\n" % sender(0),
            [],
            1,
        ),
        Group(b"QUIT\r\n", [], 1),
    ],
)


def test_the_comparison_finds_smuggling_in_a_postfix_without_the_fix(harness: Harness) -> None:
    """The harness is not vacuous: with Postfix's pre-fix behaviour (`smtpd_forbid_bare_newline =
    no`, CVE-2023-51764) in the relay's seat, SEC Consult's payload is two messages there, none at
    the reference, and the comparison says so; and the seeded streams, 20 of the run's, find it too."""
    streams = [SEC_CONSULT] + [make_stream(SEED, i) for i in range(1, 21)]
    outcomes = _sequentially(harness, streams)
    (vulnerable, strict) = outcomes[0]
    # Postfix delivers its queue in parallel: the sink may get the two in either order.
    delivered = sorted(vulnerable.delivered, key=lambda d: d.markers)
    assert [d.markers for d in delivered] == [(b"MARK0x0",), (b"MARK0x1",)]
    assert [d.recipients for d in delivered] == [
        ("user@remote.example",),
        ("other@remote.example",),
    ]
    assert strict.delivered == [] and "bare <LF> received" in strict.transcript.received.decode()
    verdict = compare(SEC_CONSULT, vulnerable, strict)
    assert len(verdict.problems) == 2, verdict.problems
    assert any("[b'MARK0x1'] as one message" in p for p in verdict.problems), verdict.problems
    found = _tally(streams[1:], outcomes[1:]).failures
    print(f"\nthe fuzz found smuggling in {len(found)} of 20 streams to a Postfix without the fix")
    assert found, "20 fuzzed streams found nothing in a Postfix that ends data at <LF>.<LF>"


# -- the comparison itself, on outcomes made by hand ------------------------------------------------
_TWO = Stream(
    0,
    [
        Group(b"EHLO x\r\n", [], 1),
        Group(b"MAIL\r\nRCPT\r\nDATA\r\n", [], 3),
        Group(b"marker MARK0x0\r\n.\r\n", [], 1),
        Group(b"MAIL\r\nRCPT\r\nDATA\r\n", [], 3),
        Group(b"marker MARK0x1\r\n.\r\n", [], 1),
    ],
)
_ACK = b"250 2.0.0 Ok: queued as A\r\n"


def _outcome(*messages: tuple[bytes, ...], groups: int = 5, acks: int | None = None) -> Outcome:
    delivered = [
        Delivered("d0@corp.example", ("user@remote.example",), m, b"".join(m)) for m in messages
    ]
    replies = _ACK * (len(messages) if acks is None else acks)
    return Outcome(Transcript(replies, closed=False, groups_sent=groups), delivered)


X0, X1 = b"MARK0x0", b"MARK0x1"


@pytest.mark.parametrize(
    ("relay", "reference", "problem"),
    [
        pytest.param(_outcome((X0, X1)), _outcome((X0,), (X1,)), "as one message", id="joined"),
        pytest.param(_outcome((X0,), (X1,)), _outcome((X0, X1)), "as one message", id="split"),
        pytest.param(_outcome((X0,), (X1,)), _outcome((X0,)), "as one message", id="injected"),
        pytest.param(_outcome((X0,), acks=2), _outcome((X0,)), "acknowledged 2", id="lost"),
        # The reference hung up after group 3 of 5, having read X0 but delivered nothing: a
        # relay message holding X0 is compared all the same.
        pytest.param(_outcome((X0, X1)), _outcome(groups=3), "as one", id="before-hangup"),
    ],
)
def test_the_comparison_reports_what_a_smuggling_relay_would_do(
    relay: Outcome, reference: Outcome, problem: str
) -> None:
    verdict = compare(_TWO, relay, reference)
    assert verdict.problems and problem in verdict.problems[0], verdict.problems


def test_the_comparison_reports_a_body_an_envelope_or_a_bare_lf_that_differ() -> None:
    reference = _outcome((X0,))
    (d,) = reference.delivered
    other_body = Outcome(reference.transcript, [replace(d, body=b"marker MARK0x0\r\nmore\r\n")])
    other_rcpt = Outcome(reference.transcript, [replace(d, recipients=("other@remote.example",))])
    bare_lf = Outcome(reference.transcript, [replace(d, body=b"marker MARK0x0\n.\n")])
    assert "relay body" in compare(_TWO, other_body, reference).problems[0]
    assert "envelope" in compare(_TWO, other_rcpt, reference).problems[0]
    assert "bare CR or LF" in compare(_TWO, bare_lf, _outcome((X0,))).problems[0]


def test_the_same_messages_or_a_stricter_relay_are_no_smuggling() -> None:
    same = compare(_TWO, _outcome((X0,), (X1,)), _outcome((X0,), (X1,)))
    assert (same.problems, same.stricter, same.uncompared) == ([], False, 0)
    stricter = compare(_TWO, _outcome((X0,)), _outcome((X0,), (X1,)))
    assert (stricter.problems, stricter.stricter) == ([], True)
    # The reference hung up after the first message's content (group 3 of 5): the relay's
    # second message is made of bytes it never read.
    after_hangup = compare(_TWO, _outcome((X0,), (X1,)), _outcome((X0,), groups=3))
    assert (after_hangup.problems, after_hangup.uncompared) == ([], 1)


def test_a_250_lost_to_the_relays_close_is_no_smuggling_but_only_then() -> None:
    """The relay ended the session (a line it refuses later in the stream) while the client was
    still writing: the data arriving after the close brings an RST, and the client's kernel throws
    away the replies not read yet, the 250 of a message the relay delivered just as Postfix did
    (seen once under CI load). Counted, not a failure; the same without a close, or with a
    message Postfix did not deliver, still is."""
    closed = _outcome((X0,), acks=0)
    closed.transcript.closed = True
    lost = compare(_TWO, closed, _outcome((X0,)))
    assert (lost.problems, lost.replies_lost) == ([], 1)
    still_open = compare(_TWO, _outcome((X0,), acks=0), _outcome((X0,)))
    assert "acknowledged 0 messages with 250, delivered 1" in still_open.problems[0]
    injected = _outcome((X0,), (X1,), acks=0)
    injected.transcript.closed = True
    assert "as one message" in compare(_TWO, injected, _outcome((X0,))).problems[0]


def test_what_each_mta_does_to_bytes_it_accepted_is_not_a_difference() -> None:
    # RelayGate removes NULs on delivery, Postfix keeps them: a NUL inside a marker hides it
    # from one side only unless both are read without.
    ((_, [d]),) = delivered_by_stream(
        [("d0@corp.example", ["user@remote.example"], b"S: x\r\n\r\nmarker MA\x00RK0x1\r\n")]
    ).items()
    assert d.markers == (X1,) and d.body == b"marker MARK0x1\r\n"
    # A bare CR before a marker: a line break for the relay, a space for Postfix's normalize.
    relay = _outcome((X0,))
    relay.delivered[0] = replace(relay.delivered[0], body=b"marker MARK0x0\r\ntext\r\n")
    reference = _outcome((X0,))
    reference.delivered[0] = replace(relay.delivered[0], body=b"ma rker MARK0x0\r\ntext\r\n")
    assert compare(_TWO, relay, reference).problems  # exactly: another body
    assert compare(_TWO, relay, reference, exact=False).problems == []
    assert loosely(relay.delivered[0]).body == b"MARK0x0 text"
    # A message without a marker after the reference hung up cannot be placed: not compared;
    # one while it read the whole stream is an injected message.
    markerless = _outcome(())
    assert compare(_TWO, markerless, _outcome(groups=3)).uncompared == 1
    assert "as one message" in compare(_TWO, markerless, _outcome()).problems[0]
