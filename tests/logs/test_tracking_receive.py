"""The message tracking log's RECEIVE event, written by a real `relaygate serve`."""

from __future__ import annotations

from collections.abc import Callable

from tests.logs.test_address_privacy import (  # noqa: F401
    Sink,
    send,
    sent,
    sink,
    start,
    wait_for_rows,
)
from tests.smtp.conftest import RelayHandle, relay  # noqa: F401


def test_receive_names_the_server_ip_the_client_reached(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    """Exchange's RECEIVE event has server-ip, the local address the client connected to
    (Get-MessageTrackingLog's ServerIp); it was left empty."""
    node = start(relay, sink)
    send(node, "SRVIP-1", refused=False)
    rows = wait_for_rows(node, sent("SRVIP-1"))
    (received,) = [r for r in rows if r["event-id"] == "RECEIVE"]
    assert received["client-ip"] == "127.0.0.5"
    assert received["server-ip"] == "127.0.0.1", received


def test_receive_carries_the_message_subject(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    """Exchange's RECEIVE event has message-subject (Get-MessageTrackingLog -MessageSubject finds
    a message that is still in the queue, or was never sent); it was left empty. Subject logging
    turned off leaves it out here as in SEND (test_address_privacy)."""
    node = start(relay, sink)
    send(node, "SUBJ-RCV-1", subject="Scan from MFP-3 SUBJ-RCV-1", refused=False)
    rows = wait_for_rows(node, sent("SUBJ-RCV-1"))
    (received,) = [r for r in rows if r["event-id"] == "RECEIVE"]
    assert received["message-subject"] == "Scan from MFP-3 SUBJ-RCV-1", received
