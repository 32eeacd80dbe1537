"""Exchange receive-connector exports → RelayGate `[[receive_connectors]]` tables.

Reads what administrators can get out of an Exchange 2016/2019 organisation without tooling:

- ``Get-ReceiveConnector | Format-List *`` (wrapped continuation lines, ``{a, b}`` lists, ``...`` when
  ``$FormatEnumerationLimit`` truncated a list, ``36 MB (37,748,736 bytes)`` sizes);
- ``Get-ReceiveConnector | ConvertTo-Json`` (nested objects as a local shell serialises them, or strings
  as implicit remoting deserialises them; enums as numbers or names);
- ``Get-ReceiveConnector | Export-Csv`` (``#TYPE`` line, quoting, ``,``/``;`` delimiters, multi-valued
  properties space-separated or replaced by a .NET type name);
- ``Get-ADPermission -Identity <connector> | Format-List`` / ``Export-Csv`` / ``ConvertTo-Json`` for the
  extended rights that Add-ADPermission granted (the anonymous-relay right in particular).

The output dictionaries use the TOML keys of DESIGN.md (snake_case Exchange parameter names, Exchange's
enum spellings, ``[d.]hh:mm:ss`` time spans, ``36MB`` sizes, ``"unlimited"``). Parameters RelayGate has no
key for go to ``skipped``; values it cannot express, and imports that would behave differently, go to
``warnings``. Nothing here touches a file: the CLI decides what to write.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import json
import re
import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "EXTENDED_RIGHTS",
    "ExchangeImportError",
    "ImportResult",
    "canonical_user",
    "combine_results",
    "decode_export",
    "detect_format",
    "format_size",
    "parse_ad_permissions",
    "parse_exchange_export",
    "parse_receive_connectors",
]

ANONYMOUS_LOGON = "NT AUTHORITY\\ANONYMOUS LOGON"
AUTHENTICATED_USERS = "NT AUTHORITY\\Authenticated Users"
ACCEPT_ANY_RECIPIENT = "ms-Exch-SMTP-Accept-Any-Recipient"

#: The SMTP extended rights a receive connector's ACL can carry (reference §3.1), canonical spelling.
EXTENDED_RIGHTS = (
    "ms-Exch-SMTP-Submit",
    "ms-Exch-SMTP-Accept-Any-Recipient",
    "ms-Exch-SMTP-Accept-Any-Sender",
    "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
    "ms-Exch-SMTP-Accept-Authentication-Flag",
    "ms-Exch-Accept-Headers-Routing",
    "ms-Exch-Accept-Headers-Organization",
    "ms-Exch-Accept-Headers-Forest",
    "ms-Exch-Bypass-Anti-Spam",
    "ms-Exch-Bypass-Message-Size-Limit",
    "ms-Exch-SMTP-Accept-Exch50",
)
_RIGHTS_BY_LOWER = {r.lower(): r for r in EXTENDED_RIGHTS}

# Well-known principals, including their SIDs and the German spellings seen on localised DCs.
_PRINCIPALS = {
    "nt authority\\anonymous logon": ANONYMOUS_LOGON,
    "anonymous logon": ANONYMOUS_LOGON,
    "s-1-5-7": ANONYMOUS_LOGON,
    "nt-autorität\\anonymous-anmeldung": ANONYMOUS_LOGON,
    "nt authority\\authenticated users": AUTHENTICATED_USERS,
    "authenticated users": AUTHENTICATED_USERS,
    "s-1-5-11": AUTHENTICATED_USERS,
    "nt-autorität\\authentifizierte benutzer": AUTHENTICATED_USERS,
    "ms exchange\\externally secured servers": "MS Exchange\\Externally Secured Servers",
    "ms exchange\\partner servers": "MS Exchange\\Partner Servers",
    "ms exchange\\edge transport servers": "MS Exchange\\Edge Transport Servers",
    "ms exchange\\hub transport servers": "MS Exchange\\Hub Transport Servers",
}

# Rights each permission group grants on its own (reference §3.2). Explicit ACEs that only repeat
# these are dropped from `permissions`: `permission_groups` already says it.
_HEADERS_ROUTING = "ms-Exch-Accept-Headers-Routing"
_GROUP_GRANTS: dict[str, dict[str, frozenset[str]]] = {
    "AnonymousUsers": {
        ANONYMOUS_LOGON: frozenset(
            {
                _HEADERS_ROUTING,
                "ms-Exch-SMTP-Accept-Any-Sender",
                "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
                "ms-Exch-SMTP-Submit",
            }
        )
    },
    "ExchangeUsers": {
        AUTHENTICATED_USERS: frozenset(
            {
                _HEADERS_ROUTING,
                "ms-Exch-Bypass-Anti-Spam",
                ACCEPT_ANY_RECIPIENT,
                "ms-Exch-SMTP-Submit",
            }
        )
    },
    "Partners": {
        "MS Exchange\\Partner Servers": frozenset({_HEADERS_ROUTING, "ms-Exch-SMTP-Submit"})
    },
}
# Principals whose ACEs all come from the ExchangeServers / ExchangeLegacyServers groups.
_SERVER_PRINCIPAL_SUFFIXES = (
    "\\exchange servers",
    "\\edge transport servers",
    "\\hub transport servers",
    "\\externally secured servers",
    "\\exchangelegacyinterop",
)

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


# Exchange parameter → RelayGate key, value kind, Exchange 2019 default (reference §1.4).
_PARAMS = (
    _Param("TransportRole", "transport_role", "enum", "HubTransport", core=True),
    _Param("Enabled", "enabled", "bool", True, core=True),
    _Param("Bindings", "bindings", "bindings", core=True),
    _Param("RemoteIPRanges", "remote_ip_ranges", "ranges", core=True),
    _Param("AuthMechanism", "auth_mechanism", "auth", core=True),
    _Param("PermissionGroups", "permission_groups", "groups", core=True),
    _Param("ProtocolLoggingLevel", "protocol_logging_level", "enum", "None", core=True),
    _Param("Fqdn", "fqdn", "str", core=True),
    _Param("Banner", "banner", "str"),
    _Param("Comment", "comment", "str"),
    _Param("MaxMessageSize", "max_message_size", "size", "36MB", core=True),
    _Param("MaxRecipientsPerMessage", "max_recipients_per_message", "int", 200, core=True),
    _Param("ConnectionTimeout", "connection_timeout", "timespan", "00:10:00", core=True),
    _Param(
        "ConnectionInactivityTimeout",
        "connection_inactivity_timeout",
        "timespan",
        "00:05:00",
        core=True,
    ),
    _Param(
        "MaxInboundConnectionPerSource",
        "max_inbound_connection_per_source",
        "unlimited",
        20,
        core=True,
    ),
    _Param("MaxInboundConnection", "max_inbound_connection", "unlimited", 5000),
    _Param(
        "MaxInboundConnectionPercentagePerSource",
        "max_inbound_connection_percentage_per_source",
        "int",
        2,
    ),
    _Param("MessageRateLimit", "message_rate_limit", "unlimited", "unlimited"),
    _Param("MessageRateSource", "message_rate_source", "enum", "IPAddress"),
    _Param("RequireTLS", "require_tls", "bool", False),
    _Param("RequireEHLODomain", "require_ehlo_domain", "bool", False),
    _Param("MaxHeaderSize", "max_header_size", "size", "256KB"),
    _Param("MaxHopCount", "max_hop_count", "int", 30),
    _Param("MaxLocalHopCount", "max_local_hop_count", "int", 8),
    _Param("MaxProtocolErrors", "max_protocol_errors", "unlimited", 5),
    _Param("MaxLogonFailures", "max_logon_failures", "int", 3),
    _Param("TarpitInterval", "tarpit_interval", "timespan", "00:00:05"),
    _Param("AuthTarpitInterval", "auth_tarpit_interval", "timespan", "00:00:05"),
    _Param("EnhancedStatusCodesEnabled", "enhanced_status_codes_enabled", "bool", True),
    _Param("PipeliningEnabled", "pipelining_enabled", "bool", True),
    _Param("ChunkingEnabled", "chunking_enabled", "bool", True),
    _Param("BinaryMimeEnabled", "binary_mime_enabled", "bool", True),
    _Param("EightBitMimeEnabled", "eight_bit_mime_enabled", "bool", True),
    _Param(
        "DeliveryStatusNotificationEnabled", "delivery_status_notification_enabled", "bool", True
    ),
    _Param("SizeEnabled", "size_enabled", "enum", "Enabled"),
    _Param("BareLinefeedRejectionEnabled", "bare_linefeed_rejection_enabled", "bool", False),
    _Param(
        "RejectReservedTopLevelRecipientDomains",
        "reject_reserved_top_level_recipient_domains",
        "bool",
        False,
    ),
    _Param(
        "RejectReservedSecondLevelRecipientDomains",
        "reject_reserved_second_level_recipient_domains",
        "bool",
        False,
    ),
    _Param(
        "RejectSingleLabelRecipientDomains", "reject_single_label_recipient_domains", "bool", False
    ),
    _Param("DefaultDomain", "default_domain", "str"),
)
_PARAMS_BY_LOWER = {p.exchange.lower(): p for p in _PARAMS}

# Parameters RelayGate has no key for, with Exchange's default: reported in `skipped` only when set.
_UNSUPPORTED_DEFAULTS = {
    "orarenabled": "false",
    "longaddressesenabled": "false",
    "suppressxanonymoustls": "false",
    "proxyenabled": "false",
    "advertiseclientsettings": "false",
    "enableauthgssapi": "false",
    "extendedprotectionpolicy": "none",
    "domainsecureenabled": "false",
    "livecredentialenabled": "false",
    "maxacknowledgementdelay": "00:00:30",
    "tlscertificatename": "",
    "servicediscoveryfqdn": "",
    "tlsdomaincapabilities": "",
    "smtputf8enabled": "true",
}
_UNSUPPORTED_WARNINGS = {
    "tlscertificatename": "TlsCertificateName {value!r} cannot be imported: export that certificate and set "
    "tls_certificate_file / tls_key_file",
    "domainsecureenabled": "DomainSecureEnabled (mutual TLS with partner domains) is not supported by RelayGate",
    "longaddressesenabled": "LongAddressesEnabled (X.400 long addresses) is not supported by RelayGate",
}
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
_BUILTIN_CONNECTOR = re.compile(
    r"^(Default Frontend|Client Frontend|Outbound Proxy Frontend|Default|Client Proxy) \S+$",
    re.IGNORECASE,
)
_TYPE_NAME = re.compile(r"^(Deserialized\.)?(System|Microsoft)\.[A-Za-z0-9_.]+(`\d+)?(\[.*\])?$")
_UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}
_TIMESPAN = re.compile(r"^(-)?(?:(\d+)\.)?(\d{1,2}):(\d{1,2}):(\d{1,2})(?:\.(\d{1,7}))?$")


class ExchangeImportError(ValueError):
    """The text is not an export this module understands."""


class _Bad(ValueError):
    """A value that cannot be expressed in RelayGate; the message becomes a warning."""


@dataclass
class ImportResult:
    """What one or more exports yield.

    connectors: `[[receive_connectors]]` tables as plain dicts, in file order.
    send_connectors: `[[send_connectors]]` tables from Get-SendConnector exports, in file order.
    permissions: connector name → `[{user, extended_rights[, deny]}]` from Get-ADPermission output.
    warnings: values RelayGate cannot express, or imports that would behave differently.
    skipped: Exchange parameters with no RelayGate key (`SERVER\\Name: Parameter = value`).
    errors: problems that make a write unsafe (two different connectors with one name).
    sources: connector name → the Exchange identity(ies) it came from (`EX01\\Relay`).
    """

    connectors: list[dict[str, Any]] = field(default_factory=list)
    permissions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)
    send_connectors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "connectors": self.connectors,
            "send_connectors": self.send_connectors,
            "permissions": self.permissions,
            "warnings": self.warnings,
            "skipped": self.skipped,
            "errors": self.errors,
            "sources": self.sources,
        }


# ---------------------------------------------------------------------------------------------------
# Reading the three export formats into records (dicts of property name → raw value)
# ---------------------------------------------------------------------------------------------------


def decode_export(data: bytes) -> str:
    """Bytes of an exported file → text. Windows PowerShell 5.1 writes UTF-16 LE (`>`/Out-File),
    ASCII or UTF-8 with BOM (Export-Csv); anything else falls back to cp1252."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", errors="replace")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", errors="replace")
    head = data[:400]
    if len(head) >= 4 and head[1::2].count(0) > len(head) // 4 and head[0::2].count(0) == 0:
        return data.decode("utf-16-le", errors="replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("cp1252", errors="replace")


def detect_format(text: str) -> str:
    """'json', 'csv', 'list' (Format-List) or 'protocol-log'; raises ExchangeImportError otherwise."""
    stripped = text.lstrip("\ufeff \t\r\n")
    if not stripped:
        raise ExchangeImportError("the file is empty")
    if stripped[0] in "[{":
        return "json"
    first = stripped.splitlines()[0]
    if (
        first.startswith("#Software")
        or first.startswith("#Log-type")
        or "#Fields: date-time" in stripped[:2000]
    ):
        return "protocol-log"
    if first.upper().startswith("#TYPE"):
        return "csv"
    if re.match(r'^"?[A-Za-z][\w ]*"?\s*[,;\t]\s*"?[A-Za-z]', first) and not re.match(
        r"^\S+\s+:", first
    ):
        return "csv"
    if re.search(r"^[A-Za-z][\w.-]*\s*:", stripped, re.MULTILINE):
        return "list"
    raise ExchangeImportError(
        "not a Format-List, Export-Csv or ConvertTo-Json export of an Exchange cmdlet"
    )


_FL_KEY = re.compile(r"^([A-Za-z][A-Za-z0-9_.-]*)\s*:(?:\s(.*))?$")


def _join_continuation(previous: str, continuation: str) -> str:
    if previous.startswith("{") and not previous.endswith("}"):
        # Inside a wrapped {a, b, c} list: the break falls after ", " (or, rarely, inside one entry).
        return previous + (" " if previous.endswith(",") else "") + continuation
    return f"{previous} {continuation}" if previous else continuation


def _records_from_list(text: str) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    last_key: str | None = None
    for raw_line in text.splitlines():
        line = raw_line.rstrip()
        if not line.strip():
            if current:
                records.append(current)
                current, last_key = {}, None
            continue
        if line[0] in " \t":
            if last_key is not None:
                current[last_key] = _join_continuation(current[last_key], line.strip())
            continue
        match = _FL_KEY.match(line)
        if not match or match.group(1) in ("WARNING", "VERBOSE", "DEBUG", "PS"):
            last_key = None
            continue
        key, value = match.group(1), (match.group(2) or "").strip()
        if key in current:  # next object printed without a blank line in between
            records.append(current)
            current = {}
        current[key] = value
        last_key = key
    if current:
        records.append(current)
    return records


def _records_from_csv(text: str) -> list[dict[str, Any]]:
    lines = [ln for ln in text.lstrip("\ufeff").splitlines() if not ln.upper().startswith("#TYPE")]
    while lines and not lines[0].strip():
        lines.pop(0)
    if not lines:
        return []
    header = lines[0]
    delimiter = max((",", ";", "\t"), key=header.count)
    reader = csv.DictReader(io.StringIO("\n".join(lines)), delimiter=delimiter)
    return [{k: v for k, v in row.items() if k is not None} for row in reader]


def _records_from_json(text: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(text.lstrip("\ufeff"))
    except json.JSONDecodeError as exc:
        raise ExchangeImportError(f"not valid JSON: {exc}") from None
    if isinstance(data, dict) and isinstance(data.get("value"), list) and "Count" in data:
        data = data[
            "value"
        ]  # Windows PowerShell 5.1 wraps some arrays as {"value": [...], "Count": n}
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ExchangeImportError("JSON export must be an object or an array of objects")
    return [item for item in data if isinstance(item, dict)]


def _records(text: str) -> tuple[str, list[dict[str, Any]]]:
    fmt = detect_format(text)
    if fmt == "protocol-log":
        raise ExchangeImportError(
            "this is a protocol log; pass it with --logs (or let the CLI detect it)"
        )
    reader = {"json": _records_from_json, "csv": _records_from_csv, "list": _records_from_list}[fmt]
    return fmt, reader(text)


# ---------------------------------------------------------------------------------------------------
# Value conversion
# ---------------------------------------------------------------------------------------------------


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
            f"holds the .NET type name {raw.strip()!r} instead of its values (Export-Csv does this for "
            "multi-valued properties); export with ConvertTo-Json or Format-List instead"
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


def _identity(record: dict[str, Any]) -> tuple[str, str]:
    """→ (server, connector name) from Identity (`EX01\\Relay`, a DN or an ADObjectId object)."""
    raw = _get(record, "Identity")
    server = _string(_get(record, "Server")) if not _is_empty(_get(record, "Server")) else ""
    name = ""
    if isinstance(raw, dict):
        lowered = {k.lower(): v for k, v in raw.items()}
        raw = lowered.get("distinguishedname") or lowered.get("name") or ""
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


def _is_permission_record(record: dict[str, Any]) -> bool:
    keys = {k.lower() for k in record}
    return "extendedrights" in keys or ("user" in keys and "accessrights" in keys)


def _is_connector_record(record: dict[str, Any]) -> bool:
    keys = {k.lower() for k in record}
    return bool(keys & {"bindings", "remoteipranges", "authmechanism", "permissiongroups"})


# ---------------------------------------------------------------------------------------------------
# Connectors
# ---------------------------------------------------------------------------------------------------


def _connector(
    record: dict[str, Any], result: ImportResult, *, full: bool
) -> dict[str, Any] | None:
    server, name = _identity(record)
    if not name:
        result.warnings.append("a connector without Identity or Name was ignored")
        return None
    identity = f"{server}\\{name}" if server else name
    out: dict[str, Any] = {"name": name}
    present = {k.lower(): k for k in record}
    for param in _PARAMS:
        if param.exchange.lower() not in present:
            continue
        raw = record[present[param.exchange.lower()]]
        if _is_empty(raw) and param.kind not in ("bindings", "ranges", "auth", "groups"):
            continue
        try:
            value, truncated = _convert(param, raw)
        except _Bad as exc:
            result.warnings.append(f"{identity}: {param.exchange} {exc}; not imported")
            if param.key in ("bindings", "remote_ip_ranges"):
                out["enabled"] = False
                result.warnings.append(
                    f"{identity}: imported disabled because its {param.exchange} could not be read; "
                    f"fill in {param.key} and set enabled = true"
                )
            continue
        if truncated:
            result.warnings.append(
                f"{identity}: {param.exchange} was cut short by $FormatEnumerationLimit ('...' in the export); "
                f"only the {len(value)} entries shown were imported. Re-export after "
                "`$FormatEnumerationLimit = -1`, or with ConvertTo-Json"
            )
        if param.key == "bare_linefeed_rejection_enabled" and value is False:
            result.warnings.append(
                f"{identity}: BareLinefeedRejectionEnabled is False in Exchange; RelayGate keeps rejecting "
                "bare LF in DATA (SMTP smuggling protection). Set bare_linefeed_rejection_enabled = false "
                "only if a device needs it"
            )
            continue
        if param.kind == "str" and value == "":
            continue
        if param.key == "enabled" and out.get("enabled") is False:
            continue
        if full or param.core or value != _normalised_default(param):
            out[param.key] = value
    for key_lower, key in present.items():
        if key_lower in _PARAMS_BY_LOWER or key_lower in _METADATA:
            continue
        raw = record[key]
        shown = _text(raw)
        if key_lower in _UNSUPPORTED_DEFAULTS:
            default = _UNSUPPORTED_DEFAULTS[key_lower]
            if _norm(raw) == default or (default in ("none", "false") and _norm(raw) == "0"):
                continue
            template = _UNSUPPORTED_WARNINGS.get(key_lower)
            if template:
                result.warnings.append(f"{identity}: " + template.format(value=shown))
        elif _is_empty(raw):
            continue
        result.skipped.append(f"{identity}: {key} = {shown}")
    _connector_warnings(identity, name, out, result)
    result.sources.setdefault(name, []).append(identity)
    return out


def _norm(raw: Any) -> str:
    raw = _unwrap(raw)
    if _is_empty(raw):
        return ""
    if isinstance(raw, bool):
        return "true" if raw else "false"
    return str(raw).strip().lower()


def _connector_warnings(
    identity: str, name: str, out: dict[str, Any], result: ImportResult
) -> None:
    if _BUILTIN_CONNECTOR.match(name):
        result.warnings.append(
            f"{identity}: a connector Exchange setup creates; keep it only if devices send through it "
            "(check the protocol-log usage report)"
        )
    if out.get("transport_role") == "HubTransport":
        result.warnings.append(
            f"{identity}: TransportRole is HubTransport; RelayGate has one SMTP service, so the role is "
            "informational. Check the bindings do not clash with a FrontendTransport connector"
        )
    auth = out.get("auth_mechanism", [])
    if "Integrated" in auth:
        result.warnings.append(
            f"{identity}: AuthMechanism Integrated (NTLM/Kerberos) needs Active Directory; clients that "
            "authenticate that way must switch to BasicAuth over TLS"
        )
    if "ExchangeServer" in auth:
        result.warnings.append(
            f"{identity}: AuthMechanism ExchangeServer is for Exchange-to-Exchange traffic; there is no "
            "Exchange server behind RelayGate"
        )


def _records_to_result(records: list[dict[str, Any]], *, full: bool) -> ImportResult:
    result = ImportResult()
    permission_records = []
    for record in records:
        if _is_permission_record(record):
            permission_records.append(record)
        elif _is_send_connector_record(record):
            send = _send_connector(record, result, full=full)
            if send is not None:
                result.send_connectors.append(send)
        elif _is_connector_record(record):
            connector = _connector(record, result, full=full)
            if connector is not None:
                result.connectors.append(connector)
        else:
            server, name = _identity(record)
            label = f" ({server}\\{name})" if server else f" ({name})" if name else ""
            result.warnings.append(
                f"an object{label} that is neither a receive or send connector nor an AD permission was ignored"
            )
    if permission_records:
        result.permissions = _permissions(permission_records, result)
    return result


def parse_receive_connectors(text: str, *, filename: str = "", full: bool = False) -> ImportResult:
    """Parse a `Get-ReceiveConnector` export (Format-List, ConvertTo-Json or Export-Csv; detected).

    Get-ADPermission records in the same text fill `permissions`. With `full`, every mapped parameter
    is written; otherwise only the core keys and values that differ from Exchange's defaults.
    Raises ExchangeImportError when the text is not an export at all.
    """
    try:
        _, records = _records(text)
    except ExchangeImportError as exc:
        raise ExchangeImportError(f"{filename}: {exc}" if filename else str(exc)) from None
    result = _records_to_result(records, full=full)
    if not result.connectors and not result.send_connectors and not result.permissions and filename:
        result.warnings.append(f"{filename}: no connector or AD permission found")
    return result


def parse_exchange_export(text: str, *, filename: str = "", full: bool = False) -> ImportResult:
    """Parse a `Get-ReceiveConnector`, `Get-SendConnector` or `Get-ADPermission` export (any of the
    three formats; the kind of each object is told by its properties: Bindings / RemoteIPRanges for
    receive connectors, AddressSpaces / SmartHosts for send connectors). Receive connectors go to
    `connectors`, send connectors to `send_connectors`."""
    return parse_receive_connectors(text, filename=filename, full=full)


# ---------------------------------------------------------------------------------------------------
# Send connectors (Get-SendConnector)
# ---------------------------------------------------------------------------------------------------

# Exchange parameter → RelayGate `[[send_connectors]]` key, kind, RelayGate default (config/model.py).
_SEND_PARAMS = (
    _Param("Enabled", "enabled", "bool", True, core=True),
    _Param("DNSRoutingEnabled", "dns_routing_enabled", "bool", True, core=True),
    _Param("Port", "port", "int", 25),
    _Param("SmartHostAuthMechanism", "smart_host_auth_mechanism", "enum", "None", core=True),
    _Param("RequireTLS", "require_tls", "bool", False),
    _Param("TlsAuthLevel", "tls_auth_level", "enum", "EncryptionOnly"),
    _Param("TlsDomain", "tls_domain", "str"),
    _Param("Fqdn", "fqdn", "str", core=True),
    _Param("MaxMessageSize", "max_message_size", "size", core=True),
    _Param(
        "ConnectionInactivityTimeOut",
        "connection_inactivity_timeout",
        "timespan",
        "00:10:00",
    ),
    _Param("ProtocolLoggingLevel", "protocol_logging_level", "enum", "None", core=True),
    _Param("Comment", "comment", "str"),
    _Param("IgnoreSTARTTLS", "ignore_starttls", "bool", False),
    _Param("ForceHELO", "force_helo", "bool", False),
    _Param(
        "SmtpMaxMessagesPerConnection", "smtp_max_messages_per_connection", "int", 20, core=True
    ),
)
_SEND_PARAMS_BY_LOWER = {p.exchange.lower(): p for p in _SEND_PARAMS}
# Key order of the written tables (config/model.py SendConnector's field order).
_SEND_KEY_ORDER = (
    "name",
    "address_spaces",
    "dns_routing_enabled",
    "smart_hosts",
    "port",
    "smart_host_auth_mechanism",
    "require_tls",
    "tls_auth_level",
    "tls_domain",
    "cost",
    "enabled",
    "fqdn",
    "max_message_size",
    "connection_inactivity_timeout",
    "protocol_logging_level",
    "comment",
    "ignore_starttls",
    "force_helo",
    "smtp_max_messages_per_connection",
    "source_ip_address",
)
# Handled outside _SEND_PARAMS (address spaces + cost, smart hosts, source IP, certificate, credential).
_SEND_SPECIAL = frozenset(
    {
        "addressspaces",
        "smarthosts",
        "sourceipaddress",
        "tlscertificatename",
        "authenticationcredential",
    }
)
# Derived or routing-group bookkeeping that Get-SendConnector prints next to the settings.
_SEND_METADATA = frozenset(
    {
        "smarthostsstring",
        "homemta",
        "homemtaserverid",
        "sourceroutinggroup",
        "issmtpconnector",
    }
)
# Parameters RelayGate has no key for: (Exchange's default (None = always report), why not imported).
_SEND_UNSUPPORTED: dict[str, tuple[str | None, str]] = {
    "sourcetransportservers": (
        None,
        "RelayGate sends from its own nodes; there are no source transport servers",
    ),
    "isscopedconnector": ("false", "RelayGate has no AD sites: every connector serves all mail"),
    "frontendproxyenabled": ("false", "there is no Front End Transport proxy in RelayGate"),
    "errorpolicies": ("default", "RelayGate's retry and NDR policy is not set per connector"),
    "cloudservicesmailenabled": (
        "false",
        "hybrid cross-premises headers (X-MS-Exchange-Organization-*) are not written",
    ),
    "useexternaldnsserversenabled": ("false", "RelayGate resolves MX with [server] dns_servers"),
    "domainsecureenabled": ("false", "mutual TLS domain security is not supported"),
    "connecteddomains": ("", "X.400 / routing-group connected domains do not exist in RelayGate"),
    "connectortype": ("default", "the XEXCH50 connector type is Exchange-to-Exchange only"),
    "requireoorg": ("false", "the X-OORG extension is not supported"),
    "linkedreceiveconnector": ("", "RelayGate has no linked receive connectors"),
}
_ADDRESS_SPACE_TEXT = re.compile(r"^(?:([A-Za-z0-9-]+):)?(.*?)(?:;\s*(\d+))?$", re.DOTALL)
_SPACE_DOMAIN = re.compile(
    r"^(\*|(\*\.)?[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*)$"
)


def _is_send_connector_record(record: dict[str, Any]) -> bool:
    keys = {k.lower() for k in record}
    receive = {"bindings", "remoteipranges", "permissiongroups", "authmechanism"}
    send = {"addressspaces", "smarthosts", "smarthostauthmechanism", "dnsroutingenabled"}
    return bool(keys & send) and not keys & receive


def _address_space(item: Any) -> tuple[str, str, int]:
    """One AddressSpaces entry (`SMTP:*.corp.example;1` or a serialised AddressSpace object) →
    (type, address, cost)."""
    if isinstance(item, dict):
        lowered = {k.lower(): _unwrap(v) for k, v in item.items()}
        space_type = str(lowered.get("type") or lowered.get("addressspacetype") or "SMTP")
        address = lowered.get("address")
        if not isinstance(address, str) or not address.strip():
            address = _string(lowered.get("domain"))
            if lowered.get("includesubdomains") is True and address not in ("", "*"):
                address = "*." + address.removeprefix("*.")
        cost = _int(lowered.get("cost", 1) if lowered.get("cost") is not None else 1)
        return space_type.strip(), address.strip(), cost
    if not isinstance(item, str):
        raise _Bad(f"{_text(item)!r} is not an address space")
    match = _ADDRESS_SPACE_TEXT.match(item.strip())
    if not match:
        raise _Bad(f"{item!r} is not an address space ([type:]space[;cost])")
    type_text, address_text, cost_text = match.groups()
    return (type_text or "SMTP"), address_text.strip(), int(cost_text) if cost_text else 1


def _address_spaces(
    raw: Any, identity: str, out: dict[str, Any], result: ImportResult, full: bool
) -> None:
    try:
        items, truncated = _items(raw)
        spaces = [_address_space(item) for item in items]
    except _Bad as exc:
        result.warnings.append(f"{identity}: AddressSpaces {exc}; not imported")
        spaces, truncated = [], False
    if truncated:
        result.warnings.append(
            f"{identity}: AddressSpaces was cut short by $FormatEnumerationLimit ('...' in the export); "
            "only the entries shown were imported. Re-export after `$FormatEnumerationLimit = -1`, "
            "or with ConvertTo-Json"
        )
    kept: list[str] = []
    costs: list[int] = []
    for space_type, address, cost in spaces:
        text = f"{space_type}:{address};{cost}"
        if space_type.upper() != "SMTP":
            result.warnings.append(
                f"{identity}: address space {text} is not an SMTP address space; not imported"
            )
        elif address == "--":
            result.warnings.append(
                f"{identity}: address space {text} ('--', all accepted domains; Edge only) has no "
                "RelayGate equivalent; not imported"
            )
        elif not _SPACE_DOMAIN.match(address.lower()):
            result.warnings.append(
                f"{identity}: address space {text} is not '*', a domain or '*.domain'; not imported"
            )
        elif address.lower() not in kept:
            kept.append(address.lower())
            costs.append(cost)
    if not kept:
        # address_spaces is required: left at RelayGate's default ("*") on a disabled connector
        out["enabled"] = False
        result.warnings.append(
            f"{identity}: imported disabled because no SMTP address space could be read; "
            "set address_spaces and enabled = true"
        )
        return
    out["address_spaces"] = kept
    cost = min(costs)
    if len(set(costs)) > 1:
        result.warnings.append(
            f"{identity}: the address spaces have different costs ({', '.join(map(str, costs))}); "
            f"RelayGate has one cost per connector, imported as cost = {cost}. Split the connector "
            "if the costs matter"
        )
    if full or cost != 1:
        out["cost"] = cost


def _smart_host(item: Any) -> str:
    if isinstance(item, dict):
        lowered = {k.lower(): v for k, v in item.items()}
        if _unwrap(lowered.get("isipaddress")) is True or (
            _is_empty(lowered.get("domain")) and not _is_empty(lowered.get("address"))
        ):
            address = _address(_ip_text(lowered.get("address")))
            return f"[{address}]"
        text = _string(lowered.get("domain"))
    elif isinstance(item, str):
        text = item.strip()
    else:
        raise _Bad(f"{_text(item)!r} is not a smart host")
    if text.startswith("[") and text.endswith("]"):
        return f"[{_address(text[1:-1].removeprefix('IPv6:').removeprefix('ipv6:'))}]"
    try:
        return f"[{ipaddress.ip_address(text)}]"
    except ValueError:
        pass
    if not text or not re.fullmatch(r"[A-Za-z0-9_.-]+", text):
        raise _Bad(f"{text!r} is not a host name or IP address")
    return text.rstrip(".").lower()


def _send_auth_warnings(
    identity: str, out: dict[str, Any], record: dict[str, Any], result: ImportResult
) -> None:
    mechanism = out.get("smart_host_auth_mechanism")
    if mechanism in ("BasicAuth", "BasicAuthRequireTLS"):
        out["smart_host_auth_mechanism"] = "None"
        out["enabled"] = False
        user = ""
        credential = _unwrap(_get(record, "AuthenticationCredential"))
        if isinstance(credential, dict):
            lowered = {k.lower(): v for k, v in credential.items()}
            user = _string(lowered.get("username")) if lowered.get("username") else ""
        result.warnings.append(
            f"{identity}: SmartHostAuthMechanism {mechanism}: the AuthenticationCredential cannot be "
            "exported, so the connector is imported disabled and without AUTH. Set "
            f"smart_host_auth_mechanism = {mechanism!r}, auth_username"
            + (f" ({user!r} in Exchange)" if user else "")
            + " and auth_password_file (or auth_password_env), then enabled = true"
        )
    elif mechanism == "ExchangeServer":
        result.warnings.append(
            f"{identity}: SmartHostAuthMechanism ExchangeServer is Exchange-to-Exchange (Kerberos) "
            "authentication; RelayGate does not authenticate that way and sends without AUTH"
        )
    elif mechanism == "ExternalAuthoritative":
        result.warnings.append(
            f"{identity}: SmartHostAuthMechanism ExternalAuthoritative means the smart host trusts "
            "this server by its address or certificate; RelayGate sends without AUTH"
        )


def _send_connector(
    record: dict[str, Any], result: ImportResult, *, full: bool
) -> dict[str, Any] | None:
    _, name = _identity(record)
    if not name:
        result.warnings.append("a send connector without Identity or Name was ignored")
        return None
    identity = name  # send connectors are organisation objects: no server in the identity
    out: dict[str, Any] = {"name": name}
    present = {k.lower(): k for k in record}
    if "addressspaces" in present:
        _address_spaces(record[present["addressspaces"]], identity, out, result, full)
    if "smarthosts" in present and not _is_empty(record[present["smarthosts"]]):
        try:
            items, truncated = _items(record[present["smarthosts"]])
            hosts = [_smart_host(item) for item in items]
        except _Bad as exc:
            result.warnings.append(f"{identity}: SmartHosts {exc}; not imported")
        else:
            if truncated:
                result.warnings.append(
                    f"{identity}: SmartHosts was cut short by $FormatEnumerationLimit; only the "
                    f"{len(hosts)} shown were imported"
                )
            out["smart_hosts"] = list(dict.fromkeys(hosts))
    for param in _SEND_PARAMS:
        if param.exchange.lower() not in present:
            continue
        raw = record[present[param.exchange.lower()]]
        if _is_empty(raw):
            continue
        if param.kind == "size" and _norm(raw) == "unlimited":
            continue  # RelayGate's default (no max_message_size) is unlimited
        try:
            value, _ = _convert(param, raw)
        except _Bad as exc:
            result.warnings.append(f"{identity}: {param.exchange} {exc}; not imported")
            continue
        if param.kind == "str" and value == "":
            continue
        if param.key == "enabled" and out.get("enabled") is False:
            continue
        if full or param.core or value != _normalised_default(param):
            out[param.key] = value
    if "sourceipaddress" in present and not _is_empty(record[present["sourceipaddress"]]):
        try:
            address = _address(_ip_text(record[present["sourceipaddress"]]))
        except _Bad as exc:
            result.warnings.append(f"{identity}: SourceIPAddress {exc}; not imported")
        else:
            if not address.is_unspecified:  # 0.0.0.0 / :: = any local address
                out["source_ip_address"] = str(address)
    certificate = _get(record, "TlsCertificateName")
    if not _is_empty(certificate):
        result.warnings.append(
            f"{identity}: TlsCertificateName {_text(certificate)!r} cannot be imported (a reference to "
            "the Windows certificate store): export that certificate and set tls_certificate_file / "
            "tls_key_file"
        )
    _send_auth_warnings(identity, out, record, result)
    if out.get("smart_hosts") and out.get("dns_routing_enabled") is True:
        result.warnings.append(
            f"{identity}: SmartHosts are set but DNSRoutingEnabled is True; check which one Exchange "
            "used and remove the other"
        )
    for key_lower, key in present.items():
        if (
            key_lower in _SEND_PARAMS_BY_LOWER
            or key_lower in _SEND_SPECIAL
            or key_lower in _SEND_METADATA
            or key_lower in _METADATA
        ):
            continue
        raw = record[key]
        if key_lower in _SEND_UNSUPPORTED:
            default, reason = _SEND_UNSUPPORTED[key_lower]
            if default is not None and (
                _norm(raw) == default or (default == "false" and _norm(raw) == "0")
            ):
                continue
            if _is_empty(raw) and default is not None:
                continue
        elif _is_empty(raw):
            continue
        else:
            reason = "RelayGate has no key for it"
        result.skipped.append(f"{identity}: {key} = {_text(raw)} ({reason})")
    order = {key: i for i, key in enumerate(_SEND_KEY_ORDER)}
    return dict(sorted(out.items(), key=lambda item: order.get(item[0], len(order))))


# ---------------------------------------------------------------------------------------------------
# Permissions (Get-ADPermission)
# ---------------------------------------------------------------------------------------------------


def canonical_user(user: str) -> str:
    """Normalise a principal: well-known names and SIDs get Exchange's spelling; others are kept."""
    text = user.strip()
    return _PRINCIPALS.get(text.lower(), text)


def _permissions(
    records: list[dict[str, Any]], result: ImportResult
) -> dict[str, list[dict[str, Any]]]:
    grants: dict[str, dict[tuple[str, bool], list[str]]] = {}
    for record in records:
        server, name = _identity(record)
        identity = f"{server}\\{name}" if server else name
        try:
            inherited = not _is_empty(_get(record, "IsInherited")) and _bool(
                _get(record, "IsInherited")
            )
            deny = not _is_empty(_get(record, "Deny")) and _bool(_get(record, "Deny"))
            rights, _ = _items(_get(record, "ExtendedRights"))
        except _Bad as exc:
            result.warnings.append(f"{identity}: an AD permission entry could not be read ({exc})")
            continue
        user_raw = _get(record, "User")
        if not name or _is_empty(user_raw) or not rights or inherited:
            continue  # plain ACEs (ReadProperty, GenericAll...) and inherited ones are not connector rights
        user = canonical_user(_string(user_raw))
        kept = []
        for right in rights:
            canonical = _RIGHTS_BY_LOWER.get(str(right).lower())
            if canonical is None:
                result.skipped.append(f"{identity}: extended right {right} for {user}")
            elif canonical not in kept:
                kept.append(canonical)
        if not kept:
            continue
        bucket = grants.setdefault(name, {}).setdefault((user, deny), [])
        bucket.extend(r for r in kept if r not in bucket)
        if user not in _PRINCIPALS.values() and not user.lower().endswith(
            _SERVER_PRINCIPAL_SUFFIXES
        ):
            warning = (
                f"{identity}: {user} is an Active Directory account; RelayGate has no directory, so it only "
                "matches a RelayGate user of that exact name"
            )
            if warning not in result.warnings:
                result.warnings.append(warning)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, by_user in grants.items():
        out[name] = []
        for (user, deny), rights in by_user.items():
            entry: dict[str, Any] = {"user": user, "extended_rights": rights}
            if deny:
                entry["deny"] = True
            out[name].append(entry)
    return out


def parse_ad_permissions(text: str) -> dict[str, list[dict[str, Any]]]:
    """`Get-ADPermission` output (Format-List, Export-Csv or ConvertTo-Json) → connector name →
    `[{user, extended_rights[, deny]}]`. Inherited ACEs and ACEs without an SMTP extended right are left
    out; Deny ACEs are kept with `deny = true` (dropping one would grant more than Exchange did)."""
    _, records = _records(text)
    result = ImportResult()
    return _permissions([r for r in records if _is_permission_record(r)], result)


# ---------------------------------------------------------------------------------------------------
# Combining several files
# ---------------------------------------------------------------------------------------------------


def _implied(groups: list[str], user: str) -> frozenset[str] | None:
    """Rights the connector's permission groups already give `user`; None = all of the user's ACEs."""
    lowered = user.lower()
    if {"ExchangeServers", "ExchangeLegacyServers"} & set(groups) and lowered.endswith(
        _SERVER_PRINCIPAL_SUFFIXES
    ):
        return None
    implied: set[str] = set()
    for group in groups:
        implied |= _GROUP_GRANTS.get(group, {}).get(user, frozenset())
    return frozenset(implied)


def _grants_relay(connector: dict[str, Any]) -> bool:
    perms = connector.get("permissions", [])
    anonymous_relay = "AnonymousUsers" in connector.get("permission_groups", []) and any(
        p["user"] == ANONYMOUS_LOGON
        and ACCEPT_ANY_RECIPIENT in p["extended_rights"]
        and not p.get("deny")
        for p in perms
    )
    externally_secured = "ExternalAuthoritative" in connector.get("auth_mechanism", [])
    return anonymous_relay or externally_secured


def _covers_everything(ranges: list[str]) -> bool:
    for text in ranges:
        try:
            if "/" in text:
                if text.endswith("/0"):
                    return True
            elif "-" in text:
                low, _, high = text.partition("-")
                first, last = _address(low), _address(high)
                if int(last) - int(first) + 1 >= 2 ** (first.max_prefixlen - 8):
                    return True
        except _Bad:
            continue
    return False


def _without_fqdn(connector: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in connector.items() if k != "fqdn"}


def combine_results(results: list[ImportResult]) -> ImportResult:
    """Merge per-file results: one connector per name (identical copies from several servers are kept
    once, different ones are an error), permissions attached to their connector as `permissions`
    without the rights its permission groups already grant, and open-relay warnings."""
    merged = ImportResult()
    by_name: dict[str, dict[str, Any]] = {}
    send_by_name: dict[str, dict[str, Any]] = {}
    for result in results:
        merged.warnings.extend(result.warnings)
        merged.skipped.extend(result.skipped)
        merged.errors.extend(result.errors)
        for name, identities in result.sources.items():
            merged.sources.setdefault(name, []).extend(
                i for i in identities if i not in merged.sources.get(name, [])
            )
        for connector in result.connectors:
            key = connector["name"].lower()
            if key not in by_name:
                by_name[key] = connector
                merged.connectors.append(connector)
            elif _without_fqdn(by_name[key]) != _without_fqdn(connector):
                merged.errors.append(
                    f"two different connectors are named {connector['name']!r} "
                    f"({', '.join(merged.sources.get(connector['name'], []))}); RelayGate is one server, "
                    "so import one of them, or rename one in the export"
                )
            else:
                merged.warnings.append(
                    f"{connector['name']}: the same settings on "
                    f"{', '.join(merged.sources.get(connector['name'], []))}; imported once"
                    + (
                        f" with fqdn {by_name[key].get('fqdn')!r}"
                        if by_name[key].get("fqdn") != connector.get("fqdn")
                        else ""
                    )
                )
        for send in result.send_connectors:
            key = send["name"].lower()
            if key not in send_by_name:
                send_by_name[key] = send
                merged.send_connectors.append(send)
            elif send_by_name[key] != send:
                merged.errors.append(
                    f"two different send connectors are named {send['name']!r}; import one of them, "
                    "or rename one in the export"
                )
            else:
                merged.warnings.append(
                    f"{send['name']}: the same send connector is in several exports; imported once"
                )
        for name, entries in result.permissions.items():
            existing = merged.permissions.setdefault(name, [])
            for entry in entries:
                same = next(
                    (
                        e
                        for e in existing
                        if e["user"] == entry["user"] and e.get("deny") == entry.get("deny")
                    ),
                    None,
                )
                if same is None:
                    existing.append({**entry, "extended_rights": list(entry["extended_rights"])})
                else:
                    same["extended_rights"] += [
                        r for r in entry["extended_rights"] if r not in same["extended_rights"]
                    ]
    for name, entries in merged.permissions.items():
        target = by_name.get(name.lower())
        if target is None:
            merged.warnings.append(
                f"{name}: AD permissions found but the connector is not in this import; add them with "
                "`relaygate permission add` if it already exists in RelayGate"
            )
            continue
        attached = []
        for entry in entries:
            rights = entry["extended_rights"]
            if not entry.get("deny"):
                implied = _implied(target.get("permission_groups", []), entry["user"])
                if implied is None:
                    continue
                rights = [r for r in rights if r not in implied]
            if rights:
                attached.append({**entry, "extended_rights": rights})
        if attached:
            target["permissions"] = attached
    for connector in merged.connectors:
        origin = ", ".join(merged.sources.get(connector["name"], [connector["name"]]))
        if _grants_relay(connector) and _covers_everything(connector.get("remote_ip_ranges", [])):
            merged.warnings.append(
                f"{origin}: grants relay to (nearly) all addresses: this is an OPEN RELAY. Narrow "
                "remote_ip_ranges to the devices that send (see the protocol-log usage report) before using it"
            )
    return merged
