"""HTTPS on the admin listener (admin.tls_certificate_file / tls_key_file): real certificates
(trustme, and the relay's own self-signed maker), a real HTTPS client (httpx over ssl) against an
in-process relay, and the `relaygate queue` CLI against a `relaygate serve` process."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import warnings
from pathlib import Path

import httpx
import pytest
import trustme

from relaygate.admin.server import AdminStartError
from relaygate.smtp.tls import ensure_self_signed
from tests.admin_web.test_web import RelayThread
from tests.cli_admin.helpers import PYTHON, run
from tests.queue_manager.helpers import free_port, start_relay
from tests.support.serve_process import wait_for_ready_line

TOKEN = "tls-test-token-0123456789"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def _issue(ca: trustme.CA, folder: Path, name: str = "127.0.0.1") -> tuple[Path, Path]:
    """A certificate for ``name`` issued by ``ca`` (chain after it) and its key, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(name)
    chain, key = folder / "admin.crt", folder / "admin.key"
    cert.private_key_pem.write_to_path(str(key))
    chain.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return chain, key


def _tls_keys(cert: Path, key: Path) -> str:
    return f'tls_certificate_file = "{cert}"\ntls_key_file = "{key}"'


def _client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def _served_certificate(url: str) -> bytes:
    """The DER certificate the listener at ``url`` presents to a new connection."""
    host, port = url.removeprefix("https://").rsplit(":", 1)
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate((host, int(port)), timeout=10))


def _der(pem_file: Path) -> bytes:
    """The first certificate of ``pem_file`` (the leaf), DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificates(pem_file.read_bytes())[0].public_bytes(Encoding.DER)


def test_the_admin_listener_serves_https_with_tls_1_2_or_later(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """Without TLS the API token and the session cookie crossed the network in clear on a
    non-loopback admin.listen. With the two keys set the listener speaks HTTPS only, TLS 1.2
    or later, and the sign-in's session cookie is Secure."""
    cert, key = _issue(ca, tmp_path / "tls")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    node = RelayThread(
        tmp_path / "data",
        admin_extra=f'api_token_file = "{token_file}"\n{_tls_keys(cert, key)}',
        token=TOKEN,
    )
    try:
        assert node.url.startswith("https://127.0.0.1:"), node.url
        with httpx.Client(verify=_client(ca), timeout=10) as client:
            answer = client.get(
                node.url + "/api/queue", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert answer.status_code == 200
            version = answer.extensions["network_stream"].get_extra_info("ssl_object").version()
            assert version in ("TLSv1.2", "TLSv1.3"), version
            signed_in = client.post(
                node.url + "/login", data={"token": TOKEN}, headers={"Origin": node.url}
            )
            assert signed_in.status_code == 303, signed_in.text
            cookie = signed_in.headers["set-cookie"]
            assert cookie.startswith(node.session_cookie + "=") and "Secure" in cookie, cookie
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(old)
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        with warnings.catch_warnings():  # TLSv1/TLSv1_1 are deprecated names: the point here
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(httpx.ConnectError):
            httpx.get(node.url + "/healthz", verify=old, timeout=10)
        with pytest.raises(httpx.HTTPError):  # plain HTTP gets no answer
            httpx.get(node.url.replace("https://", "http://") + "/healthz", timeout=10)
    finally:
        node.stop()


@pytest.mark.parametrize("broken", ["missing key", "unreadable key", "mismatched pair"])
def test_a_certificate_that_cannot_be_loaded_stops_the_start_naming_key_and_file(
    ca: trustme.CA, tmp_path: Path, broken: str
) -> None:
    cert, key = _issue(ca, tmp_path / "a")
    if broken == "missing key":
        key.unlink()
        expected = [f"admin.tls_key_file '{key}'", "No such file"]
    elif broken == "unreadable key":
        if os.geteuid() == 0:  # root reads a 0000 file: a directory cannot be opened as one
            key.unlink()
            key.mkdir()
            expected = [f"admin.tls_key_file '{key}'", "Is a directory"]
        else:
            key.chmod(0)
            expected = [f"admin.tls_key_file '{key}'", "Permission denied"]
    else:
        _other_cert, other_key = _issue(ca, tmp_path / "b")
        key = other_key
        expected = [
            f"admin.tls_certificate_file '{cert}' and admin.tls_key_file '{key}'",
            "KEY_VALUES_MISMATCH",
        ]
    with pytest.raises(AdminStartError) as raised:
        asyncio.run(
            start_relay(tmp_path / "data", {"*": free_port()}, admin_extra=_tls_keys(cert, key))
        )
    for part in expected:
        assert part in str(raised.value), str(raised.value)


def test_check_names_an_admin_certificate_that_cannot_be_loaded(
    ca: trustme.CA, tmp_path: Path
) -> None:
    cert, _key = _issue(ca, tmp_path / "a")
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\nname = "RELAY01"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n{_tls_keys(cert, tmp_path / "gone.key")}\n',
        encoding="utf-8",
    )
    result = run("check", "--config", str(config))
    assert result.code == 1, result
    assert "admin.tls_key_file" in result.out and "gone.key" in result.out, result.out
    config.write_text(
        config.read_text(encoding="utf-8").replace(
            f'tls_key_file = "{tmp_path / "gone.key"}"\n', ""
        ),
        encoding="utf-8",
    )
    result = run("check", "--config", str(config))
    assert result.code == 1, result
    assert "set both admin.tls_certificate_file and admin.tls_key_file" in result.out, result.out


def test_a_renewed_certificate_is_served_after_a_reload_and_after_its_files_change(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The certificate is loaded again at a reload (new files named) and when its files change
    in place (a renewal copied over them), as the SMTP listener's are; a pair that does not load
    refuses the reload and the running certificate stays."""
    first = _issue(ca, tmp_path / "first")
    second = _issue(ca, tmp_path / "second")
    third = _issue(ca, tmp_path / "third")
    config_file = tmp_path / "relaygate.toml"
    node = RelayThread(tmp_path / "data", config_file=config_file, admin_extra=_tls_keys(*first))
    try:
        assert _served_certificate(node.url) == _der(first[0])
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(text.replace(str(tmp_path / "first"), str(tmp_path / "second")))
        node.call(node.relay.reload())
        assert _served_certificate(node.url) == _der(second[0])
        assert httpx.get(node.url + "/healthz", verify=_client(ca), timeout=10).status_code == 200

        # renewed in place: the third pair copied over the second's files
        shutil.copyfile(third[1], second[1])
        shutil.copyfile(third[0], second[0])
        node.call(node.relay.admin.watch_certificate())
        assert _served_certificate(node.url) == _der(third[0])

        # a key that is not the certificate's: the reload is refused, the certificate stays
        config_file.write_text(
            config_file.read_text(encoding="utf-8").replace(
                f'tls_key_file = "{second[1]}"', f'tls_key_file = "{first[1]}"'
            )
        )
        with caplog.at_level(logging.ERROR, logger="relaygate"):
            node.call(node.relay.reload())
        assert "reload refused" in caplog.text and "admin.tls_key_file" in caplog.text
        assert node.relay.config.admin.tls_key_file == second[1]
        assert _served_certificate(node.url) == _der(third[0])
    finally:
        node.stop()


def test_a_reload_turning_https_off_waits_for_a_restart(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = _issue(ca, tmp_path / "tls")
    config_file = tmp_path / "relaygate.toml"
    node = RelayThread(tmp_path / "data", config_file=config_file, admin_extra=_tls_keys(cert, key))
    try:
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(text.replace(_tls_keys(cert, key), ""), encoding="utf-8")
        with caplog.at_level(logging.WARNING, logger="relaygate"):
            node.call(node.relay.reload())
        assert "admin.tls_certificate_file / admin.tls_key_file (HTTPS) changed" in caplog.text
        assert node.relay.config.admin.tls_certificate_file == cert  # what the listener runs
        assert httpx.get(node.url + "/healthz", verify=_client(ca), timeout=10).status_code == 200
    finally:
        node.stop()


def _serve(config: Path, cwd: Path) -> subprocess.Popen[bytes]:
    """`relaygate serve` on ``config``, once it said it is ready (with the admin URL it serves)."""
    proc = subprocess.Popen(
        [PYTHON, "-m", "relaygate", "serve", "--config", str(config)],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    ready = wait_for_ready_line(proc)
    # the ready line said "admin http://" of an HTTPS listener
    if ready is None or b"; admin https://" not in ready:
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"relaygate serve did not say it is ready on HTTPS: {ready!r}")
    return proc


def test_the_queue_cli_talks_https_trusting_the_configured_self_signed_certificate(
    tmp_path: Path,
) -> None:
    """`relaygate queue` finds the URL in admin.listen: with a certificate configured it speaks
    HTTPS and trusts that certificate (self-signed, named relay.test, reached as 127.0.0.1 for a
    0.0.0.0 listener) and no other: a server presenting another one does not get the token."""
    cert, key = ensure_self_signed(tmp_path / "tls", "relay.test")
    other_cert, _other_key = ensure_self_signed(tmp_path / "other", "relay.test")
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    token_file.chmod(0o600)
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\nname = "RELAY01"\nfqdn = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[admin]\nlisten = "0.0.0.0:{free_port()}"\napi_token_file = "{token_file}"\n'
        f"{_tls_keys(cert, key)}\n",
        encoding="utf-8",
    )
    proc = _serve(config, tmp_path)
    try:
        listed = run("queue", "list", "--config", str(config), "--json")
        assert listed.code == 0, listed
        assert isinstance(listed.json(), (list, dict))
        summary = run("queue", "summary", "--config", str(config))
        assert summary.code == 0, summary

        # the CLI's configuration names another certificate than the one the server presents
        other = tmp_path / "other.toml"
        other.write_text(
            config.read_text(encoding="utf-8").replace(f'"{cert}"', f'"{other_cert}"'),
            encoding="utf-8",
        )
        refused = run("queue", "list", "--config", str(other))
        assert refused.code == 1, refused
        assert "TLS failed" in refused.err and str(other_cert) in refused.err, refused.err
        assert "not running" not in refused.err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_queue_cli_says_the_admin_certificate_expired_naming_the_file(
    tmp_path: Path,
) -> None:
    """An expired admin certificate (the listener still serves it: nothing checks dates there)
    made `relaygate queue` say 'the server does not present the certificate of
    admin.tls_certificate_file': it does, and the admin went looking for another one. It now
    says the certificate expired, when, and names the file to renew."""
    from tests.delivery.test_oauth_certificate import make_certificate

    cert, _, key, _ = make_certificate(tmp_path / "tls", "admin", days=-2, key_apart=True)
    assert key is not None
    key.chmod(0o600)
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\nname = "RELAY01"\nfqdn = "relay.test"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{free_port()}"\n{_tls_keys(cert, key)}\n',
        encoding="utf-8",
    )
    proc = _serve(config, tmp_path)
    try:
        refused = run("queue", "list", "--config", str(config))
        assert refused.code == 1, refused
        assert f"admin.tls_certificate_file {str(cert)!r} expired on " in refused.err, refused.err
        assert "does not present" not in refused.err, refused.err
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the listener closes ``sock`` (end of stream, or a reset) within ``within`` s."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_that_never_finish_the_tls_handshake_are_bounded(
    ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TLS, a connection that sends nothing is closed after REQUEST_TIMEOUT and counts
    towards MAX_CONNECTIONS. With TLS the listener only heard of a connection once its handshake
    was done: one that never began it stayed asyncio's 60 s, and any number of them could be
    open at once (file descriptors the admin listener shares with SMTP). Now a handshake gets
    REQUEST_TIMEOUT and at most MAX_CONNECTIONS are under way (a new one takes the place of the
    oldest)."""
    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 3)
    cert, key = _issue(ca, tmp_path / "tls")
    node = RelayThread(tmp_path / "data", admin_extra=_tls_keys(cert, key))
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    silent = [socket.create_connection(node.relay.admin.endpoint, timeout=10) for _ in range(6)]
    try:
        # past the cap the oldest handshakes made room at once, well before REQUEST_TIMEOUT
        assert all(_closed_by_server(s, within=0.5) for s in silent[:3])
        assert httpx.get(node.url + "/healthz", verify=_client(ca), timeout=10).status_code == 200
        # the others (the last of them made room for the HTTPS client) end with REQUEST_TIMEOUT
        assert all(_closed_by_server(s, within=5) for s in silent[3:])
    finally:
        for s in silent:
            s.close()
        node.stop()


def test_a_key_every_local_user_can_read_is_warned_about(
    ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key copied with `cp` keeps 0644: every local user could read it and pose as the admin
    listener to the admins (their token). Used, with a warning naming the key and the fix."""
    cert, key = _issue(ca, tmp_path / "tls")
    key.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        node = RelayThread(tmp_path / "data", admin_extra=_tls_keys(cert, key))
    try:
        assert f"admin.tls_key_file '{key}' has mode 0644" in caplog.text, caplog.text
        assert f"chmod o-rwx {key}" in caplog.text
        assert httpx.get(node.url + "/healthz", verify=_client(ca), timeout=10).status_code == 200
    finally:
        node.stop()


def _wait_served(url: str, expected: bytes, within: float = 15) -> None:
    """Until the listener at ``url`` presents ``expected`` (DER) to a new connection."""
    import time

    deadline = time.monotonic() + within
    while (served := _served_certificate(url)) != expected:
        assert time.monotonic() < deadline, "the listener still presents the old certificate"
        time.sleep(0.1)
    assert served == expected


def test_relaygate_serve_takes_a_renewed_certificate_from_its_files_and_at_sighup(
    ca: trustme.CA, tmp_path: Path
) -> None:
    """In the process: a renewal copied over the files is served without a reload (the config
    watcher sees the files change), and SIGHUP after the config names another pair serves it."""
    first = _issue(ca, tmp_path / "first")
    renewed = _issue(ca, tmp_path / "renewed")
    moved = _issue(ca, tmp_path / "moved")
    port = free_port()
    config = tmp_path / "relaygate.toml"
    config.write_text(
        f'[server]\nname = "RELAY01"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{port}"\n{_tls_keys(*first)}\n',
        encoding="utf-8",
    )
    url = f"https://127.0.0.1:{port}"
    proc = _serve(config, tmp_path)
    try:
        # every handshake completes (under uvloop a TLS layer put in from a task lost the
        # ClientHello of one connection in four, which then hung until its timeout)
        for _ in range(20):
            assert _served_certificate(url) == _der(first[0])
        shutil.copyfile(renewed[1], first[1])
        shutil.copyfile(renewed[0], first[0])
        _wait_served(url, _der(renewed[0]))
        # a config edit is reloaded by the same watcher: SIGHUP is what is tested here, so the
        # file keeps its stamp (mtime and inode) while its text changes
        stat = config.stat()
        text = config.read_text(encoding="utf-8")
        config.write_text(text.replace(str(tmp_path / "first"), str(tmp_path / "moved")))
        os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        proc.send_signal(signal.SIGHUP)
        _wait_served(url, _der(moved[0]))
        assert httpx.get(url + "/healthz", verify=_client(ca), timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
