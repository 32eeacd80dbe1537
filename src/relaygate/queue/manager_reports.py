"""The queue manager's reports: the expiry of a message (``message_expiration_timeout``, with its
NDR), the one delay notice (``delay_notification_timeout``), and the hand-off of every NDR and
delay notice to the store as a message of its own (`send_dsn`, built by relaygate.queue.bounce).

Kept apart from the routes and the results that lead to a report: who gets one (the sender, the
admin copy, nobody for the null sender or a NOTIFY that says so) and how it enters the queue is
one rule, the same for every cause.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace

from relaygate import replies
from relaygate.queue.bounce import (
    DsnRecipient,
    build_dsn,
    header_block,
    header_value,
    notify_allows,
    original_recipients,
)
from relaygate.queue.manager_outcomes import FAILED, RouteResult
from relaygate.queue.manager_tracking import _Tracking
from relaygate.queue.model import (
    DSN_ENVID,
    NO_REPORTS_TO_SENDER,
    PENDING_STATUSES,
    SMTPUTF8,
    Envelope,
    RecipientState,
    RecipientStatus,
    StoredMessage,
)
from relaygate.queue.store import CorruptMessageError
from relaygate.replies import DELIVERY_PENDING, Reply

log = logging.getLogger("relaygate.queue")


class _Reports(_Tracking):
    """A mixin of `QueueManager`: expiry, delay notices and NDRs."""

    async def _maybe_delay_notice(
        self,
        msg: StoredMessage,
        attempted: dict[str, RecipientState],
        pending: list[RecipientState],
        deferred: list[RouteResult],
        data: bytes,
    ) -> None:
        """One delay notice for the recipients still pending past delay_notification_timeout."""
        owed = msg.queue_id in self._delay_flag_owed  # its notice went: only the flag is owed
        if owed and not deferred and all(r.address in attempted for r in pending):
            # This run ended the message: no flag is owed any more (it was kept for the life
            # of the process).
            self._delay_flag_owed.discard(msg.queue_id)
            return
        now = self.clock()
        if not self.schedule.delay_notice_due(msg.received_at, now, msg.delay_notified):
            return
        if owed:
            await self._save_delay_notified(msg)
            return
        notice = [
            DsnRecipient(r.address, r.reply, r.remote_host, last_attempt=now) for r in deferred
        ]
        notice += [
            DsnRecipient(r.address, _last_reply(r), last_attempt=r.last_attempt)
            for r in pending
            if r.address not in attempted
        ]
        if not notice:
            return
        await self.send_dsn(msg, data, notice, action="delayed")
        if not await self._save_delay_notified(msg):
            self._delay_flag_owed.add(msg.queue_id)

    async def _save_delay_notified(self, msg: StoredMessage) -> bool:
        """Save that ``msg``'s delay notice was queued; False when the store fails. The notice
        is queued first (a crash in between duplicates a report, never loses one), and a flag
        that cannot be saved is owed (`_delay_flag_owed`): tried again at each run, with no
        second notice from this node; before, each retry queued another notice."""
        try:
            await self.store.set_flags(msg.queue_id, delay_notified=True)
        except KeyError:
            pass  # removed meanwhile: nothing is owed
        except Exception as exc:
            log.error(
                "message %s: cannot save that it was delay notified (%s); no other delay notice "
                "is sent, the next run tries again",
                msg.queue_id,
                exc,
            )
            return False
        self._delay_flag_owed.discard(msg.queue_id)
        return True

    async def forget_ended_delay_flags(self) -> None:
        """Drop the owed flags of messages that ended outside this node's runs (removed by an
        administrator, ended by another node) or whose flag was saved since: with the
        housekeeping, one read per owed flag (none in the usual case)."""
        for queue_id in list(self._delay_flag_owed):
            msg = await self.store.get(queue_id)
            if (
                msg is None
                or msg.delay_notified
                or not any(r.status in PENDING_STATUSES for r in msg.recipients)
            ):
                self._delay_flag_owed.discard(queue_id)

    async def _expire(self, msg: StoredMessage, pending: list[RecipientState]) -> None:
        now = self.clock()
        self._delay_flag_owed.discard(msg.queue_id)  # it ends here: no notice is owed any more
        try:
            data = await self.store.read_data(msg.queue_id, size=msg.size)
        except KeyError:
            return
        except CorruptMessageError:
            data = b""
        reply = replies.QUEUE_EXPIRED
        await self.send_dsn(
            msg,
            data,
            [
                DsnRecipient(r.address, reply, last_attempt=r.last_attempt, last_error=r.last_error)
                for r in pending
            ],
            action="failed",
        )
        await self.store.record_results(
            msg.queue_id,
            self.node_id,
            [
                RecipientState(r.address, RecipientStatus.FAILED, r.attempts, reply.line(), now)
                for r in pending
            ],
        )
        self.stats["expired"] += len(pending)
        self.stats[FAILED] += len(pending)
        self.track(
            "FAIL",
            "QUEUE",
            msg,
            recipients=[r.address for r in pending],
            recipient_status=[reply.line()] * len(pending),
            data=data,
        )
        log.info(
            "message %s expired after %s; NDR for %d recipient(s)",
            msg.queue_id,
            self.config.queue.message_expiration_timeout,
            len(pending),
        )

    def postmaster(self) -> str:
        """The reports' From: the default accepted domain's postmaster (signed with its key)."""
        return str(self.config.postmaster)

    def _report_to(self, msg: StoredMessage, action: str) -> list[str]:
        """Where a report about ``msg`` goes: its sender, and the admin for an NDR. A sender the
        client's connector may not send to (allowed_recipients) hears nothing: the report would
        carry what the client wrote to an address of its choosing."""
        to = [] if msg.metadata.get(NO_REPORTS_TO_SENDER) == "1" else [msg.sender]
        admin = (self.config.queue.admin_notification_address or "").strip()
        if action == "failed" and admin and admin.lower() not in (t.lower() for t in to):
            to.append(admin)
        return to

    def _log_lost_report(self, report: StoredMessage, recipients: Sequence[DsnRecipient]) -> None:
        """A report its recipients refused (or that expired) is never reported on in turn: the
        service log is the only trace of a sender who never learns that a message failed."""
        refused = "; ".join(f"{r.address}: {r.reply.line()}" for r in recipients)
        privacy = self.log_privacy
        log.warning(
            "%s report %s about message %s could not be delivered to %s; it is dropped (a report "
            "is never sent about a report)",
            "non-delivery" if report.metadata.get("dsn") == "failed" else "delay",
            report.queue_id,
            report.metadata.get("original_queue_id", "?"),
            refused if privacy is None else privacy.text(refused),
        )

    async def send_dsn(
        self,
        msg: StoredMessage,
        data: bytes,
        recipients: Sequence[DsnRecipient],
        *,
        action: str = "failed",
    ) -> str | None:
        """Store a report about ``msg`` and wake the loop; its queue id, or None when none is due
        (null sender, no recipients, or none whose NOTIFY asks for it). NDRs (``failed``) are
        copied to admin_notification_address (a copy of what is sent, as Exchange's
        GenerateCopyOfDSNFor: none for NOTIFY=NEVER)."""
        if not recipients:
            return None
        kind = "non-delivery" if action == "failed" else "delay"
        if msg.sender in ("", "<>"):
            if msg.metadata.get("dsn") and action == "failed":  # a report's delay: not lost yet
                self._log_lost_report(msg, recipients)
            else:
                log.info(
                    "message %s from <>: no %s report (never to the null sender)",
                    msg.queue_id,
                    kind,
                )
            return None
        recipients = _reported(msg, recipients, action)
        if not recipients:
            log.info("message %s: no %s report (its recipients' NOTIFY)", msg.queue_id, kind)
            return None
        to = self._report_to(msg, action)
        if not to:
            log.info(
                "message %s: no %s report: its sender is not in allowed_recipients of connector %s",
                msg.queue_id,
                kind,
                msg.connector,
            )
            return None
        fqdn = self.config.server.fqdn
        body = build_dsn(
            action=action,
            reporting_mta=fqdn,
            to=msg.sender,
            original=data,
            recipients=recipients,
            received_at=msg.received_at,
            queue_id=msg.queue_id,
            will_retry_until=self.schedule.expires_at(msg.received_at),
            now=self.clock(),
            postmaster=self.postmaster(),
            envelope_id=msg.metadata.get(DSN_ENVID, ""),
        )
        message_id = header_value(body, "Message-ID")
        metadata = {"dsn": action, "original_queue_id": msg.queue_id}
        if not header_block(body).isascii():
            # A UTF-8 sender is in the report's To (RFC 6532): like a client's UTF-8 header, it
            # goes only to a next hop that offers SMTPUTF8 (RFC 6531 §3.2), never as 8-bit junk.
            metadata[SMTPUTF8] = "1"
        envelope = Envelope(
            sender="",
            recipients=to,
            helo=fqdn,
            message_id=message_id,
            metadata=metadata,
        )
        queue_id = await self.store.submit(envelope, body)
        self.stats["ndr" if action == "failed" else "delay_notices"] += 1
        self._write(
            "DSN",
            "DSN",
            internal_message_id=queue_id,
            message_id=message_id,
            recipients=to,
            # ", " between the addresses: ";" separates the field's values (one per recipient)
            recipient_status=[f"{action}: " + ", ".join(r.address for r in recipients)] * len(to),
            sender="",
            return_path="",
            total_bytes=len(body),
            reference=msg.message_id,
            related_recipient_address=";".join(r.address for r in recipients),
            message_subject=header_value(body, "Subject"),
            message_info=msg.queue_id,
        )
        privacy = self.log_privacy
        log.info(
            "message %s: %s report %s to %s",
            msg.queue_id,
            "non-delivery" if action == "failed" else "delay",
            queue_id,
            ", ".join(to) if privacy is None else privacy.text(", ".join(to)),
        )
        self.wake(queue_id)
        return queue_id


def _reported(
    msg: StoredMessage, recipients: Sequence[DsnRecipient], action: str
) -> list[DsnRecipient]:
    """The recipients whose NOTIFY asks for a report of ``action``, with the ORCPT they were
    given with (RFC 3461, honoured though DSN is not advertised)."""
    orcpts = original_recipients(msg.metadata)
    return [
        replace(r, original_recipient=orcpts.get(r.address, "")) if r.address in orcpts else r
        for r in recipients
        if notify_allows(msg.metadata, r.address, action)
    ]


def _last_reply(recipient: RecipientState) -> Reply:
    """A stored ``last_error`` line back as a Reply."""
    code, _, rest = recipient.last_error.partition(" ")
    if not code.isdigit():
        return DELIVERY_PENDING
    enhanced, _, text = rest.partition(" ")
    if enhanced[:1].isdigit() and enhanced.count(".") == 2:
        return Reply(int(code), enhanced, text)
    return Reply(int(code), "", rest)
