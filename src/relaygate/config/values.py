"""Parsers for the value syntaxes administrators know from Exchange: time spans, sizes, IP ranges, bindings,
smart hosts.

Each parser raises `ValueError` with a message written for the administrator; the loader adds the file,
connector and key to it.
"""

from __future__ import annotations

import ipaddress
import math
import re
from dataclasses import dataclass
from datetime import timedelta

__all__ = [
    "Binding",
    "IPRange",
    "normalise_ip",
    "parse_binding",
    "parse_ip_range",
    "parse_size",
    "parse_smart_host",
    "parse_timespan",
    "wildcard_covers",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# [-][d.]hh:mm:ss[.fffffff]  (Exchange/.NET TimeSpan as printed by Get-ReceiveConnector)
_TIMESPAN = re.compile(r"^(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,7}))?$")
_SIZE = re.compile(
    r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?\s*(?:\(([\d,]+) bytes\))?\s*$", re.IGNORECASE
)
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def parse_timespan(value: object) -> timedelta:
    """`00:05:00`, `2.00:00:00`, `0.00:00:05` → timedelta. Integers are taken as seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a time span like '00:05:00', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"time span must not be negative, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"expected a time span like '00:05:00', got {value!r}")
        try:
            return timedelta(seconds=value)
        except OverflowError:
            raise ValueError(f"time span {value!r} is too large") from None
    if not isinstance(value, str):
        raise ValueError(f"expected a time span like '00:05:00', got {value!r}")
    m = _TIMESPAN.match(value.strip())
    if not m:
        raise ValueError(
            f"{value!r} is not a time span; use [d.]hh:mm:ss such as '00:05:00' or '2.00:00:00'"
        )
    days, hours, minutes, seconds, fraction = m.groups()
    if int(hours) > 23 or int(minutes) > 59 or int(seconds) > 59:
        raise ValueError(
            f"{value!r} is not a time span: hours must be < 24, minutes and seconds < 60"
        )
    micro = int((fraction or "0").ljust(7, "0")[:7]) // 10
    try:
        return timedelta(
            days=int(days or 0),
            hours=int(hours),
            minutes=int(minutes),
            seconds=int(seconds),
            microseconds=micro,
        )
    except OverflowError:
        raise ValueError(f"{value!r} is too large a time span") from None


def format_timespan(value: timedelta) -> str:
    """[d.]hh:mm:ss[.fffffff] as Get-ReceiveConnector prints it (a fraction is kept: half a
    second was shown as 00:00:00)."""
    days, rest = value.days, value.seconds
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    core = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    if value.microseconds:
        core += f".{value.microseconds * 10:07d}"
    return f"{days}.{core}" if days else core


def parse_size(value: object) -> int:
    """`25MB`, `512KB`, `36 MB (37,748,736 bytes)` or a byte count → bytes (binary units, as Exchange)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '25MB' or a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '25MB' or a byte count, got {value!r}")
    m = _SIZE.match(value)
    if not m:
        raise ValueError(
            f"{value!r} is not a size; use a byte count or a number with KB, MB or GB (e.g. '25MB')"
        )
    number, unit, exact = m.groups()
    if exact:
        return int(exact.replace(",", ""))
    size = float(number) * _UNITS[(unit or "B").upper()]
    if not math.isfinite(size):  # int() of an infinite float raises OverflowError
        raise ValueError(f"{value!r} is too large a size")
    return int(size)


def format_size(value: int) -> str:
    for unit in ("GB", "MB", "KB"):
        if value and value % _UNITS[unit] == 0:
            return f"{value // _UNITS[unit]}{unit}"
    return str(value)


_STRICT_V4 = re.compile(
    r"^(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(\.(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)){3}$"
)


def _parse_address(text: str) -> IPAddress:
    """One address, strict: no leading zeros in IPv4 octets; an IPv6 zone id is accepted and dropped."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if ":" in text:
        address, _, _zone = text.partition("%")
        try:
            return ipaddress.IPv6Address(address)
        except ValueError:
            raise ValueError(f"{text!r} is not a valid IPv6 address") from None
    if not _STRICT_V4.match(text):
        raise ValueError(
            f"{text!r} is not a valid IPv4 address (four decimal octets, no leading zeros)"
        )
    return ipaddress.IPv4Address(text)


def normalise_ip(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:10.1.2.3) is matched as the IPv4 address it carries (DESIGN decision 6)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True, slots=True)
class IPRange:
    """An inclusive range of addresses of one family, as RemoteIPRanges holds them.

    text: the entry as the administrator wrote it (shown by `explain` and `audit`).
    version: 4 or 6. first/last: the integer bounds, inclusive.
    """

    text: str
    version: int
    first: int
    last: int

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, address: IPAddress) -> bool:
        address = normalise_ip(address)
        return address.version == self.version and self.first <= int(address) <= self.last

    def contains_range(self, other: IPRange) -> bool:
        return (
            self.version == other.version and self.first <= other.first and other.last <= self.last
        )

    def overlaps(self, other: IPRange) -> bool:
        return (
            self.version == other.version and self.first <= other.last and other.first <= self.last
        )

    def prefix_length(self) -> int:
        """The prefix of the smallest CIDR block as wide as this range (for audit's 'too wide' check)."""
        bits = 32 if self.version == 4 else 128
        return bits - (self.size - 1).bit_length()

    def __str__(self) -> str:
        return self.text


_MAPPED_FIRST = 0xFFFF_0000_0000  # ::ffff:0.0.0.0
_MAPPED_LAST = 0xFFFF_FFFF_FFFF  # ::ffff:255.255.255.255


def _make_range(text: str, version: int, first: int, last: int) -> IPRange:
    """An entry wholly inside ::ffff:0:0/96 is stored as the IPv4 range it spells: clients are matched as
    IPv4 (DESIGN decision 6), so an IPv6-typed mapped entry would otherwise silently match nobody."""
    if version == 6 and first >= _MAPPED_FIRST and last <= _MAPPED_LAST:
        return IPRange(text, 4, first - _MAPPED_FIRST, last - _MAPPED_FIRST)
    return IPRange(text, version, first, last)


def parse_ip_range(text: str) -> IPRange:
    """Every form Exchange accepts: `a`, `a-b`, `a/len` (host bits allowed), IPv6 with zone id."""
    if not isinstance(text, str):
        raise ValueError(f"expected an address, range or CIDR as a string, got {text!r}")
    raw = text.strip()
    if "/" in raw:
        address_text, _, length_text = raw.partition("/")
        address = _parse_address(address_text)
        bits = 32 if address.version == 4 else 128
        if not length_text.isdigit() or int(length_text) > bits:
            raise ValueError(f"{raw!r}: prefix length must be 0-{bits}")
        network = ipaddress.ip_network(f"{address}/{int(length_text)}", strict=False)
        return _make_range(
            raw, address.version, int(network.network_address), int(network.broadcast_address)
        )
    if "-" in raw:
        first_text, _, last_text = raw.partition("-")
        first, last = _parse_address(first_text), _parse_address(last_text)
        if first.version != last.version:
            raise ValueError(f"{raw!r}: both ends of a range must be the same address family")
        if int(first) > int(last):
            raise ValueError(f"{raw!r} is a reversed range: the first address is above the last")
        return _make_range(raw, first.version, int(first), int(last))
    address = _parse_address(raw)
    return _make_range(raw, address.version, int(address), int(address))


ALL_IPV4 = parse_ip_range("0.0.0.0-255.255.255.255")
ALL_IPV6 = parse_ip_range("::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")


@dataclass(frozen=True, slots=True)
class Binding:
    """A local endpoint a connector listens on. `0.0.0.0` and `::` are wildcards for their family."""

    address: str
    port: int

    @property
    def is_wildcard(self) -> bool:
        return self.address in ("0.0.0.0", "::")

    @property
    def version(self) -> int:
        return 6 if ":" in self.address else 4

    def matches(self, local_ip: IPAddress, local_port: int) -> bool:
        if local_port != self.port:
            return False
        local_ip = normalise_ip(local_ip)
        if self.is_wildcard:
            # A dual-stack [::] socket also receives IPv4 (as mapped addresses), so it matches both.
            return self.address == "::" or local_ip.version == 4
        return ipaddress.ip_address(self.address) == local_ip

    def shares_endpoint(self, other: Binding) -> bool:
        """True when both would listen on the same local endpoint: the same address and port, or a
        wildcard of the other's family on that port ([::] is dual-stack, so it covers IPv4 too)."""
        if self.port != other.port:
            return False
        if self.address == other.address:
            return True
        return (self.is_wildcard and (self.address == "::" or other.version == 4)) or (
            other.is_wildcard and (other.address == "::" or self.version == 4)
        )

    def __str__(self) -> str:
        return (
            f"[{self.address}]:{self.port}" if self.version == 6 else f"{self.address}:{self.port}"
        )


def parse_binding(text: str) -> Binding:
    """`0.0.0.0:25`, `[::]:25`, `10.0.0.1:587`; `[::ffff:10.0.0.1]:25` is `10.0.0.1:25`."""
    if not isinstance(text, str):
        raise ValueError(f"expected 'IP:port', got {text!r}")
    raw = text.strip()
    if raw.startswith("["):
        address_text, sep, port_text = raw[1:].partition("]:")
        if not sep:
            raise ValueError(f"{raw!r} is not a binding; write IPv6 as '[::]:25'")
    else:
        address_text, sep, port_text = raw.rpartition(":")
        if not sep or ":" in address_text:
            raise ValueError(
                f"{raw!r} is not a binding; use 'IP:port' such as '0.0.0.0:25' or '[::]:25'"
            )
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{raw!r}: port must be 1-65535")
    # An IPv4-mapped address is the IPv4 address it carries (DESIGN decision 6): a connection to it
    # has that IPv4 local address, which a binding kept as IPv6 would never match.
    address = normalise_ip(_parse_address(address_text))
    return Binding(str(address), int(port_text))


# A smart host's name: letters, digits, hyphens (and underscores, seen in internal names),
# dot-separated labels of at most 63 characters, an optional final dot.
_HOST_NAME = re.compile(
    r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\.?$"
)
_SMART_HOST_USAGE = "use a host name, an IPv4 address or an [IP] literal, with an optional :port"


def parse_smart_host(entry: str, default_port: int) -> tuple[str, int, bool]:
    """``host`` / ``host:port`` / ``[ip]`` / ``[IPv6:ip]`` / ``[ip]:port`` / a bare IPv4 or IPv6
    address → (host, port, is_ip): a name lower-cased without its final dot, an address in its
    canonical form (IPv4-mapped as IPv4). The one parser, for `check` and for delivery."""
    text = entry.strip()
    if text.startswith("["):
        inner, closed, rest = text[1:].partition("]")
        if inner.lower().startswith("ipv6:"):
            inner = inner[5:]
        ip = _address(inner)
        if ip is None:
            raise ValueError(f"{entry!r} is not an IP address inside []; {_SMART_HOST_USAGE}")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"{entry!r} is not a smart host; {_SMART_HOST_USAGE}")
        return ip, _smart_host_port(entry, rest[1:] if rest else None, default_port), True
    if text.count(":") > 1:  # a bare IPv6 address
        ip = _address(text)
        if ip is None:
            raise ValueError(f"{entry!r} is not an IPv6 address; {_SMART_HOST_USAGE}")
        return ip, default_port, True
    host, colon, port_text = text.partition(":")
    port = _smart_host_port(entry, port_text if colon else None, default_port)
    ip = _address(host)
    if ip is not None:
        return ip, port, True
    if not _HOST_NAME.match(host.lower()) or len(host.rstrip(".")) > 253:
        raise ValueError(f"{entry!r} is not a host name or IP address; {_SMART_HOST_USAGE}")
    return host.rstrip(".").lower(), port, False


def _address(text: str) -> str | None:
    try:
        return str(normalise_ip(ipaddress.ip_address(text)))
    except ValueError:
        return None


def _smart_host_port(entry: str, text: str | None, default_port: int) -> int:
    if text is None:
        return default_port
    if not (text.isascii() and text.isdigit() and 0 < int(text) < 65536):
        raise ValueError(f"{entry!r}: the port must be 1-65535")
    return int(text)


def wildcard_covers(wildcard: Binding, binding: Binding, *, ipv6_only: bool) -> bool:
    """The listening socket of `wildcard` (0.0.0.0 or ::) receives the connections to `binding`
    on its port: 0.0.0.0 those to IPv4 addresses, :: those to IPv6 ones, and to IPv4 ones too
    unless it is `ipv6_only` (smtp/listener_sockets.py: when 0.0.0.0 is bound on the same port)."""
    if wildcard.port != binding.port:
        return False
    if wildcard.address == "0.0.0.0":
        return binding.version == 4
    return binding.version == 6 or not ipv6_only
