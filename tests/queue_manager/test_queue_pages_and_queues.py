"""Get-Message a page at a time with filters, Get-Queue and Retry-Queue, on a running node: the
admin API over a real socket, and `relaygate queue` as a subprocess talking to it.

Two smart-host send connectors (example.com → sink A, example.net → sink B), both answering 451 to
every RCPT, so messages stay in Retry; no connector for nowhere.test, so that recipient waits in
the Unreachable queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from relaygate.app import Relay
from relaygate.config import parse_text
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    send_connector_text,
    start_relay,
    start_sink,
    wait_for,
)
from tests.queue_manager.test_admin_and_cli import MESSAGE, admin_url, cli

QUEUE = {
    "transient_failure_retry_interval": "00:10:00",
    "message_retry_interval": "00:10:00",
}

#: (sender, recipients) of the five messages, in the order they are sent
MESSAGES = [
    ("Scan1@Scanners.Corp.Test", ["bob@example.com"]),
    ("scan2@scanners.corp.test", ["carol@example.net"]),
    ("erp@corp.test", ["dave@example.com", "eve@example.net"]),
    ("erp@corp.test", ["x@nowhere.test"]),
    ("app@corp.test", ["bob@example.com"]),
]


@dataclass
class Node:
    relay: Relay
    config: Path
    a: Sink
    b: Sink
    handler_a: ScriptedHandler
    handler_b: ScriptedHandler
    ids: list[str]  # queue ids of MESSAGES, in order

    @property
    def url(self) -> str:
        return admin_url(self.relay)

    @property
    def queue_a(self) -> str:
        return f"[127.0.0.1]:{self.a.port}"

    @property
    def queue_b(self) -> str:
        return f"[127.0.0.1]:{self.b.port}"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    handler_a = ScriptedHandler(lambda _a, _n: "451 4.2.0 A is busy")
    handler_b = ScriptedHandler(lambda _a, _n: "451 4.2.0 B is busy")
    a, b = await start_sink(handler_a), await start_sink(handler_b)
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"example.com": a.port, "example.net": b.port},
        queue=QUEUE,
        config_file=config,
    )
    try:
        ids: list[str] = []
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:
            for sender, rcpts in MESSAGES:
                await send(relay, sender, rcpts, MESSAGE)

                async def attempted(count: int = len(ids) + 1) -> list[Any] | None:
                    """The message's first attempt is recorded (it is no longer Active)."""
                    items = (await client.get("/api/queue")).json()["messages"]
                    done = [m for m in items if m["Status"] in ("Retry", "Unreachable")]
                    return done if len(done) == count else None

                ids = [m["QueueId"] for m in await wait_for(attempted)]
        assert len(ids) == len(MESSAGES) and ids == sorted(ids)
        yield Node(relay, config, a, b, handler_a, handler_b, ids)
    finally:
        await relay.stop()
        await a.close()
        await b.close()


def _ids(body: dict[str, Any]) -> list[str]:
    return [m["QueueId"] for m in body["messages"]]


async def test_api_pages_through_the_queue_with_a_cursor(node: Node) -> None:
    """Before, GET /api/queue returned the first `limit` messages and no way to see further."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        first = await client.get("/api/queue", params={"limit": "2"})
        body = first.json()
        assert set(body) == {"server", "messages", "next_after"}  # the old object, one key more
        assert _ids(body) == node.ids[:2] and body["next_after"] == node.ids[1]
        assert first.headers["link"] == (f'</api/queue?limit=2&after={node.ids[1]}>; rel="next"')
        # following the Link header walks the whole queue once, in arrival order
        seen, link, pages = _ids(body), first.headers["link"], 1
        while link and pages < 10:
            page = await client.get(link.partition("<")[2].partition(">")[0])
            seen += _ids(page.json())
            link, pages = page.headers.get("link", ""), pages + 1
        assert seen == node.ids and pages == 3
        assert page.json()["next_after"] is None
        # the last page exactly full: no next page announced (one more is read to know)
        exact = (await client.get("/api/queue", params={"limit": "5"})).json()
        assert _ids(exact) == node.ids and exact["next_after"] is None
        # the cursor as a message identity, in any case
        rest = await client.get("/api/queue", params={"after": f"relaytest\\{node.ids[2].lower()}"})
        assert _ids(rest.json()) == node.ids[3:]
        # with a status worked out per message (Retry is not Active): paged the same way
        retry = (await client.get("/api/queue", params={"status": "Retry", "limit": "1"})).json()
        retry_ids = [i for n, i in enumerate(node.ids) if n != 3]  # 3 is Unreachable
        assert _ids(retry) == retry_ids[:1] and retry["next_after"] == retry_ids[0]
        walked, after = _ids(retry), retry["next_after"]
        while after and len(walked) < 10:
            page_body = (
                await client.get(
                    "/api/queue", params={"status": "retry", "limit": 1, "after": after}
                )
            ).json()
            walked += _ids(page_body)
            after = page_body["next_after"]
        assert walked == retry_ids
        for bad in ("nonsense", "0123", "G" * 16):
            r = await client.get("/api/queue", params={"after": bad})
            assert r.status_code == 400 and r.json()["error"].startswith("after must be"), bad


async def test_api_filters_like_get_message_filter(node: Node) -> None:
    i = node.ids
    async with httpx.AsyncClient(base_url=node.url) as client:

        async def listed(**params: str) -> list[str]:
            r = await client.get("/api/queue", params=params)
            assert r.status_code == 200, (params, r.text)
            return _ids(r.json())

        assert await listed(**{"from": "*@scanners.corp.test"}) == [i[0], i[1]]
        assert await listed(**{"from": "SCAN1@scanners.corp.test"}) == [i[0]]
        assert await listed(**{"from": "erp@*"}) == [i[2], i[3]]
        assert await listed(**{"from": "scanners.corp.test"}) == []  # exact unless a * says so
        assert await listed(to="bob@example.com") == [i[0], i[4]]
        assert await listed(to="*@EXAMPLE.net") == [i[1], i[2]]
        assert await listed(queue=node.queue_a) == [i[0], i[2], i[4]]
        assert await listed(queue=f"RELAYTEST\\{node.queue_b}") == [i[1], i[2]]
        assert await listed(queue="unreachable") == [i[3]]
        assert await listed(queue="RELAYTEST\\Unreachable", status="Unreachable") == [i[3]]
        assert await listed(queue="[127.0.0.1]:1") == []
        assert await listed(**{"from": "erp@corp.test", "queue": node.queue_b}) == [i[2]]
        assert await listed(to="*@example.com", after=i[0]) == [i[2], i[4]]
        assert await listed(**{"from": "", "to": " "}) == i  # empty: no filter
        # paging through a filter worked out per message
        page = (await client.get("/api/queue", params={"queue": node.queue_a, "limit": 2})).json()
        assert _ids(page) == [i[0], i[2]] and page["next_after"] == i[2]
        page = (
            await client.get(
                "/api/queue", params={"queue": node.queue_a, "limit": 2, "after": i[2]}
            )
        ).json()
        assert _ids(page) == [i[4]] and page["next_after"] is None
        for param, value in (
            ("from", "scan*@x"),
            ("to", "a b@example.com"),
            ("from", "<bob@x"),
            ("queue", "OTHER\\example.com"),
            ("queue", "RELAYTEST\\"),
            ("status", "Sleeping"),
        ):
            r = await client.get("/api/queue", params={param: value})
            assert r.status_code == 400, (param, value, r.text)
            error = r.json()["error"]
            assert error.startswith(param) or error.startswith(f"unknown {param}"), error


async def test_api_get_queue_lists_the_delivery_queues(node: Node) -> None:
    """Get-Queue: before there was no view of the delivery queues at all."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        body = (await client.get("/api/queues")).json()
        assert body["server"] == "RELAYTEST" and body["truncated"] is False
        queues = {q["NextHopDomain"]: q for q in body["queues"]}
        assert set(queues) == {node.queue_a, node.queue_b, "Unreachable"}
        a = queues[node.queue_a]
        assert a["Identity"] == f"RELAYTEST\\{node.queue_a}"
        assert a["DeliveryType"] == "SmartHostConnectorDelivery"
        assert a["SendConnector"] == "To example.com"
        assert a["Status"] == "Retry"
        assert (a["MessageCount"], a["RecipientCount"]) == (3, 3)
        assert a["NextRetryTime"] and a["LastRetryTime"]
        assert "451 4.2.0 A is busy" in a["LastError"]
        b = queues[node.queue_b]
        assert (b["MessageCount"], b["Status"]) == (2, "Retry")
        assert "451 4.2.0 B is busy" in b["LastError"]
        unreachable = queues["Unreachable"]
        assert unreachable["Identity"] == "RELAYTEST\\Unreachable"
        assert unreachable["DeliveryType"] == "Unreachable"
        assert unreachable["MessageCount"] == 1
        assert "ROUTING.NoNextHop" in unreachable["LastError"]
        one = await client.get("/api/queues/" + quote(f"RELAYTEST\\{node.queue_b}", safe=""))
        assert one.status_code == 200 and one.json() == b
        missing = await client.get("/api/queues/" + quote("[127.0.0.1]:1", safe=""))
        assert missing.status_code == 404 and "not found" in missing.json()["error"]

        # suspended messages still count in their queue; a queue of suspended ones is Suspended
        for qid in (node.ids[1], node.ids[2]):
            assert (await client.post(f"/api/queue/{qid}/suspend")).status_code == 200
        queues = {q["NextHopDomain"]: q for q in (await client.get("/api/queues")).json()["queues"]}
        assert (queues[node.queue_b]["MessageCount"], queues[node.queue_b]["Status"]) == (
            2,
            "Suspended",
        )
        assert queues[node.queue_a]["Status"] == "Retry"
        # a delivered message leaves its queue, an emptied queue leaves the list
        for qid in (node.ids[1], node.ids[2]):
            assert (await client.delete(f"/api/queue/{qid}")).status_code == 200
        names = [q["NextHopDomain"] for q in (await client.get("/api/queues")).json()["queues"]]
        assert node.queue_b not in names and node.queue_a in names


async def test_api_retry_queue_retries_that_queue_and_resubmits_unreachable(node: Node) -> None:
    """Retry-Queue -Identity SERVER\\NextHop: before, only one message at a time could be retried."""
    i = node.ids
    attempts_a = {a: len(t) for a, t in node.handler_a.attempts.items()}
    attempts_b = {a: len(t) for a, t in node.handler_b.attempts.items()}
    assert attempts_a == {"bob@example.com": 2, "dave@example.com": 1}
    async with httpx.AsyncClient(base_url=node.url) as client:
        await client.post(f"/api/queue/{i[4]}/suspend")  # left alone by Retry-Queue
        r = await client.post(
            "/api/queues/" + quote(f"RELAYTEST\\{node.queue_a}", safe="") + "/retry"
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["Identity"] == f"RELAYTEST\\{node.queue_a}" and body["Resubmit"] is False
        assert body["RetriedCount"] == 2 and body["SuspendedCount"] == 1
        assert body["Retried"] == [f"RELAYTEST\\{i[0]}", f"RELAYTEST\\{i[2]}"]
        # at once, not in ten minutes: bob (message 0) and dave are tried again
        await wait_for(lambda: len(node.handler_a.attempts["bob@example.com"]) == 3)
        await wait_for(lambda: len(node.handler_a.attempts["dave@example.com"]) == 2)
        # message 2 as a whole is due: eve, its recipient in queue B, too; carol (B only) is not
        await wait_for(lambda: len(node.handler_b.attempts["eve@example.net"]) == 2)
        await asyncio.sleep(0.5)
        assert len(node.handler_b.attempts["carol@example.net"]) == attempts_b["carol@example.net"]

        async def retry_count(qid: str) -> int:
            view = (await client.get(f"/api/queue/{qid}")).json()
            return int(view["Recipients"][0]["RetryCount"]) if view["Status"] != "Active" else -1

        assert await retry_count(i[3]) == 1
        r = await client.post("/api/queues/Unreachable/retry")
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["Identity"], body["Resubmit"], body["RetriedCount"]) == (
            "RELAYTEST\\Unreachable",
            True,
            1,
        )

        async def routed_again() -> bool:
            return await retry_count(i[3]) == 2

        await wait_for(routed_again)  # the delivery run routed it again: still no connector
        assert (await client.get(f"/api/queue/{i[3]}")).json()["Status"] == "Unreachable"

        # A send connector for nowhere.test appears (set here without Relay.reload, which
        # resubmits the Unreachable queue itself): the message waits in Unreachable until
        # Retry-Queue -Resubmit, then goes out through the new route (sink A) at once.
        text = node.config.read_text(encoding="utf-8")
        text += send_connector_text("To nowhere", "nowhere.test", node.a.port)
        new = parse_text(text, str(node.config))
        assert node.relay.manager is not None
        node.relay.config = node.relay.manager.config = new
        queues = {q["NextHopDomain"]: q for q in (await client.get("/api/queues")).json()["queues"]}
        assert queues["Unreachable"]["MessageCount"] == 1
        assert (await client.get("/api/queue", params={"queue": "Unreachable"})).json()["messages"][
            0
        ]["QueueId"] == i[3]
        await asyncio.sleep(0.5)
        assert "x@nowhere.test" not in node.handler_a.attempts
        r = await client.post("/api/queues/Unreachable/retry")
        assert r.status_code == 200 and r.json()["RetriedCount"] == 1, r.text
        await wait_for(lambda: node.handler_a.attempts.get("x@nowhere.test"))

        async def moved() -> bool:
            view = (await client.get(f"/api/queue/{i[3]}")).json()
            return view["Status"] == "Retry" and view["NextHopDomain"] == node.queue_a

        await wait_for(moved)
        queues = {q["NextHopDomain"]: q for q in (await client.get("/api/queues")).json()["queues"]}
        assert "Unreachable" not in queues
        for identity in ("[127.0.0.1]:1", "OTHER%5CUnreachable"):
            r = await client.post(f"/api/queues/{identity}/retry")
            assert r.status_code == 404, (identity, r.text)


async def test_queue_cli_pages_filters_summary_and_retry_queue(node: Node) -> None:
    i, config = node.ids, node.config
    (
        (rc_page, page, err_page),
        (rc_json, out_json, err_json),
        (rc_bad, _o, err_bad),
        (rc_sum, summary, err_sum),
        (rc_sum_json, summary_json, err_sum_json),
        (rc_neither, _o2, err_neither),
        (rc_both, _o3, err_both),
    ) = await asyncio.gather(
        cli("list", "--limit", "2", config=config),
        cli(
            "list",
            "--limit",
            "1",
            "--after",
            i[2],
            "--from",
            "*@corp.test",
            "--json",
            config=config,
        ),
        cli("list", "--from", "scan*@x", config=config),
        cli("summary", config=config),
        cli("summary", "--json", config=config),
        cli("retry", config=config),
        cli("retry", i[0], "--queue", "Unreachable", config=config),
    )
    assert rc_page == 0, err_page
    assert f"RELAYTEST\\{i[0]}" in page and f"RELAYTEST\\{i[1]}" in page
    assert f"RELAYTEST\\{i[2]}" not in page
    assert f"add --after {i[1]}" in page  # the page was full: where the next one starts
    assert rc_json == 0, err_json
    assert [m["QueueId"] for m in json.loads(out_json)] == [i[3]]  # stdout: the JSON list
    assert f"add --after {i[3]}" in err_json
    assert rc_bad == 1 and "from 'scan*@x'" in err_bad and "HTTP 400" in err_bad, err_bad
    assert rc_sum == 0, err_sum
    assert f"RELAYTEST\\{node.queue_a}" in summary and "SmartHostConnectorDelivery" in summary
    assert "RELAYTEST\\Unreachable" in summary and "3 queue(s)." in summary
    assert rc_sum_json == 0, err_sum_json
    counts = {q["NextHopDomain"]: q["MessageCount"] for q in json.loads(summary_json)}
    assert counts == {node.queue_a: 3, node.queue_b: 2, "Unreachable": 1}
    assert rc_neither == 2 and "--queue" in err_neither
    assert rc_both == 2 and "one of the two" in err_both

    (
        (rc_rq, out_rq, err_rq),
        (rc_ru, out_ru, err_ru),
        (rc_missing, _o4, err_missing),
    ) = await asyncio.gather(
        cli("retry", "--queue", f"RELAYTEST\\{node.queue_b}", config=config),
        cli("retry", "--queue", "unreachable", "--json", config=config),
        cli("retry", "--queue", "[127.0.0.1]:1", config=config),
    )
    assert rc_rq == 0, err_rq
    assert f"RELAYTEST\\{node.queue_b}: 2 message(s) queued for an immediate retry" in out_rq
    assert rc_ru == 0 and json.loads(out_ru)["Resubmit"] is True, err_ru
    assert rc_missing == 1 and "not found" in err_missing and "HTTP 404" in err_missing
    await wait_for(lambda: len(node.handler_b.attempts["carol@example.net"]) == 2)


async def test_queue_list_says_nothing_matched_rather_than_the_queue_is_empty(node: Node) -> None:
    """A filter, --after or --limit 0 that selects no message: the queue holds five messages, so
    "The queue is empty." would be untrue; the list says that no message matched."""
    config = node.config
    results = await asyncio.gather(
        cli("list", "--from", "nobody@corp.test", config=config),
        cli("list", "--to", "*@nowhere.example", config=config),
        cli("list", "--status", "Suspended", config=config),
        cli("list", "--after", node.ids[-1], config=config),
        cli("list", "--limit", "0", config=config),
    )
    for rc, out, err in results:
        assert rc == 0, err
        assert out.strip() == "No message matches.", out
    rc, out, err = await cli("list", "--from", "nobody@corp.test", "--json", config=config)
    assert rc == 0 and json.loads(out) == [], err


async def test_get_queue_over_a_large_queue_lets_the_event_loop_run(tmp_path: Path) -> None:
    """Get-Queue (the admin centre's /queue page calls it on every view) works out a view of up
    to 100,000 unfinished messages. That work runs on the event loop of the process serving SMTP:
    it must hand the loop back every few hundred messages, not hold it for seconds."""
    from relaygate.control import QueueControl
    from relaygate.queue.model import Envelope
    from relaygate.queue.sqlite_store import SqliteStore

    config = parse_text(
        f'[server]\nname = "RELAY01"\ndata_dir = "{tmp_path}"\n'
        + send_connector_text("Out", "example.com", 25),
        "<test>",
    )
    store = SqliteStore(tmp_path / "queue.db")
    await store.open()
    try:
        total = 1600
        await asyncio.gather(
            *(
                store.submit(
                    Envelope(f"s{i}@corp.test", [f"r{i}@example.com"], "127.0.0.1", "c"), b"x\r\n"
                )
                for i in range(total)
            )
        )
        control = QueueControl(store, lambda: config)
        views = 0  # messages worked out: the queues of each one's unfinished recipients
        real_queues = control._entry_queues

        def counting_queues(*args: Any, **kw: Any) -> Any:
            nonlocal views
            views += 1
            return real_queues(*args, **kw)

        longest = 0
        stop = False

        async def ticker() -> None:
            nonlocal longest
            last = views
            while not stop:
                await asyncio.sleep(0)
                longest, last = max(longest, views - last), views

        control._entry_queues = counting_queues  # type: ignore[method-assign]
        tick = asyncio.ensure_future(ticker())
        try:
            queues = await control.queues()
            retried = await control.retry_queue(queues["queues"][0]["NextHopDomain"])
        finally:
            stop = True
            await tick
        assert queues["queues"][0]["MessageCount"] == total
        assert retried["RetriedCount"] == total
        assert views >= 2 * total
        assert longest <= 500, f"{longest} messages worked out without yielding the event loop"
    finally:
        await store.close()
