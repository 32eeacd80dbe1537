"""`server.workers = N`: a supervisor and N worker processes sharing the SMTP port (SO_REUSEPORT).

Real sockets on 127.0.0.x, `relaygate serve` as a subprocess, an aiosmtpd sink as the smart host.
Which worker holds a connection is read from /proc: a worker's fds that are sockets of an ESTABLISHED
TCP connection whose local port is the relay's.
"""

from __future__ import annotations

import contextlib
import email
import os
import shutil
import signal
import smtplib
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from relaygate.config import ConfigError, parse_text
from tests.smtp.helpers import RawClient, free_port
from tests.support.serve_process import wait_for_ready_line

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading and /proc are Linux's"
)

CONFIG = """\
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
data_dir = "{data}"
workers = {workers}
{server_extra}

[admin]
enabled = true
listen = "127.0.0.1:{admin_port}"

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Relay"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"
protocol_logging_level = "Verbose"
connection_inactivity_timeout = "00:00:30"
banner = "{banner}"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "Sink"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1"]
port = {sink_port}
"""


# -- the sink -------------------------------------------------------------------------------------


class Sink:
    """aiosmtpd smart host: every delivered message's Message-ID, in arrival order. With
    `defer_first`, the first attempt of each message it picks gets a 451 (a transient failure
    the relay retries)."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.lock = threading.Lock()
        self.defer_first: Callable[[str], bool] | None = None
        self.deferred: set[str] = set()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = email.message_from_bytes(envelope.content)
        mid = str(msg["Message-ID"])
        with self.lock:
            if self.defer_first is not None and mid not in self.deferred and self.defer_first(mid):
                self.deferred.add(mid)
                return "451 4.3.0 Try again later"
            self.ids.append(mid)
        return "250 2.0.0 OK"

    def count(self) -> Counter[str]:
        with self.lock:
            return Counter(self.ids)


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


# -- the relay ------------------------------------------------------------------------------------


class Served:
    """`relaygate serve` in a subprocess: the supervisor, its workers, the port, the log."""

    def __init__(self, tmp: Path, sink_port: int, workers: int, server_extra: str = "") -> None:
        self.tmp = tmp
        self.server_extra = server_extra
        self.port = free_port()
        self.admin_port = free_port()
        self.sink_port = sink_port
        self.workers = workers
        self.data = tmp / "data"
        self.config = tmp / "relaygate.toml"
        self.stderr = tmp / "serve.stderr"
        self.write_config("220 RelayGate one")
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready_line = b""

    def write_config(self, banner: str) -> None:
        self.config.write_text(
            CONFIG.format(
                data=self.data,
                workers=self.workers,
                server_extra=self.server_extra,
                admin_port=self.admin_port,
                port=self.port,
                banner=banner,
                sink_port=self.sink_port,
            )
        )

    def start(self) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        env.pop("RELAYGATE_CONFIG", None)
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "serve", "--config", str(self.config)],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=env,
            )
        assert self.proc.stdout is not None
        found = wait_for_ready_line(self.proc)
        if found is None:
            self.stop()
            raise AssertionError(f"relaygate serve did not start:\n{self.log()}")
        self.ready_line = found

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def children(self) -> list[int]:
        assert self.proc is not None
        return children_of(self.proc.pid)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(45)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            return None


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return sorted(out)


def kill_tree(pid: int) -> None:
    for child in children_of(pid):
        with _suppress():
            os.kill(child, signal.SIGKILL)
    with _suppress():
        os.kill(pid, signal.SIGKILL)


def _suppress() -> contextlib.suppress:
    return contextlib.suppress(ProcessLookupError, PermissionError)


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def established_inodes(port: int) -> set[str]:
    """Socket inodes of ESTABLISHED TCP connections whose local port is `port` (IPv4)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, state, inode = parts[1], parts[3], parts[9]
        if state == "01" and int(local.split(":")[1], 16) == port:
            inodes.add(inode)
    return inodes


def connections_per_pid(pids: list[int], port: int) -> dict[int, int]:
    inodes = established_inodes(port)
    counts = {}
    for pid in pids:
        n = 0
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    n += 1
        except OSError:
            pass
        counts[pid] = n
    return counts


def wait_until(predicate: Any, timeout: float = 20.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture
def serve(tmp_path: Path, sink: tuple[Sink, int]) -> Iterator[Any]:
    started: list[Served] = []

    def make(workers: int = 2, extra: str = "") -> Served:
        s = Served(tmp_path, sink[1], workers, extra)
        started.append(s)
        s.start()
        return s

    yield make
    for s in started:
        s.stop()


@contextlib.contextmanager
def held_clients(port: int, n: int, banner: str | None = None) -> Iterator[list[RawClient]]:
    """`n` connections greeted and held open together (from 127.0.0.10 on), closed on exit."""
    clients: list[RawClient] = []
    try:
        for i in range(n):
            c = RawClient(port, source=f"127.0.0.{10 + i % 40}", timeout=10)
            clients.append(c)
            reply = c.greet()
            assert reply.code == 250
            if banner is not None:
                assert banner in c.received.decode(), c.received
        yield clients
    finally:
        for c in clients:
            c.close()


def send_on(client: RawClient, message_id: str) -> None:
    client.cmd("MAIL FROM:<scanner@corp.example>", 250)
    client.cmd("RCPT TO:<someone@remote.example>", 250)
    client.cmd("DATA", 354)
    client.send(
        f"From: scanner@corp.example\r\nTo: someone@remote.example\r\n"
        f"Message-ID: {message_id}\r\nSubject: scan\r\n\r\npage\r\n.\r\n"
    )
    client.expect(250)


def send_many(port: int, ids: list[str]) -> None:
    """One connection per message, all held open together (so both workers get some)."""
    with held_clients(port, len(ids)) as clients:
        for client, mid in zip(clients, ids, strict=True):
            send_on(client, mid)


def stored(data: Path) -> list[tuple[str, str]]:
    """(message_id, status) of every message in the queue database (read-only)."""
    conn = sqlite3.connect(f"file:{data / 'queue' / 'queue.db'}?mode=ro", uri=True, timeout=10)
    try:
        return [
            (str(r[0]), str(r[1])) for r in conn.execute("SELECT message_id, status FROM messages")
        ]
    finally:
        conn.close()


def assert_delivered_once(sink: Sink, served: Served, ids: list[str]) -> None:
    assert wait_until(lambda: set(sink.count()) >= set(ids), timeout=60), (
        f"missing at the sink: {set(ids) - set(sink.count())}\n{served.log()[-3000:]}"
    )
    time.sleep(2.0)  # room for a duplicate delivery to show up
    counts = sink.count()
    assert {mid: counts[mid] for mid in ids} == dict.fromkeys(ids, 1)
    rows = [r for r in stored(served.data) if r[0] in ids]
    assert sorted(r[0] for r in rows) == sorted(ids)  # stored exactly once
    assert wait_until(
        lambda: all(s == "Delivered" for m, s in stored(served.data) if m in ids), timeout=10
    )


# -- tests ----------------------------------------------------------------------------------------


def test_workers_key_is_validated_with_the_key_named() -> None:
    for bad in ("0", "65", "-1", '"many"', "true", "1.5"):
        with pytest.raises(ConfigError) as exc:
            parse_text(f"[server]\nworkers = {bad}\n", "relaygate.toml")
        assert "server.workers" in str(exc.value)
        assert "1 to 64" in str(exc.value)
    assert parse_text("[server]\nworkers = 64\n", "x").server.workers == 64
    assert parse_text("[server]\n", "x").server.workers == 1
    auto = parse_text('[server]\nworkers = "auto"\n', "x").server.workers
    assert auto == max(1, min(64, len(os.sched_getaffinity(0))))


def test_workers_auto_counts_the_cpus_the_process_may_use() -> None:
    """ "auto" counted the machine's CPUs (os.cpu_count): `relaygate serve` pinned to one CPU
    (taskset, systemd's CPUAffinity=, a container's cpuset) started one worker per CPU of the
    host. It counts the CPUs of its affinity now, and a cgroup CPU quota lowers that."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("needs a machine with two CPUs to pin a process to one")
    code = (
        "import os; from relaygate.config import parse_text\n"
        f"os.sched_setaffinity(0, {{{cpus[0]}}})\n"
        "print(parse_text('[server]\\nworkers = \"auto\"\\n', 'x').server.workers)"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    assert out.stdout.decode().strip() == "1"

    from relaygate.config.loader import cgroup_cpu_quota

    assert cgroup_cpu_quota("max 100000") is None
    assert cgroup_cpu_quota("150000 100000") == 2  # CPUQuota=150%: two workers' worth, rounded up
    assert cgroup_cpu_quota("50000 100000") == 1
    assert cgroup_cpu_quota("") is None and cgroup_cpu_quota("garbage") is None


def test_one_worker_is_one_process(serve: Any) -> None:
    s = serve(workers=1)
    assert s.children() == []
    assert s.ready_line.startswith(b"RelayGate ready: SMTP 127.0.0.1:")
    assert b"workers" not in s.ready_line
    with RawClient(s.port, timeout=10) as c:
        assert c.greet().code == 250
    assert s.stop() == 0
    # the serving process tuned its garbage collector once started (relaygate.app.tune_gc)
    assert s.log().count("garbage collector: ") == 1, s.log()
    # ... and its allocator's thresholds for big messages (relaygate.malloc_tuning)
    assert s.log().count("malloc (glibc") == 1, s.log()


def test_connections_spread_over_both_workers_and_each_message_is_delivered_once(
    serve: Any, sink: tuple[Sink, int]
) -> None:
    s = serve(workers=2)
    assert s.ready_line.startswith(
        f"RelayGate ready: SMTP 127.0.0.1:{s.port}; admin http://127.0.0.1:{s.admin_port}".encode()
    )
    workers = s.children()
    assert len(workers) == 2
    assert s.log().count("garbage collector: ") == 2, s.log()  # each worker, not the supervisor
    assert s.log().count("malloc (glibc") == 2, s.log()

    with held_clients(s.port, 40) as clients:
        per_pid = connections_per_pid(workers, s.port)
        assert sum(per_pid.values()) == 40, per_pid
        assert all(n > 0 for n in per_pid.values()), per_pid  # both workers serve
        ids = [f"<spread-{i}@corp.example>" for i in range(len(clients))]
        for client, mid in zip(clients, ids, strict=True):
            send_on(client, mid)
    assert_delivered_once(sink[0], s, ids)

    # Each worker leases under its own name; the protocol log has both workers' sessions.
    log = s.log()
    assert "[w0]" in log and "[w1]" in log
    assert s.stop() == 0
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(OSError):
        RawClient(s.port, timeout=2)


def test_a_killed_worker_is_restarted_and_service_continues(
    serve: Any, sink: tuple[Sink, int]
) -> None:
    s = serve(workers=2)
    before = s.children()
    assert len(before) == 2
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    # (Connections the kernel queued on the victim's listener before it died are reset with it.)
    assert wait_until(lambda: f"(pid {victim}) exited unexpectedly" in s.log(), 10)

    # The survivor keeps serving while the supervisor restarts the other one.
    send_many(s.port, [f"<during-{i}@corp.example>" for i in range(5)])
    assert wait_until(lambda: len(s.children()) == 2 and victim not in s.children(), 30), s.log()[
        -3000:
    ]
    after = s.children()
    replacement = next(p for p in after if p not in before)
    # The replacement listens again: held connections land on both workers.
    assert wait_until(lambda: s.log().count("listening on 127.0.0.1") >= 3, 30), s.log()[-3000:]
    with held_clients(s.port, 40) as clients:
        per_pid = connections_per_pid(after, s.port)
        assert per_pid[replacement] > 0 and sum(per_pid.values()) == 40, per_pid
        ids = [f"<after-{i}@corp.example>" for i in range(len(clients))]
        for client, mid in zip(clients, ids, strict=True):
            send_on(client, mid)
    assert_delivered_once(sink[0], s, ids + [f"<during-{i}@corp.example>" for i in range(5)])
    assert s.stop() == 0


def test_a_hung_worker_is_killed_and_restarted(serve: Any, sink: tuple[Sink, int]) -> None:
    """A worker whose event loop stops (SIGSTOP stands in for a hang) sends no heartbeat: after
    server.worker_hang_timeout the supervisor kills it and starts another; before, it stayed,
    and the kernel kept handing it half of the new connections, unanswered."""
    s = serve(workers=2, extra='worker_hang_timeout = "00:00:02"')
    before = s.children()
    victim = before[1]
    time.sleep(1.5)  # heartbeats flow: nobody is killed for being quiet while healthy
    assert "has not answered" not in s.log()
    os.kill(victim, signal.SIGSTOP)
    try:
        assert wait_until(lambda: f"(pid {victim}) has not answered for" in s.log(), 15), s.log()
        assert wait_until(lambda: len(s.children()) == 2 and victim not in s.children(), 30)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    assert "server.worker_hang_timeout" in s.log()
    assert wait_until(lambda: s.log().count("listening on 127.0.0.1") >= 3, 30), s.log()[-3000:]
    ids = [f"<after-hang-{i}@corp.example>" for i in range(20)]
    send_many(s.port, ids)  # every connection answered: none lands on a hung worker
    assert_delivered_once(sink[0], s, ids)
    assert s.stop() == 0


@pytest.mark.parametrize(
    ("before", "after", "how"),
    [("00:01:00", "00:00:02", "sighup"), ("00:00:02", "00:01:00", "file")],
    ids=["lowered-by-sighup", "raised-in-the-file"],
)
def test_a_changed_worker_hang_timeout_kills_no_healthy_worker(
    serve: Any, before: str, after: str, how: str
) -> None:
    """The workers heartbeat at the pace of their configuration, which the supervisor's (read
    again only at a SIGHUP) may not match: lowered by a SIGHUP, the supervisor expected beats
    every 2 s from workers beating every 5 s, and killed every healthy worker at once. Raised in
    the file (the workers reload on their own, and now slow their beats down): the supervisor
    still expects 2 s."""
    s = serve(workers=2, extra=f'worker_hang_timeout = "{before}"')
    workers = s.children()
    s.server_extra = f'worker_hang_timeout = "{after}"'
    s.write_config("220 RelayGate")
    if how == "sighup":
        assert s.proc is not None
        s.proc.send_signal(signal.SIGHUP)
    assert wait_until(
        lambda: all(f"[w{i}]: configuration reloaded from" in s.log() for i in range(2)), 15
    ), s.log()[-3000:]
    time.sleep(12)
    assert "has not answered" not in s.log(), s.log()[-3000:]
    assert s.children() == workers
    assert s.stop() == 0


def test_sighup_reloads_every_worker(serve: Any) -> None:
    s = serve(workers=2)
    workers = s.children()
    with held_clients(s.port, 4, banner="RelayGate one"):
        pass

    # Change the banner but keep the file's stamp, so only the SIGHUP (not the file watcher) reloads.
    st = s.config.stat()
    s.write_config("220 RelayGate two")
    os.utime(s.config, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(
        lambda: all(f"[w{i}]: configuration reloaded from" in s.log() for i in range(len(workers))),
        15,
    ), s.log()[-3000:]
    with held_clients(s.port, 30, banner="RelayGate two"):
        per_pid = connections_per_pid(workers, s.port)
        assert all(n > 0 for n in per_pid.values()), per_pid
    assert s.children() == workers  # reloaded in place, not restarted
    assert s.stop() == 0


def test_workers_stop_when_the_supervisor_is_killed(serve: Any) -> None:
    s = serve(workers=2)
    workers = s.children()
    assert s.proc is not None
    s.proc.kill()
    s.proc.wait(10)
    try:
        assert wait_until(lambda: not any(alive(pid) for pid in workers), 30), s.log()[-3000:]
    finally:
        for pid in workers:
            with _suppress():
                os.kill(pid, signal.SIGKILL)


def test_per_source_limit_holds_across_workers(serve: Any) -> None:
    """One client address always reaches the same worker (a BPF program on the reuseport group),
    so max_inbound_connection_per_source (Exchange's default 20) holds for the whole relay, not
    per worker; other addresses still reach both workers."""
    s = serve(workers=2)
    workers = s.children()
    held: list[RawClient] = []
    refused = 0
    try:
        for _ in range(26):
            c = RawClient(s.port, source="127.0.0.9", timeout=10)
            reply = c.reply()
            assert reply is not None
            if reply.code == 220:
                held.append(c)
            else:
                assert reply.code == 421 and "4.3.2" in reply.lines[0], reply
                refused += 1
                c.close()
        assert (len(held), refused) == (20, 6)
        per_pid = connections_per_pid(workers, s.port)
        assert sorted(per_pid.values()) == [0, 20], per_pid  # all on one worker
        with held_clients(s.port, 20):  # 127.0.0.10 ... : both workers serve
            per_pid = connections_per_pid(workers, s.port)
            assert all(n > 0 for n in per_pid.values()), per_pid
    finally:
        for c in held:
            c.close()
    assert s.stop() == 0


def test_worker_balance_connection_spreads_one_address_over_both_workers(serve: Any) -> None:
    """`worker_balance = "connection"`: the kernel's own per-connection hash, so one busy client
    address uses every worker (its connection limits hold for the node: see
    test_connection_limits_hold_for_the_node_when_one_address_reaches_every_worker)."""
    s = serve(workers=2, extra='worker_balance = "connection"\n')
    workers = s.children()
    held = []
    try:
        for _ in range(16):
            c = RawClient(s.port, source="127.0.0.9", timeout=10)
            assert c.greet().code == 250
            held.append(c)
        per_pid = connections_per_pid(workers, s.port)
        assert sum(per_pid.values()) == 16 and all(n > 0 for n in per_pid.values()), per_pid
    finally:
        for c in held:
            c.close()
    assert s.stop() == 0


SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"


@pytest.mark.skipif(
    not os.access(SMTP_SOURCE, os.X_OK),
    reason="smtp-source not installed (Debian package postfix; `make debs`)",
)
@pytest.mark.timeout(240)
@pytest.mark.parametrize("transient_failures", [False, True], ids=["accepted", "some-451-first"])
def test_under_load_with_little_room_each_message_is_delivered_exactly_once(
    serve: Any, sink: tuple[Sink, int], transient_failures: bool
) -> None:
    """Postfix's smtp-source at 16 sessions against 2 workers that may deliver only 4 messages
    at once each, so new messages are often handed over without room and scans run all the
    time. Two races in the queue manager delivered some messages twice under such load: before
    the fix this test failed in 6 of 6 runs, with 4 to 27 of the 3,000 messages delivered twice
    (docs/benchmarks.md, thirteenth session). Every message must arrive exactly once, also when
    the smart host answers a third of the first attempts with 451 and the retries interleave with
    new messages (retries after 1 s)."""
    handler = sink[0]
    extra = 'worker_balance = "connection"\n\n[queue]\nmax_concurrent_deliveries = 4\n'
    if transient_failures:
        handler.defer_first = lambda mid: zlib.crc32(mid.encode()) % 3 == 0
        extra += 'transient_failure_retry_interval = "00:00:01"\n'
    s = serve(workers=2, extra=extra)
    total = 3000
    subprocess.run(
        [
            SMTP_SOURCE,
            *("-s", "16", "-m", str(total), "-l", "2048"),
            *("-f", "scanner@corp.example", "-t", "someone@remote.example"),
            f"127.0.0.1:{s.port}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert wait_until(lambda: len(handler.ids) >= total, timeout=120), (
        f"{len(handler.ids)} of {total} at the sink\n{s.log()[-3000:]}"
    )
    time.sleep(2.0)  # room for a late second delivery to show up
    counts = handler.count()
    twice = {mid: n for mid, n in counts.items() if n > 1}
    assert twice == {}, f"{len(twice)} delivered more than once, e.g. {list(twice.items())[:3]}"
    assert len(handler.ids) == total and len(counts) == total
    if transient_failures:
        assert len(handler.deferred) > total // 5  # the retries did happen
    assert wait_until(
        lambda: sorted(st for _m, st in stored(s.data)) == ["Delivered"] * total, timeout=20
    )


@pytest.mark.timeout(180)
def test_a_worker_killed_under_load_loses_nothing_that_got_a_250(
    serve: Any, sink: tuple[Sink, int]
) -> None:
    """8 clients send numbered messages (a new connection each) while worker 1 is killed with
    SIGKILL. The supervisor restarts it, and every message that got its 250 reaches the smart
    host: those the dead worker had stored, in flight or still waiting for a delivery slot
    (kept leased to it) are taken up again by its replacement under the same lease owner."""
    s = serve(
        workers=2, extra='worker_balance = "connection"\n\n[queue]\nmax_concurrent_deliveries = 2\n'
    )
    victim = s.children()[1]
    acked: list[str] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        for n in range(1, 61):
            mid = f"<kill-{k}-{n}@corp.example>"
            try:
                with smtplib.SMTP("127.0.0.1", s.port, timeout=10) as c:
                    c.sendmail(
                        "scanner@corp.example",
                        ["someone@remote.example"],
                        f"Message-ID: {mid}\r\nSubject: kill\r\n\r\npage {n}\r\n",
                    )
            except (OSError, smtplib.SMTPException):
                continue  # this connection was on the killed worker: no 250, no promise
            with lock:
                acked.append(mid)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    assert wait_until(lambda: len(acked) >= 80, timeout=30)
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(90)
    assert wait_until(lambda: victim not in s.children() and len(s.children()) == 2, 30)
    handler = sink[0]
    assert wait_until(lambda: set(acked) <= set(handler.ids), timeout=60), (
        f"{len(set(acked) - set(handler.ids))} acknowledged but not delivered\n{s.log()[-3000:]}"
    )
    assert len(acked) > 200  # the load went on around the kill
    # A delivery in flight when its worker died may be repeated (at least once); only those.
    twice = [mid for mid, n in handler.count().items() if n > 1]
    assert len(twice) <= 2, twice  # at most the dead worker's 2 delivery slots


def test_backoff_is_capped_after_a_long_crash_loop() -> None:
    """~1,100 failures in a row (hours of a crash loop): the supervisor still schedules a restart
    BACKOFF_MAX later instead of dying of an OverflowError (which would take the healthy workers
    down with it)."""
    from relaygate.workers import BACKOFF_MAX, Supervisor, _Worker

    class DeadProc:
        pid = 4242
        returncode = 1

        def poll(self) -> int:
            return 1

    sup = Supervisor.__new__(Supervisor)
    sup._sel = None  # type: ignore[assignment]
    sup._close_link = lambda w: None  # type: ignore[method-assign]
    w = _Worker(0)
    sup.workers = [w]
    w.failures = 1100
    w.proc = DeadProc()  # type: ignore[assignment]
    w.started = now = time.monotonic()
    sup._check(w, now)
    assert w.restart_at == pytest.approx(now + BACKOFF_MAX)
    assert w.failures == 1101 and w.proc is None


def test_sighup_with_an_out_of_range_value_keeps_the_supervisor_and_workers(serve: Any) -> None:
    """A time span too large for a timedelta used to escape the loader as an OverflowError: the
    supervisor's SIGHUP handler died of it and took every worker down. Now the reload is refused
    (once, by the supervisor, which offers the workers only a file it could read, naming the key)
    and the node keeps serving its running configuration."""
    s = serve(workers=2)
    workers = s.children()
    st = s.config.stat()
    s.config.write_text(
        s.config.read_text().replace(
            'connection_inactivity_timeout = "00:00:30"',
            'connection_inactivity_timeout = "00:00:30"\nconnection_timeout = "100000000000.00:00:00"',
        )
    )
    os.utime(s.config, ns=(st.st_atime_ns, st.st_mtime_ns))  # only the SIGHUP reloads
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "relaygate.workers: reload refused" in s.log(), 15), s.log()[-3000:]
    assert "connection_timeout" in s.log()
    time.sleep(0.5)
    assert s.proc.poll() is None, s.log()[-3000:]
    assert s.children() == workers
    with held_clients(s.port, 4, banner="RelayGate one"):
        pass
    assert s.stop() == 0
    assert "Traceback" not in s.log(), s.log()[-3000:]
    assert s.log().count("reload refused") == 1, s.log()[-3000:]


def test_a_worker_restarted_after_data_dir_moved_keeps_its_siblings_directory(
    serve: Any, sink: tuple[Sink, int]
) -> None:
    """server.data_dir edited in the file: the running workers keep theirs (the reload says it
    waits for a restart), and a worker restarted after a crash opens its siblings' queue, not a
    second SQLite queue in the new directory that the admin API and its siblings never see."""
    s = serve(workers=2)
    before = s.children()
    moved = s.tmp / "moved"
    running, s.data = s.data, moved
    s.write_config("220 RelayGate one")
    s.data = running
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    said = "server.data_dir changed: takes effect when relaygate serve restarts"
    assert wait_until(lambda: s.log().count(said) >= 2, 15), s.log()[-3000:]
    victim = before[1]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(s.children()) == 2 and victim not in s.children(), 30), s.log()[
        -3000:
    ]
    assert wait_until(lambda: s.log().count("listening on 127.0.0.1") >= 3, 30), s.log()[-3000:]
    assert not moved.exists()  # the restarted worker opened no queue there
    assert "this worker keeps the data directory of its siblings" in s.log()
    ids = [f"<moved-{i}@corp.example>" for i in range(8)]
    send_many(s.port, ids)
    assert_delivered_once(sink[0], s, ids)
    assert {mid for mid, _ in stored(running)} >= set(ids)
    assert not moved.exists()
    assert s.stop() == 0


def test_a_port_another_node_serves_with_workers_is_refused_at_start(
    serve: Any, tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """Two nodes (their own data_dir, so the node lock does not meet) given one port, both with
    workers: the listeners are SO_REUSEPORT, so the second node's workers joined the first's
    group, and it said ready while the first's steering program sent it nothing (or, once the
    first stopped, everything). The supervisor now checks each binding is free before it starts
    any worker, and refuses the start naming the binding and its connector."""
    first = serve(workers=2)
    other = tmp_path / "other"
    other.mkdir()
    second = Served(other, sink[1], 2)
    second.port = first.port
    second.write_config("220 RelayGate two")
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("RELAYGATE_CONFIG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(second.config)],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        cwd=other,
        env=env,
        timeout=60,
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 1, err[-3000:]
    assert b"RelayGate ready" not in proc.stdout
    assert f'cannot listen on 127.0.0.1:{first.port} (bindings of receive connector "Relay")' in (
        err
    ), err[-3000:]
    assert "Address already in use" in err
    assert "[w0]" not in err and "[w1]" not in err  # refused before any worker started
    with held_clients(first.port, 4, banner="RelayGate one"):
        pass
    assert first.stop() == 0


@contextlib.contextmanager
def stalled_next_hop() -> Iterator[int]:
    """A next hop whose port takes connections (the kernel's backlog) and never says a word: a
    delivery to it waits for its banner, far past any stop grace."""
    with socket.create_server(("127.0.0.1", 0), backlog=64) as listener:
        yield int(listener.getsockname()[1])


def refuses_connections(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_sigterm_stops_at_once_and_loses_nothing(tmp_path: Path, workers: int) -> None:
    """The first SIGTERM lets a message being received finish (5 s) and a delivery in flight
    finish (10 s); a second SIGTERM (or SIGINT: an impatient ^C) cuts both short and the process
    exits at once. It used to be ignored: the stop took its whole grace. The message that got
    its 250 is still in the queue, to be delivered at the next start."""
    with stalled_next_hop() as hop:
        s = Served(tmp_path, hop, workers)
        s.start()
        try:
            assert s.proc is not None
            mid = "<acked-before-stop@corp.example>"
            with RawClient(s.port, timeout=10) as done:
                done.greet()
                send_on(done, mid)  # its delivery hangs on the silent next hop
            held = RawClient(s.port, source="127.0.0.20", timeout=10)
            held.greet()
            held.cmd("MAIL FROM:<scanner@corp.example>", 250)
            held.cmd("RCPT TO:<someone@remote.example>", 250)
            held.cmd("DATA", 354)
            held.send("Subject: half a message\r\n\r\n")  # and never the final dot
            s.proc.send_signal(signal.SIGTERM)
            assert wait_until(lambda: refuses_connections(s.port), 10), s.log()[-3000:]
            assert s.proc.poll() is None  # the grace is running
            started = time.monotonic()
            s.proc.send_signal(signal.SIGINT)
            s.proc.wait(30)
            took = time.monotonic() - started
            held.close()
            assert took < 3.0, f"{took:.1f} s after the second signal\n{s.log()[-3000:]}"
            assert s.proc.returncode == 0, s.log()[-3000:]
            assert "second signal: stopping now" in s.log(), s.log()[-3000:]
            assert [m for m, _ in stored(s.data)] == [mid]  # acknowledged, kept, not delivered
            assert [st for _, st in stored(s.data)] != ["Delivered"]
        finally:
            if s.proc is not None and s.proc.poll() is None:
                kill_tree(s.proc.pid)


SECOND_CONNECTOR = """
[[receive_connectors]]
name = "Second"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"
"""


def test_a_listener_opened_after_workers_changed_in_the_file_steers_for_the_running_workers(
    serve: Any,
) -> None:
    """`workers` edited in the file waits for a restart, but a listener opened by a reload (a new
    binding; an implicit-TLS socket reopened for a renewed certificate) was given a steering
    program for the file's count: with 2 workers running and 4 in the file, the sources it sent
    to worker 2 or 3 (there is none) were spread by the kernel over both workers, and their
    per-source limits counted per worker. It steers for the workers that run."""
    s = serve(workers=2)
    workers = s.children()
    port2 = free_port()
    s.workers = 4
    s.write_config("220 RelayGate one")
    s.config.write_text(s.config.read_text() + SECOND_CONNECTOR.format(port=port2))
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: not refuses_connections(port2), 15), s.log()[-3000:]
    assert "server.workers changed from 2 to 4" in s.log()
    spread = {}
    for i in range(12):
        source = f"127.0.0.{60 + i}"
        clients = [RawClient(port2, source=source, timeout=10) for _ in range(6)]
        try:
            for c in clients:
                assert c.reply() is not None
            per_pid = connections_per_pid(workers, port2)
            if all(n > 0 for n in per_pid.values()):
                spread[source] = per_pid
        finally:
            for c in clients:
                c.close()
    assert not spread, spread  # each source on one worker
    assert s.stop() == 0


def _served_with_token_file(tmp_path: Path, sink_port: int) -> tuple[Served, Path]:
    """Two workers whose admin centre reads its token from a file (0600), not started yet."""
    s = Served(tmp_path, sink_port, 2)
    token = tmp_path / "api.token"
    token.write_text("a-long-enough-admin-token-0123456789\n")
    token.chmod(0o600)
    listen = f'listen = "127.0.0.1:{s.admin_port}"'
    s.config.write_text(
        s.config.read_text().replace(listen, f'{listen}\napi_token_file = "{token}"')
    )
    return s, token


def test_a_reload_worker_0_refuses_is_refused_by_every_worker(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """Worker 0 runs the admin centre and refuses a reload whose admin.api_token_file cannot be
    used (emptied by mistake); the other workers did not read it and took the file: half the
    clients then met the new configuration and half the old one, until the next reload. Every
    worker now refuses it, and the node keeps one configuration."""
    s, token = _served_with_token_file(tmp_path, sink[1])
    s.start()
    try:
        assert s.proc is not None
        token.write_text("")  # emptied by mistake, and the banner changed in the same edit
        text = s.config.read_text().replace("220 RelayGate one", "220 RelayGate two")
        edit_keeping_stamp(s.config, text)
        s.proc.send_signal(signal.SIGHUP)
        refused = "reload refused"
        reloaded = "configuration reloaded from"
        assert wait_until(lambda: s.log().count(refused) + s.log().count(reloaded) >= 2, 15), (
            s.log()[-3000:]
        )
        assert s.log().count(refused) == 2, s.log()[-3000:]
        with held_clients(s.port, 30, banner="RelayGate one"):
            pass
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def edit_keeping_stamp(path: Path, text: str) -> None:
    """Write `text` with the file's mtime and inode as they were: only a SIGHUP reloads it."""
    st = path.stat()
    with open(path, "r+", encoding="utf-8") as f:
        f.write(text)
        f.truncate()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "to-the-group"])
def test_a_stop_signal_to_every_process_stops_the_workers_gracefully(
    tmp_path: Path, sink: tuple[Sink, int], sig: int
) -> None:
    """A stop signal sent to every process of the node, not to the supervisor alone: a
    terminal's ^C (SIGINT to the process group), systemd with KillMode=control-group (its
    default, where the packaged unit says mixed), `pkill -f relaygate`. A worker took it as the
    first signal and the SIGTERM its supervisor passes on as a second one, and cut its sessions
    short. Only the supervisor's word (on the link) hurries a worker: a message being received
    is finished and acknowledged."""
    s = Served(tmp_path, sink[1], 2)
    s.start()
    try:
        assert s.proc is not None
        held = RawClient(s.port, source="127.0.0.20", timeout=10)
        held.greet()
        held.cmd("MAIL FROM:<scanner@corp.example>", 250)
        held.cmd("RCPT TO:<someone@remote.example>", 250)
        held.cmd("DATA", 354)
        held.send("Message-ID: <group-stop@corp.example>\r\nSubject: half\r\n\r\n")
        # Each process gets the signal; the supervisor's may be handled last (it was busy):
        # the workers' then came first, and the SIGTERM it passes on second.
        for worker in s.children():
            os.kill(worker, sig)
        time.sleep(0.5)  # a busy supervisor (nothing to wait for: the workers just stop)
        os.kill(s.proc.pid, sig)
        assert wait_until(lambda: refuses_connections(s.port), 10), s.log()[-3000:]
        held.send("the rest\r\n.\r\n")
        held.expect(250)
        held.close()
        assert s.proc.wait(45) == 0
        assert "second signal" not in s.log(), s.log()[-3000:]
        assert "<group-stop@corp.example>" in [m for m, _ in stored(s.data)]
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sighup_while_starting_is_no_stop(
    tmp_path: Path, sink: tuple[Sink, int], workers: int
) -> None:
    """SIGHUP (a reload: logrotate's postrotate, an administrator) before `relaygate serve` had
    its handler killed it (the default action), for instance during the up to 120 s it waits for
    the workers of a killed supervisor to finish. It is ignored until the handlers are in place
    (the file watchers take any edit made meanwhile)."""
    s = Served(tmp_path, sink[1], workers)
    lock_path = s.data / "relaygate.lock"
    s.data.mkdir(parents=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], text=True,
                          capture_output=True, check=True)  # fmt: skip
    lock_path.write_text(gone.stdout)  # the pid of a supervisor that is gone
    holder = os.open(lock_path, os.O_RDWR)  # its orphaned workers hold the lock
    import fcntl

    fcntl.flock(holder, fcntl.LOCK_EX)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    env.pop("RELAYGATE_CONFIG", None)
    with open(s.stderr, "ab") as err:
        s.proc = subprocess.Popen(
            [sys.executable, "-m", "relaygate", "serve", "--config", str(s.config)],
            stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env,
        )  # fmt: skip
    try:
        assert wait_until(lambda: "waiting for the workers of relaygate serve" in s.log(), 30), (
            s.log()[-3000:]
        )
        s.write_config("220 RelayGate edited while starting")
        s.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # time for the signal's default action, if it is still in place
        assert s.proc.poll() is None, f"status {s.proc.returncode}\n{s.log()[-3000:]}"
        os.close(holder)  # the orphans exit
        holder = -1
        assert wait_for_ready_line(s.proc) is not None, s.log()[-3000:]

        def banner() -> str:
            with RawClient(s.port, timeout=10) as c:
                return c.received.decode() if c.greet().code == 250 else ""

        # the edit is taken (a single process read the file before the wait)
        assert wait_until(lambda: "edited while starting" in banner(), 10), s.log()[-3000:]
        assert s.stop() == 0
    finally:
        if holder >= 0:
            os.close(holder)
        if s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_a_worker_whose_supervisor_died_while_it_started_stops_cleanly(serve: Any) -> None:
    """The supervisor killed while a worker it had just (re)started was still starting: the
    worker's ready line met a closed link, and it died of the BrokenPipeError, a traceback and
    no orderly stop (its store, its logs). It stops as a worker whose supervisor is gone does."""
    s = serve(workers=2)
    before = s.children()
    os.kill(before[1], signal.SIGKILL)
    new: list[int] = []

    def restarted() -> bool:
        new[:] = [p for p in s.children() if p not in before]
        return bool(new)

    assert wait_until(restarted, 30, interval=0.02), s.log()[-3000:]
    starting = new[0]
    os.kill(starting, signal.SIGSTOP)  # still starting (the interpreter alone takes longer)
    assert s.proc is not None
    s.proc.kill()
    s.proc.wait(10)
    os.kill(starting, signal.SIGCONT)
    try:
        assert wait_until(lambda: not alive(starting) and not alive(before[0]), 30), s.log()[-3000:]
        said = f"supervisor gone: worker {starting} stops"
        assert wait_until(lambda: said in s.log(), 10), s.log()[-3000:]
        assert "Traceback" not in s.log(), s.log()[-3000:]
    finally:
        for pid in (starting, before[0]):
            with _suppress():
                os.kill(pid, signal.SIGKILL)
