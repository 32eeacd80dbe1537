"""Tracking-log events the queue manager writes about a message beyond its deliveries: a damaged
message suspended (POISONMESSAGE), the signing decision (AGENTINFO) once however many attempts,
and values holding a ";" read back whole (`relaygate trace --json`)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
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


def run_trace(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="200")
    env.pop("RELAYGATE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "trace", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=60,
    )


async def test_values_holding_a_semicolon_are_read_back_whole(tmp_path: Path) -> None:
    """recipient-address and recipient-status hold one value per recipient joined by ";". A ";"
    inside a value (a quoted local part, a next hop's reply) was read as a separator: the
    recipients and their statuses came apart and no longer paired up in `relaygate trace`."""
    odd = '"a;b"@example.com'
    replies = {odd: "550 5.1.1 unknown;see https://example.com/x;y", "c@example.com": None}
    handler = ScriptedHandler(lambda address, _n: replies.get(address))
    async with relay_and_sink(tmp_path, handler) as (relay, _sink):
        await send(relay, SENDER, [odd, "c@example.com"], MESSAGE)

        async def sent_and_failed() -> bool:
            ours = [e for e in await events(relay, "") if e["sender-address"] == SENDER]
            return {"SEND", "FAIL"} <= {e["event-id"] for e in ours}

        await wait_for(sent_and_failed)
        assert relay.tracking is not None
        directory = relay.tracking.path
    res = run_trace("--log-dir", str(directory), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # the message's events (not its NDR's)
    by_event = {e["event-id"]: e for e in json.loads(res.stdout) if e["sender-address"] == SENDER}
    assert by_event["RECEIVE"]["recipient-address"] == [odd, "c@example.com"]
    assert by_event["RECEIVE"]["recipient-count"] == 2
    assert by_event["FAIL"]["recipient-address"] == [odd]
    assert by_event["FAIL"]["recipient-status"] == ["550 5.1.1 unknown;see https://example.com/x;y"]
    assert by_event["SEND"]["recipient-address"] == ["c@example.com"]
    res = run_trace("--log-dir", str(directory), "--recipient", odd, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert {e["event-id"] for e in json.loads(res.stdout)} >= {"RECEIVE", "FAIL"}


def test_escaped_values_round_trip_exactly(tmp_path: Path) -> None:
    """The escape of ";" is undone exactly, values that look like an escape included, and a "; "
    (Exchange's own statuses) is written as it is."""
    from relaygate.logs.tracking import TrackingLog

    values = ["%3B", "%25", "a;", ";", "x%;y", "%253B", "100% sure", "QUEUE.Admin; deleted", "%3b"]
    with TrackingLog(tmp_path, server_name="R") as log:
        log.write("FAIL", "SMTP", recipients=["r@example.com"] * 9, recipient_status=values)
    (event,) = search(tmp_path)
    assert event["recipient-status"] == values
    text = next(tmp_path.glob("MSGTRK*.LOG")).read_text(encoding="utf-8")
    assert "100% sure;QUEUE.Admin; deleted;" in text
