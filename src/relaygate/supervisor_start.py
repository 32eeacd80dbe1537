"""Starting the supervisor's workers: what the node prepares before the first one (stale
leases dropped, the connection and rate tables, the endpoints checked free, the configuration
text they start with), each worker's spawn with its link and environment, and reading what
they say on their links (ready, heartbeats, the configuration they applied).

A mixin of `Supervisor` (workers.py), against the state declared in supervisor_state.py; it
logs as relaygate.workers, as the supervisor does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import time
from pathlib import Path

from relaygate.config import ConfigError, parse_text
from relaygate.config.loader import read_config_text
from relaygate.durable_dirs import make_dirs_durably
from relaygate.logs.service import START_FORMAT_ENV, STDERR_FALLBACK_ENV, worker_flags
from relaygate.logs.service import current as current_log_format
from relaygate.logs.worker_output import WorkerOutput
from relaygate.node_connections import (
    CONNECTION_TABLE_ENV,
    NodeConnections,
    TableMismatch,
)
from relaygate.node_connections import create as create_connection_table
from relaygate.node_connections import remove as remove_connection_table
from relaygate.node_connections import table_path as connection_table_path
from relaygate.sd_notify import ENV_VARS as SYSTEMD_ENV
from relaygate.smtp.shared_rates import RATE_TABLE_ENV, table_path
from relaygate.smtp.shared_rates import create as create_rate_table
from relaygate.supervisor_reload import _ReloadOwnership
from relaygate.supervisor_state import READY_TIMEOUT, _file_stamp, _Worker, _write_private
from relaygate.worker_link import HEARTBEAT_MAX, PINNED_QUEUE_ENV, text_digest

logger = logging.getLogger("relaygate.workers")


class _WorkerStart(_ReloadOwnership):
    """Supervisor's start of its workers and the reading of their links."""

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

        make_dirs_durably(Path(self.config.server.data_dir))
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
        worker starts; this process keeps it mapped to zero the counts of a worker that exits.
        Only with ``worker_balance = "connection"``: by default the kernel steers each client
        address to one worker (smtp/steering.py), whose own counts are then the source's, and
        the table's lock and writes at every connection cost 4-7 % of the CPU per message at
        10 sessions (docs/benchmarks.md); `max_inbound_connection` is then per worker."""
        path = connection_table_path(Path(self.config.server.data_dir)).resolve()
        if self.config.server.worker_balance != "connection":
            # A table a node killed outright left (its supervisor removes it when it stops), in
            # shared memory until the machine restarts: no other run of this node would remove it.
            remove_connection_table(path)
            return
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

    def _remove_connection_table(self) -> None:
        """The workers are gone: the table is removed (in /dev/shm it holds memory until the
        machine restarts), with its folder there. A supervisor killed leaves it; the next start
        of the node replaces it, or removes it (`_create_connection_table`)."""
        table, self._connections = self._connections, None
        if table is None:
            return
        table.close()
        remove_connection_table(table.path)

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
                # how the node balances, which its open-connection table was made for (or not)
                "worker_balance": self.config.server.worker_balance,
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
