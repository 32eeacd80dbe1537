"""A renewed ACME certificate is swapped in without stalling the event loop.

The ACME client replaces certificate.key/.pem under the exclusive lock of
relaygate.acme.files and keeps holding it while it writes and fsyncs certificate.names and
certificate.directory; on a slow disk that takes seconds. The listeners read the pair under the
same lock (shared), so a swap that waited for it on the event loop froze every SMTP session
until the writer was done. Here the test holds the writer's lock itself while the relay swaps.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from relaygate.acme.files import (
    ACME_DIR,
    DIRECTORY_FILE,
    LOCK_FILE,
    NAMES_FILE,
    files_lock,
    replace_pair,
    write_private,
)
from tests.acme.helpers import implicit_certificate, starttls_certificate
from tests.smtp.conftest import FQDN, relay_connector
from tests.smtp.helpers import free_port

DIRECTORY = f"https://127.0.0.1:{free_port()}/directory"  # nothing listens: no order succeeds


def _acme_server() -> dict[str, object]:
    return {
        "acme_directory_url": DIRECTORY,
        "acme_email": "hostmaster@corp.example",
        "acme_domains": [FQDN],
        "acme_http_listen": f"127.0.0.1:{free_port()}",
    }


def _new_pair(ca: trustme.CA, data_dir: Path) -> tuple[bytes, bytes, int]:
    """(key, chain, serial) of a certificate for the relay, as the CA would issue it."""
    cert = ca.issue_cert(FQDN, "127.0.0.1")
    chain = b"".join(blob.bytes() for blob in cert.cert_chain_pems)
    serial = x509.load_pem_x509_certificates(chain)[0].serial_number
    return cert.private_key_pem.bytes(), chain, serial


def _install(data_dir: Path, key: bytes, chain: bytes) -> None:
    """What AcmeManager._install writes under the exclusive lock."""
    replace_pair(data_dir, key, chain)
    write_private(data_dir / ACME_DIR / NAMES_FILE, f"{FQDN}\n".encode())
    write_private(data_dir / ACME_DIR / DIRECTORY_FILE, f"{DIRECTORY}\n".encode())


@pytest.fixture
def writer_lock() -> Iterator[list[int]]:
    """Descriptors holding the ACME writer's lock; released at the end whatever happens."""
    held: list[int] = []
    yield held
    for fd in held:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_a_renewal_still_holding_the_files_lock_does_not_stall_sessions(relay, writer_lock):
    ca = trustme.CA()
    root = ca.cert_pem.bytes()
    r = relay(
        [
            relay_connector(),
            relay_connector(
                ("0.0.0.0-255.255.255.255",),
                name="Implicit TLS",
                bindings=["127.0.0.1:{port2}"],
                tls_mode="implicit",
            ),
        ],
        server=_acme_server(),
        start=False,
    )
    (r.data_dir / ACME_DIR).mkdir(parents=True)
    key, chain, first = _new_pair(ca, r.data_dir)
    with files_lock(r.data_dir, exclusive=True):
        _install(r.data_dir, key, chain)
    r.start()
    starttls = starttls_certificate(r.port, root, FQDN, source="127.0.0.5")
    assert starttls.serial_number == first
    assert implicit_certificate(r.ports[1], root, FQDN).serial_number == first

    # the ACME client renews: the new pair is in place, the lock not yet released
    key, chain, second = _new_pair(ca, r.data_dir)
    fd = os.open(r.data_dir / ACME_DIR / LOCK_FILE, os.O_RDWR)
    writer_lock.append(fd)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _install(r.data_dir, key, chain)
    assert r.loop is not None
    swap = asyncio.run_coroutine_threadsafe(r.relay.refresh_certificates(), r.loop)

    # sessions go on meanwhile, STARTTLS with the certificate loaded before
    with r.smtp(timeout=5) as client:
        assert client.ehlo()[0] == 250
    during = starttls_certificate(r.port, root, FQDN, source="127.0.0.5")
    assert during.serial_number == first
    assert not swap.done()  # the pair is read only once the writer is done with it

    fcntl.flock(fd, fcntl.LOCK_UN)
    swap.result(10)
    assert starttls_certificate(r.port, root, FQDN, source="127.0.0.5").serial_number == second
    assert implicit_certificate(r.ports[1], root, FQDN).serial_number == second


def test_the_first_starttls_after_start_does_not_wait_for_the_writer(relay, writer_lock):
    """The contexts are built at start, not by the first STARTTLS: one that came while the ACME
    client (the supervisor's, with workers) held the lock froze the process's sessions."""
    ca = trustme.CA()
    root = ca.cert_pem.bytes()
    r = relay([relay_connector()], server=_acme_server(), start=False)
    (r.data_dir / ACME_DIR).mkdir(parents=True)
    key, chain, serial = _new_pair(ca, r.data_dir)
    with files_lock(r.data_dir, exclusive=True):
        _install(r.data_dir, key, chain)
    r.start()
    fd = os.open(r.data_dir / ACME_DIR / LOCK_FILE, os.O_RDWR)
    writer_lock.append(fd)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a renewal is being written
    assert starttls_certificate(r.port, root, FQDN, source="127.0.0.5").serial_number == serial
