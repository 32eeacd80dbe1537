"""The findings about send connectors: Microsoft 365 endpoints, credentials sent in clear, Graph
without a fixed mailbox.

Apart from the receive connector rules: they read the outbound side of the configuration."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from relaygate.audit.findings import Finding
from relaygate.config.model import Config
from relaygate.config.values import parse_smart_host

# Microsoft 365's SMTP AUTH endpoints (client submission), where one mailbox signs in.
_M365_SUBMISSION = ("smtp.office365.com", "smtp-legacy.office365.com", "smtp.office365.us")


#: A tenant's MX endpoint (contoso-com.mail.protection.outlook.com; the newer *.mx.microsoft):
#: relaying there without AUTH is Microsoft 365's connector-based relay (exchange-semantics §9.3).
_M365_MX_SUFFIXES = (".mail.protection.outlook.com", ".mx.microsoft")


def _m365_connector_finding(s: Any, i: int) -> Finding:
    where = f'send connector "{s.name}"'
    if s.tls_certificate_file is not None:
        how = (
            f"by this connector's client certificate ({s.tls_certificate_file}): the tenant's "
            "inbound connector must name its subject (TlsSenderCertificateName)"
        )
        key, fix = (
            "tls_certificate_file",
            "keep the certificate's subject and the inbound connector's "
            "TlsSenderCertificateName the same; renew it before it expires, then reload",
        )
    else:
        how = (
            "by this relay's public IP address (SenderIPAddresses), since no client "
            "certificate is set (tls_certificate_file)"
        )
        key, fix = (
            "tls_certificate_file",
            "create a partner inbound connector in Exchange admin center for this relay's "
            "public IP address; or set tls_certificate_file and tls_key_file to a certificate "
            "whose subject the inbound connector names (TlsSenderCertificateName)",
        )
    return Finding(
        "info",
        "m365-connector-relay",
        where,
        f"send_connectors[{i}].{key}",
        "relays to Microsoft 365's MX without AUTH: mail to other organisations is only "
        f"accepted when the tenant's inbound connector recognises the relay, {how} "
        "(else 550 5.7.64 TenantAttribution; Relay Access Denied)",
        fix,
    )


def _smart_host_auth_cleartext(s: Any, i: int) -> Finding | None:
    """BasicAuth on a send connector that does not require TLS: delivery uses STARTTLS only when
    offered (and retries in clear after a failed handshake), so the password can cross in clear,
    to a smart host without STARTTLS or through anyone who strips it (delivery.client)."""
    if (
        not s.enabled
        or s.delivery_method != "SMTP"
        or s.smart_host_auth_mechanism != "BasicAuth"
        or s.require_tls
        or s.implicit_tls
        or s.tls_auth_level != "EncryptionOnly"
    ):
        return None
    when = (
        "always in clear: ignore_starttls is set"
        if s.ignore_starttls
        else "in clear when the smart host does not offer STARTTLS, or when anyone on the way "
        "strips it or breaks the handshake"
    )
    return Finding(
        "medium",
        "smart-host-auth-cleartext",
        f'send connector "{s.name}"',
        f"send_connectors[{i}].smart_host_auth_mechanism",
        f"BasicAuth without required TLS sends the smart host password ({s.auth_username or 'the account'}) "
        f"{when}",
        f'set smart_host_auth_mechanism = "BasicAuthRequireTLS" (`relaygate send-connector set '
        f'"{s.name}" --smart-host-auth-mechanism BasicAuthRequireTLS`), or require_tls = true',
    )


def _loopback_mx_finding(s: Any, i: int) -> Finding:
    """allow_loopback_mx is for a lab's own DNS; on a relay that sends to the Internet, any
    recipient domain's MX record can point it at what listens on this host's loopback only."""
    return Finding(
        "low",
        "loopback-mx-allowed",
        f'send connector "{s.name}"',
        f"send_connectors[{i}].allow_loopback_mx",
        "connects to MX hosts on loopback addresses: any recipient domain's DNS can point the "
        "relay at a server that listens on this host's loopback only (another MTA, a local "
        "service that trusts local connections)",
        "set allow_loopback_mx = false outside a lab; route mail for a server on this host "
        "through a smart host ([127.0.0.1]:port) instead",
    )


def _send_connector_findings(config: Config) -> Iterator[Finding]:
    """Microsoft 365 SMTP AUTH through one mailbox: what it refuses that a relay can avoid; a
    smart host password that may cross in clear."""
    by_name = {c.name.lower(): c for c in config.send_connectors}
    for i, s in enumerate(config.send_connectors):
        if (cleartext := _smart_host_auth_cleartext(s, i)) is not None:
            yield cleartext
        overflow = by_name.get(s.overflow_connector.lower()) if s.overflow_connector else None
        if s.enabled and overflow is not None and not overflow.enabled:
            # `check` accepts it (disabling a route must not break the file that names it)
            yield Finding(
                "low",
                "overflow-disabled",
                f'send connector "{s.name}"',
                f"send_connectors[{i}].overflow_connector",
                f'the overflow connector "{overflow.name}" is disabled: what this connector\'s '
                "pacing holds back waits in the queue instead of spilling over",
                f'enable send connector "{overflow.name}", or name another overflow_connector',
            )
        if s.enabled and s.dns_routing_enabled and s.allow_loopback_mx:
            yield _loopback_mx_finding(s, i)
        hosts = set()
        for entry in s.smart_hosts:
            try:  # as `check` and delivery read it: any case, a final dot, a port
                hosts.add(parse_smart_host(entry, s.port)[0])
            except ValueError:
                continue  # `check` names it
        if (
            s.enabled
            and s.delivery_method == "SMTP"
            and s.smart_host_auth_mechanism == "None"
            and any(h.endswith(_M365_MX_SUFFIXES) for h in hosts)
        ):
            yield _m365_connector_finding(s, i)
        if (
            not s.enabled
            or s.smart_host_auth_mechanism == "None"
            or not hosts & set(_M365_SUBMISSION)
        ):
            continue
        mailbox = s.auth_username or "the mailbox"
        where = f'send connector "{s.name}"'
        if not s.send_as:
            yield Finding(
                "info",
                "m365-send-as",
                where,
                f"send_connectors[{i}].send_as",
                f"Microsoft 365 accepts over SMTP AUTH only senders {mailbox} may send as "
                "(554 5.2.252 SendAsDenied): the devices' own From addresses are refused unless "
                "the mailbox has Send As rights for each of them",
                f'set send_as = "{s.auth_username or "relay@your.domain"}" to send every message '
                "as the mailbox (the writer is kept as display name and Reply-To)",
            )
        missing = [
            key
            for key in ("max_messages_per_minute", "max_recipients_per_day")
            if getattr(s, key) is None
        ]
        if missing:
            yield Finding(
                "info",
                "m365-quota",
                where,
                f"send_connectors[{i}].{missing[0]}",
                "Microsoft 365 takes 30 messages a minute and 10,000 recipients a day per "
                "mailbox over SMTP AUTH; past them it refuses mail, some of it permanently "
                "(554 5.2.0 ...SubmissionQuotaExceededException bounces it)",
                "set max_messages_per_minute = 30 and max_recipients_per_day = 10000: mail then "
                "waits in the queue instead",
            )


def _graph_findings(config: Config) -> Iterator[Finding]:
    """A Graph send connector without a fixed mailbox calls sendMail as each envelope sender."""
    for i, s in enumerate(config.send_connectors):
        if not s.enabled or s.delivery_method != "Graph" or s.graph_mailbox or s.send_as:
            continue
        yield Finding(
            "info",
            "graph-mailbox",
            f'send connector "{s.name}"',
            f"send_connectors[{i}].graph_mailbox",
            "Microsoft Graph sends from the message's envelope sender's mailbox: a device "
            "whose sender is not a mailbox of the tenant gets an NDR (404 or 403 from Graph), "
            "and reports with the null sender cannot be sent at all",
            'set graph_mailbox = "relay@your.domain" (and send_as to the same address to send '
            "every message as it)",
        )
