"""Permission groups → security principals → SMTP extended rights (exchange-semantics.md §3).

A session holds the rights of the principals it runs as: anonymous sessions run as
`NT AUTHORITY\\ANONYMOUS LOGON`, authenticated ones as `NT AUTHORITY\\Authenticated Users` (and the
user's own name), and sessions on an ExternalAuthoritative + ExchangeServers connector as
`MS Exchange\\Externally Secured Servers` (method B). Explicit `permissions` (Add-ADPermission) add
rights to a principal, or take them away with `deny = true`.
"""

from __future__ import annotations

from dataclasses import dataclass

from relaygate.config.model import ReceiveConnector
from relaygate.policy.address_rules import SendAsList

__all__ = [
    "ANONYMOUS",
    "AUTHENTICATED_USERS",
    "EXTENDED_RIGHTS",
    "EXTERNALLY_SECURED",
    "SessionRights",
    "session_rights",
]

SUBMIT = "ms-Exch-SMTP-Submit"
ACCEPT_ANY_RECIPIENT = "ms-Exch-SMTP-Accept-Any-Recipient"
ACCEPT_ANY_SENDER = "ms-Exch-SMTP-Accept-Any-Sender"
ACCEPT_AUTHORITATIVE_DOMAIN_SENDER = "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"
ACCEPT_AUTHENTICATION_FLAG = "ms-Exch-SMTP-Accept-Authentication-Flag"
HEADERS_ROUTING = "ms-Exch-Accept-Headers-Routing"
HEADERS_ORGANIZATION = "ms-Exch-Accept-Headers-Organization"
HEADERS_FOREST = "ms-Exch-Accept-Headers-Forest"
BYPASS_ANTI_SPAM = "ms-Exch-Bypass-Anti-Spam"
BYPASS_MESSAGE_SIZE_LIMIT = "ms-Exch-Bypass-Message-Size-Limit"
ACCEPT_EXCH50 = "ms-Exch-SMTP-Accept-Exch50"

# Extended right → the token Exchange writes in the protocol log's "Set Session Permissions" line, in
# the order Exchange writes them.
EXTENDED_RIGHTS: dict[str, str] = {
    SUBMIT: "SMTPSubmit",
    ACCEPT_ANY_RECIPIENT: "SMTPAcceptAnyRecipient",
    ACCEPT_AUTHENTICATION_FLAG: "SMTPAcceptAuthenticationFlag",
    ACCEPT_ANY_SENDER: "SMTPAcceptAnySender",
    ACCEPT_AUTHORITATIVE_DOMAIN_SENDER: "SMTPAcceptAuthoritativeDomainSender",
    BYPASS_ANTI_SPAM: "BypassAntiSpam",
    BYPASS_MESSAGE_SIZE_LIMIT: "BypassMessageSizeLimit",
    ACCEPT_EXCH50: "SMTPAcceptEXCH50",
    HEADERS_ROUTING: "AcceptRoutingHeaders",
    HEADERS_FOREST: "AcceptForestHeaders",
    HEADERS_ORGANIZATION: "AcceptOrganizationHeaders",
}

ANONYMOUS = "NT AUTHORITY\\ANONYMOUS LOGON"
AUTHENTICATED_USERS = "NT AUTHORITY\\Authenticated Users"
EVERYONE = "Everyone"
EXCHANGE_SERVERS = "Exchange Servers"
EXTERNALLY_SECURED = "MS Exchange\\Externally Secured Servers"
LEGACY_INTEROP = "ExchangeLegacyInterop"
PARTNER_SERVERS = "MS Exchange\\Partner Servers"

_EXTERNALLY_SECURED_RIGHTS = frozenset(
    {
        HEADERS_ROUTING,
        BYPASS_ANTI_SPAM,
        BYPASS_MESSAGE_SIZE_LIMIT,
        ACCEPT_ANY_RECIPIENT,
        ACCEPT_ANY_SENDER,
        ACCEPT_AUTHENTICATION_FLAG,
        ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
        ACCEPT_EXCH50,
        SUBMIT,
    }
)

# PermissionGroup → (principal, rights) — §3.2.
GROUP_GRANTS: dict[str, tuple[str, frozenset[str]]] = {
    "AnonymousUsers": (
        ANONYMOUS,
        frozenset({HEADERS_ROUTING, ACCEPT_ANY_SENDER, ACCEPT_AUTHORITATIVE_DOMAIN_SENDER, SUBMIT}),
    ),
    "ExchangeUsers": (
        AUTHENTICATED_USERS,
        frozenset({HEADERS_ROUTING, BYPASS_ANTI_SPAM, ACCEPT_ANY_RECIPIENT, SUBMIT}),
    ),
    "ExchangeServers": (
        EXCHANGE_SERVERS,
        _EXTERNALLY_SECURED_RIGHTS | {HEADERS_FOREST, HEADERS_ORGANIZATION},
    ),
    "ExchangeLegacyServers": (LEGACY_INTEROP, _EXTERNALLY_SECURED_RIGHTS),
    "Partners": (PARTNER_SERVERS, frozenset({HEADERS_ROUTING, SUBMIT})),
}


@dataclass(frozen=True, slots=True)
class SessionRights:
    """What a session may do. `principals` are the identities it runs as; `sources` says, per right,
    which group or permission granted it (for `explain`). `send_as`: the authenticated user's
    send-as list from the users file (None: the user has none, or the session is anonymous), the
    Send-As right Exchange checks on the mailbox; it narrows the senders the rights allow."""

    rights: frozenset[str]
    principals: tuple[str, ...]
    sources: tuple[tuple[str, str], ...]
    externally_secured: bool = False
    send_as: SendAsList | None = None

    def has(self, right: str) -> bool:
        return right in self.rights

    @property
    def may_submit(self) -> bool:
        return SUBMIT in self.rights

    @property
    def may_relay(self) -> bool:
        return ACCEPT_ANY_RECIPIENT in self.rights

    @property
    def bypasses_size_limit(self) -> bool:
        return BYPASS_MESSAGE_SIZE_LIMIT in self.rights

    def log_tokens(self) -> str:
        """The `Set Session Permissions` text of the protocol log, in Exchange's order."""
        return " ".join(token for right, token in EXTENDED_RIGHTS.items() if right in self.rights)


def is_externally_secured(connector: ReceiveConnector) -> bool:
    return (
        "ExternalAuthoritative" in connector.auth_mechanism
        and "ExchangeServers" in connector.permission_groups
    )


def session_rights(
    connector: ReceiveConnector,
    *,
    authenticated_user: str | None = None,
    send_as: SendAsList | None = None,
) -> SessionRights:
    """The rights of a session on `connector`, anonymous or after AUTH as `authenticated_user`
    (whose send-as list, if any, is `send_as`)."""
    externally_secured = is_externally_secured(connector)
    if authenticated_user is not None:
        principals: list[str] = [AUTHENTICATED_USERS, authenticated_user, EVERYONE]
    else:
        principals = [ANONYMOUS, EVERYONE]
    if externally_secured:
        principals.insert(0, EXTERNALLY_SECURED)

    rights: set[str] = set()
    sources: list[tuple[str, str]] = []
    lowered = {p.lower() for p in principals}
    for group in connector.permission_groups:
        grant = GROUP_GRANTS.get(group)
        if grant is None:
            continue
        principal, granted = grant
        if group == "ExchangeServers" and externally_secured:
            # Method B: the session runs as Externally Secured Servers (no org/forest header rights).
            principal, granted = EXTERNALLY_SECURED, _EXTERNALLY_SECURED_RIGHTS
        if principal.lower() in lowered:
            for right in sorted(granted - rights):
                sources.append((right, f"PermissionGroups {group} ({principal})"))
            rights |= granted
    denied: set[str] = set()
    for permission in connector.permissions:
        if permission.user.lower() not in lowered:
            continue
        if permission.deny:
            denied |= set(permission.extended_rights)
            continue
        for right in permission.extended_rights:
            if right not in rights:
                sources.append((right, f"permission for {permission.user}"))
            rights.add(right)
    rights -= denied
    sources = [s for s in sources if s[0] in rights]
    return SessionRights(
        frozenset(rights),
        tuple(principals),
        tuple(sources),
        externally_secured,
        send_as if authenticated_user is not None else None,
    )
