"""The Public Suffix List (https://publicsuffix.org/list/) as Debian's "publicsuffix" package
installs it: the doctor's organisational domain (DMARC) and audit's accepted-domain check. Light on
imports, so that audit (called by the admin centre) does not load the doctor's DNS modules."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from relaygate.addresses import ascii_domain as ascii_spelling

__all__ = [
    "PUBLIC_SUFFIX_LIST",
    "SuffixRules",
    "is_public_suffix",
    "parse_suffix_list",
    "public_suffix_length",
    "suffix_rules",
]

#: Where Debian's "publicsuffix" package installs the list.
PUBLIC_SUFFIX_LIST = Path("/usr/share/publicsuffix/public_suffix_list.dat")


@dataclass(frozen=True)
class SuffixRules:
    """The rules of the Public Suffix List (https://publicsuffix.org/list/), as A-labels."""

    exact: frozenset[str]
    wildcard: frozenset[str]  # "ck" for the rule "*.ck"
    exception: frozenset[str]  # "www.ck" for the rule "!www.ck"


def parse_suffix_list(text: str) -> SuffixRules:
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
    return SuffixRules(frozenset(exact), frozenset(wildcard), frozenset(exception))


@functools.cache
def suffix_rules(path: Path) -> SuffixRules | None:
    """The list at ``path``, read once (None when it is not installed). Blocking: an async caller
    calls it in a thread first (the doctor's diagnose does), later calls return the cached rules."""
    try:
        return parse_suffix_list(path.read_text("utf-8"))
    except OSError:
        return None


def public_suffix_length(labels: list[str], rules: SuffixRules) -> int:
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


def is_public_suffix(domain: str) -> bool:
    """Whether `domain` is itself a public suffix (com, co.uk, github.io) by the Public Suffix
    List; without the list installed only a single label is (the list's default rule "*").
    Blocking the first time (the list is read once)."""
    labels = domain.lower().rstrip(".").split(".")
    rules = suffix_rules(PUBLIC_SUFFIX_LIST)
    suffix = public_suffix_length(labels, rules) if rules else 1
    return suffix >= len(labels)
