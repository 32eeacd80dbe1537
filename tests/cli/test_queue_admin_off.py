"""`relaygate queue ...` with the admin API switched off in the config."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from tests.support.ports import free_port

CONFIG = """
[server]
name = "RELAY01"

[admin]
enabled = false
listen = "127.0.0.1:{port}"
"""


def _invoke(*args: str) -> object:
    from relaygate.cli import app

    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})


def test_queue_verbs_say_the_admin_api_is_off_not_that_the_server_is_down(tmp_path: Path) -> None:
    """With admin.enabled = false the queue verbs said 'the RelayGate server is not running'
    about a relay that may well be running: the API they need is what is off."""
    cfg = tmp_path / "relaygate.toml"
    cfg.write_text(CONFIG.format(port=free_port()), encoding="utf-8")
    for verb in (("queue", "list"), ("queue", "summary"), ("queue", "retry", "RELAY01\\1")):
        result = _invoke(*verb, "--config", str(cfg))
        assert result.exit_code == 1, result.output  # type: ignore[attr-defined]
        err = result.stderr  # type: ignore[attr-defined]
        assert "not running" not in err
        assert f"the admin API is off in {cfg} (admin.enabled = false)" in err, err
    result = _invoke("queue", "list", "--config", str(cfg), "--json")
    assert result.exit_code == 1  # type: ignore[attr-defined]
    assert "admin.enabled = false" in json.loads(result.stdout)["error"]  # type: ignore[attr-defined]
