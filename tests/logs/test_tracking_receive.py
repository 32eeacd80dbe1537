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
