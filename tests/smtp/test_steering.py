"""The reuseport steering program, on real listening sockets: one client address → one socket."""

from __future__ import annotations

import socket
import sys
from collections import Counter

import pytest

from relaygate.smtp.steering import attach_source_steering, source_steering_program

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux BPF")


def _group(family: int, host: str, n: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    port = 0
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        port = s.getsockname()[1]
        s.listen(64)
        s.setblocking(False)
        socks.append(s)
    assert attach_source_steering(socks[-1], n)
    return socks


def _which(socks: list[socket.socket], family: int, host: str, source: str, times: int) -> Counter:
    hits: Counter[int] = Counter()
    port = socks[0].getsockname()[1]
    for _ in range(times):
        with socket.socket(family, socket.SOCK_STREAM) as c:
            c.bind((source, 0))
            c.connect((host, port))
            for i, s in enumerate(socks):
                try:
                    conn, _ = s.accept()
                except BlockingIOError:
                    continue
                hits[i] += 1
                conn.close()
    return hits


def test_ipv4_sources_stick_to_one_socket_and_different_sources_spread() -> None:
    socks = _group(socket.AF_INET, "127.0.0.1", 2)
    try:
        seen = set()
        for last in range(9, 17):
            hits = _which(socks, socket.AF_INET, "127.0.0.1", f"127.0.0.{last}", 12)
            assert len(hits) == 1 and sum(hits.values()) == 12, (
                hits
            )  # many source ports, one socket
            seen |= set(hits)
        assert seen == {0, 1}
    finally:
        for s in socks:
            s.close()


def test_ipv6_source_sticks_to_one_socket() -> None:
    try:
        socks = _group(socket.AF_INET6, "::1", 3)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        hits = _which(socks, socket.AF_INET6, "::1", "::1", 12)
        assert len(hits) == 1 and sum(hits.values()) == 12, hits
    finally:
        for s in socks:
            s.close()


def test_program_shape() -> None:
    prog = source_steering_program(4)
    assert prog[2][1] == 3 and prog[6][0] == 0x20  # the IPv6 branch lands on its first load
    assert [i for i in prog if i[0] == 0x94] == [(0x94, 0, 0, 4)] * 2
    with pytest.raises(ValueError):
        source_steering_program(0)
