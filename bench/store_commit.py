"""Queue store commit latency: the WAL written ahead (the default) against a WAL that grows.

    .venv/bin/python bench/store_commit.py [--messages 1500] [--dir /var/tmp]

A 10 KB message is submitted to a `SqliteStore` by 1 and by 10 concurrent callers, N times each,
first in a store whose WAL grows by appending (`_reserve_wal` switched off) and then in one whose
WAL blocks are written ahead (see `SqliteStore._reserve_wal`). Prints submit p50/p90 per
configuration and the ratio, in the same invocation. The directory must be on the disk the queue
lives on (not a tmpfs: there is no fsync cost to see there).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from relaygate.queue import sqlite_writer
from relaygate.queue.model import Envelope
from relaygate.queue.sqlite_store import SqliteStore

BODY = b"Subject: bench\r\n\r\n" + (b"y" * 76 + b"\r\n") * 130  # ~10 KB, as bench/run.py sends


def _no_reserve(self: SqliteStore, size: int) -> None:
    self._wal_reserved = sqlite_writer._WAL_LIMIT  # never write ahead: every commit appends


async def _run(directory: Path, messages: int, callers: int) -> list[float]:
    env = Envelope(sender="a@b.example", recipients=["x@bench.example"], client_ip="127.0.0.1")
    latencies: list[float] = []
    async with SqliteStore(directory / "queue.db") as store:

        async def caller(n: int) -> None:
            for _ in range(n):
                t = time.perf_counter()
                await store.submit(env, BODY)
                latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(caller(messages // callers) for _ in range(callers)))
    return latencies


def _measure(base: Path, messages: int, callers: int, reserve: bool) -> tuple[float, float, float]:
    directory = Path(tempfile.mkdtemp(dir=base, prefix="relaygate-store-bench-"))
    real = SqliteStore._reserve_wal
    if not reserve:
        SqliteStore._reserve_wal = _no_reserve  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        lat = asyncio.run(_run(directory, messages, callers))
        rate = len(lat) / (time.perf_counter() - t0)
    finally:
        SqliteStore._reserve_wal = real  # type: ignore[method-assign]
        shutil.rmtree(directory, ignore_errors=True)
    lat.sort()
    return statistics.median(lat) * 1e3, lat[int(len(lat) * 0.9)] * 1e3, rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--messages", type=int, default=1500)
    ap.add_argument("--dir", type=Path, default=Path("/var/tmp"))
    args = ap.parse_args()
    for callers in (1, 10):
        grow = _measure(args.dir, args.messages, callers, reserve=False)
        ahead = _measure(args.dir, args.messages, callers, reserve=True)
        print(
            f"{callers:2d} caller(s): submit p50/p90 {grow[0]:.2f}/{grow[1]:.2f} ms, "
            f"{grow[2]:.0f} msgs/s with a growing WAL; {ahead[0]:.2f}/{ahead[1]:.2f} ms, "
            f"{ahead[2]:.0f} msgs/s written ahead: p50 {ahead[0] / grow[0]:.2f}×, "
            f"rate {ahead[2] / grow[2]:.2f}×"
        )


if __name__ == "__main__":
    main()
