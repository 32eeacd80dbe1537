"""The organisational domain (RFC 7489 §3.2) from the Public Suffix List, and DMARC's relaxed
alignment built on it.

Kept apart from the DMARC check: the list (relaygate.public_suffix) is a file read once (in a
thread, see ``diagnose``), and tests point ``relaygate.public_suffix.PUBLIC_SUFFIX_LIST`` at a
small list of their own; it is read from there at each call.
"""

from __future__ import annotations

from relaygate import public_suffix

__all__ = ["_aligned_relaxed", "_org_domain"]


def _org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix and one label more."""
    labels = domain.lower().rstrip(".").split(".")
    rules = public_suffix.suffix_rules(public_suffix.PUBLIC_SUFFIX_LIST)
    suffix = public_suffix.public_suffix_length(labels, rules) if rules else 1
    return ".".join(labels[-(suffix + 1) :])


def _aligned_relaxed(one: str, other: str) -> bool:
    """DMARC relaxed alignment (RFC 7489 §3.1): the same organisational domain."""
    return _org_domain(one) == _org_domain(other)
