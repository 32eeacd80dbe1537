"""What the receive service counts for /metrics: sessions, messages and bytes received, refusals.

Plain dict increments on the event loop (a few tens of nanoseconds each): the session counts a
refusal where it writes every reply (`Session.reply`), a received message where it answers 250.
Keys are receive connector names (and, for refusals, the reply's code and enhanced status, a
set bounded by the reply catalogue in `relaygate.replies`)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SmtpCounters"]


@dataclass
class SmtpCounters:
    sessions: Counter[str] = field(default_factory=Counter)
    #: 421s at connect from max_inbound_connection(_per_source)
    connections_refused: Counter[str] = field(default_factory=Counter)
    messages: Counter[str] = field(default_factory=Counter)
    bytes: Counter[str] = field(default_factory=Counter)
    #: (connector, code, enhanced status or "") → replies of 400 and above
    refusals: Counter[tuple[str, int, str]] = field(default_factory=Counter)

    def snapshot(self) -> dict[str, Any]:
        """JSON-ready, for a sibling worker to sum (`relaygate.worker_stats`)."""
        return {
            "sessions": dict(self.sessions),
            "connections_refused": dict(self.connections_refused),
            "messages": dict(self.messages),
            "bytes": dict(self.bytes),
            "refusals": [[c, code, status, n] for (c, code, status), n in self.refusals.items()],
        }

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> SmtpCounters:
        counters = cls()
        for name in ("sessions", "connections_refused", "messages", "bytes"):
            getattr(counters, name).update({str(k): int(v) for k, v in data.get(name, {}).items()})
        for c, code, status, n in data.get("refusals", []):
            counters.refusals[(str(c), int(code), str(status))] += int(n)
        return counters

    def add(self, other: SmtpCounters) -> None:
        self.sessions.update(other.sessions)
        self.connections_refused.update(other.connections_refused)
        self.messages.update(other.messages)
        self.bytes.update(other.bytes)
        self.refusals.update(other.refusals)
