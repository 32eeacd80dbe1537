"""`relaygate explain` on a connector with allowed_senders / allowed_recipients, text and --json: which
entry let an address through, and the refusals naming the key and the connector."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "config" / "configs" / "good" / "allowed_senders_and_recipients.toml"

ANON_SEND_AS = "550 5.7.1 Anonymous client does not have permissions to send as this sender"
RCPT_NOT_ALLOWED = (
    "550 5.7.1 Client does not have permissions to send to this recipient on this connector"
)
BASE = ["explain", "-c", str(CONFIG), "--client-ip", "10.0.20.7", "--local", "0.0.0.0:25"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[CliRunner]:
    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setenv("NO_COLOR", "1")
    yield CliRunner()


def _invoke(runner: CliRunner, *args: str) -> str:
    from relaygate.cli import app

    result = runner.invoke(app, [*BASE, *args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_explain_sender_refused_text(cli: CliRunner) -> None:
    out = _invoke(cli, "--from", "ceo@corp.example", "--to", "it@corp.example")
    assert f"MAIL FROM:<ceo@corp.example> → {ANON_SEND_AS}" in out
    assert (
        "because sender refused: <ceo@corp.example> is not in allowed_senders of connector "
        "Printers" in out
    )
    assert "allowed_senders: scan@corp.example, *@erp.corp.example" in out


def test_explain_sender_and_recipients_text(cli: CliRunner) -> None:
    out = _invoke(
        cli, "--from", "x@a.branch.corp.example", "--to", "it@corp.example", "--to", "bob@gmail.com",
        "--header-from", "Boss <boss@corp.example>",
    )  # fmt: skip
    assert "MAIL FROM:<x@a.branch.corp.example> → 250 2.1.0 Sender OK" in out
    assert "matches *@*.branch.corp.example in allowed_senders of connector Printers" in out
    assert "RCPT TO:<it@corp.example> → 250 2.1.5 Recipient OK" in out
    assert "matches *@corp.example in allowed_recipients of connector Printers" in out
    assert f"RCPT TO:<bob@gmail.com> → {RCPT_NOT_ALLOWED}" in out
    assert "<bob@gmail.com> is not in allowed_recipients of connector Printers" in out
    assert f"From: Boss <boss@corp.example> → {ANON_SEND_AS}" in out
    assert "From header refused: <boss@corp.example> is not in allowed_senders" in out


def test_explain_json(cli: CliRunner) -> None:
    args = ["--from", "<>", "--to", "alerts@msp.example", "--to", "x@msp.example"]
    data = json.loads(_invoke(cli, *args, "--header-from", "scan@corp.example", "--json"))
    assert data["connector"] == "Printers"
    assert data["allowed_senders"] == [
        "scan@corp.example",
        "*@erp.corp.example",
        "*@*.branch.corp.example",
        "<>",
    ]
    assert data["allowed_recipients"] == ["*@corp.example", "alerts@msp.example"]
    assert data["mail"]["reply"] == "250 2.1.0 Sender OK"
    assert data["mail"]["allowed_by"] == "<>"
    ok, refused = data["recipients"]
    assert ok["reply"] == "250 2.1.5 Recipient OK" and ok["allowed_by"] == "alerts@msp.example"
    assert refused["reply"] == RCPT_NOT_ALLOWED and "allowed_by" not in refused
    assert refused["reason"].startswith(
        "recipient refused: <x@msp.example> is not in allowed_recipients of connector Printers"
    )
    assert data["header_from"] == {
        "value": "scan@corp.example",
        "reply": None,
        "reason": "From header <scan@corp.example> matches scan@corp.example in allowed_senders "
        "of connector Printers",
        "allowed_by": "scan@corp.example",
    }


def test_explain_json_sender_refused(cli: CliRunner) -> None:
    data = json.loads(
        _invoke(cli, "--from", "ceo@corp.example", "--to", "it@corp.example", "--json")
    )
    assert data["mail"] == {
        "address": "ceo@corp.example",
        "reply": ANON_SEND_AS,
        "reason": "sender refused: <ceo@corp.example> is not in allowed_senders of connector "
        "Printers",
        "allowed_by": None,
    }
    assert data["recipients"][0]["reply"] == "503 5.5.2 Need mail command"
