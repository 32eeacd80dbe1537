"""bench/floor_server.py keeps SMTP's reply order: the benchmark's floor must do a relay's real work,
so a message's 250 comes only after its journal write, and commands pipelined behind the final
dot wait for it."""

from __future__ import annotations

import asyncio
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    return free_port()  # below the ephemeral range: tests/support/ports.py


def _read_until(sock: socket.socket, end: bytes, timeout: float = 10.0) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while not buf.endswith(end):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
    return buf


@pytest.mark.timeout(60)
def test_pipelined_commands_wait_for_the_messages_250_and_the_journal_holds_it(
    tmp_path: Path,
) -> None:
    port = _free_port()
    script = ROOT / "bench" / "floor_server.py"
    args = ["--port", str(port), "--dir", str(tmp_path), "--workers", "1"]
    server = subprocess.Popen([sys.executable, str(script), *args])
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "floor_server did not listen"
                time.sleep(0.05)
        with sock:
            assert _read_until(sock, b"\r\n").startswith(b"220 ")
            sock.sendall(b"EHLO t\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n")
            assert _read_until(sock, b"354 End data with <CR><LF>.<CR><LF>\r\n").count(b"\r\n") == 6
            sock.sendall(b"Subject: one\r\n\r\nbody one\r\n.\r\nMAIL FROM:<e@f.example>\r\n")
            assert _read_until(sock, b"OK\r\n") == b"250 2.0.0 Queued\r\n250 2.0.0 OK\r\n"
            sock.sendall(b"RCPT TO:<c@d.example>\r\nDATA\r\n.\r\nQUIT\r\n")
            assert _read_until(sock, b"Bye\r\n") == (
                b"250 2.0.0 OK\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                b"250 2.0.0 Queued\r\n221 2.0.0 Bye\r\n"
            )
    finally:
        server.terminate()
        server.wait(timeout=10)
    journal = b"".join(p.read_bytes() for p in tmp_path.glob("journal-*"))
    assert journal == b"Subject: one\r\n\r\nbody one\r\n.\r\n.\r\n"


PARTS_CONFIG = """\
[server]
name = "FLOOR01"
fqdn = "floor.test"
data_dir = "{data}"

[admin]
enabled = false

[[accepted_domains]]
domain = "corp.example"
domain_type = "Authoritative"

[[receive_connectors]]
name = "Floor Relay"
usage = "Custom"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
protocol_logging_level = "Verbose"

[[send_connectors]]
name = "Floor sink"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1"]
port = {sink_port}
"""


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _text_of(directory: Path) -> str:
    return "".join(p.read_text() for p in directory.glob("*.LOG")) if directory.exists() else ""


@pytest.mark.timeout(90)
def test_floor_with_relaygates_parts_decides_logs_stores_and_delivers(tmp_path: Path) -> None:
    """`--parts all`: RelayGate's own policy (an anonymous connector without the relay right refuses
    a remote recipient), protocol and tracking logs, and queue store (the message is Delivered in
    it after the sink took it) run on the floor's path."""
    from relaygate.queue.model import RecipientStatus
    from relaygate.queue.sqlite_store import SqliteStore
    from tests.cli_admin.helpers import Recorder, SMTPServer

    port = _free_port()
    work = tmp_path / "floor"
    work.mkdir()
    with SMTPServer(Recorder()) as sink:
        config = tmp_path / "relaygate.toml"
        config.write_text(
            PARTS_CONFIG.format(data=tmp_path / "data", port=port, sink_port=sink.port)
        )
        args = ["--port", str(port), "--dir", str(work), "--workers", "1", "--parts", "all"]
        args += ["--config", str(config), "--smart-host", f"127.0.0.1:{sink.port}"]
        server = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floor_server.py"), *args])
        try:
            _wait_for(lambda: _listening(port), "floor_server to listen", 20)
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
                client.ehlo("printer.corp.example")
                assert client.mail("scanner@corp.example")[0] == 250
                code, text = client.rcpt("someone@elsewhere.example")
                assert (code, text) == (
                    550,
                    b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
                )
                assert client.rcpt("alice@corp.example")[0] == 250
                code, text = client.data(
                    b"Subject: parts\r\nMessage-ID: <p1@corp.example>\r\n\r\nhi\r\n"
                )
                assert code == 250 and b"InternalId=" in text, text
                queue_id = text.split(b"InternalId=")[1].split(b",")[0].decode()
            _wait_for(lambda: len(sink.handler.messages) == 1, "the sink to receive the message")
            delivered = sink.handler.messages[0]
            assert delivered["to"] == ["alice@corp.example"]
            assert delivered["data"].startswith("Received: from printer.corp.example ([127.0.0.1])")
            assert "by floor.test (RelayGate; Floor Relay)" in delivered["data"]
            tracking = work / "MessageTracking"
            _wait_for(lambda: ",SEND," in _text_of(tracking), "the SEND tracking event")
            assert f",RECEIVE,{queue_id}," in _text_of(tracking)
            protocol = work / "ProtocolLog"
            _wait_for(lambda: "TO:<someone@elsewhere.example>" in _text_of(protocol), "the log")
            assert "550 5.7.54 SMTP; Unable to relay recipient" in _text_of(protocol)
        finally:
            server.terminate()
            server.wait(timeout=10)

    async def stored() -> RecipientStatus:
        store = SqliteStore(work / "queue" / "queue.db")
        async with store:
            msg = await store.get(queue_id)
        assert msg is not None and [r.address for r in msg.recipients] == ["alice@corp.example"]
        return msg.recipients[0].status

    assert asyncio.run(stored()) == RecipientStatus.DELIVERED


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True
