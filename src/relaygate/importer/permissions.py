"""`Get-ADPermission` records → connector name → `[{user, extended_rights[, deny]}]`, and what
RelayGate knows of the principals and SMTP extended rights in them.
"""

from __future__ import annotations

from typing import Any

from relaygate.importer.result import ImportResult
from relaygate.importer.values import (
    _Bad,
    _bool,
    _get,
    _id_parameter,
    _identity,
    _is_empty,
    _items,
)

ANONYMOUS_LOGON = "NT AUTHORITY\\ANONYMOUS LOGON"
AUTHENTICATED_USERS = "NT AUTHORITY\\Authenticated Users"
EVERYONE = "Everyone"
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
    "everyone": EVERYONE,
    "s-1-1-0": EVERYONE,
    "jeder": EVERYONE,
    "tout le monde": EVERYONE,
    "todos": EVERYONE,
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


def _is_permission_record(record: dict[str, Any]) -> bool:
    keys = {k.lower() for k in record}
    return "extendedrights" in keys or ("user" in keys and "accessrights" in keys)


# Well-known accounts by their name alone: a localised domain controller translates the "NT AUTHORITY"
# part ("AUTORITE NT\\ANONYMOUS LOGON" on a French one) but not always the account.
_WELL_KNOWN_ACCOUNTS = {
    "anonymous logon": ANONYMOUS_LOGON,
    "anonymous-anmeldung": ANONYMOUS_LOGON,
    "authenticated users": AUTHENTICATED_USERS,
    "authentifizierte benutzer": AUTHENTICATED_USERS,
    "utilisateurs authentifiés": AUTHENTICATED_USERS,
}


def canonical_user(user: str) -> str:
    """Normalise a principal: well-known names and SIDs get Exchange's spelling, whatever the
    language of the domain controller that named them; others are kept."""
    text = user.strip()
    known = _PRINCIPALS.get(text.lower())
    if known is not None:
        return known
    _, _, account = text.rpartition("\\")
    return _WELL_KNOWN_ACCOUNTS.get(account.lower(), text)


def _rights(raw: Any) -> list[Any]:
    """ExtendedRights as a list; one cut short by $FormatEnumerationLimit cannot be read (a Deny ACE
    read in part would grant what it denies)."""
    items, truncated = _items(raw)
    if truncated:
        raise _Bad(
            "ExtendedRights was cut short by $FormatEnumerationLimit ('...'); re-export after "
            "`$FormatEnumerationLimit = -1`, or with ConvertTo-Json"
        )
    return items


def _said_inherited_relay(
    identity: str, user: str, rights: list[Any], result: ImportResult
) -> None:
    """Inherited ACEs are not imported (most are Exchange's own groups' rights, which permission
    groups carry), but an inherited relay right for anonymous clients is likely what let the
    devices relay (Add-ADPermission run on the container): say so, never drop it in silence."""
    if any(str(right).lower() == ACCEPT_ANY_RECIPIENT.lower() for right in rights):
        result.warnings.append(
            f"{identity}: {user} holds {ACCEPT_ANY_RECIPIENT} by inheritance (from the server's "
            "receive connector container); inherited rights are not imported: if the devices "
            "relay by it, add it with `relaygate permission add`"
        )


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
            rights = [_id_parameter(item) for item in _rights(_get(record, "ExtendedRights"))]
            user_raw = _get(record, "User")
            user = "" if _is_empty(user_raw) else canonical_user(_id_parameter(user_raw))
        except _Bad as exc:
            result.warnings.append(f"{identity}: an AD permission entry could not be read ({exc})")
            continue
        if inherited and not deny and user in (ANONYMOUS_LOGON, EVERYONE):
            _said_inherited_relay(identity, user, rights, result)
        if not user or not rights or inherited:
            continue  # plain ACEs (ReadProperty, GenericAll...) and inherited ones are not connector rights
        if not name:
            if not any(str(right).lower() in _RIGHTS_BY_LOWER for right in rights):
                continue
            # Dropping it in silence would lose a relay grant (or, for a Deny, widen the rights).
            result.warnings.append(
                f"an AD permission entry ({'Deny' if deny else 'Allow'} {', '.join(rights)} for {user}) "
                "names no connector in its Identity; not imported"
            )
            continue
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
