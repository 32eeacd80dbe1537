"""A queue this release opened stays usable by the previous release (rolling upgrade of a cluster,
rollback of one node), run for real: the previous release's own store code (``OLD_RELEASE``,
extracted with ``git archive``) runs in a subprocess against the same database, on both engines.

The rule it checks (sqlite_schema.py and pg_schema.py, "Schema versions"): the checked version only
goes up for a change older code cannot tolerate; send_log, added by this release, is additive, so
the previous release must open the queue, take mail and deliver it, and simply not pace.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relaygate.queue.model import Envelope, GraphDraft, SendLimit, SendWait
from relaygate.queue.pg_store import PostgresStore
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import Store

ROOT = Path(__file__).resolve().parents[2]
#: The release before send_log: it refuses a queue whose checked version is above its own
#: (SQLite user_version 2, PostgreSQL relaygate_schema.version 1).
OLD_RELEASE = "5cc955048815ce15253b90f82cda554d557bdabc"
OLD_VERSION = {"sqlite": 2, "postgresql": 1}

#: A node of the previous release: opens the queue, removes the messages named after its
#: arguments, submits one message and goes through the admin's reads and operations on it,
#: leases every due one and records it delivered; prints what it did as JSON.
OLD_NODE = r"""
import asyncio, json, sys, time
import relaygate
from relaygate.queue.model import Envelope, RecipientState, RecipientStatus

engine, where, old_src, *doomed = sys.argv[1:]
assert relaygate.__file__.startswith(old_src), relaygate.__file__  # not this release's code


async def main():
    if engine == "sqlite":
        from relaygate.queue.sqlite_store import SqliteStore as Store
    else:
        from relaygate.queue.pg_store import PostgresStore as Store
    async with Store(where) as store:
        removed = [qid for qid in doomed if await store.remove(qid) is not None]
        qid = await store.submit(Envelope("old@corp.example", ["user@corp.example"]), b"old node")
        # the rest of what an admin does, on a message of its own
        assert (await store.get(qid)).sender == "old@corp.example"
        assert await store.read_data(qid) == b"old node"
        assert qid in {m.queue_id for m in await store.list_messages()}
        assert sum((await store.counts()).values()) >= 1
        await store.set_flags(qid, suspended=True)
        await store.set_flags(qid, suspended=False)
        await store.retry_now(qid)
        leased = await store.lease_due("old-node", time.time(), 60, 100)
        ids = [msg.queue_id for msg in leased]
        assert await store.renew_leases("old-node", ids, time.time() + 60) == len(ids)
        for msg in leased:
            done = [
                RecipientState(r.address, RecipientStatus.DELIVERED, 1, "250 ok", time.time())
                for r in msg.recipients
            ]
            await store.record_results(msg.queue_id, "old-node", done, release=True)
    print(json.dumps({"submitted": qid, "delivered": sorted(ids), "removed": removed}))


asyncio.run(main())
"""


@pytest.fixture(scope="session")
def old_release_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The previous release's ``src`` directory."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the previous release's code is not at hand")
    out = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", OLD_RELEASE, "src"],
        capture_output=True,
        check=False,
    )
    if out.returncode:
        pytest.fail(
            f"git archive {OLD_RELEASE} failed (a shallow clone? fetch that commit): "
            f"{out.stderr.decode(errors='replace')}",
            pytrace=False,
        )
    dest = tmp_path_factory.mktemp("old-release")
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        tar.extractall(dest, filter="data")
    return dest / "src"


def run_old_node(old_src: Path, engine: str, where: str, *doomed: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(old_src)}  # ahead of this checkout's editable install
    proc = subprocess.run(
        [sys.executable, "-c", OLD_NODE, engine, where, str(old_src), *doomed],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"the previous release failed:\n{proc.stderr}"
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def checked_version(engine: str, where: str) -> int:
    """The version the previous release compares with its own at open."""
    if engine == "sqlite":
        conn = sqlite3.connect(where)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    with psycopg.connect(where, autocommit=True) as pg:
        row = pg.execute("SELECT max(version) FROM relaygate_schema").fetchone()
    assert row is not None
    return int(row[0])


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str, Callable[[], Store]]:
    """(engine, the queue's path or URL, a factory of this release's store on it)."""
    if request.param == "sqlite":
        path = tmp_path / "data" / "queue" / "queue.db"
        path.parent.mkdir(parents=True)
        return "sqlite", str(path), lambda: SqliteStore(path)
    url = request.getfixturevalue("postgres_url")
    return "postgresql", url, lambda: PostgresStore(url)


async def test_the_previous_release_keeps_working_on_a_queue_this_release_opened(
    old_release_src: Path, engine: tuple[str, str, Callable[[], Store]]
) -> None:
    """previous release creates the queue → this release upgrades it in place and paces → the
    previous release opens it again (a node rolled back, or not yet upgraded), takes mail and
    delivers → this release still finds everything, its send records included. With PostgreSQL
    the new node stays open meanwhile: two nodes of two releases on one queue."""
    name, where, make = engine
    old = OLD_VERSION[name]
    limit = [SendLimit(60.0, max_messages=1)]

    first = await asyncio.to_thread(run_old_node, old_release_src, name, where)
    assert first["delivered"] == [first["submitted"]]
    assert checked_version(name, where) == old

    store = make()
    await store.open()  # a queue created by the previous release: upgraded in place
    try:
        assert await store.read_data(first["submitted"]) == b"old node"
        assert await store.reserve_send("m365", 1000.0, 1, limit) is None
        assert await store.reserve_send("m365", 1001.0, 1, limit) == SendWait(1060.0, limit[0])
        mine = await store.submit(Envelope("new@corp.example", ["user@corp.example"]), b"new")
        await store.save_graph_draft(mine, "Graph\nuser@corp.example", GraphDraft("m@x", "d1"))
        doomed = await store.submit(Envelope("new@corp.example", ["x@corp.example"]), b"gone")
        sendmail = GraphDraft("m@x", "", True, "<1@corp.example>")  # this release's column
        await store.save_graph_draft(doomed, "\nGraph\nx@corp.example", sendmail)
        assert checked_version(name, where) == old  # what the previous release accepts
        if name == "sqlite":  # one node: the previous release runs after this one stopped
            await store.close()

        second = await asyncio.to_thread(run_old_node, old_release_src, name, where, doomed)
        assert second["removed"] == [doomed]
        assert second["delivered"] == sorted([mine, second["submitted"]])
        assert checked_version(name, where) == old

        if name == "sqlite":
            store = make()
            await store.open()  # the table is there already this time
        for qid in (mine, second["submitted"]):
            msg = await store.get(qid)
            assert msg is not None and msg.status.value == "Delivered", msg
        assert await store.graph_draft(mine, "Graph\nuser@corp.example") == GraphDraft("m@x", "d1")
        assert await store.get(doomed) is None
        assert await store.graph_drafts(doomed) == {}  # removed by the previous release: with it
        # the previous release left the send records alone: the budget is still spent
        assert await store.reserve_send("m365", 1002.0, 1, limit) == SendWait(1060.0, limit[0])
        assert await store.purge_completed(time.time() + 1) == 3
        assert await store.graph_draft(mine, "Graph\nuser@corp.example") is None  # with it
    finally:
        await store.close()
