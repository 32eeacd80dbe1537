"""After a failed fsync of the SQLite queue's write-ahead log, no write is acknowledged until the
WAL has been made durable another way (security-bar item 170, PostgreSQL's "fsyncgate").

When the kernel fails to write a file's dirty pages back, it marks them clean and reports EIO once
to each open file: WAL frames that earlier synchronous=NORMAL commits (delivery results) wrote may
never reach the disk, while a later commit's fsync succeeds; after a power cut SQLite's recovery
stops at the first frame that does not check out, and every message acknowledged after it is lost.

A real `relaygate serve` with an LD_PRELOAD shim (tests/support/fsync_fault.c) that fails the fsync
of the -wal file while a trigger file exists, and logs every sync and truncation in order; mail
sent with smtplib, delivered to an aiosmtpd sink on loopback.
"""

from __future__ import annotations

import asyncio
import email
import os
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from tests.logs.test_service_log import Served
from tests.smtp.helpers import free_port
from tests.support.fsync_fault import Call, FsyncFault, build_fsync_fault
from tests.workers.test_workers import wait_until

ENTERED = "may not be on the disk: mail is refused with 451 4.3.0"  # the store's ERROR line when it starts refusing writes
RESUMED = "writes are accepted again"  # ... and its line when it takes them again


class HoldingSink:
    """The smart host: holds the first message's DATA until `release` is set (so that its delivery
    result is written after the disk has failed); records every delivered message's Subject."""

    def __init__(self) -> None:
        self.subjects: list[str] = []
        self.lock = threading.Lock()
        self.holding = threading.Event()
        self.release = threading.Event()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if not self.holding.is_set():
            self.holding.set()
            for _ in range(400):  # 20 s at most
                if self.release.is_set():
                    break
                await asyncio.sleep(0.05)
        subject = str(email.message_from_bytes(envelope.content)["Subject"])
        with self.lock:
            self.subjects.append(subject)
        return "250 2.0.0 OK"

    def delivered(self) -> list[str]:
        with self.lock:
            return list(self.subjects)


@pytest.fixture
def sink() -> Iterator[tuple[HoldingSink, int]]:
    handler = HoldingSink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        handler.release.set()
        controller.stop()


@pytest.fixture
def fault(tmp_path: Path) -> FsyncFault:
    return build_fsync_fault(tmp_path)


@pytest.fixture
def relay(
    tmp_path: Path, sink: tuple[HoldingSink, int], fault: FsyncFault, monkeypatch: Any
) -> Iterator[Any]:
    """A factory of `relaygate serve` (Served) running with the shim preloaded."""
    for name, value in fault.env().items():
        monkeypatch.setenv(name, value)
    started: list[Served] = []

    def make(**kwargs: Any) -> Served:
        served = Served(tmp_path, sink[1], **kwargs)
        started.append(served)
        served.start()
        return served

    try:
        yield make
    finally:
        for served in started:
            served.stop()


def submit(port: int, subject: str) -> tuple[int, str] | None:
    """Send one message; the reply to its DATA, or None when the relay closed the connection
    without one (a commit whose outcome is unknown)."""
    body = f"From: a@corp.example\r\nTo: b@corp.example\r\nSubject: {subject}\r\n\r\nhello\r\n"
    smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        smtp.ehlo("client.corp.example")
        smtp.mail("a@corp.example")
        smtp.rcpt("b@corp.example")
        try:
            code, text = smtp.data(body)
        except smtplib.SMTPServerDisconnected:
            return None
        return code, text.decode()
    finally:
        smtp.close()


def hold_a_delivery_result_in_the_failing_wal(
    served: Served, sink: HoldingSink, fault: FsyncFault
) -> None:
    """Message A: accepted (its commit synced), then the disk fails while the sink holds its
    DATA, so that A's delivery result is a synchronous=NORMAL commit written into the WAL after
    the failure: frames that only a sync (which fails now) or a checkpoint makes durable. The
    checkpointer's failed WAL sync shows they are there."""
    assert submit(served.port, "A") is not None
    assert sink.holding.wait(20), served.text()
    fault.arm()
    sink.release.set()
    assert wait_until(lambda: sink.delivered() == ["A"]), sink.delivered()
    assert wait_until(lambda: any(c.failed_wal_sync for c in fault.calls())), fault.calls()


def test_the_shim_fails_the_wal_sync_of_pythons_sqlite3(fault: FsyncFault, tmp_path: Path) -> None:
    """Python's sqlite3 (the system's libsqlite3) goes through the shim: the commit of a WAL
    database fails with SQLITE_IOERR_FSYNC while the trigger exists, and every call is logged."""
    script = (
        "import os, sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('PRAGMA journal_mode = WAL')\n"
        "db.execute('CREATE TABLE t (x)')\n"
        "open(sys.argv[2], 'w').close()\n"
        "try:\n"
        "    db.execute('INSERT INTO t VALUES (1)')\n"
        "except sqlite3.Error as exc:\n"
        "    print(exc.sqlite_errorname)\n"
        "os.unlink(sys.argv[2])\n"
        "print(db.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone())\n"
    )
    db = os.path.realpath(tmp_path / "t.db")
    env = dict(os.environ, **fault.env())
    out = subprocess.run(
        [sys.executable, "-c", script, db, str(fault.trigger)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout.split("\n")[:2] == ["SQLITE_IOERR_FSYNC", "(0, 0, 0)"], out
    calls = fault.calls()
    assert Call("fdatasync", db + "-wal", -1) in calls
    failed = calls.index(Call("fdatasync", db + "-wal", -1))
    assert Call("fdatasync", db, 0) in calls[failed:]
    assert Call("ftruncate", db + "-wal", 0, 0) in calls[failed:]


#: A process of its own (the shim is preloaded at its start) with a SqliteStore: message A stored;
#: a reader (another worker's, say) holds a snapshot of the WAL; B's commit fails its fsync; after
#: the fault is gone, C is still refused while the reader keeps the checkpoint from emptying the
#: WAL; D is stored once the reader is done.
READER_HOLDS_THE_CHECKPOINT = """
import asyncio, os, sqlite3, sys
from relaygate.queue.model import Envelope
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import StoreError, StoreOutcomeUnknownError

async def main(db, trigger):
    def envelope():
        return Envelope(sender="a@corp.example", recipients=["b@corp.example"])
    async def outcome(name):
        try:
            await store.submit(envelope(), name.encode())
        except StoreOutcomeUnknownError:
            return name + " unknown"
        except StoreError:
            return name + " refused"
        return name + " stored"
    store = SqliteStore(db, busy_timeout=0.2)
    await store.open()
    out = [await outcome("A")]
    reader = sqlite3.connect(db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM messages").fetchone()
    open(trigger, "w").close()
    out.append(await outcome("B"))
    os.unlink(trigger)
    await asyncio.sleep(1.2)
    out.append(await outcome("C"))
    reader.execute("COMMIT")
    await asyncio.sleep(1.2)
    out.append(await outcome("D"))
    await store.close()
    print(" ".join(out))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def test_a_reader_on_an_old_snapshot_keeps_writes_refused_until_it_is_done(
    fault: FsyncFault, tmp_path: Path
) -> None:
    """The checkpoint cannot empty the WAL while a reader (of any process) holds a snapshot in
    it: the refusal goes on (busy), and ends at the first try after the reader is done."""
    db = tmp_path / "queue" / "queue.db"
    env = dict(
        os.environ, **fault.env(), PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src")
    )
    ran = subprocess.run(
        [sys.executable, "-c", READER_HOLDS_THE_CHECKPOINT, str(db), str(fault.trigger)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.stdout.strip() == "A stored B unknown C refused D stored", ran
    assert ran.stderr.count("may not be on the disk") == 1, ran.stderr
    assert ran.stderr.count("writes are accepted again") == 1, ran.stderr


def test_after_a_failed_wal_fsync_mail_is_refused_until_the_wal_is_checkpointed(
    relay: Any, sink: tuple[HoldingSink, int], fault: FsyncFault
) -> None:
    served = relay(workers=1)
    hold_a_delivery_result_in_the_failing_wal(served, sink[0], fault)

    # B's commit fails at its fsync: today's outcome unknown, the connection closed unanswered.
    assert submit(served.port, "B") is None
    # C: refused at once (within the second after B's failure, no checkpoint tried).
    c = submit(served.port, "C")
    assert c is not None and c[0] == 451 and c[1].startswith("4.3.0"), (c, served.text())
    # C2, more than a second later: the checkpoint is tried, fails at the WAL's sync, refused.
    tried_from = len(fault.calls())
    time.sleep(1.2)
    c2 = submit(served.port, "C2")
    assert c2 is not None and c2[0] == 451, (c2, served.text())
    assert any(c.failed_wal_sync for c in fault.calls()[tried_from:]), fault.calls()[tried_from:]

    fault.disarm()
    time.sleep(1.2)  # the next checkpoint may run
    d = submit(served.port, "D")
    assert d is not None and d[0] == 250, (d, served.text())
    before_d_replied = fault.calls(fault.log_size())

    # Between the last failed sync and D's 250: the WAL copied into the database file, that
    # synced, the WAL emptied; only then D's own commit.
    db = os.path.realpath(served.data / "queue" / "queue.db")
    last_failure = max(i for i, c in enumerate(before_d_replied) if c.failed_wal_sync)
    after = before_d_replied[last_failure + 1 :]
    db_synced = [i for i, c in enumerate(after) if c.is_sync and c.path == db and c.result == 0]
    emptied = [
        i
        for i, c in enumerate(after)
        if c.name == "ftruncate" and c.path == db + "-wal" and c.length == 0
    ]
    assert db_synced and emptied and db_synced[0] < emptied[-1], after

    assert wait_until(lambda: {"A", "D"} <= set(sink[0].delivered())), sink[0].delivered()
    assert not {"C", "C2"} & set(sink[0].delivered())
    served.stop()
    text = served.text()
    assert text.count(ENTERED) == 1 and text.count(RESUMED) == 1, text
    assert text.index(ENTERED) < text.index(RESUMED)
    assert "451 4.3.0" in text and "dmesg" in text


def workers_that_logged(served: Served, text: str) -> list[int]:
    """The workers (their index) of the service log's lines holding `text`, one entry a line."""
    return sorted(r["worker"] for r in served.records() if text in str(r.get("message", "")))


def test_with_two_workers_each_writer_refuses_and_recovers_on_its_own(
    relay: Any, sink: tuple[HoldingSink, int], fault: FsyncFault
) -> None:
    served = relay(workers=2, server_extra='log_format = "json"\nworker_balance = "connection"')
    hold_a_delivery_result_in_the_failing_wal(served, sink[0], fault)

    # Messages until both workers' writers have met the failed sync (each at its own commit);
    # none is acknowledged: each gets no reply (its own commit failed) or 451 4.3.0.
    replies = []
    for n in range(40):
        replies.append(submit(served.port, f"B{n}"))
        if workers_that_logged(served, ENTERED) == [0, 1]:
            break
    assert workers_that_logged(served, ENTERED) == [0, 1], served.text()
    assert None in replies and all(r is None or r[0] == 451 for r in replies), replies

    fault.disarm()
    time.sleep(1.2)  # each writer may try its checkpoint again
    accepted = [submit(served.port, f"D{n}") for n in range(6)]
    assert all(r is not None and r[0] == 250 for r in accepted), (accepted, served.text())
    assert wait_until(lambda: workers_that_logged(served, RESUMED) == [0, 1]), served.text()
    wanted = {"A"} | {f"D{n}" for n in range(6)}
    assert wait_until(lambda: wanted <= set(sink[0].delivered())), sink[0].delivered()
    served.stop()
    assert workers_that_logged(served, ENTERED) == [0, 1], served.text()
    assert workers_that_logged(served, RESUMED) == [0, 1], served.text()
