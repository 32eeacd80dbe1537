"""A 250 means durable: SIGKILL `relaygate serve` at random moments while clients send, restart it, and
find every acknowledged message in the store, byte for byte (security-bar §4B item 166), and, with a
smart host listening, delivered to it."""

from __future__ import annotations

import asyncio
import random
import re
import smtplib
import threading
import time

import pytest
import tomlkit
from aiosmtpd.controller import Controller

from relaygate.config.loader import load_config
from relaygate.queue.spool import SPOOL_THRESHOLD
from tests.smtp.conftest import relay_connector
from tests.smtp.helpers import free_port

TOTAL = 200  # messages attempted over all rounds (bounded)
CLIENTS = 4
ROUNDS = 3
QUEUE_ID = re.compile(rb"\[InternalId=([0-9A-F]{16}), ")


def content_for(n: int, *, spooled: bool = False) -> bytes:
    """Message n; with `spooled`, every other one is big enough for a spool file (spool.py):
    1000 more lines of at least 86 bytes (with 1000 lines of the inline width, about one in
    eight of them reached SPOOL_THRESHOLD)."""
    big = spooled and n % 2
    lines = 1 + n % 40 + (1000 if big else 0)
    width = n % 50 + (64 if big else 0)
    body = b"".join(b"line %d of message %d: %s\r\n" % (i, n, b"x" * width) for i in range(lines))
    return (
        b"Message-ID: <durable-%d@corp.example>\r\nSubject: durability %d\r\n\r\n"
        b".leading dot survives unstuffing\r\n%s" % (n, n, body)
    )


class Sender:
    """Client threads that send numbered messages and record (queue id, content) only after a 250."""

    def __init__(self, port: int, total: int = TOTAL, *, spooled: bool = False) -> None:
        self.port = port
        self.total = total
        self.spooled = spooled
        self.next = 0
        self.lock = threading.Lock()
        self.acked: dict[str, bytes] = {}
        self.errors = 0

    def take(self) -> int | None:
        with self.lock:
            if self.next >= self.total:
                return None
            self.next += 1
            return self.next

    def run(self) -> None:
        try:
            with smtplib.SMTP(
                "127.0.0.1", self.port, timeout=10, source_address=("127.0.0.5", 0)
            ) as s:
                s.ehlo("durability.corp.example")
                while (n := self.take()) is not None:
                    s.mail("app@corp.example")
                    s.rcpt(f"user{n}@corp.example")
                    s.rcpt("copy@external.example")
                    content = content_for(n, spooled=self.spooled)
                    code, text = s.data(content)
                    if code == 250:
                        m = QUEUE_ID.search(text)
                        assert m, text
                        with self.lock:
                            self.acked[m.group(1).decode()] = content
        except (OSError, smtplib.SMTPException):
            with self.lock:
                self.errors += 1  # the server was killed under us: expected

    def round(self, duration: float, killer) -> None:  # type: ignore[no-untyped-def]
        threads = [threading.Thread(target=self.run) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        time.sleep(duration)
        killer()
        for t in threads:
            t.join(20)


@pytest.mark.parametrize("spooled", [False, True], ids=["inline", "spooled"])
def test_acknowledged_messages_survive_sigkill(relay, spooled: bool):
    """With `spooled`, half the messages are over 64 KB and live in spool files written into
    files created ahead (spool.py), whose directory entries were made durable before use."""
    r = relay([relay_connector(["127.0.0.0/24"])], mode="process")
    rng = random.Random(20240517)
    sender = Sender(r.port, spooled=spooled)
    for _ in range(ROUNDS):
        sender.round(rng.uniform(0.4, 1.5), r.kill)
        r.start()  # restart on the same data_dir
    kills = ROUNDS
    # After the last restart, send the rest normally (the relay recovered and accepts mail).
    sender.round(0, lambda: None)
    assert sender.acked, "no message was acknowledged at all"
    r.stop()
    stored = r.all_data()  # read with a fresh store after the process is gone
    missing = [qid for qid in sender.acked if qid not in stored]
    assert not missing, f"{len(missing)} acknowledged messages lost after {kills} SIGKILLs"
    for qid, content in sender.acked.items():
        data = stored[qid]
        assert data.endswith(content), qid
        header = data[: len(data) - len(content)]
        assert header.startswith(b"Received: from durability.corp.example ([127.0.0.5])\r\n"), (
            header
        )
        assert header.count(b"Received:") == 1 and header.endswith(b"\r\n")
    if spooled:
        big = sum(len(c) >= SPOOL_THRESHOLD for c in sender.acked.values())
        assert big >= len(sender.acked) // 3, (big, len(sender.acked))
    duplicates = len(stored) - len(sender.acked)
    assert duplicates >= 0  # unacknowledged copies (killed between fsync and the 250) may exist
    assert sender.next == sender.total


class _CollectingSink:
    """An aiosmtpd sink on loopback (its own thread) that keeps every message it accepts. While
    `busy` is set it holds each DATA for a while and then answers 451, so that at every kill some
    deliveries are in flight (their messages leased) and others are deferred."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.contents: list[bytes] = []
        self.busy = True
        self.deferred = 0

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.busy:
            await asyncio.sleep(0.3)
            with self.lock:
                self.deferred += 1
            return "451 4.3.0 Busy, try again later"
        with self.lock:
            self.contents.append(bytes(envelope.original_content or envelope.content))
        return "250 2.0.0 Ok: queued"


@pytest.mark.parametrize(
    ("total", "rounds", "engine"),
    [
        pytest.param(TOTAL, ROUNDS, "sqlite", id="bounded"),
        # The same with the queue in PostgreSQL (cluster mode, one node).
        pytest.param(TOTAL, ROUNDS, "postgresql", id="bounded-postgresql"),
        # `make soak`: 20x the messages and 10 kills, still bounded in count and time.
        pytest.param(
            20 * TOTAL,
            10,
            "sqlite",
            id="soak",
            marks=[pytest.mark.slow, pytest.mark.timeout(1800)],
        ),
    ],
)
def test_acknowledged_messages_are_delivered_after_sigkill(
    request: pytest.FixtureRequest, total: int, rounds: int, engine: str
):
    """The end-to-end form: SIGKILL `relaygate serve` while it receives and delivers, restart it, and
    every message that got a 250 reaches the smart host once it accepts mail (at least once; a copy
    may repeat when a kill fell between the sink's 250 and the recorded result). During the kills the
    smart host is slow and answers 451, so deliveries are in flight (messages leased, most of them
    handed straight from the session to the local queue manager) and others wait for a retry: a
    restart must take those leases back at once, not after they expire (30 minutes)."""
    queue: dict[str, str] = {}
    if engine == "postgresql":  # asked for before `relay`: the relay stops before the drop
        queue = {"store": "postgresql", "database_url": request.getfixturevalue("postgres_url")}
    relay = request.getfixturevalue("relay")
    handler = _CollectingSink()
    sink = Controller(handler, hostname="127.0.0.1", port=free_port())
    sink.start()
    try:
        r = relay([relay_connector(["127.0.0.0/24"])], mode="process", start=False)
        r.doc["send_connectors"][0]["port"] = sink.port
        r.doc["send_connectors"][0]["name"] = "Smart host (sink)"
        r.doc["queue"] = {
            "transient_failure_retry_interval": "00:00:01",
            "message_retry_interval": "00:00:01",
            **queue,
        }
        r.config_path.write_text(tomlkit.dumps(r.doc), encoding="utf-8")
        r.config = load_config(r.config_path)
        r.start()
        rng = random.Random(20261123)
        sender = Sender(r.port, total)
        for _ in range(rounds):
            sender.round(rng.uniform(0.4, 1.5), r.kill)
            r.start()
        sender.round(0, lambda: None)  # the rest, on the recovered relay
        assert sender.acked, "no message was acknowledged at all"
        assert handler.deferred, "no delivery was in flight during the kills"
        handler.busy = False  # the smart host recovers: everything acknowledged must now arrive
        wanted = set(sender.acked)

        def undelivered() -> set[str]:
            with handler.lock:
                got = list(handler.contents)
            return {qid for qid in wanted if not any(c.endswith(sender.acked[qid]) for c in got)}

        deadline = time.monotonic() + 60 + total / 20
        missing = undelivered()
        while missing and time.monotonic() < deadline:
            time.sleep(0.5)
            missing = undelivered()
        assert not missing, (
            f"{len(missing)} of {len(wanted)} acknowledged messages never reached the smart host "
            f"after {rounds} SIGKILLs"
        )
        r.stop()
    finally:
        sink.stop()
