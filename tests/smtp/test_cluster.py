"""Cluster mode (DESIGN.md decision 3): several `relaygate serve` nodes share one PostgreSQL
queue. Real processes, a real PostgreSQL server, real SMTP clients and a real SMTP sink: any
node delivers any message, each once, and the messages a dead node held move to a live node
when its leases expire."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import smtplib
import threading
import time
from collections import Counter
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import psycopg
import tomlkit
from aiosmtpd.controller import Controller

from relaygate.config.loader import load_config
from tests.smtp.conftest import RelayHandle, relay_connector
from tests.smtp.helpers import free_port
from tests.support.postgres import PostgresServer

# `postgres_url` comes before `relay` in each test's arguments: torn down in reverse order, the
# relays stop before their database is dropped.

MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>", re.MULTILINE | re.IGNORECASE)


class Sink:
    """An aiosmtpd smart host on loopback that counts each Message-ID it accepts. While `hold`
    is set it keeps every session waiting at MAIL FROM (a next hop that hangs), so the deliveries
    of a node stay in flight, their messages leased."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: Counter[str] = Counter()
        self.hold = threading.Event()
        self.held = 0
        self.controller = Controller(self, hostname="127.0.0.1", port=free_port())

    async def handle_MAIL(self, server, session, envelope, address, options):  # type: ignore[no-untyped-def]
        if self.hold.is_set():
            with self.lock:
                self.held += 1
            deadline = time.monotonic() + 60
            while self.hold.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        envelope.mail_from = address
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        m = MESSAGE_ID.search(envelope.original_content or envelope.content)
        with self.lock:
            self.received[m.group(1).decode() if m else "?"] += 1
        return "250 2.0.0 Ok: queued"

    def wait_for(self, ids: set[str], timeout: float) -> set[str]:
        """Wait until every Message-ID in `ids` has arrived; returns those still missing."""
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                missing = {i for i in ids if not self.received[i]}
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.1)


def start_node(
    relay: Any, name: str, url: str, sink: Sink, *, workers: int = 1, start: bool = True
) -> RelayHandle:
    node: RelayHandle = relay(
        [relay_connector(["127.0.0.0/24"])],
        mode="process",
        server={"name": name, "workers": workers},
        queue={
            "store": "postgresql",
            "database_url": url,
            "lease_duration": "00:00:03",
            "transient_failure_retry_interval": "00:00:01",
            "message_retry_interval": "00:00:01",
        },
        start=False,
    )
    node.doc["send_connectors"][0]["port"] = sink.controller.port
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.config = load_config(node.config_path)
    if start:
        node.start()
    return node


def send(node: RelayHandle, ids: list[str], source: str = "127.0.0.5") -> None:
    with node.smtp(source=source) as client:
        for mid in ids:
            msg = EmailMessage()
            msg["From"] = "scanner@corp.example"
            msg["To"] = "user@corp.example"
            msg["Subject"] = f"scan {mid}"
            msg["Message-ID"] = f"<{mid}>"
            msg.set_content(f"page for {mid}\n")
            client.send_message(msg)  # raises unless every recipient got a 250


def leases(url: str) -> Counter[str]:
    """Live leases per owner, read from the shared database."""
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT lease_owner FROM messages WHERE lease_owner IS NOT NULL "
            "AND lease_until > extract(epoch FROM now())"
        ).fetchall()
    return Counter(r[0] for r in rows)


def test_two_nodes_share_one_queue_and_deliver_each_message_once(postgres_url, relay) -> None:  # type: ignore[no-untyped-def]
    sink = Sink()
    sink.controller.start()
    try:
        a = start_node(relay, "NODE-A", postgres_url, sink)
        b = start_node(relay, "NODE-B", postgres_url, sink, workers=2)  # 3 queue managers
        via_a = [f"a{i}@cluster.test" for i in range(25)]
        via_b = [f"b{i}@cluster.test" for i in range(25)]
        senders = [
            threading.Thread(target=send, args=(a, via_a[:12], "127.0.0.5")),
            threading.Thread(target=send, args=(a, via_a[12:], "127.0.0.6")),
            threading.Thread(target=send, args=(b, via_b[:12], "127.0.0.7")),
            threading.Thread(target=send, args=(b, via_b[12:], "127.0.0.8")),
        ]
        for t in senders:
            t.start()
        for t in senders:
            t.join(60)
        missing = sink.wait_for(set(via_a + via_b), timeout=30)
        assert not missing, f"never delivered: {sorted(missing)}"
        time.sleep(2)  # a duplicate would come from a second lease: give it time to show
        with sink.lock:
            twice = {k: n for k, n in sink.received.items() if n > 1}
            assert sum(sink.received.values()) == 50, sink.received
        assert not twice, f"delivered more than once: {twice}"
        with psycopg.connect(postgres_url) as conn:
            rows = conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall()
        assert dict(rows) == {"Delivered": 50}
    finally:
        sink.controller.stop()


def test_a_dead_nodes_messages_are_delivered_by_another_node(postgres_url, relay) -> None:  # type: ignore[no-untyped-def]
    """NODE-A accepts 10 messages and starts delivering them to a next hop that hangs; it is
    SIGKILLed with every message leased to it. NODE-B, started afterwards, leaves them alone while
    A's leases live and delivers all of them once they expire (queue.lease_duration = 3 s)."""
    sink = Sink()
    sink.controller.start()
    try:
        sink.hold.set()
        a = start_node(relay, "NODE-A", postgres_url, sink)
        ids = [f"orphan{i}@cluster.test" for i in range(10)]
        send(a, ids)
        deadline = time.monotonic() + 15
        while sink.held == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sink.held, "NODE-A never started delivering"
        held_by_a = leases(postgres_url)
        assert sum(held_by_a.values()) == 10, held_by_a
        assert all(owner.startswith("NODE-A") for owner in held_by_a), held_by_a
        a.kill()
        killed_at = time.monotonic()
        sink.hold.clear()
        b = start_node(relay, "NODE-B", postgres_url, sink)
        assert b.proc is not None
        missing = sink.wait_for(set(ids), timeout=30)
        took = time.monotonic() - killed_at
        assert not missing, f"NODE-B never delivered {sorted(missing)}"
        # Not before A's leases ran out: A renews its leases every second (a third of 3 s), so
        # they end at most 3 s after the kill; B must not have taken them while they lived.
        with sink.lock:
            assert all(sink.received[i] == 1 for i in ids), sink.received
        assert took < 30
        # Each result (and the end of its lease) is recorded just after the sink's 250.
        deadline = time.monotonic() + 10
        while leases(postgres_url) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not leases(postgres_url), "leases left after every message was delivered"
    finally:
        sink.hold.clear()
        sink.controller.stop()


def test_a_database_outage_is_a_temporary_failure_and_the_relay_recovers(relay) -> None:  # type: ignore[no-untyped-def]
    """The database server crashes while a node runs: a client gets 451 4.3.0 (try again
    later; nothing acknowledged that is not stored), the node logs the reason without a
    traceback and keeps running; once the server is back, mail flows again with no restart."""
    sink = Sink()
    sink.controller.start()
    try:
        with PostgresServer() as server:
            url = server.create_database()
            a = start_node(relay, "NODE-A", url + "?connect_timeout=2", sink)
            send(a, ["before@cluster.test"])
            assert not sink.wait_for({"before@cluster.test"}, timeout=15)
            server.crash()
            with a.smtp(timeout=30) as client:
                client.ehlo()
                client.mail("scanner@corp.example")
                client.rcpt("user@corp.example")
                code, text = client.data(b"Message-ID: <during@cluster.test>\r\n\r\nx\r\n")
            assert code == 451 and text.startswith(b"4.3.0"), (code, text)
            server.restart()
            deadline = time.monotonic() + 40
            while True:  # the first calls after the restart may still meet a dropped connection
                try:
                    send(a, ["after@cluster.test"])
                    break
                except smtplib.SMTPDataError as exc:
                    assert exc.smtp_code == 451 and time.monotonic() < deadline, exc
                    time.sleep(0.5)
            assert not sink.wait_for({"after@cluster.test"}, timeout=20)
            with sink.lock:
                assert sink.received["during@cluster.test"] == 0
            assert a.proc is not None and a.proc.poll() is None, "the node stopped"
            a.stop()
            log = a.stderr_path.read_text(errors="replace")
            assert "queue database" in log, log[-2000:]
    finally:
        sink.controller.stop()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def test_a_restarted_worker_keeps_the_queue_its_node_started_with(postgres_url, relay) -> None:  # type: ignore[no-untyped-def]
    """queue.store changed by a reload "takes effect when relaygate serve restarts": a worker
    the supervisor restarts meanwhile (it crashed) must not open the new queue while its
    siblings and the admin API stay on the old one (its messages would be in a queue nobody
    else on the node sees)."""
    node = relay([relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": 2})
    assert node.proc is not None
    node.doc["queue"]["store"] = "postgresql"
    node.doc["queue"]["database_url"] = postgres_url
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    workers = _children(node.proc.pid)
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    deadline = time.monotonic() + 20
    while len(set(_children(node.proc.pid)) - set(workers)) < 1:
        assert time.monotonic() < deadline, "the worker was not restarted"
        time.sleep(0.2)
    time.sleep(2)  # listening again
    for i in range(20):  # the kernel spreads connections over both workers
        with node.smtp() as client:
            client.sendmail(
                "a@corp.example", ["user@corp.example"], b"Subject: %d\r\n\r\nx\r\n" % i
            )
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT to_regclass('messages') IS NOT NULL").fetchone()
        in_postgres = (
            conn.execute("SELECT count(*) FROM messages").fetchone()[0]  # type: ignore[index]
            if row and row[0]
            else 0
        )
    assert in_postgres == 0
    assert len(node.messages()) == 20  # node.config: the SQLite queue it started with
