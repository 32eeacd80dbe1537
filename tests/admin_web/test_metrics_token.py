"""``admin.metrics_require_token`` and what the open health routes say, over real HTTP to the
admin listener of a running relay (tests.queue_manager.helpers.start_relay, 127.0.0.1)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path

import httpx
import pytest

from relaygate.admin import api, guard
from relaygate.app import Relay
from relaygate.queue.store import StoreError
from tests.queue_manager.helpers import free_port, send, start_relay
from tests.queue_manager.test_admin_and_cli import MESSAGE, SENDER, admin_url

TOKEN = "m3trics-S3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


async def _relay(tmp_path: Path, admin_extra: str) -> Relay:
    """A relay whose only route goes to a closed port (nothing is delivered)."""
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    admin = admin_extra.format(token=token)
    return await start_relay(tmp_path / "data", {"*": free_port()}, admin_extra=admin)


async def test_metrics_need_the_api_token_when_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before, /metrics answered anyone whatever the config said (and the key was unknown)."""
    compared: list[bytes] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return real(a, b)

    monkeypatch.setattr(guard.hmac, "compare_digest", spy)
    relay = await _relay(tmp_path, 'api_token_file = "{token}"\nmetrics_require_token = true\n')
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {TOKEN}"},  # the right value in the wrong scheme
                {"Authorization": f"Bearer {TOKEN}x"},
            ):
                r = await client.get("/metrics", headers=headers)
                assert r.status_code == 401, (headers, r.text)
                assert r.headers["www-authenticate"].startswith("Bearer"), r.headers
                assert r.json()["error"] == "missing or wrong API token (admin.api_token_file)"
                assert "relaygate_" not in r.text
            ok = await client.get("/metrics", headers=BEARER)
            assert ok.status_code == 200, ok.text
            assert ok.headers["content-type"].startswith("text/plain")
            assert 'relaygate_queue_messages{status="Retry"}' in ok.text
            assert 'relaygate_smtp_sessions{connector="Test Relay"}' in ok.text
            # the token was compared with hmac.compare_digest (constant time), not with ==
            assert TOKEN.encode() in compared and b"wrong" in compared
            # the API still needs it too, and says how (RFC 6750)
            api_401 = await client.get("/api/queue")
            assert api_401.status_code == 401
            assert api_401.headers["www-authenticate"].startswith("Bearer")
            assert (await client.get("/api/queue", headers=BEARER)).status_code == 200
            # /healthz stays open: a load balancer sends no token
            health = await client.get("/healthz")
            assert health.status_code == 200 and health.json() == {"status": "ok"}
            # wrong tokens on /metrics count with the API's: past the limit a token is checked
            # once in 6 s, the others wait (429), so /metrics is no way round the guessing limit
            for _ in range(api.TOKEN_GUESS_LIMIT - 3):  # three were wrong above
                r = await client.get("/metrics", headers={"Authorization": "Bearer guess"})
                assert r.status_code == 401
            blocked = await client.get("/metrics", headers={"Authorization": "Bearer guess"})
            assert blocked.status_code == 429 and blocked.headers["retry-after"] == "6"
            assert (await client.get("/metrics", headers=BEARER)).status_code == 429
    finally:
        await relay.stop()


async def test_metrics_stay_open_by_default_with_an_api_token(tmp_path: Path) -> None:
    """metrics_require_token = false (the default): the scrapers of before keep working."""
    relay = await _relay(tmp_path, 'api_token_file = "{token}"\nmetrics_require_token = false\n')
    try:
        assert relay.config.admin.metrics_require_token is False
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            r = await client.get("/metrics")
            assert r.status_code == 200 and "relaygate_queue_messages" in r.text
            denied = await client.get("/api/queue")
            assert denied.status_code == 401
            assert denied.headers["www-authenticate"].startswith("Bearer")
    finally:
        await relay.stop()


async def test_health_routes_tell_a_probe_only_up_or_down(tmp_path: Path) -> None:
    """Before, /healthz (and /api/health without the token) gave anyone who reached the
    listener the server's name and FQDN, the SMTP listening addresses, the uptime, queue counts
    and free disk space. Now a probe gets the status code and ``{"status"}``; the whole report
    goes to whoever may read the API."""
    relay = await _relay(tmp_path, 'api_token_file = "{token}"\n')
    try:
        smtp_host, smtp_port = relay.server.endpoints[0] if relay.server else ("", 0)
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            for path in ("/healthz", "/api/health"):
                r = await client.get(path)
                assert r.status_code == 200, (path, r.text)
                assert r.json() == {"status": "ok"}, path
                for secret in ("RELAYTEST", "relay.test", str(smtp_port), "uptime", "queue"):
                    assert secret not in r.text, (path, secret)
            # with the API token: the whole report, as the admin centre shows it
            full = await client.get("/api/health", headers=BEARER)
            assert full.status_code == 200
            body = full.json()
            assert body["status"] == "ok" and body["server"] == "RELAYTEST"
            assert body["smtp"] == [f"{smtp_host}:{smtp_port}"]
            assert body["queue"]["messages"] == 0
            # a wrong token is refused (not a silent short answer: no oracle for guessing)
            wrong = await client.get("/api/health", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            # /healthz ignores tokens: always the probe's answer
            probe = await client.get("/healthz", headers=BEARER)
            assert probe.json() == {"status": "ok"}
    finally:
        await relay.stop()


async def test_healthz_is_short_without_a_token_configured_too(tmp_path: Path) -> None:
    """No api_token_file: the API is open, so /api/health gives the whole report to anyone;
    /healthz, the probe's route, still says only the status."""
    relay = await start_relay(tmp_path / "data", {"*": free_port()})
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            assert (await client.get("/healthz")).json() == {"status": "ok"}
            body = (await client.get("/api/health")).json()
            assert body["server"] == "RELAYTEST" and "queue" in body
    finally:
        await relay.stop()


async def test_a_reload_applies_metrics_require_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The guard reads metrics_require_token from the app's state at each request, as it reads
    the token (AdminServer.apply_token): a reload that turns the key on closes /metrics at once
    (before the merge with the token reload it said "takes effect at restart" and /metrics stayed
    open until then), and turning it off opens it again; no restart is asked for."""
    config = tmp_path / "relaygate.toml"
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    token.chmod(0o600)
    relay = await start_relay(
        tmp_path / "data",
        {"*": free_port()},
        config_file=config,
        admin_extra=f'api_token_file = "{token}"',
    )
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            assert (await client.get("/metrics")).status_code == 200
            text = config.read_text(encoding="utf-8")
            marker = f'api_token_file = "{token}"'
            config.write_text(
                text.replace(marker, marker + "\nmetrics_require_token = true"), encoding="utf-8"
            )
            with caplog.at_level(logging.WARNING, logger="relaygate"):
                await relay.reload()
            assert relay.config.admin.metrics_require_token is True  # the reload was taken
            warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert not [w for w in warnings if "admin." in w], warnings
            closed = await client.get("/metrics")
            assert closed.status_code == 401
            assert closed.headers["www-authenticate"].startswith("Bearer")
            opened = await client.get("/metrics", headers=BEARER)
            assert opened.status_code == 200 and "relaygate_queue_messages" in opened.text
            # and off again: the scrapers without a token are served from the reload on
            config.write_text(text, encoding="utf-8")
            await relay.reload()
            assert relay.config.admin.metrics_require_token is False
            assert (await client.get("/metrics")).status_code == 200
    finally:
        await relay.stop()


async def test_a_reload_rotates_the_token_of_metrics_and_health_with_the_apis(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload reads admin.api_token_file again (AdminServer.apply_token): the new token is the
    one /metrics (metrics_require_token) and /api/health's whole report ask for, as /api does;
    a leaked token rotated in place must not stay valid on any of them. Wrong tokens still
    count together whatever route they try."""
    config = tmp_path / "relaygate.toml"
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    token.chmod(0o600)  # no mode warning: the log below must not name the key at all
    relay = await start_relay(
        tmp_path / "data",
        {"*": free_port()},
        config_file=config,
        admin_extra=f'api_token_file = "{token}"\nmetrics_require_token = true',
    )
    rotated = {"Authorization": "Bearer r0tated-S3cret"}
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            assert (await client.get("/metrics", headers=BEARER)).status_code == 200
            token.write_text("r0tated-S3cret\n", encoding="utf-8")
            with caplog.at_level(logging.WARNING, logger="relaygate"):
                await relay.reload()
            assert "api_token_file" not in caplog.text  # applied, not "at restart"
            for path in ("/metrics", "/api/queue", "/api/health"):
                old = await client.get(path, headers=BEARER)
                assert old.status_code == 401, (path, old.text)
                assert old.headers["www-authenticate"].startswith("Bearer"), path
                assert (await client.get(path, headers=rotated)).status_code == 200, path
            full = (await client.get("/api/health", headers=rotated)).json()
            assert full["server"] == "RELAYTEST" and "queue" in full
            assert (await client.get("/api/health")).json() == {"status": "ok"}
            # three wrong above (one per route): the guessing limit is one for all of them
            for _ in range(api.TOKEN_GUESS_LIMIT - 3):
                r = await client.get("/api/health", headers={"Authorization": "Bearer guess"})
                assert r.status_code == 401
            wrong = await client.get("/metrics", headers={"Authorization": "Bearer guess"})
            assert wrong.status_code == 429  # blocked: checked, wrong, and the next check waits
            assert (await client.get("/metrics", headers=rotated)).status_code == 429
    finally:
        await relay.stop()


async def test_probes_and_scrapes_share_one_count_of_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/healthz, /api/health and /metrics, open to whoever reaches the listener, each counted
    every message in the store (160 ms of the database for 300,000 queued): a client asking
    for them in a loop kept the database counting. Requests at the same time share one count,
    and one made less than QueueControl.counts_reuse ago is given again; an operation on the
    queue, or a failed count, makes the next request count afresh."""
    from relaygate.control import QueueControl

    monkeypatch.setattr(QueueControl, "counts_reuse", 60.0, raising=False)  # the whole test
    relay = await start_relay(tmp_path / "data", {"*": free_port()})
    counted: list[float] = []
    failing: list[bool] = []
    real = relay.store.counts

    async def spy() -> dict[str, int]:
        counted.append(1.0)
        if failing:
            raise StoreError("database is locked")
        return await real()

    monkeypatch.setattr(relay.store, "counts", spy)
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay), timeout=10) as client:
            paths = ["/healthz", "/api/health", "/metrics"] * 10
            answers = await asyncio.gather(*(client.get(path) for path in paths))
            assert [r.status_code for r in answers] == [200] * len(paths)
            assert len(counted) == 1, len(counted)
            assert (await client.get("/api/health")).json()["queue"]["messages"] == 0
            assert len(counted) == 1
            # an operation on the queue: the next probe counts again
            await send(relay, SENDER, ["bob@example.com"], MESSAGE)
            [qid] = [m["QueueId"] for m in (await client.get("/api/queue")).json()["messages"]]
            assert (await client.post(f"/api/queue/{qid}/suspend")).status_code == 200
            report = (await client.get("/api/health")).json()
            assert report["queue"]["suspended"] == 1 and len(counted) == 2, report
            # a failed count is not given again
            await client.post(f"/api/queue/{qid}/resume")
            failing.append(True)
            assert (await client.get("/healthz")).status_code == 503
            failing.clear()
            assert (await client.get("/healthz")).status_code == 200
            assert len(counted) == 4
    finally:
        await relay.stop()
