"""NUL octets in a message's header and body (security-bar item 149), end to end: a real
`relaygate serve`, a raw client, a real SMTP sink (aiosmtpd) as the smart host, and the protocol
and tracking log files as they are on disk. The policy (README, "Receiving"): accepted and stored
as sent, removed on delivery, so a C-based next hop never sees one to truncate at."""

from __future__ import annotations

from collections.abc import Callable

from tests.logs.test_address_privacy import (  # noqa: F401
    RECIPIENT,
    SENDER,
    Sink,
    log_texts,
    sent,
    sink,
    start,
    wait_for_rows,
)
from tests.smtp.conftest import RelayHandle, relay  # noqa: F401

HEADER = (
    f"From: {SENDER}\r\nTo: {RECIPIENT}\r\n".encode()
    + b"Subject: NUL-1 in the sub\x00ject\r\nX-Nul: a\x00b\r\n\r\n"
)
# A NUL inside a line, a line that is only a NUL, and "\r\n\x00.\r\n": stripped carelessly (a NUL
# removed after dot-stuffing) it would end the data early at the next hop.
BODY = b"body with a \x00 in it\r\n\x00\r\n\x00.\r\nafter the NUL-dot line\r\n"


def test_a_nul_is_accepted_stored_as_sent_and_never_reaches_the_next_hop(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    node = start(relay, sink)
    with node.raw("127.0.0.5") as c:
        c.greet()
        c.cmd(f"MAIL FROM:<{SENDER}>", 250)
        c.cmd(f"RCPT TO:<{RECIPIENT}>", 250)
        c.cmd("DATA", 354)
        c.send(HEADER + BODY + b".\r\n")
        accepted = c.expect(250).text
        c.cmd("QUIT", 221)
    assert accepted.startswith("250 2.6.0 "), accepted

    rows = wait_for_rows(node, sent("NUL-1"))
    _, recipients, delivered = sink.wait_for(b"NUL-1")
    assert recipients == [RECIPIENT]
    assert b"\x00" not in delivered
    # Only the NULs are gone: every other octet, the line made of a NUL included (now empty), and
    # the NUL-dot line as "." (sent stuffed as "..", so the next hop's data did not end there).
    nul_free = (HEADER + BODY).replace(b"\x00", b"")
    assert delivered.endswith(nul_free), delivered[-300:]

    # The tracking log: received, then sent, nothing refused, deferred or failed; the subject (on
    # SEND: RECEIVE logs none) with its control octets removed, as header_value does for any.
    (send,) = [r for r in rows if r["event-id"] == "SEND"]
    assert send["message-subject"] == "NUL-1 in the subject"
    assert send["recipient-status"] == ["250 2.0.0 Ok: queued"]
    queue_id = send["internal-message-id"]
    events = [r["event-id"] for r in rows if r["internal-message-id"] == queue_id]
    assert events == ["RECEIVE", "SEND"], events
    # Stored as sent: the queue keeps the NULs (the size logged is the size received).
    assert HEADER + BODY in node.data(queue_id)
    # The logs are text: no NUL written raw; the protocol log shows the 250, not an error.
    texts = log_texts(node)
    assert texts and not any("\x00" in text for text in texts.values())
    protocol = "".join(text for name, text in texts.items() if name.startswith("RECV"))
    assert accepted in protocol
    assert ",500 " not in protocol and ",554 " not in protocol
