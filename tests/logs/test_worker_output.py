"""The workers' service log reaches the node's stderr whole when stderr is a pipe (systemd's journal,
docker, a log shipper): the supervisor reads each worker's stderr and stdout and is the only writer
(relaygate.logs.worker_output); a line is never longer than MAX_LINE (relaygate.logs.service).

A real `relaygate serve` with two workers whose stderr is a pipe read slowly (a shipper that lags,
so the pipe is full while the workers write), and real processes writing through `WorkerOutput`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import select
import signal
import smtplib
import struct
import subprocess
import sys
import termios
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relaygate.logs.service import JsonFormatter, TextFormatter
from tests.logs.test_service_log import CONFIG, ROOT, Served, check_record
from tests.smtp.helpers import free_port
from tests.support.serve_process import wait_for_ready_line
from tests.workers.test_workers import children_of, wait_until

LONG = 8 * 1024
MAX_LINE = 64 * 1024  # relaygate.logs.service.MAX_LINE (imported where the test needs it)
FULL = 60 * 1024  # a pipe of 64 KiB holding this much is full (writes go in by pages)


# Put first on the workers' PYTHONPATH by PipedServed(hook=True): see its sitecustomize.py.
WORKER_HOOK = ROOT / "tests" / "support" / "worker_hook"


class PipedServed(Served):
    """`relaygate serve` whose stderr is a pipe that a thread reads 4 KiB at a time with a pause
    in between, while `gate` is set (clear it and nobody reads: a stalled log shipper): everything
    read, in order. With `hook`, its workers take the signals of WORKER_HOOK (with
    ``hook="serve"``, a relay of one process too)."""

    def __init__(self, tmp: Path, *, hook: bool | str = False, **kwargs: Any) -> None:
        super().__init__(tmp, free_port(), **kwargs)  # no mail is sent: no sink
        self.received = bytearray()
        self.lock = threading.Lock()
        self.reader: threading.Thread | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.read_fd = -1
        self.hook_dir = WORKER_HOOK if hook else None
        self.hook_env = {"RELAYGATE_TEST_HOOK": hook} if isinstance(hook, str) else {}

    def start(self, *flags: str, expect_ready: bool = True) -> None:
        path = [str(ROOT / "src")]
        if self.hook_dir is not None:
            path.insert(0, str(self.hook_dir))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), **self.hook_env)
        env.pop("RELAYGATE_CONFIG", None)
        read_fd, write_fd = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "serve", "--config", str(self.config), *flags],
                stdout=subprocess.PIPE,
                stderr=write_fd,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=env,
            )
        finally:
            os.close(write_fd)
        self.read_fd = read_fd
        self.reader = threading.Thread(target=self._read, args=(read_fd,), daemon=True)
        self.reader.start()
        if not expect_ready:
            return
        ready = wait_for_ready_line(self.proc)
        if ready is None:
            self.stop()
            raise AssertionError(f"relaygate serve did not start:\n{self.text()}")

    def _read(self, fd: int) -> None:
        try:
            while self.gate.wait() and (chunk := os.read(fd, 4096)):  # until every writer is gone
                with self.lock:
                    self.received += chunk
                time.sleep(0.005)
        finally:
            os.close(fd)

    def text(self) -> str:
        with self.lock:
            return bytes(self.received).decode("ascii", "replace")

    def lines(self) -> list[str]:
        with self.lock:
            return bytes(self.received).decode("ascii").splitlines()

    def unread(self) -> int:
        """How many bytes wait in the stderr pipe (64 KiB at most; FULL: no room for a line)."""
        return int(struct.unpack("i", fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0" * 4))[0])

    def fill(self) -> None:
        """Fill the stderr pipe to its last byte (a pipe that took a long line may still have
        room for a short one): empty lines, written through the supervisor's descriptor."""
        assert self.proc is not None
        fd = os.open(f"/proc/{self.proc.pid}/fd/2", os.O_WRONLY | os.O_NONBLOCK)
        try:
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(fd, b"\n")
        finally:
            os.close(fd)

    def worker_pids(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def stop(self) -> int | None:
        self.gate.set()  # a process blocked writing to stderr could not stop
        code = super().stop()
        if self.reader is not None:
            self.reader.join(30)
            assert not self.reader.is_alive(), "a process still holds the stderr pipe"
        return code


@pytest.fixture
def piped(tmp_path: Path) -> Iterator[Any]:
    started: list[PipedServed] = []

    def make(**kwargs: Any) -> PipedServed:
        s = PipedServed(tmp_path, **kwargs)
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.stop()


def offer_invalid_config(
    s: Served, round_: int, count: int = 300, server_extra: str = 'log_format = "json"'
) -> None:
    """The relay's config with `count` remote IP ranges that are not ranges, written where the
    workers read the text their supervisor offers them at a reload (which would refuse it, once,
    and offer the workers nothing): each worker refuses it when SIGHUPed itself
    (`reload_workers`), with one problem a range in the error (~140 bytes each). Written whole
    (renamed into place): a worker must not read a file half written."""
    ranges = ", ".join(f'"not-a-range-{round_}-{i}"' for i in range(count))
    text = CONFIG.format(
        data=s.data,
        workers=s.workers,
        server_extra=server_extra,
        admin_port=s.admin_port,
        port=s.port,
        banner="220 RelayGate",
        sink_port=s.sink_port,
    )
    assert 'remote_ip_ranges = ["127.0.0.0/8"]' in text
    text = text.replace('remote_ip_ranges = ["127.0.0.0/8"]', f"remote_ip_ranges = [{ranges}]")
    offered = s.data / "run" / "worker-config-offered.toml"
    new = offered.with_suffix(".new")
    new.write_text(text)
    os.replace(new, offered)


def reload_workers(s: Served) -> None:
    """SIGHUP to each worker at once: each reloads the text offered (`offer_invalid_config`)."""
    for pid in children_of(s.proc.pid if s.proc is not None else -1):
        os.kill(pid, signal.SIGHUP)


def refusals(s: PipedServed) -> dict[int, int]:
    """How many "reload refused" lines each worker logged so far (a line cut short, or one being
    read, does not count: it is checked at the end)."""
    counts = {0: 0, 1: 0}
    for line in s.text().splitlines():
        if "reload refused" in line:
            try:
                counts[json.loads(line)["worker"]] += 1
            except (ValueError, KeyError):
                pass
    return counts


def test_long_json_lines_of_two_workers_reach_a_piped_stderr_whole(piped: Any) -> None:
    """Two workers each log, at the same moments (a SIGHUP to both), a
    JSON line of ~40 KiB (a reload refused, listing 300 problems), 12 times; stderr is a pipe that
    fills up. Every line read from it is one JSON object: each of those 24+ long lines whole, with
    its worker field, each process's lines in order. (Before, the workers wrote to the shared pipe
    themselves: a write over PIPE_BUF into a full pipe went in pieces, cut by the other worker's.)"""
    s = piped(workers=2, server_extra='log_format = "json"')
    s.start()
    rounds = 12
    for round_ in range(rounds):
        offer_invalid_config(s, round_)
        reload_workers(s)
        s.wait_for(lambda r=round_: min(refusals(s).values()) > r, timeout=30)
    assert s.stop() == 0
    assert s.proc is not None

    lines = s.lines()
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line ({len(line)} bytes): {line[:200]!r}...{line[-200:]!r}")
    for record in records:
        check_record(record, s.proc.pid, 2)
    long = [(line, r) for line, r in zip(lines, records, strict=True) if len(line) > LONG]
    assert len(long) >= 2 * rounds, [
        r["message"][:300] for r in records if "reload" in r["message"]
    ][:4]
    for line, record in long:
        assert record["message"].startswith("reload refused, configuration invalid:"), line[:200]
        assert "remote_ip_ranges[299]" in record["message"]
        assert record["worker"] in (0, 1) and len(line) < MAX_LINE
    assert {r["worker"] for _line, r in long} == {0, 1}
    for pid in {r["pid"] for r in records}:  # each process's lines in the order it wrote them
        times = [r["time"] for r in records if r["pid"] == pid]
        assert times == sorted(times), pid


# -- WorkerOutput with real processes writing -------------------------------------------------------

WRITER = textwrap.dedent(
    """\
    import os, sys, time
    name, count = sys.argv[1], int(sys.argv[2])
    for i in range(count):
        line = f"{name} {i:03d} " + name * 9000 + "\\n"
        os.write(2, line[:4000].encode())  # a line in pieces, another process writing meanwhile
        time.sleep(0.002)
        os.write(2, line[4000:].encode())
    os.write(2, b"x" * 150000 + b"\\n")  # over MAX_LINE: in pieces, each saying so
    os.write(2, b"Fatal Python error: raw output, and a last line without its newline")
    """
)


def _through_worker_outputs(script: str, *args: str, capacity: int | None = None) -> bytes:
    """What processes "a" and "b", each running `script` with its name and `args`, write to
    stderr, as read through one WorkerOutput each (the supervisor's reading of its workers'
    stderr) into one pipe; `capacity`: the pipe size each WorkerOutput must have got."""
    from relaygate.logs import worker_output

    target_read, target_write = os.pipe()
    received = bytearray()

    def read() -> None:
        while chunk := os.read(target_read, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    outputs, procs = [], []
    try:
        for name in ("a", "b"):
            output = worker_output.WorkerOutput(target_write, f"test {name}")
            if capacity is not None:
                assert output._capacity == capacity
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", script, name, *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=output.write_fd,
                )
            )
            output.start()
            outputs.append(output)
        for proc in procs:
            assert proc.wait(60) == 0
        for output in outputs:
            output.join(10)
            assert output.done
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        os.close(target_write)
        reader.join(10)
        os.close(target_read)
    return bytes(received)


def test_worker_output_passes_each_line_on_whole_and_in_order(tmp_path: Path) -> None:
    """Two processes write lines of 9 KiB each in two writes, interleaving; through WorkerOutput
    (the supervisor's reading of its workers' stderr) into one pipe every line arrives whole and
    in order, a line over 64 KiB in pieces that end with the marker, the last line without a
    newline at the process's exit."""
    from relaygate.logs.worker_output import CUT_MARKER

    received = _through_worker_outputs(WRITER, "40")
    lines = received.split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert all(len(line) < MAX_LINE for line in lines)
    for name in ("a", "b"):
        mine = [line for line in lines if line.startswith(f"{name} ".encode())]
        assert mine == [f"{name} {i:03d} ".encode() + name.encode() * 9000 for i in range(40)]
        # the long line: its pieces in a row
    pieces = [line for line in lines if line.startswith(b"x")]
    assert len(pieces) == 6  # 150,000 bytes: two pieces each, per process
    assert all(p.endswith(CUT_MARKER) for i, p in enumerate(pieces) if i % 3 != 2)
    assert b"".join(p.removesuffix(CUT_MARKER) for p in pieces) == b"x" * 300000
    raw = [line for line in lines if line.startswith(b"Fatal Python error")]
    assert raw == [b"Fatal Python error: raw output, and a last line without its newline"] * 2


RECORD_WRITER = r"""
import os, sys, time
name = sys.argv[1]
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # both start at once
for r in range(int(sys.argv[2])):
    lines = [f"{name} record {r:03d} line {i:03d} ".encode() + b"." * 400 for i in range(100)]
    os.write(2, b"\n".join(lines) + b"\n")  # one record, one write
"""


def test_records_longer_than_a_small_pipe_are_passed_on_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kernel that refuses the 1 MiB pipe (a user over its pipe quota, without
    CAP_SYS_RESOURCE, gets pipes of a page or two) hands a record longer than the pipe to the
    reader in pieces: each piece was passed on as it came, and another worker's lines landed in
    the middle of the record (seen in the suite on a loaded machine). The reader now waits for the
    rest of a write that filled the pipe. Two processes each write 30 records of ~40 KiB, each
    with one write, through pipes of one page (4 KiB)."""
    from relaygate.logs import worker_output

    monkeypatch.setattr(worker_output, "PIPE_SIZE", 4096)
    start = str(time.time() + 1.0)
    received = _through_worker_outputs(RECORD_WRITER, "30", start, capacity=4096)
    lines = received.decode().splitlines()
    assert len(lines) == 2 * 30 * 100
    for first in range(0, len(lines), 100):
        record = lines[first : first + 100]
        head = record[0].split(" line ")[0]
        assert all(line.startswith(f"{head} line {i:03d} ") for i, line in enumerate(record)), (
            f"record {head} cut: {[line[:30] for line in record if not line.startswith(head)][:3]}"
        )


# -- the service log's own lines are never over MAX_LINE ----------------------------------------------


def _record(message: str, *, exc: bool = False, **extra: Any) -> logging.LogRecord:
    record = logging.LogRecord("relaygate", logging.ERROR, __file__, 1, "%s", (message,), None)
    if exc:
        try:
            raise RuntimeError("the end of the traceback")
        except RuntimeError:
            record.exc_info = sys.exc_info()
    record.__dict__.update(extra)
    return record


def test_a_json_line_over_max_line_is_cut_in_its_middle_and_stays_json() -> None:
    from relaygate.logs.service import MAX_LINE as LIMIT

    assert LIMIT == MAX_LINE
    formatter = JsonFormatter(worker=1)
    message = "start " + "\x01é" * 100_000 + " end"  # escapes: up to 6 bytes a character
    line = formatter.format(_record(message, exc=True, connector="c" * 80_000))
    assert len(line) < MAX_LINE
    record = json.loads(line)
    assert record["cut"] is True and record["worker"] == 1 and record["level"] == "ERROR"
    assert record["message"].startswith("start \x01é") and record["message"].endswith(" end")
    assert "characters cut: line over 65536 bytes" in record["message"]
    assert record["exception"].endswith("RuntimeError: the end of the traceback")
    short = formatter.format(_record("short"))
    assert "cut" not in json.loads(short)


def test_a_text_line_over_max_line_is_cut_in_its_middle() -> None:
    line = TextFormatter(worker=0).format(_record("start " + "é" * 200_000 + " end"))
    assert len(line.encode()) < MAX_LINE
    assert "relaygate[w0]: start é" in line and line.endswith(" end")
    assert "characters cut: line over 65536 bytes" in line


def test_with_the_supervisor_killed_the_workers_last_lines_still_reach_stderr(
    piped: Any,
) -> None:
    """SIGKILL of the supervisor: the workers' stderr pipes lose their reader; each worker then
    writes to the supervisor's stderr itself, so its "supervisor gone" line is not lost."""
    s = piped(workers=2, server_extra='log_format = "json"')
    s.start()
    assert s.proc is not None
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    assert s.reader is not None
    s.reader.join(60)  # EOF: the workers stopped (each held the pipe)
    assert not s.reader.is_alive()
    gone = [json.loads(line) for line in s.lines() if "supervisor gone" in line]
    assert sorted(r["worker"] for r in gone) == [0, 1], s.text()[-3000:]


def test_a_line_to_a_full_non_blocking_stderr_is_still_written_whole() -> None:
    """A stderr descriptor that another program left non-blocking: a write that finds the pipe
    full waits for room instead of losing the rest of the line (EAGAIN)."""
    from relaygate.logs.service import write_whole

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    data = b"y" * 300_000 + b"\n"  # more than the pipe holds
    errors: list[BaseException] = []

    def write() -> None:
        try:
            write_whole(write_fd, data)
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    time.sleep(0.5)  # the writer finds the pipe full
    got = bytearray()
    deadline = time.monotonic() + 20
    try:
        while len(got) < len(data) and time.monotonic() < deadline:
            if select.select([read_fd], [], [], 0.5)[0]:
                got += os.read(read_fd, 65536)
        writer.join(10)
    finally:
        os.close(write_fd)
        os.close(read_fd)
    assert not errors and bytes(got) == data


# A worker writing a line whenever it reads one on its stdin: the test decides when.
ECHOER = textwrap.dedent(
    """
    import os, sys
    for request in sys.stdin:
        os.write(2, request.encode())
    """
)


def test_a_worker_s_lines_flow_again_once_the_supervisor_s_stderr_can_be_written_again(
    tmp_path: Path,
) -> None:
    """The supervisor's stderr fails for a while (a full disk: ENOSPC, shown with /dev/full):
    the worker's lines of that while are lost, but once stderr can be written again (space
    freed), its next lines are passed on, as the supervisor's own are; they are not dropped
    until the worker is restarted."""
    import fcntl
    import termios

    from relaygate.logs.worker_output import WorkerOutput

    log = tmp_path / "stderr.log"
    target = os.open("/dev/full", os.O_WRONLY)
    output = WorkerOutput(target, "test full")
    proc = subprocess.Popen(
        [sys.executable, "-c", ECHOER],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=output.write_fd,
    )
    output.start()
    assert proc.stdin is not None
    try:
        proc.stdin.write(b"during the full disk\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        pending = b"\0\0\0\0"
        while time.monotonic() < deadline:  # the line was read (and its write failed)
            pending = fcntl.ioctl(output._read_fd, termios.FIONREAD, b"\0\0\0\0")
            if pending == b"\0\0\0\0":
                break
            time.sleep(0.01)
        time.sleep(0.3)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, target)  # space freed: the same descriptor writes again
        os.close(fd)
        proc.stdin.write(b"after the full disk\n")
        proc.stdin.close()
        assert proc.wait(30) == 0
        output.join(10)
        assert output.done
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(target)
    assert b"after the full disk\n" in log.read_bytes()


def test_long_multi_line_text_records_of_two_workers_are_not_cut_by_each_other(
    piped: Any,
) -> None:
    """The text format keeps a record of several lines (a reload refused, one problem a line;
    a traceback) as several lines. Two workers each log four such records of ~40 KiB at the
    same moments (four SIGHUPs in a row), 12 times, into a stderr pipe read slowly, so that
    more than one read's worth (64 KiB) waits in each worker's pipe: each record reaches stderr
    in one piece, as the worker wrote it with one write, no line of another process among its
    lines. (Before, the supervisor read 64 KiB at a time and passed on the whole lines of each
    read: a record cut at a read's end had the other worker's record in its middle.)"""
    s = piped(workers=2)
    s.start()
    rounds = 12

    def refused() -> int:
        return s.text().count("reload refused, configuration invalid")

    for round_ in range(rounds):
        offer_invalid_config(s, round_, server_extra="")  # the text format, the default
        for _ in range(4):
            reload_workers(s)
            time.sleep(0.05)
        s.wait_for(lambda r=round_: refused() >= 8 * (r + 1), timeout=30)
    assert s.stop() == 0
    lines = s.lines()
    starts = [i for i, line in enumerate(lines) if "reload refused, configuration invalid" in line]
    assert len(starts) >= 8 * rounds
    for i in starts:
        record = lines[i + 1 : i + 301]  # one problem a line, remote_ip_ranges[0] to [299]
        strays = [line[:120] for line in record if "remote_ip_ranges[" not in line]
        assert not strays, f"the record at line {i} is cut by other lines: {strays[:3]}"


# -- a node's stderr that nobody reads for a while --------------------------------------------------


def test_a_dead_worker_s_last_lines_come_before_the_line_saying_that_it_exited(piped: Any) -> None:
    """A worker writes a traceback and dies (os._exit), and a process it started, which holds its
    stderr pipe too, writes the worker's last line once the worker is reaped: the supervisor's
    "exited unexpectedly" line comes after every one of those lines, the last included, since it
    reads a dead worker's pipes to their end before it logs the exit. (Before, it logged the exit
    as soon as it reaped the worker: its line went out before what was still to come on the
    worker's pipe.)"""
    s = piped(workers=2, hook=True)
    s.start()
    victim = s.worker_pids()[0]
    os.kill(victim, signal.SIGUSR1)
    s.wait_for(lambda: f"(pid {victim}) exited unexpectedly" in s.text())
    s.wait_for(lambda: f"last line of worker {victim}" in s.text())
    lines = s.lines()
    exited = [i for i, line in enumerate(lines) if f"(pid {victim}) exited unexpectedly" in line]
    crash = lines.index(f"RuntimeError: worker {victim} crashes (test)")
    last = lines.index(f"last line of worker {victim}")
    assert len(exited) == 1
    assert crash < last < exited[0], f"exit line at {exited[0]}, last line at {last}"


def test_a_supervisor_whose_stderr_is_not_read_still_restarts_a_worker_and_stops(
    piped: Any,
) -> None:
    """The node's stderr is a pipe nobody reads any more (full) while a worker logs 5 MiB: the
    supervisor still restarts a killed worker, takes a SIGHUP, and stops on SIGTERM within its
    stop timeout. (Before, its line about the killed worker waited for stderr for ever, with it
    the restart and the handling of every signal.)"""
    from relaygate.workers import STOP_TIMEOUT

    s = piped(workers=2, hook=True)
    s.start()
    assert s.proc is not None
    s.gate.clear()
    first, second = s.worker_pids()
    os.kill(first, signal.SIGUSR2)
    assert wait_until(lambda: s.unread() >= FULL, 20), f"stderr not full: {s.unread()} bytes"
    os.kill(second, signal.SIGKILL)
    assert wait_until(lambda: len(set(s.worker_pids()) - {first, second}) == 1, 20), (
        f"no new worker: {s.worker_pids()}"
    )
    s.reload()
    began = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    try:
        code = s.proc.wait(STOP_TIMEOUT + 10)
    except subprocess.TimeoutExpired:
        pytest.fail("relaygate serve did not stop on SIGTERM with its stderr not read")
    assert code == 0 and time.monotonic() - began < STOP_TIMEOUT
    assert s.unread() >= FULL  # nobody read it meanwhile


DROPPED_NOTICE = "service-log lines dropped: stderr not read"


def burst_into_unread_stderr(s: Any, pids: list[int], connections: int) -> list[dict[str, Any]]:
    """While `s`'s stderr is not read, each of `pids` logs its 5 MiB burst (SIGUSR2, the worker
    hook) and `connections` SMTP clients each get their NOOP answered (the event loops did not
    wait for stderr); then stderr is read until the dropped-lines notice comes, and the relay
    stops cleanly. The JSON records it logged."""
    s.gate.clear()
    for pid in pids:
        os.kill(pid, signal.SIGUSR2)
    for _ in range(connections):
        with smtplib.SMTP("127.0.0.1", s.port, timeout=10) as smtp:
            assert smtp.noop()[0] == 250
    s.gate.set()
    s.wait_for(lambda: DROPPED_NOTICE in s.text())
    assert s.stop() == 0
    return [json.loads(line) for line in s.lines()]


def test_workers_logging_into_a_stderr_nobody_reads_keep_serving_and_what_is_dropped_is_counted(
    piped: Any,
) -> None:
    """Both workers log 5 MiB each while the node's stderr is not read: more than their pipes
    and the supervisor's buffer hold. Their event loops do not wait for stderr (each SMTP
    connection gets its banner); once stderr is read again, the lines kept come whole, and one
    line says how many were dropped. (Before, the supervisor's threads waited on the full stderr,
    the workers' pipes filled, and each worker's event loop stopped in its next log line.)"""
    s = piped(workers=2, hook=True, server_extra='log_format = "json"')
    s.start()
    assert s.proc is not None
    records = burst_into_unread_stderr(s, s.worker_pids(), connections=6)
    notices = [r for r in records if DROPPED_NOTICE in r["message"]]
    assert len(notices) >= 1 and all("worker" not in r for r in notices), notices
    assert all(r["level"] == "WARNING" and r["pid"] == s.proc.pid for r in notices), notices
    dropped = sum(int(r["message"].split()[0]) for r in notices)
    burst = [r for r in records if r["message"].startswith("burst ")]
    assert 0 < len(burst) < 320 and len(burst) + dropped >= 320, (len(burst), dropped)
    for r in burst:
        assert r["message"].endswith("w" * 32000)


def test_a_stderr_buffer_drops_what_does_not_fit_and_says_so_where_the_lines_are_missing() -> None:
    """StderrBuffer: 400 lines of 1,000 bytes put while nobody reads its pipe are put at once (no
    put waits); once the pipe is read, the lines that fitted (the pipe's 64 KiB and the 200,000
    bytes of the limit) come in order, then one line saying how many were dropped, then a line
    put after."""
    from relaygate.logs.service import StderrBuffer

    read_fd, write_fd = os.pipe()
    buffer = StderrBuffer(write_fd, limit=200_000)
    lines = [b"%04d " % i + b"z" * 994 + b"\n" for i in range(400)]
    putter = threading.Thread(target=lambda: [buffer.put(line) for line in lines], daemon=True)
    putter.start()
    putter.join(10)
    assert not putter.is_alive(), "a put waited for stderr to be read"
    received = bytearray()

    def read() -> None:
        while chunk := os.read(read_fd, 65536):
            received.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert buffer.flush(20)
        buffer.put(b"after\n")
        assert buffer.flush(20)
    finally:
        os.close(write_fd)
        reader.join(10)
        os.close(read_fd)
    got = bytes(received).split(b"\n")
    kept = [line + b"\n" for line in got if line.startswith(b"0")]
    assert 200 <= len(kept) < 400 and kept == lines[: len(kept)]
    assert got[len(kept)].endswith(
        b"%d service-log lines dropped: stderr not read" % (400 - len(kept))
    )
    assert got[len(kept) + 1 :] == [b"after", b""]


def running(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie nobody reaped has)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def test_workers_whose_supervisor_is_killed_stop_though_nobody_reads_stderr(piped: Any) -> None:
    """The supervisor is killed (SIGKILL) while the node's stderr is full and not read: each
    worker, whose stderr pipe is then broken, logs the lines of its stop to the node's stderr
    itself, without waiting for room there, and exits (it held the node's locks while it ran):
    it waits 2 s at exit for stderr to take those lines, then goes without them. (Before, a
    worker's first line there waited for stderr for ever, and the worker with it.)"""
    s = piped(workers=2, hook=True)
    s.start()
    assert s.proc is not None
    pids = s.worker_pids()
    s.gate.clear()
    os.kill(pids[0], signal.SIGUSR2)
    assert wait_until(lambda: s.unread() >= FULL, 20), f"stderr not full: {s.unread()} bytes"
    s.fill()
    s.proc.send_signal(signal.SIGKILL)
    s.proc.wait(10)
    assert wait_until(lambda: not any(running(pid) for pid in pids), 30), (
        f"workers still running: {[pid for pid in pids if running(pid)]}"
    )
    s.gate.set()
    assert s.reader is not None
    s.reader.join(30)
    assert not s.reader.is_alive(), "a process still holds the node's stderr"


def test_a_single_process_relay_logging_into_a_stderr_nobody_reads_keeps_serving(
    piped: Any,
) -> None:
    """server.workers = 1: the relay logs 5 MiB while its stderr is not read (full). Its event
    loop does not wait for stderr (each SMTP connection gets its banner), and once stderr is
    read again one line says how many lines were dropped. (Before, its next log line waited for
    stderr, and the event loop with it: no connection was answered.)"""
    s = piped(workers=1, hook="serve", server_extra='log_format = "json"')
    s.start()
    assert s.proc is not None
    records = burst_into_unread_stderr(s, [s.proc.pid], connections=3)
    dropped = sum(int(r["message"].split()[0]) for r in records if DROPPED_NOTICE in r["message"])
    burst = [r for r in records if r["message"].startswith("burst ")]
    assert 0 < len(burst) < 160 and len(burst) + dropped >= 160, (len(burst), dropped)


def test_the_traceback_of_an_uncaught_exception_comes_after_the_lines_logged_before_it(
    piped: Any,
) -> None:
    """server.workers = 1, the text format: the relay logs 20 lines of 32 KiB, then an exception
    nothing catches ends it; its stderr is a pipe read slowly. All 20 lines come, then the
    traceback. (Before, Python wrote the traceback straight to stderr while most of those lines
    still waited in the StderrBuffer: it came before them, in the middle of the log.)"""
    s = piped(workers=1, hook="crash")
    s.start(expect_ready=False)
    assert s.proc is not None
    assert s.proc.wait(30) == 1
    assert s.reader is not None
    s.reader.join(30)
    lines = s.lines()
    before = [i for i, line in enumerate(lines) if " before the crash " in line]
    crash = lines.index("RuntimeError: the relay crashes at start (test)")
    assert len(before) == 20
    assert max(before) < crash, f"traceback at line {crash}, logged lines at {before}"


def test_a_relay_started_with_its_stderr_closed_writes_no_log_line_into_its_data_dir(
    tmp_path: Path,
) -> None:
    """`relaygate serve 2>&-` (stderr closed, as some init scripts and daemonizers leave it),
    two workers: no file the relay opens takes descriptor 2, so the supervisor passes its
    workers' lines to no file of its own. (Before, the node's lock file took descriptor 2 and
    the workers' service log was written into data_dir/relaygate.lock.)"""
    s = Served(tmp_path, free_port(), workers=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("RELAYGATE_CONFIG", None)
    command = [sys.executable, "-m", "relaygate", "serve", "--config", str(s.config)]
    s.proc = subprocess.Popen(
        ["/bin/sh", "-c", 'exec "$@" 2>&-', "sh", *command],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert wait_for_ready_line(s.proc) is not None, "relaygate serve did not start"
    finally:
        assert s.stop() == 0
    written = {
        str(path.relative_to(s.data)): path.read_bytes()
        for path in s.data.rglob("*")
        if path.is_file() and b"relaygate[w" in path.read_bytes()
    }
    assert written == {}
