"""MAIL and RCPT verdicts: rights × accepted domains × connector rules → the exact Exchange reply.

Pure functions. A `Verdict` carries the reply the client sees and a `reason` for the protocol log and
`relaygate explain`. `tarpit` marks errors that Exchange delays for unauthenticated sessions (§5.5).
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from relaygate import replies
from relaygate.addresses import Address, is_special_destination
from relaygate.config.model import AcceptedDomain, Config, ReceiveConnector
from relaygate.policy import rights as r
from relaygate.policy.address_rules import (
    AddressRules,
    ConnectorAddressRules,
    SendAsList,
    compile_connector_rules,
    from_header_addresses,
)
from relaygate.replies import Reply

__all__ = [
    "Verdict",
    "check_header_from",
    "check_mail",
    "check_rcpt",
    "host_ips",
    "match_accepted_domain",
    "relay_local_ips",
]

_RESERVED_TLDS = frozenset({"test", "example", "invalid", "localhost"})
_RESERVED_SLDS = frozenset({"example.com", "example.net", "example.org"})


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision: `reply` to send, `reason` to log, `tarpit` if the error is delayed; `matched`:
    the allowed_senders / allowed_recipients entry that let the address through ("" when the
    connector has no such list, or the address was refused)."""

    reply: Reply
    reason: str
    tarpit: bool = False
    matched: str = ""

    @property
    def accepted(self) -> bool:
        return self.reply.is_positive


def match_accepted_domain(domain: str, accepted: Sequence[AcceptedDomain]) -> AcceptedDomain | None:
    """The accepted domain that covers `domain`: an exact entry beats a `*.` wildcard, a longer wildcard
    beats a shorter one."""
    best: AcceptedDomain | None = None
    for entry in accepted:
        if not entry.matches(domain):
            continue
        if best is None or (
            best.is_wildcard and (not entry.is_wildcard or len(entry.domain) > len(best.domain))
        ):
            best = entry
    return best


def host_ips() -> list[str]:
    """The addresses this host's name resolves to (the one lookup behind `relay_local_ips`)."""
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)]
    except OSError:
        return []


def relay_local_ips(
    config: Config, host_addresses: Iterable[str] = (), local_ip: str | None = None
) -> frozenset[str]:
    """The relay's own addresses, whose literal (`x@[ip]`) check_rcpt answers 550 5.1.1: every
    specific binding address, the host's addresses (`host_ips()`), the loopbacks, and the local
    address the connection arrived on (`local_ip`; a wildcard stands for none). The server and
    `relaygate explain` both call this with the same inputs, so they give the same reply."""
    ips = {b.address for c in config.receive_connectors for b in c.bindings if not b.is_wildcard}
    ips.update(host_addresses)
    ips.update(("127.0.0.1", "::1"))
    if local_ip is not None and local_ip not in ("0.0.0.0", "::"):
        ips.add(local_ip)
    return frozenset(ips)


def check_mail(
    sender: Address | None,
    *,
    rights: r.SessionRights,
    connector: ReceiveConnector,
    accepted_domains: Sequence[AcceptedDomain],
    authenticated: bool,
    declared_size: int | None = None,
    address_rules: ConnectorAddressRules | None = None,
) -> Verdict:
    """MAIL FROM: Submit right, declared SIZE, the connector's allowed_senders (when set: the null
    sender too must be listed), the authenticated user's send-as list (`rights.send_as`, likewise),
    then the sender rules (null sender otherwise always allowed).
    `address_rules`: the connector's compiled lists (compiled here when not given)."""
    if not rights.may_submit:
        if authenticated:
            return Verdict(replies.SUBMIT_DENIED, "the session lacks ms-Exch-SMTP-Submit")
        return Verdict(
            replies.NOT_AUTHENTICATED,
            "anonymous sessions on this connector lack ms-Exch-SMTP-Submit (no AnonymousUsers group)",
        )
    if (
        declared_size is not None
        and declared_size > connector.max_message_size
        and not rights.bypasses_size_limit
    ):
        return Verdict(
            replies.MESSAGE_TOO_BIG,
            f"SIZE={declared_size} exceeds max_message_size {connector.max_message_size}",
        )
    denied = replies.SEND_AS_DENIED if authenticated else replies.ANONYMOUS_SEND_AS_DENIED
    matched = ""
    if connector.allowed_senders:
        senders = (address_rules or compile_connector_rules(connector)).senders
        hit = senders.match(sender)
        if hit is None:
            return Verdict(
                denied,
                f"sender refused: {_text(sender)} is not in allowed_senders of connector "
                f"{connector.name}",
                tarpit=not authenticated,
            )
        matched = hit
    send_as = rights.send_as  # an authenticated user's own list: narrows the connector's
    own = send_as.match(sender) if send_as is not None else None
    if send_as is not None and own is None:
        return Verdict(
            replies.SEND_AS_DENIED,
            f"sender refused: {_text(sender)} is not in the send-as list of user {send_as.user}",
        )
    verdict = _check_sender_rights(
        sender,
        rights=rights,
        accepted_domains=accepted_domains,
        authenticated=authenticated,
        denied=denied,
    )
    if not verdict.accepted:
        return verdict
    reason = verdict.reason
    if matched:
        reason += f"; matches {matched} in allowed_senders of connector {connector.name}"
    if send_as is not None:
        reason += f"; matches {own} in the send-as list of user {send_as.user}"
        matched = ", ".join(dict.fromkeys(m for m in (matched, own) if m))
    return Verdict(verdict.reply, reason, verdict.tarpit, matched)


def _text(address: Address | None) -> str:
    return "<>" if address is None else f"<{address}>"


def _check_sender_rights(
    sender: Address | None,
    *,
    rights: r.SessionRights,
    accepted_domains: Sequence[AcceptedDomain],
    authenticated: bool,
    denied: Reply,
) -> Verdict:
    if sender is None:  # <> — RFC 2505 §2.6.1: must not be refused
        return Verdict(replies.SENDER_OK, "null reverse-path")
    domain_entry = match_accepted_domain(sender.domain, accepted_domains) if sender.domain else None
    if domain_entry is not None and domain_entry.domain_type == "Authoritative":
        # Accept-Any-Sender does not cover authoritative domains: removing Accept-Authoritative-Domain-
        # Sender from ANONYMOUS LOGON (which keeps Any-Sender) is Exchange's classic anti-spoofing setting
        # (§3.1). Authenticated sessions send as an organisation address: ExchangeUsers grants neither
        # sender right, and Exchange checks Send-As on the mailbox instead, which RelayGate does not model.
        if not authenticated and not rights.has(r.ACCEPT_AUTHORITATIVE_DOMAIN_SENDER):
            return Verdict(
                denied,
                f"sender domain {sender.domain} is authoritative and the session lacks "
                "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
                tarpit=not authenticated,
            )
    elif not rights.has(r.ACCEPT_ANY_SENDER) and domain_entry is None:
        return Verdict(
            denied,
            f"sender domain {sender.domain or '(none)'} is not an accepted domain and the session lacks "
            "ms-Exch-SMTP-Accept-Any-Sender",
            tarpit=not authenticated,
        )
    return Verdict(replies.SENDER_OK, "sender allowed")


def check_rcpt(
    recipient: Address,
    *,
    rights: r.SessionRights,
    connector: ReceiveConnector,
    accepted_domains: Sequence[AcceptedDomain],
    accepted_count: int,
    authenticated: bool,
    local_ips: Collection[str] = (),
    address_rules: ConnectorAddressRules | None = None,
) -> Verdict:
    """RCPT TO: recipient limit, then reserved/literal rules, then accepted domains or the relay
    right; a recipient these accept must then match the connector's allowed_recipients when it
    has some (it narrows, never widens). The domain-less <postmaster> is exempt (RFC 5321 §4.5.1).
    `address_rules`: the connector's compiled lists (compiled here when not given)."""
    verdict = _check_rcpt_rights(
        recipient,
        rights=rights,
        connector=connector,
        accepted_domains=accepted_domains,
        accepted_count=accepted_count,
        authenticated=authenticated,
        local_ips=local_ips,
    )
    if not verdict.accepted or not connector.allowed_recipients or not recipient.domain:
        return verdict
    allowed = (address_rules or compile_connector_rules(connector)).recipients
    hit = allowed.match(recipient)
    if hit is None:
        return Verdict(
            replies.RECIPIENT_NOT_ALLOWED,
            f"recipient refused: <{recipient}> is not in allowed_recipients of connector "
            f"{connector.name} (the relay rules alone would accept it: {verdict.reason})",
            not authenticated and not rights.externally_secured,
        )
    return Verdict(
        verdict.reply,
        f"{verdict.reason}; matches {hit} in allowed_recipients of connector {connector.name}",
        verdict.tarpit,
        hit,
    )


def check_header_from(
    from_fields: Sequence[bytes],
    *,
    connector: ReceiveConnector,
    authenticated: bool,
    address_rules: ConnectorAddressRules | None = None,
    send_as: SendAsList | None = None,
) -> Verdict:
    """End of DATA (the P2 check): on a connector with allowed_senders, every address of the From
    header (`from_fields`: the raw value of each From field) must match it, as MAIL FROM did; and
    the authenticated user's send-as list `send_as` (the session's `rights.send_as`) when there is
    one. A message without a From header passes (the relay adds none; MAIL FROM was checked). A
    From header that cannot be read strictly is refused with 554 5.6.0."""
    lists: list[tuple[AddressRules, str]] = []
    if connector.allowed_senders:
        senders = (address_rules or compile_connector_rules(connector)).senders
        lists.append((senders, f"allowed_senders of connector {connector.name}"))
    if send_as is not None:
        lists.append((send_as.rules, f"the send-as list of user {send_as.user}"))
    if not lists:
        return Verdict(replies.OK, "no allowed_senders on this connector")
    if not from_fields:
        return Verdict(replies.OK, "no From header (only MAIL FROM is checked)")
    tarpit = not authenticated
    try:
        addresses = from_header_addresses(from_fields)
    except ValueError as exc:
        return Verdict(replies.INVALID_FROM_HEADER, f"From header refused: {exc}", tarpit)
    matched: list[str] = []
    reasons: list[str] = []
    for rules, named in lists:
        hits: list[str] = []
        for address in addresses:
            hit = rules.match(address)
            if hit is None:
                return Verdict(
                    replies.SEND_AS_DENIED if authenticated else replies.ANONYMOUS_SEND_AS_DENIED,
                    f"From header refused: <{address}> is not in {named}",
                    tarpit,
                )
            hits.append(hit)
        hits = list(dict.fromkeys(hits))
        reasons.append(f"{', '.join(hits)} in {named}")
        matched.extend(hits)
    return Verdict(
        replies.OK,
        f"From header {', '.join(f'<{a}>' for a in addresses)} matches {'; '.join(reasons)}",
        matched=", ".join(dict.fromkeys(matched)),
    )


def _check_rcpt_rights(
    recipient: Address,
    *,
    rights: r.SessionRights,
    connector: ReceiveConnector,
    accepted_domains: Sequence[AcceptedDomain],
    accepted_count: int,
    authenticated: bool,
    local_ips: Collection[str],
) -> Verdict:
    tarpit = not authenticated and not rights.externally_secured
    if accepted_count >= connector.max_recipients_per_message:
        return Verdict(
            replies.TOO_MANY_RECIPIENTS,
            f"max_recipients_per_message {connector.max_recipients_per_message} reached",
        )
    if recipient.domain == "":  # <postmaster>, RFC 5321 §4.5.1
        return Verdict(replies.RECIPIENT_OK, "postmaster is always accepted")
    if recipient.is_literal:
        ip = recipient.literal_ip
        if ip is not None and str(ip) in local_ips:
            return Verdict(
                replies.LOCAL_LITERAL_UNKNOWN,
                "address literal of this relay: RelayGate does no local delivery",
                tarpit,
            )
        if ip is None or is_special_destination(ip):
            return Verdict(
                replies.LITERAL_REFUSED,
                f"address literal {recipient.domain} is loopback/link-local/reserved (never relayed)",
                tarpit,
            )
        if not rights.may_relay:
            return Verdict(
                replies.RELAY_DENIED,
                "address literal and the session lacks ms-Exch-SMTP-Accept-Any-Recipient",
                tarpit,
            )
        return Verdict(replies.RECIPIENT_OK, "address literal; session may relay")
    labels = recipient.domain.split(".")
    if connector.reject_single_label_recipient_domains and len(labels) == 1:
        return Verdict(replies.SINGLE_LABEL_DOMAIN, "single-label recipient domain", tarpit)
    if connector.reject_reserved_top_level_recipient_domains and labels[-1] in _RESERVED_TLDS:
        return Verdict(replies.RESERVED_TLD, f"reserved top-level domain .{labels[-1]}", tarpit)
    if (
        connector.reject_reserved_second_level_recipient_domains
        and ".".join(labels[-2:]) in _RESERVED_SLDS
    ):
        return Verdict(
            replies.RESERVED_SLD, f"reserved second-level domain {'.'.join(labels[-2:])}", tarpit
        )
    if rights.may_relay:
        return Verdict(replies.RECIPIENT_OK, "session has ms-Exch-SMTP-Accept-Any-Recipient")
    entry = match_accepted_domain(recipient.domain, accepted_domains)
    if entry is None:
        return Verdict(
            replies.RELAY_DENIED,
            f"{recipient.domain} is not an accepted domain and the session lacks "
            "ms-Exch-SMTP-Accept-Any-Recipient",
            tarpit,
        )
    if recipient.has_routing_chars:
        # Sender-specified routing (user%other@LOCAL, "x@y"@LOCAL) from a client that may not relay:
        # refused rather than handed to a next hop that might interpret it (Postfix allow_untrusted_routing=no).
        return Verdict(
            replies.RELAY_DENIED,
            "sender-specified routing (%, ! or @ in the local part) from a session that may not relay",
            tarpit,
        )
    return Verdict(replies.RECIPIENT_OK, f"accepted domain {entry.domain} ({entry.domain_type})")
