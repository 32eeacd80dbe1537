"""What `relaygate serve` does at start with a queue that lost part of itself: a message row whose
spool file is gone, and a spool folder whose database is gone. Never silence: the first is said
at start, naming the messages; the second stops the start, naming the files (a new, empty queue
would have let the orphan sweep delete the only copy of those messages' bytes)."""

from __future__ import annotations

import re

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
