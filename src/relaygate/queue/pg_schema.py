"""The PostgreSQL queue's tables and indexes, its two schema numbers, and their creation or upgrade
at open (``create_or_upgrade``, run in the open's first transaction).

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

Kept apart from the store (pg_store.py) so that a change of layout is made, and reviewed, in one
place.
"""

from __future__ import annotations

from .pg_connection import Conn, redact_url
from .store import StoreError

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


async def create_or_upgrade(conn: Conn, url: str) -> str | None:
    """Create the tables of a new queue, or upgrade an older layout in place; refuse a queue whose
    checked version is above this release's. Returns the largest queue id (None: no message)."""
    await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
    for statement in _SCHEMA_TABLE.split(";"):  # one at a time: pipeline mode takes one each
        if statement.strip():
            await conn.execute(statement)
    cur = await conn.execute("SELECT max(version), max(layout) FROM relaygate_schema")
    row = await cur.fetchone()
    version, layout = (row[0], row[1]) if row else (None, None)
    if version is not None and version > SCHEMA_VERSION:
        raise StoreError(
            f"queue database {redact_url(url)}: schema version {version} is newer "
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
