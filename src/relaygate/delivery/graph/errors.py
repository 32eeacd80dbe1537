"""Graph's answers as SMTP-style replies, and the failure one call raises (`_GraphError`).

Graph's status codes and error objects become the replies the queue records as it records an
SMTP server's: 429, 5xx and timeouts transient, 400 / 403 / 404 / 413 permanent with Graph's own
error code and message (see the package docstring). Kept apart from the calls so that every path
(plain sendMail, drafts, uploads, Sent Items lookups) maps answers the same way.
"""

from __future__ import annotations

import email.header
import email.utils
import json
import re
import time

from relaygate.delivery.graph.limits import (
    GRAPH_MAX_ATTACHMENT_OCTETS,
    GRAPH_MAX_MIME_OCTETS,
    GRAPH_MAX_REQUEST_OCTETS,
)
from relaygate.replies import Reply

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


class _GraphError(Exception):
    def __init__(
        self,
        reply: Reply,
        *,
        status: int = 0,
        retry_after: float | None = None,
        detail: str = "",
        unknown: bool = False,
    ) -> None:
        super().__init__(reply.line())
        self.reply = reply
        self.status = status
        self.retry_after = retry_after
        self.detail = detail  # Graph's status and error, for a reply made later
        #: Graph may have acted on the request: it was sent (or being sent) and no answer came
        #: (a timeout, the connection dropped), or the answer was a 5xx.
        self.unknown = unknown


def _clean(text: str, limit: int = 300) -> str:
    text = _CONTROL.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _error_code(body: bytes) -> str:
    """Graph's error code (``ErrorItemNotFound``), or ""."""
    try:
        error = json.loads(body.decode("utf-8", "replace")).get("error", {})
    except (ValueError, AttributeError):
        return ""
    return str(error.get("code", "") or "") if isinstance(error, dict) else ""


def _error_detail(status: int, body: bytes) -> str:
    """``403 ErrorAccessDenied: Access is denied.`` from Graph's error object (or the status)."""
    code = message = ""
    try:
        error = json.loads(body.decode("utf-8", "replace")).get("error", {})
        if isinstance(error, dict):
            code = str(error.get("code", "") or "")
            message = str(error.get("message", "") or "")
    except (ValueError, AttributeError):
        pass
    detail = f"{status} {code}".strip()
    if message:
        detail += f": {message}"
    return _clean(detail)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²", which isdigit() takes and float() refuses
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def reply_for_status(status: int, body: bytes, mailbox: str, retry_after: float | None) -> Reply:
    """The SMTP-style reply for a Graph error answer."""
    detail = _error_detail(status, body)
    if status == 429:
        wait = f"; Retry-After {retry_after:g} s" if retry_after is not None else ""
        return Reply(451, "4.7.0", f"Microsoft Graph throttled the request ({detail}){wait}")
    if status == 401:
        return Reply(451, "4.7.0", f"Microsoft Graph refused the access token ({detail})")
    if status in (408, 409, 423, 425) or status >= 500:
        return Reply(451, "4.4.0", f"Microsoft Graph is unavailable ({detail})")
    if status == 403:
        return Reply(550, "5.7.1", f"Microsoft Graph refused to send as {mailbox} ({detail})")
    if status == 404:
        return Reply(
            550, "5.1.1", f"Microsoft Graph: no mailbox {mailbox} or no access to it ({detail})"
        )
    if status == 413:
        return _too_big(detail)
    return Reply(554, "5.6.0", f"Microsoft Graph refused the message ({detail})")


def _too_big(detail: str) -> Reply:
    return Reply(
        552,
        "5.3.4",
        f"Message too big for Microsoft Graph ({detail}): a request holds at most "
        f"{GRAPH_MAX_REQUEST_OCTETS // (1024 * 1024)} MB, the message base64-encoded, so about "
        f"{GRAPH_MAX_MIME_OCTETS // (1024 * 1024)} MB of message without the attachments "
        f"(each attachment at most {GRAPH_MAX_ATTACHMENT_OCTETS // (1024 * 1024)} MB); such "
        "messages need a send connector that delivers over SMTP",
    )


NO_MAILBOX = Reply(
    550,
    "5.7.0",
    "Microsoft Graph needs a mailbox to send from: the message has the null sender; set "
    "graph_mailbox or send_as on the send connector",
)


_DRAFT_HINT = (
    "; a message whose To/Cc/Bcc differ from its envelope goes as a draft, "
    "which needs the Mail.ReadWrite application permission"
)
_UPLOAD_HINT = (
    "; a message over Graph's 4 MB request limit goes as a draft with its attachments "
    "uploaded, which needs the Mail.ReadWrite application permission"
)


def _with_hint(reply: Reply, hint: str) -> Reply:
    return Reply(reply.code, reply.enhanced, reply.text + hint)


def _maybe_sent(failure: _GraphError, hint: str) -> _GraphError:
    """A send that got no answer (timeout, dropped, 5xx): the same failure, its reply saying that
    the next attempt looks the message up before sending it again."""
    return _GraphError(
        _with_hint(failure.reply, hint),
        status=failure.status,
        retry_after=failure.retry_after,
        detail=failure.detail,
        unknown=True,
    )


def _after_draft(failure: _GraphError) -> _GraphError:
    """A failure once the draft exists, as one before it (429 / 5xx transient, other 4xx
    permanent), but for a 404: the mailbox was there a moment ago, so it is the draft or its
    upload session Graph no longer finds (another client deleted it, a session that expired,
    Graph's replication): transient, the next attempt starts over with a new draft."""
    if failure.status != 404:
        return failure
    reply = Reply(
        451,
        "4.4.0",
        f"Microsoft Graph no longer finds the draft it made or its upload session "
        f"({failure.detail or 404}); the next attempt starts over",
    )
    return _GraphError(reply, status=404, retry_after=failure.retry_after, detail=failure.detail)
