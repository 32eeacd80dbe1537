"""Smoke runs of the Postfix comparison benchmarks (bench/run.py --quick, bench/steps.py), so they
cannot rot.

No performance thresholds: it checks that both systems accepted every message, that the sinks
counted them (RelayGate's only when this build has the queue manager), and that the ratios were
computed. Takes seconds (about 20 s on an idle 2-core machine).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "bench" / "run.py"
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"

pytestmark = [
    pytest.mark.skipif(
        not os.access(SMTP_SOURCE, os.X_OK),
        reason="smtp-source not installed (Debian package postfix; `make debs`)",
    ),
    pytest.mark.skipif(
        os.geteuid() != 0,
        reason="the benchmark starts a private Postfix instance, which needs root",
    ),
]


def _run(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a bench script with this Python; it must exit 0 (its output tail is the message)."""
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(300)
def test_quick_benchmark_runs_both_systems(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    proc = _run(RUN, "--quick", "--no-write", "--json", str(out), timeout=280)
    assert "RelayGate / Postfix" in proc.stdout
    results = json.loads(out.read_text())
    rows = results["rows"]
    assert {r["system"] for r in rows} == {"Postfix", "RelayGate"}
    delivers = results["meta"]["relaygate_delivers"]
    for r in rows:
        assert r["accepted_per_s"] and r["accepted_per_s"] > 0, r
        assert r["latency_n"] > 0 and r["p50_ms"] is not None, r
        assert r["cpu_per_1000"] > 0 and r["peak_rss"] > 0, r
        if r["system"] == "Postfix" or delivers:
            assert r["delivered"] == r["messages"], r
            assert r["e2e_per_s"] and r["e2e_per_s"] > 0, r
    summary = results["summary"]
    assert {(e["size"], e["sessions"]) for e in summary} == {(10 * 1024, 1), (10 * 1024, 10)}
    for e in summary:
        assert e["accepted_per_s"]["ratio"] is not None and e["accepted_per_s"]["ratio"] > 0
        if delivers:
            assert e["e2e_per_s"]["ratio"] is not None


@pytest.mark.timeout(180)
def test_step_by_step_benchmark_times_every_step_of_both_systems() -> None:
    proc = _run(ROOT / "bench" / "steps.py", "--messages", "5", "--json", timeout=170)
    result = json.loads(proc.stdout)
    assert set(result) == {"Postfix", "RelayGate"}
    for steps in result.values():
        assert list(steps) == [
            "connect → banner",
            "EHLO",
            "MAIL",
            "RCPT",
            "DATA → 354",
            "body → 250",
            "QUIT",
            "whole message",
        ]
        for timing in steps.values():
            assert 0 < timing["p50_us"] <= timing["p90_us"]
        # Each message's total is the sum of its steps, so its median is at least each step's.
        longest = max(t["p50_us"] for name, t in steps.items() if name != "whole message")
        assert steps["whole message"]["p50_us"] >= longest


@pytest.mark.timeout(180)
def test_floor_benchmark_runs_three_systems_and_every_message_reaches_its_sink(
    tmp_path: Path,
) -> None:
    out = tmp_path / "floor.json"
    proc = _run(ROOT / "bench" / "floor.py", "--quick", "--json", str(out), timeout=170)
    assert "RelayGate/floor" in proc.stdout
    result = json.loads(out.read_text())
    assert {r["system"] for r in result["rows"]} == {"Postfix", "RelayGate", "floor"}
    for r in result["rows"]:
        assert not r["errors"], r
        # The floor's 250 is durable and its delivery real: each message reached its sink.
        assert r["delivered"] == r["messages"], r
    for e in result["summary"]:
        for ratio in ("floor/Postfix", "RelayGate/Postfix", "RelayGate/floor"):
            assert e[ratio] is not None and e[ratio] > 0, e


@pytest.mark.timeout(180)
def test_floor_benchmark_with_relaygates_parts_delivers_every_message(tmp_path: Path) -> None:
    out = tmp_path / "floor-parts.json"
    proc = _run(
        ROOT / "bench" / "floor.py",
        "--quick",
        "--floor-parts",
        "all",
        "--json",
        str(out),
        timeout=170,
    )
    assert "RelayGate/floor" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    floor = [r for r in rows if r["system"] == "floor"]
    assert floor
    for r in floor:
        assert not r["errors"], r
        assert r["delivered"] == r["messages"], r
        # Both processes ran the whole time (a failed one would leave no process tree to measure).
        assert r["peak_procs"] == 2, r


@pytest.mark.timeout(120)
def test_delivery_cost_benchmark_delivers_with_both_deliverers(tmp_path: Path) -> None:
    out = tmp_path / "delivery.json"
    proc = _run(
        ROOT / "bench" / "delivery_cost.py",
        "--messages",
        "20",
        "--reps",
        "1",
        "--json",
        str(out),
        timeout=110,
    )
    assert "relaygate / lean: CPU" in proc.stdout
    result = json.loads(out.read_text())
    assert sorted(r["mode"] for r in result["rows"]) == ["lean", "relaygate"]
    for r in result["rows"]:
        # 20 timed messages after 50 warm-up ones, every one Delivered in the store.
        assert r["delivered_in_store"] == 70, r
        assert 0 < r["cpu_us"] <= r["wall_us"] * 1.05, r
    assert result["sink_received"] == 140


@pytest.mark.timeout(120)
def test_protocol_steps_reads_every_step_of_every_message_from_the_log() -> None:
    proc = _run(
        ROOT / "bench" / "protocol_steps.py",
        "--messages", "5", "--size", "10240", "--workers", "1", "--json",
        timeout=110,
    )  # fmt: skip
    table = json.loads(proc.stdout)
    for step in (
        "< DATA → > 354",
        "> 354 → * receiving message",
        "* receiving message → > 250 queued",
    ):
        assert table[step]["n"] == 5, (step, table)
        assert 0 <= table[step]["p50_ms"] <= table[step]["max_ms"]
    assert table["whole session"]["n"] >= 5  # and the readiness probe's connection
