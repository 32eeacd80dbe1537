"""Fixtures: the test's DNS server (names → 127.0.0.1) and pebble resolving through it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.acme.helpers import Pebble, Relay
from tests.support.dns_server import LoopbackDNS

if shutil.which("pebble") is None:  # `make test` installs it (Makefile DEBS)
    raise RuntimeError("the ACME tests need Debian's pebble: apt-get install pebble")


@pytest.fixture
def dns() -> Iterator[LoopbackDNS]:
    """relay.acme.test and mail.acme.test → 127.0.0.1; anything else NXDOMAIN."""
    with LoopbackDNS(
        {
            "relay.acme.test": [("A", "127.0.0.1")],
            "mail.acme.test": [("A", "127.0.0.1")],
        }
    ) as server:
        yield server


@pytest.fixture
def pebble(tmp_path: Path, dns: LoopbackDNS) -> Iterator[Pebble]:
    """pebble validating for real (no sleeps, no always-valid), its DNS being `dns`."""
    p = Pebble(tmp_path / "pebble", dns.address).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def short_pebble(tmp_path: Path, dns: LoopbackDNS) -> Iterator[Pebble]:
    """pebble issuing certificates that live 15 s: each is due for renewal 5 s after issue
    (two thirds of its life ahead)."""
    p = Pebble(tmp_path / "pebble", dns.address, validity_seconds=15).start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Callable[..., Relay]]:
    """Start `relaygate serve` processes; all stopped at the end."""
    started: list[Relay] = []

    def make(pebble: Pebble, name: str = "relay", **kw: object) -> Relay:
        folder = tmp_path / name
        folder.mkdir()
        relay = Relay(folder, pebble, **kw)  # type: ignore[arg-type]
        started.append(relay)
        return relay.start()

    yield make
    for relay in started:
        relay.stop()
