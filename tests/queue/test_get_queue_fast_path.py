"""Get-Queue at scale (``QueueControl.queues`` / ``retry_queue``): one query of the few columns it
needs (``Store.queue_entries``) and one routing decision per recipient domain, with exactly the
answer the earlier computation gave (``message_view`` of every unfinished message, read whole),
on a mixed queue in both engines: SQLite and a real PostgreSQL server."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
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
from relaygate.control import queues as queues_module
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


async def test_get_queue_counts_every_unfinished_message_a_page_at_a_time(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Get-Queue counted the first MAX_LIST_LIMIT (100,000) unfinished messages only, and said
    ``truncated``: in an outage (the smart host down for a day) the counts were wrong just when
    they mattered. The limit is made small here so that the queue is past it (the real scale:
    test_get_queue_counts_300000_messages_without_stalling_the_loop, slow); every message must
    be counted, read a page at a time."""
    monkeypatch.setattr(queues_module, "MAX_LIST_LIMIT", 50, raising=False)
    config = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")
    now = time.time()
    await fill(store, 240, now)
    messages = await unfinished(store)
    assert len(messages) > 120
    counting_store = CountingStore(store)
    control = QueueControl(counting_store, lambda: config, clock=lambda: now)  # type: ignore[arg-type]
    control.queue_page_size = 7
    body = await control.queues()
    assert body == reference_queues(messages, config, now)  # every count, truncated false
    assert sum(q["MessageCount"] for q in body["queues"]) >= len(messages)
    # a page at a time: never more than a page of messages held, the loop served between them
    assert counting_store.calls == ["queue_entries"] * (len(messages) // 7 + 1)


def clone_queue(connection: Any, copies: int, placeholder: str) -> None:
    """``copies`` more of every message in the queue (its rows and its recipients' rows, the
    bytes left out: Get-Queue does not read them), each copy's queue ids starting with ``F`` and
    the copy's number (the stores' own ids start lower). Through the database connection, a few
    statements in one transaction: submitting 300,000 messages one by one takes minutes on
    PostgreSQL."""
    connection.execute("CREATE TEMP TABLE copy_prefixes (prefix text)")
    prefixes = [(f"F{k:03X}",) for k in range(1, copies + 1)]
    connection.cursor().executemany(f"INSERT INTO copy_prefixes VALUES ({placeholder})", prefixes)
    for table in ("messages", "recipients"):
        connection.execute(
            f"CREATE TEMP TABLE copies AS SELECT * FROM {table} CROSS JOIN copy_prefixes"
        )
        connection.execute("UPDATE copies SET queue_id = prefix || substr(queue_id, 5)")
        connection.execute("ALTER TABLE copies DROP COLUMN prefix")
        connection.execute(f"INSERT INTO {table} SELECT * FROM copies")
        connection.execute("DROP TABLE copies")
    # Fresh statistics, as (auto)vacuum keeps them on a queue that grew over hours: with those
    # of the queue before the copies, PostgreSQL plans a page's query as a scan of the whole
    # status index (200 ms a page over 300,000 messages).
    connection.execute("ANALYZE")
    connection.commit()


async def longest_stall(work: Any) -> tuple[Any, float]:
    """``await work`` with a 5 ms ticker on the same loop (the loop that serves SMTP); the
    result and the longest the ticker waited between two ticks."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.005)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    try:
        result = await work
    finally:
        done.set()
        await ticker
    return result, max(gaps)


@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_get_queue_counts_300000_messages_without_stalling_the_loop(
    store: Store, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Over 300,000 unfinished messages (an outage's queue): Get-Queue counted the first
    100,000 (truncated) and, on PostgreSQL, read and parsed them in one go on the loop that
    serves SMTP. Every message is counted now, and the loop is never held for long."""
    config = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")
    now = time.time()
    await fill(store, 240, now)
    templates = await unfinished(store)
    copies = 300_000 // len(templates) + 1
    if isinstance(store, SqliteStore):
        with sqlite3.connect(tmp_path / "queue.db") as sqlite:
            clone_queue(sqlite, copies, "?")
    else:
        with psycopg.connect(request.getfixturevalue("postgres_url")) as pg:
            clone_queue(pg, copies, "%s")
    expected = reference_queues(templates, config, now)
    for q in expected["queues"]:
        q["MessageCount"] *= copies + 1
        q["RecipientCount"] *= copies + 1
    assert sum(q["MessageCount"] for q in expected["queues"]) > 300_000
    control = QueueControl(store, lambda: config, clock=lambda: now)
    body, stall = await longest_stall(control.queues())
    print(
        f"Get-Queue over {len(templates) * (copies + 1):,} unfinished messages: loop stall {stall:.3f} s"
    )
    assert stall < 0.25, f"the loop stood still for {stall:.3f} s"
    assert body == expected


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "queue.db")
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_get_queue_callers_at_the_same_time_share_one_count(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """Counting a big queue takes seconds of the worker that serves SMTP: three pages of the
    admin centre loading at once counted it three times over."""
    config = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")
    now = time.time()
    await fill(sqlite_store, 60, now)
    messages = await unfinished(sqlite_store)
    counting_store = CountingStore(sqlite_store)
    control = QueueControl(counting_store, lambda: config, clock=lambda: now)  # type: ignore[arg-type]
    control.queue_page_size = 7
    pages = len(messages) // 7 + 1
    bodies = await asyncio.gather(*(control.queues() for _ in range(3)))
    assert bodies[0] == bodies[1] == bodies[2] == reference_queues(messages, config, now)
    assert counting_store.calls == ["queue_entries"] * pages
    assert bodies[0]["queues"][0] is not bodies[1]["queues"][0]  # each caller's own to change
    # counted in milliseconds: the next call counts afresh
    await control.queues()
    assert counting_store.calls == ["queue_entries"] * (2 * pages)


async def test_get_queue_gives_a_slow_count_again_for_as_long_as_it_took(
    sqlite_store: SqliteStore, tmp_path: Path
) -> None:
    """A count that took seconds is given again for as long as it took (at most
    queues_reuse_limit), not after an operation that changed messages nor after a reload: the
    /queue page reloaded, or a dashboard polling GET /api/queues, kept the worker counting."""
    configs = [parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")]
    now = time.time()
    await fill(sqlite_store, 60, now)
    ticks = [1000.0]  # the control's monotonic clock
    page_takes = [2.0]

    class SlowStore(CountingStore):
        async def queue_entries(self, **kw: Any) -> Any:
            self.calls.append("queue_entries")
            ticks[0] += page_takes[0]
            return await self.store.queue_entries(**kw)

    slow = SlowStore(sqlite_store)
    control = QueueControl(slow, lambda: configs[0], clock=lambda: now)  # type: ignore[arg-type]
    control._monotonic = lambda: ticks[0]  # type: ignore[method-assign]

    async def counted() -> bool:
        """Whether Get-Queue read the store (counted) rather than gave its last count; and its
        answer is right either way."""
        before = len(slow.calls)
        body = await control.queues()
        assert body == reference_queues(await unfinished(sqlite_store), configs[0], now)
        return len(slow.calls) > before

    assert await counted()  # one page: 2 s
    ticks[0] += 1.9
    assert not await counted()
    ticks[0] += 0.2
    assert await counted()
    first = (await unfinished(sqlite_store))[0].queue_id
    await control.suspend(first)  # an operation here: counted again at once
    assert await counted()
    await control.resume(first)
    assert await counted()
    assert not await counted()
    await control.retry_queue("gmail.test")
    assert await counted()
    configs[0] = parse_text(CONFIG.format(data_dir=tmp_path / "data"), "<eq>")  # a reload
    assert await counted()
    page_takes[0] = 60.0  # a count of a minute is given again for queues_reuse_limit only
    ticks[0] += 2.1
    assert await counted()
    ticks[0] += control.queues_reuse_limit - 0.1
    assert not await counted()
    ticks[0] += 0.2
    assert await counted()
