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

The work is split over this package: `formats` (reading the three export formats into records),
`values` (converting raw values), `receive_connectors`, `send_connectors`, `permissions`
(Get-ADPermission) and `result` (`ImportResult`). This module holds the public entry points and
`combine_results`, and re-exports the public names of the others.
"""

from __future__ import annotations

from typing import Any

from relaygate.audit import relay_grant
from relaygate.config.model import Permission, ReceiveConnector
from relaygate.config.values import IPRange, parse_ip_range
from relaygate.importer.formats import ExchangeImportError, _records, decode_export, detect_format
from relaygate.importer.permissions import (
    _GROUP_GRANTS,
    _SERVER_PRINCIPAL_SUFFIXES,
    EXTENDED_RIGHTS,
    _is_permission_record,
    _permissions,
    canonical_user,
)
from relaygate.importer.permissions import AUTHENTICATED_USERS as AUTHENTICATED_USERS
from relaygate.importer.receive_connectors import _connector, _is_connector_record
from relaygate.importer.result import ImportResult
from relaygate.importer.send_connectors import _is_send_connector_record, _send_connector
from relaygate.importer.values import _identity, format_size
from relaygate.policy.rights import is_externally_secured

# The widest relay ranges `relaygate audit` accepts by default (its max_prefix_v4 / max_prefix_v6).
MAX_RELAY_PREFIX_V4 = 24
MAX_RELAY_PREFIX_V6 = 64

__all__ = [
    "EXTENDED_RIGHTS",
    "ExchangeImportError",
    "ImportResult",
    "canonical_user",
    "combine_results",
    "decode_export",
    "detect_format",
    "format_size",
    "is_open_relay",
    "parse_ad_permissions",
    "parse_exchange_export",
    "parse_receive_connectors",
    "relays_anonymously",
]


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


def parse_ad_permissions(text: str) -> dict[str, list[dict[str, Any]]]:
    """`Get-ADPermission` output (Format-List, Export-Csv or ConvertTo-Json) → connector name →
    `[{user, extended_rights[, deny]}]`. Inherited ACEs and ACEs without an SMTP extended right are left
    out; Deny ACEs are kept with `deny = true` (dropping one would grant more than Exchange did)."""
    _, records = _records(text)
    result = ImportResult()
    return _permissions([r for r in records if _is_permission_record(r)], result)


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


def _as_model(connector: dict[str, Any]) -> ReceiveConnector | None:
    """The rights-relevant part of an imported connector as the server sees it; None when its ranges
    do not parse (the write's validation names them)."""
    try:
        ranges = tuple(parse_ip_range(text) for text in connector.get("remote_ip_ranges", []))
    except ValueError:
        return None
    permissions = tuple(
        Permission(p["user"], tuple(p["extended_rights"]), bool(p.get("deny")))
        for p in connector.get("permissions", [])
    )
    return ReceiveConnector(
        name=connector["name"],
        remote_ip_ranges=ranges,
        auth_mechanism=tuple(connector.get("auth_mechanism", ("Tls",))),
        permission_groups=tuple(connector.get("permission_groups", ())),
        permissions=permissions,
    )


def _addresses_covered(ranges: tuple[IPRange, ...], version: int) -> int:
    """How many addresses of one family the ranges cover together (overlaps counted once)."""
    covered, end = 0, -1
    for entry in sorted((r for r in ranges if r.version == version), key=lambda r: r.first):
        first = max(entry.first, end + 1)
        if entry.last >= first:
            covered += entry.last - first + 1
            end = entry.last
    return covered


def _covers_nearly_everything(ranges: tuple[IPRange, ...]) -> bool:
    """At least half of an address family, however it is spelt (one /0, two /1 halves, a-b...)."""
    return any(
        _addresses_covered(ranges, version) >= 2 ** (bits - 1)
        for version, bits in ((4, 32), (6, 128))
    )


def _wide_ranges(ranges: tuple[IPRange, ...]) -> list[str]:
    """Entries wider than `relaygate audit` lets a relay range be (its defaults: /24, /64)."""
    wide = []
    for entry in ranges:
        prefix = entry.prefix_length()
        if entry.version == 4 and prefix < MAX_RELAY_PREFIX_V4:
            wide.append(f"{entry.text} ({entry.size:,} addresses, as wide as a /{prefix})")
        elif entry.version == 6 and prefix < MAX_RELAY_PREFIX_V6:
            wide.append(f"{entry.text} (as wide as a /{prefix})")
    return wide


def _anonymous_relay(model: ReceiveConnector) -> bool:
    """Anonymous sessions relay: Accept-Any-Recipient and Submit both (without Submit MAIL is
    refused, so the relay right alone lets nothing through), the policy `relaygate audit` uses."""
    return relay_grant(model).anonymous


def _open_relay(model: ReceiveConnector) -> bool:
    return _anonymous_relay(model) and _covers_nearly_everything(model.remote_ip_ranges)


def relays_anonymously(connector: dict[str, Any]) -> bool:
    """Whether an imported connector's anonymous sessions may relay (method A or B), judged by the
    server's own rights code; True when its ranges cannot be read (the caller must not assume less)."""
    model = _as_model(connector)
    return model is None or _anonymous_relay(model)


def is_open_relay(connector: dict[str, Any]) -> bool:
    """Whether an imported connector's anonymous sessions may relay for (nearly) every address,
    judged by the server's own rights code."""
    model = _as_model(connector)
    return model is not None and _open_relay(model)


def _disable(connector: dict[str, Any]) -> None:
    """enabled = false, written next to the name where Exchange's Enabled was not exported."""
    if "enabled" not in connector:
        name = connector.pop("name")
        rest = dict(connector)
        connector.clear()
        connector.update({"name": name, "enabled": False, **rest})
    connector["enabled"] = False


def _check_relay(connector: dict[str, Any], origin: str, merged: ImportResult) -> None:
    """Who the imported connector lets relay, judged by the server's own rights code
    (`session_rights`, through audit's `relay_grant`: the relay right and Submit both): an ACE
    for ANONYMOUS LOGON or Everyone relays whatever the permission groups say, and
    ExternalAuthoritative is full trust however few hosts it covers. An open relay
    is imported disabled: a running server reloads its config as soon as `--write` changes it."""
    model = _as_model(connector)
    if model is None:
        return
    if _open_relay(model):
        if connector.get("enabled", True):
            _disable(connector)
            merged.disabled_open_relays.append(connector["name"])
        merged.warnings.append(
            f"{origin}: grants relay to (nearly) all addresses: this is an OPEN RELAY, so it is imported "
            "disabled. Narrow remote_ip_ranges to the devices that send (see the protocol-log usage "
            "report), then set enabled = true"
        )
    elif _anonymous_relay(model) and not is_externally_secured(model):
        wide = _wide_ranges(model.remote_ip_ranges)
        if wide:
            merged.warnings.append(
                f"{origin}: anonymous clients of {', '.join(wide)} may relay: narrow remote_ip_ranges to "
                "the devices that send (see the protocol-log usage report, or --narrow-ranges)"
            )
    if is_externally_secured(model):
        hosts = sum(_addresses_covered(model.remote_ip_ranges, version) for version in (4, 6))
        merged.warnings.append(
            f"{origin}: ExternalAuthoritative (externally secured) trusts {hosts:,} address(es) fully: "
            "their mail relays, counts as internal and authenticated, may use any internal sender "
            "address, and bypasses the size limit. Keep it for a few hosts secured outside the relay, "
            "or move the devices to AnonymousUsers + an Accept-Any-Recipient permission"
        )


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
        _check_relay(connector, origin, merged)
    return merged
