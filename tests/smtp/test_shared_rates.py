"""The message rate table the workers of one node share (smtp/shared_rates.py), on real files and
real processes: window, eviction, a full table, recreation, concurrent and killed writers."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaygate.config.model import ReceiveConnector
from relaygate.smtp import shared_rates
from relaygate.smtp.limits import AuthFailures, RateLimiter
from relaygate.smtp.shared_rates import (
    BUCKETS,
    HEADER_SIZE,
    SLOT_SIZE,
    SharedRateTable,
    TableMismatch,
    create,
    key_digest,
)

ROOT = Path(__file__).resolve().parents[2]
T0 = 10_000.0  # a monotonic time: the tests pass their own clock
K = key_digest("Client Submission", "user", "scanner")


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "message-rates"


@pytest.fixture
def table(path: Path) -> Iterator[SharedRateTable]:
    token = create(path, slots=64)
    t = SharedRateTable.open(path, token)
    yield t
    t.close()


def count(t: SharedRateTable, key: bytes, now: float) -> int:
    counts = t.counts([key], now)
    assert counts is not None
    return counts[0]


def test_window_counts_a_message_for_60_to_61_seconds(table: SharedRateTable) -> None:
    assert table.add([K], T0 + 0.9) == []
    assert count(table, K, T0 + 0.9) == 1
    assert table.add([K, K], T0 + 30.0) == []  # one key twice: two events
    assert count(table, K, T0 + 30.5) == 3
    # the first event's second ended at T0 + 1: it counts until T0 + 61, i.e. 60.1 s after it
    assert count(table, K, T0 + 60.99) == 3
    assert count(table, K, T0 + 61.0) == 2
    assert count(table, K, T0 + 90.99) == 2
    assert count(table, K, T0 + 91.0) == 0
    assert count(table, key_digest("Client Submission", "user", "printer"), T0) == 0


def test_ring_reuses_a_bucket_a_window_later(table: SharedRateTable) -> None:
    for second in range(0, 3 * BUCKETS, 7):  # many laps of the ring, sparse
        table.add([K], T0 + second)
        expected = len([s for s in range(0, second + 1, 7) if s >= second - 60])
        assert count(table, K, T0 + second) == expected, second


def test_subtract_takes_back_one_event_of_its_second_only(table: SharedRateTable) -> None:
    """An AUTH attempt counted as failed, then succeeded: its event is taken back, not another
    second's; once its bucket left the window or went to a later second, nothing changes."""
    table.add([K], T0 + 1.2)
    table.add([K, K], T0 + 5.5)
    assert table.subtract(K, T0 + 5.1) is True  # same second as the two at T0 + 5.5
    assert count(table, K, T0 + 6) == 2
    assert table.subtract(K, T0 + 3.0) is True  # a second with nothing in it: no underflow
    assert count(table, K, T0 + 6) == 2
    assert table.subtract(key_digest("c", "auth-failures", "127.0.0.9"), T0 + 1.2) is True
    assert count(table, K, T0 + 6) == 2  # another key: nothing taken from K
    table.add([K], T0 + 1.0 + BUCKETS)  # the ring's bucket of T0 + 1 now holds a later second
    assert table.subtract(K, T0 + 1.2) is True
    assert count(table, K, T0 + 1.0 + BUCKETS) == 2  # T0 + 5's one and the new one


def test_full_table_refuses_new_keys_until_a_slot_expires(path: Path) -> None:
    t = SharedRateTable.open(path, create(path, slots=4))
    try:
        keys = [key_digest("c", "user", f"u{i}") for i in range(5)]
        assert t.add(keys[:4], T0) == []
        assert t.add([keys[4]], T0 + 30) == [keys[4]]  # no room: the caller counts it itself
        assert t.add([keys[0]], T0 + 30) == []  # known keys still count
        assert count(t, keys[4], T0 + 30) == 0
        # keys 1..3 expire (their newest second is more than 60 s old); key 0 is still live
        assert t.add([keys[4]], T0 + 61) == []
        assert count(t, keys[4], T0 + 61) == 1  # starts from nothing in the slot it took over
        assert count(t, keys[0], T0 + 61) == 1
        assert sum(count(t, k, T0 + 61) for k in keys[1:4]) == 0
        assert t.add(keys[1:3], T0 + 62) == []  # the other two expired slots
        assert t.add([keys[3]], T0 + 62) == [keys[3]]  # full again
    finally:
        t.close()


def test_create_replaces_a_stale_table_and_open_refuses_other_layouts(path: Path) -> None:
    old = create(path, slots=8)
    t = SharedRateTable.open(path, old)
    t.add([K], T0)
    t.close()
    new = create(path, slots=8)  # a new run of relaygate serve: counts of the last one are gone
    assert new != old
    with pytest.raises(TableMismatch, match="another run"):
        SharedRateTable.open(path, old)
    t = SharedRateTable.open(path, new)
    assert count(t, K, T0) == 0
    t.close()

    raw = bytearray(path.read_bytes())
    raw[8] = shared_rates.VERSION + 1  # another layout version
    path.write_bytes(bytes(raw))
    with pytest.raises(TableMismatch, match="version"):
        SharedRateTable.open(path, new)
    path.write_bytes(bytes(raw[:HEADER_SIZE]))
    with pytest.raises(TableMismatch):
        SharedRateTable.open(path)
    path.write_bytes(b"")
    with pytest.raises(TableMismatch):
        SharedRateTable.open(path)
    create(path, slots=8)  # and creation makes a good one over any of them
    SharedRateTable.open(path).close()
    assert not [p for p in path.parent.iterdir() if p.name != path.name]  # no temporary left


def test_a_worker_without_a_usable_table_counts_alone(
    path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(shared_rates.RATE_TABLE_ENV, raising=False)
    assert SharedRateTable.from_env() is None  # not a supervisor's worker
    monkeypatch.setenv(shared_rates.RATE_TABLE_ENV, f"{'00' * 16} {path}")
    create(path)
    with caplog.at_level(logging.ERROR):
        assert SharedRateTable.from_env() is None  # another run's table
    assert "counted per worker" in caplog.text
    token = create(path)
    monkeypatch.setenv(shared_rates.RATE_TABLE_ENV, f"{token.hex()} {path}")
    t = SharedRateTable.from_env()
    assert t is not None
    t.close()


def test_rate_limiter_counts_users_in_the_shared_table_and_addresses_when_told(
    path: Path,
) -> None:
    """Two limiters on one table stand for two workers: a user is limited across them; an address
    only when share_ip (worker_balance = "connection"); else each worker counts its own."""
    token = create(path, slots=64)
    w0 = RateLimiter(SharedRateTable.open(path, token))
    w1 = RateLimiter(SharedRateTable.open(path, token))
    user = ReceiveConnector(name="c", message_rate_limit=2, message_rate_source="User")
    ip = ReceiveConnector(name="d", message_rate_limit=1, message_rate_source="IPAddress")
    both = ReceiveConnector(name="e", message_rate_limit=1, message_rate_source="All")
    w0.record(user, "127.0.0.5", T0, user="scanner")
    w1.record(user, "127.0.0.6", T0, user="scanner")
    assert not w0.allowed(user, "127.0.0.7", T0 + 1, user="scanner")
    assert not w1.allowed(user, "127.0.0.5", T0 + 1, user="scanner")
    assert w1.allowed(user, "127.0.0.5", T0 + 1, user="printer")
    assert w0.allowed(user, "127.0.0.5", T0 + 61, user="scanner")  # the window slid

    w0.record(ip, "127.0.0.5", T0)  # an address is on one worker: counted there only
    assert not w0.allowed(ip, "127.0.0.5", T0)
    assert w1.allowed(ip, "127.0.0.5", T0)
    for w in (w0, w1):  # ... unless its sessions may reach any worker
        w.share_addresses(unsteered=True)
    w0.record(ip, "127.0.0.9", T0)
    assert not w1.allowed(ip, "127.0.0.9", T0)

    for w in (w0, w1):  # All: the user key is shared, the address key is not
        w.share_addresses(unsteered=False)
    w0.record(both, "127.0.0.5", T0, user="printer")
    assert not w1.allowed(both, "127.0.0.6", T0, user="printer")  # the user, on another worker
    assert not w0.allowed(both, "127.0.0.5", T0, user="someone")  # the address, on its worker
    assert w1.allowed(both, "127.0.0.5", T0, user="someone")

    for w in (w0, w1):  # trusted proxies: a client's address may reach any worker too
        w.share_addresses(proxied=True)
    w0.record(ip, "192.0.2.7", T0)
    assert not w1.allowed(ip, "192.0.2.7", T0)
    w1.share_addresses(proxied=False)
    assert w1.allowed(ip, "192.0.2.7", T0)


def test_rate_limiter_counts_alone_what_a_full_table_cannot_hold(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    token = create(path, slots=1)
    rates = RateLimiter(SharedRateTable.open(path, token))
    c = ReceiveConnector(name="c", message_rate_limit=2, message_rate_source="User")
    with caplog.at_level(logging.WARNING):
        rates.record(c, "127.0.0.5", T0, user="a")  # takes the only slot
        rates.record(c, "127.0.0.5", T0, user="b")  # no room: counted in this process
        rates.record(c, "127.0.0.5", T0, user="b")
    assert caplog.text.count("logged once") == 1
    assert not rates.allowed(c, "127.0.0.5", T0, user="b")  # the limit holds (in this process)
    assert rates.allowed(c, "127.0.0.5", T0, user="a")


def test_auth_failures_count_in_the_shared_table_when_addresses_are_shared(path: Path) -> None:
    """Two workers' AuthFailures on one table: failures from one address in either count for
    both once share_ip is set; a success is taken back from the table."""
    token = create(path, slots=64)
    one, two = (AuthFailures(SharedRateTable.open(path, token)) for _ in range(2))
    c = ReceiveConnector(name="c", logon_failure_rate_limit=2)
    for worker in (one, two):
        worker.share_addresses(unsteered=True)
    one.begin(c, "127.0.0.9")
    ok = two.begin(c, "127.0.0.9")
    assert not one.allowed(c, "127.0.0.9") and not two.allowed(c, "127.0.0.9")
    two.succeeded(c, "127.0.0.9", ok)
    assert one.allowed(c, "127.0.0.9") and two.allowed(c, "127.0.0.9")
    assert one.allowed(c, "127.0.0.10")


def test_an_ipv6_network_is_counted_in_the_shared_table_even_when_steered(path: Path) -> None:
    """Steering hashes whole addresses: a /64's addresses reach different workers, so its count
    is the node's although addresses are not shared (share_ip unset)."""
    token = create(path, slots=64)
    one, two = (AuthFailures(SharedRateTable.open(path, token)) for _ in range(2))
    c = ReceiveConnector(name="c", logon_failure_rate_limit=2)
    one.begin(c, "2001:db8:1:2::1")
    two.begin(c, "2001:db8:1:2::2")
    assert not one.allowed(c, "2001:db8:1:2::3") and not two.allowed(c, "2001:db8:1:2::4")
    assert one.allowed(c, "2001:db8:1:3::1")
    one.begin(c, "127.0.0.9")  # an address, steered: counted in its worker alone
    two.begin(c, "127.0.0.9")
    assert one.allowed(c, "127.0.0.9") and two.allowed(c, "127.0.0.9")


# -- processes ------------------------------------------------------------------------------------

ADDER = """
import sys, time
from pathlib import Path
from relaygate.smtp.shared_rates import SharedRateTable, key_digest
table = SharedRateTable.open(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
key = key_digest("Client Submission", "user", "scanner")
print("ready", flush=True)
sys.stdin.readline()  # go
for i in range(int(sys.argv[3])):
    assert table.add([key], 10000.0 + i % 50) == []
print("done", flush=True)
"""

LOCKER = """
import sys, time
from pathlib import Path
from relaygate.smtp.shared_rates import SharedRateTable
table = SharedRateTable.open(Path(sys.argv[1]), bytes.fromhex(sys.argv[2]))
assert table._lock()
print("locked", flush=True)
time.sleep(60)
"""


def python(script: str, *args: str) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _kill(p: subprocess.Popen[str]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


def test_two_processes_adding_at_once_give_exact_totals(path: Path) -> None:
    token = create(path, slots=64)
    n = 20000
    procs = [python(ADDER, str(path), token.hex(), str(n)) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:  # both start at (nearly) once
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "done"
            assert p.wait(60) == 0
    finally:
        for p in procs:
            _kill(p)
    t = SharedRateTable.open(path, token)
    try:
        assert count(t, K, T0 + 49) == 2 * n
    finally:
        t.close()


def test_a_process_killed_while_holding_the_lock_does_not_block_the_others(path: Path) -> None:
    token = create(path, slots=64)
    t = SharedRateTable.open(path, token)
    p = python(LOCKER, str(path), token.hex())
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "locked"
        started = time.monotonic()
        assert t.counts([K], T0) is None  # held: given up after LOCK_WAIT, not blocked
        assert t.add([K], T0) == [K]
        assert time.monotonic() - started < 2
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        assert t.add([K], T0) == []  # the kernel released the dead holder's lock
        assert count(t, K, T0) == 1
    finally:
        _kill(p)
        t.close()


def test_a_process_killed_mid_update_loses_a_count_at_most_and_blocks_nothing(
    path: Path,
) -> None:
    """Killed at an arbitrary moment of a tight loop of updates: whatever it left is a count no
    higher than what it added, and it expires with the window."""
    token = create(path, slots=64)
    t = SharedRateTable.open(path, token)
    p = python(ADDER, str(path), token.hex(), "1000000")
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        deadline = time.monotonic() + 20
        while count(t, K, T0 + 49) < 5000 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        left = count(t, K, T0 + 49)
        assert 5000 <= left < 1000000
        assert t.add([K], T0 + 49) == []
        assert count(t, K, T0 + 49) == left + 1
        assert count(t, K, T0 + 49 + 61) == 0  # nothing stuck
    finally:
        _kill(p)
        t.close()


def test_torn_updates_count_nothing(table: SharedRateTable, path: Path) -> None:
    """The states a worker killed between two writes of `add` leaves (module doc): none counts
    a message it had not finished adding, none keeps a slot from being reused."""
    table.add([K], T0)
    other = key_digest("c", "user", "other")
    # Killed after a bucket's count, before its second: a new second's bucket of K, count 7,
    # still carrying the second of a lap ago.
    at = _slot_of(table, K)
    bucket = at + 24 + ((int(T0) + 5) % BUCKETS) * 8
    raw = table._mm
    raw[bucket + 4 : bucket + 8] = (7).to_bytes(4, "little")
    raw[bucket : bucket + 4] = (int(T0) + 5 - BUCKETS).to_bytes(4, "little")
    assert count(table, K, T0 + 5) == 1
    # Killed after taking over an expired slot's key, before anything else: counts nothing.
    raw[at : at + 16] = other
    assert count(table, other, T0 + 70) == 0
    assert table.add([K], T0 + 70) == []  # K finds a slot (the same one: expired)
    assert count(table, K, T0 + 70) == 1
    assert count(table, other, T0 + 70) == 0


def _slot_of(t: SharedRateTable, key: bytes) -> int:
    for i in range(t.slots):
        at = HEADER_SIZE + i * SLOT_SIZE
        if bytes(t._mm[at : at + 16]) == key:
            return at
    raise AssertionError("key not in the table")


def test_the_table_is_allocated_when_created_not_when_a_slot_is_written(path: Path) -> None:
    """A write to a hole of a shared mapping on a full disk is a SIGBUS: the worker would die
    between storing a message and answering 250 (reproduced on a full tmpfs). So every block of
    the table is allocated by `create`, where a full disk is an OSError the supervisor handles
    (message_rate_limit then counted per worker)."""
    create(path, slots=256)
    st = os.stat(path)
    assert st.st_size == HEADER_SIZE + 256 * SLOT_SIZE
    assert st.st_blocks * 512 >= st.st_size


def test_no_room_for_the_table_is_an_oserror_and_leaves_nothing(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space left"):
        create(path)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []
