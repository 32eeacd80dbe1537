"""A cluster node whose clock is off (PostgreSQL queue, DESIGN.md decision 3): leases are
compared with each node's own clock, so a node ahead of the others by more than a lease has left
took their live leases and delivered their messages a second time. Such a node now leases
nothing (it keeps receiving: its new messages are stored unleased, for the other nodes), says so
once, and delivers again when its clock agrees with the database server's."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import pytest

from relaygate.queue.model import Envelope
from relaygate.queue.pg_store import PostgresStore
from tests.queue_manager.helpers import Handler, send, start_relay, start_sink, wait_for
from tests.queue_manager.test_admin_and_cli import MESSAGE

#: the node's clock ahead of the database server's and the other node's: more than a third of
#: the 5-minute lease below, and more than the other node's lease has left
SKEW = 400.0


async def test_a_node_ahead_of_the_cluster_takes_no_live_lease_and_says_so_once(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    sink = await start_sink(Handler())
    other = PostgresStore(postgres_url)
    await other.open()
    queue = {"store": "postgresql", "database_url": postgres_url, "lease_duration": "00:05:00"}
    relay = await start_relay(tmp_path / "data", {"example.com": sink.port}, queue=queue)
    try:
        manager = relay.manager
        assert manager is not None
        # another node is delivering this message: its lease has 5 minutes to run
        env = Envelope(sender="app@corp.test", recipients=["bob@example.com"])
        theirs = await other.submit(env, MESSAGE)
        await other.lease_due("EDGE-OTHER", time.time(), 300, 10)

        def ahead() -> float:
            return time.time() + SKEW

        manager.clock = ahead
        store: Any = relay.store
        store._clock = ahead  # the node's wall clock, which both read
        scans: list[float] = []
        real_lease_due = store.lease_due

        async def counting_lease_due(*args: Any, **kwargs: Any) -> Any:
            scans.append(time.monotonic())
            return await real_lease_due(*args, **kwargs)

        store.lease_due = counting_lease_due
        caplog.set_level(logging.INFO)
        manager.wake()
        await wait_for(lambda: len(scans) >= 5, timeout=20)
        assert not sink.handler.messages, "the other node's live lease was taken"
        got = await other.get(theirs)
        assert got is not None and got.lease_owner == "EDGE-OTHER"
        refusals = [r for r in caplog.records if "s ahead of the queue database" in r.getMessage()]
        assert len(refusals) == 1, [r.getMessage() for r in caplog.records]
        assert manager.lease_for_new() is None

        # still receiving: stored without a lease, so the other nodes can deliver it
        code, _ = await send(relay, "app@corp.test", ["carol@example.com"], MESSAGE)
        assert code == 250
        mine = [m for m in await other.list_messages() if m.queue_id != theirs]
        assert len(mine) == 1 and mine[0].lease_owner is None
        assert not sink.handler.messages

        # the clock put right: the node delivers its message again (the other's lease is live)
        manager.clock = store._clock = time.time
        await wait_for(lambda: len(sink.handler.messages) == 1, timeout=20)
        assert any("clock agrees with the queue" in r.getMessage() for r in caplog.records)
    finally:
        await relay.stop()
        await other.close()
        await sink.close()


class HoldingHandler(Handler):
    """A next hop that keeps each session waiting at MAIL FROM until ``release`` is set: the
    delivery stays in flight, its message leased."""

    def __init__(self) -> None:
        super().__init__()
        self.held = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_MAIL(self, server, session, envelope, address, mail_options):  # type: ignore[no-untyped-def]
        self.held.set()
        await self.release.wait()
        return await super().handle_MAIL(server, session, envelope, address, mail_options)


async def test_a_node_that_leases_nothing_for_its_clock_still_renews_its_deliveries_in_flight(
    tmp_path: Path, postgres_url: str
) -> None:
    """The refused scan no longer skips the renewal of the leases of the deliveries already in
    flight (one loop step did both): they ran out and another node would deliver those messages
    as well. A node ahead renews them to its own later time, which keeps them longer."""
    handler = HoldingHandler()
    sink = await start_sink(handler)
    queue = {"store": "postgresql", "database_url": postgres_url, "lease_duration": "00:00:03"}
    relay = await start_relay(tmp_path / "data", {"example.com": sink.port}, queue=queue)
    other = PostgresStore(postgres_url)
    await other.open()
    try:
        manager = relay.manager
        assert manager is not None
        code, _ = await send(relay, "app@corp.test", ["bob@example.com"], MESSAGE)
        assert code == 250
        await asyncio.wait_for(handler.held.wait(), 20)

        def ahead() -> float:
            return time.time() + 2.0  # more than a third of the 3 s lease

        manager.clock = ahead
        store: Any = relay.store
        store._clock = ahead
        manager.wake()

        async def renewed_by_the_clock_ahead() -> bool:
            (msg,) = await other.list_messages()
            # an unskewed renewal writes at most now + 3: only the node ahead writes past it
            return msg.lease_until is not None and msg.lease_until > time.time() + 3.5

        await wait_for(renewed_by_the_clock_ahead, timeout=10)
        # The renewal can come in the loop step whose scan ran before the clock moved: the
        # refused scan is the next step's.
        await wait_for(lambda: manager.clock_skew is not None, timeout=10)
        assert manager.lease_for_new() is None  # the scans are refused meanwhile
        handler.release.set()
        await wait_for(lambda: len(handler.messages) == 1, timeout=20)
    finally:
        handler.release.set()
        await relay.stop()
        await other.close()
        await sink.close()


async def test_a_node_refused_for_its_clock_says_so_on_healthz_and_metrics_until_it_agrees(
    tmp_path: Path, postgres_url: str
) -> None:
    """The refusal was only logged, once: /healthz said ok and /metrics nothing while the node
    delivered nothing. Now /healthz says degraded, /api/health the reason, and the
    relaygate_queue_clock_skew gauge is 1 until the clocks agree again (then ok and 0)."""
    import httpx

    from tests.queue_manager.test_admin_and_cli import admin_url

    queue = {"store": "postgresql", "database_url": postgres_url, "lease_duration": "00:05:00"}
    relay = await start_relay(tmp_path / "data", {"example.com": 9}, queue=queue)
    try:
        manager = relay.manager
        assert manager is not None
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def status() -> str:
                return str((await client.get("/healthz")).json()["status"])

            async def gauge() -> str:
                text = (await client.get("/metrics")).text
                lines = [ln for ln in text.splitlines() if ln.startswith("relaygate_queue_clock_")]
                return "\n".join(lines)

            assert await status() == "ok"
            assert await gauge() == "relaygate_queue_clock_skew 0.0"

            def ahead() -> float:
                return time.time() + SKEW

            store: Any = relay.store
            manager.clock = store._clock = ahead
            manager.wake()

            async def degraded() -> bool:
                return await status() == "degraded"

            await wait_for(degraded, timeout=20)
            health = await client.get("/api/health")
            assert health.status_code == 200  # still receiving: its messages go to the others
            reason = health.json()["queue_manager"]["clock_skew"]
            assert "s ahead of the queue database" in reason, health.json()
            assert await gauge() == "relaygate_queue_clock_skew 1.0"
            dashboard = (await client.get("/")).text  # the admin centre's Health card says why
            assert 'id="clock-skew"' in dashboard and "s ahead of the queue database" in dashboard

            manager.clock = store._clock = time.time
            manager.wake()

            async def ok() -> bool:
                return await status() == "ok"

            await wait_for(ok, timeout=20)
            assert (await client.get("/api/health")).json()["queue_manager"]["clock_skew"] is None
            assert await gauge() == "relaygate_queue_clock_skew 0.0"
            assert 'id="clock-skew"' not in (await client.get("/")).text
    finally:
        await relay.stop()
