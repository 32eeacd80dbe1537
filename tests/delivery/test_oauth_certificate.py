"""Entra ID certificate credentials (oauth_client_certificate_file): the client assertion the fake
Entra ID of test_oauth.py verifies (signature against the registered certificate, x5t#S256, aud,
iss/sub, time range, jti), its refusals, the config rules, `relaygate check`, and a real relay that
delivers through a XOAUTH2 smart host and Microsoft Graph with a certificate, defers with Entra ID's
error when the certificate is not the app's, and takes up a renewed certificate on reload."""

from __future__ import annotations

import base64
import datetime as dt
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from relaygate.config.loader import ConfigError, parse_text
from relaygate.delivery.oauth import OAuthTokenProvider, TokenError
from relaygate.queue.model import RecipientStatus
from tests.delivery.test_oauth import (
    CLIENT_ASSERTION_TYPE,
    CLIENT_ID,
    TENANT,
    TENANT_DOMAIN,
    TOKEN,
    FakeEntra,
    x5t_s256,
)
from tests.delivery.test_oauth import ca as ca
from tests.delivery.test_oauth import entra as entra
from tests.queue_manager.helpers import Handler, send, start_relay, start_sink, wait_for

NAME = "Outbound to Microsoft 365"


def make_certificate(
    directory: Path,
    stem: str,
    *,
    days: float = 365,
    key_apart: bool = False,
    cn: str = "RelayGate app credential",
) -> tuple[Path, x509.Certificate, Path | None, rsa.RSAPrivateKey]:
    """A self-signed RSA certificate valid until now + `days`, written as PEM: certificate and key
    in one file, or (`key_apart`) the key in `<stem>.key`. Returns (cert file, cert, key file, key)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(min(now, now + dt.timedelta(days=days)) - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{stem}.pem"
    key_file: Path | None = None
    if key_apart:
        key_file = directory / f"{stem}.key"
        key_file.write_bytes(key_pem)
        cert_file.write_bytes(cert_pem)
    else:
        cert_file.write_bytes(cert_pem + key_pem)
    return cert_file, cert, key_file, key


def cert_provider(entra: FakeEntra, cert_file: Path, key_file: Path | None = None) -> Any:
    return OAuthTokenProvider(
        connector_name=NAME,
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        certificate_file=cert_file,
        key_file=key_file,
        authority_host=entra.authority_host,
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ------------------------------------------------------------------------ the assertion, verified


@pytest.mark.parametrize("key_apart", [False, True], ids=["one-file", "key-file"])
async def test_a_certificate_credential_signs_a_client_assertion_entra_accepts(
    entra: FakeEntra, tmp_path: Path, key_apart: bool
) -> None:
    cert_file, cert, key_file, _ = make_certificate(tmp_path, "app", key_apart=key_apart)
    entra.register(cert)
    p = cert_provider(entra, cert_file, key_file)
    before = int(time.time())
    assert await p() == TOKEN
    assert await p() == TOKEN  # msal's cache: no second request
    [form] = entra.token_requests
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_assertion_type"] == [CLIENT_ASSERTION_TYPE]
    assert "client_secret" not in form
    [(header, claims)] = entra.assertions  # the fake verified the signature, aud, iss, exp, jti
    # Microsoft's "certificate credentials" page today: alg "Should be PS256" (PSS padding), as
    # msal signs its own for Entra ID; the fake verified PSS with a 32-byte salt (RFC 7518 3.5)
    assert header["alg"] == "PS256" and header["typ"] == "JWT"
    assert header["x5t#S256"] == x5t_s256(cert)
    assert header["x5t"] == _b64(cert.fingerprint(hashes.SHA1()))
    assert claims["aud"] == entra.token_endpoint
    assert claims["iss"] == claims["sub"] == CLIENT_ID
    assert uuid.UUID(claims["jti"])
    assert before <= claims["iat"] == claims["nbf"] <= time.time()
    assert claims["exp"] - claims["iat"] == 600
    # a new provider (a restart) signs a new assertion: a new jti, which the fake accepts
    assert await cert_provider(entra, cert_file, key_file)() == TOKEN
    assert len(entra.assertions) == 2 and entra.assertions[1][1]["jti"] != claims["jti"]


async def test_the_audience_is_the_token_endpoint_msal_posts_to(
    entra: FakeEntra, tmp_path: Path
) -> None:
    """oauth_tenant_id given as the tenant's domain name: Entra ID's discovery answers the token
    endpoint by the tenant's id and msal posts there; Entra ID refuses an assertion whose aud is
    not the endpoint it was posted to (MSAL.NET #3352; the same with login.windows.net, whose
    discovery answers login.microsoftonline.com), so aud is the discovered endpoint, as in the
    assertions msal signs itself."""
    cert_file, cert, _, _ = make_certificate(tmp_path, "app")
    entra.register(cert)
    p = OAuthTokenProvider(
        connector_name=NAME,
        tenant_id=TENANT_DOMAIN,
        client_id=CLIENT_ID,
        certificate_file=cert_file,
        authority_host=entra.authority_host,
    )
    assert await p() == TOKEN
    [(_, claims)] = entra.assertions
    assert claims["aud"] == entra.token_endpoint


async def test_a_certificate_not_registered_is_refused_with_entra_s_error(
    entra: FakeEntra, tmp_path: Path
) -> None:
    registered = make_certificate(tmp_path, "registered")[1]
    entra.register(registered)
    other_file = make_certificate(tmp_path, "other")[0]
    with pytest.raises(TokenError) as info:
        await cert_provider(entra, other_file)()
    text = str(info.value)
    assert "invalid_client" in text and "AADSTS700027" in text and NAME in text
    assert "PRIVATE KEY" not in text and "Trace ID" not in text
    assert entra.assertions == []


async def test_a_renewed_certificate_is_used_after_entra_refused_the_old_one(
    entra: FakeEntra, tmp_path: Path
) -> None:
    """As with a secret: once refused, the next request reads the file again."""
    old_file, old, _, _ = make_certificate(tmp_path, "app")
    p = cert_provider(entra, old_file)
    with pytest.raises(TokenError, match="AADSTS700027"):
        await p()
    new = make_certificate(tmp_path / "new", "app")
    old_file.write_bytes(new[0].read_bytes())
    entra.register(new[1])
    assert await p() == TOKEN
    assert entra.assertions[0][0]["x5t#S256"] == x5t_s256(new[1]) != x5t_s256(old)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("nothing", "cannot read"),
        ("no-cert", "holds no PEM certificate"),
        ("no-key", "holds no PEM private key"),
        ("other-key", "does not belong to the certificate"),
        ("encrypted", "encrypted"),
    ],
)
async def test_an_unusable_credential_file_names_the_file_and_sends_nothing(
    entra: FakeEntra, tmp_path: Path, content: str, expected: str
) -> None:
    cert_file, cert, _, key = make_certificate(tmp_path, "app")
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if content == "nothing":
        cert_file.unlink()
    elif content == "no-cert":
        cert_file.write_text("not a certificate\n")
    elif content == "no-key":
        cert_file.write_bytes(cert_pem)
    elif content == "other-key":
        cert_file.write_bytes(
            cert_pem
            + other.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    else:
        cert_file.write_bytes(
            cert_pem
            + key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(b"pw"),
            )
        )
    with pytest.raises(TokenError) as info:
        await cert_provider(entra, cert_file)()
    text = str(info.value)
    assert expected in text and str(cert_file) in text and NAME in text
    assert entra.token_requests == []


def test_a_pfx_given_by_mistake_is_named_with_the_conversion(tmp_path: Path) -> None:
    """Windows exports the app's certificate as a .pfx (or a DER .cer): the error says the file is
    not PEM and how to convert it, not only that no PEM certificate was found."""
    from cryptography.hazmat.primitives.serialization import pkcs12

    from relaygate.delivery.entra_certificate import (
        CertificateCredentialError,
        load_certificate_credential,
    )

    _, cert, _, key = make_certificate(tmp_path, "app")
    pfx = tmp_path / "app.pfx"
    pfx.write_bytes(
        pkcs12.serialize_key_and_certificates(b"app", key, cert, None, serialization.NoEncryption())
    )
    der = tmp_path / "app.cer"
    der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    for path in (pfx, der):
        with pytest.raises(CertificateCredentialError) as info:
            load_certificate_credential(path)
        text = str(info.value)
        assert str(path) in text and "not PEM" in text and "openssl pkcs12" in text


# ----------------------------------------------------------------- the fake refuses a wrong one


def _forge(key: rsa.RSAPrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(sig)}"


def _post(entra: FakeEntra, ca: trustme.CA, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    request = urllib.request.Request(
        entra.token_endpoint, data=urllib.parse.urlencode(form).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize(
    ("forgery", "code"),
    [
        ("good", None),
        ("wrong-aud", "AADSTS700212"),
        ("wrong-iss", "AADSTS700021"),
        ("wrong-sub", "AADSTS700021"),
        ("expired", "AADSTS700024"),
        ("too-long", "AADSTS700024"),
        ("other-key", "AADSTS700027"),
        ("unregistered-x5t", "AADSTS700027"),
        ("replayed", "AADSTS700023"),
        ("no-type", "AADSTS50027"),
    ],
)
def test_the_fake_entra_verifies_the_assertion(
    entra: FakeEntra, ca: trustme.CA, tmp_path: Path, forgery: str, code: str | None
) -> None:
    """The fake is the oracle of the tests above: it must refuse what Entra ID refuses."""
    _, cert, _, key = make_certificate(tmp_path, "app")
    entra.register(cert)
    now = int(time.time())
    header = {"alg": "RS256", "typ": "JWT", "x5t#S256": x5t_s256(cert)}
    claims = {
        "aud": entra.token_endpoint,
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "jti": str(uuid.uuid4()),
        "nbf": now,
        "iat": now,
        "exp": now + 600,
    }
    signer = key
    if forgery == "wrong-aud":
        claims["aud"] = f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token"
    elif forgery == "wrong-iss":
        claims["iss"] = "00000000-0000-0000-0000-000000000000"
    elif forgery == "wrong-sub":
        claims["sub"] = "00000000-0000-0000-0000-000000000000"
    elif forgery == "expired":
        claims.update(nbf=now - 1200, iat=now - 1200, exp=now - 600)
    elif forgery == "too-long":
        claims["exp"] = now + 3600
    elif forgery == "other-key":
        signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif forgery == "unregistered-x5t":
        header["x5t#S256"] = _b64(b"\x00" * 32)
    form = {
        "grant_type": "client_credentials",
        "client_id": CLIENT_ID,
        "scope": "https://outlook.office365.com/.default",
        "client_assertion_type": CLIENT_ASSERTION_TYPE,
        "client_assertion": _forge(signer, header, claims),
    }
    if forgery == "no-type":
        del form["client_assertion_type"]
    if forgery == "replayed":
        assert _post(entra, ca, form)[0] == 200
    status, body = _post(entra, ca, form)
    if code is None:
        assert status == 200 and body["access_token"] == TOKEN
    else:
        assert status == 401 and body["error"] == "invalid_client"
        assert body["error_description"].startswith(code)


# ------------------------------------------------------------------------- configuration, check

_BASE = f"""
[server]
name = "R"
fqdn = "relay.test"
[[accepted_domains]]
domain = "corp.test"
[[send_connectors]]
name = "{NAME}"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["smtp.office365.com"]
port = 587
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
"""


def test_a_secret_and_a_certificate_together_are_refused_naming_both_keys() -> None:
    text = (
        _BASE + 'oauth_client_secret_env = "M365_SECRET"\noauth_client_certificate_file = "a.pem"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_text(text, "<test>")
    message = str(info.value)
    assert NAME in message
    assert "oauth_client_secret_env" in message and "oauth_client_certificate_file" in message
    assert "not both" in message


def test_graph_also_refuses_a_secret_file_and_a_certificate_together() -> None:
    text = _BASE.replace('smart_host_auth_mechanism = "XOAUTH2"', 'delivery_method = "Graph"')
    text = text.replace('smart_hosts = ["smtp.office365.com"]\n', "")
    text += 'oauth_client_secret_file = "s.txt"\noauth_client_certificate_file = "a.pem"\n'
    with pytest.raises(ConfigError) as info:
        parse_text(text, "<test>")
    message = str(info.value)
    assert NAME in message
    assert "oauth_client_secret_file" in message and "oauth_client_certificate_file" in message
    assert "not both" in message


def test_neither_credential_names_both_ways_and_a_lone_key_file_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(_BASE, "<test>")
    assert "oauth_client_certificate_file" in str(info.value) and NAME in str(info.value)
    with pytest.raises(ConfigError) as info:
        parse_text(
            _BASE + 'oauth_client_secret_env = "S"\noauth_client_key_file = "k.pem"\n', "<t>"
        )
    assert "oauth_client_key_file" in str(info.value)
    config = parse_text(_BASE + 'oauth_client_certificate_file = "a.pem"\n', "<test>")
    assert config.send_connectors[0].oauth_client_certificate_file == Path("a.pem")


def test_relaygate_check_loads_the_certificate_credential(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relaygate.cli import app

    monkeypatch.delenv("RELAYGATE_CONFIG", raising=False)
    cert_file, _, _, _ = make_certificate(tmp_path, "app")
    config = tmp_path / "relaygate.toml"
    config.write_text(_BASE + f'oauth_client_certificate_file = "{cert_file}"\n')
    runner = CliRunner()
    good = runner.invoke(app, ["check", "--config", str(config), "--json"])
    assert good.exit_code == 0, good.output
    cert_file.write_bytes(cert_file.read_bytes().split(b"-----BEGIN PRIVATE KEY")[0])
    bad = runner.invoke(app, ["check", "--config", str(config), "--json"])
    assert bad.exit_code == 1, bad.output
    [error] = json.loads(bad.stdout)["errors"]
    assert error["connector"] == NAME
    assert error["path"] == "send_connectors[0].oauth_client_certificate_file"
    assert str(cert_file) in error["message"] and "no PEM private key" in error["message"]
    text = runner.invoke(app, ["check", "--config", str(config)])
    assert text.exit_code == 1 and "oauth_client_certificate_file" in text.output
    assert NAME in text.output


# ---------------------------------------------------------------------------- a real relay


def _xoauth2_connector(entra: FakeEntra, port: int, cert_file: Path) -> str:
    return f"""
[[send_connectors]]
name = "{NAME}"
address_spaces = ["example.com"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:{port}"]
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
oauth_client_certificate_file = "{cert_file}"
oauth_authority_host = "{entra.authority_host}"
"""


async def _xoauth2_sink(ca: trustme.CA) -> Any:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    return await start_sink(
        Handler(oauth_tokens={"relay@corp.test": TOKEN}),
        tls_context=server_tls,
        auth_required=True,
        require_starttls=True,
    )


DATA = b"From: scanner@corp.test\r\nSubject: scan\r\n\r\nscanned\r\n"


async def test_a_relay_delivers_through_xoauth2_with_a_certificate_and_a_reload_takes_up_a_renewed_one(
    entra: FakeEntra, ca: trustme.CA, tmp_path: Path
) -> None:
    cert_file, cert, _, _ = make_certificate(tmp_path / "creds", "m365")
    entra.register(cert)
    sink = await _xoauth2_sink(ca)
    relay = await start_relay(
        tmp_path / "data",
        {},
        extra=_xoauth2_connector(entra, sink.port, cert_file),
        config_file=tmp_path / "relaygate.toml",
    )
    try:
        for rcpt in ("bob@example.com", "carol@example.com"):
            assert (await send(relay, "scanner@corp.test", [rcpt], DATA))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 2, timeout=15.0)
        assert all(m["tls"] and m["auth"] == "relay@corp.test" for m in sink.handler.messages)
        assert [h["x5t#S256"] for h, _ in entra.assertions] == [x5t_s256(cert)]  # one token
        assert "client_secret" not in entra.token_requests[0]

        # The certificate is renewed in place (the new one uploaded to the app first); a reload
        # takes it up: the next token is asked for with it.
        renewed = make_certificate(tmp_path / "renewed", "m365")
        entra.register(renewed[1])
        cert_file.write_bytes(renewed[0].read_bytes())
        await relay.reload()
        assert (await send(relay, "scanner@corp.test", ["dave@example.com"], DATA))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 3, timeout=15.0)
        assert [h["x5t#S256"] for h, _ in entra.assertions] == [
            x5t_s256(cert),
            x5t_s256(renewed[1]),
        ]
    finally:
        await relay.stop()
        await sink.close()


async def test_a_wrong_certificate_defers_with_entra_s_error(
    entra: FakeEntra, ca: trustme.CA, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    entra.register(make_certificate(tmp_path / "creds", "registered")[1])
    wrong_file = make_certificate(tmp_path / "creds", "wrong")[0]
    sink = await _xoauth2_sink(ca)
    relay = await start_relay(
        tmp_path / "data", {}, extra=_xoauth2_connector(entra, sink.port, wrong_file)
    )
    try:
        assert (await send(relay, "scanner@corp.test", ["bob@example.com"], DATA))[0] == 250

        async def deferred() -> Any:
            msgs = await relay.store.list_messages()
            r = msgs[0].recipients[0] if msgs else None
            return r if r is not None and r.status == RecipientStatus.DEFERRED else None

        r = await wait_for(deferred, timeout=15.0)
        assert r, "the recipient was not deferred"
        last = r.last_error
        assert last.startswith("451 ") and "4.7.0 SMTPSEND.Auth.TokenUnavailable" in last
        assert "invalid_client" in last and "AADSTS700027" in last and NAME in last
        assert "PRIVATE KEY" not in last
        assert sink.handler.messages == []
        assert any("AADSTS700027" in rec.getMessage() for rec in caplog.records)
    finally:
        await relay.stop()
        await sink.close()
