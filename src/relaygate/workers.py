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
  (``/dev/shm/relaygate-<digest>/connections``, node_connections.py), so max_inbound_connection and
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

This module holds `Supervisor`: its start and stop, its loop (`_serve`: heartbeats, restarts
with backoff, the config file's edits), the signals and the workers' stop; and re-exports the
names the rest of the code imports from here. Beside it: the worker's side of the link
(worker_link.py), the supervisor's state and timings shared by its parts (supervisor_state.py),
the start of the workers and their link (supervisor_start.py), and the reloads and the users
file's copy (supervisor_reload.py).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path
from typing import Any

from relaygate.admin.token_file import forget_applied_token
from relaygate.config import Config
from relaygate.logs.service import READY_FLUSH_TIMEOUT, StderrBuffer, buffer_stderr, flush_stderr
from relaygate.logs.worker_output import WorkerOutput
from relaygate.node_connections import NodeConnections
from relaygate.sd_notify import Notifier, watchdog_interval
from relaygate.supervisor_reload import _node_holds as _node_holds
from relaygate.supervisor_reload import listening_bindings as listening_bindings
from relaygate.supervisor_reload import users_mirror_path as users_mirror_path
from relaygate.supervisor_start import _WorkerStart
from relaygate.supervisor_state import BACKOFF_MAX as BACKOFF_MAX
from relaygate.supervisor_state import BACKOFF_MIN as BACKOFF_MIN
from relaygate.supervisor_state import (
    EXIT_LINES_TIMEOUT,
    FILE_CHECK_INTERVAL,
    HURRY_TIMEOUT,
    OUTPUT_DRAIN_TIMEOUT,
    READY_TIMEOUT,
    STABLE_AFTER,
    _describe_status,
    _file_stamp,
    _Worker,
    backoff_delay,
)
from relaygate.supervisor_state import STOP_TIMEOUT as STOP_TIMEOUT
from relaygate.worker_link import HEARTBEAT_MAX as HEARTBEAT_MAX
from relaygate.worker_link import HURRY_LINE as HURRY_LINE
from relaygate.worker_link import PINNED_QUEUE_ENV as PINNED_QUEUE_ENV
from relaygate.worker_link import config_applied as config_applied
from relaygate.worker_link import handed_config as handed_config
from relaygate.worker_link import heartbeat_interval as heartbeat_interval
from relaygate.worker_link import pinned_queue as pinned_queue
from relaygate.worker_link import send_heartbeat as send_heartbeat
from relaygate.worker_link import started_again as started_again
from relaygate.worker_link import supervised_worker as supervised_worker
from relaygate.worker_link import supervisor_alive as supervisor_alive
from relaygate.worker_link import text_digest as text_digest
from relaygate.worker_link import worker_ready as worker_ready
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


logger = logging.getLogger("relaygate.workers")


class Supervisor(_WorkerStart):
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
            self._pass_on_start_up_lines(READY_FLUSH_TIMEOUT)
            print(self._ready_line, flush=True)
            self._systemd.ready(self._ready_line)
            self._serve()
            return 0
        finally:
            self._systemd.stopping()
            self._stop_all()
            self._remove_connection_table()
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

    def _pass_on_start_up_lines(self, timeout: float) -> None:
        """Before the ready line, as in one process: the lines logged before it on stderr, the
        workers' too (each flushed its own before it said it was ready; they may still be in its
        pipe, or read and not yet written). A stderr nobody reads holds it back `timeout` at
        most."""
        deadline = time.monotonic() + timeout
        for output in self._outputs:
            output.caught_up(max(0.0, deadline - time.monotonic()))
        flush_stderr(max(0.0, deadline - time.monotonic()))

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
