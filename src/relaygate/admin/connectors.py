"""One connector as the admin centre shows it (``/connectors/receive/{name}``,
``/connectors/send/{name}``) and the JSON API returns it (``/api/connectors/...``).

Read-only, from the configuration the relay runs with. The keys and their values are what
``relaygate connector show`` / ``send-connector show`` print (`relaygate.cli.config_objects`:
``obj_json`` for JSON, ``text_value`` for people); secrets never appear, because the configuration
holds only where they are (file paths, environment variable names), never their contents, and
nothing here reads those files.

`relaygate.cli.config_objects` is imported where it is used: importing it loads the whole CLI
(every verb module, ~0.35 s), which the admin listener should not pay at start-up, and
`relaygate.admin.web` imports this module.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from relaygate.audit import Finding, relay_grant
from relaygate.config.model import Config, ReceiveConnector, SendConnector
from relaygate.policy import rights as r
from relaygate.policy.rights import SessionRights, session_rights
from relaygate.queue import pacing

__all__ = [
    "AUTHENTICATED_SAMPLE",
    "find_receive",
    "find_send",
    "receive_connector_view",
    "send_connector_view",
]

#: The user the "authenticated session" card is shown for: a user no permission names, so it shows
#: what any user who signs in gets. Users named by a permission get a card of their own.
AUTHENTICATED_SAMPLE = "(any authenticated user)"

#: Principals that are groups or server identities, not users who sign in with AUTH.
_GROUP_PRINCIPALS = frozenset(
    p.lower()
    for p in (
        r.ANONYMOUS,
        r.AUTHENTICATED_USERS,
        r.EVERYONE,
        r.EXCHANGE_SERVERS,
        r.EXTERNALLY_SECURED,
        r.LEGACY_INTEROP,
        r.PARTNER_SERVERS,
    )
)


def find_receive(config: Config, name: str) -> ReceiveConnector | None:
    """The receive connector named ``name`` (any case: names are unique in any case)."""
    from relaygate.cli.config_objects import find_obj

    return find_obj(config.receive_connectors, "name", name)


def find_send(config: Config, name: str) -> SendConnector | None:
    from relaygate.cli.config_objects import find_obj

    return find_obj(config.send_connectors, "name", name)


def _keys(kind: Any, obj: Any) -> list[dict[str, Any]]:
    """Every key with its value as ``show`` prints it (text) and as ``--json`` gives it."""
    from relaygate.cli.config_objects import json_value, text_value

    return [
        {
            "key": f.name,
            "value": json_value(getattr(obj, f.name)),
            "text": text_value(kind, f.name, getattr(obj, f.name)),
        }
        for f in dataclasses.fields(kind.cls)
    ]


def _session(rights: SessionRights) -> dict[str, Any]:
    """A session's rights, grouped by what granted them (a permission group or a permission)."""
    groups: dict[str, list[str]] = {}
    for right, granted_by in rights.sources:
        groups.setdefault(granted_by, []).append(right)
    return {
        "principals": list(rights.principals),
        "rights": sorted(rights.rights),
        "granted_by": [{"source": k, "rights": sorted(v)} for k, v in groups.items()],
        "may_submit": rights.may_submit,
        "may_relay": rights.may_relay,
        "log_tokens": rights.log_tokens(),
    }


def named_users(connector: ReceiveConnector) -> list[str]:
    """The users a permission of `connector` names (Add-ADPermission -User alice), in file order,
    each once (names are matched in any case, as the session matches them)."""
    users: dict[str, str] = {}
    for permission in connector.permissions:
        if permission.user.lower() not in _GROUP_PRINCIPALS:
            users.setdefault(permission.user.lower(), permission.user)
    return list(users.values())


def _offers_auth(connector: ReceiveConnector) -> bool:
    return any(m.startswith("BasicAuth") for m in connector.auth_mechanism)


def receive_connector_view(
    config: Config, connector: ReceiveConnector, findings: list[Finding]
) -> dict[str, Any]:
    """The receive connector page's data (also ``GET /api/connectors/receive/{name}``)."""
    from relaygate.admin.web import relay_method
    from relaygate.cli.config_objects import RECEIVE

    grant = relay_grant(connector)
    method, detail = relay_method(connector)
    return {
        "kind": "receive",
        "name": connector.name,
        "identity": f"{config.server.name}\\{connector.name}",
        "enabled": connector.enabled,
        "keys": _keys(RECEIVE, connector),
        "relay": {
            "method": method,
            "description": detail,
            "anonymous": grant.anonymous,
            "method_a": list(grant.method_a),
            "method_b": grant.method_b,
            "authenticated": grant.authenticated,
        },
        "rights": {
            "anonymous": _session(session_rights(connector)),
            "authenticated": _session(
                session_rights(connector, authenticated_user=AUTHENTICATED_SAMPLE)
            ),
            # A user's own grants (and denials) apply only after that user signs in.
            "users": [
                {"user": user, **_session(session_rights(connector, authenticated_user=user))}
                for user in named_users(connector)
            ],
            "offers_auth": _offers_auth(connector),
        },
        "allowed_senders": [r.text for r in connector.allowed_senders],
        "allowed_recipients": [r.text for r in connector.allowed_recipients],
        "findings": [
            f.to_dict() for f in findings if f.connector.lower() == connector.name.lower()
        ],
    }


def send_connector_view(
    config: Config,
    connector: SendConnector,
    findings: list[Finding],
    queues: dict[str, Any],
) -> dict[str, Any]:
    """The send connector page's data (also ``GET /api/connectors/send/{name}``); ``queues``:
    ``QueueControl.queues()``, of which the delivery queues through this connector are kept."""
    from relaygate.admin.web import route_text
    from relaygate.cli.config_objects import SEND
    from relaygate.delivery.oauth import auth_label

    overflow = None
    if connector.overflow_connector:
        target = find_send(config, connector.overflow_connector)
        overflow = {
            "name": target.name if target is not None else connector.overflow_connector,
            "exists": target is not None,
            "enabled": bool(target is not None and target.enabled),
        }
    where = f'send connector "{connector.name}"'.lower()
    name = connector.name.lower()
    mine = [
        q
        for q in queues.get("queues", [])
        if name in (s.strip().lower() for s in str(q.get("SendConnector", "")).split(","))
    ]
    return {
        "kind": "send",
        "name": connector.name,
        "enabled": connector.enabled,
        "keys": _keys(SEND, connector),
        "delivery_method": connector.delivery_method,
        "route": route_text(connector),
        "auth": auth_label(connector) or "None",
        "pacing": pacing.describe(connector),
        "max_messages_per_minute": connector.max_messages_per_minute,
        "max_recipients_per_day": connector.max_recipients_per_day,
        "overflow_connector": overflow,
        "queues": [
            {
                k: q.get(k)
                for k in (
                    "Identity",
                    "NextHopDomain",
                    "DeliveryType",
                    "Status",
                    "MessageCount",
                    "RecipientCount",
                    "NextRetryTime",
                    "LastError",
                )
            }
            for q in mine
        ],
        # Always false now that Get-Queue counts every message; kept in the API's answer.
        "queues_truncated": bool(queues.get("truncated")),
        "findings": [f.to_dict() for f in findings if f.connector.lower() == where],
    }
