"""Raw export values → RelayGate values: the converters (booleans, numbers, sizes, time spans, enums,
flags, bindings, IP ranges), the `_Param` mapping entry they serve, a record's identity, and `_Bad`
for a value RelayGate cannot express.
"""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from dataclasses import dataclass
from typing import Any

_AUTH_BITS = (
    (1, "Tls"),
    (2, "Integrated"),
    (4, "BasicAuth"),
    (8, "BasicAuthRequireTLS"),
    (16, "ExchangeServer"),
    (32, "ExternalAuthoritative"),
)
_GROUP_BITS = (
    (1, "AnonymousUsers"),
    (2, "ExchangeUsers"),
    (4, "ExchangeServers"),
    (8, "ExchangeLegacyServers"),
    (16, "Partners"),
    (32, "Custom"),
)
_ENUMS: dict[str, dict[int, str]] = {
    "transport_role": {32: "HubTransport", 16384: "FrontendTransport"},
    "protocol_logging_level": {0: "None", 1: "Verbose"},
    "message_rate_source": {0: "None", 1: "IPAddress", 2: "User", 3: "All"},
    "size_enabled": {},  # numeric values are not documented: refuse rather than guess
    "smart_host_auth_mechanism": {},
    "tls_auth_level": {},
}
_ENUM_NAMES: dict[str, tuple[str, ...]] = {
    "transport_role": ("FrontendTransport", "HubTransport"),
    "protocol_logging_level": ("None", "Verbose"),
    "message_rate_source": ("None", "IPAddress", "User", "All"),
    "size_enabled": ("Enabled", "Disabled", "EnabledWithoutValue"),
    "smart_host_auth_mechanism": (
        "None",
        "BasicAuth",
        "BasicAuthRequireTLS",
        "ExchangeServer",
        "ExternalAuthoritative",
    ),
    "tls_auth_level": ("EncryptionOnly", "CertificateValidation", "DomainValidation"),
}


@dataclass(frozen=True)
class _Param:
    exchange: str
    key: str
    kind: str
    default: Any = None
    core: bool = False  # always written, even when equal to Exchange's default


# Object metadata every Exchange cmdlet prints; never a setting.
_METADATA = frozenset(
    k.lower()
    for k in (
        "RunspaceId",
        "AdminDisplayName",
        "ExchangeVersion",
        "Name",
        "DistinguishedName",
        "Identity",
        "Guid",
        "ObjectCategory",
        "ObjectClass",
        "WhenChanged",
        "WhenCreated",
        "WhenChangedUTC",
        "WhenCreatedUTC",
        "OrganizationId",
        "Id",
        "OriginatingServer",
        "IsValid",
        "ObjectState",
        "Server",
        "PSComputerName",
        "PSShowComputerName",
        "PSSourceJobInstanceId",
        "IsReadOnly",
    )
)


_TYPE_NAME = re.compile(r"^(Deserialized\.)?(System|Microsoft)\.[A-Za-z0-9_.]+(`\d+)?(\[.*\])?$")
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIMESPAN = re.compile(r"^(-)?(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,7}))?$")


class _Bad(ValueError):
    """A value that cannot be expressed in RelayGate; the message becomes a warning."""


def _get(record: dict[str, Any], name: str) -> Any:
    for key, value in record.items():
        if key.lower() == name.lower():
            return value
    return None


def _unwrap(raw: Any) -> Any:
    """{"value": x} / {"Value": x} wrappers (PSObject and Unlimited<T> serialisations) → x."""
    while isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        if lowered.get("isunlimited") is True:
            return "unlimited"
        if "value" in lowered and len(lowered) <= 3:
            raw = lowered["value"]
            continue
        break
    return raw


def _is_empty(raw: Any) -> bool:
    raw = _unwrap(raw)
    if raw is None:
        return True
    if isinstance(raw, str):
        return raw.strip() in ("", "{}", "$null")
    return isinstance(raw, list | dict) and not raw


def _text(raw: Any) -> str:
    """A short human rendering of a raw value (for skipped/warnings)."""
    raw = _unwrap(raw)
    if raw is None:
        return ""
    if isinstance(raw, bool):
        return "True" if raw else "False"
    if isinstance(raw, dict | list):
        text = json.dumps(raw, separators=(",", ":"))
    else:
        text = str(raw).strip()
    return text if len(text) <= 80 else text[:77] + "..."


def _check_type_name(raw: Any) -> None:
    if isinstance(raw, str) and _TYPE_NAME.match(raw.strip()):
        raise _Bad(
            f"holds the .NET type name {raw.strip()!r} instead of its values (Export-Csv writes "
            "multi-valued properties so, ConvertTo-Json what lies deeper than its -Depth, 2 by default); "
            "re-export with `ConvertTo-Json -Depth 5`, or with Format-List after "
            "`$FormatEnumerationLimit = -1`"
        )


def _items(raw: Any) -> tuple[list[Any], bool]:
    """A multi-valued property → (items, truncated)."""
    raw = _unwrap(raw)
    if raw is None:
        return [], False
    if isinstance(raw, list):
        return [_unwrap(x) for x in raw if not _is_empty(x)], False
    if isinstance(raw, dict | int):
        return [raw], False
    if not isinstance(raw, str):
        raise _Bad(f"unexpected value {raw!r}")
    _check_type_name(raw)
    text = raw.strip()
    if text.startswith("{"):
        text = text[1:]
        text = text[:-1] if text.endswith("}") else text
    truncated = False
    for ellipsis in ("...", "…"):
        if text.endswith(ellipsis):
            text, truncated = text[: -len(ellipsis)], True
    return [part for part in re.split(r"[,\s]+", text) if part], truncated


def _bool(raw: Any) -> bool:
    raw = _unwrap(raw)
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, int) and raw in (0, 1):
        return bool(raw)
    if isinstance(raw, str) and raw.strip().lower().lstrip("$") in ("true", "false"):
        return raw.strip().lower().lstrip("$") == "true"
    raise _Bad(f"{_text(raw)!r} is not True or False")


def _int(raw: Any) -> int:
    raw = _unwrap(raw)
    if isinstance(raw, bool):
        raise _Bad(f"{raw!r} is not a number")
    if isinstance(raw, int):
        return raw
    if isinstance(raw, float) and raw.is_integer():
        return int(raw)
    if isinstance(raw, str) and re.fullmatch(r"\d[\d,]*", raw.strip()):
        return int(raw.strip().replace(",", ""))
    raise _Bad(f"{_text(raw)!r} is not a whole number")


def _unlimited(raw: Any) -> int | str:
    raw = _unwrap(raw)
    if isinstance(raw, str) and raw.strip().lower() == "unlimited":
        return "unlimited"
    return _int(raw)


def format_size(size: int) -> str:
    """Bytes → the shortest exact RelayGate size: 37748736 → '36MB', 262144 → '256KB', 1000 → 1000."""
    for unit in ("GB", "MB", "KB"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


def _size(raw: Any) -> str | int:
    raw = _unwrap(raw)
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        for key in ("tobytes", "bytes", "tobytesvalue"):
            if key in lowered:
                return _size(lowered[key])
        raise _Bad(f"cannot read a size from {_text(raw)}")
    if isinstance(raw, bool):
        raise _Bad(f"{raw!r} is not a size")
    if isinstance(raw, int | float):
        size = int(raw)
    elif isinstance(raw, str):
        text = raw.strip()
        if text.lower() == "unlimited":
            raise _Bad("'unlimited' is not allowed for a size in RelayGate")
        exact = re.search(r"\(([^()]*?)\s*bytes\)", text)
        plain = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB)?", text, re.IGNORECASE)
        if exact and re.sub(r"\D", "", exact.group(1)):
            size = int(re.sub(r"\D", "", exact.group(1)))
        elif plain:
            size = int(float(plain.group(1)) * _UNITS[(plain.group(2) or "B").upper()])
        else:
            raise _Bad(f"{text!r} is not a size")
    else:
        raise _Bad(f"{_text(raw)!r} is not a size")
    formatted = format_size(size)
    return int(formatted) if formatted.isdigit() else formatted


def _format_seconds(total: int) -> str:
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    core = f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    return f"{days}.{core}" if days else core


def _timespan(raw: Any) -> str:
    raw = _unwrap(raw)
    seconds: float
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        if isinstance(lowered.get("ticks"), int | float):
            seconds = lowered["ticks"] / 10_000_000
        elif isinstance(lowered.get("totalseconds"), int | float):
            seconds = float(lowered["totalseconds"])
        elif isinstance(lowered.get("totalmilliseconds"), int | float):
            seconds = lowered["totalmilliseconds"] / 1000
        elif any(isinstance(lowered.get(k), int) for k in ("days", "hours", "minutes", "seconds")):
            seconds = sum(
                int(lowered.get(k) or 0) * factor
                for k, factor in (("days", 86400), ("hours", 3600), ("minutes", 60), ("seconds", 1))
            )
        else:
            raise _Bad(f"cannot read a time span from {_text(raw)}")
    elif isinstance(raw, bool):
        raise _Bad(f"{raw!r} is not a time span")
    elif isinstance(raw, int | float):
        seconds = float(raw)
    elif isinstance(raw, str):
        match = _TIMESPAN.match(raw.strip())
        if not match:
            raise _Bad(f"{raw.strip()!r} is not a time span")
        negative, days, hours, minutes, secs, fraction = match.groups()
        if negative:
            raise _Bad(f"{raw.strip()!r} is negative")
        seconds = int(days or 0) * 86400 + int(hours) * 3600 + int(minutes) * 60 + int(secs)
        seconds += int((fraction or "0").ljust(7, "0")) / 10_000_000
    else:
        raise _Bad(f"{_text(raw)!r} is not a time span")
    if seconds < 0:
        raise _Bad("negative time span")
    if seconds != int(seconds):
        raise _Bad(
            f"{seconds}s has a fraction of a second, which RelayGate's time spans cannot hold"
        )
    return _format_seconds(int(seconds))


def _enum(raw: Any, key: str) -> str:
    raw = _unwrap(raw)
    names = _ENUM_NAMES[key]
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, int) and not isinstance(raw, bool):
        if raw in _ENUMS[key]:
            return _ENUMS[key][raw]
        raise _Bad(f"numeric value {raw} has no known name; re-export with names (e.g. ConvertTo-Json from "
                   "the Exchange Management Shell, or -EnumsAsStrings)")  # fmt: skip
    if isinstance(raw, str):
        for name in names:
            if name.lower() == raw.strip().lower():
                return name
    raise _Bad(f"{_text(raw)!r} is not one of {', '.join(names)}")


def _flags(raw: Any, bits: tuple[tuple[int, str], ...]) -> list[str]:
    items, _ = _items(raw)
    names = [name for _, name in bits]
    found: set[str] = set()
    for item in items:
        if isinstance(item, str) and item.strip().isdigit():
            item = int(item.strip())
        if isinstance(item, int) and not isinstance(item, bool):
            rest = item
            for bit, name in bits:
                if rest & bit:
                    found.add(name)
                    rest &= ~bit
            if rest:
                raise _Bad(f"numeric value {item} has unknown flags {rest}")
            continue
        if not isinstance(item, str):
            raise _Bad(f"unexpected value {_text(item)!r}")
        if item.lower() == "none":
            found.add("None")
            continue
        canonical = next((n for n in names if n.lower() == item.lower()), None)
        if canonical is None:
            raise _Bad(f"{item!r} is not one of None, {', '.join(names)}")
        found.add(canonical)
    ordered = [n for n in names if n in found]
    return ordered or (["None"] if "None" in found else [])


def _ip_text(raw: Any) -> str:
    """An IPAddress as ConvertTo-Json writes it (object, string or the IPv4 `Address` long) → text."""
    raw = _unwrap(raw)
    if isinstance(raw, str):
        return raw.strip()
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        for key in ("ipaddresstostring", "expression", "address"):
            if key in lowered and lowered[key] is not None:
                return _ip_text(lowered[key])
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < 2**32:
        # .NET IPAddress.Address: network byte order read as a little-endian integer.
        return str(ipaddress.IPv4Address(struct.pack("<I", raw)))
    raise _Bad(f"cannot read an IP address from {_text(raw)}")


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text.strip().partition("%")[0])
    except ValueError:
        raise _Bad(f"{text!r} is not an IP address") from None


def _binding(item: Any) -> str:
    if isinstance(item, dict):
        lowered = {k.lower(): v for k, v in item.items()}
        address = _address(_ip_text(lowered.get("address")))
        port = _int(lowered.get("port"))
    elif isinstance(item, str):
        text = item.strip()
        if text.startswith("["):
            host, sep, port_text = text[1:].partition("]:")
        else:
            host, sep, port_text = text.rpartition(":")
        if not sep or not port_text.isdigit():
            raise _Bad(f"{text!r} is not a binding (IP:port)")
        address, port = _address(host), int(port_text)
    else:
        raise _Bad(f"{_text(item)!r} is not a binding")
    if not 0 < port < 65536:
        raise _Bad(f"port {port} is out of range")
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def _check_range(text: str) -> str:
    if "/" in text:
        host, _, length = text.partition("/")
        address = _address(host)
        if not length.isdigit() or int(length) > address.max_prefixlen:
            raise _Bad(f"{text!r} has an invalid prefix length")
    elif "-" in text:
        low, _, high = text.partition("-")
        first, last = _address(low), _address(high)
        if first.version != last.version or int(first) > int(last):
            raise _Bad(f"{text!r} is not a valid range")
    else:
        _address(text)
    return text


def _ip_range(item: Any) -> str:
    if isinstance(item, str):
        return _check_range(item.strip())
    if not isinstance(item, dict):
        raise _Bad(f"{_text(item)!r} is not an IP range")
    lowered = {k.lower(): v for k, v in item.items()}
    if isinstance(lowered.get("expression"), str):
        return _check_range(lowered["expression"].strip())
    low = _address(_ip_text(lowered.get("lowerbound")))
    high = _address(_ip_text(lowered.get("upperbound", lowered.get("lowerbound"))))
    if low.version != high.version or int(low) > int(high):
        raise _Bad(f"{_text(item)} is not a valid range")
    if low == high:
        return str(low)
    size = int(high) - int(low) + 1
    fmt = str(_unwrap(lowered.get("rangeformat", ""))).lower()
    if (
        (fmt in ("cidr", "2") or "cidrlength" in lowered)
        and size & (size - 1) == 0
        and int(low) % size == 0
    ):
        return f"{low}/{low.max_prefixlen - size.bit_length() + 1}"
    return f"{low}-{high}"


def _string(raw: Any) -> str:
    raw = _unwrap(raw)
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        for key in ("domain", "name", "tostring"):
            if isinstance(lowered.get(key), str):
                return lowered[key].strip()
        raise _Bad(f"cannot read text from {_text(raw)}")
    return "" if raw is None else str(raw).strip()


def _convert(param: _Param, raw: Any) -> tuple[Any, bool]:
    """→ (value, truncated)."""
    kind = param.kind
    if kind in ("bindings", "ranges"):
        items, truncated = _items(raw)
        convert = _binding if kind == "bindings" else _ip_range
        return [convert(item) for item in items], truncated
    if kind == "auth":
        return _flags(raw, _AUTH_BITS), False
    if kind == "groups":
        groups = _flags(raw, _GROUP_BITS)
        return [g for g in groups if g != "None"], False
    _check_type_name(raw)
    converters = {
        "bool": _bool,
        "int": _int,
        "unlimited": _unlimited,
        "size": _size,
        "timespan": _timespan,
        "str": _string,
    }
    if kind == "enum":
        return _enum(raw, param.key), False
    return converters[kind](raw), False


def _normalised_default(param: _Param) -> Any:
    if param.kind == "size" and param.default is not None:
        return _size(param.default)
    return param.default


def _id_parameter(raw: Any) -> str:
    """A principal or extended right (SecurityPrincipalIdParameter, ExtendedRightIdParameter): a string
    as remoting writes it, or the object a local shell's ConvertTo-Json writes (RawIdentity, else the
    SID)."""
    raw = _unwrap(raw)
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        for key in ("rawidentity", "name", "securityidentifier", "sid"):
            value = _unwrap(lowered.get(key))
            if isinstance(value, str) and value.strip():
                return value.strip()
        raise _Bad(f"cannot read a principal or right from {_text(raw)}")
    return _string(raw)


def _identity(record: dict[str, Any]) -> tuple[str, str]:
    """→ (server, connector name) from Identity (`EX01\\Relay`, a DN or an ADObjectId object)."""
    raw = _get(record, "Identity")
    try:
        server = _string(_get(record, "Server")) if not _is_empty(_get(record, "Server")) else ""
    except _Bad:
        server = ""  # an object without a name: the Identity DN (below) may still name the server
    name = ""
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        raw = (
            lowered.get("distinguishedname")
            or lowered.get("rawidentity")  # an IdParameter, as ConvertTo-Json writes it
            or lowered.get("name")
            or ""
        )
    if isinstance(raw, str) and raw.strip():
        text = raw.strip()
        if re.match(r"^CN=", text, re.IGNORECASE):
            parts = [p.replace("\\,", ",") for p in re.split(r"(?<!\\),", text)]
            cns = [p[3:] for p in parts if p[:3].upper() == "CN="]
            if cns:
                name = cns[0]
            lowered_cns = [c.lower() for c in cns]
            if "protocols" in lowered_cns and lowered_cns.index("protocols") + 1 < len(cns):
                server = server or cns[lowered_cns.index("protocols") + 1]
        elif "\\" in text:
            host, _, name = text.partition("\\")
            server = server or host
        else:
            name = text
    if not name:
        name = _string(_get(record, "Name"))
    return server, name.strip()


def _norm(raw: Any) -> str:
    raw = _unwrap(raw)
    if _is_empty(raw):
        return ""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw).strip().lower()
