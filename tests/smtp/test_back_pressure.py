"""Back pressure on the queue's disk (queue/pressure.py, exchange-semantics.md §5.4): below
`queue.min_free_disk_space` free, MAIL FROM gets 452 4.3.1 and nothing is queued; a SIZE= that would
not fit is refused the same way; a store that reports itself full at the end of DATA gives the
Store contract's 452 4.3.1, not a 451."""

from __future__ import annotations

import os
import smtplib
import time
from pathlib import Path

import pytest

from relaygate.queue.pressure import DiskPressure, DiskSpace
from relaygate.queue.store import StoreFullError
from tests.smtp.conftest import relay, relay_connector  # noqa: F401

GB = 1024**3
MB = 1024**2
MESSAGE = b"Subject: pressure\r\n\r\nbody\r\n"


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mail_reply(r, size: int | None = None) -> tuple[int, bytes]:
    with r.smtp() as client:
        client.ehlo()
        options = [f"SIZE={size}"] if size is not None else []
        return client.mail("scanner@corp.example", options)


def test_mail_is_refused_while_the_queue_disk_is_below_its_minimum(relay, tmp_path):  # noqa: F811
    connectors = [relay_connector()]
    too_much = free_bytes(tmp_path) + 50 * GB  # more free space than the disk has
    r = relay(connectors, queue={"min_free_disk_space": too_much})
    assert r.relay.pressure.high
    assert mail_reply(r) == (452, b"4.3.1 Insufficient system resources")
    assert r.messages() == []
    assert "MAIL refused: back pressure" in r.protocol_log_text()

    # The administrator frees space (here: lowers the minimum); the reload re-samples at once.
    r.reconfigure(connectors, queue={"min_free_disk_space": "1MB"})
    deadline = time.monotonic() + 10
    while r.relay.pressure.high and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not r.relay.pressure.high
    with r.smtp() as client:
        client.sendmail("scanner@corp.example", ["someone@example.com"], MESSAGE)
    assert len(r.messages()) == 1


def test_a_declared_size_that_would_not_fit_above_the_minimum_is_refused(relay, tmp_path):  # noqa: F811
    free = free_bytes(tmp_path)
    if free < 2 * GB:
        pytest.fail(f"the test needs 2 GB free on {tmp_path}'s disk, it has {free // MB} MB")
    connector = relay_connector(max_message_size="2GB")  # so that SIZE=1GB passes that check
    r = relay([connector], queue={"min_free_disk_space": free - 500 * MB})
    assert not r.relay.pressure.high
    assert mail_reply(r, size=GB) == (452, b"4.3.1 Insufficient system resources")
    code, _ = mail_reply(r, size=1000)
    assert code == 250


def test_a_full_store_at_the_end_of_data_gets_452_not_451(relay):  # noqa: F811
    r = relay([relay_connector()])

    async def full(*args: object, **kwargs: object) -> str:
        raise StoreFullError("queue database full: database or disk is full")

    r.relay.ctx.store.submit = full  # the store's own report, as SQLITE_FULL or ENOSPC give it
    with r.smtp() as client, pytest.raises(smtplib.SMTPDataError) as refused:
        client.sendmail("scanner@corp.example", ["someone@example.com"], MESSAGE)
    assert refused.value.smtp_code == 452
    assert refused.value.smtp_error == b"4.3.1 Insufficient system resources"


def test_the_levels_have_exchanges_hysteresis():
    pressure = DiskPressure(Path("/"), min_free=100)
    total = 1000  # resuming needs the minimum plus 4 % of the disk: 140
    assert not pressure.refuses()
    pressure.update(DiskSpace(free=150, total=total))
    assert not pressure.high and not pressure.refuses(50) and pressure.refuses(51)
    pressure.update(DiskSpace(free=99, total=total))
    assert pressure.high and pressure.refuses() and pressure.refuses(1)
    pressure.update(DiskSpace(free=139, total=total))
    assert pressure.high  # above the minimum, not yet at the Normal level
    pressure.update(DiskSpace(free=140, total=total))
    assert not pressure.high
    off = DiskPressure(Path("/"), min_free=0)
    off.update(DiskSpace(free=0, total=total))
    assert not off.high and not off.refuses(10**12)
