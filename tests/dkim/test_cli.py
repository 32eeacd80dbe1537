"""`relaygate dkim new/show` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import dkim
from relaygate.dkim.signer import DkimSigner
from tests.support.fixtures import loopback_dns_fixture  # noqa: F401


def relaygate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    env["COLUMNS"] = "200"
    return subprocess.run(
        [sys.executable, "-m", "relaygate", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_new_writes_key_and_prints_record(tmp_path, loopback_dns):
    data = tmp_path / "data"
    proc = relaygate(
        "dkim", "new", "--domain", "Corp.Example", "--selector", "s2026", "--data-dir", str(data),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key = data / "dkim" / "corp.example" / "s2026.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    out = proc.stdout
    assert f"Key written to {key} (mode 0600)." in out
    assert "  Name:  s2026._domainkey.corp.example\n" in out
    assert "  Type:  TXT\n" in out
    value = next(line for line in out.splitlines() if line.startswith("  Value: "))[9:]
    assert value.startswith("v=DKIM1; k=rsa; p=MIIB")
    # the BIND form splits the 2048-bit key into <=255-byte strings that rejoin to the value
    zone_lines = out.split("Zone file (BIND) form:\n")[1].split("Then add")[0]
    strings = [line.strip().strip('( )"') for line in zone_lines.splitlines()[1:]]
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == value
    assert 'key_file = "' + str(key) + '"' in out

    # publish exactly what was printed; a message signed with the key verifies
    loopback_dns.add("s2026._domainkey.corp.example", "TXT", value)

    class Entry:
        domain, selector, key_file, algorithm, headers, enabled = (
            "corp.example", "s2026", key, "rsa-sha256", [], True
        )  # fmt: skip

    message = b"From: copier@corp.example\r\nTo: x@ext.example\r\nSubject: t\r\n\r\nhello\r\n"
    signed = DkimSigner([Entry()]).sign(message, envelope_sender="copier@corp.example")
    assert dkim.verify(signed.data, dnsfunc=loopback_dns.txt_lookup)


def test_new_json_ed25519_and_refuses_overwrite(tmp_path):
    data = tmp_path / "data"
    args = ["dkim", "new", "--domain", "corp.example", "--selector", "e1", "--data-dir", str(data)]
    proc = relaygate(*args, "--algorithm", "ed25519-sha256", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["algorithm"] == "ed25519-sha256"
    assert info["record"]["name"] == "e1._domainkey.corp.example"
    assert info["record"]["type"] == "TXT"
    assert info["record"]["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert info["record"]["strings"] == [info["record"]["value"]]
    before = Path(info["key_file"]).read_bytes()

    again = relaygate(*args, cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists; use --force" in again.stderr
    assert Path(info["key_file"]).read_bytes() == before

    forced = relaygate(*args, "--force", "--algorithm", "ed25519-sha256", cwd=tmp_path)
    assert forced.returncode == 0 and Path(info["key_file"]).read_bytes() != before

    bad = relaygate(*args[:-2], "--data-dir", str(data), "--algorithm", "dsa", cwd=tmp_path)
    assert bad.returncode == 1 and "unknown DKIM algorithm" in bad.stderr


def test_show_lists_found_and_configured_keys(tmp_path):
    data = tmp_path / "data"
    for sel, alg in (("s1", "rsa-sha256"), ("e1", "ed25519-sha256")):
        proc = relaygate(
            "dkim", "new", "--domain", "corp.example", "--selector", sel, "--algorithm", alg,
            "--data-dir", str(data), cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    proc = relaygate("dkim", "show", "--data-dir", str(data), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    keys = json.loads(proc.stdout)["keys"]
    assert [(k["domain"], k["selector"], k["algorithm"], k["configured"]) for k in keys] == [
        ("corp.example", "e1", "ed25519-sha256", False),
        ("corp.example", "s1", "rsa-sha256", False),
    ]
    assert keys[1]["record"]["value"].startswith("v=DKIM1; k=rsa; p=")

    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\ndata_dir = "{data}"\n\n'
        '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\nsubdomains = true\n'
        f'key_file = "{data}/dkim/corp.example/s1.key"\n\n'
        '[[dkim]]\ndomain = "other.example"\nselector = "s1"\n'
        f'key_file = "{tmp_path}/missing.key"\nenabled = false\n'
    )
    proc = relaygate("dkim", "show", "--config", str(config), "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    keys = {(k["domain"], k["selector"]): k for k in json.loads(proc.stdout)["keys"]}
    assert keys[("corp.example", "s1")]["configured"] and keys[("corp.example", "s1")]["enabled"]
    assert keys[("corp.example", "s1")]["subdomains"] is True
    assert keys[("other.example", "s1")]["subdomains"] is False
    assert not keys[("corp.example", "e1")]["configured"]
    assert "cannot read DKIM key" in keys[("other.example", "s1")]["error"]

    text = relaygate("dkim", "show", "--config", str(config), cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert (
        "corp.example  selector s1  rsa-sha256  (enabled, signs its subdomains too (d=corp.example))"
        in text.stdout
    )
    assert "other.example  selector s1  rsa-sha256  (disabled)" in text.stdout
    assert "Name:  e1._domainkey.corp.example" in text.stdout


def test_show_empty(tmp_path):
    proc = relaygate("dkim", "show", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0
    assert "No DKIM keys configured or found" in proc.stdout


def test_new_prints_a_key_file_the_relay_finds_from_any_directory(tmp_path):
    """`dkim new --config` writes under the config's data_dir (a relative one is taken from the
    config file's folder) but printed the key's path relative to the command's directory, for
    the [[dkim]] entry to paste, where the relay reads a relative key_file from its own working
    directory (README): from the systemd unit's /var/lib/relaygate, "../data/dkim/..." is not
    the key, the entry is left out and the domain's mail goes unsigned. The path is absolute."""
    config = tmp_path / "relaygate.toml"
    config.write_text('[server]\ndata_dir = "data"\n', encoding="utf-8")
    here = tmp_path / "admin"
    here.mkdir()
    args = ["dkim", "new", "--config", "../relaygate.toml", "--domain", "corp.example"]
    proc = relaygate(*args, "--selector", "s1", "--json", cwd=here)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    key = tmp_path / "data" / "dkim" / "corp.example" / "s1.key"
    assert info["key_file"] == str(key) and key.is_file()
    assert f"key_file = {json.dumps(str(key))}\n" in info["config"]
    text = relaygate(*args, "--selector", "s2", cwd=here)
    assert text.returncode == 0, text.stderr
    assert f"Key written to {key.with_name('s2.key')} (mode 0600)." in text.stdout
    assert f'  key_file = "{key.with_name("s2.key")}"\n' in text.stdout

    # the entry pasted as printed: `check` (as a relay run from another directory) loads it
    config.write_text(config.read_text() + info["config"], encoding="utf-8")
    elsewhere = tmp_path / "var" / "lib"
    elsewhere.mkdir(parents=True)
    checked = relaygate("check", "--config", str(config), cwd=elsewhere)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_key_root_writes_into_the_relays_data_dir_belongs_to_the_relay(tmp_path):
    """`sudo relaygate dkim new --config /etc/relaygate/relaygate.toml` writes under data_dir
    (/var/lib/relaygate, the relaygate user's: the unit makes it). The key and its directories
    were root's, 0600 and 0700: the relay could not read the key ("Permission denied" at start),
    left it out and sent the domain's mail unsigned. Root gives them to data_dir's owner; anyone
    else writes them as their own (as root does into a directory of its own)."""
    data = tmp_path / "data"
    data.mkdir()
    if os.geteuid() == 0:
        nobody = 65534
        os.chown(data, nobody, nobody)
        owner = (nobody, nobody)
    else:
        owner = (os.geteuid(), os.getegid())
    proc = relaygate(
        "dkim", "new", "--domain", "corp.example", "--selector", "s1", "--data-dir", str(data),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key = data / "dkim" / "corp.example" / "s1.key"
    for path, mode in ((key, 0o600), (key.parent, 0o700), (key.parent.parent, 0o700)):
        st = path.stat()
        assert ((st.st_uid, st.st_gid), stat.S_IMODE(st.st_mode)) == (owner, mode), path


def test_new_ed25519_says_an_rsa_key_must_sign_too(tmp_path):
    """An Ed25519 key made alone gave no hint that Gmail, Microsoft 365 and Yahoo do not verify
    it: the admin published it, enabled it, and the domain's mail failed DMARC there. `dkim new`
    says so (text and --json); an RSA key gets no such note."""
    data = tmp_path / "data"
    args = ["dkim", "new", "--domain", "corp.example", "--data-dir", str(data)]
    ed = relaygate(*args, "--selector", "e1", "--algorithm", "ed25519-sha256", cwd=tmp_path)
    assert ed.returncode == 0, ed.stderr
    assert (
        "Note: Gmail, Microsoft 365 and Yahoo do not verify Ed25519 signatures: keep an "
        "rsa-sha256 key for corp.example beside this one (both sign)." in ed.stdout
    )
    info = json.loads(relaygate(*args, "--selector", "e2", "--algorithm", "ed25519-sha256",
                                "--json", cwd=tmp_path).stdout)  # fmt: skip
    assert info["warnings"] == [
        "Gmail, Microsoft 365 and Yahoo do not verify Ed25519 signatures: keep an rsa-sha256 "
        "key for corp.example beside this one (both sign)."
    ]
    rsa_key = relaygate(*args, "--selector", "r1", "--json", cwd=tmp_path)
    assert json.loads(rsa_key.stdout)["warnings"] == []
