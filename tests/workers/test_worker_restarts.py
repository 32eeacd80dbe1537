"""`server.workers = N`: workers started again by their supervisor (killed, hung, or after a
refused reload) and what they serve with: the node's configuration, its token, users, certificates.

Split from test_workers.py (its helpers and fixtures are imported from there) so that the suite's
two xdist workers share the files more evenly.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import smtplib
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.smtp.helpers import RawClient, free_port
from tests.workers.test_workers import (
    ROOT,
    SECOND_CONNECTOR,
    Served,
    Sink,
    _served_with_token_file,
    alive,
    connections_per_pid,
    edit_keeping_stamp,
    held_clients,
    kill_tree,
    refuses_connections,
    wait_until,
)

# the fixtures (named for pytest to find them here)
from tests.workers.test_workers import serve as serve
from tests.workers.test_workers import sink as sink

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading and /proc are Linux's"
)


def restarted_worker(s: Served, before: list[int], index: int) -> list[int]:
    """SIGKILL worker `index` (of `before`) and wait until its replacement listens: the
    supervisor logs the restart, then each worker's pid takes connections again."""
    os.kill(before[index], signal.SIGKILL)
    assert wait_until(lambda: f"worker {index} (pid {before[index]}) exited" in s.log(), 15), (
        s.log()[-3000:]
    )
    assert wait_until(
        lambda: len(s.children()) == len(before) and before[index] not in s.children(), 20
    ), s.log()[-3000:]
    now = s.children()

    def every_worker_answers() -> bool:
        with held_clients(s.port, 20) as _clients:
            return all(n > 0 for n in connections_per_pid(now, s.port).values())

    assert wait_until(every_worker_answers, 20, 0.3), s.log()[-3000:]
    return now


def test_a_worker_restarted_after_a_refused_reload_runs_its_siblings_configuration(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """A reload every worker refused (an emptied admin.api_token_file) left them on the previous
    configuration, but a worker restarted afterwards read the file as it was now and took its
    new banner: half the clients met another configuration. The supervisor now hands every
    worker it starts the configuration the node runs."""
    s, token = _served_with_token_file(tmp_path, sink[1])
    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        token.write_text("")  # emptied by mistake, and the banner changed in the same edit
        edit_keeping_stamp(
            s.config, s.config.read_text().replace("220 RelayGate one", "220 RelayGate two")
        )
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.log().count("reload refused") >= 2, 15), s.log()[-3000:]
        restarted_worker(s, before, 1)
        with held_clients(s.port, 30, banner="RelayGate one"):
            pass
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_a_worker_restarted_after_an_invalid_file_was_refused_serves(serve: Any) -> None:
    """An invalid file, refused at reload: a worker restarted afterwards read it, could not
    start, and crash-looped (backing off up to 30 s) while its siblings served. It now starts
    with the node's configuration; the refusal is logged once."""
    s = serve(workers=2)
    before = s.children()
    edit_keeping_stamp(
        s.config,
        s.config.read_text().replace(
            'banner = "220 RelayGate one"', 'banner = "220 two"\nbogus = 1'
        ),
    )
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in s.log(), 15), s.log()[-3000:]
    restarted_worker(s, before, 1)
    with held_clients(s.port, 30, banner="RelayGate one"):
        pass
    log = s.log()
    assert log.count("reload refused") == 1, log[-3000:]
    assert "cannot start" not in log, log[-3000:]
    assert s.stop() == 0


def test_a_reload_adding_a_port_another_process_serves_is_refused(serve: Any) -> None:
    """At start the supervisor refuses a port another process listens on (the workers'
    SO_REUSEPORT would share it); a reload adding one joined that process's group. The reload
    is now refused, naming the binding, and the workers keep their listeners."""
    s = serve(workers=2)
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert_reload_adding_a_taken_binding_refused(s, other, ("127.0.0.1", free_port()))
        assert s.stop() == 0
    finally:
        other.close()


def assert_reload_adding_a_taken_binding_refused(
    s: Any, other: socket.socket, address: tuple[str, int]
) -> None:
    """`other` (another node's worker: a listener with SO_REUSEPORT, of the same user) listens
    on `address`; a reload adding that binding to the node's Relay connector is refused, naming
    it, and the workers keep their listeners and the old configuration."""
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(address)
    other.listen(16)
    added = f"{address[0]}:{address[1]}"
    binding = f'bindings = ["127.0.0.1:{s.port}"]'
    edit_keeping_stamp(
        s.config,
        s.config.read_text()
        .replace(binding, f'bindings = ["127.0.0.1:{s.port}", "{added}"]')
        .replace("220 RelayGate one", "220 RelayGate two"),
    )
    assert s.proc is not None
    s.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: "reload refused" in s.log(), 15), s.log()[-3000:]
    log = s.log()
    assert added in log, log[-3000:]
    assert "configuration reloaded" not in log, log[-3000:]
    with held_clients(s.port, 10, banner="RelayGate one"):
        pass


ADMIN_TOKEN = "a-long-enough-admin-token-0123456789"


def admin_status(port: int, token: str | None) -> int | None:
    """The status of GET /api/queue on the admin listener with `token` (None: no token), or
    None when nothing answers there."""
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/api/queue", headers=headers)
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


@pytest.mark.parametrize("how", ["emptied", "unreadable"])
def test_worker_0_restarted_after_its_token_file_broke_keeps_the_token_the_node_applied(
    tmp_path: Path, sink: tuple[Sink, int], how: str
) -> None:
    """admin.api_token_file emptied (or made unreadable) and the reload refused: the workers
    kept the token they had, but worker 0 (the admin centre's) read the file as it was when it
    was started again, could not start, and crash-looped (status 1, backing off to 30 s), with
    no admin centre and its SMTP listener opened and closed at each try. Restarted, it keeps
    the token the node applied, and says once which file it could not use."""
    s, token = _served_with_token_file(tmp_path, sink[1])
    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        assert admin_status(s.admin_port, ADMIN_TOKEN) == 200
        if how == "emptied":
            token.write_text("")
        else:
            token.unlink()  # (root reads a file of mode 0000: a missing file stands for it)
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.log().count("reload refused") >= 2, 15), s.log()[-3000:]
        os.kill(before[0], signal.SIGKILL)
        assert wait_until(lambda: f"worker 0 (pid {before[0]}) exited" in s.log(), 15), s.log()[
            -3000:
        ]
        assert wait_until(lambda: admin_status(s.admin_port, ADMIN_TOKEN) == 200, 20), s.log()[
            -3000:
        ]
        assert admin_status(s.admin_port, "a-wrong-token") == 401
        assert admin_status(s.admin_port, None) == 401
        log = s.log()
        assert "exited unexpectedly (status 1)" not in log, log[-3000:]
        assert log.count(f"{str(token)!r}") == 3, log[-3000:]  # two refusals, one fallback
        new_0 = next(pid for pid in s.children() if pid not in before)
        restarted_worker(s, [new_0, before[1]], 1)  # the other worker's restart reads no token
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_worker_0_restarted_keeps_the_token_of_the_last_reload_and_a_new_start_needs_the_file(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """What a restarted worker 0 keeps is the token the last reload applied (a rotated one), not
    the one read at start; its copy is the owner's alone; and a new `relaygate serve` does not
    start on it: the file must be usable at the node's start."""
    s, token = _served_with_token_file(tmp_path, sink[1])
    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        token.write_text("a-rotated-admin-token-9876543210\n")
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: admin_status(s.admin_port, "a-rotated-admin-token-9876543210")
                          == 200, 15), s.log()[-3000:]  # fmt: skip
        token.write_text("")
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.log().count("reload refused") >= 2, 15), s.log()[-3000:]
        os.kill(before[0], signal.SIGKILL)
        assert wait_until(lambda: f"worker 0 (pid {before[0]}) exited" in s.log(), 15)
        assert wait_until(
            lambda: admin_status(s.admin_port, "a-rotated-admin-token-9876543210") == 200, 20
        ), s.log()[-3000:]
        assert admin_status(s.admin_port, ADMIN_TOKEN) == 401
        kept = s.data / "run" / "admin-token-applied.json"
        assert kept.stat().st_mode & 0o777 == 0o600
        assert s.stop() == 0
        with pytest.raises(AssertionError, match="did not start"):
            s.start()
        assert "cannot start: admin.api_token_file" in s.log(), s.log()[-3000:]
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_a_reload_adding_an_address_on_a_port_the_node_holds_that_another_process_serves(
    serve: Any,
) -> None:
    """The reload's check that a new binding is free skipped every port the node listens on
    (its workers hold them): another process listening on 127.0.0.3 on the node's port (a
    SO_REUSEPORT socket of the same user) was not seen, and the workers joined its group, the
    connections to that address split between that process and the node. Refused now, naming
    the binding; a binding the node holds, moved to another connector, still reloads."""
    s = serve(workers=2)
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        assert_reload_adding_a_taken_binding_refused(s, other, ("127.0.0.3", s.port))
        other.close()
        # the node's own binding, now another connector's (Relay's port moves to 127.0.0.4)
        moved = s.config.read_text().replace(
            f'bindings = ["127.0.0.1:{s.port}", "127.0.0.3:{s.port}"]',
            f'bindings = ["127.0.0.4:{s.port}"]',
        )
        moved += MOVED_CONNECTOR.format(port=s.port)
        edit_keeping_stamp(s.config, moved)
        s.proc.send_signal(signal.SIGHUP)
        reloaded = "configuration reloaded from"
        assert wait_until(lambda: s.log().count(reloaded) == 2, 15), s.log()[-3000:]
        assert s.log().count("reload refused") == 1, s.log()[-3000:]
        with held_clients(s.port, 10, banner="RelayGate moved"):
            pass
        assert s.stop() == 0
    finally:
        other.close()


MOVED_CONNECTOR = """
[[receive_connectors]]
name = "Moved"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"
banner = "220 RelayGate moved"
"""


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_a_wildcard_over_the_nodes_own_address_is_the_nodes_unless_another_listens_there(
    family: str,
) -> None:
    """A reload replacing the node's address on a port with the wildcard meets the node's own
    listener when it tries that binding: that one is let through, another process's on another
    address of that port is not (read from /proc/net/tcp and tcp6)."""
    from relaygate.config.values import Binding
    from relaygate.workers import _node_holds

    af, mine, theirs, wildcard = (
        (socket.AF_INET, "127.0.0.1", "127.0.0.5", "0.0.0.0")
        if family == "ipv4"
        else (socket.AF_INET6, "::1", "::ffff:127.0.0.5", "::")
    )
    port = free_port()
    listeners = []
    try:
        for address in (mine, theirs):
            sock = socket.socket(af, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
            sock.listen(4)
            listeners.append(sock)
            held = frozenset({Binding(mine, port)})
            expected = address == mine  # only the node's own listener there
            assert _node_holds(Binding(wildcard, port), held) is expected, address
            assert _node_holds(Binding(mine, port), held)
            assert not _node_holds(Binding("127.0.0.5", port), held)
    finally:
        for sock in listeners:
            sock.close()


def open_from(port: int, source: str, n: int) -> tuple[list[RawClient], int]:
    """`n` connections from `source`: (those greeted with 220, held open; how many got 421)."""
    held: list[RawClient] = []
    refused = 0
    for _ in range(n):
        c = RawClient(port, source=source, timeout=10)
        reply = c.reply()
        assert reply is not None
        if reply.code == 220:
            held.append(c)
        else:
            assert reply.code == 421 and "4.3.2" in reply.lines[0], reply
            refused += 1
            c.close()
    return held, refused


def test_connection_limits_hold_for_the_node_when_one_address_reaches_every_worker(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """`worker_balance = "connection"`: one address's connections reach every worker, and
    max_inbound_connection_per_source was counted by each worker alone: 2 workers let a source
    hold twice its limit. Counted for the node now; the connections a killed worker held are
    no longer counted (its siblings admit the source again)."""
    s = Served(tmp_path, sink[1], 2, 'worker_balance = "connection"\n')
    s.config.write_text(
        s.config.read_text().replace(
            'tarpit_interval = "00:00:00"',
            'tarpit_interval = "00:00:00"\nmax_inbound_connection_per_source = 3',
        )
    )
    s.start()
    held: list[RawClient] = []
    try:
        workers = s.children()
        held, refused = open_from(s.port, "127.0.0.9", 10)
        per_pid = connections_per_pid(workers, s.port)
        assert (len(held), refused) == (3, 7), per_pid
        # the worker holding most of them dies: what it held is counted no more
        victim = max(per_pid, key=lambda pid: per_pid[pid])
        survivors = sum(n for pid, n in per_pid.items() if pid != victim)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: "exited unexpectedly (signal SIGKILL)" in s.log(), 15)
        more, refused = open_from(s.port, "127.0.0.9", 6)
        held += more
        assert (len(more), refused) == (3 - survivors, 3 + survivors), s.log()[-3000:]
        for c in held:
            c.close()
        held = []
        # closed connections are counted no more either, in every worker
        assert wait_until(lambda: sum(connections_per_pid(s.children(), s.port).values()) == 0)
        held, refused = open_from(s.port, "127.0.0.9", 5)
        assert (len(held), refused) == (3, 2)
        # the table is in shared memory, the relay's alone (not in data_dir: the queue's commits
        # wrote it out), and gone when the node stops
        from relaygate.node_connections import table_path

        table = table_path(s.data)
        assert table.parent.parent == Path("/dev/shm"), table
        assert (stat.S_IMODE(table.stat().st_mode), stat.S_IMODE(table.parent.stat().st_mode)) == (
            0o600,
            0o700,
        )
        assert s.stop() == 0
        assert not table.parent.exists()
    finally:
        for c in held:
            c.close()
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def limit_per_source(s: Served, limit: int) -> None:
    """`s`'s config file with max_inbound_connection_per_source = `limit`."""
    s.config.write_text(
        s.config.read_text().replace(
            'tarpit_interval = "00:00:00"',
            f'tarpit_interval = "00:00:00"\nmax_inbound_connection_per_source = {limit}',
            1,
        )
    )


def kill_node(s: Served) -> None:
    """SIGKILL to the supervisor and its workers (the OOM killer, a crash): nothing cleans up."""
    assert s.proc is not None
    workers = s.children()
    kill_tree(s.proc.pid)
    s.proc.wait(10)
    assert wait_until(lambda: not any(alive(pid) for pid in workers), 20)


def test_a_connection_table_left_by_a_killed_node_counts_nothing_and_goes_at_the_next_start(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """A node killed outright leaves its open-connection table in /dev/shm, counting the
    connections held then. The next start with `worker_balance = "connection"` makes a fresh
    one (the dead run's counts refuse nobody); a next start without it left the file there
    (memory held until the machine restarts, with no run of the node to remove it): it is
    removed."""
    from relaygate.node_connections import table_path

    s = Served(tmp_path, sink[1], 2, 'worker_balance = "connection"\n')
    limit_per_source(s, 3)
    table = table_path(s.data)
    held: list[RawClient] = []
    try:
        s.start()
        held, refused = open_from(s.port, "127.0.0.9", 3)
        assert (len(held), refused) == (3, 0)
        kill_node(s)
        for c in held:
            c.close()
        assert table.exists()  # left behind, counting the three connections

        s.start()
        held, refused = open_from(s.port, "127.0.0.9", 5)
        assert (len(held), refused) == (3, 2), s.log()[-3000:]  # the dead run's refuse none
        kill_node(s)
        for c in held:
            c.close()
        held = []
        assert table.exists()

        s.server_extra = ""  # the next start steers by address: no table
        s.write_config("220 RelayGate one")
        s.start()
        assert not table.parent.exists(), sorted(table.parent.iterdir())
        assert s.stop() == 0
    finally:
        for c in held:
            c.close()
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)
        shutil.rmtree(table.parent, ignore_errors=True)  # a failure's leftover in /dev/shm


def test_worker_balance_changed_by_a_reload_waits_for_a_restart_and_limits_hold_meanwhile(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """The open-connection table is made at start, only for `worker_balance = "connection"`. A
    reload switching to it said nothing, and a listener it opened was not steered by address
    while no table counted its connections for the node: one address held twice its
    max_inbound_connection_per_source over two workers. The reload now says the change takes
    effect when relaygate serve restarts, and until then the node balances as it started."""
    s = Served(tmp_path, sink[1], 2)
    held: list[RawClient] = []
    try:
        s.start()
        port2 = free_port()
        s.server_extra = 'worker_balance = "connection"\n'
        s.write_config("220 RelayGate one")
        second = SECOND_CONNECTOR.format(port=port2) + "max_inbound_connection_per_source = 3\n"
        s.config.write_text(s.config.read_text() + second)
        assert s.proc is not None
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: not refuses_connections(port2), 15), s.log()[-3000:]
        assert wait_until(
            lambda: (
                "server.worker_balance changed from client_address to connection: takes "
                "effect when relaygate serve restarts" in s.log()
            ),
            15,
        ), s.log()[-3000:]
        held, refused = open_from(port2, "127.0.0.9", 10)
        assert (len(held), refused) == (3, 7), connections_per_pid(s.children(), port2)
        for c in held:
            c.close()
        held = []
        # a worker started again meanwhile (with the file's text) balances as its siblings
        restarted_worker(s, s.children(), 1)
        assert "this worker keeps its siblings' (client_address)" in s.log(), s.log()[-3000:]
        assert wait_until(lambda: sum(connections_per_pid(s.children(), port2).values()) == 0)
        held, refused = open_from(port2, "127.0.0.9", 10)
        assert (len(held), refused) == (3, 7), connections_per_pid(s.children(), port2)
        for c in held:
            c.close()
        held = []
        assert s.stop() == 0
    finally:
        for c in held:
            c.close()
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_a_worker_restarted_after_the_users_file_broke_serves_with_the_users_last_read(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """The users file edited by hand into one that cannot be read: the running workers keep the
    users they read, but a worker started again read it as it was, could not start ('cannot
    read the users file') and was restarted over and over (backing off to 30 s), serving
    nothing. It now starts with the users the node last read from it (the supervisor's copy),
    says so once naming the file, and takes the file again once it can be read."""
    s = Served(tmp_path, sink[1], 2)
    s.data.mkdir(parents=True)
    users = s.data / "users.json"
    users.write_text('{"users": {}}')
    s.start()
    try:
        before = s.children()
        mirror = s.data / "run" / "users-applied.json"
        assert wait_until(mirror.is_file, 10), s.log()[-3000:]
        assert mirror.stat().st_mode & 0o777 == 0o600
        users.write_text('{"users": ')  # a hand edit, broken
        restarted_worker(s, before, 1)
        # its lines reach the file through the supervisor, maybe after its listener answers
        assert wait_until(lambda: "users the node last read" in s.log(), 15), s.log()[-3000:]
        log = s.log()
        assert "exited unexpectedly (status 1)" not in log, log[-3000:]
        assert log.count(f"cannot read the users file {users}") == 1, log[-3000:]
        assert "users the node last read" in log, log[-3000:]
        # repaired (a user added): the copy the restarted worker watches is renewed
        users.write_text('{"users": {"app1": "$argon2id$v=19$m=65536,t=3,p=4$x$y"}}')
        assert wait_until(lambda: "app1" in mirror.read_text(), 10), s.log()[-3000:]
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def _served_with_admin_tls(tmp_path: Path, sink_port: int, ca: Any) -> tuple[Served, Path, Path]:
    """Two workers whose admin listener speaks HTTPS (a certificate of `ca`), not started yet:
    the Served, the certificate file and its key file."""
    s = Served(tmp_path, sink_port, 2)
    folder = tmp_path / "admin-tls"
    folder.mkdir()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = folder / "admin.crt", folder / "admin.key"
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    listen = f'listen = "127.0.0.1:{s.admin_port}"'
    keys = f'tls_certificate_file = "{cert}"\ntls_key_file = "{key}"'
    s.config.write_text(s.config.read_text().replace(listen, f"{listen}\n{keys}"))
    return s, cert, key


def healthz_over_tls(port: int, ca: Any) -> int | None:
    """The status of GET /healthz on the admin listener over HTTPS, or None when nothing
    answers there."""
    import ssl

    context = ssl.create_default_context()
    ca.configure_trust(context)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=5, context=context)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except OSError:
        return None
    finally:
        conn.close()


def queue_cli(s: Served) -> subprocess.CompletedProcess[str]:
    """`relaygate queue list` with `s`'s config file."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), NO_COLOR="1", COLUMNS="200")
    env.pop("RELAYGATE_CONFIG", None)
    env.pop("RELAYGATE_ADMIN_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "queue", "list", "--config", str(s.config)],
        capture_output=True,
        text=True,
        env=env,
        cwd=s.tmp,
        timeout=60,
    )


def test_worker_0_restarted_while_the_admin_key_cannot_be_loaded_relays_and_opens_https_once_fixed(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """admin.tls_key_file emptied and the reload refused: worker 0 (the admin centre's), started
    again, could not load the pair and exited at every restart (status 1, backing off to 30 s),
    its SMTP listener opened and closed at each try. It now relays, says once that the admin
    listener waits for the files (naming the key and the file), and opens it once they load."""
    import trustme

    ca = trustme.CA()
    s, _cert, key = _served_with_admin_tls(tmp_path, sink[1], ca)
    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        assert healthz_over_tls(s.admin_port, ca) == 200
        good = key.read_bytes()
        key.write_bytes(b"")  # emptied by mistake
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.log().count("reload refused") >= 2, 15), s.log()[-3000:]
        restarted_worker(s, before, 0)
        waiting = "admin listener stays closed until"
        # the worker said it before it listened, but its lines reach the file through its
        # supervisor, which may write them after its SMTP listener answers
        assert wait_until(lambda: waiting in s.log(), 15), s.log()[-3000:]
        log = s.log()
        assert "exited unexpectedly (status 1)" not in log, log[-3000:]
        assert log.count(waiting) == 1, log[-3000:]
        assert f"admin.tls_key_file {str(key)!r}" in log.split(waiting)[0].splitlines()[-1]
        assert healthz_over_tls(s.admin_port, ca) is None
        # relaygate queue said "not running": the relay runs, its admin listener is closed
        said = queue_cli(s)
        assert said.returncode == 1, said
        assert "not running" not in said.stderr, said.stderr
        assert f"runs (pid {s.proc.pid}) but its admin listener" in said.stderr, said.stderr
        assert f"admin.tls_key_file {str(key)!r}" in said.stderr, said.stderr
        key.write_bytes(good)  # repaired
        assert wait_until(lambda: healthz_over_tls(s.admin_port, ca) == 200, 20), s.log()[-3000:]
        assert s.log().count(waiting) == 1, s.log()[-3000:]
        said = queue_cli(s)
        assert said.returncode == 0, said
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


def test_a_worker_restarted_while_an_implicit_tls_key_cannot_be_loaded_relays_and_opens_it_once_fixed(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """An implicit-TLS connector's key emptied and the reload refused: a worker started again
    could not build the listener's context and exited at every restart ('cannot start', status
    1), serving nothing on its other listeners. It now opens them and relays, says once which
    connector, key and file it waits for, and opens that listener once the files load."""
    import ssl

    import trustme

    ca = trustme.CA()
    tls_port = free_port()
    s = Served(tmp_path, sink[1], 2)
    folder = tmp_path / "smtps"
    folder.mkdir()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = folder / "smtps.crt", folder / "smtps.key"
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    s.config.write_text(
        s.config.read_text()
        + f"""
[[receive_connectors]]
name = "Smtps"
bindings = ["127.0.0.1:{tls_port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["Tls"]
tls_mode = "implicit"
tls_certificate_file = "{cert}"
tls_key_file = "{key}"
permission_groups = ["AnonymousUsers"]
"""
    )
    context = ssl.create_default_context()
    ca.configure_trust(context)

    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        good = key.read_bytes()
        key.write_bytes(b"")
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: s.log().count("reload refused") >= 2, 15), s.log()[-3000:]
        now = restarted_worker(s, before, 1)  # its SMTP listener answers (the helper checks)
        waiting = "stays closed in this worker until"
        # its lines reach the file through the supervisor, maybe after its listener answers
        assert wait_until(lambda: waiting in s.log(), 15), s.log()[-3000:]
        log = s.log()
        assert "exited unexpectedly (status 1)" not in log, log[-3000:]
        assert log.count(waiting) == 1, log[-3000:]
        line = log.split(waiting)[0].splitlines()[-1]
        assert 'receive connector "Smtps"' in line and str(key) in line, line
        key.write_bytes(good)  # repaired: the restarted worker opens the listener too
        new_1 = next(pid for pid in now if pid not in before)

        def restarted_one_takes_smtps() -> bool:
            with held_smtps(tls_port, context, 20):
                return connections_per_pid([new_1], tls_port).get(new_1, 0) > 0

        assert wait_until(restarted_one_takes_smtps, 20, 0.3), s.log()[-3000:]
        assert s.log().count(waiting) == 1, s.log()[-3000:]
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)


@contextlib.contextmanager
def held_smtps(port: int, context: Any, n: int) -> Iterator[list[socket.socket]]:
    """`n` implicit-TLS connections (from 127.0.0.10 on) held open together, closed on exit."""
    held: list[socket.socket] = []
    try:
        for i in range(n):
            raw = socket.create_connection(("127.0.0.1", port), 5, (f"127.0.0.{10 + i}", 0))
            try:
                conn = context.wrap_socket(raw, server_hostname="127.0.0.1")
            except OSError:
                raw.close()
                continue
            conn.recv(1024)  # the banner: the session is under way in a worker
            held.append(conn)
        yield held
    finally:
        for conn in held:
            conn.close()


def test_a_worker_restarted_while_a_starttls_key_cannot_be_loaded_serves_without_starttls(
    tmp_path: Path, sink: tuple[Sink, int]
) -> None:
    """A STARTTLS connector's key emptied: a worker started again serves (STARTTLS not offered
    by it until the files load, said once naming the connector and the files), never a crash
    loop, and offers STARTTLS again once they are repaired."""
    import trustme

    ca = trustme.CA()
    s = Served(tmp_path, sink[1], 2)
    folder = tmp_path / "starttls"
    folder.mkdir()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = folder / "smtp.crt", folder / "smtp.key"
    issued.private_key_pem.write_to_path(str(key))
    key.chmod(0o600)
    cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
    s.config.write_text(
        s.config.read_text().replace(
            'auth_mechanism = ["None"]',
            f'auth_mechanism = ["Tls"]\ntls_certificate_file = "{cert}"\ntls_key_file = "{key}"',
        )
    )
    s.start()
    try:
        assert s.proc is not None
        before = s.children()
        good = key.read_bytes()
        key.write_bytes(b"")
        s.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: "TLS unavailable on receive connector Relay" in s.log(), 15), (
            s.log()[-3000:]
        )
        restarted_worker(s, before, 1)
        log = s.log()
        assert "exited unexpectedly (status 1)" not in log, log[-3000:]
        key.write_bytes(good)

        def every_answer_offers_starttls() -> bool:
            for _ in range(10):
                with smtplib.SMTP("127.0.0.1", s.port, timeout=5) as c:
                    c.ehlo()
                    if not c.has_extn("starttls"):
                        return False
            return True

        assert wait_until(every_answer_offers_starttls, 20, 0.5), s.log()[-3000:]
        assert s.stop() == 0
    finally:
        if s.proc is not None and s.proc.poll() is None:
            kill_tree(s.proc.pid)
