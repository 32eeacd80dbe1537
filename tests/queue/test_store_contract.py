"""The ``Store`` contract (queue/store.py), run against both engines: SQLite and a real
PostgreSQL server started for the tests (DESIGN.md: one interface, two implementations, the same
test suite). What only one engine has (SQLite's group commit, WAL and spool files; PostgreSQL's
several nodes) is tested in test_sqlite_store.py and test_pg_store.py."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from relaygate.queue import model as model_mod
from relaygate.queue.model import (
    SEND_LOG_RETENTION,
    Envelope,
    GraphDraft,
    RecipientState,
    RecipientStatus,
    SendLimit,
    SendWait,
    StoredMessage,
)
from relaygate.queue.pg_store import PostgresStore
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import Store, StoreClosedError

QID = re.compile(r"^[0-9A-F]{16}$")
R, D, DONE, F, S = (
    RecipientStatus.READY,
    RecipientStatus.DEFERRED,
    RecipientStatus.DELIVERED,
    RecipientStatus.FAILED,
    RecipientStatus.SUSPENDED,
)


def env(*rcpts: str, sender: str = "app@corp.example", **kw: object) -> Envelope:
    return Envelope(sender=sender, recipients=list(rcpts) or ["user@corp.example"], **kw)  # type: ignore[arg-type]


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Makes a store (not yet opened) on the same queue each time: a restarted relay."""
    if request.param == "sqlite":
        path = tmp_path / "data" / "queue" / "queue.db"
        return lambda: SqliteStore(path)
    url = request.getfixturevalue("postgres_url")
    return lambda: PostgresStore(url)


@pytest.fixture
async def store(new_store: Callable[[], Store]) -> AsyncIterator[Store]:
    s = new_store()
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def status_of(msg: StoredMessage) -> dict[str, RecipientStatus]:
    return {r.address: r.status for r in msg.recipients}


PAYLOADS = {
    "empty": b"",
    "nul": b"Subject: x\r\n\r\nbefore\x00after\x00\x00\r\n",
    "eight_bit": bytes(range(256)) * 4,
    "lone_cr_lf": b"a\rb\nc\r\r\n\n.\r\n..\r\n\r.\n",
    "utf8_headers": "Subject: Grüße – 請求書\r\n\r\nÄÖÜ\r\n".encode(),
    "five_mb": random.Random(7).randbytes(5 * 1024 * 1024),
}


async def test_round_trip_is_byte_identical(store: Store) -> None:
    ids = {}
    for name, data in PAYLOADS.items():
        ids[name] = await store.submit(env(message_id=f"<{name}@t>"), data)
    for name, data in PAYLOADS.items():
        got = await store.read_data(ids[name])
        assert type(got) is bytes
        assert got == data, name
        msg = await store.get(ids[name])
        assert msg is not None and msg.size == len(data) and msg.message_id == f"<{name}@t>"


async def test_read_head_is_the_first_bytes_of_the_message(store: Store) -> None:
    """The view of one message reads its header only (``read_head``): the first ``limit`` bytes
    as stored, all of a shorter message, in each engine and from a spool file alike."""
    ids = {name: await store.submit(env(), data) for name, data in PAYLOADS.items()}
    for name, data in PAYLOADS.items():
        # up to what max_header_size allows (2 GB) and the Received field's room: past an int4
        for limit in (0, 1, 17, 64 * 1024, len(data), len(data) + 100, 2**31 + 8192):
            got = await store.read_head(ids[name], limit)
            assert type(got) is bytes
            assert got == data[:limit], (name, limit)
    with pytest.raises(ValueError, match="read_head limit"):
        await store.read_head(ids["nul"], -1)


async def test_submit_accepts_bytearray_and_memoryview(store: Store) -> None:
    a = await store.submit(env(), bytearray(b"abc\x00"))
    b = await store.submit(env(), memoryview(b"xyz\r"))
    assert await store.read_data(a) == b"abc\x00"
    assert await store.read_data(b) == b"xyz\r"
    with pytest.raises(TypeError):
        await store.submit(env(), "text")  # type: ignore[arg-type]


async def test_envelope_fields_are_stored(store: Store) -> None:
    e = Envelope(
        sender="",
        recipients=["a@x.example", "b@y.example", "a@x.example"],
        client_ip="10.0.0.5",
        connector="SMTP Relay Internal",
        helo="printer01",
        auth_user="CORP\\scanner",
        message_id="<1@printer01>",
        metadata={"tls": "TLSv1.3", "note": "ünïcode"},
    )
    before = time.time()
    qid = await store.submit(e, b"data")
    msg = await store.get(qid)
    assert msg is not None
    assert QID.match(qid) and msg.queue_id == qid
    assert msg.sender == ""
    assert [r.address for r in msg.recipients] == ["a@x.example", "b@y.example"]  # deduplicated
    assert all(r.status is R and r.attempts == 0 and r.next_attempt is None for r in msg.recipients)
    assert (msg.client_ip, msg.connector, msg.helo, msg.auth_user, msg.message_id) == (
        "10.0.0.5",
        "SMTP Relay Internal",
        "printer01",
        "CORP\\scanner",
        "<1@printer01>",
    )
    assert msg.metadata == {"tls": "TLSv1.3", "note": "ünïcode"}
    assert before <= msg.received_at <= time.time()
    assert not msg.suspended and not msg.delay_notified
    assert msg.lease_owner is None and msg.lease_until is None
    assert msg.status is R


async def test_envelope_without_recipients_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.submit(Envelope(sender="a@b", recipients=[]), b"x")
    assert (await store.counts())["messages"] == 0


async def test_queue_ids_unique_and_time_ordered(store: Store) -> None:
    ids = await asyncio.gather(*(store.submit(env(), b"x") for _ in range(300)))
    assert len(set(ids)) == 300 and all(QID.match(i) for i in ids)
    seq = [await store.submit(env(), b"y") for _ in range(20)]
    assert seq == sorted(seq) and seq[0] > max(ids)
    listed = [m.queue_id for m in await store.list_messages(limit=10_000)]
    assert listed == sorted(listed) and len(listed) == 320


async def test_ids_stay_ordered_across_restart_with_clock_behind(
    new_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with new_store() as s:
        first = await s.submit(env(), b"1")
    real = time.time
    monkeypatch.setattr(model_mod.time, "time", lambda: real() - 3600)  # clock one hour behind
    async with new_store() as s:
        second = await s.submit(env(), b"2")
        assert second > first
        assert await s.read_data(first) == b"1"


async def test_close_flushes_queued_work_then_refuses(new_store: Callable[[], Store]) -> None:
    s = new_store()
    await s.open()
    pending = [asyncio.ensure_future(s.submit(env(), b"late %d" % i)) for i in range(50)]
    await asyncio.sleep(0)  # let them reach the writer queue
    await s.close()
    ids = [await p for p in pending]
    with pytest.raises(StoreClosedError):
        await s.submit(env(), b"after close")
    with pytest.raises(StoreClosedError):
        await s.get(ids[0])
    async with new_store() as s2:
        for i, qid in enumerate(ids):
            assert await s2.read_data(qid) == b"late %d" % i


async def test_two_owners_never_get_the_same_message(store: Store) -> None:
    ids = {await store.submit(env(), b"%d" % i) for i in range(30)}
    now = time.time()
    a, b = await asyncio.gather(
        store.lease_due("node-a", now, 60, limit=20), store.lease_due("node-b", now, 60, limit=20)
    )
    got_a, got_b = {m.queue_id for m in a}, {m.queue_id for m in b}
    assert not (got_a & got_b)
    assert got_a | got_b == ids
    assert all(m.lease_owner == "node-a" and m.lease_until == now + 60 for m in a)
    assert await store.lease_due("node-c", now + 1, 60, limit=100) == []
    assert (await store.counts())["active"] == 30


async def test_expired_lease_can_be_taken_over(store: Store) -> None:
    qid = await store.submit(env(), b"x")
    t = time.time()
    assert [m.queue_id for m in await store.lease_due("a", t, 30, 10)] == [qid]
    assert await store.lease_due("b", t + 29, 30, 10) == []
    taken = await store.lease_due("b", t + 31, 30, 10)
    assert [m.queue_id for m in taken] == [qid] and taken[0].lease_owner == "b"
    # the old owner cannot release the new owner's lease
    await store.release(qid, "a")
    got = await store.get(qid)
    assert got is not None and got.lease_owner == "b"
    await store.release(qid, "b")
    got = await store.get(qid)
    assert got is not None and got.lease_owner is None and got.lease_until is None
    assert [m.queue_id for m in await store.lease_due("c", t + 32, 30, 10)] == [qid]


async def test_renewing_extends_only_the_leases_the_owner_still_holds(store: Store) -> None:
    """A delivery longer than a lease keeps it by renewing; another owner's lease is not touched,
    and nothing is leased that was not."""
    mine, taken, free = [await store.submit(env(), b"%d" % i) for i in range(3)]
    t = time.time()
    await store.lease_due("a", t, 30, 2)  # mine and taken, in queue-id order
    assert [m.queue_id for m in await store.lease_due("b", t + 31, 30, 1)] == [mine]
    # "b" took `mine` after "a"'s lease ran out; "a" still holds `taken`
    assert await store.renew_leases("a", [mine, taken, free], t + 100) == 1
    assert await store.renew_leases("a", [], t + 100) == 0
    got = {m.queue_id: m for m in await store.list_messages()}
    assert (got[taken].lease_owner, got[taken].lease_until) == ("a", t + 100)
    assert (got[mine].lease_owner, got[mine].lease_until) == ("b", t + 61)
    assert (got[free].lease_owner, got[free].lease_until) == (None, None)
    # renewed: nobody else can take it past its first lease's end ("b"'s ended at t + 61)
    assert [m.queue_id for m in await store.lease_due("c", t + 95, 30, 10)] == [mine, free]


async def test_same_owner_gets_its_leased_messages_back(store: Store) -> None:
    """A node restarting under the same name recovers its in-flight messages at once."""
    qid = await store.submit(env(), b"x")
    t = time.time()
    await store.lease_due("node-1", t, 600, 10)
    assert [m.queue_id for m in await store.lease_due("node-1", t + 1, 600, 10)] == [qid]


async def test_lease_respects_limit_and_order(store: Store) -> None:
    ids = [await store.submit(env(), b"%d" % i) for i in range(5)]
    assert await store.lease_due("a", time.time(), 60, 0) == []
    got = await store.lease_due("a", time.time(), 60, 3)
    assert [m.queue_id for m in got] == ids[:3]


async def test_not_due_and_suspended_messages_are_not_leased(store: Store) -> None:
    t = time.time()
    later = await store.submit(env("x@r.example"), b"later")
    susp = await store.submit(env(), b"suspended")
    await store.record_results(later, "a", [RecipientState("x@r.example", D, 1, "451", t, t + 300)])
    await store.set_flags(susp, suspended=True)
    assert await store.lease_due("a", t, 60, 10) == []
    assert [m.queue_id for m in await store.lease_due("a", t + 301, 60, 10)] == [later]
    await store.set_flags(susp, suspended=False)
    assert [m.queue_id for m in await store.lease_due("b", t, 60, 10)] == [susp]


async def test_delivered_recipients_survive_restart_and_are_not_leased_again(
    new_store: Callable[[], Store],
) -> None:
    t = time.time()
    rcpts = ["a@x.example", "b@x.example", "c@x.example"]
    async with new_store() as s:
        qid = await s.submit(env(*rcpts), b"body")
        assert len(await s.lease_due("n1", t, 60, 10)) == 1
        await s.record_results(
            qid,
            "n1",
            [
                RecipientState("a@x.example", DONE, 1, "", t, None),
                RecipientState("b@x.example", DONE, 1, "", t, None),
                RecipientState("c@x.example", D, 1, "451 4.4.1 try later", t, t + 600),
            ],
        )
        await s.release(qid, "n1")
    # (an abrupt stop is covered by the crash test; record_results is durable on return)
    async with new_store() as s:
        assert await s.lease_due("n2", t + 1, 60, 10) == []
        assert (await s.counts())["retry"] == 1
        [again] = await s.lease_due("n2", t + 601, 60, 10)
        assert status_of(again) == {"a@x.example": DONE, "b@x.example": DONE, "c@x.example": D}
        c = again.recipients[2]
        assert (c.attempts, c.last_error, c.last_attempt, c.next_attempt) == (
            1,
            "451 4.4.1 try later",
            t,
            t + 600,
        )
        assert [r.address for r in again.pending_recipients] == ["c@x.example"]
        assert again.status is D


async def test_final_states_are_never_downgraded(store: Store) -> None:
    t = time.time()
    qid = await store.submit(env("a@x", "b@x"), b"x")
    await store.record_results(
        qid, "n", [RecipientState("a@x", DONE, 1, "", t), RecipientState("b@x", F, 1, "550", t)]
    )
    # a stale owner reporting an older outcome must not resurrect them
    await store.record_results(
        qid,
        "old",
        [
            RecipientState("a@x", D, 1, "timeout", t, t),
            RecipientState("b@x", R),
            RecipientState("zz@x", R),
        ],
    )
    msg = await store.get(qid)
    assert msg is not None and status_of(msg) == {"a@x": DONE, "b@x": F}
    assert msg.recipients[1].last_error == "550"
    assert msg.status is F
    assert await store.lease_due("n", t + 10_000, 60, 10) == []
    await store.retry_now(qid)
    assert await store.lease_due("n", t + 10_000, 60, 10) == []


async def test_record_results_from_a_previous_owner_still_counts(store: Store) -> None:
    t = time.time()
    qid = await store.submit(env("a@x"), b"x")
    await store.lease_due("a", t, 10, 10)
    await store.lease_due("b", t + 11, 10, 10)  # a's lease expired, b took over
    await store.record_results(qid, "a", [RecipientState("a@x", DONE, 1, "", t + 12)])
    msg = await store.get(qid)
    assert msg is not None and msg.recipients[0].status is DONE
    assert msg.lease_owner == "b"  # the lease itself stays with b


async def test_suspend_resume_retry_now_and_flags(store: Store) -> None:
    t = time.time()
    qid = await store.submit(env("a@x", "b@x"), b"x")
    await store.record_results(
        qid, "n", [RecipientState("a@x", D, 2, "421", t, t + 3600), RecipientState("b@x", DONE, 1)]
    )
    await store.set_flags(qid, suspended=True)
    msg = await store.get(qid)
    assert msg is not None and msg.suspended and msg.status is S
    assert [m.queue_id for m in await store.list_messages(status="suspended")] == [qid]
    await store.retry_now(qid)
    assert await store.lease_due("n", t, 60, 10) == []  # still suspended
    await store.set_flags(qid, suspended=False, delay_notified=True)
    msg = await store.get(qid)
    assert msg is not None and not msg.suspended and msg.delay_notified and msg.status is D
    [leased] = await store.lease_due("n", t, 60, 10)  # retry_now made it due at once
    assert leased.recipients[0].next_attempt is None and leased.recipients[0].attempts == 2
    assert leased.recipients[1].status is DONE
    await store.set_flags(qid, delay_notified=False)
    msg = await store.get(qid)
    assert msg is not None and not msg.delay_notified and not msg.suspended


async def test_remove(store: Store) -> None:
    qid = await store.submit(env("a@x"), b"gone")
    keep = await store.submit(env("b@x"), b"stays")
    removed = await store.remove(qid)
    assert (
        removed is not None and removed.queue_id == qid and removed.recipients[0].address == "a@x"
    )
    assert await store.get(qid) is None
    with pytest.raises(KeyError):
        await store.read_data(qid)
    assert await store.remove(qid) is None
    assert await store.read_data(keep) == b"stays"
    # results for a message removed during delivery are dropped quietly
    await store.record_results(qid, "n", [RecipientState("a@x", DONE)])
    await store.release(qid, "n")
    assert (await store.counts())["messages"] == 1


async def test_unknown_ids(store: Store) -> None:
    assert await store.get("0000000000000000") is None
    for call in (
        store.read_data("0000000000000000"),
        store.read_head("0000000000000000", 100),
        store.set_flags("0000000000000000", suspended=True),
        store.retry_now("0000000000000000"),
    ):
        with pytest.raises(KeyError):
            await call


async def test_list_counts_and_purge(store: Store) -> None:
    t = time.time()
    ready = await store.submit(env("a@x"), b"1")
    retry = await store.submit(env("a@x"), b"2")
    done = await store.submit(env("a@x", "b@x"), b"3")
    failed = await store.submit(env("a@x"), b"4")
    susp = await store.submit(env("a@x"), b"5")
    await store.record_results(retry, "n", [RecipientState("a@x", D, 1, "", t, t + 60)])
    await store.record_results(
        done, "n", [RecipientState("a@x", DONE, 1), RecipientState("b@x", DONE, 1)]
    )
    await store.record_results(failed, "n", [RecipientState("a@x", F, 1, "550 5.1.1")])
    await store.set_flags(susp, suspended=True)
    by_status = {
        s: [m.queue_id for m in await store.list_messages(status=s)]
        for s in ("Ready", "retry", "DEFERRED", "Delivered", "failed", "Suspended")
    }
    assert by_status == {
        "Ready": [ready],
        "retry": [retry],
        "DEFERRED": [retry],
        "Delivered": [done],
        "failed": [failed],
        "Suspended": [susp],
    }
    with pytest.raises(ValueError):
        await store.list_messages(status="bogus")
    assert [m.queue_id for m in await store.list_messages(limit=2)] == [ready, retry]
    counts = await store.counts()
    assert counts == {
        "messages": 5,
        "ready": 1,
        "retry": 1,
        "delivered": 1,
        "failed": 1,
        "suspended": 1,
        "active": 0,
        "recipients_pending": 3,
    }
    assert await store.purge_completed(older_than=t - 10) == 0  # completed just now
    assert await store.purge_completed(older_than=time.time() + 1) == 2
    assert {m.queue_id for m in await store.list_messages()} == {ready, retry, susp}
    assert await store.get(done) is None
    with pytest.raises(KeyError):
        await store.read_data(failed)


async def test_queue_entries_are_the_unfinished_messages_with_their_unfinished_recipients(
    store: Store,
) -> None:
    """Get-Queue's one query: what it says of each message is what ``get`` says, less the
    finished messages, the finished recipients, the bytes and the envelope details."""
    t = time.time()
    ready = await store.submit(env("a@x", "b@y", "c@z", sender="s@corp"), b"1" * 10)
    partial = await store.submit(env("a@x", "b@y", "c@z"), b"22")
    await store.record_results(
        partial,
        "n",
        [
            RecipientState("a@x", DONE, 1, "250 ok", t),
            RecipientState("b@y", D, 2, "451 busy", t - 5, t + 600),
            RecipientState("c@z", F, 1, "550 no", t),
        ],
    )
    done = await store.submit(env("a@x"), b"3")
    await store.record_results(done, "n", [RecipientState("a@x", DONE, 1)])
    failed = await store.submit(env("a@x"), b"4")
    await store.record_results(failed, "n", [RecipientState("a@x", F, 1, "550 5.1.1")])
    susp = await store.submit(env("d@x"), b"5")
    await store.set_flags(susp, suspended=True)
    leased = await store.submit(env("e@x"), b"6", lease=("node1", t + 300))
    entries = await store.queue_entries(limit=100)
    assert [e.queue_id for e in entries] == [ready, partial, susp, leased]
    for entry in entries:
        msg = await store.get(entry.queue_id)
        assert msg is not None
        assert entry.size == msg.size and entry.status is msg.status
        assert entry.suspended == msg.suspended
        assert (entry.lease_owner, entry.lease_until) == (msg.lease_owner, msg.lease_until)
        assert entry.recipients == msg.pending_recipients
    assert [r.address for r in entries[0].recipients] == ["a@x", "b@y", "c@z"]
    assert entries[1].recipients == [RecipientState("b@y", D, 2, "451 busy", t - 5, t + 600)]
    assert entries[1].status is D and entries[2].status is S and entries[2].suspended
    assert entries[3].lease_owner == "node1" and entries[3].lease_until == t + 300
    assert [e.queue_id for e in await store.queue_entries(limit=2)] == [ready, partial]
    assert await store.queue_entries(limit=0) == []
    await store.remove(ready)
    assert [e.queue_id for e in await store.queue_entries(limit=1)] == [partial]


async def test_queue_entries_page_with_a_queue_id_cursor(store: Store) -> None:
    """``after``: keyset pages of queue_entries (Retry-Queue walks a queue of any size with
    them), in the query; finished messages are skipped wherever they fall."""
    ids = [await store.submit(env(f"r{i}@x"), b"m") for i in range(7)]
    await store.record_results(ids[3], "n", [RecipientState("r3@x", DONE, 1)])
    unfinished = [q for q in ids if q != ids[3]]
    pages, after = [], None
    for _ in range(10):
        page = [e.queue_id for e in await store.queue_entries(limit=2, after=after)]
        pages.append(page)
        if len(page) < 2:
            break
        after = page[-1]
    assert pages == [unfinished[0:2], unfinished[2:4], unfinished[4:6], []]
    assert [e.queue_id for e in await store.queue_entries(limit=9, after=ids[2].lower())] == (
        unfinished[3:]
    )
    assert [
        r.address for r in (await store.queue_entries(limit=1, after=ids[4]))[0].recipients
    ] == ["r5@x"]
    assert await store.queue_entries(limit=5, after="F" * 16) == []
    with pytest.raises(ValueError, match="after"):
        await store.queue_entries(limit=5, after="not-an-id")


async def test_submit_with_a_lease_is_stored_leased_and_matches_stored_message_new(
    store: Store,
) -> None:
    t = time.time()
    e = env("a@x.example", "b@x.example", "a@x.example")
    qid = await store.submit(e, b"handed off", lease=("node-1", t + 600))
    got = await store.get(qid)
    assert got is not None
    assert (got.lease_owner, got.lease_until) == ("node-1", t + 600)
    # Another owner cannot lease it while the lease lives; the owner itself can.
    assert await store.lease_due("node-2", t, 60, 10) == []
    assert [m.queue_id for m in await store.lease_due("node-1", t, 600, 10)] == [qid]
    # What the session builds in memory is what the store holds (received_at aside).
    built = StoredMessage.new(
        qid, e, size=10, received_at=got.received_at, lease=("node-1", t + 600)
    )
    assert built == got


async def test_record_results_with_release_drops_the_owners_lease_in_the_same_write(
    store: Store,
) -> None:
    t = time.time()
    qid = await store.submit(env("a@x.example"), b"x", lease=("node-1", t + 600))
    # Someone else's release flag does nothing to node-1's lease.
    await store.record_results(qid, "node-2", [], release=True)
    got = await store.get(qid)
    assert got is not None and got.lease_owner == "node-1" and got.lease_until == t + 600
    await store.record_results(
        qid, "node-1", [RecipientState("a@x.example", DONE, 1, "250 ok", t)], release=True
    )
    got = await store.get(qid)
    assert got is not None
    assert got.lease_owner is None and got.lease_until is None
    assert got.recipients[0].status == DONE


async def test_list_pages_with_a_cursor_in_the_query(store: Store) -> None:
    """``after``: the next page starts past the last queue id of this one, in the query (a
    queue id compared as text: upper-case hex sorts as the ids are made, time-ordered)."""
    ids = [await store.submit(env(f"u{i}@x.example"), b"x") for i in range(7)]
    assert ids == sorted(ids)
    pages, after = [], None
    while True:
        page = [m.queue_id for m in await store.list_messages(limit=3, after=after)]
        if not page:
            break
        pages.append(page)
        after = page[-1]
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert [m.queue_id for m in await store.list_messages(after=ids[2].lower())] == ids[3:]
    await store.set_flags(ids[4], suspended=True)
    await store.set_flags(ids[1], suspended=True)
    suspended = await store.list_messages(status="Suspended", after=ids[1])
    assert [m.queue_id for m in suspended] == [ids[4]]
    assert await store.list_messages(after="F" * 16) == []
    for bad in ("", "123", "G" * 16, ids[0] + "0", "' OR 1=1 --"):
        with pytest.raises(ValueError, match="after"):
            await store.list_messages(after=bad)


async def test_list_filters_on_sender_and_recipients(store: Store) -> None:
    from relaygate.queue.store import AddressPattern

    def p(text: str) -> AddressPattern:
        return AddressPattern.parse(text)

    scan1 = await store.submit(env("a@corp.example", sender="Scan1@Scanners.Corp.Example"), b"1")
    erp = await store.submit(
        env("b@other.example", "a@corp.example", sender="erp@corp.example"), b"2"
    )
    null = await store.submit(env("c@corp.example", sender=""), b"3")
    scan2 = await store.submit(env("d@x.example", sender="scan2@scanners.corp.example"), b"4")
    odd = await store.submit(env("e%_@x.example", sender="o%d_d@corp.example"), b"5")
    await store.record_results(erp, "n", [RecipientState("a@corp.example", DONE, 1)])

    async def ids(**kw: object) -> list[str]:
        return [m.queue_id for m in await store.list_messages(**kw)]  # type: ignore[arg-type]

    assert await ids(sender=p("scan1@scanners.corp.example")) == [scan1]  # any ASCII case
    assert await ids(sender=p("*@SCANNERS.corp.example")) == [scan1, scan2]
    assert await ids(sender=p("scan*")) == [scan1, scan2]
    assert await ids(sender=p("*corp*")) == [scan1, erp, scan2, odd]
    assert await ids(sender=p("<>")) == [null]
    assert await ids(sender=p("*")) == [scan1, erp, null, scan2, odd]
    # % and _ are not wildcards: only * is
    assert await ids(sender=p("o%d_d@*")) == [odd]
    assert await ids(sender=p("o_d%*")) == []
    assert await ids(sender=p("oxdxd@corp.example")) == []
    # any recipient, whatever its status (a@corp.example is Delivered in erp)
    assert await ids(recipient=p("a@corp.example")) == [scan1, erp]
    assert await ids(recipient=p("*@corp.example")) == [scan1, erp, null]
    assert await ids(recipient=p("e%_@*")) == [odd]
    assert await ids(recipient=p("e__@*")) == []
    # combined with each other, the status, the cursor and the limit
    assert await ids(sender=p("*@scanners.corp.example"), recipient=p("d@*")) == [scan2]
    assert await ids(recipient=p("*@corp.example"), status="Ready") == [scan1, erp, null]
    assert await ids(recipient=p("*@corp.example"), after=scan1, limit=1) == [erp]
    assert await ids(sender=p("*corp*"), after=erp, limit=2) == [scan2, odd]
    # a message is listed once however many recipients match
    assert await ids(recipient=p("*")) == [scan1, erp, null, scan2, odd]


def test_address_patterns_are_checked() -> None:
    from relaygate.queue.store import AddressPattern

    for bad in ("", "  ", "a*b@x", "*a*b*", "a b@x", "a\x00@x", "<>>"):
        with pytest.raises(ValueError, match=r"^from"):
            AddressPattern.parse(bad, name="from")
    pattern = AddressPattern.parse("*@Scanners.CORP.example")
    assert pattern.matches("scan1@scanners.corp.example")
    assert not pattern.matches("scan1@scanners.corp.example.evil")
    assert AddressPattern.parse("<Scan1@x>").matches("scan1@X")
    assert AddressPattern.parse("<>").matches("") and not AddressPattern.parse("<>").matches("a")


# ------------------------------------------------------------------ Graph drafts


async def test_a_graph_draft_is_recorded_durably_per_route_and_goes_with_its_message(
    new_store: Callable[[], Store],
) -> None:
    """save_graph_draft / graph_draft: one record per (message, route), replaced, forgotten,
    there after a restart (a sendMail's Message-ID too), gone with the message; an unknown queue
    id is a no-op."""
    store = new_store()
    await store.open()
    try:
        qid = await store.submit(env("a@x.example", "b@x.example"), b"m")
        other = await store.submit(env("c@x.example"), b"n")
        assert await store.graph_draft(qid, "Graph M365\na@x.example") is None
        await store.save_graph_draft(qid, "Graph M365\na@x.example", GraphDraft("mb@x", "d1"))
        await store.save_graph_draft(qid, "Graph M365\nb@x.example", GraphDraft("mb@x", "d2"))
        await store.save_graph_draft(
            qid, "Graph M365\na@x.example", GraphDraft("mb@x", "d1", sending=True)
        )
        await store.save_graph_draft(other, "Graph M365\nc@x.example", GraphDraft("mb@x", "d3"))
        # a plain sendMail in flight: no draft, the Message-ID to look it up by
        sendmail = GraphDraft("mb@x", "", sending=True, message_id="<o'b+1@x.example>")
        await store.save_graph_draft(other, "Graph M365\nd@x.example", sendmail)
        await store.save_graph_draft("0123456789ABCDEF", "r", GraphDraft("mb@x", "d4"))
        assert await store.graph_draft("0123456789ABCDEF", "r") is None
    finally:
        await store.close()
    store = new_store()
    await store.open()  # a restart: the records are still there
    try:
        assert await store.graph_draft(qid, "Graph M365\na@x.example") == GraphDraft(
            "mb@x", "d1", sending=True
        )
        assert await store.graph_draft(qid, "Graph M365\nb@x.example") == GraphDraft("mb@x", "d2")
        assert await store.graph_drafts(qid) == {
            "Graph M365\na@x.example": GraphDraft("mb@x", "d1", sending=True),
            "Graph M365\nb@x.example": GraphDraft("mb@x", "d2"),
        }
        await store.save_graph_draft(qid, "Graph M365\nb@x.example", None)
        assert await store.graph_draft(qid, "Graph M365\nb@x.example") is None
        assert list(await store.graph_drafts(qid)) == ["Graph M365\na@x.example"]
        assert await store.graph_drafts("0123456789ABCDEF") == {}
        assert await store.remove(qid) is not None
        assert await store.graph_draft(qid, "Graph M365\na@x.example") is None
        assert await store.graph_draft(other, "Graph M365\nc@x.example") == GraphDraft("mb@x", "d3")
        assert await store.graph_draft(other, "Graph M365\nd@x.example") == GraphDraft(
            "mb@x", "", sending=True, message_id="<o'b+1@x.example>"
        )
    finally:
        await store.close()


async def test_a_messages_graph_records_go_in_the_transaction_that_finishes_it(
    store: Store,
) -> None:
    """A route's Graph record outlives its send until the result is stored: record_results
    drops every record of the message when it finishes it (its last open recipient Delivered or
    Failed), and none while a recipient is still open."""
    t = time.time()
    qid = await store.submit(env("a@x.example", "b@x.example"), b"m")
    sendmail = GraphDraft("mb@x", "", sending=True, message_id="<1@x.example>")
    await store.save_graph_draft(qid, "Graph M365\na@x.example", sendmail)
    await store.save_graph_draft(qid, "Graph M365\nb@x.example", GraphDraft("mb@x", "d1", True))
    delivered = RecipientState("a@x.example", RecipientStatus.DELIVERED, 1, "250", t, None)
    await store.record_results(qid, "n1", [delivered])
    assert len(await store.graph_drafts(qid)) == 2  # b is still open
    failed = RecipientState("b@x.example", RecipientStatus.FAILED, 1, "550", t, None)
    await store.record_results(qid, "n1", [failed])
    assert await store.graph_drafts(qid) == {}


# ------------------------------------------------------------------ send budgets (reserve_send)

MINUTE = SendLimit(60.0, max_messages=3)
DAY = SendLimit(86400.0, max_recipients=10)


async def test_reserve_send_counts_messages_in_a_rolling_window(store: Store) -> None:
    t = 1_700_000_000.0
    for i in range(3):
        assert await store.reserve_send("m365", t + i, 1, [MINUTE]) is None
    # Full: nothing is counted, and the answer is when the oldest send leaves the window.
    assert await store.reserve_send("m365", t + 3, 1, [MINUTE]) == SendWait(t + 60, MINUTE)
    assert await store.reserve_send("m365", t + 59.5, 1, [MINUTE]) == SendWait(t + 60, MINUTE)
    assert await store.reserve_send("m365", t + 60, 1, [MINUTE]) is None  # the first has left
    assert await store.reserve_send("m365", t + 60.5, 1, [MINUTE]) == SendWait(t + 61, MINUTE)
    # Another budget is another count.
    assert await store.reserve_send("smarthost", t + 60.5, 1, [MINUTE]) is None


async def test_reserve_send_counts_recipients_and_waits_until_enough_have_left(
    store: Store,
) -> None:
    t = 1_700_000_000.0
    assert await store.reserve_send("m365", t, 4, [DAY]) is None
    assert await store.reserve_send("m365", t + 10, 4, [DAY]) is None
    # 8 counted: 3 (or 6) more need the first send (4) to leave; 7 more need both to.
    assert await store.reserve_send("m365", t + 20, 3, [DAY]) == SendWait(t + 86400, DAY)
    assert await store.reserve_send("m365", t + 20, 6, [DAY]) == SendWait(t + 86400, DAY)
    assert await store.reserve_send("m365", t + 20, 7, [DAY]) == SendWait(t + 10 + 86400, DAY)
    assert await store.reserve_send("m365", t + 20, 2, [DAY]) is None  # exactly 10
    assert await store.reserve_send("m365", t + 30, 1, [DAY]) == SendWait(t + 86400, DAY)
    # More recipients than the limit can never fit: the caller must split.
    with pytest.raises(ValueError):
        await store.reserve_send("m365", t + 30, 11, [DAY])


async def test_reserve_send_must_fit_every_limit(store: Store) -> None:
    t = 1_700_000_000.0
    both = [MINUTE, DAY]
    assert await store.reserve_send("m365", t, 5, both) is None
    assert await store.reserve_send("m365", t + 1, 5, both) is None
    # The minute has room (2 of 3), the day has none: the day's answer counts.
    assert await store.reserve_send("m365", t + 2, 1, both) == SendWait(t + 86400, DAY)
    # A day later both windows are empty again.
    assert await store.reserve_send("m365", t + 86401, 3, both) is None


async def test_reserve_send_partial_takes_the_recipients_that_fit(store: Store) -> None:
    """partial=True: a send that does not fit whole counts its first R recipients (R = the room
    left) and says when the rest could go; with no room at all nothing is counted."""
    t = 1_700_000_000.0
    assert await store.reserve_send("m365", t, 4, [DAY], partial=True) is None  # fits: as before
    assert await store.reserve_send("m365", t + 10, 3, [DAY]) is None
    # 7 of 10 counted: 8 more do not fit; 3 are counted now, the other 5 need both sends out.
    assert await store.reserve_send("m365", t + 20, 8, [DAY], partial=True) == SendWait(
        t + 10 + 86400, DAY, reserved=3
    )
    # The 3 were counted: the budget is full, a one-recipient send waits for the first send.
    assert await store.reserve_send("m365", t + 21, 1, [DAY]) == SendWait(t + 86400, DAY)
    # Full: partial counts nothing either (reserved = 0), the answer is the usual one.
    assert await store.reserve_send("m365", t + 21, 5, [DAY], partial=True) == SendWait(
        t + 10 + 86400, DAY
    )
    # When the first send (4) has left, 4 of 5 go; the last one waits for the second send.
    assert await store.reserve_send("m365", t + 86400, 5, [DAY], partial=True) == SendWait(
        t + 10 + 86400, DAY, reserved=4
    )
    assert await store.reserve_send("m365", t + 86400, 1, [DAY]) == SendWait(t + 10 + 86400, DAY)
    # Without partial a send that does not fit whole still counts nothing.
    assert await store.reserve_send("other", t, 9, [DAY]) is None
    assert await store.reserve_send("other", t + 1, 2, [DAY]) == SendWait(t + 86400, DAY)
    assert await store.reserve_send("other", t + 2, 1, [DAY]) is None  # the 1 left is still there


async def test_reserve_send_partial_never_passes_a_spent_message_limit(store: Store) -> None:
    t = 1_700_000_000.0
    one = SendLimit(60.0, max_messages=1)
    both = [one, DAY]
    assert await store.reserve_send("m365", t, 6, both, partial=True) is None
    # The message limit is spent: nothing is counted although 4 recipients would fit.
    assert await store.reserve_send("m365", t + 1, 5, both, partial=True) == SendWait(
        t + 86400, DAY
    )
    # A minute later the message limit has room: 4 of 5 go, and the rest waits for the day
    # (the send just counted also holds the minute, the later of the two is the answer).
    assert await store.reserve_send("m365", t + 61, 5, both, partial=True) == SendWait(
        t + 86400, DAY, reserved=4
    )
    assert await store.reserve_send("m365", t + 200, 1, both, partial=True) == SendWait(
        t + 86400, DAY
    )


async def test_two_clients_reserving_partially_at_once_never_exceed_a_budget(
    new_store: Callable[[], Store],
) -> None:
    a, b = new_store(), new_store()
    await a.open()
    await b.open()
    try:
        now = time.time()
        limits = [SendLimit(86400.0, max_recipients=20)]

        async def one(s: Store, i: int) -> int:
            wait = await s.reserve_send("shared", now + i * 1e-6, 3, limits, partial=True)
            return 3 if wait is None else wait.reserved

        granted = await asyncio.gather(
            *(one(a, i) for i in range(0, 20, 2)), *(one(b, i) for i in range(1, 20, 2))
        )
        # 6 sends of 3, one of the last 2, then nothing: exactly the budget.
        assert sum(granted) == 20
        assert sorted(granted, reverse=True)[:8] == [3, 3, 3, 3, 3, 3, 2, 0]
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_purge_prunes_old_send_records(store: Store) -> None:
    old = time.time() - SEND_LOG_RETENTION - 100
    assert await store.reserve_send("m365", old, 1, [SendLimit(60.0, max_messages=1)]) is None
    one = SendLimit(60.0, max_messages=1)
    assert await store.reserve_send("m365", old + 1, 1, [one]) == SendWait(old + 60, one)
    await store.purge_completed(0)
    # The record is gone (a window reaching back to it counts nothing any more).
    assert await store.reserve_send("m365", old + 1, 1, [SendLimit(60.0, max_messages=1)]) is None


@pytest.mark.parametrize("kind", ["messages", "recipients"])
async def test_two_clients_reserving_at_once_never_exceed_a_budget(
    new_store: Callable[[], Store], kind: str
) -> None:
    """Two store clients on one queue (two worker processes, or two nodes of a cluster), each
    reserving many times concurrently: exactly the budget is granted, never more."""
    a, b = new_store(), new_store()
    await a.open()  # one after the other: two SQLite stores creating one file at once collide
    await b.open()
    try:
        now = time.time()
        if kind == "messages":
            limits, size, budget = [SendLimit(60.0, max_messages=7)], 1, 7
        else:
            limits, size, budget = [SendLimit(86400.0, max_recipients=20)], 3, 6  # 6 x 3 <= 20

        async def one(s: Store, i: int) -> SendWait | None:
            return await s.reserve_send("shared", now + i * 1e-6, size, limits)

        answers = await asyncio.gather(
            *(one(a, i) for i in range(0, 60, 2)), *(one(b, i) for i in range(1, 60, 2))
        )
        assert sum(1 for x in answers if x is None) == budget
        assert all(x is None or x.until > now for x in answers)
        # Both clients see the budget as spent.
        assert await a.reserve_send("shared", now + 1, size, limits) is not None
        assert await b.reserve_send("shared", now + 1, size, limits) is not None
    finally:
        await asyncio.gather(a.close(), b.close())
