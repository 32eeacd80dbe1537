"""`server.workers = N > 1`: a small supervisor that runs N worker processes sharing the SMTP ports.

Each worker is ``python -m relaygate serve --config FILE --worker-index i --worker-link-fd FD``: a
fresh interpreter running the whole node (`relaygate.app.Relay` with ``worker_index=i``). Workers
bind every listening endpoint with SO_REUSEPORT and the kernel spreads incoming connections over
them; each has its own SQLite connections (WAL lets several processes share the file), its own
protocol/tracking log writers (several writers share a log directory) and its own queue manager
whose lease owner is ``<server.name>-w<i>``, so two workers never hold the same message. A
restarted worker i takes back the leases of the worker i it replaces at once. Only worker 0 runs
the admin listener.

The supervisor (the process `relaygate serve` started) does not touch mail. It holds the node's
locks (`relaygate.node_lock`): the directory lock, whose file every worker inherits, and with the
PostgreSQL queue the lock on ``server.name``, which it holds shared from before it starts any
worker; each worker takes that one shared too, on a connection of its own, before it opens the
queue or listens, and does not start if it cannot. So the node keeps its name and directory while
any of its processes runs, even after a SIGKILL of the supervisor. It:

* drops, before starting any worker, the queue leases this node's processes left behind (a crash,
  or a previous run with another number of workers), so nothing waits for a lease to expire;
* creates, before starting any worker, a fresh table of the node's open connections
  (``<data_dir>/run/connections``, node_connections.py), so max_inbound_connection and
  max_inbound_connection_per_source hold for the node, and zeroes a worker's counts in it as
  soon as it sees it exit;
* creates, before starting any worker, a fresh table of message rate counts that every worker maps
  (``<data_dir>/run/message-rates``, smtp/shared_rates.py) and hands them its path and token, so
  message_rate_limit and logon_failure_rate_limit hold for the node, not per worker;
* checks, before starting any worker, that no other process listens on the node's endpoints (a
  socket without SO_REUSEPORT binds each): the workers' SO_REUSEPORT would otherwise share a
  port with another node of the same user, and the start is refused, naming the binding;
* starts the workers and prints ``RelayGate ready: SMTP ...`` once every worker listens (a worker
  that fails during start-up stops the whole start with exit status 1);
* forwards SIGTERM/SIGINT (graceful stop: each worker stops accepting, tells clients waiting to
  send a command 421 4.3.2, lets messages being received and deliveries finish; a second
  SIGTERM/SIGINT makes it tell each worker, on its link, to cut them short);
* reloads, at SIGHUP and when the config file changes (the workers do not watch it): it reads the
  file, refuses (logged once, no worker told) a file that is invalid or that has a listener where
  another process listens (`check_bindings_free`, as at start; `_node_holds` tells the node's own
  listeners from others on the ports it holds), and otherwise offers that text to every
  worker (``<data_dir>/run/worker-config-offered.toml``, then SIGHUP). Each worker says on its link
  the digest of the text it runs after it (applied or refused); once they all applied it, it is the
  node's configuration (``worker-config.toml``), which every worker is started with: a worker
  restarted after a refused reload runs what its siblings run, never the file as it is now;
* restarts a worker that exits unexpectedly, after a backoff that doubles with every failure in a
  row (0.5 s … 30 s; a worker that ran for a minute resets it);
* kills (and so restarts) a worker whose event loop has sent no heartbeat for
  ``server.worker_hang_timeout`` (1 minute): a hung worker would otherwise keep receiving its share
  of new connections from the kernel and leave them unanswered;
* tells systemd when the node is ready, reloading or stopping, and pings its watchdog
  (sd_notify.py);
* is the only writer of the node's stderr: each worker's stderr and stdout are pipes that threads of
  the supervisor read, passing each run of whole lines on to the supervisor's stderr with one write
  (logs/worker_output.py), so that lines of several workers never interleave, even where stderr is
  a pipe; a worker's exit is logged after its last lines. A thread writes that stderr
  (logs/service.py, StderrBuffer): one that nobody reads (a full pipe) holds up neither the
  supervision nor, through their pipes, the workers; what does not fit the buffer is dropped,
  counted.

Each worker holds one end of a socketpair whose other end the supervisor keeps: the worker writes
one JSON line when it listens (then heartbeats), and stops by itself when it reads EOF (the
supervisor is gone, even after a SIGKILL), so workers are never orphaned for longer than they take
to finish their deliveries (they keep the node's locks meanwhile). The supervisor writes nothing
there but HURRY_LINE, after a second stop signal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import logging
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygate.admin.token_file import forget_applied_token
from relaygate.config import Config, ConfigError, parse_text
from relaygate.config.loader import read_config_text
from relaygate.config.values import Binding
from relaygate.logs.service import (
    READY_FLUSH_TIMEOUT,
    START_FORMAT_ENV,
    STDERR_FALLBACK_ENV,
    StderrBuffer,
    buffer_stderr,
    flush_stderr,
    worker_flags,
)
from relaygate.logs.service import apply_config as apply_service_log
from relaygate.logs.service import current as current_log_format
from relaygate.logs.worker_output import WorkerOutput
from relaygate.node_connections import CONNECTION_TABLE_ENV, NodeConnections, TableMismatch
from relaygate.node_connections import create as create_connection_table
from relaygate.node_connections import table_path as connection_table_path
from relaygate.sd_notify import ENV_VARS as SYSTEMD_ENV
from relaygate.sd_notify import Notifier, watchdog_interval
from relaygate.smtp.shared_rates import RATE_TABLE_ENV, table_path
from relaygate.smtp.shared_rates import create as create_rate_table
from relaygate.worker_stats import clear_snapshots

__all__ = [
    "PINNED_QUEUE_ENV",
    "Supervisor",
    "heartbeat_interval",
    "pinned_queue",
    "send_heartbeat",
    "started_again",
    "supervisor_alive",
    "users_mirror_path",
    "worker_ready",
]

#: Set by the supervisor for its workers: the queue store the node started with, and its
#: server.acme_directory_url as last applied (JSON).
PINNED_QUEUE_ENV = "RELAYGATE_WORKER_QUEUE"

logger = logging.getLogger("relaygate.workers")

#: The longest a worker waits between two heartbeats (`heartbeat_interval`).
HEARTBEAT_MAX = 5.0
READY_TIMEOUT = 60.0  # a worker not listening after this long is killed (and restarted)
STOP_TIMEOUT = 40.0  # sessions 5 s + deliveries 10 s + store close, with room to spare
#: After a second SIGTERM/SIGINT: how long the workers have to cut short and close their stores.
HURRY_TIMEOUT = 5.0
#: What the supervisor writes on a worker's link, the only thing it ever writes there: a second
#: stop signal reached it, the worker cuts its sessions and deliveries short (relaygate.app).
HURRY_LINE = b"hurry\n"
OUTPUT_DRAIN_TIMEOUT = 5.0  # for the last lines of the workers once they all exited
#: How long the last lines of a worker that exited may take to come (its pipes to end) before
#: the supervisor logs the exit anyway (a process it started may hold its stderr for long).
EXIT_LINES_TIMEOUT = 2.0
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # a worker that ran this long before dying starts the backoff afresh
FILE_CHECK_INTERVAL = 2.0  # how often the supervisor looks for an edit of the config file


def worker_ready(
    link: socket.socket, *, endpoints: str, admin: str, config: str | None = None
) -> None:
    """Called by a worker once it listens: tell the supervisor (one JSON line on the link), with
    the digest of the configuration text it runs (`text_digest`)."""
    said = {"pid": os.getpid(), "endpoints": endpoints, "admin": admin, "config": config}
    link.sendall((json.dumps(said) + "\n").encode())


def config_applied(link: socket.socket, digest: str) -> None:
    """Called by a worker that applied a reload: the digest of the text it now runs."""
    with contextlib.suppress(OSError):  # the supervisor is gone (EOF stops us) or a full buffer
        link.send(b'{"config": "%s"}\n' % digest.encode())


def text_digest(text: str) -> str:
    """What names a configuration text on the link (the supervisor keeps the texts)."""
    return hashlib.sha256(text.encode()).hexdigest()


def supervised_worker() -> bool:
    """Whether this process is a worker its supervisor hands its configuration (`handed_config`):
    it does not read the config file itself."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    return bool(raw and json.loads(raw).get("node_config"))


def started_again() -> bool:
    """Whether this process is a worker its supervisor started again (the worker of its index
    before it exited): files the node's configuration names may have broken since the node
    started (a reload refused them), and such a worker serves without what cannot be loaded
    rather than exit at every restart. At the node's start they must all load."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    return bool(raw and json.loads(raw).get("started_again"))


def handed_config(config_path: Path, which: str) -> tuple[Config, str] | None:
    """A supervised worker's configuration: the text its supervisor handed it (``"node"``: what
    the node runs, to start with; ``"offered"``: a reload), parsed as the config file (its
    name in messages, relative paths from its directory), and that text's digest. None when
    the process was not started by a supervisor that hands its workers their configuration."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    handed = json.loads(raw).get(f"{which}_config") if raw else None
    if not handed:
        return None
    text = read_config_text(Path(handed))
    return parse_text(text, str(config_path), base_dir=config_path.parent), text_digest(text)


def heartbeat_interval(config: Config) -> float:
    """How often a worker tells its supervisor that its event loop turns: a few times per
    ``server.worker_hang_timeout``, at most every 5 s."""
    timeout = config.server.worker_hang_timeout.total_seconds()
    return max(0.2, min(HEARTBEAT_MAX, timeout / 4)) if timeout > 0 else HEARTBEAT_MAX


def send_heartbeat(link: socket.socket, every: float = HEARTBEAT_MAX) -> None:
    """One heartbeat line on the worker's (non-blocking) link, with the worker's interval until
    the next one (`every`); a full buffer skips one."""
    with contextlib.suppress(OSError):  # full (skip one), or the supervisor is gone (EOF stops us)
        link.send(b'{"alive": 1, "every": %.3f}\n' % every)


def supervisor_alive(link_fd: int) -> bool:
    """Whether the supervisor at the other end of a worker's link still runs: the link is at EOF
    (the supervisor closed it, or died, SIGKILL included: the kernel closes its end as the process
    exits) when it is readable with nothing to read (the supervisor writes only HURRY_LINE)."""
    link = socket.socket(fileno=link_fd)
    try:
        if not select.select([link], [], [], 0)[0]:
            return True
        try:
            return link.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:  # reset: the other end is gone
            return False
    finally:
        link.detach()  # the descriptor stays the worker's (relaygate.app._main reads it)


def pinned_queue(config: Config) -> Config:
    """A worker's config with the queue store and data directory its supervisor started with
    (see ``_spawn``), and ACME on or off as the supervisor last applied it (only the supervisor
    runs the client)."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    if not raw:
        return config
    pinned = json.loads(raw)
    url = pinned.get("acme_directory_url")
    if url is not None and bool(url) != bool(config.server.acme_directory_url):
        logger.warning(
            "server.acme_directory_url: ACME on or off as the supervisor last applied it (the "
            "file says otherwise: this worker keeps ACME as its siblings until the next reload)"
        )
        server = dataclasses.replace(config.server, acme_directory_url=url)
        config = dataclasses.replace(config, server=server)
    data_dir = pinned.get("data_dir")
    if data_dir is not None and Path(data_dir) != config.server.data_dir:
        logger.warning(
            "server.data_dir changed since relaygate serve started: this worker keeps the data "
            "directory of its siblings (%s) until relaygate serve restarts",
            data_dir,
        )
        server = dataclasses.replace(config.server, data_dir=Path(data_dir))
        config = dataclasses.replace(config, server=server)
    queue = config.queue
    if (queue.store, queue.database_url) == (pinned["store"], pinned["database_url"]):
        return config
    logger.warning(
        "queue.store or queue.database_url changed since relaygate serve started: this worker "
        "keeps the queue of its siblings until relaygate serve restarts"
    )
    return dataclasses.replace(
        config,
        queue=dataclasses.replace(
            queue, store=pinned["store"], database_url=pinned["database_url"]
        ),
    )


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


class Supervisor:
    """Runs ``config.server.workers`` worker processes until SIGTERM/SIGINT. See the module doc."""

    #: CONNECTION_TABLE_ENV for the workers, and the table mapped here (None: counted per
    #: worker), once `_create_connection_table` made them
    _connection_table: str | None = None
    _connections: NodeConnections | None = None
    #: the users file and its stamp as `_mirror_users` last copied it (or found it unusable)
    _users_seen: tuple[Path, tuple[int, int] | None] | None = None

    def __init__(
        self,
        config: Config,
        config_path: Path,
        *,
        hold_fds: tuple[int, ...] = (),
        file_stamp: tuple[int, int] | None = None,
    ) -> None:
        self.config = config
        #: Descriptors every worker inherits and keeps open: the node's lock file (node_lock.py),
        #: held while any worker runs, even after this process is killed.
        self.hold_fds = hold_fds
        #: The node's ACME client (relaygate.acme.AcmeManager), when server.acme_directory_url is
        #: set: it runs here, in a thread, and nowhere else; workers watch the files it writes.
        self.acme: Any = None
        #: server.acme_directory_url as this process last applied it (start, reload): a worker
        #: started again runs ACME on or off as its siblings (``_spawn``, ``pinned_queue``)
        self.acme_directory_url = config.server.acme_directory_url
        self.config_path = Path(config_path).resolve()
        self.count = config.server.workers
        self.workers = [_Worker(i) for i in range(self.count)]
        self._sel = selectors.DefaultSelector()
        self._signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        #: RATE_TABLE_ENV for the workers ("<token hex> <path>"), or None: counted per worker.
        self._rate_table: str | None = None
        #: systemd's notifications (sd_notify.py): this process speaks for its workers.
        self._systemd = Notifier()
        self._watchdog = watchdog_interval()
        self._hang_timeout = config.server.worker_hang_timeout.total_seconds()
        self._ready_line = "RelayGate ready"
        #: the config file as last read here (the workers watch it themselves): an edit that
        #: changes server.log_format/log_level applies to this process's lines too. Taken
        #: before `config` was read (`file_stamp`), so an edit made while the start waited for
        #: the node lock is seen.
        self._file_stamp = file_stamp if file_stamp is not None else _file_stamp(self.config_path)
        self._file_checked = time.monotonic()
        #: the threads passing the workers' stderr and stdout on (those of workers that exited
        #: end by themselves once they passed the last line on)
        self._outputs: list[WorkerOutput] = []
        #: a descriptor of this process's stderr, inherited by every worker: where it writes once
        #: its stderr pipe is broken (this process is gone; relaygate.logs.service)
        self._stderr_copy = -1
        #: this process's stderr, written by a thread: a stderr nobody reads blocks neither the
        #: supervision here nor the threads passing the workers' lines on (set by `run`)
        self._stderr: StderrBuffer | None = None
        #: The configuration the node runs: the text every worker accepted last (its digest,
        #: the text and its parse). A worker is started with it, never with the file as it is
        #: now: a reload the workers refused would otherwise reach the one restarted after it.
        self._node: tuple[str, str, Config] | None = None
        #: The text of the reload the workers were offered and have not all answered yet.
        self._pending: tuple[str, str, Config] | None = None
        #: The last texts offered (an answer to one may come after the next was offered).
        self._offered: collections.deque[tuple[str, str, Config]] = collections.deque(maxlen=4)
        run_dir = Path(config.server.data_dir) / "run"
        #: where the workers read those texts (`handed_config`): they hold the node's secrets,
        #: as the config file does, so only this user reads them
        self._node_file = run_dir / "worker-config.toml"
        self._offered_file = run_dir / "worker-config-offered.toml"

    # ------------------------------------------------------------------ entry point

    def run(self) -> int:
        """Start, serve until asked to stop, stop. Returns the process exit status."""
        self._release_stale_leases()
        self._create_rate_table()
        self._create_connection_table()
        # /metrics sums this run's workers only (relaygate.worker_stats)
        clear_snapshots(Path(self.config.server.data_dir))
        # a worker 0 that cannot read its token file at the node's start does not start
        forget_applied_token(Path(self.config.server.data_dir))
        # nor a worker that cannot read the users file: no copy from a previous run
        with contextlib.suppress(FileNotFoundError):
            users_mirror_path(Path(self.config.server.data_dir)).unlink()
        self._stderr = buffer_stderr()
        old = self._install_signals()
        with contextlib.suppress(OSError):
            self._stderr_copy = os.dup(2)
        try:
            if not self._bindings_free() or not self._read_start_config():
                return 1
            for w in self.workers:
                self._spawn(w)
            status = self._wait_all_ready()
            if status is not None:
                return status
            first = self.workers[0].ready or {}
            pids = ", ".join(str(w.proc.pid) for w in self.workers if w.proc is not None)
            logger.info(
                "supervisor %d: %d workers listening (pids %s)", os.getpid(), self.count, pids
            )
            self._ready_line = (
                f"RelayGate ready: SMTP {first.get('endpoints', '')}{first.get('admin', '')}"
                f"; {self.count} workers"
            )
            flush_stderr(READY_FLUSH_TIMEOUT)  # the lines logged before it, as in one process
            print(self._ready_line, flush=True)
            self._systemd.ready(self._ready_line)
            self._serve()
            return 0
        finally:
            self._systemd.stopping()
            self._stop_all()
            self._drain_outputs()
            self._systemd.close()
            self._restore_signals(old)
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    # ------------------------------------------------------------------ signals

    def _install_signals(self) -> dict[int, Any]:
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        old: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            old[sig] = signal.signal(sig, self._on_signal)
        old[-1] = signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        return old

    def _restore_signals(self, old: dict[int, Any]) -> None:
        signal.set_wakeup_fd(old.pop(-1))
        for sig, handler in old.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum != signal.SIGCHLD:
            self._signals.append(signum)

    def _take_signals(self) -> tuple[bool, bool]:
        """(stop requested, reload requested) since the last call."""
        pending, self._signals = self._signals, []
        stop = any(s in (signal.SIGTERM, signal.SIGINT) for s in pending)
        return stop, signal.SIGHUP in pending

    # ------------------------------------------------------------------ workers

    def _release_stale_leases(self) -> None:
        """No worker of this node runs yet: every lease it holds is left over from a dead process."""
        from relaygate.app import open_store, worker_node_ids

        async def release() -> int:
            store = open_store(self.config)
            await store.open()
            try:
                release_owners = getattr(store, "release_owners", None)
                if release_owners is None:
                    return 0
                name = str(self.config.server.name)
                return int(await release_owners([name, *worker_node_ids(name)]))
            finally:
                await store.close()

        Path(self.config.server.data_dir).mkdir(parents=True, exist_ok=True)
        released = asyncio.run(release())
        if released:
            logger.info("released %d queue lease(s) left by a previous run", released)

    def _create_rate_table(self) -> None:
        """A new, empty shared table for this run, before any worker starts (so none of them
        races to create it, and counts of a previous run, or a file of another layout, are gone).
        A restarted worker maps the same table and finds the counts its predecessor made."""
        path = table_path(Path(self.config.server.data_dir)).resolve()
        try:
            token = create_rate_table(path)
        except OSError as exc:
            logger.error(
                "cannot create %s (%s): message_rate_limit is counted per worker", path, exc
            )
            return
        self._rate_table = f"{token.hex()} {path}"

    def _create_connection_table(self) -> None:
        """A new, empty table of the node's open connections (node_connections.py), before any
        worker starts; this process keeps it mapped to zero the counts of a worker that exits."""
        path = connection_table_path(Path(self.config.server.data_dir)).resolve()
        try:
            token = create_connection_table(path, self.count)
            self._connections = NodeConnections.open(path, token)
        except (OSError, TableMismatch) as exc:
            logger.error(
                "cannot create %s (%s): max_inbound_connection and "
                "max_inbound_connection_per_source are counted per worker",
                path,
                exc,
            )
            return
        self._connection_table = f"{token.hex()} {path}"

    def _bindings_free(self) -> bool:
        """Whether no other process listens on the node's endpoints (`check_bindings_free`:
        the workers' SO_REUSEPORT would share them with it); logs why not."""
        from relaygate.smtp.server import ListenerError, check_bindings_free

        try:
            check_bindings_free(self.config)
        except ListenerError as exc:
            logger.error("cannot start: %s", exc)
            return False
        return True

    def _read_start_config(self) -> bool:
        """The text every worker starts with (`_node`), read once here; logs why not."""
        self._file_stamp = _file_stamp(self.config_path)
        try:
            text = read_config_text(self.config_path)
            config = parse_text(text, str(self.config_path), base_dir=self.config_path.parent)
            self._node = (text_digest(text), text, config)
            _write_private(self._node_file, text)
            self._mirror_users()
        except ConfigError as exc:  # edited into an invalid file since it was read
            logger.error("cannot start: configuration invalid:\n%s", exc)
            return False
        except OSError as exc:
            logger.error("cannot start: cannot write %s: %s", self._node_file, exc)
            return False
        return True

    def _spawn(self, w: _Worker) -> None:
        parent, child = socket.socketpair()
        cmd = [
            sys.executable,
            "-m",
            "relaygate",
            "serve",
            "--config",
            str(self.config_path),
            "--worker-index",
            str(w.index),
            "--worker-link-fd",
            str(child.fileno()),
            *worker_flags(),  # --log-format/--log-level as this process was given them
        ]
        # The queue this node started on, whatever the file says now: a worker restarted after a
        # reload that changed queue.store or queue.database_url ("takes effect at the next
        # restart") would otherwise put its messages in another queue than its siblings.
        queue = self.config.queue
        env = dict(os.environ)
        for name in SYSTEMD_ENV:  # only this process notifies systemd
            env.pop(name, None)
        env[PINNED_QUEUE_ENV] = json.dumps(
            {
                "store": queue.store,
                "database_url": queue.database_url,
                # the SQLite queue, logs and keys of its siblings (a reload does not move them)
                "data_dir": str(self.config.server.data_dir),
                # ACME on or off as its siblings (the supervisor runs the client or not)
                "acme_directory_url": self.acme_directory_url,
                # the configuration the node runs, and the one a reload offers (`_reload`)
                "node_config": str(self._node_file),
                "offered_config": str(self._offered_file),
                # not the node's start: what cannot be loaded now is done without (`started_again`)
                "started_again": w.spawned > 0,
            }
        )
        # The table this run created, whatever data_dir the file says now (like the queue).
        env.pop(RATE_TABLE_ENV, None)
        # A worker that cannot read the file (edited into an invalid one since) says so in the
        # format of this process's lines, not as text in a JSON stream.
        env[START_FORMAT_ENV] = current_log_format()[0]
        if self._rate_table is not None:
            env[RATE_TABLE_ENV] = self._rate_table
        env.pop(CONNECTION_TABLE_ENV, None)
        if self._connection_table is not None:
            env[CONNECTION_TABLE_ENV] = self._connection_table
        pass_fds = [child.fileno(), *self.hold_fds]
        env.pop(STDERR_FALLBACK_ENV, None)
        if self._stderr_copy >= 0:
            env[STDERR_FALLBACK_ENV] = str(self._stderr_copy)
            pass_fds.append(self._stderr_copy)
        self._outputs = [o for o in self._outputs if not o.done]
        target = 2 if self._stderr is None else self._stderr
        err = WorkerOutput(target, f"worker {w.index} stderr", self._wake)
        # a worker prints nothing (its supervisor prints the ready line): what it might write to
        # stdout is raw output too, which goes with the rest to stderr, never to a stdout that
        # nobody may read any more once the ready line was seen
        out = WorkerOutput(target, f"worker {w.index} stdout", self._wake)
        try:
            w.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out.write_fd,
                stderr=err.write_fd,
                pass_fds=pass_fds,
                env=env,
            )
        except OSError:
            parent.close()
            err.close()
            out.close()
            raise
        finally:
            child.close()
        for output in (err, out):
            output.start()
            self._outputs.append(output)
        w.outputs, w.exited_at = [err, out], None
        parent.setblocking(False)
        w.link, w.buf, w.ready, w.every = parent, b"", None, HEARTBEAT_MAX
        w.started, w.restart_at = time.monotonic(), None
        w.spawned += 1
        # started with the node's configuration while a reload is offered: offered it too
        w.runs, w.reload_pending = None, self._pending is not None
        self._sel.register(parent, selectors.EVENT_READ, w)

    def _wake(self) -> None:
        """Wake `_poll` (from a thread: a worker's output ended)."""
        with contextlib.suppress(OSError):  # full (it wakes anyway), or closed: stopped
            self._wake_w.send(b"\0")

    def _close_link(self, w: _Worker) -> None:
        if w.link is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(w.link)
            w.link.close()
            w.link = None

    def _poll(self, timeout: float) -> None:
        """Wait for a signal, a worker message or ``timeout``; read what the workers said."""
        for key, _events in self._sel.select(timeout):
            if key.data is None:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
                continue
            w: _Worker = key.data
            assert w.link is not None
            try:
                data = w.link.recv(4096)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                self._close_link(w)  # the worker exited (or closed its end): poll() will tell
                continue
            w.buf += data
            w.answered = time.monotonic()
            while b"\n" in w.buf:
                line, w.buf = w.buf.split(b"\n", 1)
                with contextlib.suppress(ValueError):
                    said = json.loads(line)
                    if "alive" in said:  # heartbeats, after the ready line
                        w.every = float(said.get("every", HEARTBEAT_MAX))
                        continue
                    if "pid" in said:  # the ready line
                        w.ready = said
                    if not w.reload_pending:  # (else the answer comes after its reload)
                        w.runs = said.get("config")
                    self._settle_reload()

    def _wait_all_ready(self) -> int | None:
        """None once every worker listens; otherwise the exit status to stop with."""
        deadline = time.monotonic() + READY_TIMEOUT
        while not all(w.ready for w in self.workers):
            stop, _reload = self._take_signals()
            if stop:
                return 0
            for w in self.workers:
                if w.proc is not None and w.proc.poll() is not None:
                    self._wait_last_lines(w)  # what it wrote about its failure, first
                    logger.error(
                        "worker %d exited with status %s during start-up; stopping",
                        w.index,
                        w.proc.returncode,
                    )
                    return 1
            if time.monotonic() > deadline:
                logger.error("workers not listening after %.0f s; stopping", READY_TIMEOUT)
                return 1
            self._poll(0.2)
        return None

    def _serve(self) -> None:
        pinged = 0.0
        while True:
            now = time.monotonic()
            if self._watchdog is not None and now - pinged >= self._watchdog:
                self._systemd.watchdog()
                pinged = now
            waits = [w.restart_at - now for w in self.workers if w.restart_at is not None]
            waits += [
                w.exited_at + EXIT_LINES_TIMEOUT - now
                for w in self.workers
                if w.exited_at is not None
            ]
            self._poll(max(0.0, min([0.5, *waits, self._watchdog or 0.5])))
            stop, reload = self._take_signals()
            if stop:
                logger.info("stopping %d workers", self.count)
                return
            if reload:
                # the workers re-read the file on their own (each logs what it applied)
                self._systemd.reloading()
                self._reload()
                self._systemd.ready(self._ready_line)
            now = time.monotonic()
            if now - self._file_checked >= FILE_CHECK_INTERVAL:
                self._file_checked = now
                self._check_file()
                self._mirror_users()
            for w in self.workers:
                self._check(w, now)

    def _check(self, w: _Worker, now: float) -> None:
        if w.proc is None:
            if w.restart_at is not None and now >= w.restart_at:
                self._spawn(w)
            return
        code = w.proc.poll()
        if code is None:
            if w.ready is None and now - w.started > READY_TIMEOUT:
                logger.error("worker %d (pid %d) not listening: killed", w.index, w.proc.pid)
                w.proc.kill()
            elif (
                w.ready is not None
                and 0 < self._hang_timeout < now - w.answered
                and (
                    # never less than two of the worker's own heartbeat intervals: a reload may
                    # have changed the timeout here before (or without) the worker's pace
                    now - w.answered > 2 * w.every + 1
                )
            ):
                logger.error(
                    "worker %d (pid %d) has not answered for %.0f s (its event loop is blocked;"
                    " server.worker_hang_timeout): killed",
                    w.index,
                    w.proc.pid,
                    now - w.answered,
                )
                w.proc.kill()
                w.answered = now  # one kill; poll() sees it exit, and it is restarted
            elif w.ready is not None and w.reload_pending:
                w.reload_pending = False
                self._signal(w, signal.SIGHUP)
            return
        if w.exited_at is None:
            w.exited_at, w.ready = now, None
            self._close_link(w)
            if self._connections is not None:  # it holds no connection any more
                self._connections.clear_worker(w.index)
        if not self._last_lines_passed(w, now):
            return  # the loop goes on meanwhile; a pipe that ends wakes it (`_wake`)
        ran = w.exited_at - w.started
        if ran >= STABLE_AFTER:
            w.failures = 0
        delay = backoff_delay(w.failures)
        w.failures += 1
        logger.error(
            "worker %d (pid %d) exited unexpectedly (%s) after %.1f s; restarting in %.1f s",
            w.index,
            w.proc.pid,
            _describe_status(code),
            ran,
            delay,
        )
        w.proc, w.ready, w.restart_at, w.exited_at = None, None, now + delay, None
        self._settle_reload()  # it answers no reload offered (started again, it is offered it)

    @staticmethod
    def _last_lines_passed(w: _Worker, now: float) -> bool:
        """Whether the exited worker's pipes ended and all it wrote was passed on (then its exit
        is logged after its last lines: a traceback, what it logged as it died), or
        EXIT_LINES_TIMEOUT passed since it exited (a process it started holds its stderr)."""
        assert w.exited_at is not None
        return all(o.done for o in w.outputs) or now - w.exited_at >= EXIT_LINES_TIMEOUT

    @staticmethod
    def _wait_last_lines(w: _Worker) -> None:
        """`_last_lines_passed`, waiting for it (the supervisor is stopping anyway)."""
        deadline = time.monotonic() + EXIT_LINES_TIMEOUT
        for output in w.outputs:
            output.join(max(0.0, deadline - time.monotonic()))

    def _check_file(self) -> None:
        """The config file was edited (no SIGHUP): reload it, as a SIGHUP does. The workers do
        not watch it: what they run is what this process offers them (`_reload`)."""
        if _file_stamp(self.config_path) != self._file_stamp:
            self._reload()

    def _mirror_users(self) -> None:
        """The users file of the node's configuration, copied (``users_mirror_path``, 0600) each
        time it changed and can be read, for a worker started again while it cannot: the
        running workers keep the users they read, and that worker would not start at all
        (relaygate.app: it starts with the copy, and says so). Blocking, small: a stat every
        FILE_CHECK_INTERVAL, a read and a parse when the file changed."""
        from relaygate.smtp.auth import UserStore, users_path

        if self._node is None:
            return
        data_dir = Path(self.config.server.data_dir)  # the workers' (pinned_queue)
        path = users_path(data_dir, self._node[2].server.users_file)
        seen = (path, _file_stamp(path))
        if seen == self._users_seen:
            return
        self._users_seen = seen
        mirror = users_mirror_path(data_dir)
        if seen[1] is None:  # no file: no users, which a worker starts with
            with contextlib.suppress(FileNotFoundError):
                mirror.unlink()
            return
        tmp = mirror.with_name(mirror.name + ".tmp")
        try:
            _write_private(tmp, path.read_text(encoding="utf-8"))
            UserStore(tmp)  # as a worker reads it: ValueError when it cannot be used
            os.replace(tmp, mirror)
        except (OSError, ValueError):  # (the workers say why, when they read it)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _apply_acme(self, new: Config) -> None:
        """The ACME client of the node (this process's; the workers watch its files): started,
        stopped or given the new settings, as the reloaded file says (the workers apply the
        same file to their listeners). A worker started from now on pins this state."""
        from relaygate.acme import reconcile

        self.acme = reconcile(self.acme, new)
        self.acme_directory_url = new.server.acme_directory_url

    def _reload(self) -> None:
        """Read the config file and offer it to every worker (`_offered_file`, then SIGHUP), unless
        it is refused here: invalid, or a port the node does not listen on yet that another
        process serves. Refused here, it is logged once and reaches no worker."""
        self._file_stamp = _file_stamp(self.config_path)
        try:
            text = read_config_text(self.config_path)
            new = parse_text(text, str(self.config_path), base_dir=self.config_path.parent)
        except ConfigError as exc:
            logger.error("reload refused, configuration invalid:\n%s", exc)
            return
        except Exception:  # never let a reload take the supervisor (and every worker) down
            logger.exception("reload refused: cannot load %s", self.config_path)
            return
        if not self._new_bindings_free(new):
            return
        try:
            _write_private(self._offered_file, text)
        except OSError as exc:
            logger.error("reload refused: cannot write %s: %s", self._offered_file, exc)
            return
        self._pending = (text_digest(text), text, new)
        self._offered.append(self._pending)
        self._hang_timeout = new.server.worker_hang_timeout.total_seconds()
        # this process's own lines; each worker applies the file's on its own reload
        apply_service_log(new.server.log_format, new.server.log_level)
        self._apply_acme(new)
        if new.server.workers != self.count:
            logger.warning(
                "server.workers changed from %d to %d: takes effect when relaygate serve restarts",
                self.count,
                new.server.workers,
            )
        for w in self.workers:
            w.runs = None  # until it says what it runs after this reload
            if w.ready is not None:
                self._signal(w, signal.SIGHUP)
            elif w.proc is not None:
                w.reload_pending = True  # still starting: it has no SIGHUP handler yet

    def _new_bindings_free(self, new: Config) -> bool:
        """Whether no other process listens where `new` has a listener (`check_bindings_free`:
        the workers' SO_REUSEPORT would share it with that process, as at start); logs the
        refusal naming the binding. A binding that meets a listener is let through only when
        that listener is the node's own (`_node_holds`): skipping every port the node listened
        on let another process's listener on another address of such a port through."""
        from relaygate.smtp.server import ListenerError, check_bindings_free, listener_bindings

        # the node's, and those of a reload the workers may be applying now
        running = [known[2] for known in (self._node, self._pending) if known is not None]
        held = frozenset(binding for config in running for binding in listener_bindings(config))
        try:
            check_bindings_free(new, node_holds=lambda binding: _node_holds(binding, held))
        except ListenerError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return False
        return True

    def _settle_reload(self) -> None:
        """Once every running worker said what it runs: the node runs that text if they all run
        the same (a worker started from now on is handed it). Answers to an earlier offer may
        come after a later one was made: whatever text they agree on is the node's."""
        answers = [w.runs for w in self.workers if w.proc is not None]
        if not answers or None in answers:  # (none runs: each is offered the reload at start)
            return
        offered, self._pending = self._pending, None
        agreed = set(answers)
        if len(agreed) > 1:
            if offered is not None:  # once per reload
                logger.error(
                    "the workers run different configurations: the reload of %s was refused by "
                    "some of them (see their lines); a worker started now runs the previous one",
                    self.config_path,
                )
            return
        digest = agreed.pop()
        if self._node is not None and digest == self._node[0]:
            return
        node = next(
            (known for known in (offered, *self._offered) if known and known[0] == digest), None
        )
        if node is None:
            return
        self._node = node
        try:
            _write_private(self._node_file, node[1])
        except OSError as exc:
            logger.error("cannot write %s: %s", self._node_file, exc)

    @staticmethod
    def _signal(w: _Worker, sig: int) -> None:
        if w.alive:
            assert w.proc is not None
            with contextlib.suppress(ProcessLookupError):
                w.proc.send_signal(sig)

    def _stop_all(self) -> None:
        """SIGTERM every worker, wait up to STOP_TIMEOUT, SIGKILL what is left. Another
        SIGTERM/SIGINT meanwhile is passed on (a worker then cuts its sessions and deliveries
        short when told on its link: relaygate.app) and leaves them HURRY_TIMEOUT at most."""
        for w in self.workers:
            w.restart_at = None
            self._signal(w, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        hurried = False
        while any(w.alive for w in self.workers) and time.monotonic() < deadline:
            self._poll(min(0.2, max(0.0, deadline - time.monotonic())))
            stop, _reload = self._take_signals()
            if stop and not hurried:
                hurried = True
                logger.warning("second signal: stopping now (workers cut their sessions short)")
                for w in self.workers:
                    self._tell_hurry(w)
                deadline = min(deadline, time.monotonic() + HURRY_TIMEOUT)
        for w in self.workers:
            if w.proc is None:
                continue
            if w.proc.poll() is None:
                logger.error("worker %d (pid %d) did not stop: killed", w.index, w.proc.pid)
                w.proc.kill()
            w.proc.wait()
            self._close_link(w)

    @staticmethod
    def _tell_hurry(w: _Worker) -> None:
        """`HURRY_LINE` on the worker's link. Not a second SIGTERM: a stop signal sent to every
        process of the node (^C in a terminal, KillMode=control-group, pkill) reaches a worker
        once from there and once passed on from here, which must not cut its sessions short."""
        if w.link is not None:
            with contextlib.suppress(OSError):  # gone (EOF), or its buffer full: it stops anyway
                w.link.send(HURRY_LINE)

    def _drain_outputs(self) -> None:
        """Every worker exited: wait (a little) for their last lines to be passed on, and
        written to stderr (which may not be read: then what is left is lost at exit)."""
        deadline = time.monotonic() + OUTPUT_DRAIN_TIMEOUT
        for output in self._outputs:
            output.join(max(0.0, deadline - time.monotonic()))
        self._outputs = []
        if self._stderr is not None:
            self._stderr.flush(max(0.0, deadline - time.monotonic()))
        if self._stderr_copy >= 0:
            os.close(self._stderr_copy)
            self._stderr_copy = -1


def users_mirror_path(data_dir: Path) -> Path:
    """The supervisor's copy of the users file as it last could be read (`_mirror_users`)."""
    return Path(data_dir) / "run" / "users-applied.json"


def _node_holds(binding: Binding, held: frozenset[Binding]) -> bool:
    """Whether the listener `binding` cannot be bound beside is the node's own: `binding` is one
    the workers hold, or every listener that shares its endpoint (a wildcard and an address on
    its port) is one of theirs (/proc/net/tcp*). Where the listeners cannot be listed, one that
    shares an endpoint with the node's is taken for the node's (as the check did before)."""
    if binding in held:
        return True
    if not any(binding.shares_endpoint(mine) for mine in held):
        return False  # nothing of the node's there: another process listens
    listening = listening_bindings(binding.port)
    if listening is None:
        return True
    return all(other in held for other in listening if binding.shares_endpoint(other))


#: /proc's files of TCP sockets, and the state of a listening one in them
_PROC_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = "0A"


def listening_bindings(port: int) -> set[Binding] | None:
    """The addresses TCP sockets of this network namespace listen on at `port`, any process's
    (Linux's /proc/net/tcp and tcp6), or None when they cannot be read."""
    found: set[Binding] = set()
    try:
        tables = [path.read_text() for path in _PROC_TCP if path.exists()]
    except OSError:
        return None
    if not tables:
        return None
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _TCP_LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port:
                found.add(Binding(_proc_address(address), port))
    return found


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp* writes it (32-bit words in host order, little-endian here):
    as a configuration writes it (an IPv4-mapped IPv6 address as the IPv4 one)."""
    raw = b"".join(
        bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8)
    )
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


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
