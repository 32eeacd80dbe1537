"""Get-Queue at scale: how long ``GET /api/queues`` and the admin centre's ``/queue`` page take
with tens or hundreds of thousands of unfinished messages, and how long the event loop (which
serves SMTP in a worker) waits meanwhile.

    .venv/bin/python bench/get_queue.py [--messages 30000] [--repeat 5] [--dir /var/tmp]

Fills a SQLite queue through the ``Store`` API (no SMTP: only the store's state matters here):
``--messages`` messages of 1 to 3 recipients over six domains, four of them sent by DNS, two by a
smart host; then about 55% are in Retry (a 451 recorded, next attempt in an hour), 10% Unreachable
(``ROUTING.NoNextHop``), 5% suspended, 5% with one recipient delivered and the rest waiting, the
rest Ready and never attempted (no queue manager runs, so nothing is delivered). Then it serves
the admin application on a real socket (uvicorn, as ``relaygate serve`` does) and times
``QueueControl.queues()`` called directly (with the longest wait of a 5 ms ticker on the same
loop), ``GET /api/queues`` and ``GET /queue`` (median and max of ``--repeat`` calls), each one
counting (a count is not given again, as ``queues`` otherwise does after a slow count); then
``GET /api/queues`` once more right after the last count, as a reload of the page would (the
count given again if it took 0.5 s or more); and prints the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import resource
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from relaygate import replies
from relaygate.admin.server import AdminServer
from relaygate.config import parse_text
from relaygate.control import QueueControl
from relaygate.control.queues import DeliveryQueues
from relaygate.queue.model import Envelope, RecipientState, RecipientStatus
from relaygate.queue.sqlite_store import SqliteStore

DOMAINS = ["gmail.test", "outlook.test", "yahoo.test", "corp-a.test", "partner.test", "bank.test"]
BODY = b"Subject: bench\r\n\r\n" + b"x" * 1000 + b"\r\n"


def _config(data_dir: Path, port: int) -> Any:
    return parse_text(
        f"""
[server]
name = "BENCH"
fqdn = "bench.test"
data_dir = "{data_dir}"

[admin]
listen = "127.0.0.1:{port}"

[[send_connectors]]
name = "Internet"
address_spaces = ["*"]
dns_routing_enabled = true

[[send_connectors]]
name = "Partners"
address_spaces = ["partner.test", "bank.test"]
dns_routing_enabled = false
smart_hosts = ["[10.0.0.5]"]
""",
        "<bench>",
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def fill(store: SqliteStore, n: int, seed: int = 7) -> None:
    rnd = random.Random(seed)
    now = time.time()
    plans: list[tuple[Envelope, str]] = []
    for i in range(n):
        rcpts = [f"user{i}-{k}@{rnd.choice(DOMAINS)}" for k in range(rnd.choice((1, 1, 2, 3)))]
        sender = f"scanner{i % 40}@scanners.corp.test" if i % 3 else f"app@corp{i % 7}.test"
        roll = rnd.random()
        kind = (
            "retry"
            if roll < 0.55
            else "unreachable"
            if roll < 0.65
            else "suspended"
            if roll < 0.70
            else "partial"
            if roll < 0.75
            else "ready"
        )
        plans.append((Envelope(sender=sender, recipients=rcpts, client_ip="10.1.2.3"), kind))
    busy = "451 4.7.0 Temporary server error, try again later"
    no_hop = replies.NO_NEXT_HOP.line()

    async def one(env: Envelope, kind: str) -> None:
        qid = await store.submit(env, BODY)
        later = now + 3600 + rnd.random() * 600
        if kind in ("retry", "unreachable", "partial"):
            results = []
            for k, address in enumerate(dict.fromkeys(env.recipients)):
                if kind == "partial" and k == 0:
                    results.append(
                        RecipientState(address, RecipientStatus.DELIVERED, 1, "250 2.0.0 OK", now)
                    )
                    continue
                error = no_hop if kind == "unreachable" else busy
                results.append(
                    RecipientState(address, RecipientStatus.DEFERRED, 1, error, now - 60, later)
                )
            await store.record_results(qid, "bench", results)
        elif kind == "suspended":
            await store.set_flags(qid, suspended=True)

    batch = 200
    for start in range(0, n, batch):
        await asyncio.gather(*(one(e, k) for e, k in plans[start : start + batch]))


def _stats(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1000:,.0f} ms, max {max(times) * 1000:,.0f} ms"


async def _longest_stall(work: Any) -> tuple[Any, float]:
    """``await work`` with a 5 ms ticker on the same loop: the result and the longest wait."""
    gaps = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    try:
        return await work, max(gaps)
    finally:
        done.set()
        await ticker


async def measure(directory: Path, messages: int, repeat: int) -> None:
    data_dir = directory / "data"
    config = _config(data_dir, _free_port())
    store = SqliteStore(data_dir / "queue" / "queue.db")
    await store.open()
    try:
        t0 = time.perf_counter()
        await fill(store, messages)
        print(f"filled {messages:,} messages in {time.perf_counter() - t0:.1f} s")
        print("store counts:", await store.counts())

        class Relay:
            pass

        relay: Any = Relay()
        relay.config, relay.store, relay.manager, relay.server = config, store, None, None
        # Every timed call counts: no count is given again (see DeliveryQueues.queues; an
        # earlier RelayGate, for an A/B, has no such attribute and always counts).
        reuse_from = getattr(DeliveryQueues, "queues_reuse_from", None)
        DeliveryQueues.queues_reuse_from = float("inf")
        control = QueueControl(store, lambda: config)
        direct: list[float] = []
        stalls: list[float] = []
        for _ in range(repeat):
            t = time.perf_counter()
            body, stall = await _longest_stall(control.queues())
            direct.append(time.perf_counter() - t)
            stalls.append(stall)
        print(
            f"QueueControl.queues(): {_stats(direct)}; the loop's longest wait "
            f"{max(stalls) * 1000:,.0f} ms (truncated: {body.get('truncated')})"
        )
        for q in body["queues"]:
            print(
                f"    {q['Identity']:<28} {q['DeliveryType']:<28} {q['Status']:<9} "
                f"{q['MessageCount']:>7,} msgs {q['RecipientCount']:>7,} rcpts"
            )
        admin = AdminServer(relay)
        await admin.start()
        try:
            async with httpx.AsyncClient(base_url=str(admin.url), timeout=300) as http:
                for path in ("/api/queues", "/queue"):
                    times = []
                    for _ in range(repeat):
                        t = time.perf_counter()
                        r = await http.get(path)
                        times.append(time.perf_counter() - t)
                        assert r.status_code == 200, r.text[:200]
                    print(f"GET {path}: {_stats(times)} ({len(r.content):,} bytes)")
                DeliveryQueues.queues_reuse_from = reuse_from
                t = time.perf_counter()
                await http.get("/api/queues")
                print(
                    "GET /api/queues right after the last count: "
                    f"{(time.perf_counter() - t) * 1000:,.0f} ms"
                )
        finally:
            await admin.stop()
    finally:
        await store.close()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {rss:,.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=30000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(dir=args.dir, prefix="relaygate-getqueue-"))
    try:
        asyncio.run(measure(directory, args.messages, args.repeat))
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
