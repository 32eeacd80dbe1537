"""message_rate_limit with `server.workers = 2`: one count per node, whatever worker a session is on.

`relaygate serve` as a subprocess, clients on 127.0.0.x. Which worker holds a connection is read
from /proc (tests/workers/test_workers.py `connections_per_pid`): each test opens its connections
first, checks that both workers hold some, then sends one message on each, alternating between
the workers, so per-worker counting would accept up to twice the limit.
"""

from __future__ import annotations

import json
import os
import signal
import time
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from argon2 import PasswordHasher

from tests.smtp.helpers import RawClient
from tests.workers.test_workers import (  # noqa: F401 (the sink fixture)
    Served,
    Sink,
    sink,
    wait_until,
)

PASSWORD = "correct horse battery staple"
LIMIT = 4
REFUSED = "421 4.4.2 Message submission rate for this client has exceeded the configured limit"

CONFIG = """\
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
data_dir = "{data}"
workers = {workers}
{server_extra}

[admin]
enabled = false

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Client Submission"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = {auth}
permission_groups = {groups}
tarpit_interval = "00:00:00"
protocol_logging_level = "Verbose"
connection_inactivity_timeout = "00:00:30"
# Above open_on_both_workers' 40 from one address: with worker_balance = "connection" the kernel
# spreads them at random, and 20 (the default) left a worker with fewer than LIMIT now and then.
max_inbound_connection_per_source = 60
banner = "{banner}"
message_rate_limit = {limit}
message_rate_source = "{rate_source}"
{permissions}

[[send_connectors]]
name = "Sink"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1"]
port = {sink_port}
"""

ANONYMOUS_RELAY = """
[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
"""


class RateServed(Served):
    """`Served` with a rate-limited connector: authenticated users (`rate_source` User or All)
    or anonymous relay (IPAddress)."""

    def __init__(self, tmp: Path, sink_port: int, *, rate_source: str, server_extra: str) -> None:
        self.rate_source = rate_source
        self.limit = LIMIT
        super().__init__(tmp, sink_port, 2, server_extra)

    def write_config(self, banner: str) -> None:
        auth = self.rate_source in ("User", "All")
        self.config.write_text(
            CONFIG.format(
                data=self.data,
                workers=self.workers,
                server_extra=self.server_extra,
                port=self.port,
                banner=banner,
                sink_port=self.sink_port,
                limit=self.limit,
                rate_source=self.rate_source,
                auth='["Tls", "BasicAuth"]' if auth else '["None"]',
                groups='["ExchangeUsers"]' if auth else '["AnonymousUsers"]',
                permissions="" if auth else ANONYMOUS_RELAY,
            )
        )


def add_users(data: Path, *names: str) -> None:
    """The users file `relaygate user add` writes, with cheap argon2 parameters (the server reads
    the parameters from each hash, so it verifies them as it would production ones, faster)."""
    hasher = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    data.mkdir(parents=True, exist_ok=True)
    users = {name: hasher.hash(PASSWORD) for name in names}
    (data / "users.json").write_text(json.dumps({"users": users}))


@pytest.fixture
def rate_serve(tmp_path: Path, sink: tuple[Sink, int]) -> Iterator[Any]:  # noqa: F811
    started: list[RateServed] = []

    def make(rate_source: str, extra: str = "") -> RateServed:
        s = RateServed(tmp_path, sink[1], rate_source=rate_source, server_extra=extra)
        add_users(s.data, "scanner", "printer")
        started.append(s)
        s.start()
        return s

    yield make
    for s in started:
        s.stop()


def worker_of(client: RawClient, workers: list[int], port: int) -> int:
    """The pid of the worker holding `client`'s connection (greeted, so accepted)."""
    local_port = client.sock.getsockname()[1]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for pid in workers:
            if _holds(pid, local_port, port):
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no worker holds the connection from port {local_port}")


def _holds(pid: int, client_port: int, port: int) -> bool:
    """`pid` has a socket of the ESTABLISHED connection (local `port`, remote `client_port`)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
        if (
            state == "01"
            and int(local.split(":")[1], 16) == port
            and int(remote.split(":")[1], 16) == client_port
        ):
            inodes.add(inode)
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            target = fd.readlink()
        except OSError:
            continue
        if str(target).startswith("socket:[") and str(target)[8:-1] in inodes:
            return True
    return False


def open_on_both_workers(
    s: Served, sources: list[str], *, user: str | None, at_most: int = 24, each: int = LIMIT
) -> list[tuple[RawClient, int]]:
    """Connections (greeted, authenticated as `user` if given) from `sources` in turn until each
    worker holds at least `each` of them; returned alternating between the workers."""
    workers = s.children()
    assert len(workers) == 2, workers
    per: dict[int, list[RawClient]] = {pid: [] for pid in workers}
    opened: list[RawClient] = []
    try:
        for i in range(at_most):
            c = RawClient(s.port, source=sources[i % len(sources)], timeout=10)
            opened.append(c)
            c.greet()
            if user is not None:
                token = b64encode(f"\0{user}\0{PASSWORD}".encode()).decode()
                c.cmd("AUTH PLAIN " + token, 235)
            per[worker_of(c, workers, s.port)].append(c)
            if all(len(v) >= each for v in per.values()):
                break
        assert all(len(v) >= each for v in per.values()), {p: len(v) for p, v in per.items()}
    except BaseException:
        for c in opened:
            c.close()
        raise
    # `each` on each worker, alternating: the first two on both workers
    (pid_a, on_a), (pid_b, on_b) = per.items()
    out = [
        pair
        for a, b in zip(on_a[:each], on_b[:each], strict=True)
        for pair in ((a, pid_a), (b, pid_b))
    ]
    for c in opened:  # the extra ones
        if all(c is not d for d, _ in out):
            c.close()
    return out


def send_one(c: RawClient, sender: str, message_id: str) -> str:
    """MAIL ... DATA on `c`: the MAIL reply's text when refused, else the final reply's code."""
    reply = c.cmd(f"MAIL FROM:<{sender}>")
    if reply.code != 250:
        return reply.text
    c.cmd("RCPT TO:<someone@remote.example>", 250)
    c.cmd("DATA", 354)
    c.send(f"From: {sender}\r\nMessage-ID: {message_id}\r\nSubject: rate\r\n\r\nx\r\n.\r\n")
    return str(c.expect(250).code)


def test_user_rate_limit_holds_across_workers(rate_serve: Any) -> None:
    """message_rate_source = "User": one user from several addresses, which the steering program
    puts on both workers, sends LIMIT messages in the minute and no more, whatever worker each
    session is on; another user still sends. Per-worker counts accepted 2 × LIMIT."""
    s = rate_serve("User")
    sources = [f"127.0.0.{n}" for n in range(5, 13)]
    clients = open_on_both_workers(s, sources, user="scanner")
    try:
        results = [
            send_one(c, "scanner@corp.example", f"<u{i}@corp.example>")
            for i, (c, _pid) in enumerate(clients)
        ]
        assert len({pid for _c, pid in clients[: LIMIT + 1]}) == 2  # the first LIMIT+1 used both
    finally:
        for c, _pid in clients:
            c.close()
    assert results == ["250"] * LIMIT + [REFUSED] * (len(results) - LIMIT), (
        f"{results.count('250')} of {len(results)} accepted: {results}"
    )
    # another user on both workers is not affected
    others = open_on_both_workers(s, sources, user="printer")
    try:
        assert send_one(others[0][0], "printer@corp.example", "<p0@corp.example>") == "250"
        assert send_one(others[1][0], "printer@corp.example", "<p1@corp.example>") == "250"
    finally:
        for c, _pid in others:
            c.close()
    assert s.stop() == 0


def test_ip_rate_limit_holds_across_workers_with_connection_balance(rate_serve: Any) -> None:
    """worker_balance = "connection" spreads one address over both workers: its IPAddress count
    is still one per node. Per-worker counts accepted 2 × LIMIT."""
    s = rate_serve("IPAddress", 'worker_balance = "connection"')
    clients = open_on_both_workers(s, ["127.0.0.9"], user=None, at_most=40)
    try:
        results = [
            send_one(c, "app@corp.example", f"<ip{i}@corp.example>")
            for i, (c, _pid) in enumerate(clients)
        ]
    finally:
        for c, _pid in clients:
            c.close()
    assert results == ["250"] * LIMIT + [REFUSED] * (len(results) - LIMIT), (
        f"{results.count('250')} of {len(results)} accepted: {results}"
    )
    with RawClient(s.port, source="127.0.0.10", timeout=10) as c:  # another address is not
        c.greet()
        assert send_one(c, "app@corp.example", "<other@corp.example>") == "250"
    assert s.stop() == 0


def test_counts_follow_a_reload_survive_a_worker_restart_and_start_afresh(
    rate_serve: Any, tmp_path: Path
) -> None:
    """A reload changes the limit, not the counts; a restarted worker maps the same table (its
    predecessor's counts stay); a new `relaygate serve` starts from an empty table, whatever file
    a previous run (or anything else) left there."""
    stale = tmp_path / "data" / "run" / "message-rates"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"not a rate table" * 100)
    s = rate_serve("User")
    sources = [f"127.0.0.{n}" for n in range(5, 13)]

    def send(n: int) -> list[str]:
        """`n` messages from scanner, alternating between the workers."""
        clients = open_on_both_workers(s, sources, user="scanner", each=(n + 1) // 2)
        try:
            return [
                send_one(c, "scanner@corp.example", f"<r{time.monotonic_ns()}@corp.example>")
                for c, _pid in clients[:n]
            ]
        finally:
            for c, _pid in clients:
                c.close()

    assert send(2) == ["250", "250"]
    s.limit = 3  # the SIGHUP reloads every worker (the file watcher may too)
    s.write_config("220 RelayGate two")
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(
        lambda: all(f"[w{i}]: configuration reloaded from" in s.log() for i in range(2)), 15
    ), s.log()[-3000:]
    assert send(2) == ["250", REFUSED]  # 2 counted before the reload + 1 = the new limit

    victim = s.children()[0]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: len(s.children()) == 2 and victim not in s.children(), 30)
    assert wait_until(lambda: s.log().count("listening on 127.0.0.1") >= 3, 30), s.log()[-3000:]
    assert send(2) == [REFUSED, REFUSED]  # the replacement sees the counts
    assert s.stop() == 0

    s.start()  # a new run: a new, empty table
    assert send(4) == ["250", "250", "250", REFUSED]
    assert s.stop() == 0
