"""A client that writes the message and then, in a second write, the terminator gets its 250 at once.

Most SMTP clients leave Nagle's algorithm on, so that second, short write waits until the message
before it is acknowledged, and Linux, on a connection that has been trading commands and replies,
delays that acknowledgement by up to 40 ms in the hope of sending it with a reply. Only the 250
would carry it, and the 250 waits for the terminator: every such message took 42 ms more, with
Postfix's smtpd as well (docs/benchmarks.md, eleventh session). The session now acknowledges
message data as soon as it has read it (`Connection.ack_now`, TCP_QUICKACK).
"""

from __future__ import annotations

import socket
import statistics
import time

import pytest

from relaygate.smtp.connection import Connection
from tests.smtp.conftest import relay_connector

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK and this delayed ACK are Linux's"
)

BODY = b"Subject: scan\r\n\r\n" + (b"x" * 76 + b"\r\n") * 100  # ~8 KB, one write


def terminator_to_250_ms(relay, messages: int = 8) -> list[float]:
    """Milliseconds from the terminator's own write to the 250, per message, Nagle on."""
    out = []
    with relay.raw("127.0.0.5") as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle on, as most clients
        c.expect(220)
        c.cmd("EHLO scanner01.corp.example", 250)
        for _ in range(messages):
            c.cmd("MAIL FROM:<scanner01@corp.example>", 250)
            c.cmd("RCPT TO:<someone@external.example>", 250)
            c.cmd("DATA", 354)
            c.send(BODY)
            started = time.perf_counter()
            c.send(b".\r\n")
            c.expect(250)
            out.append((time.perf_counter() - started) * 1000)
        c.cmd("QUIT", 221)
    return out


def test_the_terminator_written_on_its_own_is_answered_without_the_delayed_ack(relay, monkeypatch):
    r = relay([relay_connector(["127.0.0.5"])])
    fast = terminator_to_250_ms(r)
    assert statistics.median(fast) < 20, fast

    # The same client against the same relay with the acknowledgement left to the kernel: the
    # scenario really is the 40 ms stall (so the figure above is the fix, not luck).
    monkeypatch.setattr(Connection, "ack_now", lambda self: None)
    slow = terminator_to_250_ms(r)
    assert statistics.median(slow) >= 35, slow
