"""Ports for the servers the tests start.

A port the kernel hands out for ``bind(0)`` comes from the ephemeral range (32768-60999 here), the
same range every outgoing connection takes its local port from. Between the moment a test learns
the port and the moment its relay (often another process) binds it, a connection made by the
other xdist worker could take it as its local port: "Address already in use" (seen once in a
clean-clone CI run, on an admin listener). So ports are taken below that range, from a block of
this xdist worker's own, in turn, each one checked free by binding it.
"""

from __future__ import annotations

import itertools
import os
import random
import socket

__all__ = ["free_port"]

_FIRST, _LAST = 20000, 32000  # below the ephemeral range, above the well-known services


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    size = (_LAST - _FIRST) // count
    start = _FIRST + (index % count) * size
    return range(start, start + size)


_BLOCK = _block()
# In turn from a random start: two calls in one test never get the same port, and a rerun does not
# retrace the previous run's ports (their sockets may still be in TIME_WAIT).
_NEXT = itertools.cycle(
    itertools.chain(range(random.choice(_BLOCK), _BLOCK.stop), range(_BLOCK.start, _BLOCK.stop))
)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on at `host` now, outside the ephemeral range."""
    for _ in range(len(_BLOCK)):
        port = next(_NEXT)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_BLOCK.start}-{_BLOCK.stop - 1} on {host}")
