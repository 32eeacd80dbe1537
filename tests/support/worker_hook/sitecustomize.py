"""A test hook for the worker processes of `relaygate serve` (tests/logs/test_worker_output.py).

A test puts this directory first on PYTHONPATH: Python imports this module at the start of every
process it runs (the supervisor, its workers, anything they start); only a worker (``--worker-index``
on its command line) takes the signals below, or with RELAYGATE_TEST_HOOK=serve any process of
``relaygate serve`` (one that runs alone: ``server.workers = 1``).

* SIGUSR1: the worker writes a traceback to its stderr, starts a process that inherits its stderr
  and writes ``last line of worker <pid>`` there once the worker is gone (reaped by its
  supervisor), and dies (os._exit(3)). Those are all the dead worker's lines: its pipe ends when
  both are gone.
* SIGUSR2: the worker logs 160 lines of 32 KiB (5 MiB) through the service log, and goes on.

With RELAYGATE_TEST_HOOK=crash, ``relaygate serve`` (one process) logs 20 lines of 32 KiB where
it would start its event loop, then an exception nothing catches ends it (a bug at start).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from typing import Any

# Waits until the worker (argv[1]) is gone from /proc (its supervisor reaped it), then writes its
# last line to the stderr it inherited.
_LAST_WRITER = """\
import os, sys, time
worker = sys.argv[1]
deadline = time.monotonic() + 10
while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
    time.sleep(0.005)
os.write(2, f"last line of worker {worker}\\n".encode())
"""


def _crash(_signum: int, _frame: Any) -> None:
    pid = os.getpid()
    os.write(
        2,
        b"Traceback (most recent call last):\n"
        + b'  File "relaygate/app.py", line 1, in <module>\n' * 40
        + f"RuntimeError: worker {pid} crashes (test)\n".encode(),
    )
    subprocess.Popen(
        [sys.executable, "-c", _LAST_WRITER, str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    os._exit(3)


def _log_burst(_signum: int, _frame: Any) -> None:
    log = logging.getLogger("relaygate.test")
    for i in range(160):
        log.warning("burst %d of worker %d %s", i, os.getpid(), "w" * 32000)


def _crash_at_start(coro: Any) -> None:
    coro.close()  # never run
    log = logging.getLogger("relaygate.test")
    for i in range(20):
        log.warning("line %d before the crash %s", i, "c" * 32000)
    raise RuntimeError("the relay crashes at start (test)")


if os.environ.get("RELAYGATE_TEST_HOOK") == "crash" and "serve" in sys.argv:
    import asyncio

    asyncio.run = _crash_at_start

# RELAYGATE_TEST_HOOK=serve: in a single-process relay (server.workers = 1) too.
if "--worker-index" in sys.argv or (
    os.environ.get("RELAYGATE_TEST_HOOK") == "serve" and "serve" in sys.argv
):
    signal.signal(signal.SIGUSR1, _crash)
    signal.signal(signal.SIGUSR2, _log_burst)
