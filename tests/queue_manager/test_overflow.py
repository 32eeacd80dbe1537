"""Spill-over (``overflow_connector``) end to end: a relay in-process delivering to aiosmtpd sinks
on loopback. A send connector whose pacing budget is spent hands the transaction to its overflow
connector, which sends it its own way (its smart hosts, its send_as) within its own budget, and
on down the chain; when every route is spent the recipients wait with the first one's reason.

``max_messages_per_minute = 1`` keeps the real 60 s window: each connector takes one message and
is then spent for the rest of the test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relaygate.app import Relay
from relaygate.logs.tracking import search
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    send_connector_text,
    start_relay,
    start_sink,
    wait_for,
)
from tests.queue_manager.test_pacing import DONE, RETRY, SENDER, body, recipients

PACED_M365 = (
    '451 4.4.2 QUEUE.Paced; send connector "M365" reached max_messages_per_minute (1); the '
    "message waits in the queue until the rolling window frees"
)


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, m365: list[str], esp: list[str], third: list[str] | None = None
) -> AsyncIterator[tuple[Relay, Sink, Sink, Sink]]:
    """Sinks for "M365" (every domain), "ESP" and "Third" (address spaces nobody writes to:
    they are reached only as overflow connectors) and "Senders" (reports)."""
    sinks = [await start_sink(ScriptedHandler()) for _ in range(4)]
    up, esp_sink, third_sink, home = sinks
    extra = (
        send_connector_text("M365", "*", up.port, *m365)
        + send_connector_text("ESP", "esp.example", esp_sink.port, *esp)
        + send_connector_text("Third", "third.example", third_sink.port, *(third or []))
        + send_connector_text("Senders", "senders.test", home.port)
    )
    relay = await start_relay(tmp_path / "data", {}, extra=extra)
    try:
        yield relay, up, esp_sink, third_sink
    finally:
        await relay.stop()
        for sink in sinks:
            await sink.close()


def rcpts(sink: Sink) -> list[str]:
    return [r for m in sink.handler.messages for r in m["rcpt_tos"]]


async def sends(relay: Relay) -> dict[str, str]:
    """The SEND events of the tracking log: recipient → the connector that sent it."""
    assert relay.tracking is not None
    await asyncio.to_thread(relay.tracking.flush)
    out = {}
    for event in search(relay.tracking.path, event_id="SEND"):
        for r in event["recipient-address"]:
            out[r] = event["connector-id"]
    return out


async def _sends_are(relay: Relay, want: dict[str, str], *, partial: bool = False) -> bool:
    got = await sends(relay)
    if partial:
        got = {k: v for k, v in got.items() if k in want}
    return got == want


async def test_a_spent_connector_spills_over_to_its_overflow_connector(tmp_path: Path) -> None:
    """M365 takes one message a minute; the second goes through ESP, its own way: ESP's smart
    host, ESP's send_as. The tracking log's SEND names ESP."""
    async with running(
        tmp_path,
        ["max_messages_per_minute = 1", 'overflow_connector = "ESP"'],
        ['send_as = "relay@esp.example"'],
    ) as (relay, up, esp, _third):
        assert (await send(relay, SENDER, ["first@example.com"], body(1)))[0] == 250
        await wait_for(lambda: up.handler.messages)
        assert (await send(relay, SENDER, ["second@example.com"], body(2)))[0] == 250
        await wait_for(lambda: esp.handler.messages)
        assert rcpts(up) == ["first@example.com"] and up.handler.mail_froms == [SENDER]
        assert rcpts(esp) == ["second@example.com"]
        assert esp.handler.mail_froms == ["relay@esp.example"]  # ESP's send_as, not M365's
        assert b"relay@esp.example" in esp.handler.messages[0]["content"].split(b"\r\n\r\n")[0]

        async def both_done() -> bool:
            rs = recipients(await relay.store.list_messages())
            return len(rs) == 2 and all(r.status is DONE for r in rs.values())

        await wait_for(both_done)
        want = {"first@example.com": "M365", "second@example.com": "ESP"}
        assert await wait_for(lambda: _sends_are(relay, want))


@pytest.mark.parametrize("esp_enabled", [True, False])
async def test_the_overflow_follows_the_chain(tmp_path: Path, esp_enabled: bool) -> None:
    """M365 → ESP → Third: each spent in turn. A disabled connector in the chain is skipped."""
    async with running(
        tmp_path,
        ["max_messages_per_minute = 1", 'overflow_connector = "ESP"'],
        [
            "max_messages_per_minute = 1",
            'overflow_connector = "Third"',
            f"enabled = {str(esp_enabled).lower()}",
        ],
    ) as (relay, up, esp, third):
        for n in range(3):
            assert (await send(relay, SENDER, [f"u{n}@example.com"], body(n)))[0] == 250
            await wait_for(lambda n=n: len(rcpts(up) + rcpts(esp) + rcpts(third)) == n + 1)
        assert rcpts(up) == ["u0@example.com"]
        if esp_enabled:
            assert (rcpts(esp), rcpts(third)) == (["u1@example.com"], ["u2@example.com"])
        else:
            assert (rcpts(esp), rcpts(third)) == ([], ["u1@example.com", "u2@example.com"])
        assert await wait_for(lambda: _sends_are(relay, {"u2@example.com": "Third"}, partial=True))


@pytest.mark.parametrize("esp_overflow", ["", "M365"], ids=["esp-spent", "cycle"])
async def test_when_every_route_is_spent_the_recipients_wait_with_the_first_ones_reason(
    tmp_path: Path, esp_overflow: str
) -> None:
    """M365 → ESP, both spent (ESP with no overflow of its own, or back to M365: the chain
    stops at a connector already visited): the message waits as without overflow, with M365's
    paced LastError, not attempted."""
    esp_lines = ["max_messages_per_minute = 1"]
    if esp_overflow:
        esp_lines.append(f'overflow_connector = "{esp_overflow}"')
    async with running(
        tmp_path, ["max_messages_per_minute = 1", 'overflow_connector = "ESP"'], esp_lines
    ) as (relay, up, esp, third):
        for n in range(2):
            await send(relay, SENDER, [f"u{n}@example.com"], body(n))
            await wait_for(lambda n=n: len(rcpts(up) + rcpts(esp)) == n + 1)
        await send(relay, SENDER, ["u2@example.com"], body(2))

        async def held() -> Any:
            r = recipients(await relay.store.list_messages()).get("u2@example.com")
            return r if r is not None and r.status is RETRY else None

        r = await wait_for(held, timeout=5)
        assert r.last_error == PACED_M365
        assert r.attempts == 0 and r.next_attempt is not None
        assert (rcpts(up), rcpts(esp), rcpts(third)) == (
            ["u0@example.com"],
            ["u1@example.com"],
            [],
        )
        assert relay.manager is not None and relay.manager.stats["paced"] >= 1


async def test_what_a_days_budget_holds_back_spills_over_and_the_rest_goes_as_usual(
    tmp_path: Path,
) -> None:
    """max_recipients_per_day = 2 and a message to 3: two through M365, the third through ESP,
    in the same delivery run."""
    async with running(
        tmp_path, ["max_recipients_per_day = 2", 'overflow_connector = "ESP"'], []
    ) as (relay, up, esp, _third):
        rs = ["a@example.com", "b@example.com", "c@example.com"]
        await send(relay, SENDER, rs, body(1))
        await wait_for(lambda: up.handler.messages and esp.handler.messages)
        assert (rcpts(up), rcpts(esp)) == (rs[:2], rs[2:])

        async def all_done() -> bool:
            states = recipients(await relay.store.list_messages())
            return all(states[a].status is DONE for a in rs)

        await wait_for(all_done)
        want = {"a@example.com": "M365", "b@example.com": "M365", "c@example.com": "ESP"}
        assert await wait_for(lambda: _sends_are(relay, want))
