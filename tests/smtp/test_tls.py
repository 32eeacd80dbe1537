"""TLS: STARTTLS and implicit TLS with a test CA, self-signed fallback, version floor, require_tls, and
STARTTLS injection (security-bar §2F)."""

from __future__ import annotations

import smtplib
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from relaygate.smtp.tls import ensure_self_signed
from tests.smtp.conftest import FQDN, relay_connector
from tests.smtp.helpers import RawClient


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def cert_files(ca: trustme.CA, tmp_path: Path) -> dict[str, str]:
    cert = ca.issue_cert(FQDN, "127.0.0.1")
    chain, key = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return {"tls_certificate_file": str(chain), "tls_key_file": str(key)}


@pytest.fixture
def client_ctx(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def insecure_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# "process": `relaygate serve` on uvloop, whose TLS transport wraps the session's Connection.
@pytest.mark.parametrize("mode", ["thread", "process"])
def test_starttls_with_connector_certificate(relay, cert_files, client_ctx, mode):
    r = relay([relay_connector(**cert_files)], mode=mode)
    with r.smtp() as s:
        s.ehlo()
        assert s.has_extn("starttls")
        code, _ = s.starttls(context=client_ctx)  # verifies the chain and the name
        assert code == 220
        s.ehlo()
        assert not s.has_extn("starttls")
        s.sendmail("app@corp.example", ["x@external.example"], b"Subject: tls\r\n\r\nsecret\r\n")
    (msg,) = r.messages()
    assert b"\twith ESMTPS id " in r.data(msg.queue_id)


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_implicit_tls_binding(relay, cert_files, client_ctx, mode):
    r = relay(
        [
            relay_connector(bindings=["127.0.0.1:{port}"]),
            relay_connector(
                name="Implicit TLS",
                bindings=["127.0.0.1:{port2}"],
                tls_mode="implicit",
                **cert_files,
            ),
        ],
        mode=mode,
    )
    implicit = r.ports[1]
    with smtplib.SMTP_SSL(
        "127.0.0.1", implicit, context=client_ctx, source_address=("127.0.0.5", 0), timeout=10,
        local_hostname="client.corp.example",
    ) as s:  # fmt: skip
        code, banner = s.ehlo()
        assert code == 250 and b"STARTTLS" not in banner
        s.sendmail("app@corp.example", ["x@external.example"], b"Subject: 465\r\n\r\nhi\r\n")
    (msg,) = r.messages()
    assert msg.connector == "Implicit TLS"
    assert b"\twith ESMTPS id " in r.data(msg.queue_id)
    # Plain text on the implicit port: never a banner, never a command executed.
    with RawClient(implicit, source="127.0.0.5", timeout=5) as c:
        c.send(b"EHLO client.corp.example\r\n")
        assert b"220" not in c.received
        c.is_closed(wait=3)
        assert b"220 " not in c.received and b"250" not in c.received


def test_self_signed_certificate_generated_when_none_configured(relay):
    r = relay([relay_connector()])
    with r.raw() as c:
        c.greet()
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        cert = c.sock.getpeercert(binary_form=True)  # type: ignore[attr-defined]
        assert cert
        c.cmd("EHLO client.corp.example", 250)
    crt, key = r.data_dir / "tls" / "selfsigned.crt", r.data_dir / "tls" / "selfsigned.key"
    assert crt.exists() and key.exists()
    assert key.stat().st_mode & 0o077 == 0
    from cryptography import x509

    parsed = x509.load_pem_x509_certificate(crt.read_bytes())
    assert parsed.subject.rfc4514_string() == f"CN={FQDN}"
    assert (
        parsed.public_bytes(__import__("cryptography").hazmat.primitives.serialization.Encoding.DER)
        == cert
    )


def old_client_ctx() -> ssl.SSLContext:
    """A client that speaks at most TLS 1.1 (an old printer)."""
    ctx = insecure_ctx()
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    return ctx


def test_tls_min_version(relay, cert_files):
    r = relay(
        [
            relay_connector(["127.0.0.5"], **cert_files),  # default floor: TLS 1.2
            relay_connector(
                ["127.0.0.6"], name="Old printers", tls_min_version="1.0", **cert_files
            ),
        ]
    )
    with r.raw("127.0.0.5") as c:
        c.greet()
        c.cmd("STARTTLS", 220)
        with pytest.raises((ssl.SSLError, ConnectionError)):
            c.starttls(old_client_ctx())
    # The server itself still works for modern clients afterwards.
    with r.smtp("127.0.0.5") as s:
        s.starttls(context=insecure_ctx())
        assert s.sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[union-attr]
    # The 1.0 connector takes the old client, if this machine's OpenSSL can still speak TLS 1.1.
    with r.raw("127.0.0.6") as c:
        c.greet()
        c.cmd("STARTTLS", 220)
        try:
            c.starttls(old_client_ctx())
        except ssl.SSLError as exc:
            pytest.skip(f"local OpenSSL cannot negotiate TLS 1.1 at all: {exc}")
        assert c.sock.version() in ("TLSv1", "TLSv1.1")  # type: ignore[attr-defined]
        c.cmd("EHLO old-printer", 250)


def test_require_tls(relay, cert_files):
    r = relay([relay_connector(require_tls=True, **cert_files)])
    with r.raw() as c:
        c.greet()
        assert (
            c.cmd("MAIL FROM:<app@corp.example>").text
            == "530 5.7.0 Must issue a STARTTLS command first"
        )
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        c.cmd("EHLO client.corp.example", 250)
        c.cmd("MAIL FROM:<app@corp.example>", 250)


@pytest.mark.parametrize(
    "injected", [b"EHLO injected.example\r\n", b"RSET\r\n", b"MAIL FROM:<x@corp.example>\r\n"]
)
def test_starttls_injection_is_discarded(relay, cert_files, injected):
    r = relay([relay_connector(**cert_files)])
    with r.raw() as c:
        c.greet()
        c.send(b"STARTTLS\r\n" + injected)
        assert c.expect(220).text == "220 2.0.0 SMTP server ready"
        assert c.buf == b""  # nothing else in plain text
        c.starttls(insecure_ctx())
        assert c.nothing_within(1.0)  # the injected command got no reply inside TLS
        hello = c.cmd("EHLO client.corp.example", 250)
        assert hello.lines[0] == f"{FQDN} Hello [127.0.0.5]"
        assert "STARTTLS" not in hello.lines
        c.cmd("MAIL FROM:<app@corp.example>", 250)  # not "Sender already specified"


def test_starttls_injection_under_uvloop(relay):
    """The same check against `relaygate serve` (uvloop), with the generated self-signed certificate."""
    r = relay([relay_connector()], mode="process")
    with r.raw() as c:
        c.greet()
        c.send(b"STARTTLS\r\nEHLO injected.example\r\n")
        c.expect(220)
        c.starttls(insecure_ctx())
        assert c.nothing_within(1.0)
        c.cmd("EHLO client.corp.example", 250)
        c.cmd("MAIL FROM:<app@corp.example>", 250)


def test_starttls_resets_the_session(relay, cert_files):
    r = relay([relay_connector(max_protocol_errors=20, **cert_files)])
    with r.raw() as c:
        c.greet()
        assert c.cmd("STARTTLS now").text == "501 5.5.4 Syntax: STARTTLS"
        c.cmd("MAIL FROM:<app@corp.example>", 250)
        c.cmd("RCPT TO:<user@corp.example>", 250)
        c.cmd("STARTTLS", 220)
        c.starttls(insecure_ctx())
        assert c.cmd("MAIL FROM:<app@corp.example>").text == "503 5.5.2 Send hello first"
        c.cmd("EHLO client.corp.example", 250)
        assert (
            c.cmd("RCPT TO:<user@corp.example>").text == "503 5.5.2 Need mail command"
        )  # pre-TLS MAIL gone
        assert (
            c.cmd("STARTTLS").text
            == "503 5.5.2 Only one STARTTLS command can be issued per session"
        )
        c.cmd("NOOP", 250)


def test_starttls_absent_without_tls_mechanism(relay):
    r = relay([relay_connector(auth_mechanism=["None"])])
    with r.raw() as c:
        assert "STARTTLS" not in c.greet().lines
        assert c.cmd("STARTTLS").code == 500


def _implicit_with_missing_files(tmp: Path) -> dict[str, object]:
    return relay_connector(
        name="Client Submission 465",
        bindings=["127.0.0.1:{port2}"],
        tls_mode="implicit",
        auth_mechanism=["Tls", "BasicAuth", "BasicAuthRequireTLS"],
        permission_groups=["ExchangeUsers"],
        require_tls=True,
        tls_certificate_file=str(tmp / "missing.pem"),
        tls_key_file=str(tmp / "missing.key"),
    )


def test_implicit_tls_without_a_loadable_certificate_never_listens_in_clear(relay, tmp_path):
    """It used to listen in plain TCP while sessions believed TLS was active: require_tls and
    BasicAuthRequireTLS satisfied in clear, AUTH offered in clear. Now it does not start, and
    says which connector and which keys."""
    with pytest.raises(OSError, match="Client Submission 465") as info:
        relay([relay_connector(), _implicit_with_missing_files(tmp_path)])
    assert "tls_certificate_file" in str(info.value) and "missing.pem" in str(info.value)


def test_serve_with_an_implicit_tls_certificate_missing_exits_naming_it(relay, tmp_path):
    r = relay(
        [relay_connector(), _implicit_with_missing_files(tmp_path)], mode="process", start=False
    )
    with pytest.raises(RuntimeError, match="did not start"):
        r.start()
    assert r.proc is not None and r.proc.wait(10) == 1
    log = r.stderr_path.read_text()
    assert 'receive connector "Client Submission 465": tls_certificate_file' in log, log


def test_a_reload_adding_an_implicit_tls_connector_without_certificate_is_refused(
    relay, tmp_path, caplog
):
    import logging

    r = relay([relay_connector()])
    with caplog.at_level(logging.ERROR, logger="relaygate"):
        r.reconfigure([relay_connector(), _implicit_with_missing_files(tmp_path)])
    errors = [x.getMessage() for x in caplog.records if x.levelno >= logging.ERROR]
    assert any("reload refused" in e and "Client Submission 465" in e for e in errors), errors
    assert [c.name for c in r.relay.config.receive_connectors] == ["SMTP Relay Internal"]
    assert sorted(r.relay.server.endpoints) == [("127.0.0.1", r.port)]


def _make_self_signed(args: tuple[str, Any]) -> None:
    folder, barrier = args
    barrier.wait(10)
    ensure_self_signed(Path(folder), "relay.test")


def test_workers_creating_the_self_signed_certificate_at_once_get_a_matching_pair(
    tmp_path: Path,
) -> None:
    """Workers start together: each could write a key and a certificate, leaving one's key beside
    the other's certificate (6 of 40 runs with two processes), and an implicit-TLS listener that
    cannot load its pair. Now one writes the pair under a lock, each file renamed into place."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    for round_ in range(12):
        folder = tmp_path / f"round{round_}"
        with ctx.Manager() as manager:
            barrier = manager.Barrier(6)
            with ctx.Pool(6) as pool:
                pool.map(_make_self_signed, [(str(folder), barrier)] * 6)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(folder / "tls" / "selfsigned.crt", folder / "tls" / "selfsigned.key")
        assert oct((folder / "tls" / "selfsigned.key").stat().st_mode & 0o777) == "0o600"


def test_implicit_tls_handshakes_never_hang_under_concurrent_clients(
    relay, cert_files, client_ctx
) -> None:
    """400 implicit-TLS handshakes from 8 clients at once against `relaygate serve`: none may
    hang. An upgrade of a plain connection that handed early ClientHello bytes to the TLS layer
    left 3-7 of them waiting until the client's timeout (reverted; see the note of issue 7)."""
    import concurrent.futures

    r = relay(
        [
            relay_connector(
                name="Implicit TLS",
                bindings=["127.0.0.1:{port}"],
                tls_mode="implicit",
                **cert_files,
            )
        ],
        mode="process",
    )
    port = r.ports[0]

    def handshake(i: int) -> str | None:
        try:
            with smtplib.SMTP_SSL(
                "127.0.0.1", port, context=client_ctx, source_address=("127.0.0.5", 0), timeout=5,
                local_hostname="client.corp.example",
            ) as s:  # fmt: skip
                s.ehlo()
        except Exception as exc:
            return f"{i}: {type(exc).__name__}: {exc}"
        return None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        failures = [f for f in pool.map(handshake, range(400)) if f]
    assert failures == []
