"""Random SMTP sessions from clients that may not relay, against `relaygate serve`.

Each session sends a random mix of valid commands, relay tricks (percent hack, source routes, two
`@`), DATA with content, pipelined groups, bare LFs, over-long lines and random bytes, cut into random
writes. Whatever happens, the server answers only with well-formed reply lines, never queues a
recipient outside the accepted domain for these clients, never logs a traceback, and still serves a
well-behaved client afterwards. `make test` runs the bounded form; `make soak` the long one.
"""

from __future__ import annotations

import random
import re
import time

import pytest

from tests.smtp.conftest import default_frontend, relay_connector
from tests.smtp.helpers import RawClient, Reply

REPLY_LINE = re.compile(r"^[2-5]\d\d[ -]")
UNTRUSTED = ("127.0.0.9", "127.0.0.10", "127.0.0.11")

_WORDS = [
    b"EHLO fuzz.example\r\n",
    b"HELO fuzz.example\r\n",
    b"EHLO relay.corp.example\r\n",
    b"MAIL FROM:<app@corp.example>\r\n",
    b"MAIL FROM:<>\r\n",
    b"MAIL FROM:<app@corp.example> SIZE=99999999999\r\n",
    b"RCPT TO:<user@corp.example>\r\n",
    b"RCPT TO:<victim@external.example>\r\n",
    b"RCPT TO:<victim%external.example@corp.example>\r\n",
    b"RCPT TO:<@corp.example:victim@external.example>\r\n",
    b"RCPT TO:<victim@external.example@corp.example>\r\n",
    b'RCPT TO:<"victim@external.example"@corp.example>\r\n',
    b"RCPT TO:<victim@[127.0.0.1]>\r\n",
    b"RCPT TO:<victim!external.example@corp.example>\r\n",
    b"DATA\r\n",
    b"Subject: fuzz\r\n\r\nbody\r\n.\r\n",
    b"\r\n.\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<victim@external.example>\r\nDATA\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b"STARTTLS\r\n",
    b"AUTH PLAIN AGFkbWluAHBhc3N3b3Jk\r\n",
    b"AUTH LOGIN\r\n",
    b"BDAT 10 LAST\r\n0123456789",
    b"VRFY postmaster\r\n",
    b"HELP\r\n",
    b"MAIL FROM:<a@corp.example>\nRCPT TO:<victim@external.example>\n",
    b"X" * 5000 + b"\r\n",
    b"\x00\xff\r\n",
]


def _session_bytes(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 14)):
        if rng.random() < 0.1:
            parts.append(rng.randbytes(rng.randint(1, 300)))
        else:
            parts.append(rng.choice(_WORDS))
    parts.append(b"QUIT\r\n")
    return b"".join(parts)


def _run_session(port: int, source: str, data: bytes, rng: random.Random) -> list[str]:
    """Send `data` in random pieces, then read every reply line until the server closes."""
    lines: list[str] = []
    try:
        with RawClient(port, source=source, timeout=5.0) as c:
            pos = 0
            while pos < len(data):
                step = rng.randint(1, 700)
                try:
                    c.send(data[pos : pos + step])
                except OSError:
                    break  # the server closed (protocol errors): fine
                pos += step
            c.sock.settimeout(5.0)
            while (line := c.read_line()) is not None:
                lines.append(line)
    except (TimeoutError, ConnectionError):
        pass
    return lines


_SENDERS = [b"MAIL FROM:<app@corp.example>", b"MAIL FROM:<>", b"MAIL FROM:<x@external.example>"]
_RCPTS = [w.rstrip(b"\r\n") for w in _WORDS if w.startswith(b"RCPT TO:")]


def _transaction_session(port: int, source: str, rng: random.Random) -> list[str]:
    """The deep half: well-formed transactions one command at a time (no pipelining), random
    senders and recipients (relay tricks included), content after every 354. The server may end
    the session (too many errors), but only after saying so with a 4xx/5xx reply."""
    lines: list[str] = []
    with RawClient(port, source=source, timeout=5.0) as c:
        c.expect(220)

        def ask(data: bytes) -> Reply | None:
            try:
                c.send(data)
                reply = c.reply()
            except TimeoutError:
                raise AssertionError(f"no reply to {data[:60]!r}: {c.received[-600:]!r}") from None
            except OSError:
                reply = None
            if reply is None:
                last = lines[-1] if lines else ""
                assert last[:1] in ("4", "5"), f"closed without a 4xx/5xx reply after {last!r}"
                return None
            lines.extend(f"{reply.code} {text}" for text in reply.lines)
            return reply

        for _ in range(rng.randint(1, 3)):
            script = [b"EHLO fuzz.example", rng.choice(_SENDERS)]
            script += [rng.choice(_RCPTS) for _ in range(rng.randint(1, 3))]
            script += [b"DATA"]
            for command in script:
                reply = ask(command + b"\r\n")
                if reply is None:
                    return lines
                if command == b"DATA" and reply.code == 354:
                    body = rng.randbytes(40).hex().encode()
                    if ask(b"Subject: fuzz\r\n\r\n" + body + b"\r\n.\r\n") is None:
                        return lines
            if ask(b"RSET\r\n") is None:
                return lines
        ask(b"QUIT\r\n")
    return lines


@pytest.mark.parametrize(
    "scale",
    [
        pytest.param(1, id="bounded"),
        pytest.param(25, id="soak", marks=[pytest.mark.slow, pytest.mark.timeout(3000)]),
    ],
)
def test_random_sessions_never_break_the_server_or_relay(relay, scale: int) -> None:
    no_tarpit = {"tarpit_interval": "00:00:00", "max_protocol_errors": 10}
    r = relay(
        [default_frontend(**no_tarpit), relay_connector(["127.0.0.5"], **no_tarpit)],
        mode="process",
    )
    rng = random.Random(20261123 + scale)
    sessions = 40 * scale
    deadline = time.monotonic() + 90 * scale
    done = queued = 0
    for _ in range(sessions):
        if time.monotonic() > deadline:
            break
        source = rng.choice(UNTRUSTED)
        if rng.random() < 0.5:
            lines = _transaction_session(r.port, source, rng)
        else:
            lines = _run_session(r.port, source, _session_bytes(rng), rng)
        bad = [line for line in lines if not REPLY_LINE.match(line)]
        assert not bad, f"malformed reply lines: {bad[:3]}"
        queued += sum("Queued mail for delivery" in line for line in lines)
        done += 1
    assert done >= sessions // 2, f"only {done} of {sessions} sessions ran in the time bound"
    assert queued, "no fuzzed session got as far as a queued message: the fuzz is too shallow"

    # No client outside the relay range got anything but accepted-domain recipients queued.
    for msg in r.messages():
        for rcpt in msg.recipients:
            assert rcpt.address.rpartition("@")[2].lower() == "corp.example", rcpt.address

    # And the server still serves: the relay client relays, an untrusted one is still refused.
    with r.raw("127.0.0.5") as c:
        c.expect(220)
        c.cmd("EHLO scanner01.corp.example", 250)
        c.cmd("MAIL FROM:<scanner01@corp.example>", 250)
        c.cmd("RCPT TO:<partner@external.example>", 250)
    with r.raw("127.0.0.9") as c:
        c.expect(220)
        c.cmd("EHLO scanner01.corp.example", 250)
        c.cmd("MAIL FROM:<scanner01@corp.example>", 250)
        assert c.cmd("RCPT TO:<partner@external.example>").code == 550
