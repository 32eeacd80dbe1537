"""`deliver`: one message over one route, its next hops tried in order. The envelope is checked
and put in wire form, the content prepared once, then each hop is attempted (a pooled session
first, a fresh one when it went stale, a clear-text retry when opportunistic TLS failed) until
one takes the transaction; recipients a hop refused with 452 beside others it took go in another
transaction on the same session. `DeliveryOutcome` is what the queue records.

Kept apart from what happens on one hop (connection.py, transaction.py): failover, the rule that
a hop which answered the end of DATA is never followed by another, is here alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from aiosmtplib import SMTPException

from relaygate import replies
from relaygate.delivery.client.connection import _open_session
from relaygate.delivery.client.content import _Envelope
from relaygate.delivery.client.pool import ConnectionPool, _Session
from relaygate.delivery.client.remote_replies import _CONTROL, _HopFailed
from relaygate.delivery.client.transaction import _command, _transaction
from relaygate.delivery.credentials import Credentials
from relaygate.delivery.nexthop import NextHop
from relaygate.delivery.wire import dot_stuff, header_is_ascii, prepare_data
from relaygate.logs.privacy import AddressPrivacy
from relaygate.replies import CREDENTIALS_MISSING, Reply

log = logging.getLogger("relaygate.delivery")


@dataclass
class DeliveryOutcome:
    """The result of one delivery attempt over one route.

    per_recipient: the reply for every recipient (2xx delivered, 4xx retry, 5xx failed).
    hop_used: the hop that took the transaction (``host[ip]:port``), None if no hop did.
    transcript_errors: one line per failed hop (``hop: reply``), for the queue's LastError and logs.
    data_reply: the remote's answer to the end of DATA, when it got that far.
    """

    per_recipient: dict[str, Reply]
    hop_used: str | None = None
    transcript_errors: list[str] = field(default_factory=list)
    data_reply: Reply | None = None

    @property
    def delivered(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_positive]

    @property
    def deferred(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_transient]

    @property
    def failed(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_permanent]


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _wire_address(address: str) -> str | None:
    """The address as it goes between <>, or None if it cannot be put on a command line safely."""
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if _CONTROL.search(a) or "<" in a or ">" in a:
        return None
    # spaces only inside a quoted local part
    if " " in a:
        local, at, _dom = a.rpartition("@")
        if not (at and local.startswith('"') and local.endswith('"') and " " not in _dom):
            return None
    return a


async def deliver(
    hops: Sequence[NextHop],
    *,
    connector: Any,
    helo_name: str,
    sender: str,
    recipients: Iterable[str],
    data: bytes,
    credentials: Credentials | None = None,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
    crlf_only: bool = False,
    size: int | None = None,
    smtputf8: bool = False,
    log_privacy: AddressPrivacy | None = None,
) -> DeliveryOutcome:
    """Deliver one message to the first hop that takes it.

    sender: the envelope sender ("" or "<>" for the null sender). recipients: envelope recipients
    (their replies are keyed by these strings). timeout: seconds per connect and per command
    (default: the connector's connection_inactivity_timeout). pool: reuse sessions across calls.
    crlf_only: every line break in `data` is known to be CRLF (see `prepare_data`).
    size: the message's size for the connector's `max_message_size` (default: ``len(data)``); the
    queue passes the size as received, which routing checked, so that a DKIM signature this relay
    added cannot push a message over the limit that routing chose the connector by.
    smtputf8: the client declared SMTPUTF8; the message then needs a next hop that offers it if
    its header has UTF-8 in it (else it goes as usual, as Postfix does; RFC 6531 §3.2).
    log_privacy: ``server.log_address_privacy`` for the service log's line about a failed hop (a
    next hop's reply often quotes the address: "450 4.2.0 <bob@...>: ... Greylisted").
    """
    rcpt_list = list(dict.fromkeys(recipients))
    outcome = DeliveryOutcome(per_recipient={})
    t = _seconds(
        timeout
        if timeout is not None
        else getattr(connector, "connection_inactivity_timeout", None),
        600.0,
    )

    wire_sender = _wire_address(sender) if sender not in ("", "<>") else ""
    if wire_sender is None:
        outcome.per_recipient = {r: replies.INVALID_SENDER for r in rcpt_list}
        return outcome
    wire_rcpts: dict[str, str] = {}
    for r in rcpt_list:
        w = _wire_address(r)
        if w is None or not w:
            outcome.per_recipient[r] = replies.INVALID_RECIPIENT
        else:
            wire_rcpts[r] = w
    pending = list(wire_rcpts)
    if not pending:
        return outcome

    limit = getattr(connector, "max_message_size", None)
    if limit is not None and (len(data) if size is None else size) > limit:
        outcome.per_recipient.update({r: replies.ROUTE_SIZE_LIMIT for r in pending})
        return outcome
    if not hops:
        outcome.per_recipient.update({r: replies.NO_NEXT_HOP for r in pending})
        return outcome

    mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
    if mech in ("BasicAuth", "BasicAuthRequireTLS", "XOAUTH2") and credentials is None:
        outcome.transcript_errors.append(f"(no hop tried): {CREDENTIALS_MISSING.line()}")
        outcome.per_recipient.update({r: CREDENTIALS_MISSING for r in pending})
        return outcome

    prepared = prepare_data(data, crlf_only=crlf_only)
    # Stuffed once, before MAIL (SIZE= is the octets after the 354): `prepared` itself when no line
    # starts with "." (one C-level scan, no copy; counting the dots first was a second scan).
    env = _Envelope(
        sender=wire_sender,
        recipients=wire_rcpts,
        prepared=prepared,
        stuffed=dot_stuff(prepared),
        eight_bit=not prepared.isascii(),
        utf8_required=not wire_sender.isascii() or (smtputf8 and not header_is_ascii(prepared)),
    )

    primary: Reply | None = None
    for hop in hops:
        try:
            results, data_reply = await _attempt_hop(
                hop, connector, helo_name, credentials, t, env, pending, pool
            )
        except _HopFailed as failure:
            line = failure.reply.line()
            log.info(
                "delivery via %s failed: %s",
                hop.label,
                line if log_privacy is None else log_privacy.text(line),
            )
            outcome.transcript_errors.append(f"{hop.label}: {failure.reply.line()}")
            if failure.final:  # the next hops would fail the same way (and ask again)
                outcome.per_recipient.update({r: failure.reply for r in pending})
                return outcome
            if primary is None:
                primary = failure.reply
            continue
        outcome.hop_used = hop.label
        outcome.data_reply = data_reply
        outcome.per_recipient.update(results)
        return outcome

    assert primary is not None
    final = replies.failover_failed(primary.line())
    outcome.per_recipient.update({r: final for r in pending})
    return outcome


async def _attempt_hop(
    hop: NextHop,
    connector: Any,
    helo_name: str,
    credentials: Credentials | None,
    timeout: float,
    env: _Envelope,
    pending: list[str],
    pool: ConnectionPool | None,
) -> tuple[dict[str, Reply], Reply | None]:
    key = ConnectionPool.key_for(hop, connector, helo_name)
    session: _Session | None = None
    if pool is not None:
        session = pool.take(key)
        if session is not None and not session.clean:
            try:
                rset = await _command(session.smtp, b"RSET", timeout=timeout)
                if rset.code != 250:
                    raise _HopFailed(rset)
            except (SMTPException, OSError, _HopFailed):
                session.close()
                session = None

    fresh = session is None
    allow_starttls = True
    while True:
        if session is None:
            try:
                session = await _open_session(
                    hop,
                    connector,
                    helo_name,
                    credentials,
                    timeout,
                    key,
                    allow_starttls=allow_starttls,
                )
            except _HopFailed as failure:
                if failure.retry_plain and allow_starttls:
                    log.info(
                        "opportunistic TLS to %s failed (%s); retrying in clear",
                        hop.label,
                        failure.reply.line(),
                    )
                    allow_starttls = False
                    continue
                raise
        try:
            results, data_reply = await _transaction(
                session, env, pending, timeout, reused=not fresh
            )
        except _HopFailed as failure:
            if failure.connection_lost and not fresh:
                # a pooled session that went stale: one fresh connection to the same hop
                session.close()
                session = None
                fresh = True
                continue
            await session.quit(timeout=min(timeout, 2.0))
            raise
        data_reply = await _more_transactions(session, env, pending, results, data_reply, timeout)
        if pool is not None and session.alive:
            pool.put(session)
        else:
            await session.quit(timeout=min(timeout, 2.0))
        return results, data_reply


async def _more_transactions(
    session: _Session,
    env: _Envelope,
    sent: list[str],
    results: dict[str, Reply],
    data_reply: Reply | None,
    timeout: float,
) -> Reply | None:
    """Recipients refused with 452 while others of the same transaction were taken (a server's
    limit of recipients per message, RFC 5321 §4.5.3.1.10) go in another transaction on the same
    session, as long as each takes some. A failure there leaves them deferred: what was delivered
    stays delivered (the next hop is never tried with it again)."""
    while session.alive and session.clean:
        codes = {r: reply.code for r in sent if (reply := results.get(r)) is not None}
        again = [r for r, code in codes.items() if code == 452]
        if not again or not any(code < 300 for code in codes.values()):
            return data_reply
        try:
            more, more_reply = await _transaction(session, env, again, timeout, reused=True)
        except _HopFailed:
            session.close()
            return data_reply
        results.update(more)
        data_reply = more_reply or data_reply
        sent = again
    return data_reply
