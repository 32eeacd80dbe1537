"""`Get-SendConnector` records → `[[send_connectors]]` tables: the parameter mapping, address spaces
and costs, smart hosts, and the warnings a send connector gets.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from relaygate.importer.result import ImportResult
from relaygate.importer.values import (
    _METADATA,
    _address,
    _Bad,
    _convert,
    _get,
    _identity,
    _int,
    _ip_text,
    _is_empty,
    _items,
    _norm,
    _normalised_default,
    _Param,
    _string,
    _text,
    _unwrap,
)

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
        # The first entries only would route the domains past them elsewhere, or nowhere.
        result.warnings.append(
            f"{identity}: AddressSpaces was cut short by $FormatEnumerationLimit ('...' after the first "
            f"{len(spaces)} entries in the export); not imported. Re-export after "
            "`$FormatEnumerationLimit = -1` (or with ConvertTo-Json)"
        )
        spaces = []
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
    if out.get("protocol_logging_level") == "Verbose":
        result.warnings.append(
            f"{identity}: ProtocolLoggingLevel Verbose is imported, but RelayGate writes no SMTP "
            "send protocol log (SmtpSend): each delivery shows in the message tracking log "
            "(relaygate trace) and the queue's LastError"
        )
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
