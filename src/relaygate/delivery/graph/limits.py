"""Graph's size limits and the relay's own thresholds for big messages (in octets).

A leaf module: the error replies, the large-message path and the transport all quote them.
"""

from __future__ import annotations

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
