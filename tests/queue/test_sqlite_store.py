"""SqliteStore: durability, group commit, leases, per-recipient progress, admin operations."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relaygate.queue import spool as spool_module
from relaygate.queue import sqlite_store, sqlite_writer
from relaygate.queue.model import (
    Envelope,
    GraphDraft,
    QueueIdGenerator,
    RecipientState,
    SendLimit,
    SendWait,
)
from relaygate.queue.spool import READY_BATCH, Spool
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import (
    CorruptMessageError,
    Store,
    StoreClosedError,
    StoreError,
    StoreFullError,
    StoreOutcomeUnknownError,
    open_store,
)
from tests.queue.test_store_contract import DONE, QID, env
from tests.support.descriptors import descriptors_spent
from tests.support.proc_io import bytes_read


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "queue" / "queue.db"


@pytest.fixture
async def store(db_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(db_path)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def test_queue_id_generator_survives_clock_going_back() -> None:
    gen = QueueIdGenerator()
    a = gen.next(now=2_000_000_000.0)
    b = gen.next(now=1_000_000_000.0)  # clock jumped back 30 years
    c = gen.next(now=2_000_000_000.0)
    assert a < b < c and len({a, b, c}) == 3
    assert abs(QueueIdGenerator.timestamp(a) - 2_000_000_000.0) < 0.001
    seeded = QueueIdGenerator(floor=c)
    assert seeded.next(now=0.0) > c


# --------------------------------------------------------------------------- group commit


async def test_concurrent_submits_are_group_committed(store: SqliteStore) -> None:
    before_commits, before_ops = store.commits, store.ops_committed
    n = 200
    ids = await asyncio.gather(
        *(store.submit(env(f"u{i}@corp.example"), b"m%d" % i) for i in range(n))
    )
    commits = store.commits - before_commits
    assert store.ops_committed - before_ops == n
    assert 1 <= commits < n / 4, f"{commits} commits for {n} submits"
    assert store.max_batch > 1
    assert store.stats()["commits"] == store.commits
    for i in (0, 57, n - 1):
        assert await store.read_data(ids[i]) == b"m%d" % i


async def test_shared_writers_free_their_lock_before_telling_the_callers(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With workers sharing the file, the other writers wait on `<db>.writer-lock`: it is held for
    the transaction only, and is already free when the batch's callers are woken."""
    held_while_resolving: list[bool] = []
    resolve = SqliteStore._resolve_batch

    def checking_resolve(batch: list[object], outcomes: list[tuple[bool, object]]) -> None:
        fd = os.open(f"{db_path}.writer-lock", os.O_RDWR)
        try:  # a second open file description: its flock conflicts with the writer thread's
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            held_while_resolving.append(True)
        else:
            held_while_resolving.append(False)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)
        resolve(batch, outcomes)  # type: ignore[arg-type]

    monkeypatch.setattr(SqliteStore, "_resolve_batch", staticmethod(checking_resolve))
    store = SqliteStore(db_path, shared_writers=True)
    await store.open()
    try:
        ids = await asyncio.gather(
            *(store.submit(env(f"u{i}@corp.example"), b"m%d" % i) for i in range(20))
        )
        assert await store.read_data(ids[-1]) == b"m19"
    finally:
        await store.close()
    assert held_while_resolving and not any(held_while_resolving), held_while_resolving


async def test_a_failing_call_in_a_batch_fails_alone(store: SqliteStore) -> None:
    """The batch runs without savepoints first; a failing call sends it back through the savepoint
    path, where only that call is undone and every other call of the same transaction commits."""
    known = await store.submit(env(), b"known")
    before = store.commits
    calls = [store.submit(env(f"a{i}@corp.example"), b"a%d" % i) for i in range(20)]
    calls.insert(7, store.set_flags("0000000000000000", suspended=True))
    calls.append(store.set_flags(known, suspended=True))
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[7], KeyError)
    ids = [r for i, r in enumerate(results[:-1]) if i != 7]
    assert all(isinstance(q, str) and QID.match(q) for q in ids)
    assert store.commits - before < len(calls), "the calls did not share a transaction"
    assert store.max_batch > 2
    for i, qid in enumerate(ids):
        assert await store.read_data(qid) == b"a%d" % i
    got = await store.get(known)
    assert got is not None and got.suspended
    assert (await store.counts())["messages"] == 21


async def test_the_wal_is_written_ahead_at_open_and_as_it_fills(db_path: Path) -> None:
    """Commits overwrite WAL blocks that are already written instead of appending (an append makes
    fdatasync journal the new size): 4 MB at open, then 16 MB more whenever less than 8 MB of the
    written-ahead space is left, as read from SQLite's wal-index."""
    wal = Path(f"{db_path}-wal")
    first, step = sqlite_writer._WAL_RESERVE_FIRST, sqlite_writer._WAL_RESERVE_STEP
    async with SqliteStore(db_path, spool_threshold=10**9) as s:
        assert wal.stat().st_size >= first == s._wal_reserved
        assert s._wal_index is not None
        # A reader with an open snapshot keeps SQLite from restarting the WAL at its start, so
        # the frames in use only grow here.
        reader = sqlite3.connect(db_path)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM messages").fetchone()
        try:
            await s.submit(env(), b"first")
            assert s._wal_reserved == first + step  # 8 MB left is not less than half: grew
            in_use = s._wal_in_use()
            assert 0 < in_use < 1024 * 1024
            blob = b"w" * 100_000
            while s._wal_in_use() < first + step - step // 2 + 200_000:
                await asyncio.gather(*(s.submit(env(), blob) for _ in range(10)))
            await s.submit(env(), b"one more batch")
            assert s._wal_reserved == first + 2 * step
            assert wal.stat().st_size >= s._wal_reserved
        finally:
            reader.close()
        count = len(await s.list_messages(limit=10_000))
    async with SqliteStore(db_path) as s:  # reopened: SQLite reads past the zeros as empty log
        assert len(await s.list_messages(limit=10_000)) == count


async def test_a_failed_wal_reservation_only_logs(
    db_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real = os.pwrite

    def full(fd: int, data: object, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqlite_writer.os, "pwrite", full)
    async with SqliteStore(db_path) as s:
        assert "could not reserve WAL space" in caplog.text
        assert s._wal_reserved == sqlite_writer._WAL_LIMIT  # not tried again on every batch
        monkeypatch.setattr(sqlite_writer.os, "pwrite", real)
        qid = await s.submit(env(), b"still stored")
        assert await s.read_data(qid) == b"still stored"


async def test_batch_respects_byte_cap(db_path: Path) -> None:
    # Inline blobs (no spool files) are what the byte cap is for.
    async with SqliteStore(db_path, max_batch_bytes=300_000, spool_threshold=10**9) as s:
        big = b"z" * 100_000
        ids = await asyncio.gather(*(s.submit(env(), big) for _ in range(12)))
        assert s.max_batch <= 3
        assert all([await s.read_data(i) == big for i in ids])


async def test_disk_full_is_reported_and_store_recovers(store: SqliteStore) -> None:
    ok = await store.submit(env(), b"fits")
    store.spool_threshold = 10**9  # keep the big message inside the database for this one
    # Simulate a full disk: cap the database size on the writer's connection.
    await store._write(lambda conn: conn.execute("PRAGMA max_page_count = 64"))
    with pytest.raises(StoreFullError):
        await store.submit(env(), b"q" * (2 * 1024 * 1024))
    assert (await store.counts())["messages"] == 1  # nothing half-written
    # The failed transaction dropped that connection; the store goes on with a fresh one.
    again = await store.submit(env(), b"after")
    assert await store.read_data(again) == b"after"
    assert await store.read_data(ok) == b"fits"
    assert store.failed_commits == 1


# --------------------------------------------------------------------------- leases


# --------------------------------------------------------------------------- per-recipient progress


# --------------------------------------------------------------------------- admin operations


async def test_corrupted_bytes_are_detected(store: SqliteStore, db_path: Path) -> None:
    qid = await store.submit(env(), b"original bytes")
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute(
            "UPDATE message_data SET data = ? WHERE queue_id = ?", (b"tampered bytes", qid)
        )
    conn.close()
    with pytest.raises(CorruptMessageError):
        await store.read_data(qid)


async def test_open_store_layout_and_protocol(tmp_path: Path) -> None:
    s = open_store(tmp_path / "rg-data")
    assert isinstance(s, SqliteStore) and isinstance(s, Store)
    assert s.path == tmp_path / "rg-data" / "queue" / "queue.db"
    await s.open()
    await s.open()  # idempotent
    try:
        assert s.path.exists()
        conn = sqlite3.connect(s.path)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    finally:
        await s.close()
        await s.close()  # idempotent


# --------------------------------------------------------------------------- real crash (SIGKILL)

# Shared by the child process and the checker: the bytes of message n of run `tag`.
PAYLOAD_SRC = r"""
import hashlib
def payload(tag, n):
    seed = hashlib.sha256(f"{tag}:{n}".encode()).digest()
    body = seed * (1 + (n * 37) % 400)          # 32 B .. 12.8 KB
    if n % 7 == 0:
        body = seed * 3000                       # 96 KB: a spool file (spool.py)
    return b"Message-ID: <" + f"{tag}.{n}".encode() + b">\r\n\r\n\x00\r.\n\xff" + body
"""

CHILD_SRC = (
    PAYLOAD_SRC
    + r"""
import asyncio, itertools, os, sys
from pathlib import Path
from relaygate.queue.model import Envelope
from relaygate.queue import sqlite_store
from relaygate.queue.sqlite_store import SqliteStore

async def main():
    path, tag = Path(sys.argv[1]), sys.argv[2]
    store = SqliteStore(path)
    await store.open()
    counter = itertools.count()
    async def session():
        while True:
            n = next(counter)
            e = Envelope(sender="dev@corp.example", recipients=[f"r{n}@corp.example"],
                         message_id=f"{tag}.{n}")
            qid = await store.submit(e, payload(tag, n))
            os.write(1, f"{qid} {n}\n".encode())   # only after submit() returned
    os.write(1, b"READY\n")
    await asyncio.gather(*(session() for _ in range(8)))

asyncio.run(main())
"""
)


def _run_and_kill(db: Path, tag: str, kill_after: float) -> list[tuple[str, int]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SRC, str(db), tag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    chunks: list[bytes] = []
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        while True:
            b = os.read(proc.stdout.fileno(), 65536)
            if not b:
                return
            chunks.append(b)
            if not ready.is_set() and b"READY\n" in b"".join(chunks):
                ready.set()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        assert ready.wait(8), f"child never started: {proc.stderr.read() if proc.stderr else ''!r}"
        time.sleep(kill_after)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        reader.join(5)
    assert proc.returncode == -signal.SIGKILL
    out = b"".join(chunks).decode()
    acked = []
    for line in out.split("\n")[:-1]:  # the text after the last newline may be torn
        if line == "READY":
            continue
        qid, n = line.split()
        acked.append((qid, int(n)))
    return acked


async def test_sigkill_never_loses_an_acknowledged_message(tmp_path: Path) -> None:
    ns: dict[str, object] = {}
    exec(PAYLOAD_SRC, ns)
    payload = ns["payload"]
    db = tmp_path / "queue.db"
    rng = random.Random(20251123)
    acked: list[tuple[str, str, int]] = []
    for round_ in range(3):
        tag = f"run{round_}"
        delay = rng.uniform(0.3, 1.1)
        got = await asyncio.to_thread(_run_and_kill, db, tag, delay)
        assert got, f"round {round_}: nothing was acknowledged in {delay:.2f}s"
        # recovery reads a WAL whose tail is the zeros written ahead (see _reserve_wal)
        assert Path(f"{db}-wal").stat().st_size >= sqlite_writer._WAL_RESERVE_FIRST
        new = [(qid, tag, n) for qid, n in got]
        acked += new
        # check with a fresh store, as a restarted relay would: every message acknowledged so
        # far is there (envelope), and those of this run are byte-identical
        async with SqliteStore(db) as s:
            stored = {m.queue_id: m for m in await s.list_messages(limit=1_000_000)}
            for qid, t, n in acked:
                msg = stored.get(qid)
                assert msg is not None, f"acknowledged message {qid} ({t}.{n}) lost"
                assert msg.message_id == f"{t}.{n}"
                assert [r.address for r in msg.recipients] == [f"r{n}@corp.example"]
            datas = await asyncio.gather(*(s.read_data(qid) for qid, _, _ in new))
            for (qid, t, n), data in zip(new, datas, strict=True):
                assert data == payload(t, n), f"{qid} ({t}.{n}) differs"  # type: ignore[operator]
    assert len({qid for qid, _, _ in acked}) == len(acked)
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    conn.close()


# --------------------------------------------------------------------------- hand-off to the manager


# --------------------------------------------------------------------------- spool files


def spool_files(db_path: Path) -> set[str]:
    """The spool files that hold a message (not the empty ones created ahead, spool.py)."""
    d = db_path.parent / "spool"
    return {p.name for p in d.iterdir() if p.stat().st_size} if d.exists() else set()


async def test_a_big_message_lives_in_a_spool_file_and_reads_back(
    store: SqliteStore, db_path: Path
) -> None:
    big = b"Subject: scan\r\n\r\n" + bytes(range(256)) * 1024  # 256 KB
    small = b"Subject: note\r\n\r\nhi\r\n"
    qid_big = await store.submit(env(), big)
    qid_small = await store.submit(env(), small)
    (name,) = spool_files(db_path)
    assert (db_path.parent / "spool" / name).read_bytes() == big
    conn = sqlite3.connect(db_path)
    rows = dict(conn.execute("SELECT queue_id, length(data) FROM message_data"))
    conn.close()
    assert rows == {qid_big: 0, qid_small: len(small)}  # the big one is not in the database
    assert await store.read_data(qid_big) == big
    msg = await store.get(qid_big)
    assert msg is not None and msg.size == len(big)


async def test_a_damaged_or_missing_spool_file_is_corrupt_not_wrong_bytes(
    store: SqliteStore, db_path: Path
) -> None:
    qid = await store.submit(env(), b"x" * 100_000)
    (name,) = spool_files(db_path)
    path = db_path.parent / "spool" / name
    path.write_bytes(b"y" + path.read_bytes()[1:])
    with pytest.raises(CorruptMessageError):
        await store.read_data(qid)
    path.unlink()
    with pytest.raises(CorruptMessageError, match="unreadable"):
        await store.read_data(qid)


async def test_a_spool_file_that_cannot_be_opened_for_want_of_descriptors_is_not_corrupt(
    db_path: Path,
) -> None:
    """Out of descriptors (EMFILE), a spooled message's file cannot be opened for a while. That
    was CorruptMessageError, and the queue manager suspended the message as poison until an
    administrator resumed it. It is a StoreError now (the delivery is tried again), and the
    bytes read back once descriptors are free."""
    data = b"d" * 100_000
    async with SqliteStore(db_path, read_threads=1) as s:
        qid = await s.submit(env(), data)
        assert await s.read_data(qid) == data  # the reader thread's connection is open
        with descriptors_spent():
            with pytest.raises(StoreError, match="Too many open files") as raised:
                await s.read_data(qid)
            with pytest.raises(StoreError, match="Too many open files") as raised_head:
                await s.read_head(qid, 10)
        assert not isinstance(raised.value, CorruptMessageError)
        assert not isinstance(raised_head.value, CorruptMessageError)
        assert await s.read_data(qid) == data


async def test_the_head_of_a_spooled_message_is_read_only_as_far_as_asked(
    store: SqliteStore, db_path: Path
) -> None:
    """``read_head`` reads the spool file's first bytes, never the rest (a view of a 35 MB
    message needs its header). The checksum covers the whole file: it cannot be checked on a
    part, so a damage past the head does not stop the head being read; a missing file does."""
    big = b"Subject: scan\r\n\r\n" + random.Random(3).randbytes(3_000_000)
    qid = await store.submit(env(), big)
    (name,) = spool_files(db_path)
    path = db_path.parent / "spool" / name
    await store.read_head(qid, 1000)  # the database's pages in its cache, as for any read
    before = bytes_read()
    assert await store.read_head(qid, 1000) == big[:1000]
    read = bytes_read() - before
    assert read < 64 * 1024, f"{read} bytes read for the first 1000 of 3 MB"
    path.write_bytes(big[:-1] + b"!")
    assert await store.read_head(qid, 1000) == big[:1000]
    path.unlink()
    with pytest.raises(CorruptMessageError, match="unreadable"):
        await store.read_head(qid, 1000)


#: Reads a spool file's head with the longest limit a view asks for (max_header_size of 2 GB
#: and the Received field's room) in a process whose address space is 512 MB.
_HEAD_UNDER_RLIMIT = """
import resource, sys
from pathlib import Path
from relaygate.queue.spool import Spool
resource.setrlimit(resource.RLIMIT_AS, (512 << 20, 512 << 20))
print(len(Spool(Path(sys.argv[1])).read_head(sys.argv[2], 2**31 + 8192)))
"""


def test_a_spool_files_head_takes_no_memory_for_more_than_the_file_holds(tmp_path: Path) -> None:
    """A view asks for max_header_size (up to 2 GB) and 8 KB: an unbuffered read of that many
    bytes allocated a buffer of that size first, whatever the file's size, and failed
    (MemoryError: the view showed no header) where the address space or the commit is bounded
    (ulimit -v, vm.overcommit_memory = 2). What is read is bounded by the file's size."""
    spool = Spool(tmp_path / "spool")
    spool.open()
    data = b"Subject: scan\r\n\r\n" + b"x" * 100_000
    name = spool.write(data)
    spool.close()
    out = subprocess.run(
        [sys.executable, "-c", _HEAD_UNDER_RLIMIT, str(tmp_path / "spool"), name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(len(data))


async def test_remove_and_purge_delete_the_spool_file(store: SqliteStore, db_path: Path) -> None:
    t = time.time()
    gone = await store.submit(env("a@x.example"), b"a" * 70_000)
    done = await store.submit(env("b@x.example"), b"b" * 70_000)
    kept = await store.submit(env("c@x.example"), b"c" * 70_000)
    assert len(spool_files(db_path)) == 3
    await store.remove(gone)
    assert len(spool_files(db_path)) == 2
    await store.record_results(done, "n", [RecipientState("b@x.example", DONE, 1, "250", t)])
    assert await store.purge_completed(time.time() + 1) == 1
    assert len(spool_files(db_path)) == 1
    assert await store.read_data(kept) == b"c" * 70_000


async def test_a_failed_submit_leaves_no_spool_file(store: SqliteStore, db_path: Path) -> None:
    with pytest.raises(ValueError):
        await store.submit(Envelope(sender="a@b.example", recipients=[]), b"z" * 100_000)
    # A failure inside the transaction (here: an id that cannot be inserted) unlinks the file.
    real = store._op_submit

    def failing(*args: object) -> str:
        raise sqlite3.IntegrityError("simulated")

    store._op_submit = failing  # type: ignore[method-assign]
    with pytest.raises(Exception, match="simulated"):
        await store.submit(env(), b"z" * 100_000)
    store._op_submit = real  # type: ignore[method-assign]
    assert spool_files(db_path) == set()


class _CommitLandsThenFails:
    """The writer's connection, with a COMMIT that reaches the disk and then reports an error,
    as SQLite does when the WAL frames are written but the -shm index cannot grow (a full disk)
    or an fsync fails after the write."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fail_next = True

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:
        cursor = self._conn.execute(sql, *args)
        if sql == "COMMIT" and self.fail_next:
            self.fail_next = False
            raise sqlite3.OperationalError("disk I/O error")
        return cursor

    def __getattr__(self, name: str) -> object:
        return getattr(self._conn, name)


@pytest.mark.parametrize("size", [100, 100_000], ids=["inline", "spooled"])
async def test_a_commit_that_fails_after_reaching_the_disk_is_outcome_unknown(
    db_path: Path, size: int
) -> None:
    """Not a plain failure (before: StoreError, which the session answers with 451, and the spool
    file of a big message deleted while its row came back: suspended as corrupt). The caller is
    told the outcome is unknown, and the spool file stays for the row."""
    data = b"u" * size
    async with SqliteStore(db_path) as s:
        await s.submit(env(), b"first")  # the writer's connection is open
        s._wconn = _CommitLandsThenFails(s._wconn)  # type: ignore[assignment]
        with pytest.raises(StoreOutcomeUnknownError):
            await s.submit(env("back@corp.example"), data)
    async with SqliteStore(db_path) as s:  # SQLite rebuilds its index from the WAL file
        (msg,) = [
            m for m in await s.list_messages() if m.recipients[0].address == "back@corp.example"
        ]
        assert await s.read_data(msg.queue_id) == data


async def test_a_cancelled_big_submit_that_still_commits_keeps_its_spool_file(
    store: SqliteStore,
) -> None:
    """A session cancelled while its submit waits (a stop past its grace time, a slow disk):
    the queued write still commits, so its spool file must stay (before: deleted, and the row
    that came back was suspended as corrupt)."""
    real = store._op_submit

    def slow(*args: object) -> str:
        time.sleep(0.5)  # in the writer thread: the caller is cancelled meanwhile
        return real(*args)  # type: ignore[arg-type]

    store._op_submit = slow  # type: ignore[method-assign]
    data = b"c" * 100_000
    task = asyncio.create_task(store.submit(env("late@corp.example"), data))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store._op_submit = real  # type: ignore[method-assign]
    for _ in range(100):
        found = [m for m in await store.list_messages()]
        if found:
            break
        await asyncio.sleep(0.05)
    (msg,) = found
    assert await store.read_data(msg.queue_id) == data


async def test_a_full_disk_while_spooling_is_store_full(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(data: bytes) -> str:
        raise OSError(28, "No space left on device")  # ENOSPC

    monkeypatch.setattr(store._spool, "write", no_space)
    with pytest.raises(StoreFullError):
        await store.submit(env(), b"z" * 100_000)
    assert (await store.counts())["messages"] == 0


async def test_orphaned_spool_files_are_swept_at_open_once_old(db_path: Path) -> None:
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env(), b"k" * 100_000)
    spool = db_path.parent / "spool"
    old_orphan, new_orphan = spool / ("ab" * 12), spool / ("cd" * 12)
    old_orphan.write_bytes(b"crashed before its commit")
    new_orphan.write_bytes(b"maybe another process is about to commit it")
    two_hours_ago = time.time() - 7200
    os.utime(old_orphan, (two_hours_ago, two_hours_ago))
    async with SqliteStore(db_path) as s:
        assert not old_orphan.exists()
        assert new_orphan.exists()
        assert await s.read_data(qid) == b"k" * 100_000


async def test_orphaned_spool_files_are_swept_by_the_purge_while_open(db_path: Path) -> None:
    """A worker killed and restarted beside the others (or a relay restarted at once) leaves the
    files its predecessor created ahead, too young for the sweep at its own open: swept only at
    open, they stayed until the node's next start. The purge sweeps them too, at most every
    orphan_sweep_interval; a live message's file and this store's own files created ahead stay."""
    spool = db_path.parent / "spool"
    async with SqliteStore(db_path, orphan_sweep_interval=0) as s:
        qid = await s.submit(env(), b"k" * 100_000)
        held = set(spool.iterdir())
        assert len(held) == READY_BATCH  # the message's file and the ones waiting (flocked)
        two_hours_ago = time.time() - 7200
        for f in held:
            os.utime(f, (two_hours_ago, two_hours_ago))
        orphan = spool / ("ab" * 12)
        orphan.write_bytes(b"")  # created ahead by a process killed an hour or two ago
        os.utime(orphan, (two_hours_ago, two_hours_ago))
        await s.purge_completed(time.time() - 86400)
        assert not orphan.exists()
        assert set(spool.iterdir()) == held
        assert await s.read_data(qid) == b"k" * 100_000


async def test_the_purge_sweeps_orphans_at_most_every_orphan_sweep_interval(
    db_path: Path,
) -> None:
    spool = db_path.parent / "spool"
    async with SqliteStore(db_path) as s:  # swept at open: the next sweep is an hour away
        await s.submit(env(), b"k" * 100_000)
        orphan = spool / ("ab" * 12)
        orphan.write_bytes(b"")
        two_hours_ago = time.time() - 7200
        os.utime(orphan, (two_hours_ago, two_hours_ago))
        await s.purge_completed(time.time() - 86400)
        assert orphan.exists()


async def test_big_messages_share_one_directory_fsync_per_batch_of_spool_files(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The spool directory was fsync'd after every big message, a second flush on the path to
    the 250 (1 MB at one session: 1.2x faster without it). Files are now created READY_BATCH at
    a time, their entries made durable by one directory fsync before any is used."""
    synced: list[Path] = []
    real = spool_module.fsync_dir

    def counting(path: Path) -> None:
        synced.append(Path(path))
        real(path)

    monkeypatch.setattr(spool_module, "fsync_dir", counting)
    count = 3 * READY_BATCH
    bodies = [bytes([65 + i % 26]) * (100_000 + i) for i in range(count)]
    async with SqliteStore(db_path) as s:
        ids = await asyncio.gather(*(s.submit(env(), body) for body in bodies))
        spool_syncs = [p for p in synced if p.name == "spool"]
        assert len(spool_syncs) <= count // READY_BATCH + 1, len(spool_syncs)
        for qid, body in zip(ids, bodies, strict=True):
            assert await s.read_data(qid) == body
    assert len(spool_files(db_path)) == count


async def test_spool_files_created_ahead_are_removed_when_the_store_closes(
    db_path: Path,
) -> None:
    spool = db_path.parent / "spool"
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env(), b"q" * 100_000)
        assert len(list(spool.iterdir())) == READY_BATCH  # one written, the others waiting
    (name,) = spool_files(db_path)
    assert [p.name for p in spool.iterdir()] == [name]
    async with SqliteStore(db_path) as s:
        assert await s.read_data(qid) == b"q" * 100_000


_HOLD_READY = """
import sys
from pathlib import Path
from relaygate.queue.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
spool._take()  # a batch created ahead, one of them taken for a message being written
print("ready", flush=True)
sys.stdin.read()
"""


async def test_a_sweep_leaves_the_spool_files_another_live_process_holds_however_old(
    tmp_path: Path,
) -> None:
    """A worker restarted beside a running one sweeps orphans at open: the files the running
    one created ahead are unreferenced and, on a quiet relay, can be hours old, but they are
    its (held under flock) and one may be about to hold a message. Once that process is gone
    they are orphans like any other."""
    directory = tmp_path / "spool"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_READY, str(directory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "ready"
        files = list(directory.iterdir())
        assert len(files) == READY_BATCH
        two_hours_ago = time.time() - 7200
        for f in files:
            os.utime(f, (two_hours_ago, two_hours_ago))
        assert Spool(directory).sweep_orphans(set()) == 0
        assert len(list(directory.iterdir())) == READY_BATCH
    finally:
        holder.kill()
        holder.wait(10)
    assert Spool(directory).sweep_orphans(set()) == READY_BATCH
    assert list(directory.iterdir()) == []


def test_a_written_spool_file_is_held_until_its_row_is_settled_whatever_the_clock_says(
    tmp_path: Path,
) -> None:
    """A big message's file, written and not yet named by a committed row, is held until the
    submit releases it: a sweep sees only its modification time otherwise, and a clock stepped
    forward by hours between the write and the commit made a live message's file look like an
    old orphan."""
    directory = tmp_path / "spool"
    spool = Spool(directory)
    spool.open()
    name = spool.write(b"a message whose row is about to commit")
    two_hours_ago = time.time() - 7200
    os.utime(directory / name, (two_hours_ago, two_hours_ago))
    assert Spool(directory).sweep_orphans(set()) == 0
    assert (directory / name).exists()
    spool.release(name)  # its commit failed: an orphan now, which a sweep takes
    assert Spool(directory).sweep_orphans(set()) == 1
    assert not (directory / name).exists()
    spool.close()


def test_a_sweep_keeps_an_orphan_written_since_it_was_found_old(tmp_path: Path) -> None:
    """Found old by the scan, then written (its holder released it after the write): the fresh
    modification time seen under the flock says it is a message's, whose row may commit."""
    path = tmp_path / ("ef" * 12)
    path.write_bytes(b"a message's bytes, written just now")
    cutoff = time.time() - 3600
    assert not spool_module._unlink_unless_held(str(path), cutoff)
    assert path.exists()
    os.utime(path, (cutoff - 10, cutoff - 10))
    assert spool_module._unlink_unless_held(str(path), cutoff)
    assert not path.exists()


def spool_descriptors(spool: Path) -> list[str]:
    """This process's open descriptors on files in `spool`."""
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
    return [p for p in paths if p.startswith(f"{spool}/")]


async def test_a_big_submit_whose_spool_write_starts_after_close_leaves_no_files(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session's big submit passed the open check, but its spool write (a thread) only started
    once the store had closed (a stop past the sessions' grace time, the default executor busy):
    it created a new batch of files ahead after close had removed the last one, and nothing was
    left to remove those or close their descriptors (READY_BATCH - 1 empty files held)."""
    entered = threading.Event()
    resume = threading.Event()
    real = SqliteStore._spool_write

    def late(self: SqliteStore, blob: bytes) -> tuple[bytes, str]:
        entered.set()
        resume.wait(30)
        return real(self, blob)

    monkeypatch.setattr(SqliteStore, "_spool_write", late)
    spool = db_path.parent / "spool"
    s = SqliteStore(db_path)
    await s.open()
    submit = asyncio.create_task(s.submit(env(), b"z" * 100_000))
    assert await asyncio.to_thread(entered.wait, 30)
    await s.close()
    resume.set()
    with pytest.raises(StoreClosedError):
        await submit
    assert list(spool.iterdir()) == []
    assert spool_descriptors(spool) == []


_WRITE_NEAR_THE_FD_LIMIT = """
import os, resource, sys
from pathlib import Path
from relaygate.queue.spool import Spool
spool = Spool(Path(sys.argv[1]))
spool.open()
in_use = len(os.listdir("/proc/self/fd")) - 1  # not the listing's own descriptor
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + int(sys.argv[2]), hard))
print(spool.write(b"m" * 100_000), flush=True)
"""


@pytest.mark.parametrize("free", [2, 4])
def test_a_spool_write_near_the_descriptor_limit_creates_fewer_files_ahead(
    tmp_path: Path, free: int
) -> None:
    """A batch of files created ahead needs READY_BATCH + 1 descriptors (the directory's for
    its fsync): a process near its limit (a connection flood) refused every big message with
    EMFILE where one file at a time still fitted. It now makes the batch it can."""
    directory = tmp_path / "spool"
    done = subprocess.run(
        [sys.executable, "-c", _WRITE_NEAR_THE_FD_LIMIT, str(directory), str(free)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    name = done.stdout.strip()
    assert (directory / name).read_bytes() == b"m" * 100_000
    assert len(list(directory.iterdir())) == free - 1  # the message's and the ones left ahead


async def test_a_version_1_queue_is_upgraded_in_place(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    conn = sqlite3.connect(db_path)
    conn.executescript(
        "CREATE TABLE message_data (queue_id TEXT PRIMARY KEY, sha256 BLOB NOT NULL, "
        "data BLOB NOT NULL); PRAGMA user_version = 1;"
    )
    conn.close()
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env(), b"v" * 100_000)
        assert await s.read_data(qid) == b"v" * 100_000
    assert schema_numbers(db_path) == (2, 5)


def schema_numbers(db_path: Path) -> tuple[int, int]:
    """(PRAGMA user_version: the version every release checks, relaygate_schema.layout)."""
    conn = sqlite3.connect(db_path)
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        (layout,) = conn.execute("SELECT layout FROM relaygate_schema").fetchall()
        return version, layout[0]
    finally:
        conn.close()


async def test_a_queue_of_the_previous_release_is_upgraded_in_place(db_path: Path) -> None:
    """A queue of the release before send budgets (version 2, no send_log, no layout): its
    messages stay, send_log and graph_drafts are added, and its version stays 2, so that release
    can still open it (both are additive: only the layout goes to 5; test_schema_compat.py runs that release)."""
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env("a@x.example"), b"kept")
    conn = sqlite3.connect(db_path)
    conn.executescript(
        "DROP TABLE send_log; DROP TABLE graph_drafts; DROP TABLE relaygate_schema; "
        "PRAGMA user_version = 2;"
    )
    conn.close()
    async with SqliteStore(db_path) as s:
        assert await s.read_data(qid) == b"kept"
        limit = [SendLimit(60.0, max_messages=1)]
        assert await s.reserve_send("m365", 1000.0, 1, limit) is None
        assert await s.reserve_send("m365", 1001.0, 1, limit) == SendWait(1060.0, limit[0])
        await s.save_graph_draft(qid, "r", GraphDraft("m@x.example", "d1"))
    assert schema_numbers(db_path) == (2, 5)
    async with SqliteStore(db_path) as s:  # again, with the tables there: nothing changes
        assert await s.reserve_send("m365", 1002.0, 1, limit) == SendWait(1060.0, limit[0])
        assert await s.graph_draft(qid, "r") == GraphDraft("m@x.example", "d1")
    assert schema_numbers(db_path) == (2, 5)


async def test_a_layout_4_queue_gets_graph_drafts_message_id_and_its_release_still_writes(
    db_path: Path,
) -> None:
    """A queue of the release before graph_drafts.message_id (layout 4): the column is added
    (its records read with no Message-ID), the version stays, and that release's INSERT, which
    does not name the column, still works."""
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env("a@x.example"), b"kept")
    conn = sqlite3.connect(db_path)
    conn.executescript(
        "DROP TABLE graph_drafts; CREATE TABLE graph_drafts (queue_id TEXT NOT NULL "
        "REFERENCES messages (queue_id) ON DELETE CASCADE, route TEXT NOT NULL, mailbox TEXT "
        "NOT NULL, draft_id TEXT NOT NULL, sending INTEGER NOT NULL, PRIMARY KEY (queue_id, "
        "route)) WITHOUT ROWID; UPDATE relaygate_schema SET layout = 4;"
    )
    conn.execute(
        "INSERT INTO graph_drafts (queue_id, route, mailbox, draft_id, sending) "
        "VALUES (?, 'old', 'm@x.example', 'd0', 1)",
        (qid,),
    )
    conn.commit()
    conn.close()
    async with SqliteStore(db_path) as s:
        assert await s.graph_draft(qid, "old") == GraphDraft("m@x.example", "d0", True)
        await s.save_graph_draft(qid, "r", GraphDraft("m@x.example", "", True, "<a@x.example>"))
    assert schema_numbers(db_path) == (sqlite_store.SCHEMA_VERSION, 5)
    conn = sqlite3.connect(db_path)  # the layout 4 release's write
    conn.execute(
        "INSERT OR REPLACE INTO graph_drafts (queue_id, route, mailbox, draft_id, sending) "
        "SELECT ?, 'r2', 'm@x.example', 'd2', 0",
        (qid,),
    )
    conn.commit()
    conn.close()
    async with SqliteStore(db_path) as s:
        assert await s.graph_drafts(qid) == {
            "old": GraphDraft("m@x.example", "d0", True),
            "r": GraphDraft("m@x.example", "", True, "<a@x.example>"),
            "r2": GraphDraft("m@x.example", "d2"),
        }


async def test_a_newer_additive_layout_is_used_as_it_is(db_path: Path) -> None:
    """A later release's additive change (a table this one does not know, layout above
    SCHEMA_LAYOUT, the same version) does not lock this release out, and is not undone."""
    async with SqliteStore(db_path):
        pass
    conn = sqlite3.connect(db_path)
    conn.executescript("CREATE TABLE later (x INTEGER); UPDATE relaygate_schema SET layout = 99;")
    conn.close()
    async with SqliteStore(db_path) as s:
        qid = await s.submit(env(), b"later")
        assert await s.read_data(qid) == b"later"
    assert schema_numbers(db_path) == (sqlite_store.SCHEMA_VERSION, 99)


async def test_a_newer_version_is_refused(db_path: Path) -> None:
    """A later release's change this one cannot tolerate bumps the version: refused at open."""
    async with SqliteStore(db_path):
        pass
    conn = sqlite3.connect(db_path)
    conn.executescript("PRAGMA user_version = 99;")
    conn.close()
    with pytest.raises(StoreError, match="schema version 99 is newer than this RelayGate"):
        await SqliteStore(db_path).open()
    assert schema_numbers(db_path) == (99, sqlite_store.SCHEMA_LAYOUT)
