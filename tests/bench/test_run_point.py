"""bench/run.py's run_point against a stand-in relay: a message delivered twice is an error.

The stand-in takes smtp-source's messages (aiosmtpd) and relays each to the benchmark's smtp-sink
`copies` times with smtplib, so the sink counts more messages than were sent when `copies` is 2.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import sys
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from common import Sink, free_port
from run import run_point

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"

pytestmark = pytest.mark.skipif(
    not (os.access(SMTP_SOURCE, os.X_OK) and os.access(SMTP_SINK, os.X_OK)),
    reason="smtp-source and smtp-sink not installed (Debian package postfix; `make debs`)",
)


class Forwarder:
    """aiosmtpd handler: each message to the sink `copies` times."""

    def __init__(self, sink_port: int, copies: int) -> None:
        self.sink_port = sink_port
        self.copies = copies

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        for _ in range(self.copies):
            with smtplib.SMTP("127.0.0.1", self.sink_port, timeout=10) as client:
                client.sendmail(envelope.mail_from, envelope.rcpt_tos, envelope.content)
        return "250 OK"


class StandIn:
    name = "stand-in"

    def __init__(self, sink_port: int, copies: int) -> None:
        self.port = free_port()
        self.controller = Controller(
            Forwarder(sink_port, copies), hostname="127.0.0.1", port=self.port
        )

    def roots(self) -> list[int]:
        return [os.getpid()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("copies", [1, 2])
def test_a_message_delivered_twice_is_reported(tmp_path: Path, copies: int) -> None:
    sink = Sink(tmp_path).start()
    system = StandIn(sink.port, copies)
    system.controller.start()
    try:
        row = run_point(
            system,
            sink,
            size=1024,
            sessions=1,
            messages=20,
            latency_total=5,
            stall=5.0,
            deliver=True,
        )
    finally:
        system.controller.stop()
        sink.stop()
    assert row["accepted_per_s"], row
    duplicates = [e for e in row["errors"] if "more message(s) than were sent" in e]
    if copies == 1:
        assert row["errors"] == [], row["errors"]
    else:
        assert duplicates == ["25 more message(s) than were sent reached the sink"], row["errors"]
