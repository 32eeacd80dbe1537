#!/usr/bin/env python3
"""RelayGate against a variant of itself, in alternating pairs: is a change to the relay worth it?

    .venv/bin/python bench/ab.py --variant DIR [--env NAME=VALUE ...] [--sessions 10]
        [--messages 4000] [--pairs 3] [--size 10] [--workers auto] [--json FILE]
    .venv/bin/python bench/ab.py --env NAME=VALUE ...      # the same code, switched by environment
    .venv/bin/python bench/ab.py --python OTHER/bin/python # the same code on another interpreter
    .venv/bin/python bench/ab.py --b-postgresql           # B keeps its queue in PostgreSQL

A is this checkout's relay. B is the relay imported from DIR (a patched copy of `src/`, put first on
PYTHONPATH), with the `--env` variables set, run by `--python` (another venv's interpreter with
relaygate installed, e.g. a newer CPython) when given; without them B is A. With --b-postgresql
B's queue is a fresh database on a throwaway PostgreSQL server started for the run (the tests'
launcher, tests/support/postgres.py; Debian package postgresql), A's the default SQLite store.
Each run starts a fresh `relaygate serve` (the benchmark configuration of bench/run.py) and an
smtp-sink, sends 100 warm-up messages, then `--messages` with `smtp-source -s SESSIONS` and
reads over that timed run:
- accepted msgs/s (smtp-source's messages over its wall time);
- the relay's CPU per message, user and system, from /proc of its process tree;
- how many of the machine's CPUs were busy (/proc/stat), since a change that only moves work from
  one thread to another shows there and not in the rate;
- the relay's context switches per message, voluntary and involuntary, over all its threads;
- the messages counted at the sink, which must be all of them, each once.
A and B take turns (ABBA...), so a drift in the machine's speed reaches both. Prints each run, the
medians and B / A. The earlier sessions of docs/benchmarks.md ran their scratch variants this way;
the same relay code measured 828-1,103 msgs/s at 10 sessions across one session's runs, so a
difference needs several pairs, and one under ~15 % is not seen in one pair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    VENV_BIN,
    Sink,
    context_switches,
    cpu_user_system,
    have_postfix_tools,
    process_tree,
    smtp_source,
)
from relaygate_sut import RelayGateSystem

WARMUP = 100


def parse_env(items: list[str]) -> dict[str, str]:
    """NAME=VALUE pairs; raises ValueError naming the bad one."""
    env: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not name.replace("_", "").isalnum():
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
        env[name] = value
    return env


def variant_env(variant: Path | None, env: dict[str, str]) -> dict[str, str]:
    """The environment of B's relay: `env`, and DIR first on PYTHONPATH."""
    out = dict(env)
    if variant is not None:
        path = [str(variant.resolve())]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        out["PYTHONPATH"] = os.pathsep.join(path)
    return out


def default_python() -> Path:
    python = VENV_BIN / "python"
    return python if python.exists() else Path(sys.executable)


def imported_from(env: dict[str, str], python: Path | None = None) -> Path:
    """Where a relay started with `env` (and `python`) imports relaygate from (checked before any
    run)."""
    out = subprocess.run(
        [
            str(python or default_python()),
            "-c",
            "import relaygate; print(relaygate.__file__)",
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return Path(out.stdout.strip()).resolve().parent


def postgres_server() -> Any:
    """The tests' throwaway PostgreSQL server (tests/support/postgres.py), not yet started."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.support.postgres import PostgresServer

    return PostgresServer()


def _machine() -> list[int]:
    with open("/proc/stat") as f:
        return [int(x) for x in f.readline().split()[1:]]


def busy_cpus(before: list[int], after: list[int]) -> float:
    """CPUs busy on average between two /proc/stat samples (idle and iowait count as not busy)."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta)
    if total <= 0:
        return 0.0
    idle = delta[3] + (delta[4] if len(delta) > 4 else 0)
    return (total - idle) / total * (os.cpu_count() or 1)


def _source(port: int, sessions: int, messages: int, size_kb: int) -> None:
    rc, _wall, err = smtp_source(port, sessions, messages, size_kb * 1024, timeout=600)
    if rc != 0:
        raise RuntimeError(f"smtp-source exit {rc}: {err[-300:]}")


def interpreter(python: Path) -> str:
    """`Python 3.13.0` for the header: which interpreter a side runs."""
    out = subprocess.run(
        [str(python), "-c", "import sys; print(sys.version.split()[0])"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return f"Python {out.stdout.strip()}"


def run_once(
    label: str,
    env: dict[str, str],
    args: argparse.Namespace,
    python: Path | None = None,
    database_url: str | None = None,
) -> dict[str, Any]:
    """One fresh relay, one timed smtp-source run (its queue in ``database_url`` if given)."""
    queue = f'store = "postgresql"\ndatabase_url = "{database_url}"\n' if database_url else ""
    with tempfile.TemporaryDirectory(prefix="relaygate-ab-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        sink = Sink(work).start()
        relay = RelayGateSystem(
            work,
            sink.port,
            server_extra=f"workers = {json.dumps(args.workers)}\n",
            queue_extra=queue,
            env=env,
            python=python,
        )
        try:
            relay.start()
            _source(relay.port, args.sessions, WARMUP, args.size)
            pids = process_tree(relay.roots())
            u0, s0 = cpu_user_system(pids)
            v0, i0 = context_switches(pids)
            m0 = _machine()
            started = time.monotonic()
            _source(relay.port, args.sessions, args.messages, args.size)
            elapsed = time.monotonic() - started
            m1 = _machine()
            u1, s1 = cpu_user_system(pids)
            v1, i1 = context_switches(pids)
            expected = WARMUP + args.messages
            got = sink.settled_count(expected, stall=5.0, cap=60.0)
        finally:
            relay.stop()
            sink.stop()
    return {
        "system": label,
        "accepted_per_s": args.messages / elapsed,
        "user_ms_per_msg": (u1 - u0) * 1000 / args.messages,
        "system_ms_per_msg": (s1 - s0) * 1000 / args.messages,
        "busy_cpus": busy_cpus(m0, m1),
        "voluntary_switches_per_msg": (v1 - v0) / args.messages,
        "involuntary_switches_per_msg": (i1 - i0) / args.messages,
        "at_sink": got,
        "expected_at_sink": expected,
    }


def sink_mismatches(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose sink did not count each message exactly once: fewer is a loss, more a duplicate
    (the scratch variant of the thirteenth session delivered 4,105-4,114 of 4,100)."""
    return [r for r in rows if r["at_sink"] != r["expected_at_sink"]]


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for label in ("A", "B"):
        mine = [r for r in rows if r["system"] == label]
        out[label] = {
            key: _median(mine, key)
            for key in (
                "accepted_per_s",
                "user_ms_per_msg",
                "system_ms_per_msg",
                "busy_cpus",
                "voluntary_switches_per_msg",
                "involuntary_switches_per_msg",
            )
        }
    a, b = out["A"], out["B"]
    out["B/A"] = {
        "accepted_per_s": b["accepted_per_s"] / a["accepted_per_s"],
        "cpu_per_msg": (b["user_ms_per_msg"] + b["system_ms_per_msg"])
        / max(a["user_ms_per_msg"] + a["system_ms_per_msg"], 1e-9),
    }
    return out


def _switches(r: dict[str, Any]) -> str:
    return (
        f"{r['voluntary_switches_per_msg']:.1f} voluntary + "
        f"{r['involuntary_switches_per_msg']:.1f} involuntary"
    )


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['system']}  {r['accepted_per_s']:7.0f} msgs/s  CPU {r['user_ms_per_msg']:.2f} user + "
        f"{r['system_ms_per_msg']:.2f} sys ms/msg  switches/msg "
        f"{r['voluntary_switches_per_msg']:.1f} vol + {r['involuntary_switches_per_msg']:.1f} invol  "
        f"machine {r['busy_cpus']:.2f} CPUs busy  sink {r['at_sink']}/{r['expected_at_sink']}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--variant", type=Path, help="a copy of src/ holding the changed relaygate")
    ap.add_argument("--env", action="append", default=[], help="NAME=VALUE for B's relay")
    ap.add_argument(
        "--python",
        type=Path,
        help="B's interpreter (another venv's bin/python with relaygate installed)",
    )
    ap.add_argument(
        "--b-postgresql",
        action="store_true",
        help="B keeps its queue in PostgreSQL (a throwaway server), A in SQLite",
    )
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--messages", type=int, default=4000, help="timed messages per run")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--size", type=int, default=10, help="KB per message")
    ap.add_argument("--workers", default="auto", help='server.workers (a number or "auto")')
    ap.add_argument("--json", type=Path, help="write the runs and the medians to this file")
    args = ap.parse_args(argv)
    if args.sessions < 1 or args.messages < 1 or args.pairs < 1 or args.size < 1:
        ap.error("--sessions, --messages, --pairs and --size must be at least 1")
    if args.workers != "auto":
        try:
            args.workers = int(args.workers)
        except ValueError:
            ap.error(f'--workers {args.workers!r}: a number or "auto"')
    try:
        env = parse_env(args.env)
    except ValueError as exc:
        ap.error(str(exc))
    if args.variant is None and not env and args.python is None and not args.b_postgresql:
        ap.error(
            "nothing to compare: give --variant DIR, --env NAME=VALUE, --python PATH "
            "or --b-postgresql"
        )
    if args.python is not None and not os.access(args.python, os.X_OK):
        ap.error(f"--python {args.python}: not an executable")
    if args.variant is not None and not (args.variant / "relaygate" / "__init__.py").is_file():
        ap.error(f"--variant {args.variant}: no relaygate package there (expected a copy of src/)")
    if not have_postfix_tools():
        print("smtp-source and smtp-sink are needed (Debian package postfix)", file=sys.stderr)
        return 2
    b_env = variant_env(args.variant, env)
    b_python = args.python
    try:
        b_where = imported_from(b_env, b_python)
    except subprocess.CalledProcessError as exc:
        print(f"B cannot import relaygate: {exc.stderr.strip()[-300:]}", file=sys.stderr)
        return 2
    if args.variant is not None and b_where != (args.variant / "relaygate").resolve():
        print(f"B would import relaygate from {b_where}, not from --variant", file=sys.stderr)
        return 2
    print(
        f"A: {imported_from({})}, {interpreter(default_python())}\n"
        f"B: {b_where}, {interpreter(b_python or default_python())}"
        + (f" with {' '.join(args.env)}" if args.env else "")
        + (", queue in PostgreSQL" if args.b_postgresql else ""),
        flush=True,
    )
    rows: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_server()) if args.b_postgresql else None
        for pair in range(args.pairs):
            order = ("A", "B") if pair % 2 == 0 else ("B", "A")
            for label in order:
                b_side = label == "B"
                url = pg.create_database() if pg is not None and b_side else None
                row = run_once(
                    label, b_env if b_side else {}, args, b_python if b_side else None, url
                )
                if url is not None and pg is not None:
                    pg.drop_database(url.rsplit("/", 1)[1])
                row["pair"] = pair
                rows.append(row)
                print(_line(row), flush=True)
    wrong = sink_mismatches(rows)
    summary = summarise(rows)
    print(
        f"\nmedians of {args.pairs} pair(s), {args.sessions} session(s), {args.size} KB:\n"
        f"  A {summary['A']['accepted_per_s']:.0f} msgs/s, B {summary['B']['accepted_per_s']:.0f}"
        f" msgs/s: B / A {summary['B/A']['accepted_per_s']:.2f}×;"
        f" CPU per message B / A {summary['B/A']['cpu_per_msg']:.2f}×;\n"
        f"  context switches per message A {_switches(summary['A'])}, B {_switches(summary['B'])}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args)
                    | {"variant": str(args.variant), "python": str(args.python), "json": None},
                    "runs": rows,
                    "summary": summary,
                },
                indent=2,
            )
            + "\n"
        )
    if wrong:
        print(
            f"{len(wrong)} run(s) did not get exactly every message to the sink once: "
            + ", ".join(f"{r['system']} {r['at_sink']}/{r['expected_at_sink']}" for r in wrong)
            + " (fewer: lost or stuck; more: delivered twice, or reports to the sender)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
