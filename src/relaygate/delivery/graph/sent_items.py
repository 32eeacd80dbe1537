"""Looking a message up in the mailbox's Sent Items by its internetMessageId: how a send whose
answer was lost (a plain sendMail, or a draft gone missing) is told sent from never sent.

A mixin of the draft job (`_DraftJob`, drafts.py): the lookup reads the job's mailbox base URL,
its route's recipients and when the message reached the queue, and its outcome (_FOUND, _ABSENT,
_CANNOT) decides whether the job confirms, sends again, or defers.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any
from urllib.parse import quote

from relaygate.delivery.graph.calls import _Caller, _user_url
from relaygate.delivery.graph.errors import (
    _clean,
    _error_code,
    _error_detail,
    _GraphError,
    reply_for_status,
)
from relaygate.delivery.graph.recipients import _comparable_address
from relaygate.replies import Reply

#: The package's one logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.delivery.graph")

#: A 404 answer to the Sent Items query that is about the folder, not the mailbox: a mailbox
#: without Sent Items (the lookup cannot be made: sent again).
_NO_FOLDER = frozenset({"ErrorItemNotFound", "ErrorFolderNotFound"})
#: A Sent Items copy created this long before its message reached the queue still counts as
#: this message's (the relay's clock ahead of Microsoft's); an older one is another message
#: with the same Message-ID (a scanner's counter reset by a reboot, a user's resend).
SENT_ITEMS_SKEW = 300.0
#: A Sent Items lookup refused for good is warned about once this often per mailbox (seconds).
UNREADABLE_WARNING_INTERVAL = 3600.0
#: The pages of a Sent Items lookup read at most (10 copies a page): past them, not found.
SENT_ITEMS_PAGES = 50

#: What a Sent Items lookup tells (`_SentItemsLookup._in_sent_items`).
_FOUND, _ABSENT, _CANNOT = "found", "absent", "cannot"


def sent_items_query(message_id: str) -> str:
    """The query string of the Sent Items lookup by internetMessageId: an OData string literal
    (an apostrophe doubled), then every reserved character percent-encoded (``<`` ``>`` ``'``,
    and ``+``, which Graph's front end would read as a space, ``&`` and ``#``), as Microsoft's
    "Encoding query parameters" asks. The recipients are selected to tell this route's copy from
    another route's of the same message (each route has its own recipients), and the time each
    copy was created to tell it from an earlier message's with the same Message-ID."""
    literal = "'" + message_id.replace("'", "''") + "'"
    return (
        f"$filter={quote(f'internetMessageId eq {literal}', safe='')}"
        "&$select=id,toRecipients,ccRecipients,bccRecipients,createdDateTime"
    )


class _SentItemsLookup:
    """The Sent Items lookup of a `_DraftJob`: the attributes below are the job's."""

    base: str  # graph_endpoint, without its trailing slash
    logged: str  # the mailbox as the service log names it
    #: this route's recipients (`_comparable_address`)
    recipients: frozenset[str]
    since: float  # when the message reached the queue (unix time)
    #: the transport's: when each mailbox's Sent Items was last warned about as unreadable
    unreadable: dict[str, float]

    async def _in_sent_items(self, call: _Caller, mailbox: str, message_id: str, what: str) -> str:
        """Whether the mailbox's Sent Items holds this route's copy of the message: _FOUND,
        _ABSENT, or _CANNOT (the lookup can never be made: refused for good, such as a 403
        without Mail.ReadBasic.All, or no Sent Items folder). Any other failure (429, 5xx, no
        answer, a 404 about the mailbox) raises a temporary failure, the record kept. Every
        page of the answer is read (Graph gives 10 a page: a device that reuses one Message-ID
        fills more), up to SENT_ITEMS_PAGES; a next page outside graph_endpoint is not asked
        for (it would get the token)."""
        url = f"{_user_url(self.base, mailbox)}/mailFolders/sentitems/messages?" + sent_items_query(
            message_id
        )
        for _page in range(SENT_ITEMS_PAGES):
            page = await self._sent_items_page(call, url, mailbox, what)
            if page is None:
                return _CANNOT
            items, next_link = page
            if any(self._names_this_route(item) for item in items):
                return _FOUND
            if not isinstance(next_link, str) or not next_link.startswith(self.base + "/"):
                return _ABSENT
            url = next_link
        return _ABSENT

    async def _sent_items_page(
        self, call: _Caller, url: str, mailbox: str, what: str
    ) -> tuple[list[Any], Any] | None:
        """One page of the Sent Items lookup: its messages and its @odata.nextLink, or None
        when the lookup can never be made (see `_in_sent_items`)."""
        try:
            answer = await call.request("GET", url, expect=(200, 404))
            if answer.status_code == 404:
                if _error_code(answer.content) in _NO_FOLDER:
                    return None
                raise _GraphError(  # about the mailbox: no proof of anything
                    reply_for_status(404, answer.content, mailbox, None),
                    status=404,
                    detail=_error_detail(404, answer.content),
                )
            body = answer.json()
            items = body["value"]
            if not isinstance(items, list):
                raise ValueError("value is not a list")
        except _GraphError as failure:
            if failure.reply.code >= 500 and failure.status not in (401, 404):
                self._warn_unreadable(mailbox, what, failure.reply.line())
                return None
            raise self._lookup_failed(what, failure.reply.line(), failure) from None
        except (ValueError, KeyError, TypeError, AttributeError):
            raise self._lookup_failed(what, "not JSON", None) from None
        return items, body.get("@odata.nextLink")

    def _names_this_route(self, item: Any) -> bool:
        """A Sent Items copy is this route's when it was created after the message reached the
        queue and names one of the route's recipients."""
        if not isinstance(item, dict) or not self._created_since(item):
            return False
        for key in ("toRecipients", "ccRecipients", "bccRecipients"):
            for entry in item.get(key) or ():
                address = entry.get("emailAddress", {}) if isinstance(entry, dict) else {}
                if _comparable_address(str(address.get("address", ""))) in self.recipients:
                    return True
        return False

    def _warn_unreadable(self, mailbox: str, what: str, why: str) -> None:
        """A lookup refused for good (403: no Mail.ReadBasic.All): a warning once an hour per
        mailbox, the others at DEBUG; a brownout that loses many answers would otherwise repeat
        the same advice once per message."""
        now = time.monotonic()
        last = self.unreadable.get(mailbox)
        level = logging.DEBUG
        if last is None or now - last >= UNREADABLE_WARNING_INTERVAL:
            self.unreadable[mailbox] = now
            level = logging.WARNING
        log.log(
            level,
            "Microsoft Graph %s as %s: cannot look the message up in Sent Items (%s); sent "
            "again (grant Mail.ReadBasic.All to look lost sendMails up)",
            what,
            self.logged,
            why,
        )

    def _created_since(self, item: dict[str, Any]) -> bool:
        """Whether the copy was created after the message reached the queue (less the skew); a
        copy without a readable createdDateTime is not taken as proof (sent again, at worst a
        duplicate, rather than recorded delivered and never sent)."""
        try:
            created = datetime.fromisoformat(str(item["createdDateTime"]).replace("Z", "+00:00"))
        except (KeyError, ValueError):
            return False
        if created.tzinfo is None:
            return False
        return created.timestamp() >= self.since - SENT_ITEMS_SKEW

    def _lookup_failed(self, what: str, why: str, failure: _GraphError | None) -> _GraphError:
        log.info(
            "Microsoft Graph %s as %s, whose answer was lost: Sent Items lookup failed: %s",
            what,
            self.logged,
            why,
        )
        return _GraphError(
            Reply(
                451,
                "4.4.0",
                f"Microsoft Graph: the {what} of an earlier attempt got no answer and looking "
                f"the message up in Sent Items failed ({_clean(why)}); it is looked up again "
                "at the next attempt, before anything is sent",
            ),
            status=401 if failure is not None and failure.status == 401 else 0,
            retry_after=failure.retry_after if failure is not None else None,
        )
