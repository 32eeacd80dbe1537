#!/usr/bin/env python3
"""10,000 concurrent idle connections held open against RelayGate (issue 7, item 2).

Starts RelayGate as `relaygate serve` (connector limits raised: max_inbound_connection 20000,
per source 10000) with an smtp-sink smart host, opens N connections from the loopback addresses
127.0.0.2 … 127.0.0.50 (so no single source address runs out of ephemeral ports), reads each banner and
says EHLO, then holds them idle. While they are held it measures RelayGate's RSS (all its processes)
and times fresh clients from 127.0.0.1 sending one complete message each (connect → 250, and end of
DATA → 250). Bounded: the whole run is cancelled after --timeout seconds (default 120).

File descriptors: this process raises its own RLIMIT_NOFILE, and starts the relay with a raised
limit too; the relay needs `ulimit -n` >= 20000 to hold 10,000 connections (one fd each plus its logs,
queue and listeners). As root the hard limit is raised; otherwise the hard limit is the ceiling.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import MB_BYTES, Sink, process_tree, raise_nofile, rss_bytes
from relaygate_sut import RelayGateSystem
from smtpclient import LatencyResult, one_session

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
SOURCES = [f"127.0.0.{i}" for i in range(2, 51)]


async def _open_idle(port: int, source: str, timeout: float) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", port)), timeout)
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
        if not line.startswith(b"220"):
            raise RuntimeError(f"banner: {line[:80]!r}")
        writer.write(b"EHLO idle.bench.example\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), timeout)
            if not line:
                raise ConnectionError("closed during EHLO")
            if line[3:4] != b"-":
                break
        if not line.startswith(b"250"):
            raise RuntimeError(f"EHLO: {line[:80]!r}")
    except BaseException:
        writer.close()
        raise
    return reader, writer


async def _fresh_clients(port: int, count: int) -> tuple[list[float], list[float], list[str]]:
    totals: list[float] = []
    result = LatencyResult()
    for _ in range(count):
        t0 = time.perf_counter()
        before = len(result.samples)
        await one_session(
            "127.0.0.1",
            port,
            messages=1,
            size=10 * 1024,
            sender="fresh@bench.example",
            recipient="rcpt@remote.example",
            result=result,
            timeout=30,
        )
        if len(result.samples) > before:
            totals.append(time.perf_counter() - t0)
        await asyncio.sleep(0.05)
    return totals, result.samples, result.errors


async def _hold(port: int, pids: list[int], target: int, parallel: int, log: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"target": target}
    # warm up (imports, first message, log files) before the baseline
    await _fresh_clients(port, 3)
    out["rss_before"] = rss_bytes(process_tree(pids))
    conns: list[tuple[Any, Any]] = []
    errors: list[str] = []
    sem = asyncio.Semaphore(parallel)

    async def one(i: int) -> None:
        async with sem:
            try:
                conns.append(await _open_idle(port, SOURCES[i % len(SOURCES)], 30))
            except (OSError, RuntimeError, TimeoutError, ConnectionError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one(i) for i in range(target)))
        out["open_s"] = time.perf_counter() - t0
        out["held"] = len(conns)
        out["open_errors"] = len(errors)
        out["first_errors"] = errors[:3]
        print(f"idle: {len(conns)} connections open in {out['open_s']:.1f} s", file=log, flush=True)
        await asyncio.sleep(2)
        samples = []
        for _ in range(5):
            samples.append(rss_bytes(process_tree(pids)))
            await asyncio.sleep(0.2)
        out["rss_held"] = max(samples)
        totals, data, fresh_errors = await _fresh_clients(port, 20)
        out["rss_held"] = max(out["rss_held"], rss_bytes(process_tree(pids)))
        out["fresh_n"] = len(totals)
        out["fresh_errors"] = fresh_errors[:3]
        ms = [t * 1000 for t in totals]
        dms = [t * 1000 for t in data]
        out["fresh_total_p50_ms"] = statistics.median(ms) if ms else float("nan")
        out["fresh_total_max_ms"] = max(ms) if ms else float("nan")
        out["fresh_data_p50_ms"] = statistics.median(dms) if dms else float("nan")
        out["fresh_data_max_ms"] = max(dms) if dms else float("nan")
        # still held? count the connections the relay has not closed
        alive = sum(1 for r, _w in conns if not r.at_eof())
        out["still_open"] = alive
    finally:
        for _r, w in conns:
            w.close()
        await asyncio.sleep(0.5)
    out["rss_per_conn"] = (
        (out["rss_held"] - out["rss_before"]) / out["held"] if out.get("held") else float("nan")
    )
    out["meets_target"] = bool(
        out.get("held", 0) >= target
        and out["rss_held"] < 250 * MB_BYTES
        and out.get("fresh_n")
        and out["fresh_total_max_ms"] < 100
    )
    return out


def run_idle(
    workdir: Path,
    *,
    target: int = 10000,
    timeout: float = 120.0,
    parallel: int = 200,
    log: Any = None,
) -> dict[str, Any]:
    log = log or sys.stdout
    workdir.mkdir(parents=True, exist_ok=True)
    limit = raise_nofile(target + 2048)
    if limit < target + 100:
        return {"error": f"RLIMIT_NOFILE of the bench process is {limit}; need {target + 100}"}
    sink = rg = None
    try:
        sink = Sink(workdir).start()
        rg = RelayGateSystem(workdir, sink.port, max_connections=2 * target)
        rg.start()
        try:
            return asyncio.run(
                asyncio.wait_for(_hold(rg.port, rg.roots(), target, parallel, log), timeout)
            )
        except TimeoutError:
            return {"error": f"did not finish within {timeout:.0f} s"}
    except RuntimeError as exc:
        return {"error": str(exc)}
    finally:
        if rg is not None:
            rg.stop()
        if sink is not None:
            sink.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--timeout", type=float, default=120.0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_args()
    for sig in (signal.SIGTERM, signal.SIGHUP):  # unwind through finally: stop relay and sink
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    with tempfile.TemporaryDirectory(prefix="relaygate-idle-", dir="/var/tmp") as tmp:
        Path(tmp).chmod(0o755)
        result = run_idle(Path(tmp), target=args.connections, timeout=args.timeout)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        from run import idle_markdown

        print(idle_markdown(result))
        for key in ("first_errors", "fresh_errors"):
            for err in result.get(key) or ():
                print(f"  {key}: {err}")
    return 0 if not result.get("error") else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
