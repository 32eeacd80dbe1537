"""Shared test helpers: a real loopback DNS server and its pytest fixture."""
