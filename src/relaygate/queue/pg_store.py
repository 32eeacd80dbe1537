"""PostgreSQL queue store: several relay nodes sharing one queue (DESIGN.md, decision 3).

Any node delivers any message: a node leases due messages with ``FOR UPDATE SKIP LOCKED`` (two
nodes never wait for each other's rows, and never get the same message), and a lease a dead node
held simply expires (``queue.lease_duration``) and is taken by a live one.

The same ``Store`` contract as SQLite (store.py), the same tables and derived columns
(``status``, ``next_due``, ``open_rcpts``, ``completed_at`` from ``model.derived_columns``):
* Durability: every write commits with ``synchronous_commit`` at least ``on`` (set on each
  connection of the pool if the server's, database's or role's default is off), so a 250 waits
  for the WAL flush on the database server, and so does a delivery result or a lease: the
  contract's "every mutating call is durable on return" holds through a crash of the database
  server too. PostgreSQL group-commits concurrent transactions itself.
* The message bytes are stored in the database (``bytea``), never in a local spool file: the
  node that delivers a message is often not the one that received it.
* Every write that touches one message locks its ``messages`` row first, then its recipients:
  one lock order for every call, so two nodes' calls cannot deadlock. A deadlock or
  serialization failure all the same (PostgreSQL aborts the whole transaction) is retried.
* An error from COMMIT itself (the connection lost while committing) is "outcome unknown", as
  in SQLite: the transaction may have committed on the server.

Schema versions: two numbers, the same rule as SQLite's, so that nodes of two releases can
share one queue (a rolling upgrade, or one node rolled back); see pg_schema.py, which holds
the schema.

The class is put together from sibling modules, one seam each: pg_schema.py (the tables and their
versions, with the rule for bumping them), pg_connection.py (the pool, one call as one transaction,
its time limit and retries, the errors), pg_writes.py (what each change writes), pg_leases.py (the
leases and the cluster clock), pg_pacing.py (send pacing), pg_reads.py (the reads); this module
holds the store's state, its opening and closing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
from psycopg_pool import AsyncConnectionPool

from .model import QueueIdGenerator
from .pg_connection import TRANSFER_FLOOR as TRANSFER_FLOOR
from .pg_connection import Conn, _configure_connection, _scrub, redact_url
from .pg_leases import _PgLeases
from .pg_pacing import _PgPacing
from .pg_reads import _PgReads
from .pg_schema import SCHEMA_LAYOUT as SCHEMA_LAYOUT
from .pg_schema import SCHEMA_VERSION as SCHEMA_VERSION
from .pg_schema import create_or_upgrade
from .pg_writes import _PgWrites
from .store import Store, StoreClosedError, StoreError

__all__ = ["PostgresStore", "redact_url"]

log = logging.getLogger(__name__)


class PostgresStore(_PgReads, _PgWrites, _PgLeases, _PgPacing, Store):
    """The cluster queue store. See the module docstring for the design."""

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        connect_timeout: float = 5.0,
        call_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``connect_timeout`` also bounds the wait for a free connection: while the database is
        down, a submit fails with 451 within it instead of holding its client. ``call_timeout``
        bounds one transaction: a database server that stops answering (hung, or its network
        dropping packets) fails the call instead of holding it, its client and ``close()``
        forever (psycopg then cancels the query and, if the server does not answer that
        either, drops the connection within 10 s more). ``clock``: this node's wall clock (the
        one its callers' ``now`` comes from), checked against the database server's before
        leasing (tests give a skewed one)."""
        self.url = url
        self.min_connections = min_connections
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self.call_timeout = call_timeout
        self._pool: AsyncConnectionPool[Conn] | None = None
        self._ids = QueueIdGenerator()
        self._clock = clock
        self._closed = False
        self._active = 0  # calls in progress (close waits for them)
        self._idle = asyncio.Event()
        # statistics, as SqliteStore.stats() reports them
        self.commits = 0
        self.failed_commits = 0
        self.retried = 0

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)})"

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        if self._closed:
            raise StoreClosedError("store was closed; create a new one")
        # One direct connection first: it fails at once with libpq's reason (refused, bad
        # password, no such database), where the pool would retry until its timeout.
        try:
            probe = await psycopg.AsyncConnection.connect(
                self.url, connect_timeout=max(1, int(self.connect_timeout))
            )
        except psycopg.Error as exc:
            reason = _scrub(" ".join(str(exc).split()), self.url)
            raise StoreError(
                f"cannot connect to the queue database {redact_url(self.url)}: {reason}"
            ) from exc
        await probe.close()
        pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            self.url,
            min_size=self.min_connections,
            max_size=self.max_connections,
            timeout=self.connect_timeout,
            kwargs={"autocommit": False, "connect_timeout": max(1, int(self.connect_timeout))},
            open=False,
            name="relaygate-queue",
            configure=_configure_connection,
        )
        try:
            await pool.open(wait=True, timeout=self.connect_timeout)
        except Exception as exc:
            await pool.close()
            raise StoreError(
                f"cannot connect to the queue database {redact_url(self.url)}: "
                f"{_scrub(str(exc), self.url)}"
            ) from exc
        self._pool = pool
        try:
            top = await self._tx(create_or_upgrade, self.url)
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        if top:
            self._ids.advance_past(top)

    async def close(self) -> None:
        """Refuse new calls, let the calls already made finish (a submit in progress may be a
        message its client waits a 250 for), then close the connections."""
        pool, self._pool = self._pool, None
        self._closed = True
        if pool is None:
            return
        if self._active:
            self._idle.clear()
            await self._idle.wait()
        await pool.close()

    async def __aenter__(self) -> PostgresStore:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def stats(self) -> dict[str, int]:
        return {
            "commits": self.commits,
            "failed_commits": self.failed_commits,
            "retried_transactions": self.retried,
        }
