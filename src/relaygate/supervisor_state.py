"""The supervisor's state, declared once for the parts it is made of, and what they share.

`Supervisor` (workers.py) is one class put together from mixins, one seam each:
supervisor_start.py (starting the workers and reading their links), supervisor_reload.py
(reloads and the users file's copy). `Supervisor.__init__` sets what `_SupervisorState`
declares, so that each mixin is type-checked against the same attributes without importing the
class that combines them. Here too: the timings, `_Worker` (one worker's run) and the small
file and status helpers more than one part uses.
"""

from __future__ import annotations

import collections
import os
import selectors
import signal
import socket
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relaygate.config import Config
from relaygate.logs.service import StderrBuffer
from relaygate.logs.worker_output import WorkerOutput
from relaygate.node_connections import NodeConnections
from relaygate.sd_notify import Notifier
from relaygate.worker_link import HEARTBEAT_MAX

READY_TIMEOUT = 60.0  # a worker not listening after this long is killed (and restarted)
STOP_TIMEOUT = 40.0  # sessions 5 s + deliveries 10 s + store close, with room to spare
#: After a second SIGTERM/SIGINT: how long the workers have to cut short and close their stores.
HURRY_TIMEOUT = 5.0
OUTPUT_DRAIN_TIMEOUT = 5.0  # for the last lines of the workers once they all exited
#: How long the last lines of a worker that exited may take to come (its pipes to end) before
#: the supervisor logs the exit anyway (a process it started may hold its stderr for long).
EXIT_LINES_TIMEOUT = 2.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long before dying starts the backoff afresh
FILE_CHECK_INTERVAL = 2.0  # how often the supervisor looks for an edit of the config file


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    link: socket.socket | None = None
    buf: bytes = b""
    ready: dict[str, Any] | None = None
    started: float = 0.0
    failures: int = 0
    restart_at: float | None = None
    reload_pending: bool = False
    spawned: int = field(default=0)
    #: monotonic time of the worker's last line (ready, or a heartbeat from its event loop)
    answered: float = 0.0
    #: the worker's heartbeat interval, as its last heartbeat said (its own configuration's: it
    #: applies a reload after the supervisor, whose worker_hang_timeout may differ meanwhile)
    every: float = HEARTBEAT_MAX
    #: the threads passing this run's stderr and stdout on (logs/worker_output.py)
    outputs: list[WorkerOutput] = field(default_factory=list)
    #: monotonic time at which the supervisor saw this run exit (its exit is logged once its
    #: last lines were passed on: `_last_lines_passed`), or None
    exited_at: float | None = None
    #: the digest of the configuration text this run said it runs (at ready, then after each
    #: reload it was offered), or None while the supervisor waits for its answer
    runs: str | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class _SupervisorState:
    """The attributes `Supervisor` sets (see its class body and `__init__` for what each is)."""

    config: Config
    hold_fds: tuple[int, ...]
    acme: Any
    acme_directory_url: str
    config_path: Path
    count: int
    workers: list[_Worker]
    _sel: selectors.BaseSelector
    _signals: list[int]
    _wake_r: socket.socket
    _wake_w: socket.socket
    _rate_table: str | None
    _systemd: Notifier
    _watchdog: float | None
    _hang_timeout: float
    _ready_line: str
    _file_stamp: tuple[int, int] | None
    _file_checked: float
    _outputs: list[WorkerOutput]
    _stderr_copy: int
    _stderr: StderrBuffer | None
    _node: tuple[str, str, Config] | None
    _pending: tuple[str, str, Config] | None
    _offered: collections.deque[tuple[str, str, Config]]
    _node_file: Path
    _offered_file: Path
    _connection_table: str | None
    _connections: NodeConnections | None
    _users_seen: tuple[Path, tuple[int, int] | None] | None

    if TYPE_CHECKING:  # methods of Supervisor (workers.py) its parts call

        def _take_signals(self) -> tuple[bool, bool]: ...

        @staticmethod
        def _wait_last_lines(w: _Worker) -> None: ...

        @staticmethod
        def _signal(w: _Worker, sig: int) -> None: ...


def _write_private(path: Path, text: str) -> None:
    """`text` in `path` (mode 0600), replaced at once: a worker never reads half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def _file_stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)


def backoff_delay(failures: int) -> float:
    """The restart delay after `failures` failures in a row: BACKOFF_MIN doubled each time, at most
    BACKOFF_MAX. The exponent is capped: a float power overflows after ~1,024 failures."""
    return min(BACKOFF_MAX, BACKOFF_MIN * 2.0 ** min(failures, 32))


def _describe_status(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"
