"""`relaygate user add/send-as/remove --json`: every verb that prints data takes --json (the
project's rule); these three printed text only, and an error given --json stayed text."""

from __future__ import annotations

from pathlib import Path

from tests.cli_admin.helpers import run, write


def _config(tmp_path: Path) -> str:
    return str(write(tmp_path / "relaygate.toml", f'[server]\ndata_dir = "{tmp_path / "data"}"\n'))


def test_user_edits_print_json(tmp_path: Path) -> None:
    config = _config(tmp_path)
    users_file = str(tmp_path / "data" / "users.json")
    added = run("user", "add", "Bob", "--password-stdin", "--send-as", "bob@corp.example",
                "--config", config, "--json", stdin="correct horse battery\n")  # fmt: skip
    assert added.code == 0, added.out + added.err
    assert added.json() == {
        "user": "bob",
        "users_file": users_file,
        "added": True,
        "send_as": ["bob@corp.example"],
    }
    again = run("user", "add", "bob", "--password-stdin", "--config", config, "--json",
                stdin="another password\n")  # fmt: skip
    assert again.json()["added"] is False and again.json()["send_as"] == ["bob@corp.example"]
    listed = run("user", "send-as", "bob", "*@corp.example", "--config", config, "--json")
    assert listed.code == 0, listed.out + listed.err
    assert listed.json() == {"user": "bob", "users_file": users_file, "send_as": ["*@corp.example"]}
    cleared = run("user", "send-as", "bob", "--clear", "--config", config, "--json")
    assert cleared.json()["send_as"] is None
    removed = run("user", "remove", "bob", "--config", config, "--json")
    assert removed.code == 0, removed.out + removed.err
    assert removed.json() == {"user": "bob", "users_file": users_file, "removed": True}


def test_user_errors_under_json_are_json_naming_the_user(tmp_path: Path) -> None:
    config = _config(tmp_path)
    for args in (("remove", "nobody"), ("send-as", "nobody", "x@corp.example")):
        r = run("user", *args, "--config", config, "--json")
        assert r.code == 1, r.out + r.err
        assert r.json()["ok"] is False
        assert "no user 'nobody' in " in r.json()["error"], r.out
        assert r.err == ""  # no traceback, no text beside the JSON
    r = run("user", "add", "bob", "--password-stdin", "--send-as", "scan*@corp.example",
            "--config", config, "--json")  # fmt: skip
    assert r.code == 1 and "scan*@corp.example" in r.json()["error"], r.out + r.err
