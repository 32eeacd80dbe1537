"""Security-bar item 190: the queue's stored bytes damaged at random (bit flips, truncation, garbage,
spliced garbage) are never read back as a message: every change makes `read_data` raise
CorruptMessageError, nothing else (no other exception, no wrong bytes), and the store goes on
serving the undamaged messages. Seeded: a failure names the seed and the mutation.

Both places a message lives are damaged: the `message_data` row of a small message and the spool
file of a big one (over 64 KB). What the queue manager does with a CorruptMessageError (the message
suspended, a POISONMESSAGE event) is tests/queue_manager/test_tracking_events.py.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import CorruptMessageError
from tests.queue.test_store_contract import env

ROUNDS = 60  # per kind of message; each round damages a fresh copy

Mutation = Callable[[random.Random, bytes], bytes]


def _flip_bits(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def _truncate(rng: random.Random, data: bytes) -> bytes:
    return data[: rng.randrange(len(data))]


def _append(rng: random.Random, data: bytes) -> bytes:
    return data + rng.randbytes(rng.randint(1, 64))


def _garbage(rng: random.Random, data: bytes) -> bytes:
    return rng.randbytes(rng.randint(1, len(data) * 2))


def _splice(rng: random.Random, data: bytes) -> bytes:
    i = rng.randrange(len(data))
    return data[:i] + rng.randbytes(rng.randint(1, 32)) + data[i + 1 :]


MUTATIONS: list[Mutation] = [_flip_bits, _truncate, _append, _garbage, _splice]


def _content(rng: random.Random, size: int) -> bytes:
    head = b"Subject: fuzz\r\n\r\n"
    return head + bytes(rng.choice(b"abc\r\n.") for _ in range(size - len(head)))


def _row(db_path: Path, queue_id: str) -> bytes:
    with sqlite3.connect(db_path) as conn:
        (data,) = conn.execute(
            "SELECT data FROM message_data WHERE queue_id = ?", (queue_id,)
        ).fetchone()
    return bytes(data)


def _set_row(db_path: Path, queue_id: str, data: bytes) -> None:
    conn = sqlite3.connect(db_path)
    with conn:
        conn.execute("UPDATE message_data SET data = ? WHERE queue_id = ?", (data, queue_id))
    conn.close()


def _written_spool_files(db_path: Path) -> set[Path]:
    """The spool files that hold a message (not the empty ones created ahead, spool.py)."""
    spool = db_path.parent / "spool"
    return {p for p in spool.iterdir() if p.stat().st_size} if spool.exists() else set()


async def _damaged_read_is_refused(
    store: SqliteStore, queue_id: str, where: str, damage: Mutation, seed: int
) -> None:
    """Every change of the stored octets is caught (the checksum covers them all)."""
    try:
        got = await store.read_data(queue_id)
    except CorruptMessageError:
        return
    raise AssertionError(
        f"seed {seed}: {damage.__name__} on the {where} read back as a message ({len(got)} octets)"
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_damaged_message_bytes_never_read_back_as_a_message(
    tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    db_path = tmp_path / "data" / "queue" / "queue.db"
    async with SqliteStore(db_path) as store:
        keeper = await store.submit(env(), b"Subject: untouched\r\n\r\nkeep\r\n")
        damaged_count = 0
        for round_ in range(ROUNDS):
            damage = rng.choice(MUTATIONS)
            # a small message: its bytes are a row of the database
            small = _content(rng, rng.randint(30, 4000))
            qid = await store.submit(env(), small)
            stored = _row(db_path, qid)
            damaged = damage(rng, stored)
            if damaged != stored:
                _set_row(db_path, qid, damaged)
                await _damaged_read_is_refused(store, qid, "row", damage, seed)
                damaged_count += 1
            # a big message: its bytes are a spool file
            if round_ % 4 == 0:
                before = _written_spool_files(db_path)
                big = _content(rng, rng.randint(70_000, 140_000))
                qid = await store.submit(env(), big)
                (path,) = _written_spool_files(db_path) - before
                stored = path.read_bytes()
                damaged = damage(rng, stored)
                if damaged != stored:
                    path.write_bytes(damaged)
                    await _damaged_read_is_refused(store, qid, "spool file", damage, seed)
                    damaged_count += 1
        assert damaged_count > ROUNDS  # rows and spool files were damaged, every time caught
        # the undamaged message is still read as it was
        assert await store.read_data(keeper) == b"Subject: untouched\r\n\r\nkeep\r\n"
