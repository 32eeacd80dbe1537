"""/metrics for the whole node when ``server.workers > 1``: every worker's counters, summed.

Only worker 0 runs the admin listener, and each worker counts its own sessions, messages and
deliveries. So every other worker writes a snapshot of its counters to
``<data_dir>/run/metrics-w<i>.json`` every `INTERVAL` seconds (a small JSON file replaced
atomically, written off the event loop), and worker 0 adds them to its own live figures when it
is scraped. What this costs and gives:

* a figure from another worker is at most `INTERVAL` seconds old;
* a worker that restarts starts its counters from zero, so the node's sum goes down: Prometheus
  reads that as a counter reset, as it does when a whole node restarts;
* a snapshot not renewed for `STALE_AFTER` seconds (its worker is gone) still counts for the
  counters, which stay until that worker's successor replaces the file, but not for the gauges
  (sessions open now, deliveries in flight, message bytes in memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygate.smtp.counters import SmtpCounters

__all__ = ["INTERVAL", "NodeFigures", "SnapshotWriter", "node_figures", "snapshot_path"]

log = logging.getLogger(__name__)

INTERVAL = 2.0
STALE_AFTER = 5 * INTERVAL


def snapshot_path(data_dir: Path, index: int) -> Path:
    return Path(data_dir) / "run" / f"metrics-w{index}.json"


@dataclass
class NodeFigures:
    """The figures /metrics shows that each process counts for itself."""

    smtp: SmtpCounters = field(default_factory=SmtpCounters)
    delivery: dict[str, int] = field(default_factory=dict)
    open_sessions: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    data_in_memory: int = 0

    def add(self, other: NodeFigures, *, gauges: bool = True) -> None:
        self.smtp.add(other.smtp)
        for key, value in other.delivery.items():
            self.delivery[key] = self.delivery.get(key, 0) + value
        if gauges:
            for name, value in other.open_sessions.items():
                self.open_sessions[name] = self.open_sessions.get(name, 0) + value
            self.in_flight += other.in_flight
            self.data_in_memory += other.data_in_memory


def own_figures(relay: Any) -> NodeFigures:
    """This process's live figures (``relay``: a `relaygate.app.Relay`, or any object with its
    ``ctx`` and ``manager``)."""
    ctx = getattr(relay, "ctx", None)
    manager = getattr(relay, "manager", None)
    stats: dict[str, int] = getattr(manager, "stats", None) or {}
    limits = getattr(ctx, "limits", None)
    memory = getattr(ctx, "data_memory", None)
    return NodeFigures(
        smtp=getattr(ctx, "counters", None) or SmtpCounters(),
        delivery={key: int(value) for key, value in stats.items()},  # the manager's counters
        open_sessions=dict(getattr(limits, "per_connector", {})),
        in_flight=int(getattr(manager, "in_flight", 0) or 0),
        data_in_memory=int(getattr(memory, "used", 0) or 0),
    )


def _encode(figures: NodeFigures) -> bytes:
    return json.dumps(
        {
            "written": time.time(),
            "pid": os.getpid(),
            "smtp": figures.smtp.snapshot(),
            "delivery": figures.delivery,
            "open_sessions": figures.open_sessions,
            "in_flight": figures.in_flight,
            "data_in_memory": figures.data_in_memory,
        }
    ).encode()


def _decode(raw: bytes) -> tuple[float, NodeFigures]:
    data = json.loads(raw)
    figures = NodeFigures(
        smtp=SmtpCounters.from_snapshot(data.get("smtp", {})),
        delivery={str(k): int(v) for k, v in data.get("delivery", {}).items()},
        open_sessions={str(k): int(v) for k, v in data.get("open_sessions", {}).items()},
        in_flight=int(data.get("in_flight", 0)),
        data_in_memory=int(data.get("data_in_memory", 0)),
    )
    return float(data.get("written", 0.0)), figures


def _write(path: Path, raw: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)  # a reader sees the old snapshot or the new one, never half of one


def node_figures(relay: Any) -> NodeFigures:
    """This process's figures, plus those the other workers of its node last wrote."""
    total = NodeFigures()
    total.add(own_figures(relay))
    config = relay.config
    index = getattr(relay, "worker_index", None)
    if index is None or config.server.workers <= 1:
        return total
    now = time.time()
    for other in range(config.server.workers):
        if other == index:
            continue
        path = snapshot_path(config.server.data_dir, other)
        try:
            written, figures = _decode(path.read_bytes())
        except FileNotFoundError:
            continue  # that worker has not written yet
        except (OSError, ValueError, TypeError) as exc:
            log.warning("cannot read the metrics of worker %d from %s: %s", other, path, exc)
            continue
        total.add(figures, gauges=now - written < STALE_AFTER)
    return total


class SnapshotWriter:
    """Writes this worker's figures every `INTERVAL` seconds (workers other than 0)."""

    def __init__(self, relay: Any, index: int) -> None:
        self.relay = relay
        self.path = snapshot_path(relay.config.server.data_dir, index)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(OSError):  # the last figures, for the counters' sake
            await asyncio.to_thread(_write, self.path, _encode(own_figures(self.relay)))

    async def _run(self) -> None:
        while True:
            try:
                await asyncio.to_thread(_write, self.path, _encode(own_figures(self.relay)))
            except OSError as exc:  # a full disk: /metrics lacks this worker for a while
                log.warning("cannot write this worker's metrics to %s: %s", self.path, exc)
            await asyncio.sleep(INTERVAL)
