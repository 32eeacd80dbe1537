"""Several nodes sharing one certificate through the PostgreSQL queue database
(:class:`ClusterShare`): an advisory lock picks the node that orders; the certificate and the
pending challenge tokens are published in two tables for the others.

Kept apart because only ``queue.store = "postgresql"`` uses it, and it is the only part of ACME
that talks to the database.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from typing import Any

from relaygate.acme.protocol import AcmeError


class ClusterShare:
    """Several nodes on one PostgreSQL queue (``queue.store = "postgresql"``) share one
    certificate for the same names: the node that holds an advisory lock on the names (on a
    connection of its own, for as long as it lives) runs the ACME client and publishes the
    certificate and the pending challenge tokens in two tables; the others copy the certificate
    to their own files and answer the challenges from the table (the CA may reach any node
    behind the load balancer). When that node dies its lock goes, and the next node to try
    takes over."""

    CERTIFICATES = "relaygate_acme_certificates"
    CHALLENGES = "relaygate_acme_challenges"

    def __init__(self, database_url: str, names: tuple[str, ...]) -> None:
        self.url = database_url
        self.names = ",".join(sorted(n.lower() for n in names))
        digest = hashlib.blake2b(f"relaygate-acme:{self.names}".encode(), digest_size=8)
        self.lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        self._leader: Any = None  # the connection holding the lock
        self._ready = False

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="relaygate-acme"
        )

    def _setup(self, conn: Any) -> None:
        if self._ready:
            return
        for _attempt in range(3):  # two nodes creating the tables at once: one wins, retry
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.CERTIFICATES} (names text PRIMARY KEY, "
                    "chain bytea NOT NULL, key bytea NOT NULL, updated timestamptz NOT NULL "
                    "DEFAULT now())"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.CHALLENGES} (token text PRIMARY KEY, "
                    "key_authorization text NOT NULL, created timestamptz NOT NULL DEFAULT now())"
                )
                self._ready = True
                return
            except Exception:
                time.sleep(0.2)
        raise AcmeError(f"cannot create {self.CERTIFICATES} in the queue database")

    def lead(self) -> bool:
        """This process runs the ACME client for the names (it holds, or now takes, the lock)."""
        if self._leader is not None:
            try:
                self._leader.execute("SELECT 1")
                return True
            except Exception:  # the connection (and with it the lock) is gone
                self._close_leader()
        conn = self._connect()
        try:
            self._setup(conn)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,)).fetchone()
        except Exception:
            conn.close()
            raise
        if row is not None and row[0]:
            self._leader = conn
            return True
        conn.close()
        return False

    def fetch(self) -> tuple[bytes, bytes] | None:
        """(chain, key) published for the names, if any."""
        with self._connect() as conn:
            self._setup(conn)
            row = conn.execute(
                f"SELECT chain, key FROM {self.CERTIFICATES} WHERE names = %s", (self.names,)
            ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def publish(self, chain: bytes, key: bytes) -> None:
        with self._connect() as conn:
            self._setup(conn)
            conn.execute(
                f"INSERT INTO {self.CERTIFICATES} (names, chain, key) VALUES (%s, %s, %s) "
                "ON CONFLICT (names) DO UPDATE SET chain = EXCLUDED.chain, key = EXCLUDED.key, "
                "updated = now()",
                (self.names, chain, key),
            )

    def put_token(self, token: str, key_authorization: str) -> None:
        with self._connect() as conn:
            self._setup(conn)
            conn.execute(f"DELETE FROM {self.CHALLENGES} WHERE created < now() - interval '1 day'")
            conn.execute(
                f"INSERT INTO {self.CHALLENGES} (token, key_authorization) VALUES (%s, %s) "
                "ON CONFLICT (token) DO NOTHING",
                (token, key_authorization),
            )

    def lookup(self, token: str) -> str | None:
        with self._connect() as conn:  # (no table yet: an error, the responder's 404)
            row = conn.execute(
                f"SELECT key_authorization FROM {self.CHALLENGES} WHERE token = %s", (token,)
            ).fetchone()
        return None if row is None else str(row[0])

    def drop_tokens(self, tokens: list[str]) -> None:
        if tokens:
            with self._connect() as conn:
                conn.execute(f"DELETE FROM {self.CHALLENGES} WHERE token = ANY(%s)", (tokens,))

    def _close_leader(self) -> None:
        if self._leader is not None:
            with contextlib.suppress(Exception):
                self._leader.close()
        self._leader = None

    def close(self) -> None:
        self._close_leader()
