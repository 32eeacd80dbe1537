"""Fixtures for the delivery tests."""

from tests.support.fixtures import loopback_dns  # noqa: F401
