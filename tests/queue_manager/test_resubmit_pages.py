"""The whole Unreachable queue is resubmitted, a page at a time: by a reload that adds a route
(``QueueManager.resubmit_unreachable``) and by Retry-Queue (``POST /api/queues/Unreachable/retry``).

Both read at most 100,000 messages once, so in a bigger queue the rest waited for their next
retry (or expired). The page size is made small here (2) instead of queueing 100,000 messages:
more messages than a page wait in Unreachable, and every one of them reaches the sink. A spy on the
store checks that no read returned more than a page (the queue is never loaded whole). Run on both
stores (SQLite, and a real PostgreSQL server)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from relaygate.app import Relay
from relaygate.control import QueueControl
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    send_connector_text,
    start_relay,
    start_sink,
    wait_for,
)
from tests.queue_manager.test_admin_and_cli import MESSAGE, admin_url

#: more than three pages of PAGE
COUNT = 7
PAGE = 2
QUEUE = {"transient_failure_retry_interval": "00:10:00", "message_retry_interval": "00:10:00"}


@pytest.fixture(params=["sqlite", "postgresql"])
def store_queue(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [queue] keys of the relay: its own SQLite store, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return dict(QUEUE)
    url = request.getfixturevalue("postgres_url")
    return {**QUEUE, "store": "postgresql", "database_url": url}


def spy(obj: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wraps the store method ``name``: the number of messages of each answer, in order."""
    sizes: list[int] = []
    real: Callable[..., Awaitable[list[Any]]] = getattr(obj, name)

    async def wrapper(*args: Any, **kwargs: Any) -> list[Any]:
        found = await real(*args, **kwargs)
        sizes.append(len(found))
        return found

    monkeypatch.setattr(obj, name, wrapper)
    return sizes


async def _unreachable_node(
    tmp_path: Path, queue: dict[str, Any], sink: Sink
) -> tuple[Relay, Path, list[str]]:
    """A relay with a route for example.com only, and COUNT messages to x<i>@nowhere.test
    waiting in the Unreachable queue (their first attempt found no route)."""
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data", {"example.com": sink.port}, queue=queue, config_file=config
    )
    for i in range(COUNT):
        code, _text = await send(relay, "app@corp.test", [f"x{i}@nowhere.test"], MESSAGE)
        assert code == 250
    control = QueueControl.for_relay(relay)

    async def all_unreachable() -> list[dict[str, Any]] | None:
        found = await control.list_messages(status="Unreachable")
        return found if len(found) == COUNT else None

    views = await wait_for(all_unreachable, timeout=20)
    assert not sink.handler.messages
    return relay, config, [v["QueueId"] for v in views]


def _delivered(sink: Sink) -> set[str]:
    return {rcpt for m in sink.handler.messages for rcpt in m["rcpt_tos"]}


async def test_a_reload_that_adds_a_route_resubmits_every_unreachable_message(
    tmp_path: Path, store_queue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = await start_sink(ScriptedHandler())
    relay, config, _ids = await _unreachable_node(tmp_path, store_queue, sink)
    try:
        assert relay.manager is not None
        relay.manager.resubmit_page_size = PAGE
        pages = spy(relay.store, "list_messages", monkeypatch)
        config.write_text(
            config.read_text(encoding="utf-8")
            + send_connector_text("To nowhere", "nowhere.test", sink.port),
            encoding="utf-8",
        )
        await relay.reload()
        wanted = {f"x{i}@nowhere.test" for i in range(COUNT)}
        # at once (their next retry is ten minutes away), every one of them
        await wait_for(lambda: _delivered(sink) >= wanted, timeout=20)
        assert _delivered(sink) == wanted
        # read in pages of PAGE, never the queue at once: 2, 2, 2, 1
        assert pages and max(pages) <= PAGE, pages
        assert sum(pages) >= COUNT, pages
    finally:
        await relay.stop()
        await sink.close()


async def test_retry_queue_resubmits_every_unreachable_message(
    tmp_path: Path, store_queue: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retry-Queue -Resubmit on the Unreachable queue after a route was added without a
    reload (the config swapped in place, as tests/queue_manager/test_queue_pages_and_queues.py
    does): every message, past the first page too."""
    from relaygate.config import parse_text

    sink = await start_sink(ScriptedHandler())
    relay, config, ids = await _unreachable_node(tmp_path, store_queue, sink)
    try:
        assert relay.manager is not None and relay.admin is not None
        text = config.read_text(encoding="utf-8")
        text += send_connector_text("To nowhere", "nowhere.test", sink.port)
        new = parse_text(text, str(config))
        relay.config = relay.manager.config = new
        relay.admin.app.state.control.queue_page_size = PAGE
        pages = spy(relay.store, "queue_entries", monkeypatch)
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=30) as client:
            r = await client.post("/api/queues/Unreachable/retry")
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["RetriedCount"] == COUNT
        assert body["Retried"] == [f"RELAYTEST\\{q}" for q in ids]
        wanted = {f"x{i}@nowhere.test" for i in range(COUNT)}
        await wait_for(lambda: _delivered(sink) >= wanted, timeout=20)
        assert _delivered(sink) == wanted
        assert pages and max(pages) <= PAGE, pages
    finally:
        await relay.stop()
        await sink.close()
