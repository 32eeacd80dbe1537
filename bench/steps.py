#!/usr/bin/env python3
"""One message at a time, step by step: where a 1-session message spends its time (issue 7).

    .venv/bin/python bench/steps.py [--messages 500] [--size 10] [--workers 1] [--json]

Starts a private Postfix and RelayGate, configured as in bench/run.py, each relaying to its own
smtp-sink, and sends them the same messages one at a time from one client on raw sockets: a new
connection per message, as smtp-source and the printers it stands for do. Each reply is timed
from the client's last write to the end of the reply, so every step includes the client's own
share and the loopback round trip. The two systems take turns every 50 messages, so a change in
the machine's speed reaches both. Prints p50 and p90 per step and the ratio RelayGate/Postfix of
the p50s, for the same invocation.

The "body → 250" step is where a durable relay commits the message before answering; the other
steps are command handling. docs/benchmarks.md ("Fifth session") reads one run of this.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sink, have_postfix_tools, percentile
from postfix_sut import PostfixSystem
from relaygate_sut import RelayGateSystem
from smtpclient import make_message

STEPS = ("connect → banner", "EHLO", "MAIL", "RCPT", "DATA → 354", "body → 250", "QUIT")
ROUND = 50  # messages per turn of one system
TIMEOUT = 30.0  # seconds for any one reply


def _reply(sock: socket.socket) -> bytes:
    """Read one whole reply (its last line has a space after the code)."""
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed; got {buf!r}")
        buf += chunk
        if buf.endswith(b"\r\n"):
            last = buf[:-2].rsplit(b"\r\n", 1)[-1]
            if len(last) >= 4 and last[3:4] == b" ":
                return buf


def one_message(port: int, body: bytes, times: dict[str, list[float]]) -> None:
    commands = (
        ("EHLO", b"EHLO steps.example\r\n", b"250"),
        ("MAIL", b"MAIL FROM:<bench@sender.example>\r\n", b"250"),
        ("RCPT", b"RCPT TO:<x@bench.example>\r\n", b"250"),
        ("DATA → 354", b"DATA\r\n", b"354"),
        ("body → 250", body, b"250"),
        ("QUIT", b"QUIT\r\n", b"221"),
    )
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not _reply(sock).startswith(b"220"):
            raise ConnectionError("no 220 banner")
        times["connect → banner"].append(time.perf_counter() - start)
        for step, data, code in commands:
            t = time.perf_counter()
            sock.sendall(data)
            reply = _reply(sock)
            times[step].append(time.perf_counter() - t)
            if not reply.startswith(code):
                raise ConnectionError(f"{step}: expected {code.decode()}, got {reply!r}")


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for step in STEPS:
        values = times[step]
        out[step] = {
            "p50_us": percentile(values, 50) * 1e6,
            "p90_us": percentile(values, 90) * 1e6,
        }
    whole = [sum(times[s][i] for s in STEPS) for i in range(len(times[STEPS[0]]))]
    out["whole message"] = {
        "p50_us": percentile(whole, 50) * 1e6,
        "p90_us": percentile(whole, 90) * 1e6,
    }
    return out


def run(workdir: Path, messages: int, size: int, workers: str) -> dict[str, Any]:
    body = make_message(size, sender="bench@sender.example", recipient="x@bench.example") + b".\r\n"
    sinks: list[Sink] = []
    systems: list[Any] = []
    times: dict[str, dict[str, list[float]]] = {}
    try:
        pf_sink = Sink(workdir).start()
        sinks.append(pf_sink)
        rg_sink = Sink(workdir).start()
        sinks.append(rg_sink)
        pf = PostfixSystem(workdir, pf_sink.port)
        systems.append(pf)
        pf.start()
        rg = RelayGateSystem(workdir, rg_sink.port, server_extra=f"workers = {workers}\n")
        systems.append(rg)
        rg.start()
        times = {s.name: {step: [] for step in STEPS} for s in (pf, rg)}
        for system in (pf, rg):  # warm-up, not counted: first connections, caches, the pool
            for _ in range(10):
                one_message(system.port, body, {step: [] for step in STEPS})
        done = 0
        while done < messages:
            n = min(ROUND, messages - done)
            for system in (pf, rg) if (done // ROUND) % 2 == 0 else (rg, pf):
                for _ in range(n):
                    one_message(system.port, body, times[system.name])
            done += n
            print(f"  {done}/{messages} messages to each system", file=sys.stderr, flush=True)
    finally:
        for system in reversed(systems):
            system.stop()
        for sink in sinks:
            sink.stop()
    return {name: summarise(t) for name, t in times.items()}


def render(result: dict[str, Any], messages: int, size: int, workers: str) -> str:
    pf, rg = result["Postfix"], result["RelayGate"]
    lines = [
        f"One message at a time, {messages} × {size // 1024} KB each, a new connection per message "
        f"(RelayGate workers = {workers}):",
        "",
        f"{'step':<18} {'Postfix p50':>12} {'RelayGate p50':>14} {'ratio':>7}"
        f" {'Postfix p90':>12} {'RelayGate p90':>14}",
    ]
    for step in (*STEPS, "whole message"):
        a, b = pf[step], rg[step]
        lines.append(
            f"{step:<18} {a['p50_us']:>10,.0f}µs {b['p50_us']:>12,.0f}µs "
            f"{b['p50_us'] / a['p50_us']:>6.2f}× {a['p90_us']:>10,.0f}µs {b['p90_us']:>12,.0f}µs"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=500, help="per system (default 500)")
    ap.add_argument("--size", type=int, default=10, help="KB per message (default 10)")
    ap.add_argument("--workers", default="1", help='RelayGate server.workers (default 1; "auto")')
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    if args.messages < 1 or args.size < 1:
        ap.error("--messages and --size must be at least 1")
    workers = args.workers if args.workers.isdigit() else json.dumps(args.workers)
    if not have_postfix_tools():
        print("steps: Postfix tools not found (apt-get install postfix)", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through finally: stop both systems
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="relaygate-steps-", dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)
        result = run(Path(tmp), args.messages, args.size * 1024, workers)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(render(result, args.messages, args.size * 1024, args.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
