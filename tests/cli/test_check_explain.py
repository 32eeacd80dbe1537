"""`relaygate check` and `relaygate explain` on the example configs, text and --json.

The main cases run as real subprocesses (`python -m relaygate ...`), launched together once per module
because each interpreter start costs about a second; the edge cases run in-process through typer's
CliRunner, which exercises the same command functions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FIVE_ERRORS = ROOT / "tests" / "config" / "configs" / "five_errors.toml"

OK = "250 2.1.5 Recipient OK"
RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
NAMES = ("seed-before", "seed-after-method-a", "seed-after-method-b")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    env.update({"PYTHONIOENCODING": "utf-8", "NO_COLOR": "1", "COLUMNS": "200"})
    return env


def _commands(c: dict[str, str]) -> dict[str, list[str]]:
    """Every subprocess the module needs, by name, given the copied configs' paths."""
    a, b, invalid = c["seed-after-method-a"], c["seed-after-method-b"], c["invalid"]
    return {
        "check a": ["check", "--config", a],
        "check b json": ["check", "-c", b, "--json"],
        "check invalid": ["check", "--config", invalid],
        "check invalid json": ["check", "-c", invalid, "--json"],
        "explain a text": [
            "explain", "-c", a, "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25",
            "--from", "scanner@corp.example", "--to", "it@corp.example", "--to", "someone@gmail.com",
        ],
        "explain a json local": [
            "explain", "-c", a, "--client-ip", "192.168.12.5", "--local", "0.0.0.0:25", "--from", "<>",
            "--to", "a@gmail.com", "--to", "<victim@[127.0.0.1]>", "--to", "bad@@x", "--json",
        ],
        "explain b json no local": [
            "explain", "-c", b, "--client-ip", "10.0.1.5", "--to", "a@gmail.com", "--json",
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cli")
    out = {
        name: Path(shutil.copy(EXAMPLES / f"{name}.toml", tmp / f"{name}.toml")) for name in NAMES
    }
    out["invalid"] = Path(shutil.copy(FIVE_ERRORS, tmp / "invalid.toml"))
    return out


@pytest.fixture(scope="module")
def ran(paths: dict[str, Path]) -> dict[str, subprocess.CompletedProcess[str]]:
    commands = _commands({k: str(v) for k, v in paths.items()})

    def one(args: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "relaygate", *args],
            capture_output=True,
            text=True,
            encoding="utf-8",
            timeout=120,
            cwd=ROOT,
            env=_env(),
            check=False,
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(commands, pool.map(one, commands.values()), strict=True))
    return results


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[CliRunner]:
    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)  # no ./relaygate.toml here
    yield CliRunner()


def _invoke(runner: CliRunner, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    from relaygate.cli import app

    return runner.invoke(app, list(args), env=env)


# --- check ------------------------------------------------------------------------------------------

Ran = dict[str, subprocess.CompletedProcess[str]]


def test_check_valid_text(ran: Ran, cli: CliRunner, paths: dict[str, Path]) -> None:
    result = ran["check a"]
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        f"{paths['seed-after-method-a']}: OK (2 receive connector(s), 0 send connector(s), 1 accepted domain(s))"
    )
    before = _invoke(cli, "check", "--config", str(paths["seed-before"]))
    assert before.exit_code == 0, before.output
    assert before.stdout.strip() == (
        f"{paths['seed-before']}: OK (1 receive connector(s), 0 send connector(s), 1 accepted domain(s))"
    )


def test_check_valid_json(ran: Ran, cli: CliRunner, paths: dict[str, Path]) -> None:
    result = ran["check b json"]
    assert result.returncode == 0, result.stderr
    expected = {"valid": True, "receive_connectors": 2, "send_connectors": 0, "accepted_domains": 1}
    assert json.loads(result.stdout) == {**expected, "source": str(paths["seed-after-method-b"])}
    in_process = _invoke(cli, "check", "--config", str(paths["seed-after-method-a"]), "--json")
    assert in_process.exit_code == 0, in_process.output
    assert json.loads(in_process.stdout) == {
        **expected,
        "source": str(paths["seed-after-method-a"]),
    }


def test_check_invalid_lists_every_error(ran: Ran, paths: dict[str, Path]) -> None:
    path = paths["invalid"]
    result = ran["check invalid"]
    assert result.returncode == 1
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 6, result.stdout
    assert lines[-1] == f"{path}: 5 error(s)"
    for line, connector in zip(
        lines, ["Printers", "Scanners", "ERP", "Monitoring", "Backup"], strict=False
    ):
        assert line.startswith(f"{path}: receive_connectors[") and f'"{connector}": ' in line, line
    assert "did you mean 'remote_ip_ranges'" in lines[0]
    assert "reversed range" in lines[1]
    assert "ExternalAuthoritative requires" in lines[2]
    assert "not above 00:05:00" in lines[3]
    assert "partially overlaps" in lines[4]


def test_check_invalid_json(ran: Ran, paths: dict[str, Path]) -> None:
    path = paths["invalid"]
    result = ran["check invalid json"]
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["valid"] is False and data["source"] == str(path)
    assert [e["connector"] for e in data["errors"]] == [
        "Printers",
        "Scanners",
        "ERP",
        "Monitoring",
        "Backup",
    ]
    assert [e["path"] for e in data["errors"]] == [
        "receive_connectors[0].remote_ip_range",
        "receive_connectors[1].remote_ip_ranges[0]",
        "receive_connectors[2].auth_mechanism",
        "receive_connectors[3].connection_timeout",
        "receive_connectors[4].remote_ip_ranges",
    ]
    for error in data["errors"]:
        assert error["text"].startswith(str(path)) and error["message"] in error["text"]


def test_check_finds_config_through_environment(cli: CliRunner, paths: dict[str, Path]) -> None:
    result = _invoke(cli, "check", env={"RELAYGATE_CONFIG": str(paths["seed-after-method-b"])})
    assert result.exit_code == 0 and "OK (2 receive connector(s)" in result.stdout
    default = _invoke(cli, "check")  # no file anywhere: the embedded default
    assert default.exit_code == 0 and default.stdout.startswith("<embedded default>: OK")


def test_check_syntax_error(cli: CliRunner, tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("[[receive_connectors]\nname = 'x'\n", encoding="utf-8")
    result = _invoke(cli, "check", "-c", str(path))
    assert result.exit_code == 1 and f"{path}: (syntax): not valid TOML" in result.stdout


# --- explain -----------------------------------------------------------------------------------------


def test_explain_text_relay_client(ran: Ran) -> None:
    result = ran["explain a text"]
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Client 10.0.0.5 → 0.0.0.0:25" in out
    assert "Connector: SMTP Relay EXCH01" in out
    assert (
        "why: binding 0.0.0.0:25 (wildcard), narrowest matching RemoteIPRanges entry 10.0.0.0/24"
        in out
    )
    assert (
        "beat Default Frontend EXCH01: range 0.0.0.0-255.255.255.255 is wider than 10.0.0.0/24"
        in out
    )
    assert "Runs as: NT AUTHORITY\\ANONYMOUS LOGON, Everyone" in out
    assert (
        "ms-Exch-SMTP-Accept-Any-Recipient  ← permission for NT AUTHORITY\\ANONYMOUS LOGON" in out
    )
    assert "ms-Exch-SMTP-Submit  ← PermissionGroups AnonymousUsers" in out
    assert "MAIL FROM:<scanner@corp.example> → 250 2.1.0 Sender OK" in out
    assert f"RCPT TO:<it@corp.example> → {OK}" in out
    assert f"RCPT TO:<someone@gmail.com> → {OK}" in out
    assert "because session has ms-Exch-SMTP-Accept-Any-Recipient" in out
    assert "route: " in out and "RouteExplanation(" not in out


def test_explain_text_method_b(cli: CliRunner, paths: dict[str, Path]) -> None:
    result = _invoke(
        cli, "explain", "-c", str(paths["seed-after-method-b"]), "--client-ip", "192.168.12.5",
        "--local", "0.0.0.0:25", "--to", "someone@gmail.com",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Connector: SMTP Relay EXCH01" in result.stdout
    assert "Runs as: MS Exchange\\Externally Secured Servers" in result.stdout
    assert "ms-Exch-Bypass-Message-Size-Limit  ← PermissionGroups ExchangeServers" in result.stdout
    assert f"RCPT TO:<someone@gmail.com> → {OK}" in result.stdout


def test_explain_text_before_the_fix(cli: CliRunner, paths: dict[str, Path]) -> None:
    result = _invoke(
        cli, "explain", "-c", str(paths["seed-before"]), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25",
        "--to", "someone@gmail.com",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Connector: Default Frontend EXCH01" in result.stdout
    assert f"RCPT TO:<someone@gmail.com> → {RELAY_DENIED}" in result.stdout
    assert "lacks ms-Exch-SMTP-Accept-Any-Recipient" in result.stdout
    assert "(reply delayed by the 5s tarpit)" in result.stdout


def test_explain_json_with_local(ran: Ran) -> None:
    result = ran["explain a json local"]
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
    assert (
        data["mail"]["reply"] == "250 2.1.0 Sender OK"
        and data["mail"]["reason"] == "null reverse-path"
    )
    replies = [(r["address"], r["reply"]) for r in data["recipients"]]
    assert replies == [
        ("a@gmail.com", OK),
        # the relay's own loopback literal: 550 5.1.1, as the server answers (relay_local_ips)
        ("<victim@[127.0.0.1]>", "550 5.1.1 User unknown"),
        ("bad@@x", "501 5.1.3 Invalid address"),
    ]
    assert isinstance(data["recipients"][0]["route"], dict)


def test_explain_json_without_local_covers_every_binding(ran: Ran) -> None:
    result = ran["explain b json no local"]
    assert result.returncode == 0, result.stderr
    endpoints = json.loads(result.stdout)["endpoints"]
    assert [e["local"] for e in endpoints] == ["0.0.0.0:25", "[::]:25"]
    for e in endpoints:  # outside the relay connector's ranges: Default Frontend, relay refused
        assert e["connector"] == "Default Frontend EXCH01"
        assert e["recipients"][0]["reply"] == RELAY_DENIED
        assert {c["connector"] for c in e["not_candidates"]} == {"SMTP Relay EXCH01"}


def test_explain_text_without_local(cli: CliRunner, paths: dict[str, Path]) -> None:
    args = [
        "explain",
        "-c",
        str(paths["seed-after-method-a"]),
        "--client-ip",
        "10.0.0.5",
        "--to",
        "a@gmail.com",
    ]
    result = _invoke(cli, *args)
    assert result.exit_code == 0, result.output
    assert (
        "Client 10.0.0.5 → 0.0.0.0:25" in result.stdout
        and "Client 10.0.0.5 → [::]:25" in result.stdout
    )
    assert result.stdout.count("Connector: SMTP Relay EXCH01") == 2


def test_explain_no_connector(cli: CliRunner, paths: dict[str, Path]) -> None:
    args = [
        "explain",
        "-c",
        str(paths["seed-after-method-a"]),
        "--client-ip",
        "10.0.0.5",
        "--local",
        "10.9.9.9:587",
    ]
    text = _invoke(cli, *args, "--to", "a@gmail.com")
    assert text.exit_code == 0, text.output
    assert "Connector: none — the connection is closed without a banner." in text.stdout
    data = json.loads(_invoke(cli, *args, "--to", "a@gmail.com", "--json").stdout)
    assert data["connector"] is None and data["recipients"][0]["reply"] is None


def test_explain_mail_without_submit(cli: CliRunner, tmp_path: Path) -> None:
    text = (EXAMPLES / "seed-after-method-a.toml").read_text(encoding="utf-8")
    path = tmp_path / "no-groups.toml"
    path.write_text(text.replace('permission_groups = ["AnonymousUsers"]\n', ""), encoding="utf-8")
    result = _invoke(
        cli, "explain", "-c", str(path), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25", "--to", "a@gmail.com",
        "--json",
    )  # fmt: skip
    data = json.loads(result.stdout)
    assert data["mail"]["reply"] == "530 5.7.1 Client was not authenticated"
    assert data["recipients"][0]["reply"] == "503 5.5.2 Need mail command"


def test_explain_refuses_bad_input(cli: CliRunner, paths: dict[str, Path]) -> None:
    before = str(paths["seed-before"])
    bad_ip = _invoke(
        cli, "explain", "-c", before, "--client-ip", "10.0.0.256", "--to", "a@b.example"
    )
    assert bad_ip.exit_code == 1 and "--client-ip" in bad_ip.stderr
    bad_local = _invoke(
        cli, "explain", "-c", before, "--client-ip", "10.0.0.5", "--local", "nowhere"
    )
    assert bad_local.exit_code == 1 and "--local" in bad_local.stderr
    invalid = _invoke(
        cli,
        "explain",
        "-c",
        str(paths["invalid"]),
        "--client-ip",
        "10.0.0.5",
        "--to",
        "a@b.example",
    )
    assert invalid.exit_code == 1 and "5 error(s)." in invalid.stderr


def test_explain_prints_a_connector_name_that_looks_like_markup(
    cli: CliRunner, tmp_path: Path
) -> None:
    text = (EXAMPLES / "seed-after-method-a.toml").read_text(encoding="utf-8")
    path = tmp_path / "brackets.toml"
    path.write_text(
        text.replace('name = "SMTP Relay EXCH01"', 'name = "Relay [floor 2]"'), encoding="utf-8"
    )
    assert "Relay [floor 2]" in path.read_text(encoding="utf-8")
    result = _invoke(
        cli, "explain", "-c", str(path), "--client-ip", "10.0.0.5", "--local", "0.0.0.0:25", "--to", "a@gmail.com"
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Connector: Relay [floor 2]" in result.stdout


def test_check_reports_an_unreadable_tls_certificate_or_key_naming_connector_and_key(
    cli: CliRunner, tmp_path: Path
) -> None:
    """An implicit-TLS connector whose files are missing does not listen: `check` must say so."""
    from relaygate.smtp.tls import ensure_self_signed

    cert, key = ensure_self_signed(tmp_path / "good", "relay.corp.example")
    path = tmp_path / "relaygate.toml"
    body = """
[[receive_connectors]]
name = "Client Submission 465"
bindings = ["0.0.0.0:465"]
remote_ip_ranges = ["10.0.0.0/8"]
tls_mode = "implicit"
tls_certificate_file = "{cert}"
tls_key_file = "{key}"
"""
    path.write_text(body.format(cert=cert, key=tmp_path / "missing.key"))
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert (
        f'{path}: receive_connectors[0] "Client Submission 465": tls_key_file: '
        f"{tmp_path / 'missing.key'}: cannot read: No such file or directory"
    ) in result.output
    path.write_text(body.format(cert=key, key=key))  # a key where the certificate should be
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 1 and "tls_certificate_file" in result.output, result.output
    path.write_text(body.format(cert=cert, key=key))
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 0, result.output


def test_check_reports_a_dkim_key_that_cannot_be_loaded(cli: CliRunner, tmp_path: Path) -> None:
    """`serve` leaves out a DKIM key it cannot load and that domain's mail goes unsigned (DMARC
    fails): `check` must say so before a reload, naming the entry (it said OK)."""
    from relaygate.dkim.keys import write_key

    good = write_key(tmp_path / "keys", "corp.example", "s1")
    path = tmp_path / "relaygate.toml"
    entry = '[[dkim]]\ndomain = "corp.example"\nselector = "{selector}"\nkey_file = "{key}"\n\n'
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n'
        + entry.format(selector="s1", key=good)
        + entry.format(selector="s2", key=tmp_path / "keys" / "s2.key")
    )
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert (
        f'{path}: dkim[1] "corp.example selector s2": cannot read DKIM key '
        f"{tmp_path / 'keys' / 's2.key'}: No such file or directory"
    ) in " ".join(result.output.split()), result.output
    assert "dkim[0]" not in result.output
    write_key(tmp_path / "keys", "corp.example", "s2").rename(tmp_path / "keys" / "s2.key")
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 0, result.output


def test_check_reports_an_admin_token_file_serve_would_refuse(
    cli: CliRunner, tmp_path: Path
) -> None:
    """A missing, empty or unusable admin.api_token_file stops `serve` at start (an empty one
    once opened the API to everyone); `check` said OK. It reads the file as `serve` does."""
    token = tmp_path / "token"
    path = tmp_path / "relaygate.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n[admin]\napi_token_file = "{token}"\n'
    )
    for content, expected in (
        (None, "admin.api_token_file: cannot read it: No such file or directory"),
        ("\n", "admin.api_token_file: '" + str(token) + "' is empty"),
        ("two words\n", "the API token must be printable ASCII without spaces"),
    ):
        if content is not None:
            token.write_text(content, encoding="utf-8")
        result = _invoke(cli, "check", "--config", str(path))
        assert result.exit_code == 1, (content, result.output)
        assert expected in " ".join(result.output.split()), result.output
    token.write_text("s3cret-token\n", encoding="utf-8")
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0
    disabled = path.read_text().replace("[admin]\n", "[admin]\nenabled = false\n")
    path.write_text(disabled)
    token.unlink()
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0


def test_check_takes_an_empty_path_key_as_unset_naming_a_required_one(
    cli: CliRunner, tmp_path: Path
) -> None:
    """`key = ""` on an optional path key was Path("."): `check` said "Is a directory" (or took the
    key as set). "" now means unset, as `connector set --KEY ""` (which removes the key) does; on
    data_dir, which cannot be unset, it is an error naming the key."""
    from relaygate.dkim.keys import write_key
    from relaygate.smtp.tls import ensure_self_signed

    data = tmp_path / "data"
    write_key(data, "corp.example", "s1")  # the default key_file of the [[dkim]] entry
    path = tmp_path / "relaygate.toml"
    path.write_text(
        f'[server]\ndata_dir = "{data}"\nusers_file = ""\ntls_certificate_file = ""\n'
        'tls_key_file = ""\n\n[admin]\napi_token_file = ""\n\n'
        '[[receive_connectors]]\nname = "Relay"\nbindings = ["0.0.0.0:25"]\n'
        'remote_ip_ranges = ["10.0.0.0/8"]\ntls_certificate_file = ""\ntls_key_file = ""\n\n'
        '[[send_connectors]]\nname = "Out"\naddress_spaces = ["*"]\n'
        'smart_hosts = ["smtp.example.com"]\ndns_routing_enabled = false\ntls_ca_file = ""\n'
        'tls_certificate_file = ""\ntls_key_file = ""\nauth_password_file = ""\n'
        'oauth_client_key_file = ""\noauth_client_certificate_file = ""\n'
        'oauth_client_secret_file = ""\noauth_service_account_file = ""\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\nkey_file = ""\n'
    )
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "Is a directory" not in result.output
    result = _invoke(cli, "check", "--config", str(path), "--json")
    assert result.exit_code == 0 and json.loads(result.output)["valid"] is True, result.output

    # One of a pair given as "" is unset: the pair rule names the key, not "Is a directory".
    cert, key = ensure_self_signed(tmp_path / "tls", "relay.corp.example")
    text = path.read_text()
    path.write_text(
        text.replace('tls_key_file = ""\n\n[[send', f'tls_key_file = "{key}"\n\n[[send', 1)
    )
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 1, result.output
    flat = " ".join(result.output.split())
    assert (
        'receive_connectors[0] "Relay": tls_certificate_file: set both tls_certificate_file and '
        "tls_key_file, or neither"
    ) in flat, result.output
    assert "Is a directory" not in flat
    # The CLI editor agrees: --tls-certificate-file "" (with the key removed too) leaves no key.
    path.write_text(
        text.replace(
            'tls_certificate_file = ""\ntls_key_file = ""\n\n[[send',
            f'tls_certificate_file = "{cert}"\ntls_key_file = "{key}"\n\n[[send',
        )
    )
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0
    result = _invoke(
        cli,
        "connector",
        "set",
        "Relay",
        "-c",
        str(path),
        "--tls-certificate-file",
        "",
        "--tls-key-file",
        "",
    )
    assert result.exit_code == 0, result.output
    assert str(cert) not in path.read_text()
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0

    path.write_text(text.replace(f'data_dir = "{data}"', 'data_dir = ""'))
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert "server.data_dir: must not be empty" in " ".join(result.output.split()), result.output


def test_check_reports_a_users_file_serve_would_refuse(cli: CliRunner, tmp_path: Path) -> None:
    """A users file that is not JSON, or holds a send-as pattern edited in by hand that the
    parser refuses, stops `serve` at start; `check` said OK. It reads the file as `serve` does."""
    users = tmp_path / "data" / "users.json"
    path = tmp_path / "relaygate.toml"
    path.write_text(f'[server]\ndata_dir = "{tmp_path / "data"}"\n')
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0  # no file: no users
    users.parent.mkdir()
    for content, expected in (
        ("{not json", f"server.users_file: {users}: Expecting property name"),
        (
            '{"users": {"erp": "x"}, "send_as": {"erp": ["inv*@corp.example"]}}',
            f"server.users_file: {users}: send_as of user erp: send-as pattern "
            "'inv*@corp.example': '*' is allowed only as",
        ),
    ):
        users.write_text(content, encoding="utf-8")
        result = _invoke(cli, "check", "--config", str(path))
        assert result.exit_code == 1, (content, result.output)
        assert expected in " ".join(result.output.split()), result.output
    users.write_text('{"users": {"erp": "x"}, "send_as": {"erp": ["inv@corp.example"]}}')
    assert _invoke(cli, "check", "--config", str(path)).exit_code == 0


def test_check_reports_a_send_connector_secret_file_delivery_could_not_read(
    cli: CliRunner, tmp_path: Path
) -> None:
    """auth_password_file (BasicAuth) and oauth_client_secret_file (Entra XOAUTH2) are read only
    at a delivery: a missing, empty or non-UTF-8 file deferred every message of the connector
    while `check` said OK. `check` reads them, naming connector, key and file (never the bytes)."""
    password = tmp_path / "smarthost.password"
    secret = tmp_path / "m365.secret"
    path = tmp_path / "relaygate.toml"
    path.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n\n'
        '[[send_connectors]]\nname = "Smart Host"\naddress_spaces = ["*"]\n'
        'smart_hosts = ["smtp.example.com"]\ndns_routing_enabled = false\n'
        'smart_host_auth_mechanism = "BasicAuthRequireTLS"\nauth_username = "relay"\n'
        f'auth_password_file = "{password}"\n\n'
        '[[send_connectors]]\nname = "M365"\naddress_spaces = ["m365.example"]\n'
        'smart_hosts = ["smtp.office365.com"]\ndns_routing_enabled = false\n'
        'smart_host_auth_mechanism = "XOAUTH2"\nauth_username = "relay@corp.example"\n'
        'oauth_tenant_id = "contoso.onmicrosoft.com"\n'
        'oauth_client_id = "00000000-0000-0000-0000-000000000001"\n'
        f'oauth_client_secret_file = "{secret}"\n'
    )
    for content, why in (
        (None, "cannot read it: No such file or directory"),
        (b"\n", "is empty"),
        (b"\xff\xfepass\n", "is not UTF-8 text"),
    ):
        for file in (password, secret):
            if content is not None:
                file.write_bytes(content)
        result = _invoke(cli, "check", "--config", str(path))
        assert result.exit_code == 1, (content, result.output)
        flat = " ".join(result.output.split())
        assert f'send_connectors[0] "Smart Host": auth_password_file: {password}: {why}' in flat, (
            flat
        )
        assert f'send_connectors[1] "M365": oauth_client_secret_file: {secret}: {why}' in flat, flat
        assert "pass" not in flat.replace("password", "")
    password.write_text("s3cret\n", encoding="utf-8")
    secret.write_text("app-secret\n", encoding="utf-8")
    result = _invoke(cli, "check", "--config", str(path))
    assert result.exit_code == 0, result.output
