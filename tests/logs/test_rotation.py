"""Rotating CSV writer: file naming, size rotation, circular cleanup by size and age."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from relaygate.logs.rotation import (
    HEADER_DATE_PLACEHOLDER,
    LogDirectory,
    csv_field,
    format_timestamp,
    log_file_name,
    parse_log_file_name,
)

HEADERS = [
    "#Software: Microsoft Exchange Server",
    "#Version: 15.0.0.0",
    "#Log-type: Test Log",
    f"#Date: {HEADER_DATE_PLACEHOLDER}",
    "#Fields: date-time,data",
]
HOUR = 3600


def make(path: Path, **kw) -> LogDirectory:
    args = {
        "max_file_size": 10 * 1024 * 1024,
        "max_directory_size": 250 * 1024 * 1024,
        "max_age": timedelta(days=30),
        "start_thread": False,
    }
    args.update(kw)
    return LogDirectory(path, "RECV", HEADERS, **args)


def numbered(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def test_csv_field_matches_csv_module() -> None:
    import csv
    import io

    for value in ["", "plain", "a,b", 'say "hi"', "line\nbreak", "cr\rx", " spaced ", "#x"]:
        buf = io.StringIO()
        csv.writer(buf).writerow(["x", value])
        assert buf.getvalue() == "x," + csv_field(value) + "\r\n", value


def test_timestamp_format() -> None:
    ts = datetime(2023, 1, 11, 15, 59, 51, 433000, tzinfo=UTC).timestamp()
    assert format_timestamp(ts) == "2023-01-11T15:59:51.433Z"
    assert format_timestamp(ts + 1) == "2023-01-11T15:59:52.433Z"
    assert format_timestamp(float(int(ts))) == "2023-01-11T15:59:51.000Z"


def test_file_names() -> None:
    hour = int(datetime(2023, 1, 11, 16, tzinfo=UTC).timestamp()) // HOUR
    assert log_file_name("RECV", hour, 1) == "RECV2023011116-1.LOG"
    parsed = parse_log_file_name("MSGTRKMS2022091915-12.LOG")
    assert parsed is not None
    assert parsed.prefix == "MSGTRKMS"
    assert parsed.start == datetime(2022, 9, 19, 15, tzinfo=UTC)
    assert parsed.number == 12
    assert parsed.period == timedelta(hours=1)
    daily = parse_log_file_name("RECV20190221-2.LOG")
    assert daily is not None and daily.period == timedelta(days=1)
    assert parse_log_file_name("notes.txt") is None


def test_rotation_by_size(tmp_path: Path) -> None:
    d = make(tmp_path, max_file_size=600)
    now = time.time()
    for i in range(40):
        d.append_line(f"{format_timestamp(now)},line number {i:03d}", timestamp=now)
    d.close()
    files = numbered(list(tmp_path.glob("RECV*.LOG")))
    assert len(files) >= 3
    stamp = time.strftime("%Y%m%d%H", time.gmtime(now))
    assert [f.name for f in files] == [f"RECV{stamp}-{n}.LOG" for n in range(1, len(files) + 1)]
    seen: list[str] = []
    for f in files:
        assert f.stat().st_size <= 600
        text = f.read_bytes().decode("utf-8")
        lines = text.split("\r\n")
        assert lines[:3] == HEADERS[:3]
        assert re.fullmatch(r"#Date: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[3])
        assert lines[4] == HEADERS[4]
        body = [line for line in lines[5:] if line]
        assert body, "every file carries data lines after its header"
        seen += [line.rsplit(" ", 1)[1] for line in body]
    assert seen == [f"{i:03d}" for i in range(40)]


def test_new_file_each_hour(tmp_path: Path) -> None:
    d = make(tmp_path)
    base = (int(time.time()) // HOUR - 3) * HOUR
    d.append_line("a", timestamp=base + 10)
    d.append_line("b", timestamp=base + HOUR + 10)
    d.append_line("late", timestamp=base + HOUR - 1)  # a few ms late: stays in the current file
    d.append_line("c", timestamp=base + 2 * HOUR + 10)
    d.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    stamps = [time.strftime("%Y%m%d%H", time.gmtime(base + k * HOUR)) for k in range(3)]
    assert names == [f"RECV{s}-1.LOG" for s in stamps]
    second = (tmp_path / f"RECV{stamps[1]}-1.LOG").read_bytes().decode().split("\r\n")
    assert second[5:7] == ["b", "late"]


def test_restart_continues_numbering(tmp_path: Path) -> None:
    for _ in range(2):
        d = make(tmp_path)
        d.append_line("x")
        d.close()
    files = numbered(list(tmp_path.glob("RECV*.LOG")))
    assert [f.stem.rsplit("-", 1)[1] for f in files] == ["1", "2"]


def test_directory_size_cleanup_deletes_oldest(tmp_path: Path) -> None:
    old = []
    for n in range(1, 6):
        p = tmp_path / f"RECV20200101{n:02d}-1.LOG"
        p.write_bytes(b"x" * 1000)
        os.utime(p, (time.time() - 10_000 + n, time.time() - 10_000 + n))
        old.append(p)
    foreign = tmp_path / "README.txt"
    foreign.write_bytes(b"y" * 5000)
    d = make(tmp_path, max_directory_size=3500)
    d.append_line("new line")
    d.flush()
    remaining = sorted(p.name for p in tmp_path.glob("RECV*.LOG"))
    current = d.current_file
    assert current is not None and current.name in remaining
    # 5 x 1000 + the new file's header > 3500: the two oldest go.
    assert [p.name for p in old if p.exists()] == [p.name for p in old[2:]]
    assert foreign.exists()  # never touches files that are not ours
    total = sum(p.stat().st_size for p in tmp_path.glob("RECV*.LOG"))
    assert total <= 3500
    d.close()


def test_directory_size_cleanup_while_writing(tmp_path: Path) -> None:
    d = make(tmp_path, max_file_size=500, max_directory_size=2000)
    for i in range(200):
        d.append_line(f"line {i:04d} " + "z" * 40)
        if i % 10 == 0:
            d.flush()
    d.close()
    files = numbered(list(tmp_path.glob("RECV*.LOG")))
    total = sum(p.stat().st_size for p in files)
    assert total <= 2000
    # The newest lines survive; numbering kept increasing.
    assert "line 0199" in files[-1].read_bytes().decode()
    assert int(files[-1].stem.rsplit("-", 1)[1]) > 5


def test_age_cleanup(tmp_path: Path) -> None:
    stale = tmp_path / "RECV2020010100-1.LOG"
    fresh = tmp_path / "RECV2020010101-1.LOG"
    for p in (stale, fresh):
        p.write_text("#x\r\n")
    day = 86400
    os.utime(stale, (time.time() - 31 * day, time.time() - 31 * day))
    os.utime(fresh, (time.time() - 29 * day, time.time() - 29 * day))
    d = make(tmp_path, max_age=timedelta(days=30))
    d.append_line("x")
    d.flush()
    assert not stale.exists()
    assert fresh.exists()
    d.close()


def test_age_zero_never_deletes(tmp_path: Path) -> None:
    ancient = tmp_path / "RECV2010010100-1.LOG"
    ancient.write_text("#x\r\n")
    os.utime(ancient, (0, 0))
    d = make(tmp_path, max_age=timedelta(0))
    d.append_line("x")
    d.close()
    assert ancient.exists()


def test_flush_thread_writes_and_close_drains(tmp_path: Path) -> None:
    d = make(tmp_path, start_thread=True, flush_interval=0.01)
    d.append_line("first")
    for _ in range(200):
        files = list(tmp_path.glob("RECV*.LOG"))
        if files and b"first" in files[0].read_bytes():
            break
        time.sleep(0.01)
    else:
        raise AssertionError("not flushed in the background")
    for i in range(1000):
        d.append_line(f"l{i}")
    d.close()
    text = next(tmp_path.glob("RECV*.LOG")).read_bytes().decode()
    assert text.count("\r\nl") == 1000
    assert d.dropped == 0


def test_append_does_no_io_on_the_callers_thread(tmp_path: Path) -> None:
    """The hot path (one call per SMTP command) only queues a record: nothing reaches the disk
    until the writer flushes. Not a timing test: it checks where the I/O happens."""
    d = make(tmp_path, start_thread=False)
    for i in range(5_000):
        d.append((time.time(), i))
    assert not list(tmp_path.glob("RECV*.LOG"))
    d.flush()
    assert len(list(tmp_path.glob("RECV*.LOG"))) == 1
    d.close()


def test_io_error_does_not_kill_writer(tmp_path: Path) -> None:
    target = tmp_path / "blocked"
    target.write_text("a file where the directory should be")
    d = make(target)
    d.append_line("lost")
    d.flush()  # must not raise
    assert d.dropped == 1
    d.close()


def test_a_file_another_writer_has_open_is_never_deleted(tmp_path: Path) -> None:
    """server.workers > 1: each worker has its own writer on the same folder, and one's cleanup
    deletes the oldest files, which can be the file another is still writing. That file is kept
    (its writer holds a shared lock on it), so no line written to it is lost; the other files
    still go."""
    kw: dict = dict(max_file_size=4096, max_directory_size=8192, max_age=timedelta(0))
    idle = LogDirectory(tmp_path, "RECV", ["#Fields: x"], start_thread=False, **kw)
    busy = LogDirectory(tmp_path, "RECV", ["#Fields: x"], start_thread=False, **kw)
    now = time.time()
    idle.append((now, "idle-worker line 1"))
    idle.flush()
    held = idle.current_file
    assert held is not None
    time.sleep(0.05)  # the idle file is the oldest
    for i in range(400):
        busy.append((now, f"busy-worker line {i:04d} " + "x" * 40))
    busy.flush()
    assert held.exists()  # the oldest, yet open in another writer: kept
    idle.append((now, "idle-worker line 2"))
    idle.flush()
    assert idle.current_file == held
    assert held.read_text().count("idle-worker line") == 2
    busy_files = [p for p in tmp_path.glob("RECV*") if p != held]
    assert sum(p.stat().st_size for p in busy_files) <= 8192  # busy's own old files went
    assert "busy-worker line 0399" in "".join(p.read_text() for p in busy_files)
    idle.close()
    busy.close()
    # Closed, it is an old file like any other: the next cleanup may delete it.
    kw["max_directory_size"] = 100  # nothing but the open file fits
    late = LogDirectory(tmp_path, "RECV", ["#Fields: x"], start_thread=False, **kw)
    late.append((now, "late line"))
    late.flush()
    late.close()
    assert not held.exists()


def test_a_file_deleted_under_its_writer_is_not_written_to_any_more(tmp_path: Path) -> None:
    """Deleted by hand (or by a writer of an older version that took no lock): the writer's
    next lines go to a new file that exists, not to the deleted one."""
    d = make(tmp_path)
    d.append_line("line 1")
    d.flush()
    held = d.current_file
    assert held is not None
    held.unlink()
    d.append_line("line 2")
    d.flush()
    assert d.current_file != held and d.current_file is not None
    assert "line 2" in d.current_file.read_text()
    d.close()


# A child process whose files cannot grow past 10 bytes (RLIMIT_FSIZE; SIGXFSZ ignored, so a
# write past it fails with EFBIG as one on a full disk fails with ENOSPC): not even a header fits.
# It writes ten batches of 100 lines a flush apart, then gets its room back (as when space is freed) and
# writes one more; it prints what it logged and what it left in the folder.
_FULL_DISK_CHILD = r"""
import json, logging, resource, sys, time
from datetime import timedelta
from pathlib import Path
from relaygate.logs.rotation import LogDirectory

records = []
logging.getLogger("relaygate.logs.rotation").addHandler(logging.Handler())
logging.getLogger("relaygate.logs.rotation").handlers[0].emit = records.append
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (10, hard))
d = LogDirectory(Path(sys.argv[1]), "RECV", ["#Fields: date-time,data"], 10 << 20, 250 << 20,
                 timedelta(days=30), start_thread=False)
for i in range(10):
    for j in range(100):  # 10 KB: more than the file's 8 KB buffer holds
        d.append((time.time(), f"lost {i} {j} ".ljust(100, "x")))
    d.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
d.append((time.time(), "written again"))
d.flush()
d.close()
print(json.dumps({"dropped": d.dropped, "warnings": [r.getMessage() for r in records]}))
"""


def test_a_full_disk_is_said_once_and_leaves_no_empty_files(tmp_path: Path) -> None:
    """A write that fails (a full disk) closed the file and the next batch opened a new one: one
    empty (or header-only) file per flush, five a second, none ever deleted by the size cap, and
    two warnings per flush in the service log. The failure is now said once, with the folder and
    the reason; the files it could not write are removed; when the disk has room again the
    writer says so, with how many lines it lost, and writes on."""
    import json
    import signal
    import subprocess
    import sys

    folder = tmp_path / "SmtpReceive"

    def ignore_sigxfsz() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_CHILD, str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=ignore_sigxfsz,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src")),
    )
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["dropped"] == 1000
    (failing, again) = result["warnings"]
    assert str(folder) in failing and "File too large" in failing, failing
    assert str(folder) in again and "1000 lines" in again, again
    files = sorted(folder.glob("RECV*.LOG"))
    assert len(files) == 1, [f.name for f in files]
    lines = files[0].read_text().splitlines()
    assert lines[0] == "#Fields: date-time,data"
    assert lines[1].endswith("written again") and len(lines) == 2, lines


def _wait_until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(0.01)


def test_a_stalled_disk_keeps_only_the_newest_lines_queued(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A write that hangs (a hung NFS mount) held the flush thread, and every line logged meanwhile
    queued in memory without bound. Beyond max_pending the oldest queued lines are dropped (off
    the hot path: append stays the list's own append), said once, and counted when the writes
    complete again."""
    d = make(tmp_path, start_thread=True, flush_interval=0.01)
    d.max_pending = 100
    stalled, release = threading.Event(), threading.Event()
    write = d._raw_write

    def hung_write(data: bytes) -> None:
        stalled.set()
        release.wait(30)
        write(data)

    d._raw_write = hung_write  # type: ignore[method-assign]
    try:
        with caplog.at_level(logging.WARNING, logger="relaygate.logs.rotation"):
            d.append_line("first")
            assert stalled.wait(10)
            for i in range(1000):
                d.append_line(f"line {i}")
            _wait_until(lambda: len(d._pending) <= 100)
            assert d.dropped == 900
            release.set()
            d.close()
    finally:
        release.set()
        d.close()
    text = next(tmp_path.glob("RECV*.LOG")).read_bytes().decode()
    lines = [line for line in text.split("\r\n") if line and line[0] != "#"]
    assert lines == ["first"] + [f"line {i}" for i in range(900, 1000)]
    said = [r.getMessage() for r in caplog.records]
    assert len([m for m in said if "stalled" in m]) == 2, said
    assert any("900 lines were dropped" in m for m in said), said
