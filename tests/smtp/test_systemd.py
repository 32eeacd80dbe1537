"""`relaygate serve` under systemd (`Type=notify`, packaging/relaygate.service): real processes
notifying a datagram socket the test holds as systemd would ($NOTIFY_SOCKET), with the sender's
pid from SCM_CREDENTIALS (systemd's NotifyAccess=main accepts only the process it started)."""

from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.smtp.conftest import ROOT, relay_connector

UNIT = ROOT / "packaging" / "relaygate.service"


class NotifySocket:
    """The receiving end of $NOTIFY_SOCKET: (pid, fields) of every message, in order."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.messages: list[tuple[int, dict[str, str]]] = []

    def wait_for(self, field: str, timeout: float = 20, after: int = 0) -> int:
        """Index of the first message from ``after`` on holding ``field`` (``"READY=1"``)."""
        deadline = time.monotonic() + timeout
        while True:
            for i in range(after, len(self.messages)):
                key, _, value = field.partition("=")
                if self.messages[i][1].get(key) == value:
                    return i
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {field} in {self.messages}")
            self.sock.settimeout(left)
            try:
                data, ancdata, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except TimeoutError:
                continue
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((pid, fields))

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_tells_systemd_ready_reloading_stopping_and_pings_the_watchdog(
    relay: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    notify = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # WatchdogSec=0.4: a ping every 0.2 s
    try:
        node = relay(
            [relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": workers}
        )
        main = node.proc.pid
        ready = notify.wait_for("READY=1")
        assert notify.messages[ready][1]["STATUS"].startswith("RelayGate ready: SMTP 127.0.0.1:")
        with node.smtp() as client:  # READY=1 came once the listener accepts
            client.sendmail("scanner@corp.example", ["user@corp.example"], b"Subject: t\r\n\r\nx")

        first = notify.wait_for("WATCHDOG=1", timeout=5)
        second = notify.wait_for("WATCHDOG=1", timeout=5, after=first + 1)
        assert second > first

        node.proc.send_signal(signal.SIGHUP)  # systemctl reload
        reloading = notify.wait_for("RELOADING=1", after=second + 1)
        assert int(notify.messages[reloading][1]["MONOTONIC_USEC"]) > 0
        notify.wait_for("READY=1", after=reloading + 1)

        node.proc.send_signal(signal.SIGTERM)  # systemctl stop
        notify.wait_for("STOPPING=1", after=reloading + 1)
        assert node.proc.wait(30) == 0
        # only the process systemd started speaks (NotifyAccess=main): no worker, ever
        assert {pid for pid, _fields in notify.messages} == {main}
    finally:
        notify.close()


def test_without_notify_socket_serve_runs_as_before(
    relay: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    node = relay([relay_connector(["127.0.0.0/24"])], mode="process", server={"workers": 2})
    with node.smtp() as client:
        client.sendmail("scanner@corp.example", ["user@corp.example"], b"Subject: t\r\n\r\nx")
    node.proc.send_signal(signal.SIGTERM)
    assert node.proc.wait(30) == 0


def test_the_shipped_unit_file_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` on packaging/relaygate.service, with ExecStart pointing at this
    checkout's relaygate (the unit names /opt/relaygate, where the README installs it)."""
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze (Debian package systemd) is needed"
    text = UNIT.read_text(encoding="utf-8")
    assert "ExecStart=/opt/relaygate/bin/relaygate serve" in text
    assert "Type=notify" in text and "KillMode=mixed" in text
    relaygate = ROOT / ".venv" / "bin" / "relaygate"
    unit = tmp_path / "relaygate.service"
    unit.write_text(text.replace("/opt/relaygate/bin/relaygate", str(relaygate)), "utf-8")
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    # and it does catch a broken unit
    unit.write_text(text.replace("/opt/relaygate/bin/relaygate", str(tmp_path / "nope")), "utf-8")
    broken = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert broken.returncode != 0 and "nope" in broken.stderr
