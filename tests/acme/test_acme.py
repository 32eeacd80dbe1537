"""ACME: the relay obtains its listener certificate from pebble (HTTP-01), renews and swaps it.

pebble really validates: it resolves the name through the test's DNS server (127.0.0.1) and fetches
http://<name>:<http_port>/.well-known/acme-challenge/<token> from the relay's responder. Clients
trust only pebble's issuing root (from its management API) and check the host name.
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import stat
from pathlib import Path

import httpx

from tests.acme.helpers import (
    attempt,
    client_context,
    ehlo_keywords,
    file_serial,
    implicit_certificate,
    relaygate_cli,
    san_names,
    starttls_certificate,
    wait_until,
)
from tests.smtp.helpers import free_port


def issued_serials(log: str) -> set[int]:
    return {int(s, 16) for s in re.findall(r"installed \(serial ([0-9a-f]+),", log)}


def test_relay_obtains_a_certificate_from_the_ca_and_starttls_presents_it(pebble, relays) -> None:
    relay = relays(pebble, implicit=True)
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    root = pebble.root_pem()
    serial = file_serial(relay.cert_file)
    cert = wait_until(lambda: attempt(lambda: starttls_certificate(relay.port, root)), timeout=20)
    assert cert is not None, relay.log()
    assert san_names(cert) == ["relay.acme.test"]
    assert cert.serial_number == serial
    # the implicit-TLS listener (opened with the self-signed certificate) was reopened with it
    implicit = wait_until(
        lambda: attempt(lambda: implicit_certificate(relay.implicit_port, root)), timeout=20
    )
    assert implicit is not None and implicit.serial_number == serial, relay.log()
    assert "STARTTLS" in ehlo_keywords(relay.port)
    assert f"ACME: certificate for relay.acme.test installed (serial {serial:x}" in relay.log()


def test_account_key_certificate_and_key_are_private_files(pebble, relays) -> None:
    relay = relays(pebble)
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    folder = relay.data / "acme"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("account.key", "certificate.key", "certificate.pem"):
        mode = stat.S_IMODE((folder / name).stat().st_mode)
        assert mode == 0o600, f"{name}: {mode:o}"
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    key = (folder / "certificate.key").read_bytes()
    assert b"PRIVATE KEY" in key and key != (folder / "account.key").read_bytes()


def test_renewal_replaces_the_certificate_while_a_session_stays_open(short_pebble, relays) -> None:
    # pebble's certificates live 15 s: each is renewed 5 s after issue (renew_before, 10 years,
    # is longer than that life: two thirds of it count instead), at a check (every 3 s).
    pebble = short_pebble
    relay = relays(pebble, renew_before="3650.00:00:00", check_interval="00:00:03", implicit=True)
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    root = pebble.root_pem()
    first = wait_until(lambda: attempt(lambda: starttls_certificate(relay.port, root)), timeout=20)
    assert first is not None, relay.log()

    # A session that did STARTTLS before the renewal.
    held = smtplib.SMTP("127.0.0.1", relay.port, timeout=15)
    held._host = "relay.acme.test"  # type: ignore[attr-defined]
    held.ehlo("held.acme.test")
    held.starttls(context=client_context(root))
    held.ehlo("held.acme.test")
    held_der = held.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    from cryptography import x509

    held_serial = x509.load_der_x509_certificate(held_der).serial_number

    assert wait_until(lambda: file_serial(relay.cert_file) != held_serial, timeout=60), relay.log()

    def renewed() -> bool:
        cert = attempt(lambda: starttls_certificate(relay.port, root))
        return cert is not None and cert.serial_number != held_serial

    assert wait_until(renewed, timeout=20), relay.log()
    cert = starttls_certificate(relay.port, root)
    assert cert.serial_number in issued_serials(relay.log())
    assert san_names(cert) == ["relay.acme.test"]
    implicit = wait_until(
        lambda: attempt(
            lambda: (
                (c := implicit_certificate(relay.implicit_port, root)).serial_number != held_serial
                and c
            )
        ),
        timeout=20,
    )
    assert implicit, relay.log()

    # The held session was not dropped: it goes on, on its own certificate.
    assert held.noop()[0] == 250
    assert held.mail("printer@corp.example")[0] == 250
    assert held.rcpt("it@corp.example")[0] == 250
    assert held.rset()[0] == 250
    again = held.sock.getpeercert(binary_form=True)  # type: ignore[union-attr]
    assert x509.load_der_x509_certificate(again).serial_number == held_serial
    held.quit()
    assert len(issued_serials(relay.log())) >= 2

    # The CA goes away: the failure is logged, and the relay keeps the certificate it has.
    pebble.stop()
    assert wait_until(lambda: "ACME: cannot obtain a certificate" in relay.log(), timeout=30)
    assert "the listeners keep the current certificate" in relay.log()
    current = file_serial(relay.cert_file)
    after = starttls_certificate(relay.port, root)
    assert after.serial_number == current


def test_a_ca_that_refuses_leaves_the_relay_serving_without_starttls(
    pebble, relays, tmp_path: Path
) -> None:
    # pebble's DNS (the test's) has no unknown.acme.test: the authorization fails.
    relay = relays(pebble, fqdn="unknown.acme.test", check_interval="00:00:02")
    assert wait_until(lambda: relay.log().count("ACME: cannot obtain") >= 2, timeout=60), (
        relay.log()
    )
    log = relay.log()
    first = re.search(r"ACME: cannot obtain a certificate for unknown\.acme\.test .*", log)
    assert first is not None
    # the CA's error, the retry's delay (doubling), what the listeners do meanwhile
    assert "urn:ietf:params:acme:error:" in first.group(0)
    assert "retry in 2 s" in log and "retry in 4 s" in log
    assert "STARTTLS is not offered" in first.group(0)
    assert not relay.cert_file.exists()

    # the relay serves: no STARTTLS offered (nor accepted), mail still taken
    assert "STARTTLS" not in ehlo_keywords(relay.port)
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as smtp:
        smtp.ehlo("client.acme.test")
        code, text = smtp.docmd("STARTTLS")
        assert code == 454, text
        assert smtp.mail("printer@corp.example")[0] == 250
        assert smtp.rcpt("it@corp.example")[0] == 250

    # relaygate audit says so
    done = relaygate_cli("audit", "--config", str(relay.config), "--json")
    findings = json.loads(done.stdout)["findings"]
    missing = [f for f in findings if f["code"] == "acme-certificate-missing"]
    assert missing, done.stdout
    assert missing[0]["key"] == "server.acme_directory_url"
    assert "STARTTLS is not offered on Relay" in missing[0]["message"]


def test_with_workers_only_the_supervisor_orders_and_every_worker_takes_the_renewal(
    short_pebble, relays
) -> None:
    pebble = short_pebble
    relay = relays(pebble, workers=2, renew_before="3650.00:00:00", check_interval="00:00:04")
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    root = pebble.root_pem()
    sources = [f"127.0.0.{i}" for i in range(2, 14)]

    def all_see(predicate) -> bool:  # type: ignore[no-untyped-def]
        for source in sources:
            cert = attempt(lambda s=source: starttls_certificate(relay.port, root, source=s))
            if cert is None or not predicate(cert.serial_number):
                return False
        return True

    first = file_serial(relay.cert_file)
    assert wait_until(lambda: all_see(lambda s: s in issued_serials(relay.log())), 30), relay.log()
    assert wait_until(lambda: file_serial(relay.cert_file) != first, timeout=60), relay.log()
    assert wait_until(
        lambda: all_see(lambda s: s != first and s in issued_serials(relay.log())), 30
    ), relay.log()
    log = relay.log()
    # every worker swapped its contexts; none ran an ACME client
    assert "relaygate[w0]: listener certificate reloaded (ACME)" in log
    assert "relaygate[w1]: listener certificate reloaded (ACME)" in log
    assert "relaygate.acme[w" not in log
    assert "relaygate.acme: ACME: ordering a certificate" in log


def test_the_challenge_responder_answers_only_pending_tokens() -> None:
    from relaygate.acme import ChallengeResponder

    port = free_port()
    responder = ChallengeResponder("127.0.0.1", port)
    responder.tokens["tok-1"] = "tok-1.thumbprint"
    responder.start()
    try:
        base = f"http://127.0.0.1:{port}"
        r = httpx.get(f"{base}/.well-known/acme-challenge/tok-1", timeout=5)
        assert (r.status_code, r.text) == (200, "tok-1.thumbprint")
        for path in ("/.well-known/acme-challenge/other", "/", "/.well-known/acme-challenge/"):
            assert httpx.get(base + path, timeout=5).status_code == 404
    finally:
        responder.stop()
    # the port is closed again once the order is over
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        pass
    else:
        raise AssertionError(f"the responder still listens on {port}")


def test_a_cluster_runs_one_acme_client_and_every_node_presents_its_certificate(
    pebble, relays, postgres_url
) -> None:
    # Two nodes on one PostgreSQL queue. The CA looks for relay.acme.test at 127.0.0.1, where
    # node B's responder listens; node A's listens on 127.0.0.2. A starts first and runs the
    # cluster's ACME client: its orders succeed only through B answering from the database.
    a = relays(
        pebble, name="a", node_name="NODE-A", http_host="127.0.0.2",
        database_url=postgres_url, check_interval="00:00:02",
    )  # fmt: skip
    assert wait_until(lambda: "this node runs the cluster's ACME client" in a.log(), 30), a.log()
    b = relays(
        pebble, name="b", node_name="NODE-B", http_host="127.0.0.1",
        database_url=postgres_url, check_interval="00:00:02",
    )  # fmt: skip
    assert wait_until(lambda: a.cert_file.exists() and b.cert_file.exists(), 90), a.log() + b.log()
    assert "another node runs the cluster's ACME client" in b.log()
    assert "ACME: ordering" not in b.log()
    # B writes the files, then logs the line (AcmeManager._install): seen a moment later under load
    assert wait_until(lambda: "taken from the queue database" in b.log(), 10), b.log()
    assert re.search(
        r'ACME challenge responder: 127\.0\.0\.1 "GET /\.well-known/acme-challenge/\S+ '
        r'HTTP/1\.1" 200',
        b.log(),
    ), b.log()
    serial = file_serial(a.cert_file)
    assert file_serial(b.cert_file) == serial
    assert b.cert_file.read_bytes() == a.cert_file.read_bytes()
    assert stat.S_IMODE(b.cert_file.stat().st_mode) == 0o600
    root = pebble.root_pem()
    for relay in (a, b):
        cert = wait_until(
            lambda r=relay: attempt(lambda: starttls_certificate(r.port, root)), timeout=20
        )
        assert cert is not None and cert.serial_number == serial, relay.log()

    # A goes: B takes over the cluster's ACME client.
    a.stop()
    assert wait_until(lambda: "this node runs the cluster's ACME client" in b.log(), 60), b.log()
