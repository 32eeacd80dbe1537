"""What the CA returns is checked before it is installed (relaygate.acme.verify).

A fake ACME CA (tests/acme/fake_ca.py; pebble cannot be made to return a wrong chain) answers a
real `relaygate serve` whose certificate, obtained before, is due for renewal: for each wrong
answer the relay keeps the certificate it has (the files, and what a verifying smtplib client
sees after STARTTLS), logs the refusal naming the check and the name, counts it as a failure
(back-off), and `relaygate audit` reports it; when the CA then answers right, the new
certificate is installed and the finding goes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from relaygate.acme import CertificateRefused, check_issued
from tests.acme.fake_ca import FakeCA
from tests.acme.helpers import (
    Relay,
    attempt,
    file_serial,
    relaygate_cli,
    starttls_certificate,
    wait_until,
)

NAME = "relay.acme.test"


@pytest.fixture
def fake_ca(tmp_path: Path) -> Iterator[FakeCA]:
    ca = FakeCA(tmp_path / "fake-ca").start()
    try:
        yield ca
    finally:
        ca.stop()


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _install_old(ca: FakeCA, data: Path) -> tuple[int, bytes, bytes]:
    """A certificate for relay.acme.test from the CA in <data>/acme, as the manager writes it,
    due for renewal (10 days left, acme_renew_before 30 days): (serial, chain, key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    leaf = ca.leaf(
        [NAME], key.public_key(), start=now - dt.timedelta(days=80), end=now + dt.timedelta(days=10)
    )
    folder = data / "acme"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o700)
    chain, key_pem = ca.pem_chain(leaf), _key_pem(key)
    (folder / "certificate.pem").write_bytes(chain)
    (folder / "certificate.key").write_bytes(key_pem)
    return leaf.serial_number, chain, key_pem


def _refused_findings(relay: Relay) -> list[dict[str, str]]:
    done = relaygate_cli("audit", "--config", str(relay.config), "--json")
    findings = json.loads(done.stdout)["findings"]
    return [f for f in findings if f["code"] == "acme-certificate-refused"]


@pytest.mark.parametrize(
    ("mode", "check", "why"),
    [
        ("other-names", "names", "does not name relay.acme.test (its DNS names: other.acme.test)"),
        ("other-key", "key", "another public key than the one the CSR was made with"),
        ("expired", "validity", "not now"),
        ("wrong-intermediate", "chain", "is not signed by certificate 2"),
        ("garbage", "pem", "not a PEM certificate chain"),
        ("due", "renewal", "already within acme_renew_before"),
    ],
)
def test_a_wrong_certificate_from_the_ca_is_not_installed(
    tmp_path: Path, fake_ca: FakeCA, mode: str, check: str, why: str
) -> None:
    fake_ca.mode = mode
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="00:00:02")  # type: ignore[arg-type]
    old_serial, old_chain, old_key = _install_old(fake_ca, relay.data)
    root = fake_ca.root_pem()
    relay.start()
    try:
        # the CA is asked (the certificate is due), answers wrong, twice (the retry after 2 s)
        refused = f"the CA's certificate was refused ({check} check): "
        assert wait_until(lambda: relay.log().count(refused) >= 2, timeout=30), relay.log()
        assert fake_ca.issued[:2] == [mode, mode]
        log = relay.log()
        line = next(x for x in log.splitlines() if refused in x)
        assert f"cannot obtain a certificate for {NAME} from {fake_ca.directory_url}" in line
        assert why in line, line
        assert "the listeners keep the current certificate" in line
        # counted as a failure: the back-off doubles
        assert "(failure 1)" in line and "retry in 2 s" in line
        assert "(failure 2)" in log and "retry in 4 s" in log, log
        assert "installed (serial" not in log
        # the files are the old ones, and STARTTLS presents the old certificate
        assert (relay.data / "acme" / "certificate.pem").read_bytes() == old_chain
        assert (relay.data / "acme" / "certificate.key").read_bytes() == old_key
        cert = starttls_certificate(relay.port, root)
        assert cert.serial_number == old_serial
        # relaygate audit says so, naming the check and the name
        (finding,) = _refused_findings(relay)
        assert finding["key"] == "server.acme_directory_url"
        assert f"({check} check)" in finding["message"] and NAME in finding["message"]
        assert why in finding["message"]

        # The CA answers right: the next retry installs its certificate, and the finding goes.
        fake_ca.mode = "good"
        assert wait_until(lambda: "installed (serial" in relay.log(), timeout=30), relay.log()

        def renewed() -> x509.Certificate | None:
            c = attempt(lambda: starttls_certificate(relay.port, root))
            return c if c is not None and c.serial_number != old_serial else None

        new = wait_until(renewed, timeout=20)
        assert new is not None, relay.log()
        assert f"installed (serial {new.serial_number:x}" in relay.log()
        assert _refused_findings(relay) == []
    finally:
        relay.stop()


# ----------------------------------------------------------------------------- check_issued


def _csr_key() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, _key_pem(key)


def _check(ca: FakeCA, chain: bytes, key_pem: bytes, **kw: object) -> str:
    with pytest.raises(CertificateRefused) as info:
        check_issued(chain, key_pem, [NAME], renew_before=dt.timedelta(days=30), **kw)  # type: ignore[arg-type]
    return info.value.check


def test_check_issued_takes_a_right_chain_and_names_as_the_ca_writes_them(fake_ca: FakeCA) -> None:
    ca = fake_ca
    key, key_pem = _csr_key()
    now = dt.datetime.now(dt.UTC)
    # the CA adds a name the order did not ask for: not required, not refused
    leaf = ca.leaf(
        ["Relay.Acme.Test", "www.acme.test"], key.public_key(),
        start=now - dt.timedelta(hours=1), end=now + dt.timedelta(days=90),
    )  # fmt: skip
    got = check_issued(
        ca.pem_chain(leaf), key_pem, ["relay.acme.test."], renew_before=dt.timedelta(days=30)
    )
    assert got.serial_number == leaf.serial_number


def test_check_issued_names_each_failed_check(tmp_path: Path, fake_ca: FakeCA) -> None:
    ca = fake_ca
    key, key_pem = _csr_key()
    now = dt.datetime.now(dt.UTC)
    good = (now - dt.timedelta(hours=1), now + dt.timedelta(days=90))

    def leaf(
        names: tuple[str, ...] = (NAME,), pub: object = None, span: tuple = good, **kw: object
    ):  # type: ignore[no-untyped-def,type-arg]
        return ca.leaf(list(names), pub or key.public_key(), start=span[0], end=span[1], **kw)  # type: ignore[arg-type]

    assert _check(ca, b"", key_pem) == "pem"
    assert (
        _check(ca, b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", key_pem)
        == "pem"
    )
    assert _check(ca, ca.pem_chain(leaf(("mail.acme.test",))), key_pem) == "names"
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    assert _check(ca, ca.pem_chain(leaf(pub=other)), key_pem) == "key"
    future = (now + dt.timedelta(days=1), now + dt.timedelta(days=90))
    assert _check(ca, ca.pem_chain(leaf(span=future)), key_pem) == "validity"
    expired = (now - dt.timedelta(days=90), now - dt.timedelta(seconds=1))
    assert _check(ca, ca.pem_chain(leaf(span=expired)), key_pem) == "validity"
    soon = (now - dt.timedelta(days=80), now + dt.timedelta(days=10))
    assert _check(ca, ca.pem_chain(leaf(span=soon)), key_pem) == "renewal"
    # ... not checked for a certificate another node of the cluster obtained
    check_issued(ca.pem_chain(leaf(span=soon)), key_pem, [NAME], renew_before=None)
    assert _check(ca, ca.pem_chain(leaf(), ca.impostor), key_pem) == "chain"
    # the intermediate signed by another root than the one in the chain
    stranger = FakeCA(tmp_path / "other")
    stranger.stop()
    chain = ca.pem_chain(leaf()).rsplit(b"-----BEGIN CERTIFICATE-----", 1)[0] + stranger.root_pem()
    assert _check(ca, chain, key_pem) == "chain"


def test_a_name_the_ca_added_does_not_make_the_certificate_due_again(tmp_path: Path) -> None:
    # The manager records the names it ordered (certificate.names): a certificate on which the
    # CA added a name (taken above) is not "names changed" at every check, a new order each
    # acme_check_interval; a name removed from acme_domains still is.
    from relaygate.acme import AcmeManager
    from relaygate.config import parse_text

    ca = FakeCA(tmp_path / "ca")
    ca.stop()
    key, key_pem = _csr_key()
    now = dt.datetime.now(dt.UTC)
    leaf = ca.leaf(
        [NAME, "www.acme.test"], key.public_key(),
        start=now - dt.timedelta(hours=1), end=now + dt.timedelta(days=90),
    )  # fmt: skip

    def config(domains: str) -> object:
        return parse_text(
            f'[server]\nfqdn = "{NAME}"\ndata_dir = "{tmp_path}"\n'
            f'acme_directory_url = "https://127.0.0.1:1/dir"\nacme_domains = {domains}\n',
            source="relaygate.toml",
        )

    manager = AcmeManager(config(f'["{NAME}"]'))
    manager._install(ca.pem_chain(leaf), key_pem, "installed")
    assert (tmp_path / "acme" / "certificate.names").read_text() == f"{NAME}\n"
    assert manager.due() is None
    both = AcmeManager(config(f'["{NAME}", "mail.acme.test"]')).due()
    assert both is not None and "names changed" in both


def test_a_cluster_node_does_not_install_a_wrong_certificate_from_the_queue_database(
    tmp_path: Path, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The node that orders checks before it publishes; a node that copies the certificate from
    # the queue database checks it too (a node of another version, a hand-edited row): a wrong
    # one is not installed, and the step goes on (the node leading still orders when due).
    import logging

    from relaygate.acme import AcmeManager
    from relaygate.acme.cluster import ClusterShare
    from relaygate.config import parse_text
    from tests.smtp.helpers import free_port

    ca = FakeCA(tmp_path / "ca")
    ca.stop()
    data = tmp_path / "data"
    old_serial, old_chain, old_key = _install_old(ca, data)
    config = parse_text(
        f'[server]\nfqdn = "{NAME}"\ndata_dir = "{data}"\n'
        f'acme_directory_url = "https://127.0.0.1:1/dir"\n'
        f'acme_http_listen = "127.0.0.1:{free_port()}"\n'
        f'[queue]\nstore = "postgresql"\ndatabase_url = "{postgres_url}"\n',
        source="relaygate.toml",
    )
    manager = AcmeManager(config)
    share = ClusterShare(postgres_url, (NAME,))
    now = dt.datetime.now(dt.UTC)
    span = {"start": now - dt.timedelta(hours=1), "end": now + dt.timedelta(days=60)}
    key, key_pem = _csr_key()
    wrong = ca.leaf(["other.acme.test"], key.public_key(), **span)
    try:
        share.publish(ca.pem_chain(wrong), key_pem)
        with caplog.at_level(logging.ERROR, logger="relaygate.acme"):
            assert manager._cluster_step() is True  # it leads (no other node), and goes on
        assert (data / "acme" / "certificate.pem").read_bytes() == old_chain
        assert (data / "acme" / "certificate.key").read_bytes() == old_key
        assert "in the queue database is not installed" in caplog.text
        assert "(names check)" in caplog.text and "keep the current certificate" in caplog.text
        assert json.loads((data / "acme" / "refused.json").read_text())["check"] == "names"

        right = ca.leaf([NAME], key.public_key(), **span)
        share.publish(ca.pem_chain(right), key_pem)
        manager._cluster_step()
        installed = x509.load_pem_x509_certificates(
            (data / "acme" / "certificate.pem").read_bytes()
        )
        assert installed[0].serial_number == right.serial_number != old_serial
        assert not (data / "acme" / "refused.json").exists()
    finally:
        manager.stop()
        share.close()


def test_a_reload_during_a_pending_order_does_not_refuse_what_was_ordered(
    tmp_path: Path, fake_ca: FakeCA
) -> None:
    # acme_domains change (SIGHUP) while an order is pending at the CA: the certificate the CA
    # then returns is for the names that were ordered. It is checked against those (not the
    # reloaded ones: that was a "names" refusal, a failure, an audit finding and an error log
    # for a certificate the CA rightly issued), and the new names are ordered next.
    import signal
    import threading

    hold = threading.Event()
    fake_ca.hold = hold
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="01:00:00")  # type: ignore[arg-type]
    _install_old(fake_ca, relay.data)
    relay.start()
    try:
        assert fake_ca.finalizing.wait(30), relay.log()  # the order for relay.acme.test waits
        relay.config.write_text(
            relay.config.read_text().replace(
                "acme_email =", f'acme_domains = ["{NAME}", "mail.acme.test"]\nacme_email =', 1
            )
        )
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: "configuration reloaded" in relay.log(), timeout=20)
        fake_ca.hold = None
        hold.set()

        def both() -> bool:
            try:
                leaf = x509.load_pem_x509_certificates(relay.cert_file.read_bytes())[0]
            except (OSError, ValueError):
                return False
            from relaygate.acme.verify import dns_names

            return dns_names(leaf) == {NAME, "mail.acme.test"}

        assert wait_until(both, timeout=30), relay.log()
        log = relay.log()
        assert "was refused" not in log, log
        assert "cannot obtain a certificate" not in log, log
        assert _refused_findings(relay) == []
    finally:
        hold.set()
        relay.stop()


def test_a_ca_clock_a_little_ahead_does_not_refuse_every_certificate(
    tmp_path: Path, fake_ca: FakeCA
) -> None:
    # A CA that does not backdate notBefore (step-ca backdates only 1 minute by default) and
    # a relay clock a little behind: notBefore is a minute or two "in the future". Refused
    # (validity check), each order was refused alike: an order at every back-off, at a real CA
    # against its rate limits, and never a certificate. A few minutes of skew are taken.
    fake_ca.mode = "ahead"
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="00:00:02")  # type: ignore[arg-type]
    old_serial, _chain, _key = _install_old(fake_ca, relay.data)
    relay.start()
    try:
        assert wait_until(
            lambda: "installed (serial" in relay.log() or "was refused" in relay.log(), timeout=30
        ), relay.log()
        assert "was refused" not in relay.log(), relay.log()
        assert file_serial(relay.cert_file) != old_serial
        assert fake_ca.issued == ["ahead"]
    finally:
        relay.stop()

    key, key_pem = _csr_key()
    now = dt.datetime.now(dt.UTC)
    ahead = fake_ca.leaf(
        [NAME], key.public_key(),
        start=now + dt.timedelta(minutes=2), end=now + dt.timedelta(days=90),
    )  # fmt: skip
    check_issued(fake_ca.pem_chain(ahead), key_pem, [NAME], renew_before=dt.timedelta(days=30))


def test_a_refusal_no_longer_in_question_leaves_the_audit(tmp_path: Path, fake_ca: FakeCA) -> None:
    # A name added by a reload, and the CA's certificate for it refused: audit reports it.
    # The name removed again by a reload, the certificate the relay has is good for what is
    # configured, nothing is ordered, nothing is refused: the finding (for names no longer
    # configured) must go, not stay until some later certificate is installed.
    import signal

    fake_ca.mode = "other-names"
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="00:00:02")  # type: ignore[arg-type]
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    good = fake_ca.leaf(
        [NAME], key.public_key(), start=now - dt.timedelta(hours=1), end=now + dt.timedelta(days=60)
    )
    acme = relay.data / "acme"
    acme.mkdir(parents=True)
    os.chmod(acme, 0o700)
    (acme / "certificate.pem").write_bytes(fake_ca.pem_chain(good))
    (acme / "certificate.key").write_bytes(_key_pem(key))
    plain = relay.config.read_text()
    relay.start()
    try:
        assert relay.proc is not None
        relay.config.write_text(
            plain.replace(
                "acme_email =", f'acme_domains = ["{NAME}", "mail.acme.test"]\nacme_email =', 1
            )
        )
        os.kill(relay.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: "was refused (names check)" in relay.log(), timeout=30)
        assert len(_refused_findings(relay)) == 1
        relay.config.write_text(plain)
        os.kill(relay.proc.pid, signal.SIGHUP)
        # (SIGHUP and the file watcher may each reload)
        assert wait_until(lambda: relay.log().count("configuration reloaded") >= 2, timeout=20)
        assert wait_until(lambda: _refused_findings(relay) == [], timeout=15), (
            _refused_findings(relay),
            relay.log(),
        )
        assert file_serial(relay.cert_file) == good.serial_number
    finally:
        relay.stop()


def test_another_ca_by_a_reload_orders_from_it_at_once(tmp_path: Path, fake_ca: FakeCA) -> None:
    # From a staging CA to the production one (acme_directory_url and acme_ca_file, SIGHUP):
    # the reload wakes the client "new names or CA: a new order now", but the certificate of
    # the old CA was still good for the names, so nothing was ordered: the listeners kept the
    # staging (untrusted) certificate until it came due, weeks later.
    import signal

    other = FakeCA(tmp_path / "other-ca").start()
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="01:00:00")  # type: ignore[arg-type]
    relay.start()
    try:
        assert wait_until(lambda: "installed (serial" in relay.log(), timeout=30), relay.log()
        first = file_serial(relay.cert_file)
        assert fake_ca.issued == ["good"] and other.issued == []
        text = relay.config.read_text()
        relay.config.write_text(
            text.replace(fake_ca.directory_url, other.directory_url).replace(
                str(fake_ca.ca_file), str(other.ca_file)
            )
        )
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGHUP)
        assert wait_until(lambda: other.issued == ["good"], timeout=20), relay.log()
        assert wait_until(lambda: file_serial(relay.cert_file) != first, timeout=20)
        leaf = x509.load_pem_x509_certificates(relay.cert_file.read_bytes())[0]
        assert leaf.issuer == other.inter.subject  # (both fakes' names are alike)
        leaf.verify_directly_issued_by(other.inter)
        assert "CA changed" in relay.log()
        assert fake_ca.issued == ["good"]
    finally:
        relay.stop()
        other.stop()


def test_a_rate_limit_is_retried_after_the_cas_retry_after_not_sooner(
    tmp_path: Path, fake_ca: FakeCA
) -> None:
    # RFC 8555 §6.6: a rate-limited request is answered 429 with Retry-After. Retried at the
    # back-off's pace (2 s, 4 s, ...) each retry is refused again, and counts against the
    # account at the CA; the relay must wait as long as the CA says (up to the back-off's most).
    fake_ca.retry_after = 3600
    folder = tmp_path / "relay"
    folder.mkdir()
    relay = Relay(folder, fake_ca, check_interval="00:00:02")  # type: ignore[arg-type]
    relay.start()
    try:
        failed = "ACME: cannot obtain a certificate for relay.acme.test"
        assert wait_until(lambda: failed in relay.log(), timeout=30), relay.log()
        line = next(x for x in relay.log().splitlines() if failed in x)
        assert "urn:ietf:params:acme:error:rateLimited" in line, line
        assert "(failure 1)" in line and "retry in 3600 s" in line, line
        assert fake_ca.new_orders == 1
    finally:
        relay.stop()
    assert fake_ca.new_orders == 1, relay.log()


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    from relaygate.acme.protocol import retry_after_seconds

    now = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
    assert retry_after_seconds("3600", now) == 3600.0
    assert retry_after_seconds("Mon, 07 Dec 2026 13:30:00 GMT", now) == 5400.0
    assert retry_after_seconds("Mon, 07 Dec 2026 11:00:00 GMT", now) == 0.0  # past: no wait
    assert retry_after_seconds("soon", now) is None
    assert retry_after_seconds(None, now) is None
