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

The package's modules, each one seam of the above: connector.py (what a send connector says:
is it Graph, scope, mailbox, host), limits.py (Graph's size limits, the relay's thresholds),
recipients.py (header recipients against the envelope, the Message-ID), errors.py (answers as
replies), calls.py (the HTTP calls and URLs), large_messages.py (the split and the uploads),
sent_items.py (the lookup of a send whose answer was lost), drafts.py (one attempt's sendMail or
draft, and what an earlier attempt left), transport.py (the clients and `GraphTransport.deliver`).
Every name the rest of RelayGate uses is imported from here.
"""

from __future__ import annotations

import logging

from relaygate.delivery.graph.connector import (
    DEFAULT_ENDPOINT,
    GRAPH_SCOPE,
    graph_mailbox,
    graph_scope,
    is_graph,
    is_graph_scope,
    route_label,
)
from relaygate.delivery.graph.connector import graph_host as graph_host
from relaygate.delivery.graph.drafts import DraftRecord
from relaygate.delivery.graph.errors import NO_MAILBOX as NO_MAILBOX
from relaygate.delivery.graph.errors import reply_for_status as reply_for_status
from relaygate.delivery.graph.large_messages import large_plan as large_plan
from relaygate.delivery.graph.large_messages import refusal
from relaygate.delivery.graph.limits import DECODED_ATTACHMENTS as DECODED_ATTACHMENTS
from relaygate.delivery.graph.limits import DIRECT_ATTACHMENT_OCTETS as DIRECT_ATTACHMENT_OCTETS
from relaygate.delivery.graph.limits import (
    GRAPH_MAX_ATTACHMENT_OCTETS,
    GRAPH_MAX_MIME_OCTETS,
    GRAPH_MAX_REQUEST_OCTETS,
    UPLOAD_CHUNK_OCTETS,
)
from relaygate.delivery.graph.limits import OFF_LOOP_OCTETS as OFF_LOOP_OCTETS
from relaygate.delivery.graph.limits import SPLIT_TARGET_OCTETS as SPLIT_TARGET_OCTETS
from relaygate.delivery.graph.recipients import RecipientPlan as RecipientPlan
from relaygate.delivery.graph.recipients import message_id as message_id
from relaygate.delivery.graph.recipients import recipient_plan
from relaygate.delivery.graph.sent_items import SENT_ITEMS_PAGES as SENT_ITEMS_PAGES
from relaygate.delivery.graph.sent_items import SENT_ITEMS_SKEW as SENT_ITEMS_SKEW
from relaygate.delivery.graph.sent_items import (
    UNREADABLE_WARNING_INTERVAL as UNREADABLE_WARNING_INTERVAL,
)
from relaygate.delivery.graph.sent_items import sent_items_query as sent_items_query
from relaygate.delivery.graph.transport import GraphOutcome, GraphTransport

#: The logger every module of the package logs to (as graph.py did before the split).
log = logging.getLogger("relaygate.delivery.graph")

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
