#!/usr/bin/env python3
"""Postfix, RelayGate and the Python floor in one invocation: how far is RelayGate from the least a
Python relay must do? `.venv/bin/python bench/floor.py [--sessions 1,10,50] [--reps 3]`

The floor (bench/floor_server.py) receives on uvloop, appends each message to a journal with a
group-committed `fdatasync` before the 250, delivers it to its own smtp-sink over a pooled
connection and records the delivery durably, with as many processes as RelayGate has workers.
Nothing else: no policy, logs, queue or bounds. It is not a design to ship; it is the ceiling any
design in Python reaches on this machine, so that the gap between RelayGate and Postfix can be
split into what Python costs (floor / Postfix) and what RelayGate's own work costs (RelayGate /
floor).

All three get the same smtp-source load (10 KB, one connection per message) at each session count,
taking turns (the order rotates every repetition); each is measured with bench/run.py's
`run_point` (via `measured`: accepted and end-to-end msgs/s, CPU per 1,000 messages, DATA→250 latency). Prints
the medians and the ratios; `--json FILE` writes everything. `--quick` is the smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import VENV_BIN, Sink, free_port, kill_group, wait_port
from postfix_sut import PostfixSystem
from relaygate_sut import RelayGateSystem
from run import FULL, KB, cannot_run, fmt, measured, median_of, stop_all

SERVER = Path(__file__).resolve().parent / "floor_server.py"
MESSAGES = FULL["messages"][10 * KB]  # bench/run.py's counts for 10 KB
QUICK_MESSAGES = {1: 60, 10: 200}


class FloorSystem:
    name = "floor"

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        workers: int,
        store: str,
        parts: str = "",
        config: Path | None = None,
    ) -> None:
        self.dir = workdir / "floor"
        self.sink_port = sink_port
        self.workers = workers
        self.store = store
        self.parts = parts  # bench/floor_parts.py: RelayGate's own parts on the floor's path
        self.config = config
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        python = VENV_BIN / "python"
        args = [
            str(python if python.exists() else sys.executable),
            str(SERVER),
            "--port", str(self.port),
            "--smart-host", f"127.0.0.1:{self.sink_port}",
            "--dir", str(self.dir),
            "--workers", str(self.workers),
            "--store", self.store,
        ]  # fmt: skip
        if self.parts:
            args += ["--parts", self.parts, "--config", str(self.config)]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "floor.err", "wb"),  # noqa: SIM115
            start_new_session=True,
        )
        if not wait_port("127.0.0.1", self.port, 15):
            self.stop()
            raise RuntimeError(f"the floor server did not listen on 127.0.0.1:{self.port}")
        time.sleep(0.5)  # one process listening is not all of them: a failed one has exited
        if self.proc.poll() is not None:
            self.stop()
            err = (self.dir / "floor.err").read_text(errors="replace").strip().splitlines()
            raise RuntimeError(f"the floor server exited: {err[-1] if err else 'no message'}")

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc else []

    def stop(self) -> None:
        kill_group(self.proc)

    def describe(self) -> str:
        parts = f", RelayGate's parts: {self.parts}" if self.parts else ""
        return (
            f"Python floor (bench/floor_server.py), {self.workers} processes, {self.store}{parts}"
        )


def run(
    workdir: Path,
    sessions: list[int],
    reps: int,
    messages: dict[int, int],
    log: Any,
    store: str = "journal",
    parts: str = "",
) -> list[dict[str, Any]]:
    workers = os.cpu_count() or 1  # RelayGate's workers = "auto"
    sinks: list[Sink] = []
    systems: list[Any] = []
    rows: list[dict[str, Any]] = []
    try:
        for _ in range(3):
            sinks.append(Sink(workdir).start())
        pf = PostfixSystem(workdir, sinks[0].port)
        systems.append(pf)
        pf.start()
        rg = RelayGateSystem(workdir, sinks[1].port, server_extra='workers = "auto"\n')
        systems.append(rg)
        rg.start()
        floor = FloorSystem(workdir, sinks[2].port, workers, store, parts, rg.config)
        systems.append(floor)
        floor.start()
        trio = list(zip(systems, sinks, strict=True))
        for s in sessions:
            for rep in range(reps):
                turn = trio[rep % 3 :] + trio[: rep % 3]
                for system, sink in turn:
                    row = measured(
                        system,
                        sink,
                        rep=rep,
                        log=log,
                        size=10 * KB,
                        sessions=s,
                        messages=messages[s],
                        latency_total=min(200, 20 * s),
                        stall=15.0,
                        deliver=True,
                    )
                    rows.append(row)
    finally:
        stop_all(systems, sinks)
    return rows


def summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for s in sorted({r["sessions"] for r in rows}):
        entry: dict[str, Any] = {"sessions": s}
        for name in ("Postfix", "RelayGate", "floor"):
            mine = [r for r in rows if r["sessions"] == s and r["system"] == name]
            for key in ("accepted_per_s", "e2e_per_s", "cpu_per_1000"):
                entry[f"{name}.{key}"] = median_of(mine, key)
        pf, rg, fl = (entry[f"{n}.accepted_per_s"] for n in ("Postfix", "RelayGate", "floor"))
        entry["floor/Postfix"] = fl / pf if fl and pf else None
        entry["RelayGate/Postfix"] = rg / pf if rg and pf else None
        entry["RelayGate/floor"] = rg / fl if rg and fl else None
        out.append(entry)
    return out


def render(entries: list[dict[str, Any]]) -> str:
    lines = [
        "accepted msgs/s (medians), 10 KB; CPU seconds per 1,000 messages in brackets",
        f"{'sessions':>8} {'Postfix':>14} {'RelayGate':>14} {'floor':>14}"
        f" {'floor/Postfix':>14} {'RelayGate/Postfix':>18} {'RelayGate/floor':>16}",
    ]
    for e in entries:
        cells = [
            f"{fmt(e[f'{n}.accepted_per_s'])} ({fmt(e[f'{n}.cpu_per_1000'], 2)})"
            for n in ("Postfix", "RelayGate", "floor")
        ]
        lines.append(
            f"{e['sessions']:>8} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14}"
            f" {fmt(e['floor/Postfix'], 2) + '×':>14} {fmt(e['RelayGate/Postfix'], 2) + '×':>18}"
            f" {fmt(e['RelayGate/floor'], 2) + '×':>16}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 and 10 sessions, 1 rep")
    ap.add_argument("--sessions", default="1,10,50", help="comma-separated (default 1,10,50)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per point (default 3)")
    ap.add_argument("--json", type=Path, help="write rows and summary to this file")
    ap.add_argument(
        "--floor-store",
        choices=("journal", "sqlite"),
        default="journal",
        help="the floor's durable writes: an appended file (default) or SQLite rows",
    )
    ap.add_argument(
        "--floor-parts",
        default="",
        metavar="PARTS",
        help="RelayGate's own parts on the floor's path (bench/floor_parts.py): policy, "
        "policy,logs, policy,logs,store or all; the floor's store becomes RelayGate's with store",
    )
    args = ap.parse_args(argv)
    if args.floor_parts:
        from floor_parts import parse_parts

        try:
            parse_parts(args.floor_parts)
        except ValueError as exc:
            ap.error(f"--floor-parts: {exc}")
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    reason = cannot_run()
    if reason:
        print(f"floor: {reason}", file=sys.stderr)
        return 2
    if args.quick:
        sessions, reps, messages = [1, 10], 1, QUICK_MESSAGES
    else:
        sessions = [int(x) for x in args.sessions.split(",")]
        reps, messages = args.reps, MESSAGES
    unknown = [s for s in sessions if s not in messages]
    if unknown:
        ap.error(f"--sessions: no message count for {unknown} (known: {sorted(messages)})")
    workdir = Path(tempfile.mkdtemp(prefix="relaygate-floor-", dir="/var/tmp"))
    os.chmod(workdir, 0o755)
    try:
        rows = run(
            workdir, sessions, reps, messages, sys.stdout, args.floor_store, args.floor_parts
        )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    entries = summary(rows)
    print()
    print(render(entries))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": entries}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
