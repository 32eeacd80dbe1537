"""Security-bar item 168, the fsync-before-250 audit: strace attached to `relaygate serve` (every
thread) records the syncs and the writes; for each message, the sync of the queue's files that holds
it must have returned before the write carrying its `250` starts.

A small message lives in the SQLite WAL (`queue.db-wal`: fdatasync at commit); a big one (over
64 KB) in a spool file of its own too (`queue/spool/...`: synced before the commit). The spool
files are created ahead and their directory synced then (before this test attaches:
tests/queue/test_sqlite_store.py::test_big_messages_share_one_directory_fsync_per_batch_of_spool_files
shows that one); the WAL is created and synced at open.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.smtp.conftest import relay_connector

SYNC = re.compile(r"\b(fsync|fdatasync)\((\d+)<([^>]*)>")
RESUMED = re.compile(r"<\.\.\. (fsync|fdatasync) resumed>.*= 0")


def _strace(pid: int, out: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("strace")
    if exe is None:
        pytest.fail("strace is not installed (`make debs` installs it)")
    proc = subprocess.Popen(
        [exe, "-f", "-y", "-s", "64", "-o", str(out), "-p", str(pid),
         "-e", "trace=fsync,fdatasync,write,writev,sendto,sendmsg"],
        stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # "Process N attached with M threads"
        line = proc.stderr.readline()
        if b"attached" in line or not line:
            break
    time.sleep(0.2)
    return proc


def _syncs_between(lines: list[str], start: int, end: int, tid_of: dict[str, str]) -> set[str]:
    """Paths whose sync call returned 0 between lines `start` and `end` (strace -f may split a
    call into `<unfinished ...>` and `<... resumed>` lines of one thread)."""
    pending: dict[str, str] = {}  # thread id -> path of its sync in progress
    done: set[str] = set()
    for i, line in enumerate(lines[:end]):
        tid = tid_of[line]
        if m := SYNC.search(line):
            if line.rstrip().endswith("<unfinished ...>"):
                pending[tid] = m.group(3)
            elif line.rstrip().endswith("= 0") and i > start:
                done.add(m.group(3))
        elif RESUMED.search(line) and tid in pending:
            path = pending.pop(tid)
            if i > start:
                done.add(path)
    return done


@pytest.mark.parametrize("size", [200, 150_000], ids=["in-the-wal", "spooled"])
def test_the_queue_files_are_synced_before_the_250(relay, tmp_path: Path, size: int) -> None:
    r = relay([relay_connector()], mode="process")
    assert r.proc is not None
    out = tmp_path / "strace.out"
    tracer = _strace(r.proc.pid, out)
    try:
        with r.raw(timeout=10) as c:
            c.greet()
            c.cmd("MAIL FROM:<app@corp.example>", 250)
            c.cmd("RCPT TO:<user@corp.example>", 250)
            c.cmd("DATA", 354)
            c.send(b"Subject: audit\r\n\r\n" + b"a" * size + b"\r\n.\r\n")
            c.expect(250)
            c.cmd("QUIT", 221)
        time.sleep(0.3)
    finally:
        tracer.send_signal(signal.SIGINT)  # detaches; the relay runs on
        tracer.wait(10)
    lines = out.read_text(errors="replace").splitlines()
    tid_of = {line: line.split(" ", 1)[0] for line in lines}
    data_start = next(i for i, line in enumerate(lines) if '"354 ' in line)
    ack = next(i for i, line in enumerate(lines) if '"250 2.6.0 ' in line)
    assert data_start < ack
    queue = str(r.data_dir / "queue")
    synced = {p for p in _syncs_between(lines, data_start, ack, tid_of) if p.startswith(queue)}
    assert f"{queue}/queue.db-wal" in synced, (synced, lines[data_start : ack + 1])
    if size > 64 * 1024:
        assert any(p.startswith(f"{queue}/spool/") for p in synced), synced
    assert r.messages()  # and the relay kept serving under the tracer
