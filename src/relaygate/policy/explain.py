"""`explain`: the decisions the server would make for a client, built from the server's own functions."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from relaygate import replies
from relaygate.addresses import AddressError, parse_mail_from, parse_rcpt_to, split_args
from relaygate.config.model import Config, ReceiveConnector
from relaygate.config.values import Binding, normalise_ip
from relaygate.delivery.oauth import auth_label
from relaygate.delivery.routing import explain_route
from relaygate.policy.address_rules import SendAsList, compile_connector_rules
from relaygate.policy.rights import EXTENDED_RIGHTS, session_rights
from relaygate.policy.selection import Selection, select_connector
from relaygate.policy.verdicts import (
    check_header_from,
    check_mail,
    check_rcpt,
    host_ips,
    relay_local_ips,
)
from relaygate.queue import pacing

__all__ = ["Explanation", "endpoints_for", "explain"]


@dataclass
class Explanation:
    local: str
    client_ip: str
    selection: Selection
    rights: list[dict[str, str]] = field(default_factory=list)
    principals: list[str] = field(default_factory=list)
    mail: dict[str, Any] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    header_from: dict[str, Any] | None = None
    #: --auth-user: the reply AUTH gets on the chosen connector (None: no AUTH asked about)
    auth: dict[str, Any] | None = None
    #: require_tls on a STARTTLS listener: MAIL's reply before STARTTLS (None: no such rule)
    tls: dict[str, Any] | None = None
    #: --auth-user with a send-as list in the users file: its patterns (None: no list)
    send_as: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        sel = self.selection
        return {
            "local": self.local,
            "client_ip": self.client_ip,
            "connector": sel.connector.name if sel.connector else None,
            "reason": sel.reason,
            "binding": str(sel.binding) if sel.binding else None,
            "matched_range": sel.matched_range.text if sel.matched_range else None,
            "beaten": [
                {
                    "connector": c.connector.name,
                    "range": c.matched_range.text if c.matched_range else None,
                    "why": c.reason,
                }
                for c in sel.beaten
            ],
            "not_candidates": [
                {"connector": c.connector.name, "why": c.reason} for c in sel.rejected
            ],
            "auth": self.auth,
            "send_as": self.send_as,
            "tls": self.tls,
            "principals": self.principals,
            "rights": self.rights,
            "allowed_senders": [r.text for r in sel.connector.allowed_senders]
            if sel.connector
            else [],
            "allowed_recipients": [r.text for r in sel.connector.allowed_recipients]
            if sel.connector
            else [],
            "mail": self.mail,
            "recipients": self.recipients,
            "header_from": self.header_from,
        }


def endpoints_for(config: Config, client_ip: str) -> list[tuple[str, int]]:
    """Without --local: every distinct binding, a wildcard standing for 'any local address'.

    The client's family is the one the server sees: an IPv4-mapped address (::ffff:10.0.0.5) is the
    IPv4 client it carries, as `select_connector` and the server's canonical_ip treat it."""
    seen: list[tuple[str, int]] = []
    try:
        v6 = normalise_ip(ipaddress.ip_address(client_ip.partition("%")[0])).version == 6
    except ValueError:
        v6 = ":" in client_ip
    for connector in config.receive_connectors:
        for b in connector.bindings:
            if b.is_wildcard:
                address = "::" if b.address == "::" else ("0.0.0.0" if not v6 else "::")
                endpoint = (address, b.port)
            else:
                endpoint = (b.address, b.port)
            if endpoint not in seen:
                seen.append(endpoint)
    return seen


def _route_for(config: Config, address: str) -> dict[str, Any]:
    """The route the queue manager would take for an accepted recipient (delivery/routing.py)."""
    route = explain_route(config.send_connectors, address)
    reply = route.reply
    return {
        "connector": route.route.connector_name,
        "next_hop": route.route.next_hop,
        "delivery_type": route.route.delivery_type,
        "reason": route.reason,
        "reply": reply.line() if reply is not None else None,
        # the chosen send connector's pacing (max_messages_per_minute, max_recipients_per_day)
        "pacing": pacing.describe(route.connector) if route.connector is not None else None,
        # the mailbox the message leaves as through that connector (send_as), None: as written
        "send_as": (getattr(route.connector, "send_as", "") or None) if route.connector else None,
        # how that connector signs in to its smart host (None: it does not)
        "auth": auth_label(route.connector) if route.connector is not None else None,
        "candidates": [
            {"connector": c.connector, "address_space": c.address_space, "verdict": c.verdict}
            for c in route.candidates
        ],
    }


def _mail_argument(path: str, smtputf8: bool) -> str:
    """`FROM:<path>`, with the SMTPUTF8 parameter when needed and not already given."""
    argument = f"FROM:{path}"
    if not smtputf8:
        return argument
    try:
        _path, params = split_args(argument, "FROM")
    except AddressError:
        return argument  # parse_mail_from refuses it with the reply the server gives
    return argument if "SMTPUTF8" in params else f"{argument} SMTPUTF8"


def _tls_requirement(connector: ReceiveConnector) -> dict[str, Any] | None:
    """On a require_tls connector whose listener speaks clear text first, MAIL before STARTTLS is
    refused (`Session.do_mail`): explain shows the replies after STARTTLS, and says so."""
    if not connector.require_tls or connector.tls_mode == "implicit":
        return None
    return {
        "required": True,
        "reply_before_starttls": replies.MUST_STARTTLS.line(),
        "reason": f"receive connector {connector.name} has require_tls: a session that has not "
        "sent STARTTLS gets this at MAIL (and AUTH); the replies shown are those after STARTTLS",
    }


def _auth_outcome(
    connector: ReceiveConnector, user: str, users_file: str | None
) -> tuple[dict[str, Any], str | None]:
    """What AUTH as `user` gets on `connector`, as `Session.do_auth` decides it before the password
    (explain assumes the right one), and the user the session then runs as: None when the connector
    offers no AUTH, where the server answers 504 and the session stays anonymous, or when `user` is
    not in the users file (`users_file`: its path, the user being absent; None: not checked),
    where AUTH fails whatever the password."""
    mechanisms = connector.auth_mechanism
    if "BasicAuth" not in mechanisms:
        return {
            "user": user,
            "reply": replies.AUTH_UNKNOWN_MECHANISM.line(),
            "reason": f"receive connector {connector.name} does not offer AUTH (its auth_mechanism "
            "has no BasicAuth): the session stays anonymous",
        }, None
    if users_file is not None:
        return {
            "user": user,
            "reply": replies.AUTH_FAILED.line(),
            "reason": f"user {user.lower()} is not in the users file {users_file}: AUTH fails "
            "whatever the password, and the session stays anonymous",
        }, None
    if "BasicAuthRequireTLS" in mechanisms:
        after_tls = " after STARTTLS (BasicAuthRequireTLS)"
    elif connector.require_tls:
        after_tls = " after STARTTLS (require_tls)"
    else:
        after_tls = ""
    return {
        "user": user,
        "reply": replies.AUTH_OK.line(),
        "reason": f"receive connector {connector.name} offers AUTH PLAIN LOGIN{after_tls}",
    }, user.lower()  # the canonical name the server's session runs as


def explain(
    config: Config,
    *,
    client_ip: str,
    local: tuple[str, int],
    sender: str | None,
    recipients: list[str],
    authenticated_user: str | None = None,
    header_from: str | None = None,
    send_as: SendAsList | None = None,
    unknown_in: str | None = None,
) -> Explanation:
    """`header_from`: the From header's value, for the end-of-DATA check of allowed_senders.
    `authenticated_user`: explain as a session that sent AUTH as this user with the right password
    (on a connector that offers no AUTH the server refuses it, and the session stays anonymous);
    `send_as`: that user's send-as list as the users file holds it (`UserStore.send_as`);
    `unknown_in`: the users file's path when it does not hold that user (AUTH then fails)."""
    local_ip, local_port = local
    selection = select_connector(
        config.receive_connectors, local_ip=local_ip, local_port=local_port, client_ip=client_ip
    )
    result = Explanation(
        local=str(Binding(local_ip, local_port)), client_ip=client_ip, selection=selection
    )
    connector = selection.connector
    if connector is None:
        result.recipients = [
            {
                "address": rcpt,
                "reply": None,
                "reason": "connection closed without a banner (no connector)",
            }
            for rcpt in recipients
        ]
        return result
    result.tls = _tls_requirement(connector)
    if authenticated_user is not None:
        result.auth, authenticated_user = _auth_outcome(connector, authenticated_user, unknown_in)
    rights = session_rights(connector, authenticated_user=authenticated_user, send_as=send_as)
    if rights.send_as is not None:
        result.send_as = rights.send_as.texts
    result.principals = list(rights.principals)
    granted_by = dict(rights.sources)
    result.rights = [
        {"right": right, "token": token, "granted_by": granted_by.get(right, "")}
        for right, token in EXTENDED_RIGHTS.items()
        if right in rights.rights
    ]
    authenticated = authenticated_user is not None
    address_rules = compile_connector_rules(connector)
    mail_ok = True
    # A client with a non-ASCII address declares SMTPUTF8 (RFC 6531), and then the policy decides:
    # that is the question asked, not the 553 5.6.7 of a client that forgot the parameter.
    smtputf8 = not all(a.isascii() for a in (sender or "", *recipients))
    if sender is not None:
        path = (
            "<>" if sender in ("", "<>") else (sender if sender.startswith("<") else f"<{sender}>")
        )
        try:
            address, params = parse_mail_from(_mail_argument(path, smtputf8))
            smtputf8 = "SMTPUTF8" in params
            if smtputf8 and not connector.eight_bit_mime_enabled:
                raise AddressError(
                    replies.UNRECOGNIZED_PARAMETER,
                    "SMTPUTF8 is not offered: the connector has eight_bit_mime_enabled = false "
                    "(RFC 6531: SMTPUTF8 only with 8BITMIME)",
                )
            verdict = check_mail(
                address,
                rights=rights,
                connector=connector,
                accepted_domains=config.accepted_domains,
                authenticated=authenticated,
                address_rules=address_rules,
            )
            result.mail = {
                "address": sender,
                "reply": verdict.reply.line(),
                "reason": verdict.reason,
                "allowed_by": verdict.matched or None,
            }
            mail_ok = verdict.accepted
        except AddressError as exc:
            result.mail = {"address": sender, "reply": exc.reply.line(), "reason": exc.reason}
            mail_ok = False
    elif not rights.may_submit:
        verdict = check_mail(
            None,
            rights=rights,
            connector=connector,
            accepted_domains=config.accepted_domains,
            authenticated=authenticated,
        )
        result.mail = {"address": None, "reply": verdict.reply.line(), "reason": verdict.reason}
        mail_ok = False
    accepted = 0
    own_ips = relay_local_ips(config, host_ips(), local_ip)
    for rcpt in recipients:
        entry: dict[str, Any] = {"address": rcpt}
        if not mail_ok:
            entry.update(
                reply=replies.NEED_MAIL.line(),
                reason="MAIL FROM was refused, so RCPT is out of sequence",
            )
            result.recipients.append(entry)
            continue
        path = rcpt if rcpt.startswith("<") else f"<{rcpt}>"
        try:
            address, _params = parse_rcpt_to(f"TO:{path}", smtputf8=smtputf8)
        except AddressError as exc:
            entry.update(reply=exc.reply.line(), reason=exc.reason)
            result.recipients.append(entry)
            continue
        verdict = check_rcpt(
            address,
            rights=rights,
            connector=connector,
            accepted_domains=config.accepted_domains,
            accepted_count=accepted,
            authenticated=authenticated,
            # the relay's own address literal ([RIP]) gets the same 550 5.1.1 the server gives
            local_ips=own_ips,
            address_rules=address_rules,
        )
        entry.update(reply=verdict.reply.line(), reason=verdict.reason)
        if verdict.matched:
            entry["allowed_by"] = verdict.matched
        if verdict.tarpit and connector.tarpit_interval.total_seconds() > 0:
            entry["tarpit"] = f"{connector.tarpit_interval.total_seconds():g}s"
        if verdict.accepted:
            accepted += 1
            entry["route"] = _route_for(config, str(address))
        result.recipients.append(entry)
    if header_from is not None:
        verdict = check_header_from(
            [header_from.encode("utf-8")],
            connector=connector,
            authenticated=authenticated,
            address_rules=address_rules,
            send_as=rights.send_as,
        )
        result.header_from = {
            "value": header_from,
            # the end-of-DATA reply: None when the header passes (the message is then queued)
            "reply": None if verdict.accepted else verdict.reply.line(),
            "reason": verdict.reason,
            "allowed_by": verdict.matched or None,
        }
    return result
