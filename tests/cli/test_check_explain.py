"""`relaygate check` and `relaygate explain` as subprocesses on the example configs, text and --json."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FIVE_ERRORS = ROOT / "tests" / "config" / "configs" / "five_errors.toml"

OK = "250 2.1.5 Recipient OK"
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"


def run(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    full_env.update({"PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "200"})
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args],
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=60,
        cwd=cwd or ROOT,
        env=full_env,
        check=False,
    )


@pytest.fixture
def configs(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for name in ("seed-before", "seed-after-method-a", "seed-after-method-b"):
        out[name] = Path(shutil.copy(EXAMPLES / f"{name}.toml", tmp_path / f"{name}.toml"))
    out["invalid"] = Path(shutil.copy(FIVE_ERRORS, tmp_path / "invalid.toml"))
    return out


# --- check ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "connectors"), [("seed-before", 1), ("seed-after-method-a", 2), ("seed-after-method-b", 2)]
)
def test_check_valid(configs: dict[str, Path], name: str, connectors: int) -> None:
    path = configs[name]
    text = run("check", "--config", str(path))
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == (
        f"{path}: OK ({connectors} receive connector(s), 0 send connector(s), 1 accepted domain(s))"
    )
    as_json = run("check", "--config", str(path), "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {
        "valid": True,
        "source": str(path),
        "receive_connectors": connectors,
        "send_connectors": 0,
        "accepted_domains": 1,
    }


def test_check_invalid_lists_every_error(configs: dict[str, Path]) -> None:
    path = configs["invalid"]
    result = run("check", "--config", str(path))
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6, result.stdout
    assert lines[-1] == f"{path}: 5 error(s)"
    for line, connector in zip(lines, ["Printers", "Scanners", "ERP", "Monitoring", "Backup"], strict=False):
        assert line.startswith(f'{path}: receive_connectors[') and f'"{connector}": ' in line, line
    assert "did you mean 'remote_ip_ranges'" in lines[0]
    assert "reversed range" in lines[1]


def test_check_invalid_json(configs: dict[str, Path]) -> None:
    path = configs["invalid"]
    result = run("check", "-c", str(path), "--json")
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["valid"] is False and data["source"] == str(path)
    assert [e["connector"] for e in data["errors"]] == ["Printers", "Scanners", "ERP", "Monitoring", "Backup"]
    assert [e["path"] for e in data["errors"]] == [
        "receive_connectors[0].remote_ip_range",
        "receive_connectors[1].remote_ip_ranges[0]",
        "receive_connectors[2].auth_mechanism",
        "receive_connectors[3].connection_timeout",
        "receive_connectors[4].remote_ip_ranges",
    ]
    for error in data["errors"]:
        assert error["text"].startswith(str(path)) and error["message"] in error["text"]


def test_check_finds_config_through_environment(configs: dict[str, Path], tmp_path: Path) -> None:
    result = run("check", cwd=tmp_path, env={"RELAYGATE_CONFIG": str(configs["seed-after-method-a"])})
    assert result.returncode == 0 and "OK (2 receive connector(s)" in result.stdout
    default = run("check", cwd=tmp_path)  # no file anywhere: the embedded default
    assert default.returncode == 0 and default.stdout.startswith("<embedded default>: OK")


def test_check_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[receive_connectors]\nname = 'x'\n", encoding="utf-8")
    result = run("check", "-c", str(path))
    assert result.returncode == 1 and f"{path}: (syntax): not valid TOML" in result.stdout


# --- explain -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["seed-after-method-a", "seed-after-method-b"])
def test_explain_text_relay_client(configs: dict[str, Path], name: str) -> None:
    result = run(
        "explain", "-c", str(configs[name]), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25",
        "--from", "scanner@corp.example", "--to", "it@corp.example", "--to", "someone@gmail.com",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Client 10.0.0.5 → 0.0.0.0:25" in out
    assert "Connector: SMTP Relay EXCH01" in out
    assert "why: binding 0.0.0.0:25 (wildcard), narrowest matching RemoteIPRanges entry 10.0.0.0/24" in out
    assert "beat Default Frontend EXCH01: range 0.0.0.0-255.255.255.255 is wider than 10.0.0.0/24" in out
    assert "ms-Exch-SMTP-Accept-Any-Recipient  ← " in out
    assert "MAIL FROM:<scanner@corp.example> → 250 2.1.0 Sender OK" in out
    assert f"RCPT TO:<it@corp.example> → {OK}" in out
    assert f"RCPT TO:<someone@gmail.com> → {OK}" in out
    assert "because session has ms-Exch-SMTP-Accept-Any-Recipient" in out
    if name.endswith("-b"):
        assert "Runs as: MS Exchange\\Externally Secured Servers" in out
    else:
        assert "ms-Exch-SMTP-Accept-Any-Recipient  ← permission for NT AUTHORITY\\ANONYMOUS LOGON" in out


def test_explain_text_before_the_fix(configs: dict[str, Path]) -> None:
    result = run(
        "explain", "-c", str(configs["seed-before"]), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25",
        "--to", "someone@gmail.com",
    )  # fmt: skip
    assert result.returncode == 0
    assert "Connector: Default Frontend EXCH01" in result.stdout
    assert f"RCPT TO:<someone@gmail.com> → {RELAY_DENIED}" in result.stdout
    assert "lacks ms-Exch-SMTP-Accept-Any-Recipient" in result.stdout
    assert "(reply delayed by the 5s tarpit)" in result.stdout


def test_explain_json_with_local(configs: dict[str, Path]) -> None:
    result = run(
        "explain", "-c", str(configs["seed-after-method-a"]), "--client-ip", "192.168.12.5",
        "--local", "0.0.0.0:25", "--from", "<>", "--to", "a@gmail.com", "--to", "<victim@[127.0.0.1]>",
        "--to", "bad@@x", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["client_ip"] == "192.168.12.5" and data["local"] == "0.0.0.0:25"
    assert data["connector"] == "SMTP Relay EXCH01"
    assert data["binding"] == "0.0.0.0:25"
    assert data["matched_range"] == "192.168.12.5"
    assert data["beaten"] == [
        {
            "connector": "Default Frontend EXCH01",
            "range": "0.0.0.0-255.255.255.255",
            "why": "range 0.0.0.0-255.255.255.255 is wider than 192.168.12.5",
        }
    ]
    assert data["principals"][0] == "NT AUTHORITY\\ANONYMOUS LOGON"
    rights = {r["right"]: r for r in data["rights"]}
    assert set(rights) == {
        "ms-Exch-SMTP-Submit",
        "ms-Exch-SMTP-Accept-Any-Recipient",
        "ms-Exch-SMTP-Accept-Any-Sender",
        "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender",
        "ms-Exch-Accept-Headers-Routing",
    }
    assert rights["ms-Exch-SMTP-Accept-Any-Recipient"]["token"] == "SMTPAcceptAnyRecipient"
    assert data["mail"]["reply"] == "250 2.1.0 Sender OK" and data["mail"]["reason"] == "null reverse-path"
    replies = [(r["address"], r["reply"]) for r in data["recipients"]]
    assert replies == [
        ("a@gmail.com", OK),
        ("<victim@[127.0.0.1]>", "550 5.7.1 Recipient address literal not accepted"),
        ("bad@@x", "501 5.1.3 Invalid address"),
    ]


def test_explain_json_without_local_covers_every_binding(configs: dict[str, Path]) -> None:
    result = run(
        "explain", "-c", str(configs["seed-after-method-b"]), "--client-ip", "10.0.1.5", "--to", "a@gmail.com",
        "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    endpoints = json.loads(result.stdout)["endpoints"]
    assert [e["local"] for e in endpoints] == ["0.0.0.0:25", "[::]:25"]
    for e in endpoints:  # outside the relay connector's ranges: Default Frontend, relay refused
        assert e["connector"] == "Default Frontend EXCH01"
        assert e["recipients"][0]["reply"] == RELAY_DENIED
        assert {c["connector"] for c in e["not_candidates"]} == {"SMTP Relay EXCH01"}


def test_explain_text_without_local(configs: dict[str, Path]) -> None:
    result = run("explain", "-c", str(configs["seed-after-method-a"]), "--client-ip", "10.0.0.5", "--to", "a@gmail.com")
    assert result.returncode == 0
    assert "Client 10.0.0.5 → 0.0.0.0:25" in result.stdout and "Client 10.0.0.5 → [::]:25" in result.stdout
    assert result.stdout.count("Connector: SMTP Relay EXCH01") == 2


def test_explain_no_connector(configs: dict[str, Path]) -> None:
    args = ["explain", "-c", str(configs["seed-after-method-a"]), "--client-ip", "10.0.0.5", "--local", "10.9.9.9:587"]
    text = run(*args, "--to", "a@gmail.com")
    assert text.returncode == 0
    assert "Connector: none — the connection is closed without a banner." in text.stdout
    data = json.loads(run(*args, "--to", "a@gmail.com", "--json").stdout)
    assert data["connector"] is None and data["recipients"][0]["reply"] is None


def test_explain_mail_without_submit(tmp_path: Path) -> None:
    text = (EXAMPLES / "seed-after-method-a.toml").read_text(encoding="utf-8")
    path = tmp_path / "no-groups.toml"
    path.write_text(text.replace('permission_groups = ["AnonymousUsers"]\n', ""), encoding="utf-8")
    result = run("explain", "-c", str(path), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25", "--to", "a@gmail.com", "--json")
    data = json.loads(result.stdout)
    assert data["mail"]["reply"] == "530 5.7.1 Client was not authenticated"
    assert data["recipients"][0]["reply"] == "503 5.5.2 Need mail command"


def test_explain_refuses_bad_input(configs: dict[str, Path]) -> None:
    bad_ip = run("explain", "-c", str(configs["seed-before"]), "--client-ip", "10.0.0.256", "--to", "a@b.example")
    assert bad_ip.returncode == 1 and "--client-ip" in bad_ip.stderr
    bad_local = run("explain", "-c", str(configs["seed-before"]), "--client-ip", "10.0.0.5", "--local", "nowhere")
    assert bad_local.returncode == 1 and "--local" in bad_local.stderr
    invalid = run("explain", "-c", str(configs["invalid"]), "--client-ip", "10.0.0.5", "--to", "a@b.example")
    assert invalid.returncode == 1 and "5 error(s)." in invalid.stderr
