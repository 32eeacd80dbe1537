"""`relaygate serve` that cannot start: one line naming what is wrong, exit 1, no traceback."""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.support.ports import free_port


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    """`relaygate serve --config config`, run to its end (these configurations stop it at start)."""
    return subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )


def test_a_taken_smtp_port_names_the_receive_connectors_of_the_binding(tmp_path: Path) -> None:
    """Another program holds a connector's port: the error names the binding and the receive
    connectors that use it (several connectors share one listener), so the administrator knows
    which connector to change; a connector on another binding is not named."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f"""\
[server]
name = "RELAY01"
data_dir = "{tmp_path / "data"}"

[admin]
listen = "127.0.0.1:{free_port()}"

[[receive_connectors]]
name = "Scanners Floor 2"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.2"]

[[receive_connectors]]
name = "Printers"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.3"]

[[receive_connectors]]
name = "Apps"
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.4"]
""",
        encoding="utf-8",
    )
    try:
        done = serve_once(config)
    finally:
        taken.close()
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    assert (
        f"cannot start: cannot listen on 127.0.0.1:{port} (bindings of receive connectors "
        f'"Scanners Floor 2", "Printers"): Address already in use'
    ) in done.stderr, done.stderr
    assert '"Apps"' not in done.stderr, done.stderr


def test_a_queue_database_that_cannot_be_opened_is_named(tmp_path: Path) -> None:
    """`<data_dir>/queue` is a file (a restore gone wrong): before, the one line said only
    "queue database error: unable to open database file"; it names the database file now."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "queue").write_text("not a directory\n", encoding="utf-8")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f"""\
[server]
data_dir = "{data}"

[admin]
listen = "127.0.0.1:{free_port()}"

[[receive_connectors]]
name = "Printers"
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.2"]
""",
        encoding="utf-8",
    )
    done = serve_once(config)
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    assert (
        # the system's reason (the start's look at the spool folder meets it first)
        f"cannot start: cannot open the queue database {data / 'queue' / 'queue.db'}: "
        "Not a directory"
    ) in done.stderr, done.stderr


def test_a_protocol_log_folder_that_is_a_file_is_a_warning_not_a_traceback(tmp_path: Path) -> None:
    """`<data_dir>/logs/ProtocolLog` is a file: the relay serves, and the service log says in one
    line, once, that the log cannot be written; before, the log writer's cleanup printed a Python
    traceback ("background flush failed")."""
    data = tmp_path / "data"
    (data / "logs").mkdir(parents=True)
    (data / "logs" / "ProtocolLog").write_text("not a directory\n", encoding="utf-8")
    smtp = free_port()
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f"""\
[server]
data_dir = "{data}"

[admin]
listen = "127.0.0.1:{free_port()}"

[[receive_connectors]]
name = "Printers"
bindings = ["127.0.0.1:{smtp}"]
remote_ip_ranges = ["127.0.0.1"]
protocol_logging_level = "Verbose"
""",
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "NO_COLOR": "1"},
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline()  # "RelayGate ready: ..." once it listens
        assert ready.startswith("RelayGate ready"), ready
        with smtplib.SMTP("127.0.0.1", smtp, timeout=10) as client:
            assert client.noop()[0] == 250
        time.sleep(1.0)  # the log writer flushes every 0.2 s
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=30)
    folder = data / "logs" / "ProtocolLog" / "SmtpReceive"
    assert "Traceback" not in err, err
    said = [line for line in err.splitlines() if f"log {folder}: " in line]
    assert len(said) == 1, said
    assert f"log {folder}: cannot write: [Errno 20] Not a directory" in said[0], said


def test_a_dns_server_name_that_cannot_be_resolved_is_one_line_naming_the_key(
    tmp_path: Path,
) -> None:
    """server.dns_servers may name a host, looked up at start: one that does not resolve stopped
    serve with a socket.gaierror traceback."""
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f"""\
[server]
name = "RELAY01"
data_dir = "{tmp_path / "data"}"
dns_servers = ["no-such-host.invalid"]

[admin]
listen = "127.0.0.1:{free_port()}"

[[receive_connectors]]
name = "Apps"
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.4"]
""",
        encoding="utf-8",
    )
    done = serve_once(config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "cannot start: server.dns_servers ['no-such-host.invalid']: " in done.stderr


def test_a_users_file_with_a_bad_send_as_pattern_is_one_line_naming_the_user_and_the_pattern(
    tmp_path: Path,
) -> None:
    """A send-as pattern written into the users file by hand that the parser refuses: the server
    does not start (its users would otherwise run without their lists), and says why in one line
    rather than a ValueError traceback."""
    users = tmp_path / "users.json"
    users.write_text('{"users": {"erp": "x"}, "send_as": {"erp": ["inv*@corp.example"]}}')
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f"""\
[server]
name = "RELAY01"
data_dir = "{tmp_path / "data"}"
users_file = "{users}"

[admin]
listen = "127.0.0.1:{free_port()}"

[[receive_connectors]]
name = "Submission"
bindings = ["127.0.0.1:{free_port()}"]
remote_ip_ranges = ["127.0.0.4"]
permission_groups = ["ExchangeUsers"]
auth_mechanism = ["Tls", "BasicAuth"]
""",
        encoding="utf-8",
    )
    done = serve_once(config)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert (
        f"cannot start: cannot read the users file {users}: send_as of user erp: send-as pattern "
        "'inv*@corp.example': '*' is allowed only as *@domain, *@*.domain or *@*"
    ) in done.stderr, done.stderr
