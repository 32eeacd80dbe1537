"""Delivery through Microsoft Graph's ``sendMail`` instead of SMTP (``delivery_method = "Graph"``).

Many Microsoft 365 tenants turn SMTP AUTH off; an Entra ID app with the ``Mail.Send`` application
permission can still send as a mailbox over HTTPS. The message goes as the relay would send it over
SMTP (Received header, send_as rewriting, DKIM signature: the manager prepares the same bytes),
base64-encoded MIME with ``Content-Type: text/plain`` and the connector's OAuth token (client
credentials, scope ``https://graph.microsoft.com/.default``, reusing `OAuthTokenProvider`).

Graph takes the recipients from the MIME header (To, Cc, Bcc), not from an envelope, so:

* when the addresses of To, Cc and Bcc are exactly the route's envelope recipients (a printer
  mailing one address), one ``POST /users/{mailbox}/sendMail`` with the message as it is;
* otherwise a draft is made from the MIME (``POST /users/{mailbox}/messages``), its
  toRecipients / ccRecipients / bccRecipients are set to (To ∩ envelope, Cc ∩ envelope, the rest of
  the envelope), and it is sent (``POST .../messages/{id}/send``). Header recipients that are not
  envelope recipients of this route are not in the copy Graph sends (another route, or nobody,
  delivers to them). A failure after the draft exists deletes it (best effort); it is transient
  or permanent as one before the draft, but for a 404 (the draft or its upload session gone:
  transient).

Answers become SMTP-style replies so that the queue records them as it records an SMTP server's:
202 → 250 for every recipient; 429, 5xx, timeouts and connection errors → 4xx (Retry-After is a
lower bound on the next attempt); 401 → the cached token is dropped and the call made once more,
then 4xx; 400 / 403 / 404 / 413 → 5xx with Graph's error code and message. The token is never
logged nor put in a reply.

A message whose base64 form would pass Graph's 4 MB request limit (a scanner's big PDF) takes the
large-message path: its biggest attachment parts are taken out (`relaygate.delivery.mime_split`)
until the rest is under 2 MiB; a draft is made from the rest (a faithful copy of its headers and
body, but for its DKIM signatures: the cut breaks them); each part is attached through an upload session (``POST .../messages/{id}/attachments/
createUploadSession``, then its octets PUT to the session's pre-authenticated ``uploadUrl``, which
never gets the token, in chunks of 3,200 KiB, a multiple of 320 KiB, with Content-Range), or in
one ``POST .../attachments`` when under 3 MB (as Microsoft's documentation advises); the
draft's recipients are set to the envelope's as above, and it is sent. A failure once the draft
exists deletes it; 429 / 5xx / timeouts / 404 are transient (Retry-After kept), other 4xx
permanent with Graph's error. A message that cannot be split so (a text body alone over the limit, an attachment
over Graph's 150 MB) is refused before any call (552 5.3.4). The split and the decoding of the
attachments run in a worker thread (`_off_loop`), at most DECODED_ATTACHMENTS held at once.

A draft is remembered between attempts (`DraftRecord`: the queue store), so that a send whose
outcome is unknown (a timeout, the connection dropped, a 5xx) is looked up before it is sent
again, and a draft a crash left behind is deleted (`_DraftJob`). A plain sendMail is remembered
too, before it is sent (no draft id, the message's Message-ID: `message_id`), and forgotten once
its outcome is known (a 202's record with the stored result: the queue store drops it in the
transaction that finishes the message); one whose answer was lost (or whose process was killed
meanwhile) is looked up in the mailbox's Sent Items by internetMessageId (``GET .../mailFolders/
sentitems/messages?$filter=internetMessageId eq '<id>'``, `sent_items_query`, every page) before
anything is sent again: a copy naming one of the route's recipients, created after the message
reached the queue (`SENT_ITEMS_SKEW`), is the message sent (delivered, "confirmed by lookup");
none, or a lookup refused for good (403: no Mail.ReadBasic.All / Mail.Read; no Sent Items
folder), and it is sent again (Sent Items can lag behind the 202, and a copy that never reaches
it is never found: then a duplicate, as before the lookup); another failure (429, 5xx, no
answer, a 404 about the mailbox) defers the attempt, nothing sent. A draft whose lookup by id
answers 404 ErrorItemNotFound is checked against Sent Items the same way: a purged draft that
never went is sent, not recorded delivered. The relay adds no Message-ID: a message without one
is not remembered, and a lost answer to its sendMail is followed by another sendMail.
"""

from __future__ import annotations

import asyncio
import base64
import email.header
import email.utils
import json
import logging
import re
import ssl
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from email.parser import HeaderParser
from email.policy import compat32
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

from relaygate.addresses import ascii_domain
from relaygate.delivery.mime_split import Attachment, Split, Unsplittable, split_attachments
from relaygate.delivery.oauth import DEFAULT_SCOPE, TokenError
from relaygate.logs.privacy import AddressPrivacy
from relaygate.replies import Reply

__all__ = [
    "DEFAULT_ENDPOINT",
    "GRAPH_MAX_ATTACHMENT_OCTETS",
    "GRAPH_MAX_MIME_OCTETS",
    "GRAPH_MAX_REQUEST_OCTETS",
    "GRAPH_SCOPE",
    "UPLOAD_CHUNK_OCTETS",
    "DraftRecord",
    "GraphOutcome",
    "GraphTransport",
    "graph_mailbox",
    "graph_scope",
    "is_graph",
    "is_graph_scope",
    "recipient_plan",
    "refusal",
    "route_label",
]

log = logging.getLogger("relaygate.delivery.graph")
# httpx's request lines (an upload URL carries its own authorization) are held back by the
# service log's setup, in every process: relaygate.logs.service.QUIET_LOGGERS.

DEFAULT_ENDPOINT = "https://graph.microsoft.com/v1.0"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"
#: Graph's limit on one REST request (4 MB); the MIME goes base64-encoded (4 octets per 3).
GRAPH_MAX_REQUEST_OCTETS = 4 * 1024 * 1024
#: The biggest message that fits: 3 MiB of MIME is exactly 4 MiB of base64.
GRAPH_MAX_MIME_OCTETS = GRAPH_MAX_REQUEST_OCTETS // 4 * 3
#: The biggest file attachment an upload session takes (150 MB).
GRAPH_MAX_ATTACHMENT_OCTETS = 150 * 1024 * 1024
#: A bigger message goes without its big attachments: the draft made of the rest stays well
#: under the request limit (its base64 under 2.7 MiB).
SPLIT_TARGET_OCTETS = 2 * 1024 * 1024
#: One PUT to an upload URL: a multiple of 320 KiB (Graph's unit), at most 4 MB.
UPLOAD_CHUNK_OCTETS = 10 * 320 * 1024
#: An attachment under 3 MB goes in one POST (its base64 in JSON, under the request limit), as
#: Microsoft's documentation says; upload sessions are for 3 to 150 MB.
DIRECT_ATTACHMENT_OCTETS = 3_000_000
#: Messages at most this big are split and their attachments decoded on the event loop (a few
#: milliseconds); bigger ones in a worker thread (`_off_loop`): a 100 MB attachment's base64
#: takes ~0.5 s to decode, during which no SMTP session would get a reply.
OFF_LOOP_OCTETS = 1024 * 1024
#: Decoded attachments held at once by all the Graph deliveries of the process (each up to
#: 150 MB, for as long as its upload lasts): a burst of big scans waits its turn rather than
#: taking the memory of them all.
DECODED_ATTACHMENTS = 2

#: The Graph hosts of Microsoft's clouds (global, US Government L4/L5, China, Germany).
_GRAPH_HOSTS = frozenset(
    {
        "graph.microsoft.com",
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
        "graph.microsoft.de",
    }
)

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: The message's Message-ID field (its value folded onto the next line too), in the header.
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(?:\r\n[ \t]+)?(<[^<>\s]{1,900}>)", re.IGNORECASE | re.MULTILINE
)
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


def is_graph(connector: Any) -> bool:
    return getattr(connector, "delivery_method", "SMTP") == "Graph"


def is_graph_scope(scope: str, endpoint: str = DEFAULT_ENDPOINT) -> bool:
    """The scope a Graph connector may ask for: left at Exchange's default (→ Graph's), or
    ``https://<a Graph host, or graph_endpoint's host>/.default``."""
    if not scope or scope == DEFAULT_SCOPE:
        return True
    url = urlsplit(scope)
    host = (url.hostname or "").lower()
    return (
        url.scheme == "https"
        and url.path == "/.default"
        and (host in _GRAPH_HOSTS or host == (urlsplit(endpoint).hostname or "").lower())
    )


def graph_scope(connector: Any) -> str:
    """The token scope of a Graph connector (oauth_scope at Exchange's default → Graph's)."""
    scope = str(getattr(connector, "oauth_scope", "") or "")
    return GRAPH_SCOPE if not scope or scope == DEFAULT_SCOPE else scope


def graph_mailbox(connector: Any, sender: str) -> str:
    """The mailbox whose sendMail is called: graph_mailbox, else send_as, else the sender."""
    return (
        str(getattr(connector, "graph_mailbox", "") or "")
        or str(getattr(connector, "send_as", "") or "")
        or ("" if sender in ("", "<>") else sender)
    )


def route_label(connector: Any) -> str:
    """How `explain`, the queue and the CLI name a Graph route."""
    mailbox = (
        str(getattr(connector, "graph_mailbox", "") or "")
        or str(getattr(connector, "send_as", "") or "")
        or "of the envelope sender"
    )
    return f"Microsoft Graph (mailbox {mailbox})"


def graph_host(connector: Any) -> str:
    return (
        urlsplit(str(getattr(connector, "graph_endpoint", "") or DEFAULT_ENDPOINT)).hostname or ""
    )


# ==================================================================================================
# recipients


def _decoded(name: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(name)))
    except Exception:  # a malformed encoded word: the raw text
        return name


def _header_addresses(data: bytes, names: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    end = data.find(b"\r\n\r\n")
    head = data if end < 0 else data[: end + 4]
    # Read as UTF-8 (RFC 6532, SMTPUTF8): as ASCII, an 8-bit address never matched its envelope
    # recipient and names came out as U+FFFD.
    parsed = HeaderParser(policy=compat32).parsestr(head.decode("utf-8", "replace"))
    out: dict[str, list[tuple[str, str]]] = {}
    for name in names:
        values = [str(v) for v in parsed.get_all(name, [])]
        out[name] = [
            (_decoded(display), address.strip())
            for display, address in email.utils.getaddresses(values)
            if "@" in address
        ]
    return out


@dataclass(frozen=True)
class RecipientPlan:
    """The recipients Graph must send this route's copy to (each (display name, address))."""

    to: list[tuple[str, str]]
    cc: list[tuple[str, str]]
    bcc: list[tuple[str, str]]


def recipient_plan(
    data: bytes, recipients: Sequence[str], *, always: bool = False
) -> RecipientPlan | None:
    """None when the header's To, Cc and Bcc addresses are exactly `recipients` (sendMail as it
    is) and not `always`; else the recipient lists for a draft: To ∩ envelope, Cc ∩ envelope,
    envelope − To − Cc. Addresses compare case-insensitively."""
    wanted = {r.casefold(): r for r in recipients}
    found = _header_addresses(data, ("To", "Cc", "Bcc"))
    in_header = {a.casefold() for field_ in found.values() for _n, a in field_}
    if in_header == set(wanted) and not always:
        return None
    taken: set[str] = set()

    def keep(entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
        out = []
        for display, address in entries:
            key = address.casefold()
            if key in wanted and key not in taken:
                taken.add(key)
                out.append((display, address))
        return out

    to = keep(found["To"])
    cc = keep(found["Cc"])
    bcc = [("", r) for key, r in wanted.items() if key not in taken]
    return RecipientPlan(to, cc, bcc)


def message_id(data: bytes) -> str:
    """The Message-ID of `data` (the octets on the wire), with its angle brackets, or "": what
    Graph keeps as the sent copy's internetMessageId. The relay adds none to a message that
    has none (a lost answer to such a message's sendMail is not looked up: sent again)."""
    end = data.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(data, 0, len(data) if end < 0 else end + 2)
    if found is None:
        return ""
    try:
        return found.group(1).decode("utf-8")  # RFC 6532 allows UTF-8 in it
    except UnicodeDecodeError:
        return ""


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


def _recipients_json(entries: list[tuple[str, str]]) -> list[dict[str, Any]]:
    out = []
    for display, address in entries:
        mail: dict[str, str] = {"address": address}
        if display:
            mail["name"] = display
        out.append({"emailAddress": mail})
    return out


# ==================================================================================================
# replies


@dataclass
class GraphOutcome:
    """One attempt's result: a reply per recipient, as `DeliveryOutcome` has.

    retry_after: Graph's Retry-After in seconds (a lower bound on the next attempt), when given.
    host: the Graph host (the tracking log's server-hostname).
    """

    per_recipient: dict[str, Reply]
    host: str = ""
    retry_after: float | None = None
    errors: list[str] = field(default_factory=list)


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


# ==================================================================================================
# the draft an attempt leaves behind


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


async def _off_loop(fn: Callable[..., Any], *args: Any, octets: int) -> Any:
    """``fn(*args)`` in a worker thread when it works on more than OFF_LOOP_OCTETS, else here."""
    if octets <= OFF_LOOP_OCTETS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)


# ==================================================================================================
# the transport


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class GraphTransport:
    """The HTTP clients of the Graph send connectors (one per endpoint and CA file, kept alive
    between messages). ``aclose`` when the manager stops or the connectors change."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = asyncio.Lock()
        self._busy = 0  # deliveries in flight
        self._idle = asyncio.Event()
        self._idle.set()
        #: DECODED_ATTACHMENTS: taken while a decoded attachment is held (decode and upload)
        self._decoded = asyncio.Semaphore(DECODED_ATTACHMENTS)
        #: when each mailbox's Sent Items was last found unreadable, as warned about (monotonic)
        self._unreadable: dict[str, float] = {}

    async def _client(self, connector: Any) -> Any:
        import httpx  # imported on first use: only Graph connectors need it

        ca = getattr(connector, "tls_ca_file", None)
        key = (graph_host(connector), str(ca) if ca else "")
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                # Loading the trust store takes ~20 ms: not on the event loop.
                ctx = await asyncio.to_thread(_tls_context, key[1] or None)
                # trust_env: HTTPS_PROXY / NO_PROXY as msal's token requests honour them (a
                # network whose only way out is a proxy); the trust store stays ctx.
                client = self._clients[key] = httpx.AsyncClient(
                    verify=ctx, follow_redirects=False, trust_env=True
                )
            return client

    async def retire(self) -> None:
        """Close the clients once the deliveries in flight are over (a reload: cutting a request
        Graph may already have acted on would send the message again at the retry)."""
        try:
            await self._idle.wait()
        finally:  # cancelled (a stop past its grace): closed all the same
            await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - closing must never raise
                pass

    async def deliver(
        self,
        connector: Any,
        *,
        token_provider: Callable[[], Awaitable[str]] | None,
        mailbox: str,
        recipients: Iterable[str],
        data: bytes,
        timeout: float,
        log_privacy: AddressPrivacy | None = None,
        drafts: DraftRecord | None = None,
    ) -> GraphOutcome:
        """One attempt for `recipients` through Graph (see the module docstring).
        ``log_privacy``: ``server.log_address_privacy`` for the service log's lines, which name the
        mailbox (the envelope sender when no graph_mailbox or send_as is set). ``drafts``: where
        the draft of this route is remembered between attempts (None: not at all)."""
        self._busy += 1
        self._idle.clear()
        try:
            return await self._deliver(
                connector,
                token_provider=token_provider,
                mailbox=mailbox,
                recipients=recipients,
                data=data,
                timeout=timeout,
                log_privacy=log_privacy,
                drafts=drafts,
            )
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _deliver(
        self,
        connector: Any,
        *,
        token_provider: Callable[[], Awaitable[str]] | None,
        mailbox: str,
        recipients: Iterable[str],
        data: bytes,
        timeout: float,
        log_privacy: AddressPrivacy | None = None,
        drafts: DraftRecord | None = None,
    ) -> GraphOutcome:
        rcpts = list(dict.fromkeys(recipients))
        host = graph_host(connector)
        outcome = GraphOutcome(per_recipient={}, host=host)
        if not rcpts:
            return outcome

        def every(reply: Reply) -> GraphOutcome:
            outcome.per_recipient = {r: reply for r in rcpts}
            return outcome

        if not mailbox:
            return every(NO_MAILBOX)
        large = await _off_loop(large_plan, data, octets=len(data))
        if isinstance(large, Reply):
            return every(large)
        if token_provider is None:  # pragma: no cover - the manager builds one per connector
            return every(Reply(451, "4.7.0", "Microsoft Graph: no token provider"))
        if large is None:
            plan = recipient_plan(data, rcpts)
            body = base64.b64encode(data)
        else:  # the draft path always, its recipients set from the envelope
            plan = recipient_plan(data, rcpts, always=True)
            body = base64.b64encode(large.rest)
        client = await self._client(connector)
        base = str(getattr(connector, "graph_endpoint", "") or DEFAULT_ENDPOINT).rstrip("/")
        user = _user_url(base, mailbox)
        logged = mailbox if log_privacy is None else log_privacy.text(mailbox)
        msg_id = message_id(data)
        refreshed = False
        while True:
            try:
                token = await token_provider()
            except TokenError as exc:
                log.error("%s", exc)
                outcome.errors.append(str(exc))
                return every(
                    Reply(451, "4.7.0", f"SMTPSEND.Auth.TokenUnavailable; {_clean(str(exc))}")
                )
            call = _Caller(client, token, mailbox, timeout)
            job = _DraftJob(call, base, drafts, self._decoded, logged, msg_id, rcpts)
            job.unreadable = self._unreadable
            try:
                if large is not None and plan is not None:
                    how = await job.run(user, body, plan, data, large.parts)
                elif plan is None:
                    how = await job.send_mail(user, body)
                else:
                    how = await job.run(user, body, plan)
            except _GraphError as failure:
                if failure.status == 401 and not refreshed:
                    refreshed = True
                    log.info("Microsoft Graph refused the token for %s; asking a new one", logged)
                    await _invalidate(token_provider)
                    continue
                line = failure.reply.line()
                if log_privacy is not None:
                    line = log_privacy.text(line)
                log.info("Microsoft Graph delivery as %s failed: %s", logged, line)
                outcome.errors.append(f"{host}: {failure.reply.line()}")
                outcome.retry_after = failure.retry_after
                return every(failure.reply)
            if how == _CONFIRMED:
                return every(
                    Reply(
                        250,
                        "2.6.0",
                        f"Microsoft Graph had sent the {job.what} of an earlier attempt whose "
                        f"answer was lost (confirmed by lookup: {job.confirmed}; as {job.mailbox})",
                    )
                )
            return every(
                Reply(250, "2.6.0", f"202 Accepted by Microsoft Graph ({how} as {mailbox})")
            )


async def _invalidate(token_provider: Any) -> None:
    invalidate = getattr(token_provider, "invalidate", None)
    if invalidate is not None:
        await invalidate()


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


def _comparable_address(address: str) -> str:
    """One spelling of `address` for comparing the envelope's (its domain an A-label, as the
    parser keeps it) with Graph's (Exchange Online may name an internationalised domain in
    Unicode): the domain's labels as A-labels, all of it case-folded."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address.casefold()
    return f"{local}@{ascii_domain(domain)}".casefold()


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


_CONFIRMED = "confirmed"
#: What a Sent Items lookup tells (`_DraftJob._in_sent_items`).
_FOUND, _ABSENT, _CANNOT = "found", "absent", "cannot"


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


class _DraftJob:
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
