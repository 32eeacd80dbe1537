"""PostgresStore beyond the shared contract (test_store_contract.py): several nodes on one
database, connections lost, a crash of the relay and of the database server. Against a real
PostgreSQL started for the tests (tests/support/postgres.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psycopg
import pytest

from relaygate.queue import model as model_mod
from relaygate.queue import pg_store as pg_store_mod
from relaygate.queue.model import (
    Envelope,
    GraphDraft,
    RecipientState,
    RecipientStatus,
    SendLimit,
    SendWait,
)
from relaygate.queue.pg_store import PostgresStore
from relaygate.queue.store import ClockSkewError, CorruptMessageError, StoreError
from tests.support.postgres import PostgresServer

ROOT = Path(__file__).resolve().parents[2]
DONE = RecipientStatus.DELIVERED


def env(*rcpts: str) -> Envelope:
    return Envelope(sender="app@corp.example", recipients=list(rcpts) or ["user@corp.example"])


@pytest.fixture
async def nodes(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two stores on one database, as two relay nodes would have (opened together: the schema
    is created once, under an advisory lock)."""
    a, b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    await asyncio.gather(a.open(), b.open())
    try:
        yield a, b
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_two_nodes_deliver_every_message_exactly_once(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    """Both nodes receive and lease at once, in several concurrent loops each (as a queue
    manager scans while its sessions submit): no message is leased by two nodes while a lease
    lives, and each is delivered (recorded Delivered) exactly once."""
    a, b = nodes
    total = 300
    delivered: dict[str, str] = {}
    duplicates: list[str] = []
    submitted: list[str] = []

    async def receive(store: PostgresStore, first: int) -> None:
        for i in range(first, total, 2):
            submitted.append(await store.submit(env(f"r{i}@corp.example"), b"m%d" % i))

    async def deliver(store: PostgresStore, owner: str) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            leased = await store.lease_due(owner, time.time(), 60, 7)
            for msg in leased:
                if msg.queue_id in delivered:
                    duplicates.append(msg.queue_id)
                delivered[msg.queue_id] = owner
                done = [
                    RecipientState(r.address, DONE, 1, "250 ok", time.time())
                    for r in msg.recipients
                ]
                await store.record_results(msg.queue_id, owner, done, release=True)
            if not leased:
                if len(delivered) >= total:
                    return
                await asyncio.sleep(0.005)

    await asyncio.gather(
        receive(a, 0),
        receive(b, 1),
        *(deliver(a, f"NODE-A-w{i}") for i in range(3)),
        *(deliver(b, f"NODE-B-w{i}") for i in range(3)),
    )
    assert not duplicates, f"{len(duplicates)} messages leased twice: {duplicates[:5]}"
    assert sorted(delivered) == sorted(submitted) and len(submitted) == total
    owners = set(delivered.values())
    assert any(o.startswith("NODE-A") for o in owners) and any(
        o.startswith("NODE-B") for o in owners
    )
    counts = await a.counts()
    assert counts["delivered"] == total and counts["recipients_pending"] == 0


async def test_a_node_whose_clock_is_ahead_does_not_take_a_live_lease(postgres_url: str) -> None:
    """Leases are compared with the node's clock: a node whose clock ran ahead of the others' by
    more than a lease had left saw a live lease as expired, leased the message as well and
    delivered it a second time. A node off the database server's clock by more than a third of
    a lease (what a renewal every third of a lease keeps in hand) now refuses to lease, naming
    the offset; within that it leases as before."""
    skew = 90.0
    healthy = PostgresStore(postgres_url)
    ahead = PostgresStore(postgres_url, clock=lambda: time.time() + skew)
    await asyncio.gather(healthy.open(), ahead.open())
    try:
        qid = await healthy.submit(env(), b"x")
        leased = await healthy.lease_due("EDGE1", time.time(), 600, 10)
        assert [m.queue_id for m in leased] == [qid]
        with pytest.raises(ClockSkewError, match=r"clock is 9\d s ahead of the queue database"):
            await ahead.lease_due("EDGE2", time.time() + skew, 60, 10)
        got = await healthy.get(qid)
        assert got is not None and got.lease_owner == "EDGE1"
        # 90 s is within a third of a 600 s lease: EDGE1's lease is live, a new message is taken
        fresh = await healthy.submit(env(), b"y")
        taken = await ahead.lease_due("EDGE2", time.time() + skew, 600, 10)
        assert [m.queue_id for m in taken] == [fresh]
    finally:
        await asyncio.gather(healthy.close(), ahead.close())


async def test_a_slow_answer_is_not_taken_for_a_clock_that_is_off(postgres_url: str) -> None:
    """The database server's clock is read somewhere within the round trip of lease_due: a
    round trip as long as a third of a lease (here the lease waits 2.5 s on a table lock) is
    not a clock off by that much, and the node leases as usual."""
    store = PostgresStore(postgres_url)
    await store.open()
    try:
        qid = await store.submit(env(), b"x")
        async with await psycopg.AsyncConnection.connect(postgres_url) as locker:
            await locker.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            leasing = asyncio.create_task(store.lease_due("EDGE1", time.time(), 3, 10))

            async def lease_waits_on_the_lock() -> bool:
                cur = await locker.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                )
                row = await cur.fetchone()
                return row is not None and row[0] > 0

            deadline = time.monotonic() + 10
            while not await lease_waits_on_the_lock():
                assert time.monotonic() < deadline, "lease_due never waited on the lock"
                await asyncio.sleep(0.02)
            await asyncio.sleep(2.5)  # the slow answer itself: time has to pass
            await locker.rollback()
        assert [m.queue_id for m in await leasing] == [qid]
    finally:
        await store.close()


async def test_nodes_in_the_same_millisecond_get_distinct_queue_ids(
    nodes: tuple[PostgresStore, PostgresStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node numbers its messages from the clock: two nodes whose clocks read the same
    millisecond pick the same id, and the second moves past the ids already taken."""
    a, b = nodes
    frozen = time.time()
    monkeypatch.setattr(model_mod.time, "time", lambda: frozen)
    ids = await asyncio.gather(*(s.submit(env(), b"%d" % i) for i, s in enumerate([a, b] * 40)))
    assert len(set(ids)) == 80
    datas = await asyncio.gather(*(b.read_data(q) for q in ids))
    assert datas == [b"%d" % i for i in range(80)]


async def test_results_and_admin_calls_from_two_nodes_do_not_deadlock(
    nodes: tuple[PostgresStore, PostgresStore],
) -> None:
    """Writes to one message lock its row first, then its recipients: one node recording
    results while the other suspends, retries, purges and removes the same messages ends
    without a deadlock (PostgreSQL detects one after 1 s and aborts a transaction, which the
    store runs again: so no transaction may have been run twice)."""
    a, b = nodes
    ids = [await a.submit(env("x@r.example", "y@r.example"), b"m") for _ in range(40)]

    async def results(i: int, qid: str) -> None:
        await a.record_results(
            qid,
            "NODE-A",
            [RecipientState("y@r.example", DONE), RecipientState("x@r.example", DONE)],
            release=True,
        )

    async def admin(i: int, qid: str) -> None:
        if i % 4 == 0:
            await b.remove(qid)
        elif i % 4 == 3:
            await b.purge_completed(time.time() + 1)
        else:
            # KeyError: a purge (i % 4 == 3) took the message once its results completed it
            with contextlib.suppress(KeyError):
                if i % 4 == 1:
                    await b.set_flags(qid, suspended=True)
                else:
                    await b.retry_now(qid)

    await asyncio.gather(
        *(results(i, q) for i, q in enumerate(ids)), *(admin(i, q) for i, q in enumerate(ids))
    )
    for node in (a, b):  # a deadlock is retried (and succeeds), so count the retries too
        assert node.stats()["failed_commits"] == 0, node.stats()
        assert node.stats()["retried_transactions"] == 0, node.stats()


async def test_tampered_bytes_are_detected(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as store:
        qid = await store.submit(env(), b"original bytes")
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(
                "UPDATE message_data SET data = %s WHERE queue_id = %s", (b"tampered bytes", qid)
            )
        with pytest.raises(CorruptMessageError):
            await store.read_data(qid)


async def test_lost_connections_are_replaced_without_failing_a_call(postgres_url: str) -> None:
    """Every connection of the pool dropped by the server (a restart, an administrator, a
    firewall): the next calls run on new connections; nothing was committed by the dropped ones,
    so running them again is safe."""
    async with PostgresStore(postgres_url, min_connections=4) as store:
        first = await asyncio.gather(*(store.submit(env(), b"before %d" % i) for i in range(8)))
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            killed = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert killed and killed[0] >= 1
        after = await asyncio.gather(*(store.submit(env(), b"after %d" % i) for i in range(8)))
        assert store.stats()["retried_transactions"] >= 1
        datas = await asyncio.gather(*(store.read_data(q) for q in first + after))
        assert datas == [b"before %d" % i for i in range(8)] + [b"after %d" % i for i in range(8)]


def _server_processes(server: PostgresServer) -> list[int]:
    """The postmaster of ``server`` and its children (backends, walwriter...)."""
    master = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == master:
                children.append(int(stat.parent.name))
    return [master, *children]


async def test_a_database_that_stops_answering_fails_the_call_and_close_returns() -> None:
    """A hung database server (SIGSTOP here; a dropped network alike) answers nothing: the call
    fails with a StoreError (the session's 451) instead of holding its client, and close()
    (the relay's stop) does not wait for it forever."""
    with PostgresServer() as server:
        store = PostgresStore(server.create_database())
        store.call_timeout = 2
        await store.open()
        await store.submit(env(), b"before")
        pids = _server_processes(server)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not answer within 2 s"):
                await asyncio.wait_for(store.submit(env(), b"during"), 30)
            assert time.monotonic() - started < 20
            await asyncio.wait_for(store.close(), 20)
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)


async def test_a_message_over_512_mb_reads_back(postgres_url: str) -> None:
    """bytea read as text is hex, twice the size: past 512 MB the server cannot build it
    ("invalid memory alloc request size") and an acknowledged message was never delivered."""
    size = 513 * 1024 * 1024
    data = bytearray(size)
    data[-7:] = b"the end"
    async with PostgresStore(postgres_url) as store:
        qid = await store.submit(env(), data)
        del data
        back = await store.read_data(qid)
        assert len(back) == size and back.endswith(b"the end")


async def test_a_busy_database_is_waited_for_not_refused(postgres_url: str) -> None:
    """More concurrent submits than the pool has connections, on a database that answers but
    slowly (a trigger sleeps 0.5 s per message): the submits queue for a connection longer than
    connect_timeout; none may fail for that (a 451 for mail the database would have taken)."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        async with PostgresStore(postgres_url):
            pass  # the schema
        conn.execute(
            "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN PERFORM pg_sleep(0.5); RETURN NEW; END $$"
        )
        conn.execute(
            "CREATE TRIGGER slow BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION slow()"
        )
    async with PostgresStore(postgres_url, max_connections=2, connect_timeout=1) as store:
        results = await asyncio.gather(
            *(store.submit(env(), b"m%d" % i) for i in range(8)), return_exceptions=True
        )
        assert all(isinstance(r, str) for r in results), results


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # an unencoded "/" in the password: libpq takes "Tr0ub" for the port, "4dor@..." for
        # the database name
        ("postgresql://127.0.0.1:Tr0ub/4dor@127.0.0.1:1/queue", "postgresql://127.0.0.1@127.0.0.1:1/queue"),
        ("postgresql://relay:Tr0ub?4dor@127.0.0.1:1/queue", "postgresql://relay@127.0.0.1:1/queue"),
        ("postgresql://relay@127.0.0.1:1/queue?password=Tr0ub4dor", "postgresql://relay@127.0.0.1:1/queue"),
        ("host=127.0.0.1 port=1 user=relay password=Tr0ub4dor", "postgresql://relay@127.0.0.1:1/"),
    ],
)  # fmt: skip
async def test_a_password_libpq_misreads_is_not_shown_either(url: str, shown: str) -> None:
    store = PostgresStore(url, connect_timeout=1)
    assert "Tr0ub" not in repr(store) and "4dor" not in repr(store)
    with pytest.raises(StoreError) as info:
        await store.open()
    text = str(info.value)
    assert text.startswith(f"cannot connect to the queue database {shown}: "), text
    assert "Tr0ub" not in text and "4dor" not in text, text


async def test_a_newer_schema_is_refused(postgres_url: str) -> None:
    async with PostgresStore(postgres_url):
        pass
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE relaygate_schema SET version = 99")
    with pytest.raises(StoreError, match="schema version 99 is newer than this RelayGate"):
        await PostgresStore(postgres_url).open()
    assert schema_numbers(postgres_url) == (99, pg_store_mod.SCHEMA_LAYOUT)


def schema_numbers(url: str) -> tuple[int, int]:
    """relaygate_schema's one row: (version, every release checks it; layout)."""
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT version, layout FROM relaygate_schema").fetchall()
    assert len(rows) == 1, rows
    return rows[0][0], rows[0][1]


async def test_a_queue_of_the_previous_release_is_upgraded_in_place(postgres_url: str) -> None:
    """A queue of the release before send budgets (version 1, no send_log, no layout column):
    its messages stay, send_log and graph_drafts are added, and its version stays 1, so nodes of
    that release can still open it (both are additive: only the layout goes to 4;
    test_schema_compat.py runs that release)."""
    async with PostgresStore(postgres_url) as store:
        qid = await store.submit(env("a@x.example"), b"kept")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP TABLE send_log")
        conn.execute("DROP TABLE graph_drafts")
        conn.execute("ALTER TABLE relaygate_schema DROP COLUMN layout")
        conn.execute("UPDATE relaygate_schema SET version = 1")
    async with PostgresStore(postgres_url) as store:
        assert await store.read_data(qid) == b"kept"
        limit = [SendLimit(60.0, max_messages=1)]
        assert await store.reserve_send("m365", 1000.0, 1, limit) is None
        assert await store.reserve_send("m365", 1001.0, 1, limit) == SendWait(1060.0, limit[0])
        await store.save_graph_draft(qid, "r", GraphDraft("m@x.example", "d1"))
    assert schema_numbers(postgres_url) == (1, 4)
    async with PostgresStore(postgres_url) as store:  # again, with the tables there
        assert await store.reserve_send("m365", 1002.0, 1, limit) == SendWait(1060.0, limit[0])
        assert await store.graph_draft(qid, "r") == GraphDraft("m@x.example", "d1")
    assert schema_numbers(postgres_url) == (1, 4)


async def test_a_layout_3_queue_gets_graph_drafts_message_id_and_its_release_still_writes(
    postgres_url: str,
) -> None:
    """A queue of the release before graph_drafts.message_id (layout 3): the column is added
    (its records read with no Message-ID), the version stays, and that release's upsert, which
    does not name the column, still works."""
    async with PostgresStore(postgres_url) as store:
        qid = await store.submit(env("a@x.example"), b"kept")
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE graph_drafts DROP COLUMN message_id")
        conn.execute("UPDATE relaygate_schema SET layout = 3")
        conn.execute(
            "INSERT INTO graph_drafts (queue_id, route, mailbox, draft_id, sending) "
            "VALUES (%s, 'old', 'm@x.example', 'd0', true)",
            (qid,),
        )
    async with PostgresStore(postgres_url) as store:
        assert await store.graph_draft(qid, "old") == GraphDraft("m@x.example", "d0", True)
        await store.save_graph_draft(qid, "r", GraphDraft("m@x.example", "", True, "<a@x.example>"))
    assert schema_numbers(postgres_url) == (pg_store_mod.SCHEMA_VERSION, 4)
    with psycopg.connect(postgres_url, autocommit=True) as conn:  # the layout 3 release's write
        conn.execute(
            "INSERT INTO graph_drafts (queue_id, route, mailbox, draft_id, sending) "
            "SELECT %s, 'r2', 'm@x.example', 'd2', false "
            "ON CONFLICT (queue_id, route) DO UPDATE SET mailbox = excluded.mailbox, "
            "draft_id = excluded.draft_id, sending = excluded.sending",
            (qid,),
        )
    async with PostgresStore(postgres_url) as store:
        assert await store.graph_drafts(qid) == {
            "old": GraphDraft("m@x.example", "d0", True),
            "r": GraphDraft("m@x.example", "", True, "<a@x.example>"),
            "r2": GraphDraft("m@x.example", "d2"),
        }


async def test_a_newer_additive_layout_is_used_as_it_is(postgres_url: str) -> None:
    """A later release's additive change (a table this one does not know, layout above
    SCHEMA_LAYOUT, the same version) does not lock this release out, and is not undone."""
    async with PostgresStore(postgres_url):
        pass
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE later (x integer)")
        conn.execute("UPDATE relaygate_schema SET layout = 99")
    async with PostgresStore(postgres_url) as store:
        qid = await store.submit(env(), b"later")
        assert await store.read_data(qid) == b"later"
    assert schema_numbers(postgres_url) == (pg_store_mod.SCHEMA_VERSION, 99)


async def test_an_unreachable_database_is_named_without_its_password() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = PostgresStore(f"postgresql://relay:s3cret@127.0.0.1:{port}/queue", connect_timeout=2)
    with pytest.raises(StoreError) as info:
        await store.open()
    text = str(info.value)
    assert text.startswith(
        f"cannot connect to the queue database postgresql://relay@127.0.0.1:{port}/queue"
    )
    assert "s3cret" not in text and "s3cret" not in repr(store)


# --------------------------------------------------------------------------- crashes

CHILD_SRC = r"""
import asyncio, itertools, os, sys
from relaygate.queue.model import Envelope
from relaygate.queue.pg_store import PostgresStore

def payload(n):
    return b"Message-ID: <%d>\r\n\r\n" % n + bytes([n % 256]) * (100 + (n * 37) % 20000)

async def main():
    store = PostgresStore(sys.argv[1])
    await store.open()
    counter = itertools.count()
    async def session():
        while True:
            n = next(counter)
            try:
                qid = await store.submit(Envelope(sender="", recipients=[f"r{n}@x"]), payload(n))
            except Exception:   # the database went away: this one was not acknowledged
                await asyncio.sleep(0.05)
                continue
            os.write(1, f"{qid} {n}\n".encode())   # only after submit() returned
    os.write(1, b"READY\n")
    await asyncio.gather(*(session() for _ in range(8)))

asyncio.run(main())
"""


def payload(n: int) -> bytes:
    return b"Message-ID: <%d>\r\n\r\n" % n + bytes([n % 256]) * (100 + (n * 37) % 20000)


def _submit_until_killed(url: str, kill: callable, after: float) -> list[tuple[str, int]]:  # type: ignore[valid-type]
    """Run CHILD_SRC (8 concurrent submitters), call ``kill(proc)`` after ``after`` seconds, and
    return the (queue id, n) pairs it reported as acknowledged."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    chunks: list[bytes] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        while b := os.read(proc.stdout.fileno(), 65536):
            chunks.append(b)
            if b"READY\n" in b"".join(chunks[:2]) or b"READY\n" in b:
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(15), proc.stderr.read() if proc.stderr else b""
        time.sleep(after)
        kill(proc)
    finally:
        if proc.poll() is None:
            time.sleep(1)
            proc.kill()
        proc.wait(10)
        reader.join(10)
    acked = []
    for line in b"".join(chunks).decode().split("\n")[:-1]:  # a torn last line is dropped
        if line != "READY":
            qid, n = line.split()
            acked.append((qid, int(n)))
    return acked


async def _check_all_there(url: str, acked: list[tuple[str, int]]) -> None:
    async with PostgresStore(url) as store:
        stored = {m.queue_id for m in await store.list_messages(limit=1_000_000)}
        lost = [qid for qid, _ in acked if qid not in stored]
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged messages lost"
        datas = await asyncio.gather(*(store.read_data(qid) for qid, _ in acked))
        for (qid, n), data in zip(acked, datas, strict=True):
            assert data == payload(n), qid


async def test_sigkill_of_the_relay_never_loses_an_acknowledged_message(postgres_url: str) -> None:
    acked: list[tuple[str, int]] = []
    for delay in (0.4, 0.9):
        got = await asyncio.to_thread(
            _submit_until_killed, postgres_url, lambda p: os.kill(p.pid, signal.SIGKILL), delay
        )
        assert got, "nothing was acknowledged"
        acked += got
        await _check_all_there(postgres_url, acked)


def _wal_writer(server: PostgresServer) -> int:
    master = int((server.data_dir / "postmaster.pid").read_text().split()[0])
    for pid in _server_processes(server)[1:]:
        with contextlib.suppress(OSError):
            if b"walwriter" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
    raise AssertionError(f"no walwriter under postmaster {master}")


async def _crash_after(server: PostgresServer, call: Callable[[], Awaitable[object]]) -> None:
    """Run ``call`` with the server's WAL writer stalled, then crash the server: what the call
    committed survives only if its COMMIT waited for the WAL flush itself."""
    wal_writer = _wal_writer(server)
    os.kill(wal_writer, signal.SIGSTOP)
    try:
        await call()
    finally:
        os.kill(wal_writer, signal.SIGKILL)  # the postmaster resets: every backend ends
        # (SIGKILL ends a stopped process too; the postmaster may have reaped it already)
    server.crash()
    server.restart()


async def test_an_acknowledged_submit_is_durable_even_with_synchronous_commit_off() -> None:
    """synchronous_commit = off on the server, the database or the role (a common tuning)
    must not make a 250 a promise the database forgets in a crash."""
    with PostgresServer() as server:
        url = server.create_database()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER ROLE relaygate SET synchronous_commit = off")
        store = PostgresStore(url)
        await store.open()
        acked: list[str] = []

        async def submit() -> None:
            acked.append(await store.submit(env(), b"acknowledged"))

        await _crash_after(server, submit)
        await store.close()
        async with PostgresStore(url) as again:
            assert await again.read_data(acked[0]) == b"acknowledged"


async def test_a_recorded_delivery_survives_a_crash_of_the_database_server() -> None:
    """The Store contract: a recipient recorded as Delivered is never handed out for delivery
    again, even after a crash (of the database server too)."""
    with PostgresServer() as server:
        url = server.create_database()
        store = PostgresStore(url)
        await store.open()
        qid = await store.submit(env(), b"x")
        now = time.time()
        assert [m.queue_id for m in await store.lease_due("A", now, 60, 10)] == [qid]
        delivered = RecipientState("user@corp.example", DONE, attempts=1, last_attempt=now)

        async def record() -> None:
            await store.record_results(qid, "A", [delivered], release=True)

        await _crash_after(server, record)
        await store.close()
        async with PostgresStore(url) as again:
            assert await again.lease_due("B", time.time(), 60, 10) == []
            msg = await again.get(qid)
            assert msg is not None and [r.status for r in msg.recipients] == [DONE]


async def test_a_lease_survives_a_crash_of_the_database_server() -> None:
    """Every mutating call is durable (the Store contract), leases included: a lease the
    database forgot in a crash would let a second node deliver a message the first one is
    still delivering."""
    with PostgresServer() as server:
        url = server.create_database()
        store = PostgresStore(url)
        await store.open()
        qid = await store.submit(env(), b"x")
        now = time.time()

        async def lease() -> None:
            assert [m.queue_id for m in await store.lease_due("A", now, 600, 10)] == [qid]

        await _crash_after(server, lease)
        await store.close()
        async with PostgresStore(url) as again:
            assert await again.lease_due("B", time.time(), 60, 10) == []
            msg = await again.get(qid)
            assert msg is not None and msg.lease_owner == "A"


async def test_a_crash_of_the_database_server_loses_no_acknowledged_message() -> None:
    """The database server stops as in a crash (no shutdown checkpoint) while 8 submitters
    run: after crash recovery every submit that returned is there, byte for byte. Its own
    server, so that the crash does not reach the other tests' databases."""
    with PostgresServer() as server:
        url = server.create_database()

        def crash(_proc: subprocess.Popen[bytes]) -> None:
            server.crash()

        acked = await asyncio.to_thread(_submit_until_killed, url, crash, 0.8)
        assert acked, "nothing was acknowledged before the crash"
        server.restart()
        await _check_all_there(url, acked)


def test_a_database_error_never_carries_a_piece_of_the_password() -> None:
    """A reconnect's error can quote a misparsed URL (a password with an unencoded '/' read as
    a host name): the StoreError a session logs and /healthz shows leaves it out."""
    from relaygate.queue.pg_connection import _wrap_error

    url = "postgresql://relay:Tr0ub/4dor@db.corp.example/queue"
    exc = psycopg.OperationalError('could not translate host name "Tr0ub" to address')
    text = str(_wrap_error(exc, url))
    assert "Tr0ub" not in text and "4dor" not in text, text
    assert text.startswith("queue database error: could not translate host name")


async def test_a_big_message_gets_time_for_its_octets_not_only_the_call_timeout(
    postgres_url: str,
) -> None:
    """call_timeout (30 s) bounds a transaction whatever it carries: a message near the 1023 MB
    limit needs more than ~34 MB/s to the database to be stored or read back within it, and on a
    slower link got a 451 at every attempt, or was stored and never read back (never
    delivered). Submit and read now get the call timeout plus time for their octets (2 MiB/s).
    Here a call timeout far too short for 64 MB shows it (0.7 s on loopback here)."""
    store = PostgresStore(postgres_url, call_timeout=0.2)
    await store.open()
    try:
        data = b"Subject: big\r\n\r\n" + os.urandom(64 * 1024 * 1024)
        queue_id = await store.submit(env(), data)
        assert await store.read_data(queue_id, size=len(data)) == data
        assert await store.read_data(queue_id) == data  # the size read first when not given
    finally:
        await store.close()
