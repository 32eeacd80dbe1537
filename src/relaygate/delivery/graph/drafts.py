"""What one attempt does once it knows its plan: the plain sendMail, or a draft made, its parts
attached, its recipients set and sent; and, before either, what an earlier attempt left behind
(`DraftRecord`: a draft never sent, a send whose answer was lost) resolved.

The bookkeeping that keeps a lost answer from becoming a duplicate (or a message recorded
delivered and never sent) lives here; the Sent Items lookup it relies on is sent_items.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Protocol

from relaygate.delivery.graph.calls import (
    _Caller,
    _create_draft,
    _delete_draft,
    _draft_url,
    _user_url,
)
from relaygate.delivery.graph.errors import (
    _DRAFT_HINT,
    _UPLOAD_HINT,
    _after_draft,
    _clean,
    _error_code,
    _error_detail,
    _GraphError,
    _maybe_sent,
    reply_for_status,
)
from relaygate.delivery.graph.large_messages import _off_loop, _upload
from relaygate.delivery.graph.recipients import RecipientPlan, _comparable_address, _recipients_json
from relaygate.delivery.graph.sent_items import _ABSENT, _CANNOT, _FOUND, _SentItemsLookup
from relaygate.delivery.mime_split import Attachment
from relaygate.replies import Reply

#: The package's one logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.delivery.graph")

#: What the job returns when a lookup confirmed an earlier attempt's send (the transport
#: makes the "confirmed by lookup" reply of it).
_CONFIRMED = "confirmed"


class DraftRecord(Protocol):
    """Where the draft of one route of a message is remembered between attempts, durably (the
    queue store's graph_drafts, through the queue manager): a crash mid-upload, or a send whose
    answer never came, leaves a draft that the next attempt, on this node or another, after a
    restart too, must resolve before it makes another one. A plain sendMail in flight is
    remembered there too (no draft id, the message's Message-ID), to be looked up in Sent Items.

    Why the queue store and not a marker on the draft found again by a ``$filter`` query: the
    store already is the durable, shared (PostgreSQL: every node) state of each message and is
    written before the draft is used; a marker would need an extra PATCH (a draft made from MIME
    takes no extended property) with a crash window before it, a query at every attempt of
    every big message, and the mailbox of the attempt that made it (the connector's may have
    changed since)."""

    #: When the message reached the queue (unix time): a Sent Items copy created earlier (less
    #: SENT_ITEMS_SKEW) is another message's, whatever its Message-ID.
    since: float

    async def load(self) -> tuple[str, str, bool, str] | None:
        """(mailbox, draft id ("" for a plain sendMail), whether its send was requested, the
        message's Message-ID ("" for none)), or None."""
        ...

    async def save(
        self, mailbox: str, draft_id: str, *, sending: bool, message_id: str = ""
    ) -> None: ...

    async def forget(self) -> None: ...


class _DraftJob(_SentItemsLookup):
    """The draft path of one attempt: first what an earlier attempt left (`DraftRecord`), then a
    draft of the message, its parts attached, its recipients set, and its send; or the plain
    path's sendMail (`send_mail`), after the same resolution.

    What an earlier attempt left is resolved before anything else:
    * a draft whose send was never requested (a crash mid-upload, a failure whose DELETE
      failed): deleted (404: already gone), then the attempt starts over;
    * a draft whose send was requested and not answered (a timeout, the connection dropped, a
      5xx: Graph may have sent it): looked up by its immutable id. No longer a draft (``isDraft``
      false: the copy in Sent Items): the message was sent, the recipients are delivered
      ("confirmed by lookup"). Gone (404 ErrorItemNotFound): sent, or purged (hard-deleted)
      unsent; the message's Message-ID is looked up in Sent Items (`_in_sent_items`): there,
      sent; not there, the record is forgotten and a new draft made and sent (a message without
      a Message-ID, or a Sent Items that cannot be read: sent, as before the lookup existed).
      Still a draft: that same draft is sent again (no new one);
    * a plain sendMail that got no answer (no draft id): looked up in Sent Items by the
      message's Message-ID. There: sent, confirmed by lookup. Not there, or Sent Items not to
      be read (403, no such folder): the message is sent again.
    A lookup failing otherwise (429, 5xx, no answer, a 404 about the mailbox) leaves the attempt
    a temporary failure and the record in place, for the next attempt to look it up again.
    The send's outcome unknown, the draft is kept (and the record): never deleted then, nor
    looked up at once (Graph sends after its 202, moving the draft a moment later)."""

    def __init__(
        self,
        call: _Caller,
        base: str,
        record: DraftRecord | None,
        decoded: asyncio.Semaphore,
        logged: str,
        message_id: str = "",
        recipients: Sequence[str] = (),
    ) -> None:
        self.call = call
        self.base = base
        self.record = record
        self.decoded = decoded
        self.logged = logged  # the mailbox as the service log names it
        self.message_id = message_id  # the message's ("" for none)
        #: this route's recipients: its copy in Sent Items names some of them (another route's
        #: copy of the same message, the same Message-ID, names none of them)
        self.recipients = frozenset(map(_comparable_address, recipients))
        self.since = record.since if record is not None else 0.0
        #: the draft's mailbox: this attempt's, or that of an earlier attempt's draft
        self.mailbox = call.mailbox
        self.confirmed = ""  # how the lookup confirmed an earlier attempt's send
        self.what = "draft"  # what the earlier attempt sent, for the reply
        #: the transport's: when each mailbox's Sent Items was last warned about as unreadable
        self.unreadable: dict[str, float] = {}

    async def send_mail(self, user: str, body: bytes) -> str:
        """The plain path: one sendMail of the MIME, remembered first (durably, with the
        Message-ID: a lost answer, or a crash once it is on its way, must not make the next
        attempt send it again unchecked) and forgotten once its outcome is known. A message
        without a Message-ID is not remembered (it could not be looked up)."""
        if self.record is not None:
            earlier = await self._earlier()
            if earlier:
                return earlier
        remembered = self.record is not None and bool(self.message_id)
        if remembered:
            await self._remember("", sending=True)
        try:
            await self.call.post_mime(f"{user}/sendMail", body, expect=(202,))
        except _GraphError as failure:
            if not remembered:
                raise
            if not failure.unknown:  # refused, or never left: nothing was sent
                await self._forget_quietly("sendMail")
                raise
            log.warning(
                "Microsoft Graph sendMail as %s: no answer (%s); the next attempt looks the "
                "message up in Sent Items before sending it again",
                self.logged,
                failure.reply.line(),
            )
            raise _maybe_sent(
                failure,
                "; the message may have been sent: the next attempt looks it up in Sent Items "
                "before sending it again",
            ) from None
        # Sent: the record stays until the result is stored (the store drops it in the
        # transaction that finishes the message); forgotten now, a crash before that commit
        # would send the message again unchecked.
        return "sendMail"

    async def run(
        self,
        user: str,
        body: bytes,
        plan: RecipientPlan,
        data: bytes = b"",
        parts: Sequence[Attachment] = (),
    ) -> str:
        """A draft of `body`, each of `parts` (taken out of `data`) attached, the recipients
        set, the draft sent: the path of a message whose header recipients differ from its
        envelope (no parts) and of one over Graph's request limit (`body` is the message
        without its big parts). Any failure once the draft exists deletes it (the failure's
        reply stands: 429 / 5xx transient, other 4xx permanent; a 404 transient: `_after_draft`),
        but for a send whose outcome is unknown. Returns how it went, for the reply."""
        if self.record is not None:
            earlier = await self._earlier()
            if earlier:
                return earlier
        call = self.call
        draft_id, url = await _create_draft(
            call, user, body, _UPLOAD_HINT if parts else _DRAFT_HINT
        )
        sending = False
        try:
            await self._remember(draft_id, sending=False)
            for part in parts:
                await self._attach(url, data, part)
            await call.request(
                "PATCH",
                url,
                expect=(200,),
                json_body={
                    "toRecipients": _recipients_json(plan.to),
                    "ccRecipients": _recipients_json(plan.cc),
                    "bccRecipients": _recipients_json(plan.bcc),
                },
            )
            sending = True
            await self._send(url, draft_id)
        except _GraphError as failure:
            if not failure.unknown or not sending:
                await self._discard(url, draft_id)
            raise _after_draft(failure) from None
        except BaseException:  # cancelled (a stop) too: no draft left behind, but one maybe sent
            if not sending:
                await asyncio.shield(self._discard(url, draft_id))
            raise
        if parts:
            return f"draft sent, {len(parts)} attachment(s) uploaded"
        return "draft sent"

    async def _earlier(self) -> str:
        """Resolve what an earlier attempt left: "" (nothing left: go on), or how it went."""
        assert self.record is not None
        left = await self.record.load()
        if left is None:
            return ""
        mailbox, draft_id, sending, message_id = left
        call = self.call.as_mailbox(mailbox)
        if not draft_id:
            return await self._earlier_send_mail(call, mailbox, message_id)
        url = _draft_url(_user_url(self.base, mailbox), draft_id)
        if not sending:
            log.info(
                "Microsoft Graph draft %s of an earlier attempt as %s was never sent: deleted",
                draft_id,
                self.logged,
            )
            try:
                await call.request("DELETE", url, expect=(204, 200, 404))
            except _GraphError as failure:
                if failure.reply.code >= 500 and failure.status != 401:
                    # Refused for good (403: the app may no longer touch that mailbox): a draft
                    # never sent makes no duplicate; it must not hold the message until expiry.
                    log.warning(
                        "Microsoft Graph draft %s of an earlier attempt as %s left in place "
                        "(never sent): %s",
                        draft_id,
                        self.logged,
                        failure.reply.line(),
                    )
                    await self.record.forget()
                    return ""
                raise _GraphError(
                    Reply(
                        451,
                        "4.4.0",
                        f"Microsoft Graph: cannot delete the draft an earlier attempt left "
                        f"({_clean(failure.reply.line())}); tried again at the next attempt",
                    ),
                    status=401 if failure.status == 401 else 0,
                    retry_after=failure.retry_after,
                ) from None
            await self.record.forget()
            return ""
        try:
            found = await call.request("GET", f"{url}?$select=isDraft", expect=(200, 404))
            gone = found.status_code == 404
            if gone and _error_code(found.content) != "ErrorItemNotFound":
                # A 404 about the mailbox (MailboxNotEnabledForRESTAPI: no licence, inactive or
                # soft-deleted; ErrorInvalidUser), not the item: no proof the draft was sent.
                raise _GraphError(
                    reply_for_status(404, found.content, mailbox, None),
                    status=404,
                    detail=_error_detail(404, found.content),
                )
            is_draft = not gone and bool(found.json().get("isDraft", True))
        except (_GraphError, ValueError, AttributeError) as failure:
            why = failure.reply.line() if isinstance(failure, _GraphError) else "not JSON"
            log.info(
                "Microsoft Graph draft %s as %s, whose send's answer was lost: lookup failed: %s",
                draft_id,
                self.logged,
                why,
            )
            raise _GraphError(
                Reply(
                    451,
                    "4.4.0",
                    "Microsoft Graph: the send of a draft got no answer and looking the draft up "
                    f"failed ({_clean(why)}); it is looked up again at the next attempt, before "
                    "anything is sent",
                ),
                status=401 if isinstance(failure, _GraphError) and failure.status == 401 else 0,
                retry_after=failure.retry_after if isinstance(failure, _GraphError) else None,
            ) from None
        self.mailbox = mailbox  # the draft's, for its record and the reply
        if gone and message_id:
            # Gone is sent or purged unsent (a user's Shift+Delete, a retention policy): only
            # Sent Items tells which.
            found = await self._in_sent_items(call, mailbox, message_id, what="draft")
            if found == _ABSENT:
                log.info(
                    "Microsoft Graph draft %s as %s, whose send's answer was lost, is gone and "
                    "not in Sent Items (purged unsent): a new draft is sent",
                    draft_id,
                    self.logged,
                )
                await self.record.forget()
                return ""
            if found == _FOUND:
                return await self._confirm(
                    draft_id, "the draft is gone (404) and the message is in Sent Items"
                )
        if not is_draft:
            return await self._confirm(
                draft_id, "the draft is gone (404)" if gone else "isDraft is false"
            )
        log.info(
            "Microsoft Graph draft %s as %s, whose send's answer was lost, is still a draft: "
            "sent again",
            draft_id,
            self.logged,
        )
        try:
            await self._send(url, draft_id, call=call)
        except _GraphError as failure:
            if failure.detail.partition(":")[0] == "404 ErrorItemNotFound":
                # Gone since the lookup: the earlier send, taken, moved it (as the lookup's
                # 404). Deleted and forgotten, the next attempt would make and send another.
                return await self._confirm(
                    draft_id, "the draft went away as it was sent again (404)"
                )
            if not failure.unknown:
                await self._discard(url, draft_id, call=call)
            raise _after_draft(failure) from None
        return "the draft of an earlier attempt sent"

    async def _confirm(self, draft_id: str, how: str) -> str:
        """The draft (or sendMail: `what`) whose send's answer was lost was sent (``how`` we
        know): the recipients to be recorded delivered, confirmed by lookup. Its record stays:
        the store drops it with that result (forgotten first, a crash before the result is
        stored left the next attempt nothing to look up, and it sent the message again)."""
        assert self.record is not None  # (only a draft with a record is looked up)
        self.confirmed = how
        log.info(
            "Microsoft Graph %s %s as %s, whose send's answer was lost, was sent (%s)",
            self.what,
            draft_id,
            self.logged,
            how,
        )
        return _CONFIRMED

    async def _earlier_send_mail(self, call: _Caller, mailbox: str, message_id: str) -> str:
        """An earlier attempt's sendMail that got no answer: confirmed when Sent Items has the
        message, else forgotten (the caller sends it)."""
        assert self.record is not None
        self.what = "message"
        found = (
            await self._in_sent_items(call, mailbox, message_id, what="sendMail")
            if message_id
            else _CANNOT
        )
        if found == _FOUND:
            self.mailbox = mailbox
            return await self._confirm(message_id, "found in Sent Items by its Message-ID")
        log.info(
            "Microsoft Graph sendMail %s of an earlier attempt as %s, whose answer was lost, "
            "is not in Sent Items%s: sent again",
            message_id,
            self.logged,
            "" if found == _ABSENT else " (the lookup cannot be made)",
        )
        await self.record.forget()
        return ""

    async def _forget_quietly(self, what: str) -> None:
        """Forget the record of a send known not to have happened; a failure leaves it, and
        the next attempt's lookup finds nothing: no harm."""
        if self.record is None:
            return
        try:
            await self.record.forget()
        except Exception as exc:
            log.warning("Microsoft Graph %s as %s: cannot forget it: %r", what, self.logged, exc)

    async def _send(self, url: str, draft_id: str, *, call: _Caller | None = None) -> None:
        """POST .../send, remembered as requested first (durably: a crash once it is on its
        way must not make the next attempt send another draft)."""
        call = call or self.call
        await self._remember(draft_id, sending=True)
        try:
            await call.request("POST", f"{url}/send", expect=(202,))
        except _GraphError as failure:
            if not failure.unknown:
                raise
            log.warning(
                "Microsoft Graph draft %s as %s: no answer to its send (%s); the next attempt "
                "looks it up before sending it again",
                draft_id,
                self.logged,
                failure.reply.line(),
            )
            raise _maybe_sent(
                failure,
                "; the draft may have been sent: the next attempt looks it up before sending it "
                "again",
            ) from None
        # Sent: the record stays until the result is stored (as `send_mail`'s).

    async def _remember(self, draft_id: str, *, sending: bool) -> None:
        if self.record is not None:
            await self.record.save(
                self.mailbox, draft_id, sending=sending, message_id=self.message_id
            )

    async def _discard(self, url: str, draft_id: str, *, call: _Caller | None = None) -> None:
        """Delete the draft (best effort) and, once it is gone, forget it; a record kept (the
        DELETE failed) makes the next attempt delete it first."""
        if not await _delete_draft(call or self.call, url, draft_id):
            return
        if self.record is not None:
            try:
                await self.record.forget()
            except Exception as exc:  # the next attempt finds the draft gone: no harm
                log.warning("Microsoft Graph draft %s: cannot forget it: %r", draft_id, exc)

    async def _attach(self, url: str, data: bytes, part: Attachment) -> None:
        """One file attachment: under 3 MB, one POST of a fileAttachment; else an upload
        session (createUploadSession, then its octets in chunks to the session's uploadUrl,
        which gets no bearer token). Decoded off the event loop when big, and held (decoded)
        within the transport's DECODED_ATTACHMENTS."""
        async with self.decoded:
            content = await _off_loop(part.content, data, octets=part.end - part.start)
            await _upload(self.call, url, part, content)
