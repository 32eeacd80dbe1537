"""/metrics: what the receive connectors took and refused, and the figures of every worker of a
node summed (only worker 0 runs the admin listener). Real `relaygate serve`, real SMTP clients,
a real SMTP sink, the metrics read over HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import time
from typing import Any

import httpx
import pytest
import tomlkit

from relaygate.config.loader import load_config
from tests.smtp.conftest import RelayHandle, default_frontend, relay_connector
from tests.smtp.test_cluster import Sink


def with_admin_and_sink(node: RelayHandle, sink: Sink) -> RelayHandle:
    node.doc["admin"]["enabled"] = True
    node.doc["send_connectors"][0]["port"] = sink.controller.port
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.config = load_config(node.config_path)
    return node.start()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text, None if absent."""
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as the client sorts them
    pattern = re.escape(f"{name}{{{inner}}}" if inner else name) + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else None


def scrape(node: RelayHandle) -> str:
    listen = node.doc["admin"]["listen"]
    return httpx.get(f"http://{listen}/metrics", timeout=10).text


def wait_metric(node: RelayHandle, want: float, name: str, **labels: str) -> str:
    deadline = time.monotonic() + 20
    while True:
        text = scrape(node)
        if metric(text, name, **labels) == want or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_received_and_refused_are_counted_per_connector(relay: Any) -> None:
    sink = Sink()
    sink.controller.start()
    try:
        node = relay(
            [
                relay_connector(["127.0.0.5"]),
                default_frontend(
                    bindings=["127.0.0.1:{port2}"], max_inbound_connection_per_source=1
                ),
            ],
            mode="process",
            start=False,
        )
        with_admin_and_sink(node, sink)
        with node.smtp(source="127.0.0.5") as client:
            for i in range(3):
                client.sendmail("scanner@corp.example", ["a@example.net"], b"x" * (100 + i))
        with smtplib.SMTP("127.0.0.1", node.ports[1], source_address=("127.0.0.9", 0)) as front:
            front.ehlo("front.test")
            front.mail("someone@example.org")
            code, _ = front.rcpt("victim@example.net")  # no relay right: 550 5.7.54
            assert code == 550
            # the per-source limit is 1: a second connection from 127.0.0.9 gets a 421
            with smtplib.SMTP() as second:
                second.source_address = ("127.0.0.9", 0)
                code, _ = second.connect("127.0.0.1", node.ports[1])
                assert code == 421
        text = scrape(node)
        relay_name, front_name = "SMTP Relay Internal", "Default Frontend"
        assert metric(text, "relaygate_smtp_messages_received_total", connector=relay_name) == 3
        received = metric(text, "relaygate_smtp_received_bytes_total", connector=relay_name)
        assert received is not None and received > 3 * 100  # the Received header is counted
        assert metric(text, "relaygate_smtp_sessions_admitted_total", connector=relay_name) == 1
        assert metric(text, "relaygate_smtp_sessions_admitted_total", connector=front_name) == 1
        assert metric(text, "relaygate_smtp_connections_refused_total", connector=front_name) == 1
        refused = metric(
            text, "relaygate_smtp_refusals_total", connector=front_name, code="550", status="5.7.54"
        )
        assert refused == 1
        assert metric(text, "relaygate_smtp_messages_received_total", connector=front_name) is None
        # every counter of the queue manager reaches /metrics, pacing's too
        assert metric(text, "relaygate_delivery_recipients_total", outcome="paced") == 0
    finally:
        sink.controller.stop()


@pytest.mark.parametrize("workers", [2])
def test_the_workers_figures_are_summed(relay: Any, workers: int) -> None:
    """Each worker counts its own sessions and deliveries; /metrics (worker 0) showed only
    worker 0's, so a node with two workers reported about half of its mail."""
    sink = Sink()
    sink.controller.start()
    try:
        node = relay(
            [relay_connector(["127.0.0.0/24"])],
            mode="process",
            server={"workers": workers},
            queue={"transient_failure_retry_interval": "00:00:01"},
            start=False,
        )
        with_admin_and_sink(node, sink)
        sources = [f"127.0.0.{i}" for i in range(5, 13)]  # steered by address over the workers
        sent = 0
        for source in sources:
            with node.smtp(source=source) as client:
                for _ in range(2):
                    client.sendmail(
                        "scanner@corp.example", ["a@example.net"], b"Subject: m\r\n\r\nx"
                    )
                    sent += 1
        name = "SMTP Relay Internal"
        text = wait_metric(node, sent, "relaygate_delivery_recipients_total", outcome="delivered")
        assert metric(text, "relaygate_delivery_recipients_total", outcome="delivered") == sent
        text = wait_metric(node, sent, "relaygate_smtp_messages_received_total", connector=name)
        assert metric(text, "relaygate_smtp_messages_received_total", connector=name) == sent
        assert metric(text, "relaygate_smtp_sessions_admitted_total", connector=name) == len(
            sources
        )
        # both workers took mail: the second one's snapshot holds part of it
        snapshot = json.loads((node.data_dir / "run" / "metrics-w1.json").read_text())
        assert 0 < snapshot["smtp"]["messages"][name] < sent
    finally:
        sink.controller.stop()


def test_a_worker_restart_does_not_take_its_counts_out_of_the_sums(relay: Any) -> None:
    """A worker killed and restarted by the supervisor starts counting from zero. The node's
    counters must not go down then: Prometheus reads a drop as a reset and counts the whole new
    value (the other workers' totals since the start) as an increase, a spike that never
    happened."""
    sink = Sink()
    sink.controller.start()
    try:
        node = relay(
            [relay_connector(["127.0.0.0/24"])],
            mode="process",
            server={"workers": 2},
            start=False,
        )
        with_admin_and_sink(node, sink)
        sent = 0
        for source in [f"127.0.0.{i}" for i in range(5, 13)]:
            with node.smtp(source=source) as client:
                client.sendmail("scanner@corp.example", ["a@example.net"], b"Subject: m\r\n\r\nx")
                sent += 1
        name = "SMTP Relay Internal"
        snapshot_path = node.data_dir / "run" / "metrics-w1.json"
        deadline = time.monotonic() + 20
        while True:  # worker 1's snapshot holds what it received
            text = scrape(node)
            if metric(text, "relaygate_smtp_messages_received_total", connector=name) == sent:
                break
            assert time.monotonic() < deadline, text
            time.sleep(0.2)
        old = json.loads(snapshot_path.read_text())
        assert old["smtp"]["messages"][name] > 0
        os.kill(old["pid"], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while json.loads(snapshot_path.read_text())["pid"] == old["pid"]:  # its successor wrote
            assert time.monotonic() < deadline
            time.sleep(0.2)
        text = scrape(node)
        assert metric(text, "relaygate_smtp_messages_received_total", connector=name) == sent
        assert metric(text, "relaygate_smtp_sessions_admitted_total", connector=name) == 8
    finally:
        sink.controller.stop()


def test_a_node_restart_does_not_count_the_previous_runs_snapshots(relay: Any) -> None:
    """The snapshots of a previous run are gone when the node starts again: their figures are
    not this run's (read by worker 0 until the new worker 1 replaces them, or added for good)."""
    node = relay(
        [relay_connector(["127.0.0.0/24"])],
        mode="process",
        server={"workers": 2},
        start=False,
    )
    node.doc["admin"]["enabled"] = True
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    run = node.data_dir / "run"
    run.mkdir(parents=True)
    stale = {"written": time.time(), "pid": 1, "smtp": {"messages": {"Old": 1000}}}
    for i in (1, 2):  # worker 2: a previous run had more workers
        (run / f"metrics-w{i}.json").write_text(json.dumps(stale))
    node.config = load_config(node.config_path)
    node.start()
    assert not (run / "metrics-w2.json").exists()
    assert metric(scrape(node), "relaygate_smtp_messages_received_total", connector="Old") is None


def test_worker_0_restarted_counts_the_others_from_its_start(tmp_path: Any) -> None:
    """A restarted worker 0 starts the node's counters from zero (a clean reset for Prometheus):
    the others' figures made before it started are not counted; what they count after is, and
    survives their own restarts."""
    from relaygate.worker_stats import NodeFigures, NodeSums, snapshot_path

    def write(pid: int, messages: int) -> None:
        path = snapshot_path(tmp_path, 1)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"written": time.time(), "pid": pid, "smtp": {"messages": {"C": messages}}}
        path.write_text(json.dumps(data))

    def total(sums: NodeSums) -> int:
        figures = NodeFigures()
        sums.add_to(figures)
        return figures.smtp.messages["C"]

    write(pid=100, messages=50)  # worker 1 ran before this worker 0
    sums = NodeSums(tmp_path, 2, 0)
    assert total(sums) == 0
    write(pid=100, messages=53)
    assert total(sums) == 3
    write(pid=101, messages=1)  # worker 1 restarted
    assert total(sums) == 4
    write(pid=101, messages=2)
    assert total(sums) == 5
    snapshot_path(tmp_path, 1).write_text("{")  # unreadable (or removed): its last figures
    assert total(sums) == 5
    snapshot_path(tmp_path, 1).unlink()
    assert total(sums) == 5
