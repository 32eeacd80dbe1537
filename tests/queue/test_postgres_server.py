"""The PostgreSQL test server (tests/support/postgres.py) and its fixtures in tests/conftest.py."""

from __future__ import annotations

import socket
from pathlib import Path

import psycopg
import pytest

from tests.support import postgres as pg_mod
from tests.support.postgres import PostgresNotInstalledError, PostgresServer, PostgresStartError


def _live_pids(postmaster: int) -> set[int]:
    """The postmaster and its children that are still running (zombies do not count)."""
    pids: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # "pid (comm) state ppid ...": comm may contain spaces, so split after the last ')'.
            pid_text, rest = stat.read_text().split(" ", 1)
            state, ppid = rest.rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z" and postmaster in (int(pid_text), int(ppid)):
            pids.add(int(pid_text))
    return pids


def test_server_settings(postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SHOW fsync").fetchone() == ("on",)
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SELECT current_user").fetchone() == ("relaygate",)
        assert conn.execute("SHOW server_encoding").fetchone() == ("UTF8",)


def test_databases_are_distinct_and_isolated(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    other_url = postgres_server.create_database()
    try:
        assert other_url != postgres_url
        with psycopg.connect(postgres_url) as conn:
            conn.execute("CREATE TABLE t (x int)")
            conn.execute("INSERT INTO t VALUES (1)")
        with psycopg.connect(other_url) as conn:
            assert conn.execute("SELECT to_regclass('t')").fetchone() == (None,)
    finally:
        postgres_server.drop_database(other_url.rsplit("/", 1)[1])


_seen: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_a_fresh_database_dropped_afterwards(
    postgres_server: PostgresServer, postgres_url: str, run: int
) -> None:
    with psycopg.connect(postgres_url) as conn:
        # Empty: nothing left over from an earlier test.
        assert conn.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ).fetchone() == (0,)
        conn.execute("CREATE TABLE leftover (x int)")
    with psycopg.connect(postgres_server.url("postgres")) as conn:
        names = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
    # The earlier run's database is gone and this one is a different one.
    assert postgres_url not in _seen
    assert not {url.rsplit("/", 1)[1] for url in _seen} & names
    _seen.append(postgres_url)


def test_stop_leaves_no_process_and_no_directory() -> None:
    server = PostgresServer()
    server.start()
    data_dir = server.data_dir
    base_dir = server.base_dir
    assert base_dir is not None
    postmaster = int((data_dir / "postmaster.pid").read_text().split()[0])
    assert _live_pids(postmaster)
    with psycopg.connect(server.url()) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    server.stop()
    assert _live_pids(postmaster) == set()
    assert not base_dir.exists()
    server.stop()  # idempotent


def test_missing_binaries_name_the_debian_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pg_mod.glob, "glob", lambda pattern: [])
    monkeypatch.setattr(pg_mod.shutil, "which", lambda name: None)
    monkeypatch.setenv("PATH", "/nonexistent")  # no pg_config either
    with pytest.raises(PostgresNotInstalledError, match="Debian package `postgresql`"):
        pg_mod.find_bindir()


def test_start_retries_on_a_port_taken_meanwhile(monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process grabs the chosen port before postgres binds it: start() picks another.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken])
        real_free_port = pg_mod._free_port
        monkeypatch.setattr(pg_mod, "_free_port", lambda: next(ports, None) or real_free_port())
        with PostgresServer() as server:
            assert server.port != taken
            with psycopg.connect(server.url()) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)


def test_start_failure_reports_the_server_log(monkeypatch: pytest.MonkeyPatch) -> None:
    server = PostgresServer()
    real_run = server._run

    def run_with_bad_setting(prog: str, *args: str, what: str) -> None:
        if prog == "pg_ctl":  # an unknown setting: postgres refuses to start and logs why
            args = (*args[:-1], args[-1] + " -c no_such_setting=1")
        real_run(prog, *args, what=what)

    monkeypatch.setattr(server, "_run", run_with_bad_setting)
    with pytest.raises(PostgresStartError, match="no_such_setting"):
        server.start()
    assert server.base_dir is None  # cleaned up
