"""Shared helpers for the RelayGate benchmarks: ports, process groups, /proc accounting, smtp-sink.

Everything here is loopback-only and bounded in time. No third-party modules: CPU and memory are
read from /proc (psutil is not required).
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
MB_BYTES = 1024 * 1024
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
#: The envelope of every benchmark message (the relay routes any domain to the sink).
SENDER, RECIPIENT = "bench@bench.example", "rcpt@remote.example"
#: Seconds `Sink.settled_count` keeps counting after the expected count.
SINK_SETTLE = 0.3


def have_postfix_tools() -> bool:
    return all(os.access(p, os.X_OK) for p in (SMTP_SOURCE, SMTP_SINK))


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


def raise_nofile(want: int) -> int:
    """Raise RLIMIT_NOFILE of this process towards `want` (root may raise the hard limit too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want
    if hard != resource.RLIM_INFINITY and target > hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            target = hard
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def kill_group(proc: subprocess.Popen[bytes] | None, *, grace: float = 5.0) -> None:
    """SIGTERM the process group of `proc` (started with start_new_session=True), then SIGKILL."""
    if proc is None:
        return
    if proc.poll() is not None:
        # The leader has exited, but its group may live on: a floor server whose first process
        # failed leaves the forked one serving, which would then load every later run.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)


# -- /proc accounting ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm may hold spaces and parentheses: split after the last ')'
    rest = raw[raw.rindex(")") + 2 :].split()
    return rest  # rest[0] is state (field 3); field n is rest[n - 3]


def process_tree(roots: Iterable[int]) -> list[int]:
    """`roots` and all their descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        st = _stat(int(entry.name))
        if st is None:
            continue
        children.setdefault(int(st[1]), []).append(int(entry.name))
    out: list[int] = []
    todo = [r for r in roots if Path(f"/proc/{r}").exists()]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def cpu_seconds(pids: Iterable[int]) -> float:
    """utime+stime of the processes plus cutime+cstime (their reaped children, e.g. Postfix's smtpd
    processes that exited: master waits for them, so their time lands in master's cutime)."""
    ticks = 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        ticks += int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])
    return ticks / CLK_TCK


def cpu_user_system(pids: Iterable[int]) -> tuple[float, float]:
    """utime and stime of the processes alive now, in seconds (their reaped children not counted)."""
    user = system = 0
    for pid in pids:
        st = _stat(pid)
        if st is None:
            continue
        user += int(st[11])
        system += int(st[12])
    return user / CLK_TCK, system / CLK_TCK


def context_switches(pids: Iterable[int]) -> tuple[int, int]:
    """Voluntary and involuntary context switches of every thread of the processes alive now.

    Voluntary: a thread blocked (in epoll, on a lock, for the GIL, on an fsync); involuntary: it
    was preempted while runnable. A change that hands work between threads less often shows here
    before it shows in the rate (docs/benchmarks.md, thirteenth session)."""
    voluntary = involuntary = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                text = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:  # the thread ended meanwhile
                continue
            for line in text.splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary


def smtp_source(
    port: int, sessions: int, messages: int, size: int, timeout: float
) -> tuple[int, float, str]:
    """Postfix's smtp-source against 127.0.0.1:`port` (`size` octets per message): its exit
    status, its wall time and the tail of what it printed."""
    args = [
        SMTP_SOURCE,
        "-s", str(sessions),
        "-m", str(messages),
        "-l", str(size),
        "-f", SENDER,
        "-t", RECIPIENT,
        f"127.0.0.1:{port}",
    ]  # fmt: skip
    t0 = time.monotonic()
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        rc, err = out.returncode, (out.stderr or out.stdout).strip()
    except subprocess.TimeoutExpired:
        rc, err = -1, f"smtp-source did not finish within {timeout:.0f} s"
    return rc, time.monotonic() - t0, err


def rss_bytes(pids: Iterable[int]) -> int:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/statm").read_text().split()
        except OSError:
            continue
        total += int(fields[1]) * PAGE
    return total


def pss_bytes(pids: Iterable[int]) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        m = re.search(r"^Pss:\s+(\d+) kB", text, re.M)
        if m:
            total += int(m.group(1)) * 1024
    return total


@dataclass
class Sampler:
    """Samples the memory of a process tree in a thread; CPU is read at start and stop."""

    roots: list[int]
    interval: float = 0.1
    peak_rss: int = 0
    peak_pss: int = 0
    peak_procs: int = 0
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Sampler:
        self.cpu_start = cpu_seconds(process_tree(self.roots))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            pids = process_tree(self.roots)
            self.peak_procs = max(self.peak_procs, len(pids))
            self.peak_rss = max(self.peak_rss, rss_bytes(pids))
            if n % 5 == 0:
                self.peak_pss = max(self.peak_pss, pss_bytes(pids))
            n += 1
            self._stop.wait(self.interval)

    def stop(self) -> float:
        """Stop sampling; returns the CPU seconds used by the tree since start()."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        pids = process_tree(self.roots)
        self.peak_rss = max(self.peak_rss, rss_bytes(pids))
        self.cpu_end = cpu_seconds(pids)
        return self.cpu_end - self.cpu_start


# -- smtp-sink ----------------------------------------------------------------------------------


class Sink:
    """Postfix's `smtp-sink -c` on loopback; counts the messages it received ("mesg=N")."""

    _RE = re.compile(rb"mesg=(\d+)")

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()

    def start(self) -> Sink:
        args = [SMTP_SINK, "-c"]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]
        args += [f"127.0.0.1:{self.port}", "1000"]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / f"smtp-sink-{self.port}.err", "wb"),  # noqa: SIM115
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        if not wait_port("127.0.0.1", self.port, 10):
            self.stop()
            raise RuntimeError(f"smtp-sink did not listen on 127.0.0.1:{self.port}")
        # wait_port opened (and closed) one session; no message was counted.
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return
            if not chunk:
                return
            tail = (tail + chunk)[-256:]
            found = self._RE.findall(tail)
            if found:
                with self._cond:
                    self.count = int(found[-1])
                    self._cond.notify_all()

    def wait_for(self, target: int, *, stall: float, cap: float) -> tuple[int, float]:
        """Wait until `target` messages were counted, nothing arrived for `stall` seconds, or `cap`
        seconds passed. Returns (count, time.monotonic() of the last increase)."""
        start = time.monotonic()
        last_count, last_change = self.count, start
        with self._cond:
            while self.count < target:
                now = time.monotonic()
                if now - start >= cap or now - last_change >= stall:
                    break
                self._cond.wait(timeout=0.05)
                if self.count != last_count:
                    last_count, last_change = self.count, time.monotonic()
            return self.count, last_change

    def settled_count(self, target: int, *, stall: float, cap: float) -> int:
        """`wait_for`, then keep counting a little longer: a message delivered twice, or a report
        to the benchmark's sender, arrives after the expected count was reached."""
        self.wait_for(target, stall=stall, cap=cap)
        time.sleep(SINK_SETTLE)
        return self.count

    def stop(self) -> None:
        kill_group(self.proc)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for an empty list."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def machine_description(tmp: str = "/tmp") -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    uname = os.uname()
    fs = "unknown filesystem"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind, *_ = line.split()
            if (tmp == mnt or tmp.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                best, fs = mnt, f"{kind} on {dev}"
    return (
        f"{os.cpu_count()} × {model}, {mem_kb / 1024 / 1024:.1f} GiB RAM, "
        f"{uname.sysname} {uname.release} {uname.machine}, {tmp} on {fs}"
    )
