"""Get-Queue at scale (``QueueControl.queues`` / ``retry_queue``): one query of the few columns it
needs (``Store.queue_entries``) and one routing decision per recipient domain, with exactly the
answer the earlier computation gave (``message_view`` of every unfinished message, read whole),
on a mixed queue in both engines: SQLite and a real PostgreSQL server."""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relaygate import replies
from relaygate.config import parse_text
from relaygate.control import (
    MAX_LIST_LIMIT,
    QueueControl,
    _in_queue,
    _QueueTally,
    _recipient_queue,
    message_view,
)
from relaygate.delivery import routing
from relaygate.queue.model import (
    FINAL_STATUSES,
    Envelope,
    RecipientState,
    RecipientStatus,
    StoredMessage,
)
from relaygate.queue.pg_store import PostgresStore
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import Store

R, D, DONE, F = (
    RecipientStatus.READY,
    RecipientStatus.DEFERRED,
    RecipientStatus.DELIVERED,
    RecipientStatus.FAILED,
)

# Two connectors share a smart host (one queue, named after it, with the connector seen first);
# a small one for sized.test takes only messages up to 1000 bytes (larger ones go by DNS); a
# disabled one never takes anything; no connector for *.invalid... except the catch-all: those
# recipients are Unreachable only through their last attempt (ROUTING.NoNextHop).
CONFIG = """
[server]
name = "RELAYEQ"
fqdn = "relay.eq.test"
data_dir = "{data_dir}"

[[send_connectors]]
name = "Internet"
address_spaces = ["*"]
dns_routing_enabled = true

[[send_connectors]]
name = "Partners"
address_spaces = ["partner.test"]
dns_routing_enabled = false
smart_hosts = ["[10.0.0.5]"]

[[send_connectors]]
name = "Banks"
address_spaces = ["*.bank.test"]
dns_routing_enabled = false
smart_hosts = ["[10.0.0.5]"]

[[send_connectors]]
name = "Small"
address_spaces = ["sized.test"]
dns_routing_enabled = false
smart_hosts = ["small.relay.test"]
max_message_size = "1000B"

[[send_connectors]]
name = "Off"
address_spaces = ["off.test"]
dns_routing_enabled = false
smart_hosts = ["[10.0.0.9]"]
enabled = false
"""

DOMAINS = [
    "gmail.test",
    "Outlook.TEST",
    "partner.test",
    "eu.bank.test",
    "us.bank.test",
    "sized.test",
    "off.test",
    "nowhere.invalid",
]


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    s: Store
    if request.param == "sqlite":
        s = SqliteStore(tmp_path / "queue.db")
    else:
        s = PostgresStore(request.getfixturevalue("postgres_url"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def reference_queues(messages: list[StoredMessage], config: Any, now: float) -> dict[str, Any]:
    """Get-Queue as it was computed before: message_view of every unfinished message."""
    server = str(config.server.name)
    groups: dict[str, _QueueTally] = {}
    for msg in messages:
        view = message_view(msg, config, now=now)
        for state, r in zip(msg.recipients, view["Recipients"], strict=True):
            hop, delivery_type, connector = _recipient_queue(r)
            if state.status in FINAL_STATUSES or not hop:
                continue
            tally = groups.get(hop)
            if tally is None:
                tally = groups[hop] = _QueueTally(hop, delivery_type, connector)
            tally.add(msg.queue_id, view["Status"], state, now)
    queues = [groups[k].view(server, now) for k in sorted(groups, key=str.lower)]
    return {"server": server, "queues": queues, "truncated": False}


async def unfinished(store: Store) -> list[StoredMessage]:
    found: list[StoredMessage] = []
    for status in ("Ready", "Retry", "Suspended"):
        found += await store.list_messages(limit=MAX_LIST_LIMIT, status=status)
    return sorted(found, key=lambda m: m.queue_id)


async def fill(store: Store, count: int, now: float, seed: int = 11) -> None:
    """A mixed queue: Ready, Retry due and not due, Unreachable (wholly or one recipient),
    suspended, Active (a live lease) and an expired lease, partly delivered, Delivered, Failed,
    big and small messages, a recipient without a domain."""
    rnd = random.Random(seed)
    no_hop = replies.NO_NEXT_HOP.line()
    for i in range(count):
        rcpts = list(
            dict.fromkeys(
                f"u{i}.{k}@{rnd.choice(DOMAINS)}" for k in range(rnd.choice((1, 1, 2, 3, 4)))
            )
        )
        if i % 37 == 0:
            rcpts.append("postmaster")
        size = rnd.choice((200, 900, 1000, 1001, 50_000))
        kind = rnd.choice(KINDS)
        lease = None
        if kind == "active":
            lease = (f"node{i % 2}", now + 300)
        elif kind == "expired":
            lease = ("node0", now - 5)
        qid = await store.submit(Envelope(f"s{i}@corp.test", rcpts), b"x" * size, lease=lease)
        results: list[RecipientState] = []
        for k, address in enumerate(rcpts):
            at = now - rnd.randrange(60, 4000)
            later = now + rnd.randrange(-100, 3600)
            error = f"451 4.7.0 busy {rnd.randrange(5)}"
            if kind in ("retry", "active", "expired"):
                results.append(RecipientState(address, D, 1, error, at, now + 600 + k))
            elif kind == "due":
                results.append(RecipientState(address, D, 2, error, at, now - 10))
            elif kind in ("unreachable", "suspended-unreachable"):
                results.append(RecipientState(address, D, 1, no_hop, at, later))
            elif kind == "half":
                err = no_hop if k % 2 == 0 else error
                results.append(RecipientState(address, D, 1, err, at, later))
            elif kind == "partial" and k == 0:
                results.append(RecipientState(address, DONE, 1, "250 2.0.0 OK", at))
            elif kind == "partial":
                results.append(RecipientState(address, D, 3, error, at, later))
            elif kind == "delivered":
                results.append(RecipientState(address, DONE, 1, "250 2.0.0 OK", at))
            elif kind == "failed":
                results.append(RecipientState(address, F, 1, "550 5.1.1 unknown", at))
        if results:
            await store.record_results(qid, "filler", results)
        if kind.startswith("suspended"):
            await store.set_flags(qid, suspended=True)


KINDS = (
    *("ready", "retry", "due", "unreachable", "half", "suspended", "active", "expired"),
    *("partial", "delivered", "failed", "suspended-unreachable"),
)


class CountingStore:
    """The store, counting the calls Get-Queue makes to it."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if callable(attr):
            self.calls.append(name)
        return attr


async def test_get_queue_gives_what_message_view_gives_on_a_mixed_queue(
    store: Store, tmp_path: Path
) -> None:
    config = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")
    now = time.time()
    await fill(store, 240, now)
    messages = await unfinished(store)
    assert len(messages) > 120
    for at in (now, now + 400, now + 4000):  # leases expire, retries fall due
        control = QueueControl(store, lambda: config, clock=lambda at=at: at)
        fast = await control.queues()
        assert fast == reference_queues(messages, config, at)
    names = {q["NextHopDomain"] for q in fast["queues"]}
    # the mix reaches every kind of queue (or the comparison would prove little)
    assert names == {
        "[10.0.0.5]",
        "gmail.test",
        "outlook.test",
        "nowhere.invalid",
        "off.test",
        "sized.test",
        "small.relay.test",
        "Unreachable",
        "postmaster",  # a recipient without a domain is routed as a bare domain, as before
    }
    shared = next(q for q in fast["queues"] if q["NextHopDomain"] == "[10.0.0.5]")
    assert shared["SendConnector"] in ("Partners", "Banks")
    statuses = {q["Status"] for q in (await QueueControl(store, lambda: config).queues())["queues"]}
    assert statuses >= {"Active", "Ready"}

    # Retry-Queue picks the same messages as message_view's queue test did
    control = QueueControl(store, lambda: config, clock=lambda: now)
    for name in sorted(names):
        views = [message_view(m, config, now=now) for m in messages]
        inside = [v for v in views if _in_queue(v, name)]
        expected_suspended = [
            v["QueueId"] for v in inside if v["Suspended"] or v["Status"] == "Suspended"
        ]
        expected_retried = [v["QueueId"] for v in inside if v["QueueId"] not in expected_suspended]
        done = await control.retry_queue(name)
        assert done["Retried"] == [f"RELAYEQ\\{q}" for q in expected_retried], name
        assert done["SuspendedCount"] == len(expected_suspended), name


async def test_get_queue_reads_one_query_and_routes_once_per_domain(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, Get-Queue read every unfinished message whole (list_messages, three times) and
    routed every recipient of every message (explain_route once per recipient)."""
    config = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")
    now = time.time()
    await fill(store, 150, now, seed=5)
    recipients = sum(len(m.recipients) for m in await unfinished(store))
    routed: list[str] = []
    real = routing.explain_route

    def counting(connectors: Any, address: str, **kw: Any) -> Any:
        routed.append(address)
        return real(connectors, address, **kw)

    monkeypatch.setattr(routing, "explain_route", counting)
    counting_store = CountingStore(store)
    control = QueueControl(counting_store, lambda: config)  # type: ignore[arg-type]
    body = await control.queues()
    assert sum(q["RecipientCount"] for q in body["queues"]) > 150
    assert counting_store.calls == ["queue_entries"]
    # one decision per (domain, which size limits the message exceeds): a handful, not hundreds
    # (the domains and "postmaster", each for a message up to 1000 bytes and a larger one)
    assert recipients > 250 and 0 < len(routed) <= 2 * (len(DOMAINS) + 1)
    counting_store.calls.clear()
    await control.retry_queue("gmail.test")
    assert "list_messages" not in counting_store.calls and "get" not in counting_store.calls
