"""One node per data directory, and per server.name on a shared queue database
(`relaygate.node_lock`). Real `relaygate serve` processes: with `server.workers > 1` the listening
ports are SO_REUSEPORT, so a second start with the same config bound them too and ran as the same
node, releasing the first one's queue leases."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from relaygate.config.loader import load_config
from relaygate.node_lock import LOCK_FILE, NodeLock, NodeLockError, name_lock_key
from tests.smtp.conftest import ROOT, RelayHandle, relay_connector


def serve_once(config_path: Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """`relaygate serve` with `config_path`, expected to refuse to start (bounded in time)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(config_path)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=config_path.parent,
    )


def send_one(node: RelayHandle, source: str = "127.0.0.5") -> None:
    with node.smtp(source=source) as client:
        client.sendmail("scanner@corp.example", ["user@corp.example"], b"Subject: t\r\n\r\nx\r\n")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_second_serve_with_the_same_data_dir_is_refused(relay: Any, workers: int) -> None:
    node = relay([relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": workers})
    assert node.proc is not None
    second = serve_once(node.config_path)
    assert second.returncode == 1, second.stderr
    assert (
        f"cannot start: another relaygate serve (pid {node.proc.pid}) is running with data_dir "
        f"{str(node.data_dir)!r}"
    ) in second.stderr
    assert "RelayGate ready" not in second.stdout
    assert node.proc.poll() is None
    send_one(node)  # the first node still serves


def test_a_killed_node_starts_again_at_once(relay: Any) -> None:
    node = relay([relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": 2})
    node.kill()  # SIGKILL: the kernel drops the flock with the process
    node.start()
    send_one(node)
    assert (node.data_dir / LOCK_FILE).read_text().strip() == str(node.proc.pid)


def test_the_directory_lock_names_the_holder(tmp_path: Path) -> None:
    first = NodeLock(tmp_path, "RELAY01")
    first.acquire()
    try:
        with pytest.raises(NodeLockError, match=rf"pid {os.getpid()}\)"):
            NodeLock(tmp_path, "RELAY01").acquire()
    finally:
        first.release()
    again = NodeLock(tmp_path, "RELAY01")
    again.acquire()  # released: taken at once
    again.release()


def test_name_keys_ignore_case_and_differ_between_names() -> None:
    assert name_lock_key("relay01") == name_lock_key("RELAY01")
    assert name_lock_key("RELAY01") != name_lock_key("RELAY02")


def pg_node(relay: Any, name: str, url: str) -> RelayHandle:
    node: RelayHandle = relay(
        [relay_connector(["127.0.0.0/24"])],
        mode="process",
        server={"name": name},
        queue={"store": "postgresql", "database_url": url},
        start=False,
    )
    node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
    node.config = load_config(node.config_path)
    return node


def test_two_cluster_nodes_with_one_server_name_are_refused(postgres_url: str, relay: Any) -> None:
    """Each node takes back the leases its name owns when it starts: a second node with the same
    name (another data_dir, another machine) would take the first one's messages in flight."""
    first = pg_node(relay, "EDGE1", postgres_url).start()
    assert first.proc is not None
    twin = pg_node(relay, "edge1", postgres_url)  # names compare case-insensitively
    refused = serve_once(twin.config_path)
    assert refused.returncode == 1, refused.stderr
    assert "cannot start: server.name 'edge1' is in use by another node" in refused.stderr
    assert "relaygate node EDGE1 on " in refused.stderr
    assert f"(pid {first.proc.pid})" in refused.stderr
    assert "every node of a cluster needs its own server.name" in refused.stderr
    other = pg_node(relay, "EDGE2", postgres_url).start()  # another name shares the database
    send_one(first)
    send_one(other)
    first.kill()  # the database drops the lock with the dead node's connection
    twin.start()
    send_one(twin)


def test_an_unreachable_database_is_named_without_its_password(relay: Any) -> None:
    """The name's lock is taken before the store opens: its failure reads as the store's."""
    url = "postgresql://relay:s3cret-pw@127.0.0.1:1/queue"
    node = pg_node(relay, "EDGE9", url)
    refused = serve_once(node.config_path)
    assert refused.returncode == 1
    assert (
        "cannot start: cannot connect to the queue database postgresql://relay@127.0.0.1:1/queue: "
        "connection failed"
    ) in refused.stderr
    assert "s3cret" not in refused.stderr + refused.stdout


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def test_a_restart_waits_for_the_workers_of_a_killed_supervisor(relay: Any) -> None:
    """SIGKILL of the supervisor leaves its workers running until they notice and finish what
    they deliver; they keep their queue leases meanwhile. A new `relaygate serve` on the same
    data_dir drops this node's leases when it starts: it must not start (and release the leases
    of deliveries still in progress) before the old workers are gone."""
    node = relay([relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": 2})
    assert node.proc is not None
    workers = _children(node.proc.pid)
    assert len(workers) == 2
    for pid in workers:  # still delivering: they outlive their supervisor for a while
        os.kill(pid, signal.SIGSTOP)
    node.kill()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    second = subprocess.Popen(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(node.config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=node.config_path.parent,
    )
    try:
        time.sleep(4)
        assert second.poll() is None, second.communicate()
        ready = select.select([second.stdout], [], [], 0)[0]
        assert not ready, "the second serve started beside the old workers"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        assert second.stdout is not None
        assert select.select([second.stdout], [], [], 60)[0], "the second serve did not start"
        line = second.stdout.readline()
        assert line.startswith("RelayGate ready"), line
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        second.terminate()
        _out, err = second.communicate(timeout=30)
    assert f"waiting for the workers of relaygate serve pid {node.proc.pid}" in err


def test_a_full_disk_does_not_stop_the_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The relay starts on a full disk (it refuses mail with 452 until there is room again, as
    the release before the lock did): the pid in the lock file is only for a second start's
    message, so failing to write it (ENOSPC; reproduced on a full tmpfs) is logged, not fatal.
    A second start then refuses at once ("pid unknown"), not taking a stale pid for a gone
    supervisor."""
    (tmp_path / LOCK_FILE).write_text("999999999\n")  # a previous run's, long gone

    def full(fd: int, data: bytes, offset: int) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    first = NodeLock(tmp_path, "RELAY01")
    first.acquire()
    try:
        assert "cannot write this process's pid" in caplog.text
        with pytest.raises(NodeLockError, match=r"\(pid unknown\)"):
            NodeLock(tmp_path, "RELAY01").acquire()
    finally:
        first.release()


def test_a_data_dir_that_cannot_hold_the_lock_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(NodeLockError, match=r"cannot open the node lock file .*server\.data_dir"):
        NodeLock(tmp_path / "file" / "data", "RELAY01").acquire()


def test_workers_of_a_gone_supervisor_that_do_not_stop_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lock held past ORPHAN_WAIT by the workers of a supervisor that is gone: the error says
    so, not that the dead pid is running."""
    from relaygate import node_lock

    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'999999999\\n'); print(flush=True); "
            "time.sleep(60)",
            str(tmp_path / LOCK_FILE),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
        monkeypatch.setattr(node_lock, "ORPHAN_WAIT", 0.5)
        with pytest.raises(NodeLockError, match=r"the workers of relaygate serve pid 999999999"):
            NodeLock(tmp_path, "RELAY01").acquire()
    finally:
        holder.kill()
        holder.wait()
    again = NodeLock(tmp_path, "RELAY01")
    again.acquire()  # they are gone: taken
    again.release()
