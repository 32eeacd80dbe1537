"""The PostgreSQL store's connections and transactions: the pool's connections (synchronous_commit
at least on), one call as one transaction in pipeline mode with its time limit (``call_timeout``,
plus time for the message octets it carries), the retry of deadlocks and of connections lost
before COMMIT, and database errors worded without the URL's password.

A base class of `PostgresStore`, which sets up the state declared below in its ``__init__``: kept
apart so that how a call reaches the database and what its failure means reads on its own, without
the SQL of the writes (pg_writes.py), the leases (pg_leases.py), the pacing (pg_pacing.py) or the
reads (pg_reads.py). See pg_store.py for the design as a whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .store import StoreClosedError, StoreError, StoreFullError, StoreOutcomeUnknownError

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: SQLSTATEs after which the whole transaction can simply run again.
_RETRYABLE = (pg_errors.DeadlockDetected, pg_errors.SerializationFailure)
_ATTEMPTS = 5


def redact_url(url: str) -> str:
    """The URL without its password, for messages and logs. A URL is cut up as written, not as
    libpq parses it: a password with an unencoded ``/``, ``?`` or ``#`` (a common mistake) ends
    libpq's authority early, and the password then shows up as a host, port or database name."""
    text = url.strip()
    scheme, sep, rest = text.partition("://")
    if sep:
        userinfo, at, location = rest.rpartition("@")  # the last "@": a password may hold one
        user = userinfo.split(":", 1)[0] if at else ""
        location = location.split("?", 1)[0]  # the query may carry password=...
        return f"{scheme}://{user + '@' if user else ''}{location}"
    try:
        info = psycopg.conninfo.conninfo_to_dict(text)
    except psycopg.Error:
        return "<unparsable database_url>"
    user = str(info.get("user") or "")
    host = str(info.get("host") or "localhost")
    port = f":{info['port']}" if info.get("port") else ""
    return f"postgresql://{user + '@' if user else ''}{host}{port}/{info.get('dbname') or ''}"


def _scrub(text: str, url: str) -> str:
    """``text`` (libpq's reason) without any piece of the URL's password: parsed wrongly, the
    password may be quoted in it as a host, port or database name."""
    secrets: set[str] = set()
    _, sep, rest = url.strip().partition("://")
    if sep:
        userinfo, at, _ = rest.rpartition("@")
        if at and ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            secrets.add(password)
            secrets.update(re.split(r"[/?#@:]", password))
    with contextlib.suppress(psycopg.Error):
        secrets.add(str(psycopg.conninfo.conninfo_to_dict(url).get("password") or ""))
    for secret in sorted((p for p in secrets if len(p) >= 3), key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(secret)}(?![A-Za-z0-9])", "…", text)
    return text


def _wrap_error(exc: psycopg.Error, url: str) -> StoreError:
    """A StoreError for the session, the log and /healthz: libpq's text without any piece of the
    URL's password (a reconnect's error may quote a misparsed one)."""
    reason = _scrub(str(exc), url)
    if isinstance(exc, pg_errors.DiskFull | pg_errors.OutOfMemory | pg_errors.TooManyConnections):
        err: StoreError = StoreFullError(f"queue database full or out of resources: {reason}")
    else:
        err = StoreError(f"queue database error: {reason}")
    err.__cause__ = exc
    return err


async def _configure_connection(conn: Conn) -> None:
    """Each new connection of the pool: its transactions commit with synchronous_commit on even
    where the server's, database's or role's default is off (a common tuning): "a 250 means
    durable" must not depend on it. A stronger setting (remote_write, remote_apply...) is kept."""
    await conn.execute(
        "SELECT set_config('synchronous_commit', 'on', false) "
        "WHERE current_setting('synchronous_commit') = 'off'"
    )
    await conn.commit()


async def _rowcount(conn: Conn, query: str, params: Sequence[Any]) -> int:
    """Run a statement and return how many rows it changed: in pipeline mode the count is known
    only once the server's answer is read, so sync the pipeline for it."""
    async with conn.pipeline() as pipeline:  # the pipeline already running (nested)
        cur = await conn.execute(query, params)
        await pipeline.sync()
    return cur.rowcount


#: The least transfer rate to the database a message's octets are given time for, beyond
#: call_timeout: a 1023 MB message (the limit) gets about 8.5 minutes more, a 10 KB one 5 ms.
TRANSFER_FLOOR = 2 * 1024 * 1024


class _PgConnection:
    """The transactions of `PostgresStore` (whose ``__init__`` sets all this)."""

    url: str
    max_connections: int
    connect_timeout: float
    call_timeout: float
    _pool: AsyncConnectionPool[Conn] | None
    _active: int
    _idle: asyncio.Event
    commits: int
    failed_commits: int
    retried: int

    async def _tx(
        self,
        fn: Callable[..., Awaitable[T]],
        *args: Any,
        readonly: bool = False,
        octets: int = 0,
    ) -> T:
        """Run ``fn(conn, *args)`` in one transaction and commit it (durably: the connection's
        synchronous_commit is at least on, see _configure_connection). ``octets``: the message
        octets it carries, which get time of their own beyond ``call_timeout``."""
        pool = self._pool
        if pool is None:
            raise StoreClosedError("queue store is not open")
        self._active += 1
        try:
            timeout = self.call_timeout + octets / TRANSFER_FLOOR
            return await self._run(pool, fn, args, readonly, timeout)
        finally:
            self._active -= 1
            if not self._active:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def _connection(self, pool: AsyncConnectionPool[Conn]) -> AsyncIterator[Conn]:
        """A connection of the pool. Not one within ``connect_timeout``: if the pool has fewer
        connections than it may open, the database cannot be reached (fail fast: the 451 comes
        soon); if every connection it may open is in use, the database is answering, only busy
        (many sessions, big messages): wait on, up to ``call_timeout``, rather than refuse a
        message already received."""
        try:
            conn = await pool.getconn(timeout=self.connect_timeout)
        except PoolTimeout:
            if pool.get_stats().get("pool_size", 0) < self.max_connections:
                raise
            conn = await pool.getconn(timeout=max(self.call_timeout - self.connect_timeout, 1.0))
        try:
            yield conn
        finally:
            await pool.putconn(conn)

    async def _run(
        self,
        pool: AsyncConnectionPool[Conn],
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        readonly: bool,
        timeout: float,
    ) -> T:
        for attempt in range(_ATTEMPTS):
            committing = False
            conn_lost = False
            try:
                async with asyncio.timeout(timeout), self._connection(pool) as conn:
                    try:
                        # Pipeline mode: statements go out together and the client waits only
                        # where a call reads a result (and at COMMIT): a submit is two round
                        # trips to the server, not one per statement.
                        async with conn.pipeline():
                            if readonly:
                                await conn.execute(
                                    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY"
                                )
                            result = await fn(conn, *args)
                            committing = True
                            await conn.commit()
                    except BaseException:
                        conn_lost = conn.broken or conn.closed
                        if not committing and not conn_lost:
                            with contextlib.suppress(psycopg.Error, TimeoutError):
                                await asyncio.wait_for(conn.rollback(), self.connect_timeout)
                        raise
            except TimeoutError as exc:
                # The server stopped answering: no retry (it would wait as long again). The
                # query was cancelled or its connection dropped; a COMMIT may have gone through.
                self.failed_commits += 1
                what = f"queue database did not answer within {timeout:g} s"
                if committing:
                    raise StoreOutcomeUnknownError(f"{what} to COMMIT, outcome unknown") from exc
                raise StoreError(what) from exc
            except psycopg.Error as exc:
                # Run again: a deadlock or serialization failure (the server undid the whole
                # transaction), or a connection that broke before COMMIT (a database restart, an
                # idle connection dropped by a firewall): nothing of it was committed.
                again = isinstance(exc, _RETRYABLE) or (conn_lost and not committing)
                if again and attempt + 1 < _ATTEMPTS:
                    self.retried += 1
                    if conn_lost:  # its siblings in the pool are likely gone too: test them now
                        with contextlib.suppress(Exception):
                            await pool.check()
                    continue
                self.failed_commits += 1
                if committing:
                    err = StoreOutcomeUnknownError(
                        "queue database commit failed, outcome unknown: "
                        f"{_scrub(str(exc), self.url)}"
                    )
                    raise err from exc
                raise _wrap_error(exc, self.url) from exc
            self.commits += 1
            return result
        raise AssertionError("unreachable")  # pragma: no cover
