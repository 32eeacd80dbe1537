"""A protocol or tracking log that cannot be written (a full disk, a folder that cannot be
made): a real `relaygate serve` keeps relaying and says so once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tests.logs.test_address_privacy import (  # noqa: F401
    RECIPIENT,
    Sink,
    send,
    sink,
    write_config,
)
from tests.smtp.conftest import RelayHandle, relay, relay_connector  # noqa: F401


def wait_for_text(path: Path, text: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
        if text in content:
            return content
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never written; {path.name}:\n{content}")


def test_logs_that_cannot_be_written_are_said_once_and_mail_flows(
    relay: Callable[..., RelayHandle],  # noqa: F811
    sink: Sink,  # noqa: F811
) -> None:
    """`<data_dir>/logs` is a file: neither the protocol log nor the tracking log can make its
    folder. The messages are relayed all the same, and the service log says once per log that
    it cannot be written; it said so for every batch (five times a second on a busy relay, each
    line naming the lines lost)."""
    conn = relay_connector(["127.0.0.5"], allowed_recipients=[RECIPIENT])
    node = relay([conn], mode="process", start=False, server={"message_tracking_log_enabled": True})
    node.doc["send_connectors"][0]["port"] = sink.controller.port
    write_config(node)
    node.data_dir.mkdir(parents=True, exist_ok=True)
    (node.data_dir / "logs").write_text("not a folder")
    node.start()
    receive_log = node.data_dir / "logs" / "ProtocolLog" / "SmtpReceive"
    tracking_log = node.data_dir / "logs" / "MessageTracking"

    send(node, "NOLOG-1", refused=False)
    assert sink.wait_for(b"NOLOG-1")[1] == [RECIPIENT]
    for folder in (receive_log, tracking_log):
        wait_for_text(node.stderr_path, f"log {folder}:")
    # A second session's lines: a later batch of each log, which fails too.
    send(node, "NOLOG-2", refused=False)
    assert sink.wait_for(b"NOLOG-2")[1] == [RECIPIENT]
    node.stop()  # its last lines are written (tried) at the stop
    stderr = node.stderr_path.read_text(encoding="utf-8", errors="replace")
    for folder in (receive_log, tracking_log):
        said = [line for line in stderr.splitlines() if f"log {folder}:" in line]
        assert len(said) == 1, said
        assert "Not a directory" in said[0] and "mail is relayed as usual" in said[0], said
