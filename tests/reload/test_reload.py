"""A running server picks up config edits (file change or SIGHUP) without dropping open sessions."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.smtp.conftest import default_frontend, relay  # noqa: F401
from tests.smtp.helpers import RawClient

ROOT = Path(__file__).resolve().parents[2]
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"


def cli(*args: str, config: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args, "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


def rcpt_reply(port: int, source: str, rcpt: str = "victim@external.example") -> str:
    with RawClient(port, source=source) as c:
        c.greet()
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)
        return c.cmd(f"RCPT TO:<{rcpt}>").text


def wait_until(predicate, timeout: float = 20.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.3)
    return False


def test_cli_edit_is_picked_up_by_running_server_without_dropping_sessions(relay):  # noqa: F811
    relay_conn = {
        "name": "SMTP Relay Internal",
        "bindings": ["127.0.0.1:{port}"],
        "remote_ip_ranges": ["127.0.0.20"],
        "permission_groups": ["AnonymousUsers"],
        "permissions": [
            {
                "user": "NT AUTHORITY\\ANONYMOUS LOGON",
                "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
            }
        ],
        "tarpit_interval": "00:00:00",
        "connection_inactivity_timeout": "00:00:30",
    }
    r = relay([default_frontend(tarpit_interval="00:00:00"), relay_conn], mode="process")
    assert rcpt_reply(r.port, "127.0.0.5") == RELAY_DENIED

    # A session opened before the edit stays open across the reload.
    open_session = RawClient(r.port, source="127.0.0.20")
    open_session.greet()

    # The admin adds the printer with the CLI (Set-ReceiveConnector -RemoteIPRanges @{Add=...}).
    done = cli(
        "connector",
        "set",
        "SMTP Relay Internal",
        "--add-remote-ip-ranges",
        "127.0.0.5",
        config=r.config_path,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert wait_until(lambda: rcpt_reply(r.port, "127.0.0.5") == "250 2.1.5 Recipient OK")

    open_session.cmd("MAIL FROM:<a@corp.example>", 250)
    assert open_session.cmd("RCPT TO:<x@external.example>").text == "250 2.1.5 Recipient OK"
    open_session.close()

    # An invalid edit is refused and the server keeps its current configuration.
    bad = cli(
        "connector",
        "set",
        "SMTP Relay Internal",
        "--remote-ip-ranges",
        "127.0.0.9-127.0.0.1",
        config=r.config_path,
    )
    assert bad.returncode == 1
    assert rcpt_reply(r.port, "127.0.0.5") == "250 2.1.5 Recipient OK"


def test_sighup_reloads_a_hand_edited_file(relay):  # noqa: F811
    r = relay([default_frontend(tarpit_interval="00:00:00")], mode="process")
    assert rcpt_reply(r.port, "127.0.0.6") == RELAY_DENIED
    text = r.config_path.read_text()
    port = r.port
    text += f"""
[[receive_connectors]]
name = "Scanner Relay"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.6"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
"""
    # Keep the mtime and inode as they were so only SIGHUP (not the file watcher) can notice.
    st = r.config_path.stat()
    with open(r.config_path, "r+", encoding="utf-8") as f:
        f.write(text)
    os.utime(r.config_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(3)
    assert rcpt_reply(r.port, "127.0.0.6") == RELAY_DENIED  # not reloaded yet
    assert r.proc is not None
    r.proc.send_signal(signal.SIGHUP)
    assert wait_until(lambda: rcpt_reply(r.port, "127.0.0.6") == "250 2.1.5 Recipient OK")


def test_a_specific_binding_next_to_a_wildcard_can_be_added_by_reload(relay):  # noqa: F811
    h = relay([default_frontend(bindings=["0.0.0.0:{port}"], banner="220 any")])
    exact = default_frontend(name="Exact", bindings=["127.0.0.1:{port}"], banner="220 exact")
    h.reconfigure([default_frontend(bindings=["0.0.0.0:{port}"], banner="220 any"), exact])
    with RawClient(h.port, host="127.0.0.1") as c:
        assert c.reply().text == "220 exact"
    with RawClient(h.port, host="127.0.0.2") as c:
        assert c.reply().text == "220 any"


def test_a_reload_whose_listener_cannot_be_opened_keeps_the_old_config_and_listeners(
    relay,  # noqa: F811
    caplog,
):
    h = relay([default_frontend(banner="220 old")])
    taken = socket.socket()  # someone else listens on the new connector's endpoint
    taken.bind(("127.0.0.1", h.ports[1]))
    taken.listen()
    try:
        with caplog.at_level(logging.ERROR, logger="relaygate"):
            h.reconfigure(
                [
                    default_frontend(banner="220 new"),
                    default_frontend(name="Second", bindings=["127.0.0.1:{port2}"]),
                ]
            )
    finally:
        taken.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"127.0.0.1:{h.ports[1]}" in e for e in errors), errors
    # Nothing of the new configuration is applied: the old one serves, on its listeners.
    assert h.relay.ctx.config is h.relay.config
    assert [c.name for c in h.relay.config.receive_connectors] == ["Default Frontend"]
    assert sorted(h.relay.server.endpoints) == [("127.0.0.1", h.port)]
    with RawClient(h.port) as c:
        assert c.reply().text == "220 old"
    # The next good edit is still picked up.
    h.reconfigure([default_frontend(banner="220 new")])
    with RawClient(h.port) as c:
        assert c.reply().text == "220 new"


def test_a_reload_whose_loading_raises_anything_keeps_the_running_config(
    relay,  # noqa: F811
    caplog,
    monkeypatch,
):
    """Not only ConfigError: whatever loading the file raises, the reload is refused and logged."""
    h = relay([default_frontend(banner="220 old")])

    def broken(path):  # type: ignore[no-untyped-def]
        raise OverflowError("a loader bug")

    monkeypatch.setattr("relaygate.app.load_config", broken)
    with caplog.at_level(logging.ERROR, logger="relaygate"):
        h.reconfigure([default_frontend(banner="220 new")])
    assert any("reload refused" in r.getMessage() for r in caplog.records)
    with RawClient(h.port) as c:
        assert c.reply().text == "220 old"
