"""Shared fixtures: the loopback DNS server (tests/support) and a real PostgreSQL server are
available to every test."""

from __future__ import annotations

import atexit
from collections.abc import Iterator

import pytest

from tests.support.postgres import PostgresNotInstalledError, PostgresServer

pytest_plugins = ["tests.support.fixtures"]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server per pytest process (so one per xdist worker)."""
    server = PostgresServer()
    # Registered before start(): a session that dies mid-way still stops the server.
    atexit.register(server.stop)
    try:
        server.start()
    except PostgresNotInstalledError as exc:
        # Fail, never skip: a missing package must not quietly hide the tests that need it.
        # (raised "from None": the chained copy of the same message would only add noise)
        raise pytest.fail.Exception(str(exc), pytrace=False) from None
    try:
        yield server
    finally:
        server.stop()
        atexit.unregister(server.stop)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on ``postgres_server`` (its URL), dropped after the test."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url.rsplit("/", 1)[1])
