"""Open connections counted for the node (relaygate.node_connections): two workers' limits in one
process, each with its own NodeConnectionLimits over one table file, as two worker processes map it.
(The real processes: tests/workers/test_workers.py, worker_balance = "connection".)"""

from __future__ import annotations

import dataclasses
import stat
from pathlib import Path
from typing import Any

from relaygate import replies
from relaygate.config.model import ReceiveConnector
from relaygate.node_connections import NodeConnectionLimits, NodeConnections, create

CONNECTOR = dataclasses.replace(
    ReceiveConnector(name="Relay"),
    max_inbound_connection=3,
    max_inbound_connection_per_source=2,
    max_inbound_connection_percentage_per_source=100,  # (2 %: one per source under 50 in all)
)


def two_workers(tmp_path: Path, slots: int = 64) -> tuple[NodeConnectionLimits, ...]:
    path = tmp_path / "connections"
    token = create(path, 2, slots=slots)
    return tuple(NodeConnectionLimits(NodeConnections.open(path, token), i) for i in range(2))


def test_the_connector_total_and_the_source_limit_are_the_nodes(tmp_path: Path) -> None:
    """max_inbound_connection 3 and per source 2 over two workers: 3 and 2 in all, not each."""
    w0, w1 = two_workers(tmp_path)
    assert w0.admit(CONNECTOR, "10.0.0.1") is None
    assert w1.admit(CONNECTOR, "10.0.0.1") is None
    assert w0.admit(CONNECTOR, "10.0.0.1") is replies.SOURCE_CONNECTIONS_EXCEEDED
    assert w1.admit(CONNECTOR, "10.0.0.2") is None
    assert w0.admit(CONNECTOR, "10.0.0.3") is replies.SERVER_CONNECTIONS_EXCEEDED
    w1.release(CONNECTOR, "10.0.0.1")  # closed: counted out at once
    assert w0.admit(CONNECTOR, "10.0.0.3") is None
    assert (w0.total(), w1.total()) == (2, 1)  # each worker's own gauge


def test_a_dead_workers_connections_are_counted_out(tmp_path: Path) -> None:
    w0, w1 = two_workers(tmp_path)
    assert w1.admit(CONNECTOR, "10.0.0.1") is None
    assert w1.admit(CONNECTOR, "10.0.0.1") is None
    assert w0.admit(CONNECTOR, "10.0.0.1") is replies.SOURCE_CONNECTIONS_EXCEEDED
    w0.table.clear_worker(1)  # the supervisor saw worker 1 exit
    assert w0.admit(CONNECTOR, "10.0.0.1") is None


def test_a_full_table_counts_in_the_worker_and_releases_there(tmp_path: Path) -> None:
    """No slot for a new address: its worker counts it alone (the limits per worker, as before),
    and its release does not touch the table."""
    connector = dataclasses.replace(CONNECTOR, max_inbound_connection=None)
    w0, w1 = two_workers(tmp_path, slots=2)  # the connector key and one address
    assert w0.admit(connector, "10.0.0.1") is None
    assert w0.admit(connector, "10.0.0.2") is None  # no slot: counted by worker 0 alone
    assert w0.admit(connector, "10.0.0.2") is None
    assert w0.admit(connector, "10.0.0.2") is replies.SOURCE_CONNECTIONS_EXCEEDED
    w0.release(connector, "10.0.0.2")
    w0.release(connector, "10.0.0.2")
    w0.release(connector, "10.0.0.1")
    assert w1.admit(connector, "10.0.0.1") is None
    assert w1.admit(connector, "10.0.0.1") is None
    assert w0.admit(connector, "10.0.0.1") is replies.SOURCE_CONNECTIONS_EXCEEDED


def key_at(home: int, name: bytes) -> bytes:
    """A 16-byte key whose home slot is `home` (its first 8 bytes, little-endian, modulo)."""
    return home.to_bytes(8, "little") + name.ljust(8, b".")


def test_two_keys_of_one_connection_never_share_a_slot(tmp_path: Path) -> None:
    """A key whose connections all closed keeps its slot, counting nothing. A connection whose
    other key is new must not place that key in this slot (it looks free), or the two keys
    would count each other's connections."""
    w0, _w1 = two_workers(tmp_path, slots=2)
    table = w0.table
    old, source, new = key_at(0, b"old"), key_at(1, b"source"), key_at(1, b"new")
    slots = table.admit((old, source), 0, lambda _c, _s: None)
    assert isinstance(slots, tuple)
    table.release(slots, 0)
    # `new` probes the source's slot first (home 1), free-looking; then the old key's (home 0)
    assert isinstance(table.admit((new, source), 0, lambda _c, _s: None), tuple)
    new_at, source_at = (table._find(k, place=False) for k in (new, source))
    assert None not in (new_at, source_at) and new_at != source_at
    assert (table._total(new_at), table._total(source_at)) == (1, 1)


def test_a_connection_is_counted_out_while_another_process_holds_the_lock(tmp_path: Path) -> None:
    """A release writes only its worker's own column and takes no lock: a connection closing
    while another worker holds the table's lock (or was stopped holding it) is counted out at
    once. It stayed counted until its worker exited, and its close cost two system calls."""
    import fcntl
    import os

    w0, w1 = two_workers(tmp_path)
    assert w0.admit(CONNECTOR, "10.0.0.1") is None
    assert w0.admit(CONNECTOR, "10.0.0.1") is None
    holder = os.open(tmp_path / "connections", os.O_RDWR)  # another process's open file
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        w0.release(CONNECTOR, "10.0.0.1")
    finally:
        os.close(holder)
    assert w1.admit(CONNECTOR, "10.0.0.1") is None  # one from the source is open, not two
    assert w1.admit(CONNECTOR, "10.0.0.1") is replies.SOURCE_CONNECTIONS_EXCEEDED


def test_the_table_is_in_data_dir_when_another_user_could_have_made_its_shared_memory_folder(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """/dev/shm is every local user's: a folder of the table's name that anyone may write (made
    first by another user, to swap the table under the workers) is not used; data_dir is."""
    from relaygate import node_connections

    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(node_connections, "SHARED_MEMORY", shm)
    data = tmp_path / "data"
    path = node_connections.table_path(data)
    assert path.parent.parent == shm
    create(path, 2)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert node_connections.table_path(data) == path  # ours: used again
    path.parent.chmod(0o777)
    assert node_connections.table_path(data) == data / "run" / "connections"
