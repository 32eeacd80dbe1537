"""File descriptors (relaygate/fd_limit.py): `relaygate serve` raises its soft RLIMIT_NOFILE to the
hard limit, so connections its connectors allow are not cut off at a low soft limit (uvloop then
accepts and drops them without a reply), and it names the keys when the hard limit is too low."""

from __future__ import annotations

import collections
import re
import socket
from pathlib import Path

from relaygate.config.loader import parse_config
from relaygate.fd_limit import RESERVED, descriptors_needed
from tests.smtp.conftest import build_doc, relay, relay_connector  # noqa: F401


def first_replies(port: int, count: int) -> collections.Counter[str]:
    """Open `count` connections at once (10 per source address), then read each one's first reply
    code ("EOF" when the connection was closed without one)."""
    clients = []
    try:
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(s)
            s.settimeout(10)
            s.bind((f"127.0.3.{i // 10 + 1}", 0))
            s.connect(("127.0.0.1", port))
        replies: collections.Counter[str] = collections.Counter()
        for s in clients:
            data = s.recv(512)
            replies[data[:3].decode() if data else "EOF"] += 1
        return replies
    finally:
        for s in clients:
            s.close()


def soft_limit(pid: int) -> int:
    limits = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max open files\s+(\d+)\s+(\d+)", limits, re.M)
    assert match, limits
    return int(match.group(1))


def test_connections_past_a_low_soft_limit_get_their_banner(relay):  # noqa: F811
    # A soft limit of 200 holds ~170 connections; the hard limit (4096) holds the 300.
    r = relay([relay_connector(["127.0.0.0/8"])], mode="process", nofile=(200, 4096))
    assert r.proc is not None
    assert soft_limit(r.proc.pid) == 4096
    assert first_replies(r.port, 300) == {"220": 300}
    assert "file descriptor limit raised from 200 to 4096" in r.stderr_path.read_text()


def test_a_hard_limit_below_what_the_connectors_allow_is_named_at_start(relay):  # noqa: F811
    r = relay(
        [relay_connector(["127.0.0.0/8"], name="Printers", max_inbound_connection=1000)],
        mode="process",
        nofile=(300, 300),
    )
    assert r.proc is not None
    log = r.stderr_path.read_text()
    needed = 1000 + 20 + RESERVED  # the connector, queue.max_concurrent_deliveries (default 20)
    assert f"file descriptor limit 300 (hard limit 300) is below the {needed}" in log
    assert "max_inbound_connection: 'Printers' 1000" in log
    assert "LimitNOFILE=" in log
    # and it still serves what the limit allows
    assert first_replies(r.port, 20) == {"220": 20}


def test_a_sufficient_limit_is_not_warned_about(relay):  # noqa: F811
    r = relay(
        [
            relay_connector(
                ["127.0.0.0/8"],
                max_inbound_connection=100,
                max_inbound_connection_percentage_per_source=100,  # 10 per address below
            )
        ],
        mode="process",
        nofile=(600, 600),  # 100 + 20 + RESERVED fit
    )
    assert r.proc is not None
    assert first_replies(r.port, 20) == {"220": 20}
    assert "file descriptor limit" not in r.stderr_path.read_text()


def test_descriptors_needed_sums_the_enabled_connectors(tmp_path):
    def needed(*connectors: dict[str, object], deliveries: int = 20) -> int | None:
        doc = build_doc(tmp_path, list(connectors), [2525, 2526, 2527])
        doc["queue"]["max_concurrent_deliveries"] = deliveries
        return descriptors_needed(parse_config(doc))

    a = relay_connector(name="A", max_inbound_connection=100)
    b = relay_connector(name="B", max_inbound_connection=50, bindings=["127.0.0.1:{port2}"])
    off = relay_connector(
        name="Off", max_inbound_connection=9000, enabled=False, bindings=["127.0.0.1:{port3}"]
    )
    assert needed(a, b, off) == 150 + 20 + RESERVED
    assert needed(a, deliveries=300) == 100 + 300 + RESERVED
    unlimited = relay_connector(name="U", max_inbound_connection="Unlimited")
    assert needed(unlimited) is None


def test_the_accept_loop_survives_running_out_of_descriptors(relay):  # noqa: F811
    """Security-bar item 133: more connections than descriptors (a hard limit of 128, 300
    connections held open at once): the relay answers those it can, the others are closed or
    wait, and once they are gone it serves new clients again: the listener was not lost to
    EMFILE, and no traceback was logged (the fixture checks serve's stderr)."""
    r = relay(
        [relay_connector(["127.0.0.0/8"], max_inbound_connection=1000)],
        mode="process",
        nofile=(128, 128),
    )
    assert r.proc is not None
    clients = []
    try:
        for i in range(300):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(s)
            s.settimeout(3)
            s.bind((f"127.0.4.{i // 10 + 1}", 0))
            s.connect(("127.0.0.1", r.port))  # completes in the kernel's accept queue
        answered = 0
        for s in clients:
            try:
                answered += s.recv(512).startswith(b"220")
            except OSError:  # a timeout or a reset: never accepted while the table was full
                pass
        assert 0 < answered < 300
    finally:
        for s in clients:
            s.close()
    assert r.proc.poll() is None, "relaygate serve died"
    # the burst is gone: every new client is served again
    deadline = 20
    got = first_replies(r.port, 20)
    while got != {"220": 20} and deadline > 0:
        deadline -= 1
        got = first_replies(r.port, 20)
    assert got == {"220": 20}
