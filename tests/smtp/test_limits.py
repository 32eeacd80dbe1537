"""Every connector limit, enforced on the wire (exchange-semantics.md §1.4, §5.4; security-bar §3)."""

from __future__ import annotations

import threading
import time

import pytest

from tests.smtp.conftest import default_frontend, relay_connector
from tests.smtp.helpers import RawClient, wait_for
from tests.smtp.test_auth import PASSWORD, add_user, auth_connector, b64, cheap_argon2  # noqa: F401

SMALL = 65536  # the smallest max_message_size Exchange allows


def open_transaction(c: RawClient, rcpts: int = 1) -> None:
    c.cmd("MAIL FROM:<app@corp.example>", 250)
    for i in range(rcpts):
        c.cmd(f"RCPT TO:<user{i}@corp.example>", 250)
    c.cmd("DATA", 354)


def message_of(size: int) -> bytes:
    """Content of exactly `size` bytes (CRLF lines, no dot at line starts)."""
    head = b"Subject: sized\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    body = line * ((size - len(head)) // len(line))
    body += b"y" * (size - len(head) - len(body) - 2) + b"\r\n"
    out = head + body
    assert len(out) == size
    return out


def test_max_message_size_via_size_parameter(relay):
    r = relay([relay_connector(max_message_size="64KB")])
    with r.raw() as c:
        assert c.greet().lines[1] == f"SIZE {SMALL}"
        assert c.cmd(f"MAIL FROM:<a@corp.example> SIZE={SMALL + 1}").text == (
            "552 5.3.4 Message size exceeds fixed maximum message size"
        )
        assert c.cmd("MAIL FROM:<a@corp.example> SIZE=abc").code == 501
        c.cmd(f"MAIL FROM:<a@corp.example> SIZE={SMALL}", 250)


def test_max_message_size_via_actual_bytes_stays_in_sync(relay):
    r = relay([relay_connector(max_message_size="64KB")])
    with r.raw() as c:
        c.greet()
        # Declares a small SIZE, then sends more than the limit: refused after the final dot.
        c.cmd("MAIL FROM:<a@corp.example> SIZE=1000", 250)
        c.cmd("RCPT TO:<b@corp.example>", 250)
        c.cmd("DATA", 354)
        c.send(message_of(SMALL * 3) + b".\r\n")
        assert c.expect(552).text == "552 5.3.4 Message size exceeds fixed maximum message size"
        # The next transaction on the same connection works: the server read up to CRLF.CRLF.
        open_transaction(c)
        c.send(message_of(SMALL) + b".\r\n")  # exactly at the limit: accepted
        c.expect(250)
        open_transaction(c)
        c.send(message_of(SMALL + 1) + b".\r\n")
        c.expect(552)
        c.cmd("NOOP", 250)
    msgs = r.messages()
    assert len(msgs) == 1 and msgs[0].size > SMALL


def test_oversized_content_cannot_end_data_early(relay):
    """Past the size limit the server drops bytes but must still find only a real CRLF.CRLF: a read
    ending in ".<CRLF>M" must not be taken for the terminator (that would run the rest as commands)."""
    r = relay([relay_connector(max_message_size="64KB")])
    with r.raw() as c:
        c.greet()
        open_transaction(c)
        c.send(b"Subject: big\r\n\r\n" + b"z" * (SMALL + 5000) + b"abc.\r\nM")
        time.sleep(0.3)  # let the server consume this much, so its buffer ends with ".\r\nM"
        c.send(
            b"AIL FROM:<smuggled@corp.example>\r\nRCPT TO:<victim@external.example>\r\nDATA\r\nx\r\n.\r\n"
        )
        assert c.expect(552).text.startswith("552 5.3.4")
        assert (
            c.cmd("NOOP").text == "250 2.0.0 OK"
        )  # the smuggled lines were content, never commands
    assert r.messages() == []


def test_max_recipients_per_message(relay):
    r = relay([relay_connector(max_recipients_per_message=3)])
    with r.raw() as c:
        c.greet()
        c.cmd("MAIL FROM:<a@corp.example>", 250)
        codes = [c.cmd(f"RCPT TO:<u{i}@corp.example>") for i in range(5)]
        assert [x.code for x in codes] == [250, 250, 250, 452, 452]
        assert codes[3].text == "452 4.5.3 Too many recipients"
        c.cmd("DATA", 354)
        c.send(b"Subject: r\r\n\r\nx\r\n.\r\n")
        c.expect(250)
        # The client sends the rest in a new transaction.
        c.cmd("MAIL FROM:<a@corp.example>", 250)
        c.cmd("RCPT TO:<u3@corp.example>", 250)
        c.cmd("RCPT TO:<u4@corp.example>", 250)
    (first,) = r.messages()
    assert [x.address for x in first.recipients] == [
        "u0@corp.example",
        "u1@corp.example",
        "u2@corp.example",
    ]


def test_max_header_size_closes_the_session(relay):
    r = relay([relay_connector(max_header_size="1KB")])
    with r.raw() as c:
        c.greet()
        open_transaction(c)
        c.send(b"Subject: ok\r\n\r\nsmall header\r\n.\r\n")
        c.expect(250)
        open_transaction(c)
        headers = b"".join(b"X-Filler-%d: %s\r\n" % (i, b"h" * 60) for i in range(20))
        c.send(headers + b"\r\nbody\r\n.\r\n")
        assert c.expect(552).text == "552 5.3.4 Header size exceeds fixed maximum size"
        assert c.is_closed()
    assert len(r.messages()) == 1
    # The protocol log says why, as for every other refused message.
    assert "message refused: header of 1490 octets, max_header_size 1024" in r.protocol_log_text()


def test_a_message_without_a_blank_line_is_not_measured_as_all_header(relay):
    """A script's 318 KB report with no header field and no blank line: its header block is empty
    (Postfix's cleanup ends it at the first non-header line), not 318 KB over max_header_size."""
    r = relay([relay_connector()])  # max_header_size 256 KB (the default)
    with r.raw() as c:
        c.greet()
        open_transaction(c)
        report = b"".join(b"report line %06d, no header fields in it\r\n" % i for i in range(7500))
        assert len(report) > 300_000
        c.send(report + b".\r\n")
        assert c.expect(250).text.startswith("250 2.6.0")
    assert len(r.messages()) == 1


def test_max_hop_count(relay):
    r = relay([relay_connector(max_hop_count=5)])

    def send(hops: int) -> str:
        with r.raw() as c:
            c.greet()
            open_transaction(c)
            received = b"".join(
                b"Received: from hop%d by x; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % i
                for i in range(hops)
            )
            c.send(received + b"Subject: hops\r\n\r\nbody\r\n.\r\n")
            return c.reply().text  # type: ignore[union-attr]

    assert send(4).startswith("250 2.6.0")  # threshold - 1: accepted (ours makes 5)
    assert send(5) == "554 5.4.6 Hop count exceeded - possible mail loop"
    assert len(r.messages()) == 1


def _received_by(names: list[str]) -> bytes:
    """Received fields, the first (newest) by names[0], folded as this relay writes its own."""
    return b"".join(
        b"Received: from app%d.corp.example ([10.0.0.%d])\r\n\tby %s (RelayGate; x)\r\n"
        b"\twith ESMTP id 1-%d; Mon, 1 Jan 2024 00:00:00 +0000\r\n" % (i, i, name.encode(), i)
        for i, name in enumerate(names)
    )


def test_max_local_hop_count_counts_the_received_fields_this_relay_wrote(relay):
    """Exchange's MaxLocalHopCount: the Received fields whose `by` names this relay (server.fqdn or
    a connector's fqdn) count, every other hop does not; the limit includes the field being
    added, as max_hop_count's does. 0 never refuses."""
    other = "Other Connector"
    r = relay(
        [
            relay_connector(max_local_hop_count=2),
            relay_connector(
                name=other, bindings=["127.0.0.1:{port2}"], fqdn="mx2.corp.example",
                max_local_hop_count=0,
            ),
        ]
    )  # fmt: skip

    def send(names: list[str], port: int | None = None) -> str:
        with r.raw(port=port) as c:
            c.greet()
            open_transaction(c)
            c.send(_received_by(names) + b"Subject: loop\r\n\r\nbody\r\n.\r\n")
            return c.reply().text  # type: ignore[union-attr]

    mine, elsewhere = "relay.corp.example", "relay.corp.example.elsewhere.example"
    assert send([mine]).startswith("250 2.6.0")  # one pass before: ours makes 2
    assert send([mine, "RELAY.corp.example"]) == (
        "554 5.4.6 Hop count exceeded - possible mail loop"
    )
    assert send(["mx2.corp.example", mine]).startswith("554 ")  # another connector's name: ours
    assert send(["relay.corp.example.", mine]).startswith("554 ")  # a trailing dot: the same
    assert send([elsewhere, mine, "mx9.partner.example"]).startswith("250 2.6.0")  # not ours
    assert send([mine] * 5, port=r.ports[1]).startswith("250 2.6.0")  # 0: never refused
    assert len(r.messages()) == 3


def test_connection_inactivity_timeout(relay):
    r = relay(
        [relay_connector(connection_inactivity_timeout="00:00:01", connection_timeout="00:00:05")]
    )
    with r.raw() as c:
        c.expect(220)
        t0 = time.monotonic()
        assert c.reply().text == "451 4.7.0 Timeout waiting for client input"  # type: ignore[union-attr]
        assert 0.8 < time.monotonic() - t0 < 10  # upper bound only catches "never times out"
        assert c.is_closed()
    with r.raw() as c:  # also while the client is sending DATA
        c.greet()
        open_transaction(c)
        c.send(b"Subject: slow\r\n\r\npartial")
        assert c.expect(451).text == "451 4.7.0 Timeout waiting for client input"
    assert r.messages() == []


def test_inactivity_is_counted_from_the_last_read(relay):
    """The session's one watchdog timer re-arms on activity: a client busy for longer than the
    inactivity timeout is not cut off, and is cut off once it then goes quiet for that long."""
    r = relay(
        [relay_connector(connection_inactivity_timeout="00:00:01", connection_timeout="00:00:30")]
    )
    with r.raw() as c:
        c.greet()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 2.5:  # two and a half timeouts, never a whole one idle
            c.send(b"NOOP\r\n")
            assert c.expect(250).code == 250
            quiet = time.monotonic()  # the session's next read starts about now
            time.sleep(0.3)
        assert c.expect(451).text == "451 4.7.0 Timeout waiting for client input"
        assert 0.8 < time.monotonic() - quiet < 2.5
        assert c.is_closed()


def test_connection_timeout_is_absolute(relay):
    r = relay(
        [relay_connector(connection_inactivity_timeout="00:00:01", connection_timeout="00:00:02")]
    )
    with r.raw() as c:
        c.greet()
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < 5:
            c.send(b"NOOP\r\n")  # never idle for a whole second
            last = c.reply()
            if last is None or last.code != 250:
                break
            time.sleep(0.3)
        assert last is not None and last.text == "421 4.4.1 Connection timed out"
        assert 1.8 < time.monotonic() - t0 < 10
        assert c.is_closed()


def test_max_inbound_connection(relay):
    r = relay([relay_connector(["127.0.0.0/24"], max_inbound_connection=2)])
    a, b = r.raw("127.0.0.5"), r.raw("127.0.0.6")
    a.expect(220)
    b.expect(220)
    with r.raw("127.0.0.7") as c:
        assert c.reply().text == (  # type: ignore[union-attr]
            "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, "
            "closing transmission channel"
        )
        assert c.is_closed()
    a.cmd("QUIT", 221)
    a.close()
    time.sleep(0.2)
    with r.raw("127.0.0.7") as c:  # a slot is free again
        c.expect(220)
    b.close()


def test_max_inbound_connection_per_source(relay):
    r = relay([relay_connector(["127.0.0.0/24"], max_inbound_connection_per_source=2)])
    held = [r.raw("127.0.0.5"), r.raw("127.0.0.5")]
    for h in held:
        h.expect(220)
    with r.raw("127.0.0.5") as c:
        assert c.reply().text == (  # type: ignore[union-attr]
            "421 4.3.2 The maximum number of concurrent connections has exceeded a limit, "
            "closing transmission channel"
        )
    with r.raw("127.0.0.6") as c:  # another source is still served
        c.expect(220)
    for h in held:
        h.close()


def test_max_inbound_connection_percentage_per_source(relay):
    # 30 % of the connections still available: 10 → 3 for the first, then 9 → 2, 8 → 2.
    r = relay(
        [
            relay_connector(
                ["127.0.0.0/24"],
                max_inbound_connection=10,
                max_inbound_connection_percentage_per_source=30,
            )
        ]
    )
    held = [r.raw("127.0.0.5"), r.raw("127.0.0.5")]
    for h in held:
        h.expect(220)
    with r.raw("127.0.0.5") as c:
        assert (
            c.expect(421).lines[0].startswith("4.3.2 The maximum number of concurrent connections")
        )
    with r.raw("127.0.0.6") as c:
        c.expect(220)
    for h in held:
        h.close()


def test_a_session_that_is_not_reading_holds_little_of_what_its_client_sends(relay):
    """While a session does not read (the tarpit of a refused RCPT here; a store commit, a
    password check, a client that does not read its replies), what its client goes on sending
    waits in the connection until the socket stops being read. That was at 2 MB per connection
    whatever the session was doing: 40 such clients took 84 MB of a worker, and
    max_inbound_connection is 5000 (an IPv6 /64 has addresses enough for every one of them).
    Between messages it is 64 KB now; DATA keeps 2 MB, so that a message streams while read."""
    r = relay([default_frontend(tarpit_interval="00:00:03", max_protocol_errors=50)])
    assert r.relay is not None and r.relay.server is not None
    live = r.relay.server._live

    def send_all(c: RawClient, data: bytes) -> None:
        try:
            c.sock.sendall(data)
        except OSError:
            pass  # closed by the test once it has looked

    with r.raw("127.0.0.9") as c:
        c.greet()
        c.cmd("MAIL FROM:<app@corp.example>", 250)
        c.send(b"RCPT TO:<victim@external.example>\r\n")  # refused after a 3 s tarpit
        (session,) = live
        sender = threading.Thread(target=send_all, args=(c, b"RSET\r\n" * 1_000_000), daemon=True)
        sender.start()
        paused = wait_for(lambda: not session.conn.transport.is_reading(), timeout=2.5)
        unread = session.conn.unread
    assert paused, "the connection never stopped reading"
    assert unread <= 512 * 1024, f"{unread} bytes held for a session that is not reading"


def test_max_protocol_errors(relay):
    r = relay([relay_connector(max_protocol_errors=3)])
    with r.raw() as c:
        c.greet()
        assert [c.cmd("BOGUS").code for _ in range(2)] == [500, 500]
        c.send(b"BOGUS\r\n")
        got = c.replies_until_close()
        assert [x.text for x in got] == [
            "500 5.3.3 Unrecognized command",
            "421 4.7.0 Too many errors on this connection, closing transmission channel",
        ]


def test_message_rate_limit(relay):
    r = relay([relay_connector(["127.0.0.0/24"], message_rate_limit=2)])
    with r.raw("127.0.0.5") as c:
        c.greet()
        for _ in range(2):
            open_transaction(c)
            c.send(b"Subject: rate\r\n\r\nx\r\n.\r\n")
            c.expect(250)
        c.send(b"MAIL FROM:<a@corp.example>\r\n")
        assert [x.text for x in c.replies_until_close()] == [
            "421 4.4.2 Message submission rate for this client has exceeded the configured limit"
        ]
    with r.raw("127.0.0.5") as c:  # per source, across connections
        c.greet()
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 421
    with r.raw("127.0.0.6") as c:  # another source is not affected
        c.greet()
        c.cmd("MAIL FROM:<a@corp.example>", 250)
    assert len(r.messages()) == 2


def test_tarpit_delays_errors_to_anonymous_sessions(relay):
    r = relay([default_frontend(tarpit_interval="00:00:01")])
    with r.raw("127.0.0.9") as c:
        c.greet()
        t0 = time.monotonic()
        c.cmd("MAIL FROM:<a@corp.example>", 250)
        c.cmd("RCPT TO:<b@corp.example>", 250)
        fast = time.monotonic() - t0
        t0 = time.monotonic()
        assert c.cmd("RCPT TO:<victim@external.example>").code == 550
        delay = time.monotonic() - t0
    assert fast < delay  # accepted commands are not delayed
    assert 0.95 <= delay < 10


def test_command_line_length_limit(relay):
    r = relay([relay_connector(max_protocol_errors=10)])
    with r.raw() as c:
        c.greet()
        ok = b"NOOP " + b"a" * (2048 - 7) + b"\r\n"
        assert len(ok) == 2048
        c.send(ok)
        assert c.expect(250).text == "250 2.0.0 OK"
        c.send(b"NOOP " + b"a" * (2048 - 6) + b"\r\n")  # 2049 octets
        assert c.expect(500).text == "500 5.5.2 Command too long"
        c.cmd("NOOP", 250)  # in sync: the long line was drained through its CRLF
        # A long line split across writes, then 1 MiB without any newline: bounded, refused, in sync.
        c.send(b"MAIL FROM:<" + b"b" * 3000)
        time.sleep(0.1)
        c.send(b"@corp.example>\r\n")
        c.expect(500)
        c.send(b"X" * (1024 * 1024) + b"\r\nNOOP\r\n")
        assert [c.reply().code, c.reply().code] == [500, 250]  # type: ignore[union-attr]


def _send_as(r, user: str, source: str, password: str = PASSWORD) -> int:
    """One message from `user` authenticated on a fresh connection from `source`: MAIL's code."""
    with r.raw(source) as c:
        c.greet()
        c.cmd("AUTH PLAIN " + b64(f"\0{user}\0{password}"), 235)
        code = c.cmd(f"MAIL FROM:<{user}@corp.example>").code
        if code == 250:
            c.cmd("RCPT TO:<x@external.example>", 250)
            c.cmd("DATA", 354)
            c.send(b"Subject: rate\r\n\r\nx\r\n.\r\n")
            c.expect(250)
        return code


@pytest.mark.parametrize(
    ("rate_source", "expected"),
    [
        # scanner .5, scanner .5, scanner .6, scanner .7, printer .5, printer .8
        ("User", [250, 250, 421, 421, 250, 250]),
        ("IPAddress", [250, 250, 250, 250, 421, 250]),
        ("All", [250, 250, 421, 421, 421, 250]),
        ("None", [250, 250, 250, 250, 250, 250]),
    ],
)
def test_message_rate_source(relay, rate_source, expected):
    """message_rate_source: User counts per authenticated user whatever its address, IPAddress per
    client address, All both (either over the limit refuses), None nothing."""
    r = relay(
        [
            auth_connector(
                remote_ip_ranges=["127.0.0.0/8"],
                message_rate_limit=2,
                message_rate_source=rate_source,
            )
        ]
    )
    add_user(r, "scanner")
    add_user(r, "printer")
    sends = [
        ("scanner", "127.0.0.5"),
        ("scanner", "127.0.0.5"),
        ("scanner", "127.0.0.6"),
        ("scanner", "127.0.0.7"),
        ("printer", "127.0.0.5"),
        ("printer", "127.0.0.8"),
    ]
    assert [_send_as(r, user, source) for user, source in sends] == expected
    assert len(r.messages()) == expected.count(250)


def test_rate_limiter_anonymous_session_under_user_is_counted_per_address():
    """No authenticated user on a `User` connector: counted per IP (Exchange unconfirmed), never
    unlimited; the window slides."""
    from relaygate.config.model import ReceiveConnector
    from relaygate.smtp.limits import RateLimiter

    c = ReceiveConnector(name="c", message_rate_limit=1, message_rate_source="User")
    rates = RateLimiter()
    rates.record(c, "127.0.0.5", now=100.0)
    assert not rates.allowed(c, "127.0.0.5", now=101.0)
    assert rates.allowed(c, "127.0.0.6", now=101.0)
    assert rates.allowed(c, "127.0.0.5", now=101.0, user="scanner")
    assert rates.allowed(c, "127.0.0.5", now=160.5)
