"""pytest fixtures shared across test packages.

The lead owns ``tests/conftest.py``; until it lists this module in ``pytest_plugins``, test modules
pull the fixtures in explicitly. The fixture function has a different Python name from the fixture
so the import does not clash with the test parameter (ruff F811)::

    from tests.support.fixtures import loopback_dns_fixture  # noqa: F401

    def test_something(loopback_dns):
        loopback_dns.add("example.org", "MX", (10, "mx.example.org"))

(tests run from the repository root, so ``tests`` is importable as a package).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.dns_server import LoopbackDNS

__all__ = ["loopback_dns", "loopback_dns_fixture"]


@pytest.fixture(name="loopback_dns")
def loopback_dns_fixture() -> Iterator[LoopbackDNS]:
    """``loopback_dns``: a started, empty :class:`LoopbackDNS`; add records with ``.add(...)``."""
    with LoopbackDNS() as server:
        yield server


# The same fixture under its own Python name, for a conftest.py (where the F811 clash with test
# parameters does not arise): import ``loopback_dns`` from tests.support.fixtures, marked as an
# intentionally unused import for the linter (rule F401).
loopback_dns = loopback_dns_fixture
