"""A running server picks up config edits (file change or SIGHUP) without dropping open sessions."""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
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


def _tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _tls_banner_and_cert(port: int) -> tuple[str, bytes]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with _tls_client().wrap_socket(raw) as s:
        cert = s.getpeercert(binary_form=True)
        assert cert is not None
        return s.recv(200).decode(), cert


def test_a_reload_applies_a_tls_mode_change_on_a_running_listener(relay):  # noqa: F811
    h = relay([default_frontend(banner="220 plain")])
    with RawClient(h.port) as c:
        assert c.reply().text == "220 plain"
    h.reconfigure([default_frontend(banner="220 tls", tls_mode="implicit")])
    banner, _cert = _tls_banner_and_cert(h.port)  # the banner comes inside TLS
    assert banner.startswith("220 tls")
    h.reconfigure([default_frontend(banner="220 plain again")])
    with RawClient(h.port) as c:
        assert c.reply().text == "220 plain again"


def test_a_reload_presents_a_renewed_certificate_on_an_implicit_tls_listener(relay, tmp_path):  # noqa: F811
    import shutil

    from relaygate.smtp.tls import ensure_self_signed

    cert_a, key_a = ensure_self_signed(tmp_path / "a", "a.example")
    cert_b, key_b = ensure_self_signed(tmp_path / "b", "b.example")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(cert_a, live_cert)
    shutil.copy(key_a, live_key)
    files = {"tls_certificate_file": str(live_cert), "tls_key_file": str(live_key)}
    conn = default_frontend(tls_mode="implicit", **files)
    h = relay([conn])
    assert _tls_banner_and_cert(h.port)[1] == ssl.PEM_cert_to_DER_cert(cert_a.read_text())
    # The renewal overwrites the files in place (same names), then the service is reloaded.
    shutil.copy(cert_b, live_cert)
    shutil.copy(key_b, live_key)
    h.reconfigure([conn])
    assert _tls_banner_and_cert(h.port)[1] == ssl.PEM_cert_to_DER_cert(cert_b.read_text())


def test_a_reload_whose_implicit_tls_certificate_cannot_load_keeps_the_running_one(
    relay,  # noqa: F811
    tmp_path,
    caplog,
):
    from relaygate.smtp.tls import ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "a", "a.example")
    h = relay(
        [
            default_frontend(
                tls_mode="implicit", tls_certificate_file=str(cert), tls_key_file=str(key)
            )
        ]
    )
    broken = default_frontend(
        tls_mode="implicit",
        tls_certificate_file=str(tmp_path / "renewed.crt"),  # not copied yet
        tls_key_file=str(key),
        banner="220 new",
    )
    with caplog.at_level(logging.ERROR, logger="relaygate"):
        h.reconfigure([broken])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("reload refused" in e and "Default Frontend" in e for e in errors), errors
    banner, served = _tls_banner_and_cert(h.port)
    assert served == ssl.PEM_cert_to_DER_cert(cert.read_text())
    assert not banner.startswith("220 new")


def test_a_reload_adding_ipv4_wildcard_next_to_a_dual_stack_one_reopens_it_ipv6_only(relay):  # noqa: F811
    """[::]:P alone is dual-stack; with 0.0.0.0:P beside it, it must be IPv6-only (else the two
    conflict): a reload reopens it so, as a fresh start would open it."""
    both = default_frontend(
        bindings=["[::]:{port}"], remote_ip_ranges=["::1", "127.0.0.5"], banner="220 dual"
    )
    h = relay([both])
    with RawClient(h.port, source="127.0.0.5") as c:  # IPv4 through the dual-stack socket
        assert c.reply().text == "220 dual"
    v4 = default_frontend(
        name="IPv4", bindings=["0.0.0.0:{port}"], remote_ip_ranges=["127.0.0.6"], banner="220 v4"
    )
    h.reconfigure([both, v4])
    assert [c.name for c in h.relay.config.receive_connectors] == ["Default Frontend", "IPv4"]
    assert sorted(h.relay.server.endpoints) == [("0.0.0.0", h.port), ("::", h.port)]
    with RawClient(h.port, source="127.0.0.6") as c:
        assert c.reply().text == "220 v4"
    with RawClient(h.port, host="::1", source="::1") as c:
        assert c.reply().text == "220 dual"
    h.reconfigure([both])  # and back: [::] dual-stack again
    with RawClient(h.port, source="127.0.0.5") as c:
        assert c.reply().text == "220 dual"


def test_a_reload_keeps_an_unchanged_implicit_tls_listener_open(relay):  # noqa: F811
    """Same certificate (here the self-signed one made at start): the socket is not reopened."""
    h = relay([default_frontend(tls_mode="implicit")])
    before = dict(h.relay.server._servers)
    h.reconfigure([default_frontend(tls_mode="implicit", banner="220 new")])
    assert h.relay.server._servers == before
    assert _tls_banner_and_cert(h.port)[0].startswith("220 new")


def test_a_reload_applies_the_log_settings(relay):  # noqa: F811
    from datetime import timedelta

    from tests.smtp.conftest import relay_connector

    conn = relay_connector(ranges=["127.0.0.5"])
    h = relay([conn])
    assert h.relay.tracking is None  # the fixture starts with message tracking off
    h.doc["server"]["message_tracking_log_enabled"] = True
    h.doc["server"]["message_tracking_log_max_file_size"] = "2MB"
    h.doc["server"]["receive_protocol_log_max_file_size"] = "1MB"
    h.doc["server"]["receive_protocol_log_max_directory_size"] = "5MB"
    h.doc["server"]["receive_protocol_log_max_age"] = "7.00:00:00"
    h.reconfigure([conn])
    d = h.relay.protocol_log.directory
    assert (d.max_file_size, d.max_directory_size, d.max_age) == (
        1024**2,
        5 * 1024**2,
        timedelta(days=7),
    )
    tracking = h.relay.tracking
    assert tracking is not None and h.relay.ctx.tracking is tracking
    assert h.relay.manager.tracking is tracking
    assert tracking.directory.max_file_size == 2 * 1024**2
    with h.smtp("127.0.0.5") as c:
        c.sendmail("a@corp.example", ["x@external.example"], b"Subject: t\r\n\r\nhi\r\n")
    tracking.flush()
    folder = h.data_dir / "logs" / "MessageTracking"
    assert ",RECEIVE," in "".join(p.read_text() for p in folder.glob("MSGTRK*.LOG"))
    # Switched off again: closed (what it held is written) and handed to nobody.
    h.doc["server"]["message_tracking_log_enabled"] = False
    h.reconfigure([conn])
    assert h.relay.tracking is None and h.relay.ctx.tracking is None
    assert h.relay.manager.tracking is None
    assert tracking.directory._closed and tracking.directory._file is None


def test_a_reload_applies_the_lease_duration_and_defers_a_new_queue_store(relay, caplog):  # noqa: F811
    """`queue.lease_duration` is taken at once by the queue manager; `queue.store` and
    `database_url` cannot change under a running relay: it says they take effect at the next
    restart and keeps its queue (the message sent afterwards is stored in it)."""
    from tests.smtp.conftest import relay_connector

    conn = relay_connector(ranges=["127.0.0.5"])
    h = relay([conn])
    store = h.relay.store
    assert h.relay.manager.lease_seconds == 1800.0
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        h.reconfigure(
            [conn],
            queue={
                "lease_duration": "00:02:00",
                "store": "postgresql",
                "database_url": "postgresql://relaygate@127.0.0.1:9/relaygate",
            },
        )
    assert h.relay.manager.lease_seconds == 120.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert (
        "queue.store, queue.database_url changed: takes effect when relaygate serve restarts"
        in warnings
    ), warnings
    assert h.relay.store is store
    with h.smtp("127.0.0.5") as c:
        c.sendmail("a@corp.example", ["x@external.example"], b"Subject: t\r\n\r\nhi\r\n")
    assert len(h.messages()) == 1


async def test_an_edit_made_while_the_relay_starts_is_not_missed(tmp_path: Path) -> None:
    """The file watcher compares against the file as the config was read, not as it is when the
    watcher first runs: an edit between the two (a worker reporting ready while `relaygate
    connector set` runs) was never reloaded."""
    import asyncio

    from relaygate.app import Relay
    from relaygate.config import load_config
    from tests.queue_manager.helpers import free_port, make_config_text

    path = tmp_path / "relaygate.toml"
    path.write_text(
        make_config_text(
            tmp_path / "data", smtp_port=free_port(), admin_port=free_port(), routes={}
        )
    )
    node = Relay(load_config(path), config_path=path)
    await node.start()
    try:
        text = path.read_text()
        time.sleep(0.01)  # a later mtime
        path.write_text(text.replace('name = "RELAYTEST"', 'name = "RELAYEDIT"', 1))
        watcher = asyncio.ensure_future(node.watch_config(interval=0.1))
        try:
            for _ in range(50):
                if node.config.server.name == "RELAYEDIT":
                    break
                await asyncio.sleep(0.1)
        finally:
            watcher.cancel()
        assert node.config.server.name == "RELAYEDIT"
    finally:
        await node.stop()


def test_a_reload_that_takes_a_client_off_a_relay_connector_ends_its_open_session(relay):  # noqa: F811
    """Removing a client from a relaying connector's remote_ip_ranges (a printer found spamming)
    stops its relaying at once, not when its open session ends (connection_timeout, 10 minutes by
    default, with no limit on its messages): its next MAIL gets 421 4.3.2 and the connection ends,
    so it reconnects to the connector that now takes it. A session whose connector is still the
    one that takes it carries on, with the rights that connector now has."""
    from tests.smtp.conftest import relay_connector

    def connectors(ranges: list[str], *, relay_right: bool = True) -> list[dict]:
        relaying = relay_connector(ranges)
        if not relay_right:
            relaying["permissions"] = []
        return [default_frontend(tarpit_interval="00:00:00"), relaying]

    r = relay(connectors(["127.0.0.5", "127.0.0.6"]))
    printer = RawClient(r.port, source="127.0.0.5")
    other = RawClient(r.port, source="127.0.0.6")
    for c in (printer, other):
        c.greet()
        c.cmd("MAIL FROM:<scanner@corp.example>", 250)
        assert c.cmd("RCPT TO:<victim@external.example>").text == "250 2.1.5 Recipient OK"
        c.cmd("RSET", 250)

    r.reconfigure(connectors(["127.0.0.6"]))
    assert printer.cmd("MAIL FROM:<scanner@corp.example>").text == "421 4.3.2 Service not available"
    assert printer.is_closed()
    assert rcpt_reply(r.port, "127.0.0.5") == RELAY_DENIED  # now on Default Frontend
    other.cmd("MAIL FROM:<scanner@corp.example>", 250)
    assert other.cmd("RCPT TO:<victim@external.example>").text == "250 2.1.5 Recipient OK"
    other.cmd("RSET", 250)

    r.reconfigure(connectors(["127.0.0.6"], relay_right=False))
    other.cmd("MAIL FROM:<scanner@corp.example>", 250)
    assert other.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
    other.close()
    printer.close()


def test_a_reload_that_moves_data_dir_keeps_the_running_one_and_says_so(relay, caplog, tmp_path):  # noqa: F811
    """The queue, the logs and the node lock stay where the relay opened them: a new
    server.data_dir takes effect at the next start, as queue.store does. Before, the reload took
    the keys from the new directory (a new log privacy key was created there, so addresses logged
    from then on were pseudonymized with another key than those before: `trace` could not find
    both) while the queue stayed in the old one, and nothing said so."""
    from tests.smtp.conftest import relay_connector

    conn = relay_connector(ranges=["127.0.0.5"])
    h = relay([conn], server={"log_address_privacy": "pseudonymize"})
    running = h.relay.config.server.data_dir
    moved = tmp_path / "moved-data"
    h.doc["server"]["data_dir"] = str(moved)
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        h.reconfigure([conn])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "server.data_dir changed: takes effect when relaygate serve restarts" in warnings, (
        warnings
    )
    assert h.relay.config.server.data_dir == running
    with h.smtp("127.0.0.5") as c:
        c.sendmail("a@corp.example", ["x@external.example"], b"Subject: t\r\n\r\nhi\r\n")
    assert len(h.messages()) == 1  # in the running queue
    assert not moved.exists()  # nothing of the running relay went to the new directory


def test_a_reload_whose_dns_server_cannot_be_resolved_applies_nothing(relay, caplog):  # noqa: F811
    """server.dns_servers may name a host, resolved when the resolver is built. That happened in
    the middle of applying the reload: the sessions already had the new file (here, its banner)
    when the name failed, and the log said the reload was refused. Now the resolver is built
    first, off the event loop, and a failure refuses the whole reload."""
    from tests.smtp.conftest import relay_connector

    conn = relay_connector(ranges=["127.0.0.5"], banner="220 before")
    h = relay([conn])
    resolver = h.relay.manager.resolver
    h.doc["server"]["dns_servers"] = ["no-such-host.invalid"]
    with caplog.at_level(logging.ERROR, logger="relaygate"):
        h.reconfigure([relay_connector(ranges=["127.0.0.5"], banner="220 after")])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        m.startswith("reload refused, keeping the running configuration: server.dns_servers")
        and "no-such-host.invalid" in m
        for m in errors
    ), errors
    assert h.relay.config.server.dns_servers == ()
    assert h.relay.manager.resolver is resolver
    with RawClient(h.port, source="127.0.0.5") as c:
        assert c.reply().text == "220 before"


def _authenticated(r, source: str = "127.0.0.5") -> RawClient:
    """A session that has authenticated as `scanner` (no TLS) and relayed once."""
    import base64

    from tests.smtp.test_auth import PASSWORD

    c = RawClient(r.port, source=source)
    c.greet()
    plain = base64.b64encode(f"\0scanner\0{PASSWORD}".encode()).decode()
    c.cmd(f"AUTH PLAIN {plain}", 235)
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    assert c.cmd("RCPT TO:<victim@external.example>").text == "250 2.1.5 Recipient OK"
    c.cmd("RSET", 250)
    return c


def test_a_reload_that_takes_away_an_authenticated_sessions_right_to_be_authenticated_ends_it(
    relay,  # noqa: F811
    monkeypatch,
):
    """An authenticated session relays as its user: after a reload that removed the user (the
    users file the reload reads no longer holds it), or that made its connector require TLS for
    AUTH (BasicAuthRequireTLS) while it authenticated in clear, it could not authenticate now, so
    it must not go on relaying as that user: 421 4.3.2 at its next MAIL, as a client taken off
    the connector gets. A reload that changes nothing of the kind leaves it relaying."""
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth
    from tests.smtp.test_auth import add_user, auth_connector, cli

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    r = relay([auth_connector()])
    add_user(r, "scanner")
    unrelated, tls_for_auth, removed = (_authenticated(r) for _ in range(3))

    r.reconfigure([auth_connector(max_message_size=20_000_000)])  # an unrelated change
    unrelated.cmd("MAIL FROM:<scanner@corp.example>", 250)
    assert unrelated.cmd("RCPT TO:<victim@external.example>").text == "250 2.1.5 Recipient OK"
    unrelated.cmd("RSET", 250)

    r.reconfigure([auth_connector(auth_mechanism=["Tls", "BasicAuth", "BasicAuthRequireTLS"])])
    assert tls_for_auth.cmd("MAIL FROM:<scanner@corp.example>").text == (
        "421 4.3.2 Service not available"
    )
    assert tls_for_auth.is_closed()

    r.reconfigure([auth_connector()])
    assert cli(r, "user", "remove", "scanner").exit_code == 0
    r.reconfigure([auth_connector()])  # the administrator's reload after removing the user
    assert removed.cmd("MAIL FROM:<scanner@corp.example>").text == (
        "421 4.3.2 Service not available"
    )
    assert removed.is_closed()
    unrelated.cmd("MAIL FROM:<scanner@corp.example>", 421)
    for c in (unrelated, tls_for_auth, removed):
        c.close()


def test_a_reload_between_mail_and_rcpt_ends_the_transaction_with_nothing_stored(relay):  # noqa: F811
    """MAIL accepted, then a reload takes the client off its relaying connector: its RCPT gets
    421 4.3.2 and the connection ends. The pipelined DATA and content that followed the RCPT
    are never taken (nothing is stored, no 354), so no message is half-accepted."""
    from tests.smtp.conftest import relay_connector

    r = relay([default_frontend(tarpit_interval="00:00:00"), relay_connector(["127.0.0.5"])])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    r.reconfigure([default_frontend(tarpit_interval="00:00:00"), relay_connector(["127.0.0.6"])])
    c.send(
        b"RCPT TO:<victim@external.example>\r\nDATA\r\nSubject: scan\r\n\r\nbody\r\n.\r\nQUIT\r\n"
    )
    assert [reply.text for reply in c.replies_until_close()] == ["421 4.3.2 Service not available"]
    assert r.messages() == []
    c.close()
