"""The HTTP calls to Graph: the bearer token and headers of each request, the URLs of a
mailbox and of a draft, a draft made from MIME and a draft deleted.

`_Caller` turns transport failures and unexpected statuses into `_GraphError` (errors.py), saying
whether Graph may have acted on the request; the paths above it only decide what to call.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any
from urllib.parse import quote

from relaygate.delivery.graph.errors import (
    _clean,
    _error_detail,
    _GraphError,
    _retry_after,
    _with_hint,
    reply_for_status,
)
from relaygate.replies import Reply

#: The package's one logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.delivery.graph")


class _Caller:
    """HTTP calls with the bearer token; a non-expected status raises `_GraphError`."""

    def __init__(self, client: Any, token: str, mailbox: str, timeout: float) -> None:
        self.client = client
        # Immutable ids: a draft keeps its id when it moves within the mailbox (to Sent Items
        # once sent, to Deleted Items when a user deletes it), so that the lookup of a draft
        # whose send got no answer tells one from the other (by default the id changes with
        # the folder: both looked gone, a deleted draft recorded delivered).
        self.headers = {"Authorization": f"Bearer {token}", "Prefer": 'IdType="ImmutableId"'}
        self.mailbox = mailbox
        self.timeout = timeout

    def as_mailbox(self, mailbox: str) -> _Caller:
        """The same calls, their errors naming `mailbox`."""
        other = _Caller(self.client, "", mailbox, self.timeout)
        other.headers = self.headers
        return other

    async def request(
        self,
        method: str,
        url: str,
        *,
        expect: tuple[int, ...],
        content: bytes | None = None,
        json_body: Any = None,
        content_type: str | None = None,
        extra: dict[str, str] | None = None,
        authorized: bool = True,
    ) -> Any:
        """`authorized`: with the bearer token (not to an upload URL: it is pre-authenticated,
        and outside Graph's host)."""
        import httpx

        # The errors before any octet of the request left (connecting, waiting for a pooled
        # connection); any other (a read timeout, the connection dropped) may come after Graph
        # got the request and acted on it.
        unsent = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
        headers = dict(self.headers) if authorized else {}
        if content_type:
            headers["Content-Type"] = content_type
        if extra:
            headers.update(extra)
        try:
            response = await self.client.request(
                method,
                url,
                content=content,
                json=json_body,
                headers=headers,
                timeout=self.timeout,
            )
        except httpx.TimeoutException as exc:
            raise _GraphError(
                Reply(
                    451, "4.4.1", f"Microsoft Graph did not answer in time ({type(exc).__name__})"
                ),
                unknown=not isinstance(exc, unsent),
            ) from None
        except httpx.HTTPError as exc:
            reason = type(exc).__name__
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ssl.SSLCertVerificationError):
                reason = f"certificate validation failed: {cause.verify_message or cause.reason}"
            raise _GraphError(
                Reply(451, "4.4.0", f"Cannot reach Microsoft Graph ({_clean(reason)})"),
                unknown=not isinstance(exc, unsent),
            ) from None
        if response.status_code in expect:
            return response
        status = response.status_code
        wait = _retry_after(response.headers.get("Retry-After"))
        reply = reply_for_status(status, response.content, self.mailbox, wait)
        detail = _error_detail(status, response.content)
        raise _GraphError(
            reply, status=status, retry_after=wait, detail=detail, unknown=status >= 500
        )

    async def post_mime(self, url: str, body: bytes, *, expect: tuple[int, ...]) -> Any:
        return await self.request(
            "POST", url, expect=expect, content=body, content_type="text/plain"
        )


async def _create_draft(call: _Caller, user: str, body: bytes, hint: str) -> tuple[str, str]:
    """A draft made from the MIME: its id and URL (a 403 gets `hint`)."""
    try:
        created = await call.post_mime(f"{user}/messages", body, expect=(200, 201))
    except _GraphError as failure:
        if failure.status == 403:
            raise _GraphError(_with_hint(failure.reply, hint), status=403) from None
        raise
    try:
        draft_id = str(created.json()["id"])
    except (ValueError, KeyError, TypeError):
        raise _GraphError(
            Reply(451, "4.4.0", "Microsoft Graph made a draft but did not say its id")
        ) from None
    return draft_id, f"{user}/messages/{quote(draft_id, safe='')}"


def _user_url(base: str, mailbox: str) -> str:
    return f"{base}/users/{quote(mailbox, safe='@')}"


def _draft_url(user: str, draft_id: str) -> str:
    return f"{user}/messages/{quote(draft_id, safe='')}"


async def _delete_draft(call: _Caller, url: str, draft_id: str) -> bool:
    """Best effort: whether the draft is gone."""
    try:
        await call.request("DELETE", url, expect=(204, 200, 404))
        return True
    except _GraphError as exc:
        log.warning("Microsoft Graph draft %s left in place: %s", draft_id, exc.reply.line())
    except Exception as exc:  # best effort: never in place of the failure being reported
        log.warning("Microsoft Graph draft %s left in place: %r", draft_id, exc)
    return False
