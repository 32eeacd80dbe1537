"""The organisational domain (RFC 7489 §3.2) from the Public Suffix List, and DMARC's relaxed
alignment built on it.

Kept apart from the DMARC check: the list is a file read once (in a thread, see ``diagnose``),
and tests point ``PUBLIC_SUFFIX_LIST`` (an attribute of this module) at a small list of their own.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from relaygate.addresses import ascii_domain as ascii_spelling

# The Public Suffix List as Debian's "publicsuffix" package installs it. Without it the
# organisational domain falls back to the last two labels, which is wrong under multi-label
# suffixes (example.co.uk would be "co.uk").
PUBLIC_SUFFIX_LIST = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(frozen=True)
class _SuffixRules:
    """The rules of the Public Suffix List (https://publicsuffix.org/list/), as A-labels."""

    exact: frozenset[str]
    wildcard: frozenset[str]  # "ck" for the rule "*.ck"
    exception: frozenset[str]  # "www.ck" for the rule "!www.ck"


def _parse_suffix_list(text: str) -> _SuffixRules:
    exact: set[str] = set()
    wildcard: set[str] = set()
    exception: set[str] = set()
    for line in text.splitlines():
        rule = line.strip().split(" ", 1)[0].lower()
        if not rule or rule.startswith("//"):
            continue
        target = exact
        if rule.startswith("!"):
            target, rule = exception, rule[1:]
        elif rule.startswith("*."):
            target, rule = wildcard, rule[2:]
        target.add(ascii_spelling(rule))  # as the domains it is matched with are spelled
    return _SuffixRules(frozenset(exact), frozenset(wildcard), frozenset(exception))


@functools.cache
def _suffix_rules(path: Path) -> _SuffixRules | None:
    """The list at ``path``, read once (None when it is not installed). Blocking: call it in a
    thread first (:func:`diagnose` does), later calls return the cached rules."""
    try:
        return _parse_suffix_list(path.read_text("utf-8"))
    except OSError:
        return None


def _public_suffix_length(labels: list[str], rules: _SuffixRules) -> int:
    """How many trailing labels form the public suffix (the PSL algorithm; default rule "*")."""
    for start in range(len(labels)):
        name = ".".join(labels[start:])
        if name in rules.exception:
            return len(labels) - start - 1
        if name in rules.exact:
            return len(labels) - start
        if start + 1 < len(labels) and ".".join(labels[start + 1 :]) in rules.wildcard:
            return len(labels) - start
    return 1


def _org_domain(domain: str) -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix and one label more."""
    labels = domain.lower().rstrip(".").split(".")
    rules = _suffix_rules(PUBLIC_SUFFIX_LIST)
    suffix = _public_suffix_length(labels, rules) if rules else 1
    return ".".join(labels[-(suffix + 1) :])


def _aligned_relaxed(one: str, other: str) -> bool:
    """DMARC relaxed alignment (RFC 7489 §3.1): the same organisational domain."""
    return _org_domain(one) == _org_domain(other)


def is_public_suffix(domain: str) -> bool:
    """Whether `domain` is itself a public suffix (com, co.uk, github.io) by the Public Suffix
    List; without the list installed only a single label is (the list's default rule "*").
    Blocking the first time (the list is read once)."""
    labels = domain.lower().rstrip(".").split(".")
    rules = _suffix_rules(PUBLIC_SUFFIX_LIST)
    suffix = _public_suffix_length(labels, rules) if rules else 1
    return suffix >= len(labels)
