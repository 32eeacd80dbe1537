"""Connection and rate accounting per connector and per source (exchange-semantics.md §1.4, §5.4)."""

from __future__ import annotations

import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from relaygate import replies
from relaygate.config.model import ReceiveConnector
from relaygate.replies import Reply

__all__ = ["ConnectionLimits", "DataMemory", "RateLimiter", "default_data_memory"]


@dataclass
class ConnectionLimits:
    """Counts open sessions per connector and per (connector, source IP)."""

    per_connector: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_source: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def admit(self, connector: ReceiveConnector, source: str) -> Reply | None:
        """Count a new session in, or return the 421 to send. Call `release` when it ends."""
        name = connector.name
        active = self.per_connector[name]
        if (
            connector.max_inbound_connection is not None
            and active >= connector.max_inbound_connection
        ):
            return replies.SERVER_CONNECTIONS_EXCEEDED
        from_source = self.per_source[(name, source)]
        per_source = connector.max_inbound_connection_per_source
        if per_source is not None and from_source >= per_source:
            return replies.SOURCE_CONNECTIONS_EXCEEDED
        if connector.max_inbound_connection is not None:
            # Percentage of the connections still available on the connector (at least one).
            available = connector.max_inbound_connection - active
            share = max(
                1, available * connector.max_inbound_connection_percentage_per_source // 100
            )
            if from_source >= share:
                return replies.SOURCE_CONNECTIONS_EXCEEDED
        self.per_connector[name] = active + 1
        self.per_source[(name, source)] = from_source + 1
        return None

    def release(self, connector: ReceiveConnector, source: str) -> None:
        name = connector.name
        self.per_connector[name] -= 1
        key = (name, source)
        self.per_source[key] -= 1
        if self.per_source[key] <= 0:
            del self.per_source[key]

    def total(self) -> int:
        return sum(self.per_connector.values())


class DataMemory:
    """The message bytes this process holds for messages in transit, against a budget.

    Each session's DATA is bounded by its connector's max_message_size (36 MB by default), but
    thousands of sessions may be in DATA at once: together they could take more memory than the
    machine has, and then every message in flight is lost to the OOM killer. Each session takes
    what it reads from here; when the budget is spent the message is read to its end without
    keeping it and refused with 452 4.3.1 (Exchange's reply under memory back pressure), so the
    client retries later.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


def default_data_memory(workers: int) -> int:
    """A quarter of the machine's memory, divided among the worker processes (at least 64 MB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * 1024**3
    return max(64 * 1024**2, total // 4 // max(1, workers))


class RateLimiter:
    """MessageRateLimit: messages per minute per source (a sliding 60-second window)."""

    WINDOW = 60.0

    def __init__(self) -> None:
        self._events: dict[tuple[str, str], deque[float]] = defaultdict(deque)

    def allowed(self, connector: ReceiveConnector, source: str, now: float | None = None) -> bool:
        limit = connector.message_rate_limit
        if limit is None or connector.message_rate_source == "None":
            return True
        now = time.monotonic() if now is None else now
        events = self._events[(connector.name, source)]
        while events and events[0] <= now - self.WINDOW:
            events.popleft()
        return len(events) < limit

    def record(self, connector: ReceiveConnector, source: str, now: float | None = None) -> None:
        if connector.message_rate_limit is None:
            return
        self._events[(connector.name, source)].append(time.monotonic() if now is None else now)
