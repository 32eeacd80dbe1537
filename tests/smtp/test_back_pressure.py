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
from tests.support.small_disk import fill, small_tmpfs

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


SMALL = 60_000  # under SPOOL_THRESHOLD: these ride in the database's commit (its WAL)


def _send(r, n: int, size: int = SMALL) -> tuple[int, bytes]:
    """One message on a session of its own: (code, text) of its DATA reply; (0, b"") for a
    connection closed without one."""
    content = b"Subject: full %d\r\n\r\n%s\r\n" % (n, b"f" * size)
    try:
        with r.smtp() as client:
            client.ehlo()
            client.mail("scanner@corp.example")
            client.rcpt("someone@example.com")
            return client.data(content)
    except smtplib.SMTPServerDisconnected:
        return 0, b""


@pytest.mark.parametrize(
    "disk",
    [
        # The WAL written ahead (4 MB) is soon used up: writing the frames fails (SQLITE_FULL, at
        # COMMIT or spilling before it). Before: taken for an unknown outcome at COMMIT, and the
        # connection closed without a reply.
        pytest.param("8m", id="wal-frames"),
        # 20 MB of WAL written ahead: past 4,096 frames the -shm index must grow, which failed
        # first (SQLITE_IOERR_SHMSIZE, "disk I/O error"), inside COMMIT or before. Before: the
        # connection closed without a reply, or 451 4.3.0. Now the index is grown with the WAL.
        pytest.param("28m", id="wal-index"),
    ],
)
def test_a_disk_that_fills_under_the_queue_gets_452_and_the_relay_resumes_by_itself(
    relay,  # noqa: F811
    tmp_path,
    disk: str,
):
    """The queue's own disk fills up (a real tmpfs, the back-pressure sampler off): each message
    the commit cannot store gets 452 4.3.1 at the end of DATA (README "Back pressure", the Store
    contract), every one that got 250 is stored, and once space is back the relay accepts mail
    again without a restart."""
    with small_tmpfs(tmp_path / "disk", disk) as mount:
        r = relay(
            [relay_connector()],
            server={"data_dir": str(mount / "data")},
            queue={"min_free_disk_space": 0},
        )
        assert _send(r, 0)[0] == 250  # what the first session makes (the TLS key) is made
        filler = fill(mount / "filler")
        accepted: set[str] = set()
        refusals: list[tuple[int, bytes]] = []
        for n in range(1, 800):  # 20 MB of WAL is about 330 of these
            code, text = _send(r, n)
            if code == 250:
                accepted.add(text.split(b"InternalId=")[1][:16].decode())
            else:
                refusals.append((code, text))
                if len(refusals) == 3:
                    break
        assert refusals, "the disk never filled up"
        refusals.append(_send(r, 999, size=200_000))  # a spool file's write (ENOSPC) too
        assert set(refusals) == {(452, b"4.3.1 Insufficient system resources")}

        filler.unlink()
        code, text = _send(r, 1000)
        assert code == 250
        accepted.add(text.split(b"InternalId=")[1][:16].decode())
        assert accepted <= {m.queue_id for m in r.messages()}
        r.stop()
