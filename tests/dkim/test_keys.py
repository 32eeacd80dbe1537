"""Key generation, storage permissions and the DNS record."""

from __future__ import annotations

import base64
import stat

import pytest
from cryptography.hazmat.primitives.serialization import load_der_public_key

from relaygate.dkim.keys import (
    DkimKeyError,
    dns_record,
    generate_key,
    key_path,
    load_any_key,
    load_private_key,
    record_name,
    split_txt,
    write_key,
)


def test_rsa_key_is_2048_bits_and_record_is_spki():
    pem, record = generate_key("rsa-sha256")
    assert pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(record.split("p=", 1)[1])
    assert load_der_public_key(der).key_size == 2048
    assert dns_record(pem, "rsa-sha256") == record


def test_ed25519_record_is_raw_32_bytes():
    pem, record = generate_key("ed25519-sha256")
    assert record.startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(record.split("p=", 1)[1])) == 32
    assert dns_record(pem, "ed25519-sha256") == record


def test_unknown_algorithm_is_refused():
    with pytest.raises(DkimKeyError, match="unknown DKIM algorithm"):
        generate_key("rsa-sha1")


def test_record_name():
    assert record_name("S1", "Corp.Example.") == "s1._domainkey.corp.example"
    with pytest.raises(DkimKeyError):
        record_name("bad selector", "corp.example")
    with pytest.raises(DkimKeyError):
        record_name("s1", "localhost")


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_write_key_permissions_and_reload(tmp_path, algorithm):
    path = write_key(tmp_path, "corp.example", "s1", algorithm)
    assert (
        path
        == tmp_path / "dkim" / "corp.example" / "s1.key"
        == key_path(tmp_path, "corp.example", "s1")
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "dkim").stat().st_mode) == 0o700
    loaded = load_private_key(path, algorithm)
    assert loaded.record == dns_record(path.read_bytes(), algorithm)
    assert load_any_key(path).algorithm == algorithm
    assert not list(path.parent.glob(".*tmp"))  # no temp file left behind


def test_write_key_refuses_to_overwrite_unless_forced(tmp_path):
    path = write_key(tmp_path, "corp.example", "s1")
    before = path.read_bytes()
    with pytest.raises(DkimKeyError, match="already exists; use --force"):
        write_key(tmp_path, "corp.example", "s1")
    assert path.read_bytes() == before
    write_key(tmp_path, "corp.example", "s1", force=True)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(DkimKeyError, match="cannot read DKIM key"):
        load_private_key(tmp_path / "missing.key", "rsa-sha256")
    ed = write_key(tmp_path, "corp.example", "e1", "ed25519-sha256")
    with pytest.raises(DkimKeyError, match="needs an RSA key"):
        load_private_key(ed, "rsa-sha256")
    junk = tmp_path / "junk.key"
    junk.write_text("hello")
    with pytest.raises(DkimKeyError, match=str(junk)):
        load_any_key(junk)


def test_raw_base64_ed25519_seed_is_accepted(tmp_path):
    """dkimpy's dknewkey and rspamd store the Ed25519 seed as bare base64."""
    path = write_key(tmp_path, "corp.example", "e1", "ed25519-sha256")
    loaded = load_private_key(path, "ed25519-sha256")
    raw = tmp_path / "seed.key"
    raw.write_bytes(loaded.dkimpy_key + b"\n")
    assert load_private_key(raw, "ed25519-sha256").record == loaded.record


def test_split_txt():
    value = "x" * 600
    parts = split_txt(value)
    assert [len(p) for p in parts] == [255, 255, 90]
    assert "".join(parts) == value
