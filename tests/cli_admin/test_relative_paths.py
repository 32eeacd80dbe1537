"""Relative file paths in the configuration (`admin.api_token_file = "api.token"`) are taken from
the working directory of `relaygate serve`, not from the config file's folder. `relaygate audit`
and `relaygate check` run from another directory looked for them there: a world-readable token
the relay really uses went unreported (a false all-clear), and check called a file the relay
reads fine missing. They now read them where the running relay does (its working directory,
found through the node lock in data_dir), and say which directory that was."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relaygate.dkim.keys import load_private_key, write_key
from tests.cli_admin.helpers import ROOT, run, write
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401
from tests.support.ports import free_port
from tests.support.serve_process import wait_for_ready_line

CONFIG = """
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
data_dir = "{data_dir}"
users_file = "users.json"

[admin]
listen = "127.0.0.1:{admin_port}"
api_token_file = "api.token"

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Printers"
bindings = ["127.0.0.1:{smtp_port}"]
remote_ip_ranges = ["10.0.0.5"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors]]
name = "Submission"
bindings = ["127.0.0.1:{submission_port}"]
remote_ip_ranges = ["10.0.0.6"]
permission_groups = ["ExchangeUsers"]
auth_mechanism = ["Tls", "BasicAuth", "BasicAuthRequireTLS"]

[[dkim]]
domain = "corp.example"
selector = "s1"
key_file = "corp.key"
"""


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """The config in conf/, the relay's working directory srv/ (with the token), and an empty
    directory the administrator runs the commands from."""
    dirs = {name: tmp_path / name for name in ("conf", "srv", "elsewhere", "data")}
    for d in dirs.values():
        d.mkdir()
    token = dirs["srv"] / "api.token"
    token.write_text("a-long-enough-admin-token-0123456789\n", encoding="utf-8")
    token.chmod(0o644)  # every local user may read it
    key = write_key(tmp_path / "keys", "corp.example", "s1")
    key.rename(dirs["srv"] / "corp.key")
    dirs["config"] = write(
        dirs["conf"] / "relaygate.toml",
        CONFIG.format(
            data_dir=dirs["data"],
            admin_port=free_port(),
            smtp_port=free_port(),
            submission_port=free_port(),
        ),
    )
    return dirs


@pytest.fixture
def serving(layout: dict[str, Path]) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.Popen(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(layout["config"])],
        cwd=layout["srv"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for_ready_line(proc) is not None, "relaygate serve did not start"
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_audit_reads_relative_files_where_the_running_relay_does(
    layout: dict[str, Path], serving: subprocess.Popen[bytes]
) -> None:
    r = run("audit", "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"])
    findings = r.json()["findings"]
    readable = [f for f in findings if f["code"] == "secret-file-readable"]
    assert [(f["key"], f["severity"]) for f in readable] == [("admin.api_token_file", "medium")], (
        r.out
    )
    token = layout["srv"] / "api.token"
    assert str(token) in readable[0]["message"] and "0644" in readable[0]["message"]
    (where,) = [f for f in findings if f["code"] == "relative-file-paths"]
    assert where["severity"] == "info" and "admin.api_token_file" in where["message"]
    assert f"running relay (pid {serving.pid})" in where["message"], where["message"]
    assert str(layout["srv"]) in where["message"]


def test_check_reads_relative_files_where_the_running_relay_does(
    layout: dict[str, Path], serving: subprocess.Popen[bytes]
) -> None:
    r = run("check", "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"])
    assert r.code == 0, r.out + r.err
    assert r.json()["valid"] is True


def test_without_a_running_relay_audit_says_where_it_looked(layout: dict[str, Path]) -> None:
    # No relay runs: the files are read from the command's directory (where `relaygate serve`
    # started there would read them), and the finding says so instead of passing in silence.
    r = run("audit", "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"])
    findings = r.json()["findings"]
    (where,) = [f for f in findings if f["code"] == "relative-file-paths"]
    assert "no running relay" in where["message"], where["message"]
    assert str(layout["elsewhere"]) in where["message"]
    assert "admin.api_token_file = api.token" in where["message"]


def test_user_edits_the_users_file_the_running_relay_reads(
    layout: dict[str, Path], serving: subprocess.Popen[bytes]
) -> None:
    # `relaygate user add` run from another directory wrote a users file there, which the relay
    # never reads: the user could not log in, and `user list` showed it as present.
    r = run(
        "user", "add", "bob", "--password-stdin", "--config", str(layout["config"]),
        cwd=layout["elsewhere"], stdin="correct horse battery\n",
    )  # fmt: skip
    assert r.code == 0, r.out + r.err
    assert (layout["srv"] / "users.json").exists()
    assert not (layout["elsewhere"] / "users.json").exists()
    listed = run(
        "user", "list", "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"]
    )
    assert listed.json()["users"] == ["bob"]
    assert listed.json()["users_file"] == str(layout["srv"] / "users.json")
    # explain --auth-user looks the user up in the same file (it said "not in the users file")
    explained = run(
        "explain", "--client-ip", "10.0.0.6", "--auth-user", "bob", "--to", "a@corp.example",
        "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"],
    )  # fmt: skip
    assert explained.code == 0, explained.out + explained.err
    assert "not in the users file" not in explained.out, explained.out


def test_dkim_show_and_doctor_read_the_key_the_running_relay_signs_with(
    layout: dict[str, Path], serving: subprocess.Popen[bytes], loopback_dns: Any
) -> None:
    # Both said the relative key_file could not be read (it is in the relay's directory), and
    # the doctor then could not compare the published record with the relay's key.
    shown = run(
        "dkim", "show", "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"]
    )
    (key,) = shown.json()["keys"]
    assert key["error"] is None and key["key_file"] == str(layout["srv"] / "corp.key"), shown.out
    record = load_private_key(layout["srv"] / "corp.key", "rsa-sha256").record
    loopback_dns.add("corp.example", "MX", (10, "mx1.corp.example"))
    loopback_dns.add("mx1.corp.example", "A", "192.0.2.10")
    loopback_dns.add("s1._domainkey.corp.example", "TXT", record)
    doctor = run(
        "doctor", "corp.example", "--dns-server", loopback_dns.address,
        "--config", str(layout["config"]), "--json", cwd=layout["elsewhere"],
    )  # fmt: skip
    dkim = [
        (f["severity"], f["summary"]) for f in doctor.json()["findings"] if f["check"] == "DKIM"
    ]
    assert dkim == [
        ("ok", "DKIM record at s1._domainkey.corp.example matches the relay's rsa key")
    ], doctor.out + doctor.err
