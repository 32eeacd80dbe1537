"""`relaygate serve` that cannot start: one line naming what is wrong, exit 1, no traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.ports import free_port


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
        done = subprocess.run(
            [sys.executable, "-m", "relaygate", "serve", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "NO_COLOR": "1"},
        )
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
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    assert (
        f"cannot start: cannot open the queue database {data / 'queue' / 'queue.db'}: "
        "unable to open database file"
    ) in done.stderr, done.stderr
