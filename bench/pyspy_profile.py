#!/usr/bin/env python3
"""Profile RelayGate's receive path under smtp-source load with py-spy (`.venv/bin/pip install py-spy`).

Starts RelayGate (the benchmark configuration) and an smtp-sink, drives it with
`smtp-source -s SESSIONS` with 10 KB messages while `py-spy record` samples the relay (all threads,
native frames off), then prints the top functions by own time and by inclusive time, per thread
(event loop vs the queue writer thread), from py-spy's collapsed-stack output. Bounded by --duration.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SMTP_SOURCE, VENV_BIN, Sink, kill_group
from relaygate_sut import RelayGateSystem


def py_spy() -> str | None:
    exe = VENV_BIN / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


_BOILERPLATE = ("<module>", "run (relaygate/app.py)", "main (relaygate/cli", "Thread.")
_BOILERPLATE_PATHS = ("typer/", "click/", "asyncio/runners.py", "relaygate/cli/", "threading.py")


def _function(frame: str) -> str:
    """'func (path/file.py:123)' → 'func (path/file.py)'."""
    name, sep, where = frame.rpartition(" (")
    if not sep:
        return frame
    return f"{name} ({where.rsplit(':', 1)[0]})" if ":" in where else frame


def analyse(collapsed: Path, top: int = 20) -> str:
    own_fn: collections.Counter[str] = collections.Counter()
    own_line: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    threads: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        n = int(count_text)
        total += n
        frames = stack.split(";")
        thread = frames[0] if frames and frames[0].startswith(("thread", "process")) else "?"
        threads[thread.split(": ", 1)[-1]] += n
        frames = [f for f in frames if not f.startswith(("thread ", "process "))]
        if not frames:
            continue
        own_line[frames[-1]] += n
        own_fn[_function(frames[-1])] += n
        for f in {_function(f) for f in frames}:
            if not f.startswith(_BOILERPLATE) and not any(b in f for b in _BOILERPLATE_PATHS):
                incl[f] += n
    if not total:
        return "no samples"
    out = [f"{total} samples (active threads only)", "", "by thread:"]
    for t, n in threads.most_common(8):
        out.append(f"  {100 * n / total:5.1f}%  {t}")
    sections = (
        ("own time, by function", own_fn),
        ("own time, by line", own_line),
        ("inclusive time, by function", incl),
    )
    for title, counter in sections:
        out += ["", f"top {top}, {title}:"]
        for f, n in counter.most_common(top):
            out.append(f"  {100 * n / total:5.1f}%  {f}")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--size", type=int, default=10 * 1024)
    ap.add_argument("--duration", type=int, default=20, help="seconds of sampling")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--top", type=int, default=20, help="lines per table")
    ap.add_argument(
        "--out", type=Path, help="keep py-spy's collapsed stacks here (flamegraph input)"
    )
    args = ap.parse_args()
    spy = py_spy()
    if spy is None:
        print("py-spy not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="relaygate-prof-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        sink = Sink(work).start()
        rg = RelayGateSystem(work, sink.port)
        spy_proc = None
        stop = threading.Event()
        sent = [0]
        try:
            rg.start()
            pid = rg.roots()[0]

            def load() -> None:  # keep smtp-source busy for the whole sampling window
                while not stop.is_set():
                    subprocess.run(
                        [
                            SMTP_SOURCE,
                            "-s",
                            str(args.sessions),
                            "-m",
                            str(args.sessions * 20),
                            "-l",
                            str(args.size),
                            "-f",
                            "bench@bench.example",
                            "-t",
                            "rcpt@remote.example",
                            f"127.0.0.1:{rg.port}",
                        ],
                        capture_output=True,
                        timeout=120,
                    )
                    sent[0] += args.sessions * 20

            loader = threading.Thread(target=load, daemon=True)
            loader.start()
            time.sleep(2)
            raw = work / "profile.txt"
            spy_proc = subprocess.Popen(
                [
                    spy,
                    "record",
                    "-p",
                    str(pid),
                    "-r",
                    str(args.rate),
                    "-d",
                    str(args.duration),
                    "--format",
                    "raw",
                    "--threads",
                    "-o",
                    str(raw),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            t0 = time.monotonic()
            count0 = sink.count
            _out, err = spy_proc.communicate(timeout=args.duration + 60)
            rate = (sink.count - count0) / (time.monotonic() - t0)
            stop.set()
            loader.join(timeout=150)
            if spy_proc.returncode != 0 or not raw.exists():
                print(f"py-spy failed: {err.decode(errors='replace')[-500:]}", file=sys.stderr)
                return 1
            print(
                f"RelayGate under smtp-source -s {args.sessions} -l {args.size}: "
                f"~{rate:.0f} msgs/s delivered during sampling ({sent[0]} sent)\n"
            )
            print(analyse(raw, args.top))
            if args.out:
                shutil.copy(raw, args.out)
        finally:
            stop.set()
            kill_group(spy_proc)
            rg.stop()
            sink.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
