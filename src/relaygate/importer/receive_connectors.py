"""`Get-ReceiveConnector` records → `[[receive_connectors]]` tables: the parameter mapping, the
parameters RelayGate has no key for, and the warnings a receive connector gets.
"""

from __future__ import annotations

import re
from typing import Any

from relaygate.importer.result import ImportResult
from relaygate.importer.values import (
    _METADATA,
    _Bad,
    _convert,
    _identity,
    _is_empty,
    _norm,
    _normalised_default,
    _Param,
    _text,
)

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
_BUILTIN_CONNECTOR = re.compile(
    r"^(Default Frontend|Client Frontend|Outbound Proxy Frontend|Default|Client Proxy) \S+$",
    re.IGNORECASE,
)


def _is_connector_record(record: dict[str, Any]) -> bool:
    keys = {k.lower() for k in record}
    return bool(keys & {"bindings", "remoteipranges", "authmechanism", "permissiongroups"})


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
                _disable(out, result, identity, param)
            continue
        if truncated:
            # The first entries only would lock out every device past them after the cut-over (or
            # listen on too few endpoints): the list is not imported at all.
            result.warnings.append(
                f"{identity}: {param.exchange} was cut short by $FormatEnumerationLimit ('...' after the "
                f"first {len(value)} entries in the export); not imported, and the connector is imported "
                "disabled. Re-export after `$FormatEnumerationLimit = -1` (or with ConvertTo-Json), or "
                f"fill in {param.key} and set enabled = true"
            )
            out["enabled"] = False
            continue
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


def _disable(out: dict[str, Any], result: ImportResult, identity: str, param: _Param) -> None:
    out["enabled"] = False
    result.warnings.append(
        f"{identity}: imported disabled because its {param.exchange} could not be read; "
        f"fill in {param.key} and set enabled = true"
    )


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
