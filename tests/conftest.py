"""Shared fixtures: the loopback DNS server (tests/support) is available to every test."""

pytest_plugins = ["tests.support.fixtures"]
