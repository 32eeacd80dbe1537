"""RateLimiter per message (MAIL's `allowed` + the queued message's `record`), this tree against a
baseline revision's smtp/limits.py, in one process, interleaved.

    .venv/bin/python bench/rate_limiter.py [--baseline 5cc9550] [--n 100000] [--rounds 7]

Cases: a connector without message_rate_limit (the default); IPAddress in one process; IPAddress
in a worker whose listeners steer by client address (shared table present, address counted in
the process); and, this tree only, User in the shared table (what a worker pays for a user's
limit to hold across workers). Prints the best round's ns per message for each; the default
cases must not be slower than the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from relaygate.config.model import ReceiveConnector
from relaygate.smtp import limits
from relaygate.smtp.shared_rates import SharedRateTable, create

ROOT = Path(__file__).resolve().parents[1]


def baseline_module(rev: str, folder: Path) -> ModuleType:
    """smtp/limits.py as it was at `rev`, imported under another name."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:src/relaygate/smtp/limits.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = folder / "baseline_limits.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_limits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def per_message(rates: Any, connector: ReceiveConnector, n: int, user: str | None) -> float:
    """ns per allowed + record, over `n` messages from 256 addresses."""
    sources = [f"10.0.{i // 256}.{i % 256}" for i in range(256)]
    allowed, record = rates.allowed, rates.record
    started = time.perf_counter_ns()
    for i in range(n):
        source = sources[i & 255]
        if allowed(connector, source, user=user):
            record(connector, source, user=user)
    return (time.perf_counter_ns() - started) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default="5cc9550", help="git revision to compare with")
    ap.add_argument("--n", type=int, default=100_000, help="messages per round")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()

    unlimited = ReceiveConnector(name="c")
    by_ip = ReceiveConnector(name="c", message_rate_limit=10**9, message_rate_source="IPAddress")
    by_user = ReceiveConnector(name="c", message_rate_limit=10**9, message_rate_source="User")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        old = baseline_module(args.baseline, folder)
        table_file = folder / "message-rates"
        token = create(table_file)

        def worker() -> limits.RateLimiter:
            return limits.RateLimiter(SharedRateTable.open(table_file, token))

        cases: list[tuple[str, Any, Any, ReceiveConnector, str | None]] = [
            ("no message_rate_limit", old.RateLimiter, limits.RateLimiter, unlimited, None),
            ("IPAddress, one process", old.RateLimiter, limits.RateLimiter, by_ip, None),
            ("IPAddress, steered worker", old.RateLimiter, worker, by_ip, None),
            ("User, worker (shared table)", None, worker, by_user, "scanner"),
        ]
        print(f"ns per message (allowed + record), best of {args.rounds} x {args.n:,}")
        print(f"{'case':32} {'baseline ' + args.baseline:>18} {'this tree':>12} {'ratio':>7}")
        for name, make_old, make_new, connector, user in cases:
            best_old, best_new = float("inf"), float("inf")
            for _ in range(args.rounds):  # interleaved: the machine's noise hits both alike
                if make_old is not None:
                    best_old = min(best_old, per_message(make_old(), connector, args.n, user))
                best_new = min(best_new, per_message(make_new(), connector, args.n, user))
            if make_old is None:
                print(f"{name:32} {'-':>18} {best_new:12.0f} {'-':>7}")
            else:
                ratio = best_new / best_old
                print(f"{name:32} {best_old:18.0f} {best_new:12.0f} {ratio:7.3f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
