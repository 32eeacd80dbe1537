#!/usr/bin/env python3
"""What delivering one message costs the event loop: RelayGate's queue manager against a lean deliverer.

    .venv/bin/python bench/delivery_cost.py [--messages 1000] [--reps 2] [--json FILE]

At 1 session the previous message's delivery shares the event loop with the next connection's
commands (docs/benchmarks.md, eighth session: 750 µs of a 1,883 µs message cycle), and at 10
sessions its CPU is part of every message's. This measures that cost on its own. Both deliver
the same 10 KB message to Postfix's smtp-sink on loopback, one message at a time, on uvloop, with
the same bookkeeping: the message is in RelayGate's SqliteStore, leased; after the sink's 250 the
recipient's result is recorded and the lease dropped (`record_results`), and a SEND event goes to
the message tracking log.

- `relaygate`: `QueueManager.process_message(msg, data)`, as a message handed over by the
  receiving session is delivered (routing, next hops, the SMTP client with its connection pool
  and PIPELINING, results, tracking);
- `lean`: one connection kept open, MAIL, RCPT and DATA pipelined in one write, the body, the
  replies read with a StreamReader. Nothing else: no routing, failover, TLS, AUTH, checks of the
  content, connection limits; not a design to ship, the least a delivery with this bookkeeping
  does.

The modes take turns, `--reps` times each. Prints the event loop thread's CPU per message
(`time.thread_time`, so the store's writer thread is not counted) and the wall time per message,
the medians, and relaygate / lean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Sink
from floor_server import Connected
from relaygate_sut import CONFIG

from relaygate.app import tune_gc
from relaygate.config import load_config
from relaygate.delivery.client import ConnectionPool
from relaygate.delivery.wire import dot_stuff
from relaygate.logs.tracking import TrackingLog
from relaygate.queue.bounce import header_value
from relaygate.queue.manager import QueueManager
from relaygate.queue.model import (
    LINE_BREAKS,
    LINE_BREAKS_CRLF,
    Envelope,
    RecipientState,
    RecipientStatus,
    StoredMessage,
)
from relaygate.queue.sqlite_store import SqliteStore

BODY = b"Subject: bench\r\nMessage-ID: <bench@bench.example>\r\n\r\n" + (b"y" * 76 + b"\r\n") * 130
SENDER, RECIPIENT = "bench@bench.example", "rcpt@remote.example"
WARMUP = 50  # messages delivered before the clock starts: the connection, caches, the WAL
OWNER = "bench-delivery"
MODES = ("relaygate", "lean")


class LeanDeliverer(Connected):
    def __init__(self, port: int, store: SqliteStore, tracking: TrackingLog) -> None:
        super().__init__("127.0.0.1", port, helo="relaygate-bench.localdomain")
        self.store = store
        self.tracking = tracking

    async def deliver(self, queue_id: str, data: bytes) -> None:
        if self.writer is None:
            await self._connect()
        assert self.writer is not None
        self.writer.write(
            f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<{RECIPIENT}>\r\nDATA\r\n".encode("ascii")
        )
        for _ in range(3):
            await self._reply()
        self.writer.write(dot_stuff(data) + b".\r\n")
        line = (await self._reply()).decode("utf-8", "replace").rstrip("\r\n")
        if not line.startswith("250"):
            raise RuntimeError(f"the sink refused the message: {line}")
        state = RecipientState(RECIPIENT, RecipientStatus.DELIVERED, 1, line, time.time(), None)
        await self.store.record_results(queue_id, OWNER, [state], release=True)
        self.tracking.write(
            "SEND",
            "SMTP",
            internal_message_id=queue_id,
            message_id="<bench@bench.example>",
            recipients=[RECIPIENT],
            recipient_status=[line],
            sender=SENDER,
            return_path=SENDER,
            total_bytes=len(data),
            message_subject=header_value(data, "Subject"),
        )


async def measure(workdir: Path, config_path: Path, sink_port: int, mode: str, n: int) -> dict:
    """One run of `mode`: `n` timed messages after WARMUP; CPU and wall µs per message."""
    config = load_config(config_path)
    run_dir = Path(tempfile.mkdtemp(dir=workdir, prefix=f"{mode}-"))
    store = SqliteStore(run_dir / "queue.db")
    await store.open()
    tracking = TrackingLog(run_dir / "MessageTracking", server_name="BENCH01")
    envelope = Envelope(
        sender=SENDER,
        recipients=[RECIPIENT],
        client_ip="127.0.0.1",
        connector="Bench Relay",
        message_id="<bench@bench.example>",
        metadata={LINE_BREAKS: LINE_BREAKS_CRLF},  # as the session records it (bare LF refused)
    )
    manager = QueueManager(config, store, tracking=tracking, node_id=OWNER)
    manager.pool = ConnectionPool()  # not start(): its scan loop would lease these messages too
    lean = LeanDeliverer(sink_port, store, tracking)
    try:
        messages = []
        for _ in range(n + WARMUP):
            lease = (OWNER, time.time() + 1800)
            queue_id = await store.submit(envelope, BODY, lease=lease)
            messages.append(
                StoredMessage.new(
                    queue_id, envelope, size=len(BODY), received_at=time.time(), lease=lease
                )
            )
        tune_gc()  # as a RelayGate worker runs
        cpu = wall = 0.0
        for i, msg in enumerate(messages):
            c0, w0 = time.thread_time(), time.perf_counter()
            if mode == "relaygate":
                await manager.process_message(msg, BODY)
            else:
                await lean.deliver(msg.queue_id, BODY)
            if i >= WARMUP:
                cpu += time.thread_time() - c0
                wall += time.perf_counter() - w0
        delivered = sum(
            1
            for m in await store.list_messages(limit=n + WARMUP)
            if m.recipients[0].status == RecipientStatus.DELIVERED
        )
    finally:
        lean.close()
        await manager.pool.aclose()
        await store.close()
        tracking.close()
    return {
        "mode": mode,
        "messages": n,
        "cpu_us": cpu / n * 1e6,
        "wall_us": wall / n * 1e6,
        "delivered_in_store": delivered,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=1000, help="timed messages per run")
    ap.add_argument("--reps", type=int, default=2, help="runs of each mode, taking turns")
    ap.add_argument("--json", type=Path, help="write the runs and the medians to this file")
    args = ap.parse_args(argv)
    if args.messages < 1 or args.reps < 1:
        ap.error("--messages and --reps must be at least 1")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="relaygate-delivery-") as tmp:
        workdir = Path(tmp)
        sink = Sink(workdir).start()
        try:
            config = workdir / "relaygate.toml"
            config.write_text(
                CONFIG.format(
                    data=workdir / "data",
                    port=2525,  # never bound: only the send connector is used
                    sink_port=sink.port,
                    max_conn=100,
                    server_extra="",
                    queue_section="",
                )
            )
            for rep in range(args.reps):
                for mode in MODES if rep % 2 == 0 else MODES[::-1]:
                    row = uvloop.run(measure(workdir, config, sink.port, mode, args.messages))
                    row["rep"] = rep
                    rows.append(row)
                    print(
                        f"{mode:9s} rep={rep} event loop CPU {row['cpu_us']:6.0f} µs/msg, "
                        f"wall {row['wall_us']:6.0f} µs/msg, "
                        f"{row['delivered_in_store']} Delivered in the store",
                        flush=True,
                    )
            expected = args.reps * len(MODES) * (args.messages + WARMUP)
            received, _ = sink.wait_for(expected, stall=5.0, cap=30.0)
        finally:
            sink.stop()
    medians = {
        mode: {
            key: statistics.median(r[key] for r in rows if r["mode"] == mode)
            for key in ("cpu_us", "wall_us")
        }
        for mode in MODES
    }
    rg, lean = medians["relaygate"], medians["lean"]
    print(
        f"\nmedians: relaygate {rg['cpu_us']:.0f} µs CPU / {rg['wall_us']:.0f} µs wall per message, "
        f"lean {lean['cpu_us']:.0f} / {lean['wall_us']:.0f}; relaygate / lean: "
        f"CPU {rg['cpu_us'] / lean['cpu_us']:.2f}×, wall {rg['wall_us'] / lean['wall_us']:.2f}×"
    )
    print(f"the sink received {received} of {expected} messages")
    if args.json:
        args.json.write_text(
            json.dumps({"rows": rows, "medians": medians, "sink_received": received}, indent=1)
        )
    return 0 if received == expected else 1


if __name__ == "__main__":
    sys.exit(main())
