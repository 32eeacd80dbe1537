"""bench/common.py's process helpers: a benchmark must not leave servers running that would load
the runs after it, and reads the CPU time of the processes it measures."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import context_switches, cpu_user_system, kill_group

# The leader forks a child that keeps running, prints the child's pid, and exits at once: what a
# floor server does when its first process fails and the forked one goes on serving.
FORK_AND_EXIT = """
import os, sys, time
pid = os.fork()
if pid == 0:
    time.sleep(60)
    os._exit(0)
print(pid, flush=True)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): it is gone once its state is Z.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(30)
def test_kill_group_ends_the_group_after_its_leader_has_exited() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", FORK_AND_EXIT], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.wait(timeout=10)
    assert _alive(child)
    kill_group(proc)
    deadline = time.monotonic() + 5
    while _alive(child):
        assert time.monotonic() < deadline, "the leader's orphaned child is still running"
        time.sleep(0.05)


def test_cpu_user_system_reads_this_process_and_skips_the_gone() -> None:
    """bench/ab.py's CPU per message: user and system time of the relay's processes."""
    user0, system0 = cpu_user_system([os.getpid()])
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn user time
        sum(range(1000))
    user1, system1 = cpu_user_system([os.getpid(), 2**22 + 7])  # a pid that is not there
    assert user1 - user0 >= 0.15
    assert system1 >= system0


def test_context_switches_count_every_thread_of_the_processes() -> None:
    """bench/ab.py's switches per message: a thread of this process that blocks 20 times adds at
    least 20 voluntary switches (counted while it is alive); a pid that is gone counts nothing."""
    v0, _ = context_switches([os.getpid()])
    slept, finish = threading.Event(), threading.Event()

    def sleeper() -> None:
        for _ in range(20):
            time.sleep(0.002)  # each sleep blocks the thread: one voluntary switch at least
        slept.set()
        finish.wait(10)

    t = threading.Thread(target=sleeper)
    t.start()
    try:
        assert slept.wait(10)
        v1, i1 = context_switches([os.getpid(), 2**22 + 7])
    finally:
        finish.set()
        t.join()
    assert v1 - v0 >= 20
    assert i1 >= 0
    assert context_switches([2**22 + 7]) == (0, 0)
