"""Tracking-log events the queue manager writes about a message beyond its deliveries: a damaged
message suspended (POISONMESSAGE), the signing decision (AGENTINFO) once however many attempts."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from relaygate.app import Relay
from relaygate.logs.tracking import search
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    start_relay,
    start_sink,
    wait_for,
)

SENDER = "scanner@senders.test"
MESSAGE = (
    b"From: Scanner <scanner@senders.test>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: Invoice 42\r\n"
    b"Message-ID: <invoice-42@senders.test>\r\n"
    b"\r\n"
    b"Please find the invoice attached.\r\n"
)


def defer_first(attempts: int) -> ScriptedHandler:
    """A sink that answers 451 to each recipient's first `attempts` RCPTs, then accepts."""
    return ScriptedHandler(lambda _a, n: "451 4.3.0 try later" if n <= attempts else None)


@asynccontextmanager
async def relay_and_sink(
    tmp_path: Path, handler: ScriptedHandler, extra: str = ""
) -> AsyncIterator[tuple[Relay, Sink]]:
    sink = await start_sink(handler)
    try:
        relay = await start_relay(tmp_path / "data", {"*": sink.port}, extra=extra)
        try:
            yield relay, sink
        finally:
            await relay.stop()
    finally:
        await sink.close()


async def events(relay: Relay, event_id: str) -> list[dict[str, Any]]:
    assert relay.tracking is not None
    await asyncio.to_thread(relay.tracking.flush)
    return search(relay.tracking.path, event_id=event_id)


async def test_a_damaged_message_is_suspended_with_a_poisonmessage_event(tmp_path: Path) -> None:
    """A stored message whose bytes fail their checksum is suspended (never delivered damaged):
    the service log said so, the tracking log did not, and `relaygate trace` of the message
    ended at its DEFER. Now a POISONMESSAGE event says why, once."""
    async with relay_and_sink(tmp_path, defer_first(1)) as (relay, sink):
        await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        (defer,) = await wait_for(lambda: events(relay, "DEFER"))
        queue_id = defer["internal-message-id"]
        conn = sqlite3.connect(tmp_path / "data" / "queue" / "queue.db")
        with conn:
            conn.execute(
                "UPDATE message_data SET data = ? WHERE queue_id = ?", (b"tampered", queue_id)
            )
        conn.close()
        assert relay.manager is not None
        store = relay.manager.store

        async def suspended() -> bool:
            msg = await store.get(queue_id)
            return msg is not None and msg.suspended

        await wait_for(suspended)
        (poison,) = await wait_for(lambda: events(relay, "POISONMESSAGE"))
        assert poison["internal-message-id"] == queue_id
        assert poison["source"] == "QUEUE"
        assert poison["recipient-address"] == ["bob@example.com"]
        (status,) = poison["recipient-status"]
        assert "checksum" in status, status
        assert sink.handler.messages == []


async def test_the_signing_decision_is_logged_once_however_many_attempts(tmp_path: Path) -> None:
    """AGENTINFO (Exchange's agents write it once, as the message passes them) was written on
    every delivery attempt: a message retried 50 times had 50 copies of the same DKIM note.
    Now once per message, and again only when the decision changes."""
    from relaygate.dkim.keys import generate_key

    pem, _record = generate_key("rsa-sha256")
    key_file = tmp_path / "s1.key"
    key_file.write_bytes(pem)
    extra = f'\n[[dkim]]\ndomain = "senders.test"\nselector = "s1"\nkey_file = "{key_file}"\n'
    async with relay_and_sink(tmp_path, defer_first(2), extra=extra) as (relay, sink):
        await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        (got,) = await wait_for(lambda: sink.handler.messages, timeout=20)
        assert got["content"].startswith(b"DKIM-Signature: ")
        assert len(await events(relay, "DEFER")) == 2
        (info,) = await events(relay, "AGENTINFO")
        assert info["custom-data"].startswith("DKIM signed d=senders.test s=s1"), info
