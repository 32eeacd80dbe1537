"""What `relaygate serve` does at start with a queue that lost part of itself: a message row whose
spool file is gone, and a spool folder whose database is gone. Never silence: the first is said
at start, naming the messages; the second stops the start, naming the files (a new, empty queue
would have let the orphan sweep delete the only copy of those messages' bytes)."""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path

import pytest

from tests.smtp.conftest import relay, relay_connector  # noqa: F401

BIG = b"Subject: big\r\n\r\n" + b"b" * 200_000 + b"\r\n"  # a spool file of its own
QUEUE_ID = re.compile(rb"\[InternalId=([0-9A-F]{16}), ")


def queue_a_big_message(r) -> str:
    with r.smtp() as client:
        client.ehlo()
        client.mail("scanner@corp.example")
        client.rcpt("someone@example.com")
        code, text = client.data(BIG)
    assert code == 250, text
    m = QUEUE_ID.search(text)
    assert m, text
    return m.group(1).decode()


def spool_files(r) -> list:
    return [p for p in (r.data_dir / "queue" / "spool").iterdir() if p.stat().st_size]


def test_a_message_whose_spool_file_is_gone_is_said_at_start(relay):  # noqa: F811
    """Before: nothing at start; the message waited for its next attempt (up to an hour later with
    Exchange's retry intervals) to be suspended then."""
    r = relay([relay_connector()], mode="process")
    queue_id = queue_a_big_message(r)
    r.stop()
    (spooled,) = spool_files(r)
    spooled.unlink()
    r.start()
    r.stop()
    log = r.stderr_path.read_text()
    (line,) = [line for line in log.splitlines() if "spool file" in line and "missing" in line]
    assert " ERROR " in line and queue_id in line and spooled.name in line, line


def test_a_spool_folder_without_its_database_stops_the_start(relay):  # noqa: F811
    """Before: a new, empty queue.db, the messages' files left to the orphan sweep (an hour
    later, or at once once they were an hour old)."""
    r = relay([relay_connector()], mode="process")
    queue_a_big_message(r)
    r.stop()
    queue_dir = r.data_dir / "queue"
    for p in queue_dir.glob("queue.db*"):
        p.unlink()
    with pytest.raises(RuntimeError, match="did not start"):
        r.start()
    log = r.stderr_path.read_text()
    assert f"the queue database {queue_dir / 'queue.db'} is missing" in log, log[-2000:]
    assert "1 message file" in log, log[-2000:]
    assert not (queue_dir / "queue.db").exists()
    assert len(spool_files(r)) == 1


def damage_table(db: Path, table: str) -> None:
    """Scramble the root page of `table` (its header left as it is, so SQLite opens the file)."""
    conn = sqlite3.connect(db)
    try:
        (root,) = conn.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = ?", (table,)
        ).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    finally:
        conn.close()
    with open(db, "r+b") as f:
        f.seek((root - 1) * page_size + 8)
        f.write(bytes((b ^ 0x5A) for b in f.read(page_size - 8)))


def test_a_damaged_database_gets_451_naming_the_file(relay):  # noqa: F811
    """A queue database damaged past its first page opens; its writes then fail with
    SQLITE_CORRUPT. Before: the failure came back at COMMIT (SQLite's error state), taken for an
    unknown outcome: every client's connection closed without a reply, and the log said
    "database disk image is malformed" without naming the file. Nothing is written in that
    state: 451 4.3.0, and the log names the damaged file."""
    r = relay([relay_connector()], mode="process")
    with r.smtp() as client:  # recipients over more than one page: the root page is an index
        for n in range(30):
            client.sendmail("scanner@corp.example", [f"user{n}@example.com"], b"x" * 3000)
    r.stop()
    db = r.data_dir / "queue" / "queue.db"
    damage_table(db, "messages_due")
    r.start()
    with r.smtp() as client:
        client.ehlo()
        client.mail("scanner@corp.example")
        client.rcpt("someone@example.com")
        code, text = client.data(b"Subject: after\r\n\r\nbody\r\n")
    r.stop()
    assert (code, text) == (451, b"4.3.0 Temporary failure storing the message; try again later"), (
        code,
        text,
    )
    log = r.stderr_path.read_text()
    assert f"queue database {db} is damaged" in log, log[-3000:]
