"""A session's MAIL and RCPT, and the transaction checked again after a reload.

Separate from DATA (session_data.py) because this is where the policy decides (check_mail,
check_rcpt with the session's rights and address rules) and where a transaction opened before a
reload is judged again under the new configuration before its message is accepted.
"""

from __future__ import annotations

from relaygate import replies
from relaygate.addresses import Address, AddressError, parse_mail_from, parse_rcpt_to
from relaygate.policy.verdicts import Verdict, check_mail, check_rcpt, relay_local_ips
from relaygate.queue.bounce import dsn_parameter_error, notify_union, parse_notify
from relaygate.replies import Reply
from relaygate.smtp.session_reload import _ReloadFollowing
from relaygate.smtp.session_state import _Close, _Transaction

#: No NOTIFY: the relay's default, a report of either kind (see bounce.notify_allows)
_DEFAULT_NOTIFY = "DELAY,FAILURE"


def _keep_dsn_params(txn: _Transaction, address: str, params: dict[str, str | None]) -> None:
    """A recipient's NOTIFY and ORCPT (checked at RCPT), honoured in the relay's own reports;
    called before ``address`` joins ``txn.recipients``.

    A recipient given again is the same one (queued and delivered once): it gets every report
    either RCPT asked for (no NOTIFY asking for both kinds), as from Postfix, which keeps the
    two as recipients of their own; the last NOTIFY alone dropped the NDR a first
    ``NOTIFY=FAILURE`` asked for. The first ORCPT is kept: the report has one line for it."""
    notify = parse_notify(params.get("NOTIFY"))
    if address in txn.notify:  # given before, with a NOTIFY
        txn.notify[address] = notify_union(txn.notify[address], notify or _DEFAULT_NOTIFY)
    elif notify is not None and address not in txn.recipients:  # (given before: the default)
        txn.notify[address] = notify
    orcpt = params.get("ORCPT")
    if orcpt:
        txn.orcpt.setdefault(address, orcpt)


class _MailAndRcpt(_ReloadFollowing):
    """MAIL, RCPT and their decisions (see the module docstring)."""

    async def do_mail(self, arg: str) -> None:
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.connector.require_tls and not self.tls_active:
            await self.protocol_error(replies.MUST_STARTTLS)
            return
        if self.txn is not None:
            await self.protocol_error(replies.SENDER_ALREADY_SPECIFIED)
            return
        try:
            sender, params = parse_mail_from(arg)
        except AddressError as exc:
            await self.protocol_error(exc.reply)
            return
        declared: int | None = None
        txn = _Transaction(
            sender=sender, sender_text=str(sender) if sender else "", checked_under=self.ctx.config
        )
        for key, value in params.items():
            if key == "SIZE" and self.connector.size_enabled != "Disabled":
                if value is None or not value.isdigit():
                    await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                    return
                declared = int(value)
            elif key == "BODY" and value is not None and self._body_offered(value.upper()):
                txn.body = value.upper()
            elif key == "SMTPUTF8" and value is None and self.connector.eight_bit_mime_enabled:
                txn.smtputf8 = True
            elif key in ("RET", "ENVID") and self.connector.delivery_status_notification_enabled:
                if why := dsn_parameter_error(key, value):
                    self.log.info(f"MAIL refused: {why}")
                    await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                    return
                if key == "ENVID" and value:
                    txn.envid = value
            elif key == "AUTH":
                pass  # RFC 4954 §5: informational; never trusted
            else:
                await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                return
        await self._follow_users_file()
        if not self.ctx.rates.allowed(self.connector, self.client_ip, user=self.auth_user):
            self.reply(replies.RATE_LIMITED)
            raise _Close()
        verdict = check_mail(
            sender,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            authenticated=self.authenticated,
            declared_size=declared,
            address_rules=self.address_rules,
        )
        if not verdict.accepted:
            self.log.info(f"MAIL refused: {verdict.reason}")
            await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
            return
        pressure = self.ctx.pressure
        if pressure is not None and pressure.refuses(declared):
            # Back pressure: the queue's disk is (or with this SIZE= would be) below its minimum
            # free space. Not a protocol error: the client is right to try again later.
            self.log.info("MAIL refused: back pressure, too little free space on the queue's disk")
            self.reply(replies.INSUFFICIENT_RESOURCES)
            return
        self.txn = txn
        self.reply(verdict.reply)

    def _body_offered(self, body: str) -> bool:
        """Whether MAIL may declare BODY=`body` (upper case) here: 7BIT always (it declares what
        any SMTP server takes), 8BITMIME only where 8BITMIME is offered (RFC 6152), as SIZE= only
        where SIZE is. BINARYMIME needs CHUNKING (RFC 3030), which is never offered."""
        return body == "7BIT" or (body == "8BITMIME" and self.connector.eight_bit_mime_enabled)

    async def do_rcpt(self, arg: str) -> None:
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.txn is None:
            await self.protocol_error(replies.NEED_MAIL)
            return
        try:
            rcpt, params = parse_rcpt_to(arg, smtputf8=self.txn.smtputf8)
        except AddressError as exc:
            await self.protocol_error(exc.reply)
            return
        for key, value in params.items():
            if (
                key not in ("NOTIFY", "ORCPT")
                or not self.connector.delivery_status_notification_enabled
            ):
                await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                return
            if why := dsn_parameter_error(key, value):
                self.log.info(f"RCPT {rcpt} refused: {why}")
                await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                return
        verdict = self._rcpt_verdict(rcpt, len(self.txn.recipients))
        if not verdict.accepted:
            self.log.info(f"RCPT {rcpt} refused: {verdict.reason}")
            if verdict.reply.code == 452:  # too many recipients: not a protocol error
                self.reply(verdict.reply)
                return
            await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
            return
        address = str(rcpt) if rcpt.domain else self.ctx.postmaster_address()
        _keep_dsn_params(self.txn, address, params)
        self.txn.recipients.append(address)
        self.txn.rcpt_addresses.append(rcpt)
        self.reply(verdict.reply)

    def _rcpt_verdict(self, rcpt: Address, accepted_count: int) -> Verdict:
        """RCPT's decision for `rcpt` with the session's connector and rights as they are now."""
        return check_rcpt(
            rcpt,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            accepted_count=accepted_count,
            authenticated=self.authenticated,
            local_ips=(
                relay_local_ips(self.ctx.config, self.ctx.host_ips, self.local[0])
                if rcpt.is_literal
                else ()
            ),
            address_rules=self.address_rules,
        )

    def _transaction_stands(self, txn: _Transaction) -> bool:
        """False (the refusal replied, the transaction over) when a reload since MAIL took away
        what the transaction needs: its sender or any of its recipients would be refused now.
        Checked at DATA before the 354 and at the end of DATA before the message is stored, after
        `_follow_reload` (which ends the session when the connector no longer takes the client):
        a recipient the new configuration refuses is never queued."""
        config = self.ctx.config
        if txn.checked_under is config:
            return True
        refusal = self._refusal_after_reload(txn)
        if refusal is None:
            txn.checked_under = config
            return True
        self.txn = None
        self.reply(refusal)
        return False

    def _refusal_after_reload(self, txn: _Transaction) -> Reply | None:
        """The reply to give the transaction under the configuration reloaded since MAIL, or
        None: MAIL's refusal when its sender is refused now; else, RCPT's when all of its
        recipients are (the client bounces the message as it would have at RCPT);
        RECIPIENTS_CHANGED (4xx) when only some are, so the client sends it again and RCPT tells
        it which: with a 250 it would take the others as accepted, and no one would learn they
        were dropped."""
        mail = check_mail(
            txn.sender,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            authenticated=self.authenticated,
            address_rules=self.address_rules,
        )
        if not mail.accepted:
            self.log.info(f"after a reload MAIL refused: {mail.reason}")
            return mail.reply
        refused: list[Reply] = []
        kept = 0
        for rcpt in txn.rcpt_addresses:
            verdict = self._rcpt_verdict(rcpt, kept)
            if verdict.accepted:
                kept += 1
                continue
            self.log.info(f"after a reload RCPT {rcpt} refused: {verdict.reason}")
            refused.append(verdict.reply)
        if not refused:
            return None
        return refused[0] if kept == 0 else replies.RECIPIENTS_CHANGED
