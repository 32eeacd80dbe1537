"""bench/floor_server.py keeps SMTP's reply order: the benchmark's floor must do a relay's real work,
so a message's 250 comes only after its journal write, and commands pipelined behind the final
dot wait for it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
