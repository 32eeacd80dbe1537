"""`--json` on the error paths: a verb asked for JSON prints its error as JSON on stdout, with the
same non-zero exit code as the text form (scripts parse stdout; before, they got an empty stdout
and a text line on stderr).

One subprocess per kind of failure shows the real process; the rest run in-process through typer's
CliRunner (the same command functions, one interpreter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tests.support.ports import free_port

GOOD = """
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
data_dir = "data"

[admin]
listen = "127.0.0.1:{admin_port}"

[[accepted_domains]]
domain = "corp.example"
default = true

[[receive_connectors]]
name = "Scanners"
bindings = ["0.0.0.0:2525"]
remote_ip_ranges = ["10.0.0.0/24"]

[[send_connectors]]
name = "Outbound"
"""

BAD = """
[server]
name = 5

[[receive_connectors]]
name = "Scanners"
bindings = ["0.0.0.0:2525"]
remote_ip_ranges = ["10.0.0.0/33"]
"""


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, str]:
    # nothing listens on the admin port: `queue list` finds no server
    good = tmp_path / "good.toml"
    good.write_text(GOOD.format(admin_port=free_port()), encoding="utf-8")
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD, encoding="utf-8")
    return {"good": str(good), "bad": str(bad), "missing": str(tmp_path / "missing.toml")}


def _invoke(*args: str) -> Any:
    from relaygate.cli import app

    return CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "200"})


def _json_error(result: Any) -> dict[str, Any]:
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    data = json.loads(result.stdout)
    assert data["ok"] is False, data
    return data


# Verbs that read the config (the file's problems, as `check --json` lists them).
CONFIG_READERS = [
    ("connector", "list"),
    ("connector", "show", "Scanners"),
    ("send-connector", "list"),
    ("domain", "list"),
    ("permission", "list"),
    ("explain", "--client-ip", "10.0.0.5", "--to", "a@example.org"),
    ("audit",),
    ("trace",),
    ("dkim", "show"),
]


@pytest.mark.parametrize("verb", CONFIG_READERS, ids=" ".join)
def test_an_invalid_config_is_reported_as_json(
    verb: tuple[str, ...], configs: dict[str, str]
) -> None:
    result = _invoke(*verb, "--config", configs["bad"], "--json")
    assert result.exit_code == 1, result.output
    data = _json_error(result)
    assert data["source"] == configs["bad"]
    paths = {(e["path"], e["connector"]) for e in data["errors"]}
    assert paths == {
        ("server.name", ""),
        ("receive_connectors[0].remote_ip_ranges[0]", "Scanners"),
    }
    assert all(e["text"].startswith(configs["bad"]) for e in data["errors"])


@pytest.mark.parametrize(
    ("verb", "code", "error"),
    [
        (("connector", "show", "Nope"), 1, "no receive connector named 'Nope' (have: 'Scanners')"),
        (("send-connector", "show", "Nope"), 1, "no send connector named 'Nope'"),
        (("permission", "list", "Nope"), 1, "no receive connector named 'Nope'"),
        (("connector", "new"), 2, "give the new receive connector's name"),
        (
            ("explain", "--client-ip", "10.0.0.256", "--to", "a@example.org"),
            1,
            "--client-ip: '10.0.0.256' is not an IP address",
        ),
        (("queue", "list"), 3, "the RelayGate server is not running"),
        (("doctor", "corp.example", "--relay-ip", "relay"), 2, "--relay-ip 'relay'"),
    ],
    ids=lambda x: " ".join(x) if isinstance(x, tuple) else None,
)
def test_a_verb_error_is_reported_as_json(
    verb: tuple[str, ...], code: int, error: str, configs: dict[str, str]
) -> None:
    result = _invoke(*verb, "--config", configs["good"], "--json")
    assert result.exit_code == code, result.output
    assert error in _json_error(result)["error"]
    assert result.stderr == ""


def test_errors_of_verbs_with_their_own_json_option(
    configs: dict[str, str], tmp_path: Path
) -> None:
    result = _invoke("import", "exchange", str(tmp_path / "nope.txt"), "--json")
    assert result.exit_code == 1, result.output
    assert "nope.txt: cannot read" in _json_error(result)["error"]
    result = _invoke(
        "dkim", "new", "--domain", "not a domain", "--selector", "s1",
        "--data-dir", str(tmp_path), "--json",
    )  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "invalid DKIM domain" in _json_error(result)["error"]
    result = _invoke("doctor", "corp.example", "--config", configs["bad"], "--json")
    assert result.exit_code == 2, result.output
    assert {e["path"] for e in _json_error(result)["errors"]} >= {"server.name"}


def test_without_json_errors_stay_text_on_stderr(configs: dict[str, str]) -> None:
    """Also right after a --json command in the same process: the mode ends with its command."""
    _json_error(_invoke("connector", "show", "Nope", "--config", configs["good"], "--json"))
    result = _invoke("connector", "show", "Nope", "--config", configs["good"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "error: no receive connector named 'Nope'" in result.stderr
    result = _invoke("connector", "list", "--config", configs["missing"])
    assert result.exit_code == 1 and result.stdout == ""
    assert "cannot read: No such file or directory" in result.stderr


def test_a_subprocess_prints_json_on_stdout_and_nothing_on_stderr(configs: dict[str, str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    for args, code in (
        (["connector", "list", "--config", configs["missing"]], 1),
        (["connector", "show", "Nope", "--config", configs["good"]], 1),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "relaygate", *args, "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == code, proc.stderr
        assert json.loads(proc.stdout)["ok"] is False
        assert proc.stderr == ""
