"""pytest fixtures shared across test packages.

The lead owns ``tests/conftest.py``; test modules pull fixtures in explicitly::

    from tests.support.fixtures import loopback_dns  # noqa: F401

(tests run from the repository root, so ``tests`` is importable as a package).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns_server import LoopbackDNS

__all__ = ["loopback_dns"]


@pytest.fixture
def loopback_dns() -> Iterator[LoopbackDNS]:
    """A started, empty :class:`LoopbackDNS`; add records with ``loopback_dns.add(...)``."""
    with LoopbackDNS() as server:
        yield server
