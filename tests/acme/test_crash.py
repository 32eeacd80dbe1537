"""A relay that dies while it replaces the ACME certificate and key: what it serves next."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from tests.acme.helpers import (
    attempt,
    file_serial,
    starttls_certificate,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]

#: Orders a new certificate with the relay's configuration, and dies (as by a power cut: no
#: cleanup) when the new chain is about to be renamed onto certificate.pem, after its key was
#: renamed onto certificate.key.
DIE_BEFORE_THE_CHAIN = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from relaygate.acme import AcmeManager
    from relaygate.config import load_config

    replace = os.replace
    def replace_or_die(src, dst, *a, **kw):
        if Path(dst).name == "certificate.pem":
            os._exit(9)
        return replace(src, dst, *a, **kw)
    os.replace = replace_or_die
    AcmeManager(load_config(Path(sys.argv[1]))).obtain("test: renewal")
    """
)


def _spki(pem_key: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem_key, password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_a_crash_between_the_key_and_the_chain_leaves_a_pair_the_relay_serves(
    pebble, relays
) -> None:
    relay = relays(pebble)
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    first = file_serial(relay.cert_file)
    root = pebble.root_pem()
    relay.stop()

    # a renewal (the relay's responder port is free again) that dies half-way through install
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    died = subprocess.run(
        [sys.executable, "-c", DIE_BEFORE_THE_CHAIN, str(relay.config)],
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert died.returncode == 9, died.stderr.decode(errors="replace")

    # The CA is down when the relay comes back: it cannot order a new pair, it must serve one
    # of the two it has (the old one, or the new one completed), never the new key with the
    # old chain (no TLS at all until the CA answers again).
    pebble.stop()
    relay.start()
    cert = wait_until(lambda: attempt(lambda: starttls_certificate(relay.port, root)), timeout=20)
    assert cert is not None, relay.log()
    on_disk = file_serial(relay.cert_file)
    assert cert.serial_number == on_disk != first, relay.log()
    key = (relay.data / "acme" / "certificate.key").read_bytes()
    assert _spki(key) == cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert "TLS unavailable" not in relay.log()


def test_a_crash_before_the_new_chain_was_written_keeps_the_old_pair(tmp_path: Path) -> None:
    from relaygate.acme import files_lock
    from relaygate.acme.files import replace_pair

    folder = tmp_path / "acme"
    folder.mkdir()
    replace_pair(tmp_path, b"old key", b"old chain")
    # died after certificate.key.new was written, before certificate.pem.new was
    (folder / "certificate.key.new").write_bytes(b"new key")
    with files_lock(tmp_path, exclusive=False):
        assert (folder / "certificate.key").read_bytes() == b"old key"
        assert (folder / "certificate.pem").read_bytes() == b"old chain"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".lock",
        "certificate.key",
        "certificate.pem",
    ]
    # died after both were written, before either rename: the new pair is complete, taken
    (folder / "certificate.key.new").write_bytes(b"new key")
    (folder / "certificate.pem.new").write_bytes(b"new chain")
    with files_lock(tmp_path, exclusive=False):
        assert (folder / "certificate.key").read_bytes() == b"new key"
        assert (folder / "certificate.pem").read_bytes() == b"new chain"
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".new")]
