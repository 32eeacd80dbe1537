"""/metrics for the whole node when ``server.workers > 1``: every worker's counters, summed.

Only worker 0 runs the admin listener, and each worker counts its own sessions, messages and
deliveries. So every other worker writes a snapshot of its counters to
``<data_dir>/run/metrics-w<i>.json`` every `INTERVAL` seconds (a small JSON file replaced
atomically, written off the event loop), and worker 0 adds them to its own live figures when it
is scraped. What this costs and gives:

* a figure from another worker is at most `INTERVAL` seconds old;
* the node's counters never go down while worker 0 runs (Prometheus would read a drop as a reset
  and count the whole new value, the other workers' totals, as an increase): a worker that
  restarts starts its own counters from zero, so worker 0 (`NodeSums`) keeps the last figures of
  the worker's previous process, told apart by the pid in the snapshot, and adds them to the sum.
  What a worker counted after its last snapshot before it died (at most `INTERVAL` seconds) is
  lost;
* the node's counters start from zero when worker 0 starts, as when a whole node restarts: the
  supervisor removes the snapshots of a previous run before it starts the workers
  (`clear_snapshots`), and a restarted worker 0 counts the others from what they had when it
  started (their figures before are not counted again);
* a snapshot not renewed for `STALE_AFTER` seconds (its worker is gone) still counts for the
  counters, but not for the gauges (sessions open now, deliveries in flight, message bytes in
  memory).
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

__all__ = [
    "INTERVAL",
    "NodeFigures",
    "NodeSums",
    "SnapshotWriter",
    "clear_snapshots",
    "node_figures",
    "snapshot_path",
]

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

    def counters_since(self, base: NodeFigures) -> NodeFigures:
        """These figures with `base`'s counters taken off (`base`: an earlier snapshot of the same
        process); the gauges are these."""
        out = NodeFigures(
            open_sessions=dict(self.open_sessions),
            in_flight=self.in_flight,
            data_in_memory=self.data_in_memory,
        )
        out.smtp.add(self.smtp)
        smtp, old = out.smtp, base.smtp
        for mine, theirs in (
            (smtp.sessions, old.sessions),
            (smtp.connections_refused, old.connections_refused),
            (smtp.messages, old.messages),
            (smtp.bytes, old.bytes),
        ):
            mine.subtract(theirs)
        smtp.refusals.subtract(old.refusals)
        out.delivery = {k: v - base.delivery.get(k, 0) for k, v in self.delivery.items()}
        return out


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


def _decode(raw: bytes) -> tuple[float, int, NodeFigures]:
    data = json.loads(raw)
    figures = NodeFigures(
        smtp=SmtpCounters.from_snapshot(data.get("smtp", {})),
        delivery={str(k): int(v) for k, v in data.get("delivery", {}).items()},
        open_sessions={str(k): int(v) for k, v in data.get("open_sessions", {}).items()},
        in_flight=int(data.get("in_flight", 0)),
        data_in_memory=int(data.get("data_in_memory", 0)),
    )
    return float(data.get("written", 0.0)), int(data.get("pid", 0)), figures


def _write(path: Path, raw: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(raw)
    os.replace(tmp, path)  # a reader sees the old snapshot or the new one, never half of one


def clear_snapshots(data_dir: Path) -> None:
    """Remove the snapshots of a previous run (the supervisor, before it starts any worker)."""
    for path in (Path(data_dir) / "run").glob("metrics-w*.json*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass
class _Process:
    """A worker process as worker 0 has seen it through its snapshots."""

    pid: int
    #: its figures when worker 0 started (counted before: not this run of worker 0's)
    base: NodeFigures
    last: NodeFigures


class NodeSums:
    """Worker 0's view of the other workers (see the module doc): their figures summed so that the
    node's counters do not go down when one of them restarts. Created when worker 0 starts."""

    def __init__(self, data_dir: Path, workers: int, index: int) -> None:
        self.data_dir = Path(data_dir)
        self.others = [i for i in range(workers) if i != index]
        self._seen: dict[int, _Process] = {}
        #: the counters of the earlier processes of the other workers, since worker 0 started
        self.gone = NodeFigures()
        for other, (_written, pid, figures) in self._read().items():
            self._seen[other] = _Process(pid, figures, figures)

    def _read(self) -> dict[int, tuple[float, int, NodeFigures]]:
        found = {}
        for other in self.others:
            path = snapshot_path(self.data_dir, other)
            try:
                found[other] = _decode(path.read_bytes())
            except FileNotFoundError:
                continue  # that worker has not written yet
            except (OSError, ValueError, TypeError) as exc:
                log.warning("cannot read the metrics of worker %d from %s: %s", other, path, exc)
        return found

    def add_to(self, total: NodeFigures) -> None:
        now = time.time()
        found = self._read()
        for other, (written, pid, figures) in found.items():
            seen = self._seen.get(other)
            if seen is not None and seen.pid != pid:  # restarted: keep what it had counted
                self.gone.add(seen.last.counters_since(seen.base), gauges=False)
                seen = None
            if seen is None:
                seen = self._seen[other] = _Process(pid, NodeFigures(), figures)
            seen.last = figures
            total.add(figures.counters_since(seen.base), gauges=now - written < STALE_AFTER)
        for other, seen in self._seen.items():  # a snapshot removed or unreadable: its last
            if other not in found:
                total.add(seen.last.counters_since(seen.base), gauges=False)
        total.add(self.gone, gauges=False)


def node_figures(relay: Any) -> NodeFigures:
    """This process's figures, plus those the other workers of its node last wrote."""
    total = NodeFigures()
    total.add(own_figures(relay))
    config = relay.config
    index = getattr(relay, "worker_index", None)
    if index is None or config.server.workers <= 1:
        return total
    sums = getattr(relay, "node_sums", None)
    if sums is None:  # not made at start (a test's relay): from now on
        sums = NodeSums(config.server.data_dir, config.server.workers, index)
        relay.node_sums = sums
    sums.add_to(total)
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
