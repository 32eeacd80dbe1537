"""One node per data directory, and per server.name on a shared queue database
(`relaygate.node_lock`). Real `relaygate serve` processes: with `server.workers > 1` the listening
ports are SO_REUSEPORT, so a second start with the same config bound them too and ran as the same
node, releasing the first one's queue leases."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import smtplib
import socket
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


def pg_node(relay: Any, name: str, url: str, *, workers: int = 1) -> RelayHandle:
    node: RelayHandle = relay(
        [relay_connector(["127.0.0.0/24"])],
        mode="process",
        server={"name": name, "workers": workers},
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
    waiting = f"waiting for the workers of relaygate serve pid {node.proc.pid}"
    err = ""
    try:
        # Until the second serve says it waits (a loaded machine may take seconds to start it;
        # killing the workers before it reached the lock would test nothing), then a while more.
        assert second.stderr is not None
        deadline = time.monotonic() + 60
        while waiting not in err and time.monotonic() < deadline:
            if select.select([second.stderr], [], [], 1)[0]:
                line = second.stderr.readline()
                assert line, f"the second serve ended: {err}"
                err += line
        assert waiting in err, err
        time.sleep(2)
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
        _out, rest = second.communicate(timeout=30)
    assert waiting in err + rest


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


def _gone(pid: int) -> bool:
    """The process has exited (a zombie no init reaps counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(_gone(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running after {timeout:g} s: {pids}"
        time.sleep(0.1)


def test_the_workers_of_a_killed_supervisor_keep_the_server_name(
    postgres_url: str, relay: Any
) -> None:
    """SIGKILL of the supervisor leaves its workers finishing their deliveries under their queue
    leases. The directory lock stops a restart on this machine; a node with the same name on
    another machine (another data_dir) takes this name's leases when it starts, so it must be
    refused too while those workers live, and start once they are gone."""
    first = pg_node(relay, "EDGE3", postgres_url, workers=2).start()
    assert first.proc is not None
    workers = _children(first.proc.pid)
    assert len(workers) == 2
    twin = pg_node(relay, "edge3", postgres_url)  # another data_dir: another machine
    try:
        refused = serve_once(twin.config_path)  # the supervisor holds the name too
        assert refused.returncode == 1, refused.stderr
        assert "cannot start: server.name 'edge3' is in use by another node" in refused.stderr
        assert "relaygate node EDGE3 on " in refused.stderr
        assert f"(pid {first.proc.pid})" in refused.stderr
        for pid in workers:  # still delivering: they outlive their supervisor for a while
            os.kill(pid, signal.SIGSTOP)
        first.kill()
        try:
            refused = serve_once(twin.config_path, timeout=15)
        except subprocess.TimeoutExpired:
            pytest.fail("a node with the same server.name started beside the orphan workers")
        assert refused.returncode == 1, refused.stderr
        assert "RelayGate ready" not in refused.stdout
        assert "cannot start: server.name 'edge3' is in use by another node" in refused.stderr
        assert "worker processes of a relaygate serve that is gone still hold it" in refused.stderr
        for index, pid in enumerate(workers):
            assert f"relaygate worker {index} of node EDGE3 (pid " in refused.stderr
            assert f"of node EDGE3 (pid {pid}) on " in refused.stderr
        assert f"(pid {first.proc.pid})" not in refused.stderr
        for pid in workers:  # they see their supervisor gone, finish and exit by themselves
            os.kill(pid, signal.SIGCONT)
        _wait_gone(workers, 15)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    twin.start()
    send_one(twin)
    twin.kill()
    first.start()  # the same node again, now that none of its processes runs: at once
    send_one(first)


def test_a_worker_that_cannot_hold_the_server_name_does_not_serve(
    postgres_url: str, relay: Any
) -> None:
    """A worker takes the name shared before it opens the queue or listens: refused while
    another node holds the name, and when its supervisor is gone (killed before the worker held
    the name: another node may hold it shared by now), it exits without serving."""
    node = pg_node(relay, "EDGE4", postgres_url, workers=2)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    serve = [sys.executable, "-m", "relaygate", "serve", "--config", str(node.config_path)]
    other = NodeLock(node.tmp / "other", "EDGE4", postgres_url)
    other.acquire()  # another node runs with this name
    try:
        worker = subprocess.run(
            [*serve, "--worker-index", "0"],
            capture_output=True, text=True, timeout=15, env=env, cwd=node.tmp,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("a worker served while another node held its server.name")
    finally:
        other.release()
    assert worker.returncode == 1, worker.stderr
    assert "cannot start: server.name 'EDGE4' is in use by another node" in worker.stderr
    assert f"(pid {os.getpid()})" in worker.stderr
    assert "RelayGate ready" not in worker.stdout
    supervisor_end, worker_end = socket.socketpair()
    supervisor_end.close()  # its supervisor is gone
    with worker_end:
        fd = str(worker_end.fileno())
        try:
            worker = subprocess.run(
                [*serve, "--worker-index", "1", "--worker-link-fd", fd],
                capture_output=True, text=True, timeout=15, env=env, cwd=node.tmp,
                pass_fds=(worker_end.fileno(),),
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            pytest.fail("a worker whose supervisor is gone kept running")
    assert worker.returncode == 1, worker.stderr
    assert "cannot start: the supervisor of this worker (relaygate serve) is gone" in (
        worker.stderr
    )
    assert "RelayGate ready" not in worker.stdout
    assert not node.data_dir.exists()  # it opened nothing
    again = NodeLock(node.tmp / "other", "EDGE4", postgres_url)
    again.acquire()  # the refused workers hold nothing
    again.release()


def test_the_name_is_held_shared_from_before_the_workers_start(
    postgres_url: str, tmp_path: Path
) -> None:
    """The order of relaygate.node_lock's docstring: the supervisor converts its exclusive lock
    to shared with no gap, its workers take it shared beside it, and another node's start is
    refused until the last of them lets go."""
    supervisor = NodeLock(tmp_path / "a", "EDGE5", postgres_url)
    supervisor.acquire()
    supervisor.share()
    worker = NodeLock(tmp_path / "a", "EDGE5", postgres_url)
    locks = [supervisor, worker]
    try:
        worker.acquire_worker(0, lambda: True)
        with pytest.raises(NodeLockError, match=r"relaygate node EDGE5 on .*relaygate worker 0"):
            NodeLock(tmp_path / "b", "edge5", postgres_url).acquire()
        supervisor.release()  # killed: its worker still holds the name
        with pytest.raises(NodeLockError, match=r"worker processes of a relaygate serve that is"):
            NodeLock(tmp_path / "b", "edge5", postgres_url).acquire()
        worker.release()
        other = NodeLock(tmp_path / "b", "edge5", postgres_url)
        locks.append(other)
        other.acquire()  # every process of the first node is gone: taken at once
        late = NodeLock(tmp_path / "a", "EDGE5", postgres_url)
        with pytest.raises(NodeLockError, match=r"in use by another node .*relaygate node edge5"):
            late.acquire_worker(1, lambda: True)  # the other node's holds it exclusive
        other.share()  # the other node's workers start
        with pytest.raises(NodeLockError, match=r"the supervisor of this worker .* is gone"):
            late.acquire_worker(1, lambda: False)  # granted, but its supervisor died first
        other.release()
        again = NodeLock(tmp_path / "c", "EDGE5", postgres_url)
        locks.append(again)
        again.acquire()  # the late worker let go of what it was granted
    finally:
        for lock in locks:
            lock.release()


def test_a_database_restart_does_not_stop_a_node_with_workers(relay: Any) -> None:
    """The connections that hold the name (the supervisor's and each worker's) are dropped by a
    database restart: the node keeps running and serving, as with one process."""
    from tests.support.postgres import PostgresServer

    with PostgresServer() as server:
        url = server.create_database() + "?connect_timeout=2"
        node = pg_node(relay, "EDGE6", url, workers=2).start()
        assert node.proc is not None
        workers = _children(node.proc.pid)
        server.crash()
        server.restart()
        deadline = time.monotonic() + 20
        while True:  # the first calls after the restart may still meet a dropped connection
            try:
                send_one(node)
                break
            except smtplib.SMTPDataError as exc:
                assert exc.smtp_code == 451 and time.monotonic() < deadline, exc
                time.sleep(0.5)
        assert node.proc.poll() is None, "the supervisor stopped"
        assert sorted(_children(node.proc.pid)) == sorted(workers), "a worker stopped"
        node.stop()
