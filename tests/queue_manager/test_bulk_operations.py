"""Bulk operations by filter (Get-Message -Filter | Remove-Message / Suspend-Message /
Resume-Message / Retry-Message) on a running node: the admin API over a real socket, and
`relaygate queue remove|suspend|resume|retry --from/--to/--queue/--status` as a subprocess.
Before, every one of these acted on one message identity at a time only.

The node of test_queue_pages_and_queues: five messages in Retry (one of them Unreachable) from
two scanners and two applications, to sinks A and B that answer 451 to every RCPT."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from relaygate.control import operations
from tests.queue_manager.helpers import (
    ScriptedHandler,
    send,
    start_relay,
    start_sink,
    wait_for,
)
from tests.queue_manager.test_admin_and_cli import MESSAGE, SENDER, admin_url, cli
from tests.queue_manager.test_queue_pages_and_queues import Node, node

__all__ = ["node"]  # the fixture, used by name


async def _statuses(client: httpx.AsyncClient) -> dict[str, str]:
    items = (await client.get("/api/queue")).json()["messages"]
    return {m["QueueId"]: m["Status"] for m in items}


async def test_api_bulk_operations_need_a_filter(node: Node) -> None:
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for action in ("retry", "suspend", "resume", "remove"):
            for params in ({}, {"from": " ", "to": ""}, {"after": node.ids[0]}):
                r = await client.post(f"/api/queue/{action}", params=params)
                assert r.status_code == 400, (action, params, r.text)
                error = r.json()["error"]
                assert "needs at least one filter: from, to, queue, status" in error, error
        for params in (
            {"from": "scan*@x"},
            {"status": "Sleeping"},
            {"queue": "OTHER\\example.com"},
            {"from": "*@x", "with_ndr": "maybe"},
            {"from": "*@x", "dry_run": "perhaps"},
        ):
            r = await client.post("/api/queue/remove", params=params)
            assert r.status_code == 400, (params, r.text)
        r = await client.post("/api/queue/suspend", params={"from": "*@x", "with_ndr": "true"})
        assert r.status_code == 400 and "remove only" in r.json()["error"]
        assert await _statuses(client) == before  # nothing changed


async def test_a_pattern_that_matches_every_address_is_no_filter(node: Node) -> None:
    """``from=*`` or ``to=*@*`` (say ``--from "*$DOMAIN"`` with DOMAIN unset) would act on the
    whole queue, which the required filter is there to prevent: refused, naming the parameter;
    with a real filter next to it, it is taken."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for params in (
            {"from": "*"},
            {"to": "*@*"},
            {"from": "<*>"},
            {"to": "**", "from": "*@*"},
        ):
            r = await client.post("/api/queue/remove", params=params)
            assert r.status_code == 400, (params, r.text)
            error = r.json()["error"]
            assert "needs at least one filter" in error, error
            name = next(iter(params))
            assert f"{name} {params[name]!r} matches every message" in error, error
        assert await _statuses(client) == before  # nothing changed
        r = await client.post(
            "/api/queue/suspend", params={"from": "*", "status": "Retry", "dry_run": "true"}
        )
        assert r.status_code == 200 and r.json()["matched"] == 4, r.text
    rc, _out, err = await cli("remove", "--from", "*", "--yes", config=node.config)
    assert rc == 1 and "from '*' matches every message" in err, err


async def test_a_filter_given_empty_is_refused_not_dropped(node: Node) -> None:
    """``status=Retry&from=`` (``--status Retry --from "$SENDER"`` with SENDER unset) dropped the
    empty ``from`` and acted on every Retry message; now it is refused, naming the filter."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for params in (
            {"status": "Retry", "from": ""},
            {"to": "bob@example.com", "queue": " "},
            {"from": "*@scanners.corp.test", "status": "", "dry_run": "true"},
        ):
            r = await client.post("/api/queue/remove", params=params)
            assert r.status_code == 400, (params, r.text)
            error = r.json()["error"]
            assert "needs at least one filter" in error and "is empty" in error, error
        assert await _statuses(client) == before  # nothing removed
    rc, _out, err = await cli(
        "remove", "--status", "Retry", "--from", "", "--yes", config=node.config
    )
    assert rc == 1 and "from is empty, which is no filter" in err, err
    async with httpx.AsyncClient(base_url=node.url) as client:
        assert await _statuses(client) == before


async def test_a_flag_given_without_a_value_is_true(node: Node) -> None:
    """``POST /api/queue/remove?from=...&dry_run`` (curl, a script) read the bare flag as
    false: instead of listing the matching messages it removed them all. A bare ``dry_run``
    (or ``dry_run=``) is a dry run now, and a bare ``with_ndr`` is an NDR."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for query in ("dry_run", "dry_run=", "with_ndr&dry_run", "dry_run=%20&with_ndr"):
            r = await client.post(f"/api/queue/remove?from=*@scanners.corp.test&{query}")
            assert r.status_code == 200, (query, r.text)
            body = r.json()
            assert (body["dry_run"], body["matched"], body["done"]) == (True, 2, 0), body
            assert body["with_ndr"] is ("with_ndr" in query), (query, body)
        assert await _statuses(client) == before  # nothing removed
        for query in ("dry_run=no", "dry_run=FALSE&with_ndr=0"):
            r = await client.post(f"/api/queue/suspend?from=*@nowhere.test&{query}")
            assert r.status_code == 200 and r.json()["dry_run"] is False, (query, r.text)


async def test_parameters_in_the_body_are_refused_not_ignored(node: Node) -> None:
    """The API reads its query string only: ``curl -X POST '...remove?from=...' -d dry_run=true``
    (or a JSON body) removed every matching message, its dry run unread. A state-changing API
    request with a body is a 400 now, and changes nothing."""
    i = node.ids

    async def chunked() -> AsyncIterator[bytes]:
        yield b"dry_run=true"

    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        query = "/api/queue/remove?from=*@scanners.corp.test"
        for request in (
            client.post(query, data={"dry_run": "true"}),
            client.post(query, json={"dry_run": True}),
            client.post(query, content=chunked()),  # Transfer-Encoding: chunked
            client.request("DELETE", f"/api/queue/{i[0]}", data={"with_ndr": "true"}),
        ):
            r = await request
            assert r.status_code == 400, r.text
            assert "query string" in r.json()["error"], r.text
        assert await _statuses(client) == before  # nothing removed
        r = await client.post(query + "&dry_run=true", content=b"")  # an empty body is none
        assert r.status_code == 200 and r.json()["dry_run"] is True, r.text


async def test_unknown_query_parameters_of_an_action_are_refused(node: Node) -> None:
    """A parameter the route does not read was ignored: ``&dryrun=true`` (misspelt) or
    ``&sender=`` (the filter is ``from``) and the remove went ahead on whatever the other
    filters matched, the whole Retry status for ``status=Retry&sender=...``. A 400 naming it
    now, on every state-changing route, and nothing changes."""
    i = node.ids
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for method, path, params, unknown in (
            (
                "POST",
                "/api/queue/remove",
                {"from": "*@scanners.corp.test", "dryrun": "1"},
                "dryrun",
            ),
            ("POST", "/api/queue/remove", {"status": "Retry", "sender": "x@y.test"}, "sender"),
            ("POST", "/api/queue/suspend", {"to": "bob@example.com", "dry-run": "true"}, "dry-run"),
            ("DELETE", f"/api/queue/{i[0]}", {"withndr": "true"}, "withndr"),
            ("POST", f"/api/queue/{i[0]}/suspend", {"dry_run": "true"}, "dry_run"),
            ("POST", f"/api/queue/{i[0]}/retry", {"queue": "x"}, "queue"),
            ("POST", f"/api/queues/{node.queue_b}/retry", {"dry_run": "true"}, "dry_run"),
        ):
            r = await client.request(method, path, params=params)
            assert r.status_code == 400, (path, params, r.text)
            error = r.json()["error"]
            assert f"unknown query parameter(s) {unknown}: it takes" in error, error
        assert await _statuses(client) == before  # nothing changed


async def test_with_ndr_given_empty_is_refused_not_taken_as_true(node: Node) -> None:
    """``with_ndr=`` (a script's ``with_ndr=$NDR`` with NDR unset) was false until 0c0084f read
    it as the bare flag: the remove went ahead and sent an NDR to every sender, mail that cannot
    be called back. Given empty it is refused, as an empty filter is; the bare ``&with_ndr``
    stays true (and ``dry_run=``, which only ever makes it safer, a dry run)."""
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        for query in ("with_ndr=", "with_ndr=%20&dry_run=false"):
            r = await client.post(f"/api/queue/remove?from=*@scanners.corp.test&{query}")
            assert r.status_code == 400, (query, r.text)
            assert "with_ndr is empty" in r.json()["error"], r.text
        first = next(iter(before))
        r = await client.delete(f"/api/queue/{first}?with_ndr=")
        assert r.status_code == 400 and "with_ndr is empty" in r.json()["error"], r.text
        assert await _statuses(client) == before  # nothing removed, no NDR queued


async def test_api_bulk_suspend_resume_retry_and_remove_by_filter(node: Node) -> None:
    i = node.ids
    server = "RELAYTEST"
    async with httpx.AsyncClient(base_url=node.url) as client:
        # a dry run says what would be suspended, and changes nothing
        r = await client.post(
            "/api/queue/suspend", params={"from": "*@scanners.corp.test", "dry_run": "true"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dry_run"] is True and body["matched"] == 2 and body["done"] == 0
        assert body["identities"] == [f"{server}\\{i[0]}", f"{server}\\{i[1]}"]
        assert set((await _statuses(client)).values()) <= {"Retry", "Unreachable"}

        r = await client.post("/api/queue/suspend", params={"from": "*@scanners.corp.test"})
        body = r.json()
        assert (body["action"], body["matched"], body["done"], body["skipped"]) == (
            "suspend",
            2,
            2,
            [],
        )
        assert body["identities"] == [f"{server}\\{i[0]}", f"{server}\\{i[1]}"]
        assert body["limit_reached"] is False and body["next_after"] is None
        statuses = await _statuses(client)
        assert statuses[i[0]] == statuses[i[1]] == "Suspended" and statuses[i[4]] == "Retry"

        # already suspended: skipped, with the reason; the others are suspended
        r = await client.post("/api/queue/suspend", params={"to": "bob@example.com"})
        body = r.json()
        assert body["matched"] == 2 and body["identities"] == [f"{server}\\{i[4]}"]
        assert body["skipped"] == [{"identity": f"{server}\\{i[0]}", "reason": "already suspended"}]

        # retry by queue: the suspended ones are skipped, the others tried again at once
        attempts = len(node.handler_b.attempts["eve@example.net"])
        r = await client.post("/api/queue/retry", params={"queue": node.queue_b})
        body = r.json()
        assert body["matched"] == 2 and body["identities"] == [f"{server}\\{i[2]}"]
        assert body["skipped"] == [
            {
                "identity": f"{server}\\{i[1]}",
                "reason": "suspended: resume it first (Resume-Message)",
            }
        ]
        await wait_for(lambda: len(node.handler_b.attempts["eve@example.net"]) > attempts)

        # resume the Suspended ones (status filter): all three
        r = await client.post("/api/queue/resume", params={"status": "suspended"})
        body = r.json()
        assert body["done"] == 3 and body["skipped"] == []
        assert body["identities"] == [f"{server}\\{q}" for q in (i[0], i[1], i[4])]

        # Remove-Message -Filter {FromAddress -like 'erp@*'} -WithNDR $false
        r = await client.post("/api/queue/remove", params={"from": "erp@*"})
        body = r.json()
        assert (body["matched"], body["done"], body["ndrs"], body["with_ndr"]) == (2, 2, 0, False)
        assert body["identities"] == [f"{server}\\{i[2]}", f"{server}\\{i[3]}"]
        left = await _statuses(client)
        assert set(left) == {i[0], i[1], i[4]}

        # with NDRs: one per message with undelivered recipients, queued as a new message
        r = await client.post(
            "/api/queue/remove", params={"from": "*@scanners.corp.test", "with_ndr": "true"}
        )
        body = r.json()
        assert (body["done"], body["ndrs"]) == (2, 2), body
        items = (await client.get("/api/queue")).json()["messages"]
        assert i[4] in [m["QueueId"] for m in items]
        dsns = [m for m in items if m["IsDsn"]]
        assert sorted(m["OriginalQueueId"] for m in dsns) == [i[0], i[1]]


async def test_api_bulk_work_is_bounded_per_request(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most MAX_LIST_LIMIT messages per request; the answer says so and where to go on."""
    i = node.ids
    monkeypatch.setattr(operations, "MAX_LIST_LIMIT", 2)
    async with httpx.AsyncClient(base_url=node.url) as client:
        done: list[str] = []
        after = None
        for _round in range(5):
            params = {"from": "*corp.test", "after": after} if after else {"from": "*corp.test"}
            body = (await client.post("/api/queue/suspend", params=params)).json()
            done += [x.rsplit("\\", 1)[1] for x in body["identities"]]
            assert body["matched"] <= 2
            if not body["limit_reached"]:
                assert body["next_after"] is None
                break
            after = body["next_after"]
            assert after == done[-1]
        assert done == i and _round == 2
        assert set((await _statuses(client)).values()) == {"Suspended"}
        # the CLI says where to go on (the server's limit is 2 here)
        rc, out, err = await cli("resume", "--from", "*corp.test", "--yes", config=node.config)
        assert rc == 0 and "2 of 2 message(s) resumed." in out, err
        assert f"run it again with --after {i[1]} (and the same filters)" in out
        rc, out, err = await cli(
            "resume", "--from", "*corp.test", "--after", i[1], "--yes", "--json", config=node.config
        )
        assert rc == 0 and json.loads(out)["identities"] == [
            f"RELAYTEST\\{i[2]}",
            f"RELAYTEST\\{i[3]}",
        ]
        assert f"--after {i[3]}" in err  # on stderr with --json


async def test_api_bulk_remove_skips_a_message_being_delivered(tmp_path: Path) -> None:
    """The single remove answers 409 for an Active message; the bulk remove skips it and says
    why, and removes the others."""
    hold = asyncio.Event()
    internet = ScriptedHandler(lambda a, _n: "451 4.2.0 later" if a.startswith("bob@") else None)
    internet.hold = hold
    a = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": a.port}, queue={"transient_failure_retry_interval": "00:10:00"}
    )
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay)) as http:
            await send(relay, SENDER, ["bob@example.com"], MESSAGE)  # 451: waits in Retry

            async def in_retry() -> bool:
                return list((await _statuses(http)).values()) == ["Retry"]

            await wait_for(in_retry)
            await send(relay, SENDER, ["carol@example.com"], MESSAGE)  # DATA held: Active
            await asyncio.wait_for(internet.data_started.wait(), 10)
            statuses = await _statuses(http)
            assert sorted(statuses.values()) == ["Active", "Retry"]
            active = next(q for q, s in statuses.items() if s == "Active")
            waiting = next(q for q, s in statuses.items() if s == "Retry")
            r = await http.post("/api/queue/remove", params={"from": SENDER})
            assert r.status_code == 200, r.text
            body = r.json()
            assert (body["matched"], body["done"]) == (2, 1)
            assert body["identities"] == [f"RELAYTEST\\{waiting}"]
            [skip] = body["skipped"]
            assert skip["identity"] == f"RELAYTEST\\{active}"
            assert "being delivered now (Active)" in skip["reason"]
            assert list(await _statuses(http)) == [active]
            hold.set()
    finally:
        hold.set()
        await relay.stop()
        await a.close()


async def test_cli_bulk_forms_dry_run_yes_json_and_the_id_forms(node: Node) -> None:
    i, config = node.ids, node.config
    async with httpx.AsyncClient(base_url=node.url) as client:
        before = await _statuses(client)
        (
            (rc_dry, out_dry, err_dry),
            (rc_dry_json, out_dry_json, err_dry_json),
            (rc_none, _o1, err_none),
            (rc_both, _o2, err_both),
            (rc_bad, _o3, err_bad),
        ) = await asyncio.gather(
            cli("remove", "--from", "*@scanners.corp.test", config=config),
            cli("suspend", "--to", "*@example.com", "--json", config=config),
            cli("suspend", config=config),
            cli("resume", i[0], "--status", "Suspended", config=config),
            cli("remove", "--from", "scan*@x", "--yes", config=config),
        )
        assert rc_dry == 0, err_dry
        assert "2 message(s) match: nothing was changed (a dry run)." in out_dry
        assert f"RELAYTEST\\{i[0]}" in out_dry and f"RELAYTEST\\{i[1]}" in out_dry
        assert "Add --yes to remove them." in out_dry
        assert rc_dry_json == 0, err_dry_json
        dry = json.loads(out_dry_json)
        assert dry["dry_run"] is True and dry["matched"] == 3 and dry["done"] == 0
        assert rc_none == 2 and "one of the two" in err_none
        assert rc_both == 2 and "one of the two" in err_both
        assert rc_bad == 1 and "from 'scan*@x'" in err_bad and "HTTP 400" in err_bad
        assert await _statuses(client) == before  # the dry runs changed nothing

        (rc_s, out_s, err_s), (rc_r, out_r, err_r) = await asyncio.gather(
            cli("suspend", "--from", "*@scanners.corp.test", "--yes", config=config),
            cli("retry", "--queue", "Unreachable", "--status", "Unreachable", "-y", config=config),
        )
        assert rc_s == 0 and "2 of 2 message(s) suspended." in out_s, err_s
        assert rc_r == 0 and "1 of 1 message(s) queued for an immediate retry." in out_r, err_r
        statuses = await _statuses(client)
        assert statuses[i[0]] == statuses[i[1]] == "Suspended"

        (rc_again, out_again, err_again), (rc_res, out_res, err_res) = await asyncio.gather(
            cli("suspend", "--to", "bob@example.com", "--yes", config=config),
            cli("resume", "--from", "scan2@scanners.corp.test", "--yes", "--json", config=config),
        )
        assert rc_again == 0, err_again
        assert "1 of 2 message(s) suspended." in out_again
        assert f"RELAYTEST\\{i[0]}: already suspended" in out_again
        assert rc_res == 0, err_res
        resumed = json.loads(out_res)
        assert resumed["identities"] == [f"RELAYTEST\\{i[1]}"] and resumed["done"] == 1

        rc_rm, out_rm, err_rm = await cli(
            "remove", "--from", "erp@*", "--yes", "--with-ndr", "--json", config=config
        )
        assert rc_rm == 0, err_rm
        removed = json.loads(out_rm)
        assert removed["identities"] == [f"RELAYTEST\\{i[2]}", f"RELAYTEST\\{i[3]}"]
        assert removed["with_ndr"] is True and removed["ndrs"] == 2
        # the ID forms are as they were
        rc_one, out_one, err_one = await cli("remove", i[4], config=config)
        assert rc_one == 0 and f"RELAYTEST\\{i[4]}: removed." in out_one, err_one
        rc_res1, out_res1, err_res1 = await cli("resume", i[0], config=config)
        assert rc_res1 == 0 and "resumed" in out_res1, err_res1


async def test_bulk_remove_with_ndr_keeps_no_whole_message_in_memory(tmp_path: Path) -> None:
    """An NDR needs the original's header only: each remove kept the whole message it read
    until its NDR was stored, and the bulk runs 64 of them at once (64 scans of 30 MB, 2 GB)."""
    internet = ScriptedHandler(lambda a, _n: "451 4.2.0 later")
    a = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": a.port}, queue={"transient_failure_retry_interval": "00:10:00"}
    )
    alive = [0, 0]  # whole messages read and still referenced, the most at once

    class Whole(bytes):
        def __del__(self) -> None:
            alive[0] -= 1

    try:
        async with httpx.AsyncClient(base_url=admin_url(relay)) as http:
            for _ in range(12):
                await send(relay, SENDER, ["bob@example.com"], MESSAGE)

            async def all_in_retry() -> bool:
                statuses = list((await _statuses(http)).values())
                return statuses == ["Retry"] * 12

            await wait_for(all_in_retry)
            store = relay.store
            assert store is not None
            read_data = store.read_data

            removed = set(await _statuses(http))

            async def counted(queue_id: str, *, size: int = 0) -> bytes:
                if queue_id not in removed:  # the NDRs, read to be delivered
                    return await read_data(queue_id, size=size)
                data = Whole(await read_data(queue_id, size=size))
                alive[0] += 1
                alive[1] = max(alive)
                return data

            store.read_data = counted  # type: ignore[method-assign]
            r = await http.post("/api/queue/remove", params={"from": SENDER, "with_ndr": "true"})
            body = r.json()
            assert (body["done"], body["ndrs"]) == (12, 12), body
            assert alive[1] <= 2, f"{alive[1]} whole messages held at once"
    finally:
        await relay.stop()
        await a.close()


async def test_a_dry_run_says_what_would_be_skipped(node: Node) -> None:
    """The dry run reads the messages' state as the real call would: an already suspended
    message is listed as skipped, with the reason, not counted as one it would suspend."""
    i, config = node.ids, node.config
    server = "RELAYTEST"
    async with httpx.AsyncClient(base_url=node.url) as client:
        await client.post(f"/api/queue/{i[0]}/suspend")
        before = await _statuses(client)
        r = await client.post(
            "/api/queue/suspend", params={"to": "bob@example.com", "dry_run": "true"}
        )
        body = r.json()
        assert (body["matched"], body["would_do"], body["done"]) == (2, 1, 0)
        assert body["identities"] == [f"{server}\\{i[4]}"]
        assert body["skipped"] == [{"identity": f"{server}\\{i[0]}", "reason": "already suspended"}]
        retry = (
            await client.post(
                "/api/queue/retry", params={"from": "*@scanners.corp.test", "dry_run": "true"}
            )
        ).json()
        assert retry["would_do"] == 1 and retry["identities"] == [f"{server}\\{i[1]}"]
        assert retry["skipped"][0]["reason"] == "suspended: resume it first (Resume-Message)"
        rc, out, err = await cli("resume", "--from", "*@scanners.corp.test", config=config)
        assert rc == 0, err
        assert "2 message(s) match, 1 of them can be resumed: nothing was changed" in out
        assert f"1 would be skipped:\n  {server}\\{i[1]}: not suspended" in out
        assert "Add --yes to resume them." in out
        assert await _statuses(client) == before  # nothing changed
        # the real call skips what the dry run said
        real = (await client.post("/api/queue/suspend", params={"to": "bob@example.com"})).json()
        assert real["identities"] == [f"{server}\\{i[4]}"] and real["skipped"] == body["skipped"]


async def test_the_single_remove_takes_a_bare_with_ndr_as_true(tmp_path: Path) -> None:
    """``DELETE /api/queue/{id}?with_ndr`` removed the message without the NDR it asked for
    (the bare flag read as false); ``with_ndr=no`` still removes without one."""
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 later")
    a = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": a.port}, queue={"transient_failure_retry_interval": "00:10:00"}
    )
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay)) as http:
            for rcpt in ("bob@example.com", "carol@example.com"):
                await send(relay, SENDER, [rcpt], MESSAGE)

            async def both_in_retry() -> list[str] | None:
                statuses = await _statuses(http)
                return list(statuses) if list(statuses.values()) == ["Retry"] * 2 else None

            first, second = await wait_for(both_in_retry)
            with_ndr = await http.delete(f"/api/queue/{first}?with_ndr")
            assert with_ndr.status_code == 200, with_ndr.text
            assert with_ndr.json()["WithNdr"] is True and with_ndr.json()["NdrQueueId"]
            without = await http.delete(f"/api/queue/{second}?with_ndr=no")
            assert without.status_code == 200, without.text
            assert without.json()["WithNdr"] is False and without.json()["NdrQueueId"] is None
            bad = await http.delete(f"/api/queue/{second}?with_ndr=perhaps")
            assert bad.status_code == 400 and "with_ndr" in bad.json()["error"]
    finally:
        await relay.stop()
        await a.close()
