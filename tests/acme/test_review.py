"""Review findings: the renewal decision (AcmeManager.due) and the challenge responder's bounds."""

from __future__ import annotations

import socket
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relaygate.acme import AcmeManager, acme_files
from relaygate.acme import responder as acme_responder
from relaygate.config import parse_text

CONFIG = """\
[server]
fqdn = "relay.acme.test"
data_dir = "{data}"
acme_directory_url = "https://127.0.0.1:1/dir"
{extra}
"""


def _config(tmp_path: Path, extra: str = "") -> object:
    return parse_text(CONFIG.format(data=tmp_path, extra=extra), source="relaygate.toml")


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _install(
    data: Path, *, lifetime: timedelta, key_matches: bool = True, age: timedelta = timedelta(0)
) -> None:
    """A certificate for relay.acme.test in <data>/acme, as the manager writes it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.acme.test")])
    start = datetime.now(UTC) - age
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + lifetime)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("relay.acme.test")]), False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = acme_files(data)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    other = key if key_matches else ec.generate_private_key(ec.SECP256R1())
    key_path.write_bytes(_pem_key(other))


def test_a_fresh_matching_certificate_is_not_due(tmp_path: Path) -> None:
    _install(tmp_path, lifetime=timedelta(days=90))
    assert AcmeManager(_config(tmp_path)).due() is None


def test_a_key_that_does_not_match_the_chain_is_due(tmp_path: Path) -> None:
    # A crash between the two renames of _install (key first, then chain) leaves the new key
    # beside the old chain: the listeners cannot load the pair, so it must be ordered anew
    # rather than kept until it expires.
    _install(tmp_path, lifetime=timedelta(days=90), key_matches=False)
    reason = AcmeManager(_config(tmp_path)).due()
    assert reason is not None and "key" in reason


def test_a_short_lived_certificate_is_not_reordered_at_every_check(tmp_path: Path) -> None:
    # A CA issuing 24-hour certificates (step-ca's default) with the default acme_renew_before
    # (30 days): a certificate just obtained must not be due at once, else the relay orders a
    # new one at every acme_check_interval.
    _install(tmp_path, lifetime=timedelta(hours=24))
    assert AcmeManager(_config(tmp_path)).due() is None
    # ... but it is renewed once it has served a third of its life
    _install(tmp_path, lifetime=timedelta(hours=24), age=timedelta(hours=9))
    assert AcmeManager(_config(tmp_path)).due() is not None
    # and an acme_renew_before within two thirds of the life is taken as it is
    sixty = _config(tmp_path, 'acme_renew_before = "60.00:00:00"')
    _install(tmp_path, lifetime=timedelta(days=90), age=timedelta(days=29))
    assert AcmeManager(sixty).due() is None
    _install(tmp_path, lifetime=timedelta(days=90), age=timedelta(days=31))
    assert AcmeManager(sixty).due() is not None


def _responder(monkeypatch, **kw):  # type: ignore[no-untyped-def]
    from relaygate import acme
    from tests.smtp.helpers import free_port

    port = free_port()
    responder = acme.ChallengeResponder("127.0.0.1", port, **kw)
    return responder, port


def test_a_connection_that_sends_nothing_is_closed(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Slowloris on port 80 (a cluster runs the responder all the time): a client that connects
    # and never sends its request line must not hold a thread (and a socket) for ever.

    monkeypatch.setattr(acme_responder, "RESPONDER_TIMEOUT", 1.0)
    responder, port = _responder(monkeypatch)
    responder.start()
    try:
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        started = time.monotonic()
        try:
            data = idle.recv(100)  # the server closes: b"" (or an error response first)
        except TimeoutError:
            raise AssertionError(
                "the responder still holds an idle connection after 10 s"
            ) from None
        finally:
            idle.close()
        assert time.monotonic() - started < 8, data
    finally:
        responder.stop()


def test_database_lookups_of_unknown_tokens_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # A cluster node looks a token it does not hold up in the queue database, one connection
    # per request: anyone reaching port 80 must not open unboundedly many database connections
    # (PostgreSQL's max_connections is shared with the mail queue).
    import threading

    import httpx

    lock = threading.Lock()
    active, peak = [0], [0]

    def slow_lookup(token: str) -> str | None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.5)
        with lock:
            active[0] -= 1
        return None

    responder, port = _responder(monkeypatch, lookup=slow_lookup)
    responder.start()
    try:

        def get(i: int) -> None:
            token = f"unknown-token-{i:04d}-abcdefgh"
            try:
                httpx.get(f"http://127.0.0.1:{port}/.well-known/acme-challenge/{token}", timeout=15)
            except httpx.HTTPError:
                pass

        threads = [threading.Thread(target=get, args=(i,)) for i in range(30)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        responder.stop()
    from relaygate import acme

    assert 1 <= peak[0] <= getattr(acme, "MAX_LOOKUPS", 4), peak[0]


def test_idle_connections_do_not_each_hold_a_thread(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Connections are bounded: past the limit a new one is closed at once, not given a thread.
    import threading

    monkeypatch.setattr(acme_responder, "MAX_RESPONDER_CONNECTIONS", 8)
    responder, port = _responder(monkeypatch)
    responder.start()
    before = threading.active_count()
    held = []
    try:
        for _ in range(40):
            held.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(1.0)
        grown = threading.active_count() - before
    finally:
        for s in held:
            s.close()
        responder.stop()
    assert grown <= 8, grown


def test_the_request_line_is_logged_without_its_control_characters(monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    # Anyone reaching port 80 writes the request line into the relay's log: an escape sequence
    # or a carriage return must not reach a terminal or a log viewer raw (the standard library's
    # own log_message escapes them; the responder's override must too).
    import logging

    responder, port = _responder(monkeypatch)
    responder.start()
    try:
        with caplog.at_level(logging.INFO, logger="relaygate.acme"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /\x1b[2J\x1b[31mforged\rline HTTP/1.1\r\nHost: x\r\n\r\n")
                while s.recv(4096):
                    pass
            time.sleep(0.3)
    finally:
        responder.stop()
    logged = [r.getMessage() for r in caplog.records if "challenge responder" in r.getMessage()]
    assert logged, caplog.text
    for message in logged:
        assert "\x1b" not in message and "\r" not in message, repr(message)


def test_the_client_thread_outlives_a_long_run_of_failures(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    # The back-off is min(1 minute, interval) * 2 ** (failures - 1), capped at 6 hours: after
    # some 1024 failures in a row (about 256 days of an unreachable CA at 6 h each) 2 ** 1024
    # no longer converts to a float. That must not end the ACME thread (for good: nothing
    # restarts it, the CA coming back would change nothing).
    import logging

    manager = AcmeManager(_config(tmp_path, 'acme_check_interval = "00:00:01"'))
    manager.failures = 1100
    with caplog.at_level(logging.ERROR, logger="relaygate.acme"):
        manager.start()
        try:
            deadline = time.monotonic() + 20
            while "failure 1101" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            assert "failure 1101" in caplog.text, caplog.text
            assert manager._thread is not None and manager._thread.is_alive()
            assert "retry in 21600 s" in caplog.text, caplog.text
        finally:
            manager.stop()


def test_a_cluster_node_whose_responder_cannot_listen_still_takes_the_certificate(
    pebble, relays, postgres_url
) -> None:  # type: ignore[no-untyped-def]
    # Node B cannot bind acme_http_listen (something else holds the port; the load balancer
    # sends the CA to A). The certificate A publishes needs no responder on B: B must still
    # copy it into its files, not wait behind a responder that keeps failing (with its
    # back-off growing to 6 hours) while its own certificate runs out.
    from tests.acme.helpers import file_serial, wait_until

    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.2", pebble.http_port))
    blocker.listen(1)
    try:
        a = relays(
            pebble, name="a", node_name="NODE-A", http_host="127.0.0.1",
            database_url=postgres_url, check_interval="00:00:02",
        )  # fmt: skip
        assert wait_until(lambda: a.cert_file.exists(), 60), a.log()
        b = relays(
            pebble, name="b", node_name="NODE-B", http_host="127.0.0.2",
            database_url=postgres_url, check_interval="00:00:02",
        )  # fmt: skip
        assert wait_until(lambda: "cannot listen" in b.log(), 30), b.log()
        assert wait_until(lambda: b.cert_file.exists(), 30), b.log()
        assert file_serial(b.cert_file) == file_serial(a.cert_file)
    finally:
        blocker.close()


def test_a_configured_name_with_a_trailing_dot_is_the_same_name(tmp_path: Path) -> None:
    # `relaygate check` accepts "relay.acme.test." (an absolute name); the CA identifiers and
    # the certificate's SANs have no final dot. The name must be ordered without it, and a
    # certificate for it must not look like "names changed" at every check (a new order each
    # acme_check_interval).
    from relaygate.acme import acme_domains

    _install(tmp_path, lifetime=timedelta(days=90))
    config = _config(tmp_path, 'acme_domains = ["Relay.Acme.Test."]')
    assert acme_domains(config.server) == ("relay.acme.test",)  # type: ignore[attr-defined]
    assert AcmeManager(config).due() is None


LONG_NAME = "a" * 60 + ".relay.acme.test"  # 76 characters; a CN holds at most 64


def test_the_csr_of_a_long_name_has_no_common_name_that_is_not_a_name(tmp_path: Path) -> None:
    # A host name of 65..253 characters is valid (`relaygate check` accepts it) but cannot be
    # the subject's CN (ub-common-name 64). The CSR carried its first 64 characters as CN: no
    # name at all, and one that is none of the SANs (Let's Encrypt takes the CN as one more
    # identifier and refuses the order's finalization; pebble ignores the CN). It must have no
    # CN then (RFC 8555 §7.4 needs only the SANs).
    import base64

    from relaygate.acme import AcmeClient, ChallengeResponder
    from tests.acme.helpers import Pebble
    from tests.support.dns_server import LoopbackDNS

    csrs: list[x509.CertificateSigningRequest] = []
    with LoopbackDNS({LONG_NAME: [("A", "127.0.0.1")]}) as dns:
        pebble = Pebble(tmp_path / "pebble", dns.address).start()
        client = AcmeClient(
            pebble.directory_url, ec.generate_private_key(ec.SECP256R1()), ca_file=pebble.ca_file
        )
        post = client.post

        def spy(url: str, payload: object, **kw: object):  # type: ignore[no-untyped-def]
            if isinstance(payload, dict) and "csr" in payload:
                der = base64.urlsafe_b64decode(payload["csr"] + "==")
                csrs.append(x509.load_der_x509_csr(der))
            return post(url, payload, **kw)  # type: ignore[arg-type]

        client.post = spy  # type: ignore[method-assign]
        responder = ChallengeResponder("127.0.0.1", pebble.http_port)
        responder.start()
        try:
            client.register()
            issued = client.order((LONG_NAME,), responder)
        finally:
            responder.stop()
            client.close()
            pebble.stop()
    assert issued.chain_pem and len(csrs) == 1
    san = csrs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [LONG_NAME]
    cns = [a.value for a in csrs[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    assert all(cn in (LONG_NAME,) for cn in cns) and all(len(str(cn)) <= 64 for cn in cns), cns


def test_a_worker_restarted_after_acme_was_turned_on_by_a_reload_keeps_starttls(
    tmp_path: Path, pebble
) -> None:  # type: ignore[no-untyped-def]
    # A worker the supervisor starts again after a reload that turned ACME on (it died, or
    # hung) must run with ACME as its siblings do now (the supervisor's client obtains the
    # certificate; test_reload.py): it offers STARTTLS like them.
    import os
    import signal

    from tests.acme.helpers import Relay, wait_until

    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, pebble, workers=2)
    with_acme = relay.config.read_text()
    relay.config.write_text(
        "".join(line for line in with_acme.splitlines(True) if not line.startswith("acme_"))
    )
    relay.start()
    sources = [f"127.0.0.{i}" for i in range(2, 14)]

    def starttls_everywhere() -> bool:
        for source in sources:
            with socket.create_connection(
                ("127.0.0.1", relay.port), timeout=5, source_address=(source, 0)
            ) as s:
                f = s.makefile("rb")
                f.readline()
                s.sendall(b"EHLO check.acme.test\r\n")
                lines = []
                while True:
                    line = f.readline()
                    lines.append(line)
                    if not line or line[3:4] != b"-":
                        break
                if not any(b"STARTTLS" in x for x in lines):
                    return False
        return True

    try:
        assert relay.proc is not None
        assert wait_until(starttls_everywhere, 20), relay.log()
        relay.config.write_text(with_acme)
        os.kill(relay.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: relay.log().count("configuration reloaded") >= 2, 20), relay.log()
        supervisor = relay.proc.pid

        def workers() -> list[int]:
            path = Path(f"/proc/{supervisor}/task/{supervisor}/children")
            return [int(pid) for pid in path.read_text().split()]

        # every worker presents the certificate the supervisor's client obtained (STARTTLS
        # alone proves nothing: a worker running with ACME off offers it too, self-signed)
        from tests.acme.helpers import attempt, file_serial, starttls_certificate

        assert wait_until(lambda: relay.cert_file.exists(), 60), relay.log()
        serial = file_serial(relay.cert_file)
        root = pebble.root_pem()

        def acme_everywhere() -> bool:
            return all(
                getattr(
                    attempt(lambda s=s: starttls_certificate(relay.port, root, source=s)),
                    "serial_number",
                    None,
                )
                == serial
                for s in sources
            )

        assert wait_until(acme_everywhere, 30), relay.log()
        victim = workers()[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: victim not in workers() and len(workers()) == 2, 30)
        # the new worker up and serving (the two first ones said so at start)
        assert wait_until(lambda: relay.log().count(" listening on 127.0.0.1:") >= 3, 30)
        assert wait_until(acme_everywhere, 20), relay.log()
    finally:
        relay.stop()
