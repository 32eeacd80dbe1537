"""Pacing to an upstream's quota end to end: a relay in-process (its SMTP listener, its queue, its
SMTP client) delivering to aiosmtpd sinks on loopback through a send connector with
``max_messages_per_minute`` / ``max_recipients_per_day``.

The windows (60 s, 24 h) are module constants of relaygate.queue.pacing, shortened here with
monkeypatch (the relay runs in this process); they are not configuration keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relaygate.app import Relay
from relaygate.control import QueueControl
from relaygate.queue import pacing
from relaygate.queue.model import RecipientStatus, StoredMessage
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    send_connector_text,
    start_relay,
    start_sink,
    wait_for,
)

SENDER = "scanner@senders.test"
RETRY, DONE, FAILED = RecipientStatus.DEFERRED, RecipientStatus.DELIVERED, RecipientStatus.FAILED


class TimedHandler(ScriptedHandler):
    """A sink that notes when (wall clock) each transaction's DATA arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: list[float] = []

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        self.arrived.append(time.time())
        return await super().handle_DATA(server, session, envelope)


def body(n: int) -> bytes:
    return f"From: {SENDER}\r\nSubject: scan {n}\r\nMessage-ID: <{n}@senders.test>\r\n\r\nx\r\n".encode()


def connectors(upstream: int, senders: int, *limits: str) -> str:
    """``*`` → the upstream sink, paced by ``limits``; ``senders.test`` (where reports go) →
    another sink, unpaced."""
    return send_connector_text("M365", "*", upstream, *limits) + send_connector_text(
        "Senders", "senders.test", senders
    )


def _extra(*limits: str) -> str:
    """The two connectors with {0}/{1} for the sinks' ports (filled in by running())."""
    text = connectors(0, 0, *limits)
    text = text.replace("[127.0.0.1]:0", "[127.0.0.1]:{0}", 1)
    return text.replace("[127.0.0.1]:0", "[127.0.0.1]:{1}", 1)


@contextlib.asynccontextmanager
async def running(tmp_path: Path, extra: str, **kw: Any) -> AsyncIterator[tuple[Relay, Sink, Sink]]:
    up, home = await start_sink(TimedHandler()), await start_sink(ScriptedHandler())
    relay = await start_relay(tmp_path / "data", {}, extra=extra.format(up.port, home.port), **kw)
    try:
        yield relay, up, home
    finally:
        await relay.stop()
        await up.close()
        await home.close()


def recipients(msgs: list[StoredMessage]) -> dict[str, Any]:
    return {r.address: r for m in msgs for r in m.recipients}


async def test_max_messages_per_minute_holds_the_rest_until_the_window_frees(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 3.0
    monkeypatch.setattr(pacing, "MESSAGE_WINDOW", window)
    async with running(tmp_path, _extra("max_messages_per_minute = 3")) as (relay, up, home):
        started = time.time()
        for n in range(5):
            code, _ = await send(relay, SENDER, [f"user{n}@example.com"], body(n))
            assert code == 250
        handler: TimedHandler = up.handler  # type: ignore[assignment]

        async def two_paced() -> list[Any]:
            paced = [
                r
                for r in recipients(await relay.store.list_messages()).values()
                if r.status is RETRY and "QUEUE.Paced" in r.last_error
            ]
            return paced if len(paced) == 2 else []

        paced = await wait_for(two_paced, timeout=window - 0.5)
        # Exactly 3 went out in the first window; the other two wait, not attempted.
        assert len(handler.messages) == 3
        first = min(handler.arrived)
        for r in paced:
            assert r.last_error == (
                '451 4.4.2 QUEUE.Paced; send connector "M365" reached '
                "max_messages_per_minute (3); the message waits in the queue until the rolling "
                "window frees"
            )
            assert r.attempts == 0 and r.last_attempt is None  # no retry used up
            # due when the oldest counted send leaves the window
            assert r.next_attempt is not None
            assert started + window <= r.next_attempt <= first + window + 0.1
        # What `relaygate queue list` shows (Get-Message): Retry, the reason, the time, no retry.
        views = await QueueControl.for_relay(relay).list_messages(status="Retry")
        assert len(views) == 2
        for view in views:
            assert view["Status"] == "Retry"
            assert "reached max_messages_per_minute (3)" in view["LastError"]
            assert view["NextRetryTime"] is not None
            assert view["RetryCount"] == 0

        # After the window they go, each on its first (and only) attempt.
        await wait_for(lambda: len(handler.messages) == 5, timeout=window + 5)
        assert len(handler.arrived) == 5
        assert sorted(handler.arrived)[3] >= first + window - 0.2

        async def all_done() -> bool:
            rs = recipients(await relay.store.list_messages()).values()
            return len(rs) == 5 and all(r.status is DONE for r in rs)

        await wait_for(all_done)
        assert all(r.attempts == 1 for r in recipients(await relay.store.list_messages()).values())
        assert relay.manager is not None and relay.manager.stats["paced"] >= 2
        assert not home.handler.messages  # no delay notice, no NDR


async def test_max_recipients_per_day_sends_what_fits_and_holds_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 3.0
    monkeypatch.setattr(pacing, "RECIPIENT_WINDOW", window)
    async with running(tmp_path, _extra("max_recipients_per_day = 4")) as (relay, up, _home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        await send(relay, SENDER, ["a1@example.com", "a2@example.com", "a3@example.com"], body(1))
        await wait_for(lambda: handler.messages)
        # 3 of 4 spent: of a message to 2, the first goes now and the other waits.
        await send(relay, SENDER, ["b1@example.com", "b2@example.com"], body(2))
        await wait_for(lambda: len(handler.messages) == 2, timeout=window - 1)
        assert handler.messages[1]["rcpt_tos"] == ["b1@example.com"]

        async def b2_paced() -> Any:
            rs = recipients(await relay.store.list_messages())
            b2 = rs.get("b2@example.com")
            return b2 if b2 is not None and b2.status is RETRY else None

        b2 = await wait_for(b2_paced, timeout=window - 1)
        assert "reached max_recipients_per_day (4)" in b2.last_error
        assert b2.attempts == 0
        assert b2.next_attempt is not None and b2.next_attempt <= handler.arrived[0] + window
        # The budget is spent: a message to one waits as well.
        await send(relay, SENDER, ["c1@example.com"], body(3))
        await wait_for(b2_paced)
        assert len(handler.messages) == 2
        # b2 and c1 go when a's three have left the window.
        await wait_for(lambda: len(handler.messages) == 4, timeout=window + 5)
        assert sorted(r for m in handler.messages[2:] for r in m["rcpt_tos"]) == [
            "b2@example.com",
            "c1@example.com",
        ]
        assert min(handler.arrived[2:]) >= handler.arrived[0] + window - 0.2


async def test_a_message_bigger_than_the_budget_left_sends_what_fits_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Budget 100 a day, 70 spent: a message to 80 sends its first 30 now, in one transaction;
    the other 50 wait (Retry, not attempted) and go when the 70 leave the window. No recipient
    is sent twice."""
    window = 3.0
    monkeypatch.setattr(pacing, "RECIPIENT_WINDOW", window)
    async with running(tmp_path, _extra("max_recipients_per_day = 100")) as (relay, up, home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        await send(relay, SENDER, [f"early{i}@example.com" for i in range(70)], body(1))
        await wait_for(lambda: handler.messages)
        big = [f"r{i}@example.com" for i in range(80)]
        await send(relay, SENDER, big, body(2))
        await wait_for(lambda: len(handler.messages) == 2, timeout=window - 1)
        assert handler.messages[1]["rcpt_tos"] == big[:30]

        async def fifty_paced() -> list[Any]:
            rs = recipients(await relay.store.list_messages())
            held = [rs[a] for a in big[30:] if rs[a].status is RETRY]
            return held if len(held) == 50 else []

        held = await wait_for(fifty_paced, timeout=window - 1)
        assert len(handler.messages) == 2
        rs = recipients(await relay.store.list_messages())
        assert all(rs[a].status is DONE and rs[a].attempts == 1 for a in big[:30])
        for r in held:
            assert r.last_error == (
                '451 4.4.2 QUEUE.Paced; send connector "M365" reached max_recipients_per_day '
                "(100); the message waits in the queue until the rolling window frees"
            )
            assert r.attempts == 0
            # due when the 70 leave the window (then 50 fit)
            assert r.next_attempt is not None
            assert r.next_attempt <= handler.arrived[0] + window
        await wait_for(lambda: len(handler.messages) == 3, timeout=window + 5)
        assert handler.messages[2]["rcpt_tos"] == big[30:]
        assert handler.arrived[2] >= handler.arrived[0] + window - 0.2

        async def all_done() -> bool:
            rs = recipients(await relay.store.list_messages())
            return all(rs[a].status is DONE for a in big)

        await wait_for(all_done)
        rs = recipients(await relay.store.list_messages())
        assert {rs[a].attempts for a in big} == {1}
        sent = [r for m in handler.messages for r in m["rcpt_tos"]]
        assert len(sent) == len(set(sent)) == 150  # nobody twice
        assert not home.handler.messages


async def test_a_big_message_is_not_starved_by_one_recipient_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget's other user (another node of the cluster sharing it, sending one-recipient
    messages) takes every freed slot half a second after it frees. A message to 3 that waited
    for 3 free slots at once would wait for ever; it takes each slot there is when it is due
    (the relay scans every 0.2 s) and is all sent within a few windows."""
    window = 3.0
    monkeypatch.setattr(pacing, "RECIPIENT_WINDOW", window)
    async with running(tmp_path, _extra("max_recipients_per_day = 3")) as (relay, up, _home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        (connector,) = [c for c in relay.config.send_connectors if c.name == "M365"]
        key, limits = pacing.budget_key(connector), pacing.limits_for(connector)
        taken: list[float] = []

        async def other_node_takes_one() -> Any:
            wait = await relay.store.reserve_send(key, time.time(), 1, limits)
            if wait is None:
                taken.append(time.time())
            return wait

        # The other node has used the day's budget, one send a second.
        for _ in range(3):
            assert await other_node_takes_one() is None
            await asyncio.sleep(1.0)
        big = ["big0@example.com", "big1@example.com", "big2@example.com"]
        await send(relay, SENDER, big, body(1))

        async def competitor() -> None:
            deadline = time.monotonic() + 5 * window
            while time.monotonic() < deadline:  # bounded
                wait = await other_node_takes_one()
                if wait is not None:  # spent: back half a second after a slot frees
                    await asyncio.sleep(max(0.0, wait.until - time.time()) + 0.5)

        task = asyncio.create_task(competitor())
        try:
            await wait_for(
                lambda: sorted(r for m in handler.messages for r in m["rcpt_tos"]) == big,
                timeout=4 * window,
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        assert len(taken) >= 4  # the other node kept sending meanwhile

        # The sink has the last batch before the relay has stored its 250: wait for the store.
        async def all_done() -> bool:
            rs = recipients(await relay.store.list_messages())
            return all(rs[a].status is DONE for a in big)

        await wait_for(all_done)
        rs = recipients(await relay.store.list_messages())
        assert {rs[a].attempts for a in big} == {1}


async def test_more_recipients_than_a_days_budget_go_in_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose recipients alone exceed max_recipients_per_day could never be sent
    whole: it goes in transactions of at most that many, each when the window allows."""
    window = 1.5
    monkeypatch.setattr(pacing, "RECIPIENT_WINDOW", window)
    async with running(tmp_path, _extra("max_recipients_per_day = 2")) as (relay, up, home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        rcpts = [f"r{i}@example.com" for i in range(5)]
        await send(relay, SENDER, rcpts, body(1))
        await wait_for(lambda: len(handler.messages) == 3, timeout=3 * window + 5)
        assert [m["rcpt_tos"] for m in handler.messages] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
        assert handler.arrived[1] >= handler.arrived[0] + window - 0.2
        assert handler.arrived[2] >= handler.arrived[1] + window - 0.2

        async def all_done() -> bool:
            rs = recipients(await relay.store.list_messages()).values()
            return all(r.status is DONE for r in rs)

        await wait_for(all_done)
        assert {r.attempts for r in recipients(await relay.store.list_messages()).values()} == {1}
        assert not home.handler.messages


async def test_a_paced_message_still_gets_its_delay_notice_and_expires_on_time(
    tmp_path: Path,
) -> None:
    """Pacing uses up no retry, but time runs: the delay notice and the expiry come when due
    (the real 60 s window would hold the second message far longer)."""
    queue = {"delay_notification_timeout": "00:00:02", "message_expiration_timeout": "00:00:05"}
    async with running(tmp_path, _extra("max_messages_per_minute = 1"), queue=queue) as (
        relay,
        up,
        home,
    ):
        t0 = time.time()
        await send(relay, SENDER, ["first@example.com"], body(1))
        await wait_for(lambda: up.handler.messages)
        await send(relay, SENDER, ["second@example.com"], body(2))

        def kinds() -> list[str]:
            return [
                m["content"].split(b"Subject: ", 1)[1][:18].decode() for m in home.handler.messages
            ]

        await wait_for(lambda: len(home.handler.messages) == 2, timeout=10)
        delayed, failed = kinds()
        assert delayed.startswith("Delivery delayed") and failed.startswith("Undeliverable")
        assert time.time() - t0 < 9
        second = recipients(await relay.store.list_messages())["second@example.com"]
        assert second.status is FAILED
        assert second.last_error == "550 4.4.7 QUEUE.Expired; message expired"
        assert len(up.handler.messages) == 1  # never sent past the budget


async def test_a_reload_that_raises_the_limit_releases_paced_mail_at_once(tmp_path: Path) -> None:
    up, home = await start_sink(TimedHandler()), await start_sink(ScriptedHandler())
    config_file = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {},
        extra=_extra("max_messages_per_minute = 1").format(up.port, home.port),
        config_file=config_file,
    )
    try:
        await send(relay, SENDER, ["first@example.com"], body(1))
        await send(relay, SENDER, ["second@example.com"], body(2))

        async def second_paced() -> bool:
            r = recipients(await relay.store.list_messages()).get("second@example.com")
            return r is not None and r.status is RETRY and "QUEUE.Paced" in r.last_error

        await wait_for(second_paced)
        assert len(up.handler.messages) == 1  # the real window: a minute to wait
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(
            text.replace("max_messages_per_minute = 1", "max_messages_per_minute = 30"),
            encoding="utf-8",
        )
        await relay.reload()
        assert relay.config.send_connectors[0].max_messages_per_minute == 30
        await wait_for(lambda: len(up.handler.messages) == 2, timeout=5)

        # And a reload that lowers it holds mail again.
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(
            text.replace("max_messages_per_minute = 30", "max_messages_per_minute = 2"),
            encoding="utf-8",
        )
        await relay.reload()
        await send(relay, SENDER, ["third@example.com"], body(3))

        async def third_paced() -> bool:
            r = recipients(await relay.store.list_messages()).get("third@example.com")
            return r is not None and r.status is RETRY and "(2)" in r.last_error

        await wait_for(third_paced)
        assert len(up.handler.messages) == 2
    finally:
        await relay.stop()
        await up.close()
        await home.close()


async def test_a_connector_without_limits_makes_no_store_call_for_pacing(tmp_path: Path) -> None:
    async with running(tmp_path, _extra()) as (relay, up, _home):
        calls: list[Any] = []
        real = relay.store.reserve_send

        async def counting(*args: Any, **kw: Any) -> Any:
            calls.append(args)
            return await real(*args, **kw)

        relay.store.reserve_send = counting  # type: ignore[method-assign]
        for n in range(3):
            await send(relay, SENDER, [f"u{n}@example.com"], body(n))
        await wait_for(lambda: len(up.handler.messages) == 3)
        assert calls == []


async def test_a_backlog_is_spread_over_the_windows_it_needs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most max_messages_per_minute can go per window: of the held-back messages, the first
    that many are due when the window frees, the next ones a window later each (not all of them
    at every freed slot)."""
    window = 2.0
    monkeypatch.setattr(pacing, "MESSAGE_WINDOW", window)
    async with running(tmp_path, _extra("max_messages_per_minute = 2")) as (relay, up, _home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        for n in range(7):
            await send(relay, SENDER, [f"u{n}@example.com"], body(n))

        async def five_paced() -> list[float]:
            rs = recipients(await relay.store.list_messages()).values()
            due = [r.next_attempt for r in rs if r.status is RETRY and r.next_attempt]
            return sorted(due) if len(due) == 5 else []

        due = await wait_for(five_paced, timeout=window - 0.5)
        assert len(handler.messages) == 2
        first = min(handler.arrived)
        # two due when the first window frees, two a window later, one two windows later
        assert [round((d - first) / window) for d in due] == [1, 1, 2, 2, 3]
        await wait_for(lambda: len(handler.messages) == 7, timeout=4 * window + 5)
        arrived = sorted(handler.arrived)
        # never more than 2 in any window
        assert all(arrived[i + 2] - arrived[i] >= window - 0.2 for i in range(5))


async def test_a_store_error_reserving_a_later_batch_keeps_the_earlier_batches_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The recipients of a batch already delivered are recorded Delivered even when the
    reservation of a later batch fails (the database blinks): they are never sent again."""
    from relaygate.queue.store import StoreError

    async with running(tmp_path, _extra("max_recipients_per_day = 2")) as (relay, up, _home):
        handler: TimedHandler = up.handler  # type: ignore[assignment]
        real = relay.store.reserve_send
        calls = 0

        async def flaky(*args: Any, **kw: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls == 2:
                raise StoreError("queue database unreachable")
            return await real(*args, **kw)

        monkeypatch.setattr(relay.store, "reserve_send", flaky)
        rcpts = [f"r{i}@example.com" for i in range(4)]
        await send(relay, SENDER, rcpts, body(1))

        async def settled() -> bool:
            rs = recipients(await relay.store.list_messages())
            return calls >= 2 and all(r.attempts or r.status is DONE for r in rs.values())

        await wait_for(settled)
        rs = recipients(await relay.store.list_messages())
        assert [m["rcpt_tos"] for m in handler.messages] == [rcpts[0:2]]
        assert {a: rs[a].status for a in rcpts} == {
            rcpts[0]: DONE,
            rcpts[1]: DONE,
            rcpts[2]: RETRY,
            rcpts[3]: RETRY,
        }
