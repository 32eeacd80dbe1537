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

Schema versions: two numbers in the one row of ``relaygate_schema``, the same rule as SQLite's
(sqlite_schema.py), so that nodes of two releases can share one queue (a rolling upgrade, or one
node rolled back):
* ``version`` (``SCHEMA_VERSION``) is the one every release checks at open, since the first: a
  release refuses a queue whose version is above its own. It is "the oldest release that can use
  this queue", so bump it ONLY for a change older code cannot tolerate: a column it does not
  fill but newer code needs filled, a table or column it uses dropped or renamed, a meaning
  changed, a table newer code relies on being kept in step with the messages by every writer.
  A queue's version is raised to this release's at open, never lowered.
* ``layout`` (``SCHEMA_LAYOUT``) is the full layout: bump it for EVERY change, additive ones
  included (a table or index only newer code uses, a column older code's writes leave correct).
  Additive objects are created idempotently (IF NOT EXISTS) at every open, so a queue of any older
  layout is upgraded in place, and one of a newer layout (a newer release's additive change) is
  used as it is; its layout is never lowered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pg_errors
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .model import (
    FINAL_STATUSES,
    MESSAGE_COLUMNS,
    QUEUE_ENTRY_COLUMNS,
    RECIPIENT_COLUMNS,
    SEND_LOG_RETENTION,
    Envelope,
    GraphDraft,
    QueueEntry,
    QueueIdGenerator,
    RecipientState,
    RecipientStatus,
    SendLimit,
    SendWait,
    StoredMessage,
    derived_columns,
    message_from_row,
    parse_status,
    queue_entries_from_rows,
    recipient_from_row,
    submitted_recipients,
)
from .store import (
    AddressPattern,
    ClockSkewError,
    CorruptMessageError,
    MessageInFlightError,
    Store,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    check_after,
    sql_head_limit,
)

__all__ = ["PostgresStore", "redact_url"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]

#: relaygate_schema.version, checked at open by every release (see "Schema versions" above). Not
#: 2: development builds of send_log (a952ede until this rule) wrote 2, so the next bump is to 3.
SCHEMA_VERSION = 1
#: relaygate_schema.layout: 1 (what version 1 meant before the split), 2: send_log (send
#: connectors' pacing limits; additive: a release without it simply does not pace), 3:
#: graph_drafts (the Graph drafts an attempt left to resolve; additive: a release without it makes
#: a new draft, as it did), 4: graph_drafts.message_id (a plain sendMail in flight is recorded
#: too; additive: a release without it leaves it '' and never records a sendMail).
SCHEMA_LAYOUT = 4
#: Any fixed number: taken with pg_advisory_xact_lock while the schema is created, so that nodes
#: starting together do not race on CREATE TABLE IF NOT EXISTS (which is not concurrency-safe).
_SCHEMA_LOCK = 0x52_47_51_31  # "RGQ1"
#: The first key of the two-key advisory lock that serialises the reservations of one send budget
#: (the second: hashtext of the budget's key). Two-key locks never collide with _SCHEMA_LOCK.
_SEND_BUDGET_LOCK = 0x52_47_53_42  # "RGSB"

#: Created (or completed: a queue of layout 1 has no layout column) before the version is checked.
_SCHEMA_TABLE = """
CREATE TABLE IF NOT EXISTS relaygate_schema (version integer NOT NULL);
ALTER TABLE relaygate_schema ADD COLUMN IF NOT EXISTS layout integer
"""

#: Every table and index of SCHEMA_LAYOUT, idempotent: run at every open of a queue whose version
#: this release accepts.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id       text PRIMARY KEY,
    sender         text NOT NULL,
    size           bigint NOT NULL,
    received_at    double precision NOT NULL,
    message_id     text NOT NULL,
    client_ip      text NOT NULL,
    connector      text NOT NULL,
    helo           text NOT NULL,
    auth_user      text NOT NULL,
    suspended      boolean NOT NULL DEFAULT false,
    delay_notified boolean NOT NULL DEFAULT false,
    metadata       text NOT NULL DEFAULT '{}',
    lease_owner    text,
    lease_until    double precision,
    status         text NOT NULL,
    next_due       double precision,
    open_rcpts     integer NOT NULL,
    completed_at   double precision
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_due, queue_id)
    WHERE NOT suspended AND next_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_status ON messages (status, queue_id);
CREATE INDEX IF NOT EXISTS messages_completed ON messages (completed_at)
    WHERE completed_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_lease_owner ON messages (lease_owner)
    WHERE lease_owner IS NOT NULL;
CREATE TABLE IF NOT EXISTS recipients (
    queue_id     text NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    idx          integer NOT NULL,
    address      text NOT NULL,
    status       text NOT NULL,
    attempts     integer NOT NULL DEFAULT 0,
    last_error   text NOT NULL DEFAULT '',
    last_attempt double precision,
    next_attempt double precision,
    PRIMARY KEY (queue_id, idx)
);
CREATE TABLE IF NOT EXISTS message_data (
    queue_id text PRIMARY KEY REFERENCES messages (queue_id) ON DELETE CASCADE,
    sha256   bytea NOT NULL,
    data     bytea NOT NULL
);
CREATE TABLE IF NOT EXISTS send_log (
    key        text NOT NULL,
    at         double precision NOT NULL,
    recipients integer NOT NULL
);
CREATE INDEX IF NOT EXISTS send_log_key_at ON send_log (key, at);
CREATE TABLE IF NOT EXISTS graph_drafts (
    queue_id text NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    route    text NOT NULL,
    mailbox  text NOT NULL,
    draft_id text NOT NULL,
    sending  boolean NOT NULL,
    message_id text NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, route)
);
"""
#: Layout 4's column, for a graph_drafts table of layout 3 (added only when missing: an ALTER
#: TABLE, even IF NOT EXISTS, locks the table out of the other nodes' deliveries).
_GRAPH_DRAFTS_MESSAGE_ID = """
SELECT 1 FROM information_schema.columns
WHERE table_schema = current_schema() AND table_name = 'graph_drafts'
    AND column_name = 'message_id'
"""

#: A submit in one statement: the message, its bytes and its recipients (none of the three when
#: the queue id is taken: ON CONFLICT leaves `m` empty).
_SUBMIT = """
WITH m AS (
    INSERT INTO messages (queue_id, sender, size, received_at, message_id, client_ip, connector,
        helo, auth_user, metadata, status, next_due, open_rcpts, lease_owner, lease_until)
    VALUES (%(queue_id)s, %(sender)s, %(size)s, %(received_at)s, %(message_id)s, %(client_ip)s,
        %(connector)s, %(helo)s, %(auth_user)s, %(metadata)s, %(ready)s, 0, %(open_rcpts)s,
        %(lease_owner)s, %(lease_until)s)
    ON CONFLICT (queue_id) DO NOTHING
    RETURNING queue_id
), d AS (
    INSERT INTO message_data (queue_id, sha256, data)
    SELECT queue_id, %(sha256)s, %(data)s FROM m
), r AS (
    INSERT INTO recipients (queue_id, idx, address, status)
    SELECT m.queue_id, t.n - 1, t.address, %(ready)s
    FROM m, unnest(%(recipients)s::text[]) WITH ORDINALITY AS t(address, n)
)
SELECT queue_id FROM m
"""
#: Per-recipient outcomes, one statement for all of them (a recipient already final is kept).
_RECORD = """
UPDATE recipients r SET status = v.status, attempts = v.attempts, last_error = v.last_error,
    last_attempt = v.last_attempt, next_attempt = v.next_attempt
FROM unnest(%s::text[], %s::text[], %s::integer[], %s::text[], %s::double precision[],
            %s::double precision[]) AS v(address, status, attempts, last_error, last_attempt,
                                         next_attempt)
WHERE r.queue_id = %s AND r.address = v.address AND r.status <> ALL(%s)
"""

_MSG_COLS = MESSAGE_COLUMNS
#: Store.queue_entries: the first %s unfinished messages (the messages_status index), joined with
#: their unfinished recipients (the recipients' primary key).
_QUEUE_ENTRIES_SQL = (
    f"SELECT {QUEUE_ENTRY_COLUMNS} FROM (SELECT queue_id, size, status, suspended, lease_owner, "
    "lease_until FROM messages WHERE status IN ('Ready', 'Retry', 'Suspended') "
    "AND queue_id > %s ORDER BY queue_id LIMIT %s) AS m JOIN recipients AS r "
    "ON r.queue_id = m.queue_id AND r.status NOT IN ('Delivered', 'Failed') "
    "ORDER BY m.queue_id, r.idx"
)
_RCPT_COLS = RECIPIENT_COLUMNS
_FINAL = [s.value for s in FINAL_STATUSES]
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


#: ASCII-only lower-casing, as SQLite's lower() (whatever the database's locale and collation).
_ASCII_LOWER = "translate({}, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"


def _list_filters(
    status: str | None,
    after: str | None,
    sender: AddressPattern | None,
    recipient: AddressPattern | None,
) -> tuple[str, list[Any]]:
    """The WHERE clause of ``list_messages`` and its parameters."""
    clauses: list[str] = []
    args: list[Any] = []
    if status is not None:
        clauses.append("status = %s")
        args.append(parse_status(status).value)
    after = check_after(after)
    if after is not None:
        clauses.append("queue_id > %s")
        args.append(after)
    for pattern, column in ((sender, "sender"), (recipient, "r.address")):
        if pattern is None:
            continue
        test = _ASCII_LOWER.format(column) + (" LIKE %s ESCAPE '\\'" if pattern.like else " = %s")
        if column == "sender":
            clauses.append(test)
        else:
            clauses.append(
                f"EXISTS (SELECT 1 FROM recipients r WHERE r.queue_id = messages.queue_id "
                f"AND {test})"
            )
        args.append(pattern.sql_value)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), args


async def _load(conn: Conn, ids: Sequence[str]) -> list[StoredMessage]:
    """The messages ``ids`` with their recipients, in the order given (unknown ids skipped)."""
    if not ids:
        return []
    cur = await conn.execute(
        f"SELECT {_MSG_COLS} FROM messages WHERE queue_id = ANY(%s)", (list(ids),)
    )
    rows = {r[0]: r for r in await cur.fetchall()}
    rcpts: dict[str, list[RecipientState]] = {qid: [] for qid in rows}
    cur = await conn.execute(
        f"SELECT {_RCPT_COLS} FROM recipients WHERE queue_id = ANY(%s) ORDER BY queue_id, idx",
        (list(rows),),
    )
    for row in await cur.fetchall():
        rcpts[row[0]].append(recipient_from_row(row))
    return [message_from_row(rows[qid], rcpts[qid]) for qid in ids if qid in rows]


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


async def _lock_message(conn: Conn, queue_id: str) -> tuple[bool, float | None] | None:
    """Lock the message's row (the first lock of every write to one message: see the module
    docstring) and return ``(suspended, completed_at)``, or ``None`` if it does not exist."""
    cur = await conn.execute(
        "SELECT suspended, completed_at FROM messages WHERE queue_id = %s FOR UPDATE", (queue_id,)
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


async def _refresh(
    conn: Conn,
    queue_id: str,
    locked: tuple[bool, float | None],
    now: float,
    release_owner: str | None = None,
) -> None:
    """Recompute the derived columns from the recipients (``locked``: what _lock_message read);
    with ``release_owner``, end that owner's lease in the same UPDATE."""
    cur = await conn.execute(
        "SELECT status, next_attempt FROM recipients WHERE queue_id = %s", (queue_id,)
    )
    status, next_due, open_rcpts, completed_at = derived_columns(
        locked[0], locked[1], await cur.fetchall(), now
    )
    await conn.execute(
        "UPDATE messages SET status = %s, next_due = %s, open_rcpts = %s, completed_at = %s, "
        "lease_until = CASE WHEN lease_owner = %s THEN NULL ELSE lease_until END, "
        "lease_owner = CASE WHEN lease_owner = %s THEN NULL ELSE lease_owner END "
        "WHERE queue_id = %s",
        (status, next_due, open_rcpts, completed_at, release_owner, release_owner, queue_id),
    )
    if open_rcpts == 0:
        # Finished: the Graph records of its routes go in the transaction that records how
        # (a record forgotten before the result is stored lets a crash send it again).
        await conn.execute("DELETE FROM graph_drafts WHERE queue_id = %s", (queue_id,))


async def _send_wait(
    conn: Conn, key: str, now: float, recipients: int, limits: tuple[SendLimit, ...]
) -> tuple[SendWait | None, int]:
    """Whether a send of ``recipients`` fits the budget ``key`` at ``now`` (None) or when it
    will (``Store.reserve_send``), and the room for recipients left now: 0 when a message limit
    is spent, else the least any recipient limit has left (``recipients`` with none)."""
    wait: SendWait | None = None
    room = recipients
    for lim in limits:
        since = now - lim.window
        cur = await conn.execute(
            "SELECT count(*), coalesce(sum(recipients), 0) FROM send_log "
            "WHERE key = %s AND at > %s",
            (key, since),
        )
        row = await cur.fetchone()
        assert row is not None
        count, total = int(row[0]), int(row[1])
        when: float | None = None
        if lim.max_messages is not None and count + 1 > lim.max_messages:
            room = 0
            # the (count - max + 1)-th oldest send must leave the window
            cur = await conn.execute(
                "SELECT at FROM send_log WHERE key = %s AND at > %s ORDER BY at LIMIT 1 OFFSET %s",
                (key, since, count - lim.max_messages),
            )
            found = await cur.fetchone()
            assert found is not None
            when = float(found[0]) + lim.window
        if lim.max_recipients is not None:
            room = min(room, max(0, lim.max_recipients - total))
            if total + recipients > lim.max_recipients:
                cur = await conn.execute(
                    "SELECT at FROM (SELECT at, sum(recipients) OVER (ORDER BY at) AS freed"
                    " FROM send_log WHERE key = %s AND at > %s) AS w WHERE freed >= %s"
                    " ORDER BY at LIMIT 1",
                    (key, since, total + recipients - lim.max_recipients),
                )
                found = await cur.fetchone()
                assert found is not None
                when = max(when or 0.0, float(found[0]) + lim.window)
        if when is not None and (wait is None or when > wait.until):
            wait = SendWait(when, lim)
    return wait, room


#: The least transfer rate to the database a message's octets are given time for, beyond
#: call_timeout: a 1023 MB message (the limit) gets about 8.5 minutes more, a 10 KB one 5 ms.
TRANSFER_FLOOR = 2 * 1024 * 1024


class PostgresStore(Store):
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
            top = await self._tx(self._init_schema)
        except BaseException:
            self._pool = None
            await pool.close()
            raise
        if top:
            self._ids.advance_past(top)

    async def _init_schema(self, conn: Conn) -> str | None:
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for statement in _SCHEMA_TABLE.split(";"):  # one at a time: pipeline mode takes one each
            if statement.strip():
                await conn.execute(statement)
        cur = await conn.execute("SELECT max(version), max(layout) FROM relaygate_schema")
        row = await cur.fetchone()
        version, layout = (row[0], row[1]) if row else (None, None)
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(
                f"queue database {redact_url(self.url)}: schema version {version} is newer "
                f"than this RelayGate ({SCHEMA_VERSION})"
            )
        for statement in _SCHEMA.split(";"):
            if statement.strip():
                await conn.execute(statement)
        cur = await conn.execute(_GRAPH_DRAFTS_MESSAGE_ID)
        if await cur.fetchone() is None:
            await conn.execute(
                "ALTER TABLE graph_drafts ADD COLUMN message_id text NOT NULL DEFAULT ''"
            )
        if version is None:
            await conn.execute(
                "INSERT INTO relaygate_schema (version, layout) VALUES (%s, %s)",
                (SCHEMA_VERSION, SCHEMA_LAYOUT),
            )
        elif version < SCHEMA_VERSION or layout is None or layout < SCHEMA_LAYOUT:
            # An older queue, upgraded in place: what it lacks was created just above (layout
            # 1 → 2: the send_log table and its index; 3: graph_drafts; 4:
            # graph_drafts.message_id). A newer layout stays as it is.
            await conn.execute(
                "UPDATE relaygate_schema SET version = greatest(version, %s), "
                "layout = greatest(layout, %s)",
                (SCHEMA_VERSION, SCHEMA_LAYOUT),
            )
        cur = await conn.execute("SELECT max(queue_id) FROM messages")
        row = await cur.fetchone()
        return row[0] if row else None

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

    # ------------------------------------------------------------------ transactions

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

    # ------------------------------------------------------------------ writes

    async def submit(
        self,
        envelope: Envelope,
        data: bytes,
        *,
        lease: tuple[str, float] | None = None,
        received_at: float | None = None,
    ) -> str:
        recipients = submitted_recipients(envelope, data)
        blob = bytes(data)
        return await self._tx(
            self._op_submit,
            envelope,
            recipients,
            blob,
            hashlib.sha256(blob).digest(),
            time.time() if received_at is None else received_at,
            lease,
            octets=len(blob),
        )

    async def _op_submit(
        self,
        conn: Conn,
        env: Envelope,
        recipients: list[str],
        data: bytes,
        digest: bytes,
        received_at: float,
        lease: tuple[str, float] | None,
    ) -> str:
        lease_owner, lease_until = lease if lease is not None else (None, None)
        metadata = json.dumps(env.metadata, ensure_ascii=False, sort_keys=True)
        for _ in range(1000):
            queue_id = self._ids.next()
            cur = await conn.execute(
                _SUBMIT,
                {
                    "queue_id": queue_id,
                    "sender": env.sender,
                    "size": len(data),
                    "received_at": received_at,
                    "message_id": env.message_id,
                    "client_ip": env.client_ip,
                    "connector": env.connector,
                    "helo": env.helo,
                    "auth_user": env.auth_user,
                    "metadata": metadata,
                    "ready": RecipientStatus.READY.value,
                    "open_rcpts": len(recipients),
                    "lease_owner": lease_owner,
                    "lease_until": lease_until,
                    "sha256": digest,
                    "data": data,
                    "recipients": recipients,
                },
            )
            if await cur.fetchone() is not None:
                return queue_id
            # Another node took this id (same millisecond): continue past the largest one.
            top = await (await conn.execute("SELECT max(queue_id) FROM messages")).fetchone()
            if top and top[0]:
                self._ids.advance_past(top[0])
        raise StoreError("could not allocate a queue id")  # pragma: no cover

    async def lease_due(
        self, owner: str, now: float, lease_seconds: float, limit: int
    ) -> list[StoredMessage]:
        if limit <= 0:
            return []

        async def run(conn: Conn) -> list[StoredMessage]:
            # The database server's clock, read in the same round trip as the lease (pipeline
            # mode) and checked before the transaction commits: a clock stepped off is caught
            # at the next scan. Ours around it: the offset is known within that round trip.
            before = self._clock()
            clock_cur = await conn.execute("SELECT extract(epoch FROM clock_timestamp())::float8")
            # SKIP LOCKED: rows another node is leasing (or writing) right now are not waited
            # for; a row that changed since this statement's snapshot is checked again by
            # PostgreSQL against the WHERE clause once locked, so no lease is taken twice.
            cur = await conn.execute(
                "WITH picked AS ("
                " SELECT queue_id FROM messages"
                " WHERE NOT suspended AND next_due <= %(now)s"
                " AND (lease_owner IS NULL OR lease_until IS NULL OR lease_until <= %(now)s"
                "      OR lease_owner = %(owner)s)"
                " ORDER BY next_due, queue_id LIMIT %(limit)s"
                " FOR UPDATE SKIP LOCKED) "
                "UPDATE messages m SET lease_owner = %(owner)s, lease_until = %(until)s "
                "FROM picked WHERE m.queue_id = picked.queue_id "
                "RETURNING m.queue_id, m.next_due",
                {"now": now, "owner": owner, "limit": limit, "until": now + lease_seconds},
            )
            server_clock = await clock_cur.fetchone()
            after = self._clock()
            assert server_clock is not None
            # The server read its clock somewhere between `before` and `after`: the offset is
            # known within half that (a busy server, a slow link), which is given the benefit.
            offset = float(server_clock[0]) - (before + after) / 2
            self._check_clock(offset, max(0.0, after - before) / 2, lease_seconds)
            picked = sorted(await cur.fetchall(), key=lambda r: (r[1], r[0]))
            return await _load(conn, [r[0] for r in picked])

        return await self._tx(run)

    def _check_clock(self, offset: float, uncertainty: float, lease_seconds: float) -> None:
        """Refuse to lease when this node's clock is off the database server's (``offset``:
        theirs minus ours) by more than a third of a lease. Every node compares leases with its
        own clock (the contract's ``now``): one ahead by more than a lease has left takes a live
        lease of another node, one behind writes leases the others see end early, and the
        message is delivered twice. A delivery renews its lease every third of one, so a third
        is what each lease keeps in hand. The database server's clock stands for the cluster's:
        the one clock every node sees."""
        if abs(offset) - uncertainty > lease_seconds / 3:
            raise ClockSkewError(
                f"this node's clock is {abs(offset):.0f} s "
                f"{'behind' if offset > 0 else 'ahead of'} the queue database "
                f"{redact_url(self.url)}'s, more than a third of queue.lease_duration "
                f"({lease_seconds:g} s): its leases could overlap other nodes' and a message be "
                "delivered twice, so it leases no message until the clocks agree (set up NTP on "
                "the node and the database server)"
            )

    async def release(self, queue_id: str, owner: str) -> None:
        await self._tx(
            _rowcount,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL "
            "WHERE queue_id = %s AND lease_owner = %s",
            (queue_id, owner),
        )

    async def renew_leases(self, owner: str, queue_ids: Sequence[str], until: float) -> int:
        if not queue_ids:
            return 0

        # Rows locked in queue-id order, as every call locking several does: two such calls
        # never wait for each other in a cycle (a deadlock, then a retry).
        return await self._tx(
            _rowcount,
            "UPDATE messages SET lease_until = %s WHERE queue_id IN ("
            " SELECT queue_id FROM messages WHERE lease_owner = %s AND queue_id = ANY(%s)"
            " ORDER BY queue_id FOR UPDATE)",
            (until, owner, list(queue_ids)),
        )

    async def release_owners(self, owners: Sequence[str]) -> int:
        """Drop every lease held by one of ``owners`` (processes of this node known not to run:
        the supervisor before it starts its workers). Returns how many were dropped."""
        if not owners:
            return 0

        return await self._tx(
            _rowcount,
            "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ANY(%s)",
            (list(owners),),
        )

    async def record_results(
        self, queue_id: str, owner: str, results: list[RecipientState], *, release: bool = False
    ) -> None:
        latest = {r.address: r for r in results}  # one outcome per address: the last given
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for r in latest.values():
            for column, value in zip(
                columns,
                (
                    r.address,
                    RecipientStatus(r.status).value,
                    r.attempts,
                    r.last_error,
                    r.last_attempt,
                    r.next_attempt,
                ),
                strict=True,
            ):
                column.append(value)
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:  # removed by the admin meanwhile
                return
            if latest:
                await conn.execute(_RECORD, (*columns, queue_id, _FINAL))
            await _refresh(conn, queue_id, locked, now, owner if release else None)

        # Durable, as the contract asks: a Delivered that a crash of the database server undid
        # would be delivered again by whichever node leases the message next.
        await self._tx(run)

    async def set_flags(
        self,
        queue_id: str,
        *,
        suspended: bool | None = None,
        delay_notified: bool | None = None,
    ) -> None:
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:
                raise KeyError(queue_id)
            await conn.execute(
                "UPDATE messages SET suspended = coalesce(%s, suspended), "
                "delay_notified = coalesce(%s, delay_notified) WHERE queue_id = %s",
                (suspended, delay_notified, queue_id),
            )
            new_suspended = locked[0] if suspended is None else suspended
            await _refresh(conn, queue_id, (new_suspended, locked[1]), now)

        await self._tx(run)

    async def retry_now(self, queue_id: str) -> None:
        now = time.time()

        async def run(conn: Conn) -> None:
            locked = await _lock_message(conn, queue_id)
            if locked is None:
                raise KeyError(queue_id)
            await conn.execute(
                "UPDATE recipients SET next_attempt = NULL "
                "WHERE queue_id = %s AND status <> ALL(%s)",
                (queue_id, _FINAL),
            )
            await _refresh(conn, queue_id, locked, now)

        await self._tx(run)

    async def remove(
        self, queue_id: str, *, unless_in_flight_at: float | None = None
    ) -> StoredMessage | None:
        async def run(conn: Conn) -> StoredMessage | None:
            if await _lock_message(conn, queue_id) is None:
                return None
            msg = (await _load(conn, [queue_id]))[0]
            if (
                unless_in_flight_at is not None
                and msg.lease_owner is not None
                and msg.lease_until is not None
                and msg.lease_until > unless_in_flight_at
            ):
                raise MessageInFlightError(msg)
            await conn.execute("DELETE FROM messages WHERE queue_id = %s", (queue_id,))
            return msg

        return await self._tx(run)

    async def purge_completed(self, older_than: float) -> int:
        sends_before = time.time() - SEND_LOG_RETENTION

        async def run(conn: Conn) -> int:
            purged = await _rowcount(  # locked in queue-id order (see renew_leases)
                conn,
                "DELETE FROM messages WHERE queue_id IN ("
                " SELECT queue_id FROM messages WHERE completed_at IS NOT NULL"
                " AND completed_at < %s ORDER BY queue_id FOR UPDATE)",
                (older_than,),
            )
            # Send records no window counts any more (reservations only insert: they never
            # wait for these rows, nor these for them).
            await conn.execute("DELETE FROM send_log WHERE at <= %s", (sends_before,))
            return purged

        return await self._tx(run)

    async def reserve_send(
        self,
        key: str,
        now: float,
        recipients: int,
        limits: Sequence[SendLimit],
        *,
        partial: bool = False,
    ) -> SendWait | None:
        for lim in limits:
            lim.check(recipients)
        budget = tuple(limits)

        async def run(conn: Conn) -> SendWait | None:
            # One reservation of this budget at a time across every node: the count and the
            # insert below cannot interleave with another node's (READ COMMITTED alone would let
            # two transactions both see the last free slot). Held until COMMIT.
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_SEND_BUDGET_LOCK, key)
            )
            wait, room = await _send_wait(conn, key, now, recipients, budget)
            if wait is None:
                room = recipients
            elif not partial or room < 1:
                return wait
            await conn.execute(
                "INSERT INTO send_log (key, at, recipients) VALUES (%s, %s, %s)",
                (key, now, room),
            )
            if wait is None:
                return None
            # Partial: the first `room` recipients are counted; when could the others go?
            rest, _ = await _send_wait(conn, key, now, recipients - room, budget)
            assert rest is not None  # the tightest recipient limit is full now
            return SendWait(rest.until, rest.limit, room)

        return await self._tx(run)

    async def save_graph_draft(self, queue_id: str, route: str, draft: GraphDraft | None) -> None:
        async def run(conn: Conn) -> None:
            if draft is None:
                await conn.execute(
                    "DELETE FROM graph_drafts WHERE queue_id = %s AND route = %s",
                    (queue_id, route),
                )
                return
            # A message removed meanwhile: no row (its record would go with it).
            await conn.execute(
                "INSERT INTO graph_drafts "
                "(queue_id, route, mailbox, draft_id, sending, message_id) "
                "SELECT %s, %s, %s, %s, %s, %s WHERE EXISTS "
                "(SELECT 1 FROM messages WHERE queue_id = %s) "
                "ON CONFLICT (queue_id, route) DO UPDATE SET mailbox = excluded.mailbox, "
                "draft_id = excluded.draft_id, sending = excluded.sending, "
                "message_id = excluded.message_id",
                (
                    queue_id,
                    route,
                    draft.mailbox,
                    draft.draft_id,
                    draft.sending,
                    draft.message_id,
                    queue_id,
                ),
            )

        await self._tx(run)

    # ------------------------------------------------------------------ reads

    async def graph_draft(self, queue_id: str, route: str) -> GraphDraft | None:
        async def run(conn: Conn) -> GraphDraft | None:
            cur = await conn.execute(
                "SELECT mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = %s AND route = %s",
                (queue_id, route),
            )
            row = await cur.fetchone()
            return None if row is None else GraphDraft(row[0], row[1], bool(row[2]), row[3])

        return await self._tx(run, readonly=True)

    async def graph_drafts(self, queue_id: str) -> dict[str, GraphDraft]:
        async def run(conn: Conn) -> dict[str, GraphDraft]:
            cur = await conn.execute(
                "SELECT route, mailbox, draft_id, sending, message_id FROM graph_drafts "
                "WHERE queue_id = %s",
                (queue_id,),
            )
            rows = await cur.fetchall()
            return {row[0]: GraphDraft(row[1], row[2], bool(row[3]), row[4]) for row in rows}

        return await self._tx(run, readonly=True)

    async def get(self, queue_id: str) -> StoredMessage | None:
        async def run(conn: Conn) -> StoredMessage | None:
            found = await _load(conn, [queue_id])
            return found[0] if found else None

        return await self._tx(run, readonly=True)

    async def read_data(self, queue_id: str, *, size: int = 0) -> bytes:
        if size <= 0:  # how long the read may take depends on it
            size = await self._tx(self._op_data_size, queue_id, readonly=True)

        async def run(conn: Conn) -> bytes:
            # Binary results: as text, bytea comes back hex-encoded, twice its size plus 2, and
            # the server cannot build a value past 1 GB: a message over 512 MB was stored (and
            # acknowledged) but could never be read back, so never delivered.
            cur = await conn.execute(
                "SELECT sha256, data FROM message_data WHERE queue_id = %s",
                (queue_id,),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            digest, data = row
            data = bytes(data)
            if hashlib.sha256(data).digest() != bytes(digest):
                raise CorruptMessageError(f"message {queue_id}: stored bytes fail their checksum")
            return data

        return await self._tx(run, readonly=True, octets=size)

    @staticmethod
    async def _op_data_size(conn: Conn, queue_id: str) -> int:
        cur = await conn.execute(
            "SELECT octet_length(data) FROM message_data WHERE queue_id = %s", (queue_id,)
        )
        row = await cur.fetchone()
        if row is None:
            raise KeyError(queue_id)
        return int(row[0])

    async def read_head(self, queue_id: str, limit: int) -> bytes:
        length = sql_head_limit(limit)

        async def run(conn: Conn) -> bytes:
            # substring of a toasted bytea fetches the chunks the slice needs (decompressing a
            # compressed value only as far as the slice), not the 35 MB. No checksum: it covers
            # the whole message.
            cur = await conn.execute(
                "SELECT substring(data FROM 1 FOR %s) FROM message_data WHERE queue_id = %s",
                (length, queue_id),
                binary=True,
            )
            row = await cur.fetchone()
            if row is None:
                raise KeyError(queue_id)
            return bytes(row[0])

        return await self._tx(run, readonly=True)

    async def list_messages(
        self,
        *,
        limit: int = 1000,
        status: str | None = None,
        after: str | None = None,
        sender: AddressPattern | None = None,
        recipient: AddressPattern | None = None,
    ) -> list[StoredMessage]:
        where, args = _list_filters(status, after, sender, recipient)
        if limit <= 0:
            return []
        sql = f"SELECT queue_id FROM messages {where} ORDER BY queue_id LIMIT %s"

        async def run(conn: Conn) -> list[StoredMessage]:
            cur = await conn.execute(sql, (*args, limit))
            return await _load(conn, [r[0] for r in await cur.fetchall()])

        return await self._tx(run, readonly=True)

    async def queue_entries(self, *, limit: int, after: str | None = None) -> list[QueueEntry]:
        cursor = check_after(after) or ""  # every queue id is greater than ""
        if limit <= 0:
            return []

        async def run(conn: Conn) -> list[QueueEntry]:
            cur = await conn.execute(_QUEUE_ENTRIES_SQL, (cursor, limit))
            return queue_entries_from_rows(await cur.fetchall())

        return await self._tx(run, readonly=True)

    async def counts(self) -> dict[str, int]:
        now = time.time()

        async def run(conn: Conn) -> dict[str, int]:
            out = {"messages": 0, **{s.value.lower(): 0 for s in RecipientStatus}}
            cur = await conn.execute("SELECT status, count(*) FROM messages GROUP BY status")
            for status, n in await cur.fetchall():
                out[str(status).lower()] = n
                out["messages"] += n
            cur = await conn.execute(
                "SELECT count(*) FILTER (WHERE lease_owner IS NOT NULL AND lease_until > %s), "
                "coalesce(sum(open_rcpts), 0) FROM messages",
                (now,),
            )
            row = await cur.fetchone()
            assert row is not None
            out["active"], out["recipients_pending"] = int(row[0]), int(row[1])
            return out

        return await self._tx(run, readonly=True)
