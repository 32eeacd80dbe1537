"""Tracking events written by a running relay's queue operations, read back as
`relaygate trace` reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from relaygate.logs.tracking import search
from tests.queue_manager.helpers import ScriptedHandler, send, start_relay, start_sink, wait_for
from tests.queue_manager.test_admin_and_cli import MESSAGE, SENDER, admin_url

ADMIN_DELETED = "550 4.3.2 QUEUE.Admin; message deleted by administrative action"


async def test_a_status_holding_a_semicolon_is_read_back_whole(tmp_path: Path) -> None:
    """The administrator removes a message waiting for a retry: a DROP event (source ADMIN) for
    its two recipients. Their status, "550 4.3.2 QUEUE.Admin; message deleted by administrative
    action" (as Exchange's QUEUE.Expired, ROUTING.NoNextHop... replies, it holds "; "), was read
    back split at its ";" as if it were two recipients' statuses: four statuses for two
    recipients, the second recipient's being " message deleted by administrative action"."""
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 Mailbox busy")
    sink = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": sink.port}, queue={"transient_failure_retry_interval": "00:01:00"}
    )
    try:
        await send(relay, SENDER, ["bob@example.com", "carol@example.com"], MESSAGE)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as http:

            async def waiting_for_a_retry() -> list[dict[str, Any]] | None:
                items = (await http.get("/api/queue")).json()["messages"]
                return items if items and items[0]["Status"] == "Retry" else None

            (item,) = await wait_for(waiting_for_a_retry)
            qid = item["Identity"].rsplit("\\", 1)[-1]
            removed = await http.delete(f"/api/queue/{qid}")
            assert removed.status_code == 200, removed.text
        assert relay.tracking is not None
        relay.tracking.flush()
        (drop,) = search(relay.tracking.path, event_id="DROP")
        assert drop["source"] == "ADMIN"
        assert drop["recipient-address"] == ["bob@example.com", "carol@example.com"]
        assert drop["recipient-status"] == [ADMIN_DELETED, ADMIN_DELETED], drop
    finally:
        await relay.stop()
        await sink.close()
