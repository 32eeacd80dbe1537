"""How a receive connector lets clients relay (`relay_grant`): method A, method B, after AUTH.

Apart from the findings: the admin centre and the CLI's connector commands show a connector's relay
grant without auditing anything."""

from __future__ import annotations

from dataclasses import dataclass

from relaygate.config.model import ReceiveConnector
from relaygate.policy.rights import ACCEPT_ANY_RECIPIENT, is_externally_secured, session_rights

#: The auth_mechanism values for which the server offers AUTH. Not Integrated (NTLM/Kerberos needs
#: Active Directory): a connector with only that offers no AUTH at all (smtp.session).
_AUTH_OFFERING = frozenset({"BasicAuth"})


@dataclass(frozen=True, slots=True)
class RelayGrant:
    """How a connector lets clients relay.

    anonymous: anonymous sessions hold Accept-Any-Recipient (the connector relays for its ranges).
    method_a: explicit permissions granting it to ANONYMOUS LOGON / Everyone (Add-ADPermission).
    method_b: ExternalAuthoritative + ExchangeServers (externally secured, full trust).
    authenticated: sessions that AUTH relay (ExchangeUsers with an AUTH mechanism offered).
    """

    anonymous: bool
    method_a: tuple[str, ...]
    method_b: bool
    authenticated: bool

    def describe(self) -> str:
        parts = []
        if self.method_b:
            parts.append("method B: ExternalAuthoritative + ExchangeServers")
        if self.method_a:
            parts.append(f"method A: permission for {', '.join(self.method_a)}")
        if self.anonymous and not parts:
            parts.append("anonymous grant")
        if not self.anonymous and self.authenticated:
            parts.append("after AUTH only")
        return "; ".join(parts) if parts else "no"


def relay_grant(connector: ReceiveConnector) -> RelayGrant:
    """A session relays when it holds Accept-Any-Recipient and Submit: without Submit its MAIL is
    refused (check_mail), so the relay right alone lets nothing through."""
    anon = session_rights(connector)
    anonymous = anon.may_relay and anon.may_submit
    principals = {p.lower() for p in anon.principals}
    method_a = tuple(
        dict.fromkeys(
            p.user
            for p in connector.permissions
            if not p.deny
            and ACCEPT_ANY_RECIPIENT in p.extended_rights
            and p.user.lower() in principals
        )
    )
    method_b = is_externally_secured(connector) and anonymous
    offers_auth = bool(_AUTH_OFFERING & set(connector.auth_mechanism))
    user = session_rights(connector, authenticated_user="relaygate-audit")
    authenticated = offers_auth and user.may_relay and user.may_submit
    return RelayGrant(anonymous, method_a if anonymous else (), method_b, authenticated)
