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

The database lock guards the start: if the connection holding it is lost (a database restart),
the name is not claimed again until the node restarts. Server-side TCP keepalives on that
connection let the database notice a node whose machine died within about half a minute.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["LOCK_FILE", "NodeLock", "NodeLockError", "name_lock_key"]

LOCK_FILE = "relaygate.lock"

#: How long a start waits for the workers of a killed supervisor to finish (seconds): they stop
#: when they see it gone, after up to stop_grace for deliveries and the sessions' grace.
ORPHAN_WAIT = 120.0

logger = logging.getLogger("relaygate")

# Server-side keepalives of the connection that holds the name (seconds): a peer that vanished
# without closing is noticed after about idle + interval * count.
_KEEPALIVE = {"tcp_keepalives_idle": 10, "tcp_keepalives_interval": 5, "tcp_keepalives_count": 3}


class NodeLockError(Exception):
    """Another process runs as this node: the message says which and what to do."""


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
            try:
                self._lock_name(self.database_url)
            except BaseException:
                self.release()
                raise

    def fileno(self) -> int:
        """The locked file (for the workers to inherit: the lock lasts while any of them runs)."""
        assert self._fd is not None, "not acquired"
        return self._fd

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            os.close(self._fd)  # closing the file releases the flock
            self._fd = None

    def _lock_directory(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
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
        deadline = time.monotonic() + ORPHAN_WAIT
        while time.monotonic() < deadline:
            time.sleep(0.2)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                continue
        return False

    def _lock_name(self, url: str) -> None:
        import psycopg

        from relaygate.queue.pg_store import _scrub, redact_url
        from relaygate.queue.store import StoreError

        me = f"relaygate node {self.server_name} on {socket.gethostname()} (pid {os.getpid()})"

        def failed(exc: psycopg.Error) -> StoreError:  # as PostgresStore.open words it
            reason = _scrub(" ".join(str(exc).split()), url)
            return StoreError(f"cannot connect to the queue database {redact_url(url)}: {reason}")

        try:
            conn = psycopg.connect(
                url, autocommit=True, connect_timeout=5, application_name=me[:63]
            )
        except psycopg.Error as exc:
            raise failed(exc) from None
        self._conn = conn
        try:
            for name, value in _KEEPALIVE.items():
                conn.execute(f"SET {name} = {int(value)}")
            key = name_lock_key(self.server_name)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()
            if row is not None and row[0]:
                return
            holder = self._holder(conn, key)
        except psycopg.Error as exc:
            raise failed(exc) from None
        raise NodeLockError(
            f"server.name {self.server_name!r} is in use by another node on the queue database "
            f"{redact_url(url)} ({holder}); every node of a cluster needs its own server.name"
        )

    @staticmethod
    def _holder(conn: Any, key: int) -> str:
        """Who holds the name, as far as this role may see (application_name and address)."""
        unsigned = key & 0xFFFFFFFFFFFFFFFF
        row = conn.execute(
            "SELECT a.application_name, a.client_addr::text, a.pid FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' "
            "AND l.granted AND l.classid::bigint = %s AND l.objid::bigint = %s "
            "AND l.objsubid = 1",
            (unsigned >> 32, unsigned & 0xFFFFFFFF),
        ).fetchone()
        if row is None:
            return "holder not visible to this database role"
        app, addr, pid = row
        where = f"from {addr}" if addr else "over a local socket"
        return f"{app or 'an unnamed client'}, {where}, database backend pid {pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
