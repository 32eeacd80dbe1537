"""The SQLite queue's schema: its tables, and the two numbers that say which releases may
use a queue.

Schema versions: two numbers, the same rule as PostgreSQL's (pg_schema.py), so that a node can be
rolled back to the previous release (and, with PostgreSQL, a cluster upgraded one node at a time):
* ``PRAGMA user_version`` (``SCHEMA_VERSION``) is the one every release checks at open, since the
  first: a release refuses a queue whose version is above its own. It is "the oldest release that
  can use this queue", so bump it ONLY for a change older code cannot tolerate: a column it does
  not fill but newer code needs filled, a table or column it uses dropped or renamed, a meaning
  changed, a table newer code relies on being kept in step with the messages by every writer.
  A queue's version is raised to this release's at open, never lowered.
* ``relaygate_schema.layout`` (``SCHEMA_LAYOUT``) is the full layout: bump it for EVERY change,
  additive ones included (a table or index only newer code uses, a column older code's writes
  leave correct). Additive objects are created idempotently (IF NOT EXISTS) at every open, so a
  queue of any older layout is upgraded in place, and one of a newer layout (a newer release's
  additive change) is used as it is; its layout is never lowered.

Separate from the store so that the layout, and the rule for changing it, are read (and
bumped) in one place; `create_or_upgrade` runs on the writer thread at open.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from .store import StoreError

#: PRAGMA user_version, checked at open by every release (see "Schema versions" above): 2:
#: message_data.spool (big messages in spool files). Not 3: development builds of send_log
#: (a952ede until this rule) wrote 3, so the next bump is to 4.
SCHEMA_VERSION = 2
#: relaygate_schema.layout: 1 and 2 as the versions above, 3: send_log (send connectors' pacing
#: limits; additive: a release without it simply does not pace), 4: graph_drafts (the Graph drafts
#: an attempt left to resolve; additive: a release without it makes a new draft, as it did), 5:
#: graph_drafts.message_id (a plain sendMail in flight is recorded too; additive: a release
#: without it leaves it '' and never records a sendMail).
SCHEMA_LAYOUT = 5

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id       TEXT PRIMARY KEY,
    sender         TEXT NOT NULL,
    size           INTEGER NOT NULL,
    received_at    REAL NOT NULL,
    message_id     TEXT NOT NULL,
    client_ip      TEXT NOT NULL,
    connector      TEXT NOT NULL,
    helo           TEXT NOT NULL,
    auth_user      TEXT NOT NULL,
    suspended      INTEGER NOT NULL DEFAULT 0,
    delay_notified INTEGER NOT NULL DEFAULT 0,
    metadata       TEXT NOT NULL DEFAULT '{}',
    lease_owner    TEXT,
    lease_until    REAL,
    -- derived from the recipients, maintained by the writer:
    status         TEXT NOT NULL,      -- message_status()
    next_due       REAL,               -- min(next_attempt, NULL->0) over Ready/Retry recipients
    open_rcpts     INTEGER NOT NULL,   -- recipients not Delivered/Failed
    completed_at   REAL                -- when open_rcpts reached 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_due, queue_id)
    WHERE suspended = 0 AND next_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS messages_status ON messages (status, queue_id);
CREATE INDEX IF NOT EXISTS messages_completed ON messages (completed_at)
    WHERE completed_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS recipients (
    queue_id     TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    idx          INTEGER NOT NULL,
    address      TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    last_error   TEXT NOT NULL DEFAULT '',
    last_attempt REAL,
    next_attempt REAL,
    PRIMARY KEY (queue_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS message_data (
    queue_id TEXT PRIMARY KEY REFERENCES messages (queue_id) ON DELETE CASCADE,
    sha256   BLOB NOT NULL,
    data     BLOB NOT NULL,   -- empty when the bytes are in a spool file
    spool    TEXT             -- that file's name in <queue dir>/spool (see spool.py)
);
-- one row per send counted against a budget (reserve_send: send connectors' pacing limits)
CREATE TABLE IF NOT EXISTS send_log (
    key        TEXT NOT NULL,
    at         REAL NOT NULL,
    recipients INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS send_log_key_at ON send_log (key, at);
-- the Microsoft Graph draft an attempt made for a route (Store.save_graph_draft)
CREATE TABLE IF NOT EXISTS graph_drafts (
    queue_id TEXT NOT NULL REFERENCES messages (queue_id) ON DELETE CASCADE,
    route    TEXT NOT NULL,
    mailbox  TEXT NOT NULL,
    draft_id TEXT NOT NULL,   -- '' for a plain sendMail
    sending  INTEGER NOT NULL,
    message_id TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (queue_id, route)
) WITHOUT ROWID;
-- one row: the layout (SCHEMA_LAYOUT), the version every release checks is PRAGMA user_version
CREATE TABLE IF NOT EXISTS relaygate_schema (layout INTEGER NOT NULL);
"""


def create_or_upgrade(conn: sqlite3.Connection, path: Path) -> None:
    """Create the tables of a new queue, or upgrade an older layout in place; refuse a queue
    whose checked version (PRAGMA user_version) is above this release's."""
    conn.execute("BEGIN IMMEDIATE")  # the version read and set under the write lock (workers)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: queue schema version {version} is newer than this RelayGate "
                f"({SCHEMA_VERSION})"
            )
        for stmt in _SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        columns = {row[1] for row in conn.execute("PRAGMA table_info(message_data)")}
        if "spool" not in columns:  # a version 1 queue: every message is still inline
            conn.execute("ALTER TABLE message_data ADD COLUMN spool TEXT")
        columns = {row[1] for row in conn.execute("PRAGMA table_info(graph_drafts)")}
        if "message_id" not in columns:  # layout 4
            conn.execute("ALTER TABLE graph_drafts ADD COLUMN message_id TEXT NOT NULL DEFAULT ''")
        # An older layout was upgraded just above (3: the send_log table and its index; 4:
        # graph_drafts; 5: graph_drafts.message_id); a newer one stays as it is.
        layout = conn.execute("SELECT max(layout) FROM relaygate_schema").fetchone()[0]
        if layout is None:
            conn.execute("INSERT INTO relaygate_schema (layout) VALUES (?)", (SCHEMA_LAYOUT,))
        elif layout < SCHEMA_LAYOUT:
            conn.execute("UPDATE relaygate_schema SET layout = ?", (SCHEMA_LAYOUT,))
        if version < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
