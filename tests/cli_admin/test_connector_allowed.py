"""`relaygate connector set/show/list` with allowed_senders / allowed_recipients: the flags come from the
model (--KEY, --add-KEY, --remove-KEY), entries compare in their canonical spelling, a bad entry is
refused with `check`'s message and leaves the file byte-identical."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_admin.helpers import run, write
from tests.cli_admin.test_connectors import CONFIG, assert_comments_kept, connector

NAME = "SMTP Relay Internal"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    return write(tmp_path / "relaygate.toml", CONFIG)


def test_set_add_remove_and_show(cfg: Path) -> None:
    r = run(
        "connector", "set", NAME, "-c", str(cfg),
        "--allowed-senders", "scan@corp.example,*@erp.corp.example",
        "--allowed-recipients", "*@corp.example",
    )  # fmt: skip
    assert r.code == 0, r.err
    c = connector(cfg, NAME)
    assert c["allowed_senders"] == ["scan@corp.example", "*@erp.corp.example"]
    assert c["allowed_recipients"] == ["*@corp.example"]
    assert_comments_kept(cfg)
    r = run(
        "connector", "set", NAME, "-c", str(cfg),
        "--add-allowed-senders", "<>", "--remove-allowed-senders", "SCAN@Corp.Example",
        "--add-allowed-recipients", "alerts@msp.example",
    )  # fmt: skip
    assert r.code == 0, r.err
    c = connector(cfg, NAME)
    assert c["allowed_senders"] == ["*@erp.corp.example", "<>"]
    assert c["allowed_recipients"] == ["*@corp.example", "alerts@msp.example"]
    shown = run("connector", "show", NAME, "-c", str(cfg), "--json").json()
    assert shown["allowed_senders"] == ["*@erp.corp.example", "<>"]
    assert shown["allowed_recipients"] == ["*@corp.example", "alerts@msp.example"]
    listed = run("connector", "list", "-c", str(cfg), "--json").json()
    assert listed[0]["allowed_senders"] == ["*@erp.corp.example", "<>"]
    assert listed[1]["allowed_senders"] == []  # the default: no restriction
    text = run("connector", "show", NAME, "-c", str(cfg)).out
    assert "allowed_senders" in text and "*@erp.corp.example, <>" in text


def test_bad_entry_refused_file_unchanged(cfg: Path) -> None:
    before = cfg.read_bytes()
    r = run("connector", "set", NAME, "-c", str(cfg), "--add-allowed-senders", "*corp.example")
    assert r.code == 1, r.out
    assert f'{cfg}: receive_connectors[0] "{NAME}": allowed_senders[0]: ' in r.err
    assert "'*' is allowed only as *@domain, *@*.domain or *@*" in r.err
    assert "left unchanged" in r.err
    assert cfg.read_bytes() == before
    r = run("connector", "set", NAME, "-c", str(cfg), "--remove-allowed-recipients", "x@y.example")
    assert r.code == 1 and "is not in allowed_recipients" in r.err
    assert cfg.read_bytes() == before
