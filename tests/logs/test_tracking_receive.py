"""The message tracking log's RECEIVE event, written by a real `relaygate serve`."""

from __future__ import annotations

import json
from collections.abc import Callable

from tests.logs.test_address_privacy import (  # noqa: F401
    Sink,
    cli,
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


def test_a_subject_longer_than_the_csv_field_limit_hides_no_event(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    """The reader's csv module refuses a field over 128 KiB ("field larger than field limit") and
    search() took that for damage and stopped reading the file: a sender's 200 KB Subject hid its
    own events and every event after them in the hour's file from `relaygate trace` (a message
    sent later in the hour was never found). Both are found, the long subject whole."""
    node = start(relay, sink)
    # Folded: each header line well under 998 octets, 200 KB unfolded.
    long_subject = "\r\n ".join(["HUGE-1"] + ["y" * 900] * 222)
    send(node, "HUGE-1", subject=long_subject, refused=False)
    send(node, "AFTER-HUGE-2", refused=False)
    sink.wait_for(b"AFTER-HUGE-2")
    rows = wait_for_rows(node, sent("AFTER-HUGE-2"))
    events = [(r["event-id"], r["message-subject"][:12]) for r in rows]
    assert ("RECEIVE", "HUGE-1 yyyyy") in events, events
    assert ("SEND", "HUGE-1 yyyyy") in events, events
    unfolded = long_subject.replace("\r\n", "")
    assert [r["message-subject"] for r in rows if "HUGE-1" in r["message-subject"]] == [
        unfolded,
        unfolded,
    ]
    # The command an administrator runs reads the same.
    result = cli("trace", "--json", "--log-dir", str(node.data_dir / "logs" / "MessageTracking"))
    assert result.returncode == 0, result.stderr
    subjects = [r["message-subject"] for r in json.loads(result.stdout)]
    assert subjects.count(unfolded) == 2, [s[:12] for s in subjects]
    assert subjects.count("Invoice AFTER-HUGE-2 for dave.subject@corp.example") == 2, subjects


def test_a_report_for_two_recipients_has_one_status_for_its_one_recipient(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    """The DSN event's recipient-status named the failed recipients joined by ";", the separator
    of the field's own values: a report on two recipients read back as two statuses for its one
    recipient (the sender), and `relaygate trace` showed the second address as a status."""
    node = start(relay, sink)
    with node.smtp("127.0.0.5") as c:
        c.sendmail(
            "erp@corp.example",
            ["gone.a@corp.example", "gone.b@corp.example"],
            b"Subject: TWO-GONE\r\n\r\nTWO-GONE\r\n",
        )
    rows = wait_for_rows(node, lambda rs: "DSN" in {r["event-id"] for r in rs})
    dsn = next(r for r in rows if r["event-id"] == "DSN")
    assert dsn["recipient-address"] == ["erp@corp.example"]
    assert dsn["recipient-count"] == 1
    assert dsn["recipient-status"] == ["failed: gone.a@corp.example, gone.b@corp.example"], dsn
    assert dsn["related-recipient-address"] == "gone.a@corp.example;gone.b@corp.example"
