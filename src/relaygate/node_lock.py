"""One running node per data directory, and per ``server.name`` on a shared queue database.

A node takes over the queue leases its name owns when it starts (`relaygate.app`,
`relaygate.workers`): a restarted node must not wait for its own leases to expire. That is only
safe if no other live process runs as the same node. Two ways to break it, both found in use:

* ``relaygate serve`` started twice with one config (a systemd unit and a manual start). With
  ``server.workers > 1`` the listening ports are SO_REUSEPORT, so the second start binds them
  too and the two nodes share the port, the queue and the lease owners: the second releases
  the first's leases, and messages in flight are delivered twice.
* two cluster nodes (``queue.store = "postgresql"``) given the same ``server.name``.

`NodeLock` refuses both at start: an exclusive ``flock`` on ``<data_dir>/relaygate.lock``, and
with the PostgreSQL queue a session advisory lock on the name, held on a connection of its own
for the node's lifetime. Both are released by the kernel or the database when the process dies
(SIGKILL included), so a node that crashed starts again at once. The supervisor (or the single
process) takes the lock, and hands the locked file to its worker processes (`fileno`): a worker
outlives a supervisor killed with SIGKILL while it finishes its deliveries, under its queue leases,
and a new start (which drops this node's leases) must not run beside it. A start that finds the
directory locked by a supervisor that is gone waits for those workers to exit (at most
`ORPHAN_WAIT` seconds).

The name lock must last as long as the node's processes too, but a database lock cannot be
inherited: each process holds its own, on a connection of its own. The order, with
``server.workers > 1``:

1. The supervisor tries the name EXCLUSIVE (``pg_try_advisory_lock``). That fails while any
   session holds it in any mode: another node, or the workers of an earlier run of this one whose
   supervisor was killed. The start is refused, naming the holders (`NodeLockError`).
2. Still holding it exclusive, the supervisor takes it SHARED on the same connection (a session's
   own locks never conflict with its requests) and then drops the exclusive hold (`share`): the
   name is never free in between. Only then does it start workers.
3. Each worker, before it opens the queue, listens or delivers, takes the name SHARED on a
   connection of its own (`acquire_worker`) for its lifetime, then checks that its supervisor is
   still alive (its link is not at EOF). If the lock is refused, or the supervisor is gone, the
   worker exits without serving.

No window: a second node gets the name only when no session holds it. The supervisor holds it from
step 1 until it dies; a worker's hold starts while its supervisor's still lasts (the supervisor,
alive after the worker's lock was granted, held the name since before it started that worker) and
ends when the worker exits; so from step 1 until the last process of the node is gone, some
process of the node holds it. A worker whose supervisor was killed before the worker took its
lock could be granted it beside a new node (which holds the name shared after step 2): step 3's
check makes it exit before it does anything. Two nodes starting at once race only for the
exclusive lock of step 1, which the database grants to one of them. A single process (``workers =
1``) keeps its exclusive lock: it has no workers.

The database lock guards the start: if a connection holding it is lost (a database restart), that
process does not take the name again; a running node keeps running and the name is claimed again
at the node's next start (a worker its supervisor restarts takes it again, if it can). Server-side
TCP keepalives on those connections let the database notice a process whose machine died within
about half a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relaygate.durable_dirs import make_dirs_durably

__all__ = ["LOCK_FILE", "NodeLock", "NodeLockError", "flock_until", "name_lock_key"]

LOCK_FILE = "relaygate.lock"

#: How long a start waits for the workers of a killed supervisor to finish (seconds): they stop
#: when they see it gone, after up to stop_grace for deliveries and the sessions' grace.
ORPHAN_WAIT = 120.0

#: How many of the processes holding a name an error message lists.
_HOLDERS_SHOWN = 4

logger = logging.getLogger("relaygate")

# Server-side keepalives of the connections that hold the name (seconds): a peer that vanished
# without closing is noticed after about idle + interval * count.
_KEEPALIVE = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}

# The application_name of a worker's connection starts so (a supervisor's or single process's
# with "relaygate node "): a refused start tells orphan workers from a running node by it.
_WORKER_APP = "relaygate worker "


class NodeLockError(Exception):
    """Another process runs as this node: the message says which and what to do."""


def flock_until(fd: int, deadline: float, interval: float) -> bool:
    """Try an exclusive flock on `fd` every `interval` seconds until `deadline` (monotonic
    time); whether it was taken. Never a blocking flock: a holder that never lets go (a stopped
    process) costs the caller `deadline`, not its thread."""
    while time.monotonic() < deadline:
        time.sleep(interval)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            continue
    return False


def name_lock_key(server_name: str) -> int:
    """The advisory lock key of a node name: a signed 64-bit number from its hash. Names are
    compared case-insensitively, as Exchange compares server names."""
    digest = hashlib.blake2b(f"relaygate-node:{server_name.casefold()}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "big", signed=True)


class NodeLock:
    def __init__(self, data_dir: Path, server_name: str, database_url: str | None = None) -> None:
        self.path = Path(data_dir) / LOCK_FILE
        self.server_name = server_name
        self.database_url = database_url
        self._fd: int | None = None
        self._conn: Any = None

    def acquire(self) -> None:
        """Take both locks or raise NodeLockError (StoreError: the database cannot be reached)."""
        self._lock_directory()
        if self.database_url:
            host, pid = socket.gethostname(), os.getpid()
            try:
                self._lock_name(
                    self.database_url, f"relaygate node {self.server_name} on {host} (pid {pid})"
                )
            except BaseException:
                self.release()
                raise

    def share(self) -> None:
        """A supervisor, after `acquire` and before it starts any worker: hold the name shared
        instead of exclusive, so that its workers can take it shared too (step 2 of the module
        doc). The shared lock is taken before the exclusive one is dropped: no other node can
        take the name in between. StoreError: the database connection failed meanwhile."""
        if self._conn is None:
            return  # no database: the directory lock is all
        import psycopg

        url = self.database_url
        assert url is not None
        key = name_lock_key(self.server_name)
        try:
            row = self._conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (key,)).fetchone()
            if row is None or not row[0]:  # not expected: the exclusive holder is this session
                raise NodeLockError(self._in_use(url, _holders(self._conn, key)))
            self._conn.execute("SELECT pg_advisory_unlock(%s)", (key,))
        except psycopg.Error as exc:
            raise _connect_failed(exc, url) from None

    def acquire_worker(self, index: int, supervisor_alive: Callable[[], bool] | None) -> None:
        """A worker process, before it opens the queue or serves: take the name shared, on a
        connection of its own, for the process's lifetime (step 3 of the module doc; the
        directory lock it inherits from its supervisor). ``supervisor_alive`` is asked once the
        lock is granted: False means the supervisor was killed before this worker held the name
        (another node may hold it by now), and the worker must not start. Raises NodeLockError,
        or StoreError if the database cannot be reached."""
        if not self.database_url:
            return
        # The pid before the host name: the database cuts an application name at 63 bytes.
        me = f"{_WORKER_APP}{index} of node {self.server_name} (pid {os.getpid()})"
        try:
            self._lock_name(self.database_url, f"{me} on {socket.gethostname()}", shared=True)
            if supervisor_alive is not None and not supervisor_alive():
                raise NodeLockError(
                    "the supervisor of this worker (relaygate serve) is gone: the worker does "
                    "not start"
                )
        except BaseException:
            self.release()
            raise

    def fileno(self) -> int:
        """The locked file (for the workers to inherit: the lock lasts while any of them runs)."""
        assert self._fd is not None, "not acquired"
        return self._fd

    def release(self) -> None:
        """Let go of what this lock holds: the name is free for others when it returns (closing
        the connection alone leaves the database to drop the lock a moment later)."""
        if self._conn is not None:
            with contextlib.suppress(Exception):
                if not self._conn.broken:
                    self._conn.execute("SELECT pg_advisory_unlock_all()")
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def _lock_directory(self) -> None:
        try:
            make_dirs_durably(self.path.parent)  # data_dir: often created here, on a first start
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise NodeLockError(
                f"cannot open the node lock file {str(self.path)!r} in server.data_dir: "
                f"{exc.strerror or exc}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            orphans = holder.isdigit() and not _alive(int(holder))
            if not (orphans and self._wait_orphans(fd, holder)):
                os.close(fd)
                if orphans:
                    raise NodeLockError(
                        f"the workers of relaygate serve pid {holder}, which is gone, still run "
                        f"with data_dir {str(self.path.parent)!r} after {ORPHAN_WAIT:g} s; stop "
                        f"them first (relaygate serve --worker-index ...)"
                    ) from None
                raise NodeLockError(
                    f"another relaygate serve (pid {holder}) is running with data_dir "
                    f"{str(self.path.parent)!r}; stop it first, or give this node its own "
                    f"server.data_dir"
                ) from None
        # The pid only names the holder to a second start: a full disk must not stop this one
        # (the relay runs on a full disk, refusing mail with 452). Written over the previous pid
        # and then cut to length, so that a file already holding one needs no new block.
        pid = f"{os.getpid()}\n".encode()
        try:
            os.pwrite(fd, pid, 0)
            os.ftruncate(fd, len(pid))
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)  # no stale pid for a second start to take for this one
            logger.warning("cannot write this process's pid to %s: %s", self.path, exc.strerror)
        self._fd = fd

    def _wait_orphans(self, fd: int, holder: str) -> bool:
        """The supervisor that took the lock is gone but the lock is held: its workers still
        finish their deliveries. Wait for them to exit (True), at most ORPHAN_WAIT seconds."""
        logger.warning(
            "waiting for the workers of relaygate serve pid %s, which is gone, to stop "
            "(they still hold %s; at most %g s)",
            holder,
            self.path,
            ORPHAN_WAIT,
        )
        return flock_until(fd, time.monotonic() + ORPHAN_WAIT, 0.2)

    def _connect(self, url: str, application_name: str) -> Any:
        """A connection of this lock's own (autocommit, server-side keepalives), kept in _conn."""
        import psycopg

        try:
            conn = psycopg.connect(
                url, autocommit=True, connect_timeout=5, application_name=application_name[:63]
            )
        except psycopg.Error as exc:
            raise _connect_failed(exc, url) from None
        self._conn = conn
        try:
            for name, value in _KEEPALIVE.items():
                conn.execute(f"SET {name} = {int(value)}")
        except psycopg.Error as exc:
            raise _connect_failed(exc, url) from None
        return conn

    def _lock_name(self, url: str, application_name: str, *, shared: bool = False) -> None:
        import psycopg

        conn = self._connect(url, application_name)
        key = name_lock_key(self.server_name)
        take = "pg_try_advisory_lock_shared" if shared else "pg_try_advisory_lock"
        try:
            row = conn.execute(f"SELECT {take}(%s)", (key,)).fetchone()
            if row is not None and row[0]:
                return
            holders = _holders(conn, key)
        except psycopg.Error as exc:
            raise _connect_failed(exc, url) from None
        raise NodeLockError(self._in_use(url, holders))

    def _in_use(self, url: str, holders: list[tuple[str, str]]) -> str:
        """Why a start is refused: who holds the name (application name, where), what to do."""
        from relaygate.queue.pg_store import redact_url

        where = f"server.name {self.server_name!r} is in use by another node on the queue database"
        where += f" {redact_url(url)}"
        if not holders:
            return f"{where} (holder not visible to this database role); {_OWN_NAME}"
        listed = "; ".join(f"{app}, {origin}" for app, origin in holders[:_HOLDERS_SHOWN])
        if len(holders) > _HOLDERS_SHOWN:
            listed += f"; and {len(holders) - _HOLDERS_SHOWN} more"
        if all(app.startswith(_WORKER_APP) for app, _origin in holders):
            # Only workers: their supervisor is gone (killed) and they finish their deliveries.
            return (
                f"{where}: worker processes of a relaygate serve that is gone still hold it while "
                f"they finish their deliveries ({listed}); start this node once they have exited "
                f"(they stop by themselves, or stop those relaygate serve --worker-index ... "
                f"processes); if they belong to another node: {_OWN_NAME}"
            )
        return f"{where} ({listed}); {_OWN_NAME}"


_OWN_NAME = "every node of a cluster needs its own server.name"


def _connect_failed(exc: Exception, url: str) -> Exception:
    """A database error as PostgresStore.open words it (a StoreError, without the password)."""
    from relaygate.queue.pg_store import _scrub, redact_url
    from relaygate.queue.store import StoreError

    reason = _scrub(" ".join(str(exc).split()), url)
    return StoreError(f"cannot connect to the queue database {redact_url(url)}: {reason}")


def _holders(conn: Any, key: int) -> list[tuple[str, str]]:
    """The processes holding a name, as far as this role may see: (application name, where), the
    exclusive holder first, then the oldest connections."""
    unsigned = key & 0xFFFFFFFFFFFFFFFF
    rows = conn.execute(
        "SELECT a.application_name, a.client_addr::text, a.pid FROM pg_locks l "
        "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
        "AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s "
        "AND l.objsubid = 1 ORDER BY l.mode = 'ExclusiveLock' DESC, a.backend_start, a.pid",
        (unsigned >> 32, unsigned & 0xFFFFFFFF),
    ).fetchall()
    holders = []
    for app, addr, pid in rows:
        where = f"from {addr}" if addr else "over a local socket"
        holders.append((app or "an unnamed client", f"{where}, database backend pid {pid}"))
    return holders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
