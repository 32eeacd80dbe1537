"""The large-message path: a message whose base64 form would pass Graph's 4 MB request limit
goes as a draft without its biggest attachments, each uploaded after (one POST under 3 MB, else
an upload session whose pre-authenticated uploadUrl never gets the token); and the refusals known
before any call (no mailbox; too big even without the attachments).

Separate from the draft bookkeeping (drafts.py): this is about octets (splitting, decoding off
the event loop, chunking), that about what an attempt leaves behind.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from relaygate.delivery.graph.calls import _Caller
from relaygate.delivery.graph.errors import (
    _UPLOAD_HINT,
    NO_MAILBOX,
    _GraphError,
    _too_big,
    _with_hint,
)
from relaygate.delivery.graph.limits import (
    DIRECT_ATTACHMENT_OCTETS,
    GRAPH_MAX_ATTACHMENT_OCTETS,
    GRAPH_MAX_MIME_OCTETS,
    GRAPH_MAX_REQUEST_OCTETS,
    OFF_LOOP_OCTETS,
    SPLIT_TARGET_OCTETS,
    UPLOAD_CHUNK_OCTETS,
)
from relaygate.delivery.mime_split import Attachment, Split, Unsplittable, split_attachments
from relaygate.replies import Reply


def _encoded_size(octets: int) -> int:
    return 4 * ((octets + 2) // 3)


def large_plan(data: bytes) -> Split | Reply | None:
    """How Graph can take `data` (the octets on the wire): None when whole (its base64 within
    the request limit); else without its big attachments (`Split`), or never (the 552 reply:
    what is left without the attachments is still over the limit, or an attachment is over
    150 MB)."""
    encoded = _encoded_size(len(data))
    if encoded <= GRAPH_MAX_REQUEST_OCTETS:
        return None
    split = split_attachments(data, SPLIT_TARGET_OCTETS, GRAPH_MAX_MIME_OCTETS)
    if isinstance(split, Unsplittable):
        return _too_big(f"{len(data)} octets, {encoded} in base64; {split.reason}")
    for part in split.parts:
        if part.estimated_size > GRAPH_MAX_ATTACHMENT_OCTETS:
            return _too_big(f"the attachment {part.name!r} is about {part.estimated_size} octets")
    return Split(_without_dkim_signatures(split.rest), split.parts)


def _without_dkim_signatures(data: bytes) -> bytes:
    """`data` without the DKIM-Signature fields of its header: the parts taken out change the
    body their bh= covers, so each could only fail at the receiver (dkim=fail for the signing
    domain; DMARC then rests on SPF or Exchange Online's own signature)."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return data
    lines = data[: end + 2].split(b"\r\n")[:-1]
    kept: list[bytes] = []
    dropping = False
    for line in lines:
        if line[:1] in (b" ", b"\t"):  # a continuation line: goes with its field
            if not dropping:
                kept.append(line)
            continue
        dropping = line[:15].lower() == b"dkim-signature:"
        if not dropping:
            kept.append(line)
    if len(kept) == len(lines):
        return data
    return b"".join(line + b"\r\n" for line in kept) + data[end + 2 :]


def refusal(mailbox: str, data: bytes) -> Reply | None:
    """Why Graph could never send `data` (the octets on the wire) as `mailbox`, before any call:
    no mailbox (the null sender), or too big even without its attachments (`large_plan`);
    else None."""
    if not mailbox:
        return NO_MAILBOX
    plan = large_plan(data)
    return plan if isinstance(plan, Reply) else None


async def _off_loop(fn: Callable[..., Any], *args: Any, octets: int) -> Any:
    """``fn(*args)`` in a worker thread when it works on more than OFF_LOOP_OCTETS, else here."""
    if octets <= OFF_LOOP_OCTETS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


async def _upload(call: _Caller, url: str, part: Attachment, content: bytes | bytearray) -> None:
    size = len(content)
    if size > GRAPH_MAX_ATTACHMENT_OCTETS:
        raise _GraphError(_too_big(f"the attachment {part.name!r} is {size} octets"))
    item: dict[str, Any] = {
        "name": part.name,
        "contentType": part.content_type,
        "isInline": bool(part.content_id),
    }
    if part.content_id:
        item["contentId"] = part.content_id
    try:
        if size < DIRECT_ATTACHMENT_OCTETS:
            item["@odata.type"] = "#microsoft.graph.fileAttachment"
            encoded = await _off_loop(base64.b64encode, content, octets=size)
            item["contentBytes"] = encoded.decode("ascii")
            await call.request("POST", f"{url}/attachments", expect=(200, 201), json_body=item)
            return
        item.update(attachmentType="file", size=size)
        session = await call.request(
            "POST",
            f"{url}/attachments/createUploadSession",
            expect=(200, 201),
            json_body={"AttachmentItem": item},
        )
    except _GraphError as failure:
        if failure.status == 403:
            raise _GraphError(_with_hint(failure.reply, _UPLOAD_HINT), status=403) from None
        raise
    try:
        upload_url = str(session.json()["uploadUrl"])
    except (ValueError, KeyError, TypeError):
        upload_url = ""
    if urlsplit(upload_url).scheme != "https":
        raise _GraphError(
            Reply(451, "4.4.0", "Microsoft Graph made an upload session without an https uploadUrl")
        )
    view = memoryview(content)
    for start in range(0, size, UPLOAD_CHUNK_OCTETS):
        chunk = view[start : start + UPLOAD_CHUNK_OCTETS]
        await call.request(
            "PUT",
            upload_url,
            expect=(200, 201),
            content=bytes(chunk),  # one chunk's copy at a time
            content_type="application/octet-stream",
            extra={"Content-Range": f"bytes {start}-{start + len(chunk) - 1}/{size}"},
            authorized=False,
        )
