"""Waiting for a `relaygate serve` subprocess to say it is ready.

`relaygate serve` prints ``RelayGate ready: ...`` on stdout once every listener accepts (its
supervisor does, for its workers). The tests that run it as a subprocess wait for that line in a
thread, so that a relay that never prints it (and never closes stdout) cannot hang the test.
"""

from __future__ import annotations

import subprocess
import threading

__all__ = ["READY_TIMEOUT", "wait_for_ready_line"]

#: How long a relay may take to start under a loaded CI machine.
READY_TIMEOUT = 60.0


def wait_for_ready_line(
    proc: subprocess.Popen[bytes], timeout: float = READY_TIMEOUT
) -> bytes | None:
    """The ``RelayGate ready`` line `proc` printed on its stdout (a pipe), or None if it did not
    within `timeout` seconds (or its stdout ended first). Lines before it are read and dropped."""
    found: list[bytes] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith(b"RelayGate ready"):
                found.append(line)
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return found[0] if found else None
