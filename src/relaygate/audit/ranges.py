"""Questions about RemoteIPRanges entries the rules ask: every address of a family covered, loopback
only, the addresses two entries share (as text for a finding).

Apart because the receive connector, proxy and DKIM rules all ask them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from relaygate.config.values import IPRange, parse_ip_range

_LOOPBACK_V4 = parse_ip_range("127.0.0.0/8")
_LOOPBACK_V6 = parse_ip_range("::1")


def _is_all(entry: IPRange) -> bool:
    return entry.prefix_length() == 0


def _families_covered(ranges: Sequence[IPRange]) -> list[int]:
    """The address families (4, 6) every address of which some entry contains: 0.0.0.0/0, and
    also 0.0.0.0/1 + 128.0.0.0/1 or any other set of entries that leaves no gap."""
    covered = []
    for version, last in ((4, 2**32 - 1), (6, 2**128 - 1)):
        reached = -1  # every address up to here is in some entry
        for entry in sorted((r for r in ranges if r.version == version), key=lambda r: r.first):
            if entry.first > reached + 1:
                break
            reached = max(reached, entry.last)
        if reached >= last:
            covered.append(version)
    return covered


def _is_loopback_only(entry: IPRange) -> bool:
    """127.0.0.0/8 or ::1: this machine only, however many addresses it spells (its processes, or
    a proxy on it: `loopback-relay-with-proxies`)."""
    return _LOOPBACK_V4.contains_range(entry) or _LOOPBACK_V6.contains_range(entry)


def _family_name(entry: IPRange) -> str:
    return "IPv4" if entry.version == 4 else "IPv6"


def _address(version: int, value: int) -> str:
    return str(ipaddress.IPv4Address(value) if version == 4 else ipaddress.IPv6Address(value))


def _overlap_text(a: IPRange, b: IPRange) -> str:
    first, last = max(a.first, b.first), min(a.last, b.last)
    if first == last:
        return _address(a.version, first)
    return f"{_address(a.version, first)}-{_address(a.version, last)}"
