"""`relaygate test relay` (relaygate.selftest) against small fake SMTP servers on 127.0.0.1 / ::1 that
misbehave: huge or endless replies, odd codes, replies out of step. Each server records every line
the client sent; the test must stay bounded, never crash, and never send DATA or BDAT."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from relaygate.selftest import RelayTestOptions, SourceResult, exit_code, run_relay_test
from tests.cli_admin.helpers import PYTHON, Run

Writer = asyncio.StreamWriter
Action = bytes | Callable[[Writer], Awaitable[None]]


class FakeSMTP:
    """A scripted SMTP server: `replies` maps a verb (EHLO, MAIL, RCPT, ...) to the bytes to send
    (or a coroutine writing them); any other verb gets `250 ok`. `received` holds every line."""

    def __init__(
        self,
        replies: dict[str, Action] | None = None,
        banner: bytes = b"220 fake.example.net ESMTP\r\n",
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.replies = replies or {}
        self.banner = banner
        self.received: list[bytes] = []
        self.sessions: list[list[bytes]] = []  # the lines of each connection
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> FakeSMTP:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        session: list[bytes] = []
        self.sessions.append(session)
        try:
            writer.write(self.banner)
            await writer.drain()
            while line := await reader.readline():
                self.received.append(line)
                session.append(line)
                verb = line.split(b" ")[0].split(b":")[0].strip().upper().decode("ascii", "replace")
                action = self.replies.get(verb, b"250 ok\r\n")
                if isinstance(action, bytes):
                    writer.write(action)
                    await writer.drain()
                else:
                    await action(writer)
                if verb == "QUIT":
                    break
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    def sent_verbs(self) -> list[str]:
        return [
            line.split(b" ")[0].split(b":")[0].strip().upper().decode() for line in self.received
        ]


async def selftest(fake: FakeSMTP, **options: Any) -> tuple[list[SourceResult], float]:
    opts = RelayTestOptions(
        server=f"[{fake.host}]:{fake.port}",
        source_ips=[None],
        local_domain="corp.example",
        timeout=options.pop("timeout", 2.0),
        max_time=options.pop("max_time", 6.0),
        **options,
    )
    started = time.monotonic()
    results = await asyncio.wait_for(run_relay_test(opts), 40)
    elapsed = time.monotonic() - started
    for verb in fake.sent_verbs():
        assert verb not in ("DATA", "BDAT"), fake.received
    return results, elapsed


async def test_reply_line_without_end_is_an_error_not_a_crash() -> None:
    """A server that answers EHLO with one 200 kB line: asyncio's readline raised ValueError
    (`Separator is not found, and chunk exceed the limit`) out of run_relay_test."""
    async with FakeSMTP({"EHLO": b"250 " + b"x" * 200_000 + b"\r\n"}) as fake:
        results, elapsed = await selftest(fake)
    (result,) = results
    assert result.error and "unreadable reply" in result.error
    assert exit_code(results) == 2 and elapsed < 10


async def _endless(writer: Writer) -> None:
    while True:
        writer.write(b"250-still going\r\n")
        await writer.drain()
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("verb", ["EHLO", "RCPT"])
async def test_multiline_reply_that_never_ends_is_bounded(verb: str) -> None:
    """Continuation lines arriving faster than --timeout kept read_reply reading for ever (the
    timeout was per line, --max-time was not checked inside a reply); even cancelling hung, as
    the final QUIT read the same endless reply."""
    async with FakeSMTP({verb: _endless}) as fake:
        results, elapsed = await selftest(fake, timeout=1.0, max_time=4.0)
    assert elapsed < 15
    assert exit_code(results) == 2


@pytest.mark.parametrize(
    ("verb", "reply"),
    [("MAIL", b"354 go ahead\r\n"), ("RCPT", b"354 go ahead\r\n"), ("RCPT", b"150 what\r\n"),
     ("RCPT", b"no code at all\r\n"), ("EHLO", b"354 go ahead\r\n")],
)  # fmt: skip
async def test_nothing_is_sent_after_an_unexpected_reply(verb: str, reply: bytes) -> None:
    """A 354 (or 1xx, or no code) to MAIL, RCPT or EHLO leaves the server in a state we do not
    know (after 354, everything we send is message content): the test sent RCPT after a 354 to
    MAIL (Reply.positive is 2xx-3xx) and RSET/QUIT after any of them, and HELO after a 354 to
    EHLO; and it counted a 354 to MAIL followed by a 250 to RCPT as an open relay."""
    async with FakeSMTP({verb: reply}) as fake:
        results, elapsed = await selftest(fake)
    (result,) = results
    assert result.accepted == [] and exit_code(results) == 2 and elapsed < 10
    assert {a.verdict for a in result.attempts} <= {"error", "skipped"}
    for session in fake.sessions:
        answered = [line for line in session if line.upper().startswith(verb.encode())]
        if answered:  # the unexpected reply was the last thing the client heard
            assert session[-1] is answered[0], session


@pytest.mark.parametrize(
    "replies",
    [{"MAIL": b"250 ok\r\n250 ok\r\n"}, {"EHLO": b"250 fake.example.net\r\n250 again\r\n"}],
)
async def test_a_reply_nobody_asked_for_is_not_read_as_the_next_one(
    replies: dict[str, Action],
) -> None:
    """A server that answers MAIL twice and refuses every RCPT: the test read the second 250 as
    the RCPT's answer and reported 34 of 34 attempts accepted, an open relay (exit 1)."""
    async with FakeSMTP({**replies, "RCPT": b"550 5.7.54 Unable to relay\r\n"}) as fake:
        results, elapsed = await selftest(fake)
    (result,) = results
    assert result.accepted == [] and exit_code(results) == 2 and elapsed < 10
    assert result.error or {a.verdict for a in result.attempts} <= {"error", "skipped"}


@pytest.mark.parametrize(
    ("replies", "banner"),
    [
        ({}, b"421 4.3.2 Service not available, too busy\r\n"),
        ({"EHLO": b"421 4.3.2 busy\r\n"}, b"220 fake.example.net ESMTP\r\n"),
        ({"MAIL": b"451 4.3.0 try later\r\n"}, b"220 fake.example.net ESMTP\r\n"),
        ({"RCPT": b"450 4.7.1 greylisted, try later\r\n"}, b"220 fake.example.net ESMTP\r\n"),
    ],
)
async def test_temporary_refusals_are_not_decided(
    replies: dict[str, Action], banner: bytes
) -> None:
    """A 4xx decides nothing (greylisting, a busy server, a recipient lookup that failed): the
    test reported every attempt `refused` and exit 0, "no relay accepted", for a server that only
    said "not now" (a 421 banner included)."""
    async with FakeSMTP(replies, banner=banner) as fake:
        results, elapsed = await selftest(fake)
    (result,) = results
    assert exit_code(results) == 2 and elapsed < 10
    assert {a.verdict for a in result.attempts} <= {"deferred", "skipped"}
    assert all(a.temporary for a in result.attempts if a.verdict != "skipped")
    assert "not decided" in result.summary() and "incomplete" in result.summary()
    assert result.to_dict()["deferred"] == len(result.counted())


async def cli(*args: str) -> Run:
    """`python -m relaygate ...` without blocking the loop the fake server runs in."""
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    env.update({"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    proc = await asyncio.create_subprocess_exec(
        PYTHON, "-m", "relaygate", *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_control_characters_in_replies_do_not_reach_the_terminal() -> None:
    """The server's reply text went to the terminal as sent: ESC sequences (here: erase the line,
    then a forged verdict), NUL and invalid UTF-8 drove the administrator's terminal."""
    forged = b"\x1b[2K\r\x1b]0;title\x07no relay accepted\x00\xff"
    async with FakeSMTP({"RCPT": b"250 2.1.5 OK " + forged + b"\r\n"}) as fake:
        r = await cli("test", "relay", "--server", f"127.0.0.1:{fake.port}", "--local-domain",
                      "corp.example", "--timeout", "2", "--max-time", "20")  # fmt: skip
        j = await cli("test", "relay", "--server", f"127.0.0.1:{fake.port}", "--local-domain",
                      "corp.example", "--timeout", "2", "--max-time", "20", "--json")  # fmt: skip
    assert r.code == 1 and j.code == 1, r.out + r.err
    for text in (r.out, r.err, j.out):
        assert not any(c in text for c in "\x1b\x00\x07\r"), repr(text[:2000])
    assert "250 2.1.5 OK \\x1b[2K\\x0d" in r.out  # shown, escaped
    (source,) = j.json()["sources"]
    assert source["attempts"][0]["reply"].startswith("250 2.1.5 OK \\x1b[2K\\x0d\\x1b]0;title")


async def test_relay_right_that_sticks_after_a_local_recipient_is_found() -> None:
    """A server that refuses an external recipient alone but accepts it after a local one in the
    same transaction (a "relay allowed" decision that sticks, security-bar §1B 35): every
    vector of the battery was refused and the test said exit 0; mixed-transaction finds it."""
    state = {"local": False}

    async def mail(writer: Writer) -> None:
        state["local"] = False
        writer.write(b"250 2.1.0 ok\r\n")

    def rcpt_reply(line: bytes) -> bytes:
        if line.lower().startswith(b"rcpt to:<postmaster@corp.example>"):
            state["local"] = True
            return b"250 2.1.5 ok\r\n"
        return b"250 2.1.5 ok\r\n" if state["local"] else b"550 5.7.54 Unable to relay\r\n"

    fake = FakeSMTP({"MAIL": mail})

    async def rcpt(writer: Writer) -> None:
        writer.write(rcpt_reply(fake.received[-1]))

    fake.replies["RCPT"] = rcpt
    async with fake:
        results, _elapsed = await selftest(fake)
    (result,) = results
    assert [a.vector for a in result.accepted] == ["mixed-transaction"]
    assert exit_code(results) == 1


async def test_an_accepted_local_recipient_says_so() -> None:
    """A server that delivers locally whatever the local part holds (no percent hack, no bang
    paths) accepts `relaytest%ext@corp.example`: RFC 5321 reads that as a local mailbox, so the
    250 is relaying only if the server routes the local part onward. The test reported these as
    relaying with no word of it, like `relaytest@ext`; they stay accepted, with a note."""

    async def rcpt(writer: Writer) -> None:
        path = fake.received[-1].decode().partition(":")[2].strip().strip("<>")
        local = "@" not in path or path.lower().endswith(("@corp.example", "@fake.example.net"))
        writer.write(b"250 2.1.5 ok\r\n" if local else b"550 5.7.54 Unable to relay\r\n")

    fake = FakeSMTP({"RCPT": rcpt})
    async with fake:
        results, _elapsed = await selftest(fake)
    (result,) = results
    by_id = {a.vector: a for a in result.attempts}
    assert by_id["plain"].verdict == "refused" and by_id["plain"].note == ""
    accepted = {a.vector for a in result.accepted}
    assert {"percent-local", "quoted-at-local", "bang-local", "percent-server-name"} <= accepted
    assert all("local recipient as RFC 5321 reads it" in a.note for a in result.accepted)
    assert exit_code(results) == 1  # still reported: only the server knows where it goes


async def test_ipv6_server() -> None:
    """[::1]:port works; the literal vectors use the IPv6 literal form."""
    async with FakeSMTP({"RCPT": b"550 5.7.54 Unable to relay\r\n"}, host="::1") as fake:
        results, _elapsed = await selftest(fake)
    (result,) = results
    assert result.error == "" and result.peer == "::1" and exit_code(results) == 0
    by_id = {a.vector: a for a in result.attempts}
    assert by_id["percent-literal"].command == "RCPT TO:<relaytest%nmap.scanme.org@[IPv6:::1]>"
    assert by_id["helo-literal"].helo == "[IPv6:::1]"


async def test_a_421_between_commands_is_a_closed_connection() -> None:
    """A server may send 421 and close at any time (RFC 5321 §3.8: idle or session timeout,
    shutdown; RelayGate after max_protocol_errors): the next attempt takes a new connection. Here
    every RSET is answered and followed by a 421 and the close."""

    async def rset(writer: Writer) -> None:
        writer.write(b"250 2.0.0 ok\r\n421 4.4.1 Connection timed out\r\n")
        await writer.drain()
        writer.close()

    async with FakeSMTP({"RSET": rset, "RCPT": b"550 5.7.54 Unable to relay\r\n"}) as fake:
        results, _elapsed = await selftest(fake)
    (result,) = results
    assert {a.verdict for a in result.attempts} == {"refused"}
    assert {a.stage for a in result.attempts} == {"RCPT"} and exit_code(results) == 0


async def test_source_ip_that_cannot_be_used_is_a_clear_error() -> None:
    """Not an address of this machine, or of the other family than the server's: exit 2 and a
    message naming the option (the second was asyncio's `no matching local address with
    family=<AddressFamily.AF_INET: 2> found`)."""
    async with FakeSMTP() as fake:
        server = f"127.0.0.1:{fake.port}"
        absent = await cli("test", "relay", "--server", server, "--source-ip", "192.0.2.77")
        v6 = await cli("test", "relay", "--server", server, "--source-ip", "::1")
    assert absent.code == 2 and v6.code == 2
    assert "--source-ip 192.0.2.77 is not an address of this machine" in absent.err
    assert f"cannot connect to {server} from ::1: the server has no IPv6 address" in v6.err
    assert fake.sessions == []


async def test_huge_replies_do_not_fill_memory() -> None:
    """A reply of a thousand 60 kB lines was read whole (60 MB into the transcript) before the
    1000-line cap, for every attempt: a hostile server could exhaust the tester's memory. A reply
    is now at most 64 KiB."""
    line = b"250-" + b"x" * 60_000 + b"\r\n"

    async def fat(writer: Writer) -> None:
        for _ in range(1000):
            writer.write(line)
            await writer.drain()
        writer.write(b"250 ok\r\n")

    async with FakeSMTP({"RCPT": fat}) as fake:
        results, _elapsed = await selftest(fake, max_time=10.0)
    (result,) = results
    assert exit_code(results) == 2 and result.accepted == []
    assert sum(len(line.text) for line in result.transcript.lines) < 10_000_000
    assert all("unreadable reply" in a.note for a in result.attempts)


@pytest.mark.parametrize("reply", [b"550-5.7.54 Unable to relay\r\n250 ok\r\n",
                                   b"250-ok\r\n550 5.7.54 Unable to relay\r\n"])  # fmt: skip
async def test_a_reply_whose_lines_disagree_decides_nothing(reply: bytes) -> None:
    """RFC 5321 §4.2.1: every line of a reply has the same code. The last line's code was taken:
    `550-... / 250 ok` to RCPT counted as accepted, `250-... / 550` as refused."""
    async with FakeSMTP({"RCPT": reply}) as fake:
        results, _elapsed = await selftest(fake)
    (result,) = results
    assert {a.verdict for a in result.attempts} <= {"error", "skipped"}
    assert exit_code(results) == 2
