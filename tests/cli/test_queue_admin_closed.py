"""`relaygate queue ...` when nothing answers at admin.listen: a relay that runs all the same (it
holds the node lock of data_dir) is not said to be stopped."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from relaygate.admin.closed_note import clear_closed, note_closed
from relaygate.node_lock import NodeLock
from tests.support.ports import free_port

CONFIG = """
[server]
name = "RELAY01"
data_dir = "{data}"

[admin]
listen = "127.0.0.1:{port}"
"""


def _queue_list(cfg: Path) -> object:
    from relaygate.cli import app

    return CliRunner().invoke(
        app, ["queue", "list", "--config", str(cfg)], env={"NO_COLOR": "1", "COLUMNS": "200"}
    )


def test_a_running_relay_whose_admin_listener_is_closed_is_not_said_to_be_stopped(
    tmp_path: Path,
) -> None:
    """Nothing answers at admin.listen: "not running" (exit 3) only when no relay holds the node
    lock; otherwise the relay runs, with its admin listener closed, and why when worker 0 wrote
    it (its certificate pair does not load), or what else it may be."""
    data = tmp_path / "data"
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text(CONFIG.format(data=data, port=free_port()), encoding="utf-8")

    result = _queue_list(cfg)
    assert result.exit_code == 3, result.output  # type: ignore[attr-defined]
    assert "the RelayGate server is not running" in result.stderr  # type: ignore[attr-defined]

    lock = NodeLock(data, "RELAY01")
    lock.acquire()  # this process is the running relay
    try:
        result = _queue_list(cfg)
        err = " ".join(result.stderr.split())  # type: ignore[attr-defined]
        assert result.exit_code == 1, err  # type: ignore[attr-defined]
        assert "not running" not in err
        assert f"runs (pid {os.getpid()}) but its admin listener at http://127.0.0.1:" in err
        assert "admin.listen changed since it started" in err, err

        reason = "cannot read admin.tls_key_file '/etc/relaygate/admin.key': Permission denied"
        note_closed(data, reason)
        result = _queue_list(cfg)
        err = " ".join(result.stderr.split())  # type: ignore[attr-defined]
        assert result.exit_code == 1, err  # type: ignore[attr-defined]
        assert reason in err and "opens it once the files load" in err, err
        clear_closed(data)
    finally:
        lock.release()
    note_closed(data, reason)  # left by a node killed outright: no relay runs now
    result = _queue_list(cfg)
    assert result.exit_code == 3, result.output  # type: ignore[attr-defined]
