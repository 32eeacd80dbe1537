"""The connector JSON routes (``/api/connectors/{receive,send}/{name}``) on the in-process
application through httpx's ASGI transport, without a listener or a browser (an asyncio test
cannot share a module with Playwright's sync API)."""

from __future__ import annotations

from pathlib import Path

import httpx

from relaygate.admin.api import create_app
from relaygate.admin.web import connector_url
from tests.queue_manager.helpers import free_port, start_relay


async def test_connector_api_on_the_in_process_app(tmp_path: Path) -> None:
    """The JSON routes through httpx's ASGI transport (no listener): bearer token, the API's
    404 error, a name with a slash in it."""
    extra = (
        '\n[[receive_connectors]]\nname = "Printers / Floor 3"\nusage = "Custom"\n'
        f'bindings = ["127.0.0.1:{free_port()}"]\nremote_ip_ranges = ["127.0.0.9"]\n'
    )
    relay = await start_relay(tmp_path / "data", {"*": free_port()}, extra=extra)
    try:
        app = create_app(relay, token="s3cret")
        transport = httpx.ASGITransport(app=app)
        bearer = {"Authorization": "Bearer s3cret"}
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            path = "/api" + connector_url("receive", "printers / FLOOR 3")
            assert path == "/api/connectors/receive/printers%20%2F%20FLOOR%203"
            assert (await c.get(path)).status_code == 401
            r = await c.get(path, headers=bearer)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["identity"] == "RELAYTEST\\Printers / Floor 3"
            assert body["relay"]["method"] == "none"
            assert body["findings"] == []
            r = await c.get("/api/connectors/send/To%20%2A", headers=bearer)
            assert r.status_code == 200 and r.json()["name"] == "To *"
            missing = await c.get("/api/connectors/send/Nowhere", headers=bearer)
            assert missing.status_code == 404
            assert missing.json() == {"error": "no send connector named 'Nowhere'", "status": 404}
            rebound = await c.get(path, headers={**bearer, "Host": "evil.example"})
            assert rebound.status_code == 403
    finally:
        await relay.stop()
