"""The delivery client's sessions (`_Session`: an open, authenticated SMTP connection to one hop)
and the `ConnectionPool` that keeps idle ones for the next message to the same hop through the
same connector (at most ``smtp_max_messages_per_connection`` messages each, Exchange's
SmtpMaxMessagesPerConnection).

Kept apart from how a session is opened (connection.py) and used (transaction.py): the pool only
keeps, hands out, reaps and closes them.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiosmtplib

from relaygate.delivery.client.tls import _server_name
from relaygate.delivery.nexthop import NextHop


@dataclass(eq=False)
class _Session:
    smtp: aiosmtplib.SMTP
    key: tuple[Any, ...]
    tls: bool
    messages: int = 0
    #: The connector's smtp_max_messages_per_connection (Exchange's SmtpMaxMessagesPerConnection).
    max_messages: int = 20
    idle_since: float = 0.0
    #: No transaction in progress on the server (the last one ended with its final reply, or
    #: RSET): a reused session can start with MAIL, without an RSET round trip.
    clean: bool = True

    @property
    def alive(self) -> bool:
        return bool(self.smtp.is_connected)

    def close(self) -> None:
        try:
            self.smtp.close()
        except Exception:  # pragma: no cover - closing must never raise
            pass

    async def quit(self, timeout: float | None = None) -> None:
        """QUIT, waiting at most 2 s and never longer than the connector's timeout (the
        session's own: a next hop that never answers QUIT must not hold a pool's close)."""
        if timeout is None:
            own = self.smtp.timeout
            timeout = 2.0 if own is None else min(float(own), 2.0)
        try:
            if self.smtp.is_connected:
                await self.smtp.quit(timeout=timeout)
        except Exception:  # QUIT is a courtesy; the session is being dropped either way
            pass
        finally:
            self.close()


class ConnectionPool:
    """Open, authenticated sessions kept for `idle_seconds` so the next message to the same hop
    through the same connector reuses them (RSET first only when the last transaction did not end cleanly). At most `max_size` idle sessions
    and, per session, its connector's smtp_max_messages_per_connection messages (Exchange's
    SmtpMaxMessagesPerConnection, 20 by default); `max_messages_per_connection` lowers that cap
    for every connector (None: the connectors' own)."""

    def __init__(
        self,
        *,
        idle_seconds: float = 5.0,
        max_size: int = 16,
        max_messages_per_connection: int | None = None,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_size = max_size
        self.max_messages_per_connection = max_messages_per_connection
        self._idle: dict[tuple[Any, ...], list[_Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False

    @staticmethod
    def key_for(hop: NextHop, connector: Any, helo_name: str) -> tuple[Any, ...]:
        return (
            hop.ip,
            hop.port,
            _server_name(connector, hop),
            getattr(connector, "name", ""),
            getattr(connector, "auth_username", ""),
            helo_name.lower(),
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _discard(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take(self, key: tuple[Any, ...]) -> _Session | None:
        """An idle session for `key`, or None. The caller must RSET it first unless it is `clean`."""
        sessions = self._idle.get(key)
        now = time.monotonic()
        while sessions:
            s = sessions.pop()
            if not sessions:
                self._idle.pop(key, None)
            if s.alive and now - s.idle_since <= self.idle_seconds:
                return s
            self._discard(s)
        return None

    def put(self, session: _Session) -> bool:
        """Keep `session` for reuse; False (and the session is closed) when it cannot be kept."""
        if (
            self._closed
            or not session.alive
            or session.messages >= session.max_messages
            or (
                self.max_messages_per_connection is not None
                and session.messages >= self.max_messages_per_connection
            )
            or self.idle_seconds <= 0
        ):
            self._discard(session)
            return False
        if len(self) >= self.max_size:
            oldest_key, oldest = min(
                ((k, s) for k, v in self._idle.items() for s in v), key=lambda ks: ks[1].idle_since
            )
            self._idle[oldest_key].remove(oldest)
            if not self._idle[oldest_key]:
                del self._idle[oldest_key]
            self._discard(oldest)
        session.idle_since = time.monotonic()
        self._idle.setdefault(session.key, []).append(session)
        self._schedule_reap()
        return True

    def _schedule_reap(self) -> None:
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_seconds + 0.05, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for s in self._idle[key]:
                if s.alive and now - s.idle_since <= self.idle_seconds:
                    keep.append(s)
                else:
                    self._discard(s)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._schedule_reap()

    async def aclose(self) -> None:
        """QUIT every idle session."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        sessions = [s for v in self._idle.values() for s in v]
        self._idle.clear()
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
