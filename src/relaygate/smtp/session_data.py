"""A session's DATA: the message read through CRLF.CRLF, checked, and committed to the queue.

Separate because it is the path every message takes and the one a stop or a reload must never cut:
the content is scanned over whole chunks (no per-line Python work), held against the process's
budget for messages in transit, dropped past max_message_size while the scan goes on, then checked
(size, bare CR/LF, header size, hop count, the From header) and stored before the 250, with the
reply each store failure calls for.
"""

from __future__ import annotations

import json
import time

from relaygate import replies
from relaygate.addresses import Address
from relaygate.logs.protocol import receiving_message_info
from relaygate.policy.rights import (
    ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    HEADERS_FOREST,
    HEADERS_ORGANIZATION,
    HEADERS_ROUTING,
)
from relaygate.policy.verdicts import check_header_from
from relaygate.queue.model import (
    DSN_ENVID,
    DSN_NOTIFY,
    DSN_ORCPT,
    LINE_BREAKS,
    LINE_BREAKS_CRLF,
    NO_REPORTS_TO_SENDER,
    NOT_SIGNED,
    SMTPUTF8,
    Envelope,
    StoredMessage,
)
from relaygate.queue.store import StoreError, StoreFullError, StoreOutcomeUnknownError
from relaygate.smtp.message import (
    DataReader,
    firewalled_fields,
    from_fields,
    has_bare_cr_or_lf,
    local_hops,
    received_header,
    remove_header_fields,
    scan_headers,
)
from relaygate.smtp.session_state import _Close, _Transaction
from relaygate.smtp.session_transaction import _MailAndRcpt


class _DataReception(_MailAndRcpt):
    """DATA and the message's way to the queue (see the module docstring)."""

    def _size_limit(self) -> int:
        """The largest message the session may send: its connector's max_message_size, or 2 GiB
        for a session whose rights bypass it."""
        limit = self.connector.max_message_size
        if self.rights.bypasses_size_limit:
            limit = max(limit, 2 * 1024**3)
        return limit

    def _delivery_metadata(self, txn: _Transaction) -> dict[str, str]:
        """What delivery must know of this session: the RFC 3461 parameters for the reports,
        whether the sender may get them, and why the message must not be DKIM-signed."""
        metadata: dict[str, str] = {}
        if txn.notify:
            metadata[DSN_NOTIFY] = json.dumps(txn.notify)
        if txn.orcpt:
            metadata[DSN_ORCPT] = json.dumps(txn.orcpt)
        if txn.envid:
            metadata[DSN_ENVID] = txn.envid
        if not self._may_report_to_sender(txn.sender):
            metadata[NO_REPORTS_TO_SENDER] = "1"
        if not self.authenticated and not self.rights.has(ACCEPT_AUTHORITATIVE_DOMAIN_SENDER):
            # The admin said these clients may not send as the organisation (Exchange's
            # anti-spoofing setting): its key must not vouch for the From they wrote either.
            metadata[NOT_SIGNED] = (
                f"the session on receive connector {self.connector.name} may not send as the "
                f"organisation ({ACCEPT_AUTHORITATIVE_DOMAIN_SENDER} not granted)"
            )
        return metadata

    def _may_report_to_sender(self, sender: Address | None) -> bool:
        """False when the connector has allowed_recipients, no allowed_senders, and the sender
        matches none of them: a report to it would reach, with what the client wrote, an
        address the client could not send to (a sender chosen at will, then a recipient that
        bounces)."""
        c = self.connector
        if not c.allowed_recipients or c.allowed_senders or sender is None or not sender.domain:
            return True
        return self.address_rules.recipients.match(sender) is not None

    async def do_data(self, arg: str) -> None:
        if arg.strip():
            await self.protocol_error(replies.DATA_SYNTAX)
            return
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.txn is None:
            await self.protocol_error(replies.NEED_MAIL)
            return
        if not self.txn.recipients:
            await self.protocol_error(replies.NEED_RCPT)
            return
        if not self._transaction_stands(self.txn):
            return
        self.reply(replies.START_MAIL_INPUT)
        started = time.monotonic()
        self._in_data = True
        self._held = 0
        try:
            self.conn.reading_message(True)  # it streams while read: may run ahead (connection.py)
            try:
                content, too_big = await self.read_data()
            finally:
                self.conn.reading_message(False)
            txn, self.txn = self.txn, None
            if content is None:
                raise _Close("Remote")
            if self._held < 0:
                self.log.info("message refused: the memory for messages in transit is spent")
                self.reply(replies.INSUFFICIENT_RESOURCES)
                return
            self._follow_reload()  # a reload while the message came: checked as at DATA
            if not self._transaction_stands(txn):
                return
            await self.accept_message(txn, content, too_big, started)
        finally:
            self._in_data = False
            if self._held > 0:
                self.ctx.data_memory.give_back(self._held)
            self._held = 0

    async def read_data(self) -> tuple[bytes | None, bool]:
        """Read through CRLF.CRLF. Returns (unstuffed content or None at EOF, exceeded-size flag)."""
        reader = DataReader(self._size_limit())
        memory = self.ctx.data_memory
        more = bytes(self.buf)
        self.buf.clear()
        while True:
            done = reader.feed(more)
            # What the reader keeps is taken from the process's budget (self._held, given back by
            # do_data); once it is spent the rest is read and dropped (self._held = -1).
            if reader.dropping:  # over max_message_size (or the budget): nothing is kept
                if self._held > 0:
                    memory.give_back(self._held)
                    self._held = 0
            else:
                grow = reader.kept + (len(more) if done else 0) - self._held
                if grow > 0:
                    if memory.take(grow):
                        self._held += grow
                    else:
                        memory.give_back(self._held)
                        self._held = -1
                        reader.stop_keeping()
            if done:
                break
            await self.flush()
            self.conn.ack_now()  # a client's last short segment must not wait 40 ms (see there)
            more = await self._read_more()
            if not more:
                return None, False
        content, too_big, rest = reader.result()
        self.buf += rest
        return content, too_big

    def _local_hops_exceeded(self, content: bytes, hops: int, header_size: int) -> bool:
        """Exchange's MaxLocalHopCount: the message came through this relay (a Received field by one
        of its names) max_local_hop_count times, counting the field it is about to get, as
        max_hop_count does; 0: never. A loop through another server (a smart host, a forward back
        to an accepted domain) is stopped here after a few rounds, not after max_hop_count's 30.
        Searched only when the message has Received fields at all (most have none)."""
        limit = self.connector.max_local_hop_count
        own = self.ctx.own_received
        if not hops or not limit or own is None:
            return False
        local = local_hops(content, header_size, own)
        if local < limit:
            return False
        self.log.info(
            f"message refused: {local} Received headers by this relay, max_local_hop_count {limit}"
        )
        return True

    def _header_firewall(self, content: bytes, header_size: int) -> bytes:
        """Exchange's header firewall (exchange-semantics.md §3.1): the Received/Resent-*,
        X-MS-Exchange-Organization-* and X-MS-Exchange-Forest-* fields of a session without
        the right to send them are removed, so that a client in a relay range cannot hand the
        next hop (Exchange Online) an "AuthAs: Internal" or an "SCL: -1". After the hop counts
        (they count what the client sent)."""
        rights = self.rights.rights
        fields = firewalled_fields(
            routing=HEADERS_ROUTING not in rights,
            organization=HEADERS_ORGANIZATION not in rights,
            forest=HEADERS_FOREST not in rights,
        )
        return content if fields is None else remove_header_fields(content, header_size, fields)

    def _received_protocol(self, txn: _Transaction) -> str:
        """The Received field's WITH protocol type (IANA registry): ESMTP or SMTP (HELO), UTF8SMTP
        for a transaction that declared SMTPUTF8 (RFC 6531 §3.7.3), then S after STARTTLS or on
        an implicit-TLS listener and A once authenticated (RFC 3848)."""
        protocol = "UTF8SMTP" if txn.smtputf8 else "ESMTP" if self.esmtp else "SMTP"
        if self.tls_active:
            protocol += "S"
        if self.authenticated:
            protocol += "A"
        return protocol

    async def accept_message(
        self, txn: _Transaction, content: bytes, too_big: bool, started: float
    ) -> None:
        c = self.connector
        if too_big or len(content) > self._size_limit():  # the limit may be a reload's, lower
            self.log.info(f"message refused: larger than max_message_size {c.max_message_size}")
            self.reply(replies.MESSAGE_TOO_BIG)
            return
        if self.bare_lf_rejection and has_bare_cr_or_lf(content):
            self.log.info("message refused: bare CR or LF in content")
            await self.protocol_error(replies.BARE_LINEFEED)
            return
        if content[:1] in (b" ", b"\t"):
            # A first line that starts with a blank continues the field before it, and that field
            # is the Received the relay prepends: the client would write into the relay's own trace
            # field (a forged "by" or "for" after its date). Only whole trace fields may be added
            # (RFC 5321 §4.4), so the message is refused rather than changed.
            self.log.info("message refused: the header starts with a folded line")
            self.reply(replies.FOLDED_FIRST_LINE)
            return
        scan = scan_headers(content)
        if scan.header_size > c.max_header_size:
            self.log.info(
                f"message refused: header of {scan.header_size} octets, "
                f"max_header_size {c.max_header_size}"
            )
            self.reply(replies.HEADER_TOO_BIG)
            raise _Close()
        if scan.hops >= c.max_hop_count:
            self.log.info(
                f"message refused: {scan.hops} Received headers, max_hop_count {c.max_hop_count}"
            )
            self.reply(replies.HOP_COUNT_EXCEEDED)
            return
        if self._local_hops_exceeded(content, scan.hops, scan.header_size):
            self.reply(replies.HOP_COUNT_EXCEEDED)
            return
        send_as = self.rights.send_as  # the user's list as MAIL (or a reload since) found it
        if c.allowed_senders or send_as is not None:  # P2: the From header, as MAIL FROM
            verdict = check_header_from(
                from_fields(content),
                connector=c,
                authenticated=self.authenticated,
                address_rules=self.address_rules,
                send_as=send_as,
            )
            if not verdict.accepted:
                self.log.info(f"message refused: {verdict.reason}")
                await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
                return
        content = self._header_firewall(content, scan.header_size)
        self.messages += 1
        local_id = f"{self.log.session_id};{self.messages}"
        protocol = self._received_protocol(txn)
        # A recipient given twice is one recipient (the store keeps it once): one "for" clause.
        recipients = list(dict.fromkeys(txn.recipients))
        header = received_header(
            helo=self.helo or "",
            client_ip=self.client_ip,
            fqdn=self.fqdn,
            connector=c.name,
            protocol=protocol,
            queue_id=local_id.replace(
                ";", "-"
            ),  # an RFC 5321 Atom: a ";" would end the tokens early
            recipient=recipients[0] if len(recipients) == 1 else None,
        )
        self.log.info(
            receiving_message_info(self.log.session_id, self.messages), "receiving message"
        )
        envelope = Envelope(
            sender=txn.sender_text,
            recipients=recipients,
            client_ip=self.client_ip,
            connector=c.name,
            helo=self.helo or "",
            auth_user=self.auth_user or "",
            message_id=scan.message_id,
            metadata={"session": local_id, "protocol": protocol},
        )
        if self.bare_lf_rejection:  # checked above; the Received header is CRLF too
            envelope.metadata[LINE_BREAKS] = LINE_BREAKS_CRLF
        if txn.smtputf8:
            envelope.metadata[SMTPUTF8] = "1"
        envelope.metadata.update(self._delivery_metadata(txn))
        data = header + content
        handoff = self.ctx.handoff
        lease = handoff.lease_for_new() if handoff is not None else None
        received_at = time.time()
        try:
            queue_id = await self.ctx.store.submit(
                envelope, data, lease=lease, received_at=received_at
            )
        except StoreOutcomeUnknownError as exc:
            # The message may be stored after all: neither a 250 nor a 4xx would be true. No
            # reply, the connection closed: RFC 5321 §6.1 has the client send it again (a
            # duplicate at worst, never a loss or a refusal that was not one).
            self.ctx.logger.error(
                "queue store commit failed with its outcome unknown, message from %s: "
                "connection closed without a reply: %s",
                self.client_ip,
                exc,
            )
            raise _Close() from exc
        except StoreFullError as exc:  # the disk or database is full: the Store contract's 452
            # A warning: the store logs its failed commit itself; here the client is told to retry.
            self.ctx.logger.warning(
                "queue store full, message from %s refused with 452 4.3.1: %s", self.client_ip, exc
            )
            self.reply(replies.INSUFFICIENT_RESOURCES)
            return
        except StoreError as exc:  # database down, I/O error: the reason is in the message
            self.ctx.logger.error("queue store failed for %s: %s", self.client_ip, exc)
            self.reply(replies.QUEUE_FAILED)
            return
        except Exception as exc:  # any store failure: the client must retry, nothing was promised
            self.ctx.logger.exception("queue store failed for %s: %s", self.client_ip, exc)
            self.reply(replies.QUEUE_FAILED)
            return
        self.ctx.rates.record(c, self.client_ip, user=self.auth_user)
        elapsed = time.monotonic() - started
        size = len(header) + len(content)
        self.reply(
            replies.message_queued(
                queue_id,
                _reply_message_id(scan.message_id, queue_id, self.fqdn),
                # Hostname= is the server's FQDN, as Exchange's (§5.2), not the connector's
                # fqdn (the name of the banner and EHLO).
                self.ctx.config.server.fqdn,
                size,
                elapsed,
            )
        )
        self.ctx.message_received(queue_id, envelope, data, self)
        if handoff is not None and lease is not None:
            handoff.take_new(
                StoredMessage.new(
                    queue_id, envelope, size=len(data), received_at=received_at, lease=lease
                ),
                data,
            )
        elif self.ctx.on_message is not None:
            self.ctx.on_message(queue_id)


def _reply_message_id(message_id: str, queue_id: str, fqdn: str) -> str:
    """The message id the 250 names: the message's own when it is ASCII (a reply's text is,
    RFC 5321 §4.2), else (none, or a UTF-8 one) the queue id's form."""
    if message_id and message_id.isascii():
        return message_id
    return f"<{queue_id}@{fqdn}>"
