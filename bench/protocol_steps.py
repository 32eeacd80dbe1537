#!/usr/bin/env python3
"""Where RelayGate's sessions wait, step by step, read from its own receive protocol log.

    .venv/bin/python bench/protocol_steps.py [--sessions 1] [--messages 300] [--size 1048576]
                                             [--workers auto] [--json]

Starts RelayGate in the benchmark's configuration (protocol logging Verbose) with its smtp-sink,
sends the messages with smtp-source, then reads the protocol log. A step is the time from one
logged event of a session to its next (the banner → HELO, HELO's 250 → MAIL, 354 → the end of the
message read, the end → the 250, the 250 → QUIT...). For each step: the mean, p50, p90, p99 and max
in ms, and how many took 35 ms or more.

A step that is usually fast and now and then ~40 ms long is a wait, not work, and a CPU profile
does not show it: that is how the eleventh session found the delayed ACK that held one 1 MB
message in six at the end of its data for 45-49 ms (docs/benchmarks.md). The log's times have
millisecond resolution, so the means are good to about ±0.1 ms over a few hundred messages.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SMTP_SOURCE, Sink, have_postfix_tools
from relaygate_sut import RelayGateSystem

STALL_MS = 35.0
SENDER = "bench@bench.example"
RECIPIENT = "rcpt@remote.example"

# How a logged event is named in a step: the event character and the start of its text.
_NAMES = {
    "+": "connect",
    "-": "disconnect",
}


def event_name(event: str, data: str, context: str) -> str:
    if event in _NAMES:
        return _NAMES[event]
    text = data.strip('"')
    if event == "*":  # information: named by its context ("receiving message", ...)
        return "* " + (context.strip('"') or text.split(" ", 1)[0])
    if event == "<":
        return "< " + (text.split()[0].upper() if text else "")
    # A reply: its code, and for 250 which command it answers is told by the step's other end.
    return "> " + text[:3] + (" queued" if text.startswith("250 2.6.0") else "")


def read_sessions(log_dir: Path) -> list[list[tuple[float, str]]]:
    """Every session in the receive protocol logs: its events as (ms since the epoch, name)."""
    sessions: dict[str, list[tuple[float, str]]] = collections.defaultdict(list)
    for path in sorted(log_dir.glob("*.LOG")):
        with path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("#"):
                    continue
                fields = line.rstrip("\r\n").split(",", 8)
                if len(fields) < 8:
                    continue
                when = datetime.fromisoformat(fields[0].replace("Z", "+00:00")).timestamp()
                context = fields[8] if len(fields) > 8 else ""
                name = event_name(fields[6], fields[7], context)
                sessions[fields[2]].append((when * 1000, name))
    return sorted(sessions.values(), key=lambda events: events[0][0])


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def step_table(sessions: Iterable[list[tuple[float, str]]]) -> dict[str, dict[str, float]]:
    """Per step (in the order first seen), its timings in ms over every session."""
    steps: dict[str, list[float]] = {}
    whole: list[float] = []
    for events in sessions:
        for (t0, a), (t1, b) in itertools.pairwise(events):
            steps.setdefault(f"{a} → {b}", []).append(t1 - t0)
        whole.append(events[-1][0] - events[0][0])
    steps["whole session"] = whole
    return {
        name: {
            "n": len(v),
            "mean_ms": statistics.fmean(v),
            "p50_ms": _pct(v, 0.5),
            "p90_ms": _pct(v, 0.9),
            "p99_ms": _pct(v, 0.99),
            "max_ms": max(v),
            "stalls": sum(x >= STALL_MS for x in v),
        }
        for name, v in steps.items()
        if v
    }


def run(sessions: int, messages: int, size: int, workers: str) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory(prefix="relaygate-steps-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        sink = Sink(work).start()
        relay = RelayGateSystem(work, sink.port, server_extra=f"workers = {workers}\n")
        try:
            relay.start()
            subprocess.run(
                [
                    SMTP_SOURCE, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                    "-f", SENDER, "-t", RECIPIENT, f"127.0.0.1:{relay.port}",
                ],
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=600,
            )  # fmt: skip
        finally:
            relay.stop()  # a graceful stop: the logs are flushed
            sink.stop()
        return step_table(read_sessions(relay.data / "logs" / "ProtocolLog" / "SmtpReceive"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=1, help="smtp-source -s (default 1)")
    ap.add_argument("--messages", type=int, default=300, help="smtp-source -m (default 300)")
    ap.add_argument("--size", type=int, default=1048576, help="octets per message (default 1 MB)")
    ap.add_argument("--workers", default='"auto"', help='server.workers (default "auto")')
    ap.add_argument("--json", action="store_true", help="print the table as JSON")
    args = ap.parse_args()
    if not have_postfix_tools():
        print("smtp-source/smtp-sink not found (apt-get install postfix)", file=sys.stderr)
        return 2
    table = run(args.sessions, args.messages, args.size, args.workers)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(
        f"{args.messages} messages of {args.size} octets at {args.sessions} session(s), "
        f"workers = {args.workers}; ms per step, from the receive protocol log:"
    )
    print(
        f"{'step':44s} {'n':>6s} {'mean':>7s} {'p50':>5s} {'p90':>5s} {'p99':>5s} {'max':>6s}  ≥35 ms"
    )
    for name, t in table.items():
        print(
            f"{name:44s} {t['n']:6d} {t['mean_ms']:7.2f} {t['p50_ms']:5.0f} {t['p90_ms']:5.0f} "
            f"{t['p99_ms']:5.0f} {t['max_ms']:6.0f}  {t['stalls']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
