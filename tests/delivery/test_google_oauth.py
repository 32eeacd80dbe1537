"""XOAUTH2 to Google Workspace with a service account (domain-wide delegation): a fake Google
token endpoint over HTTPS on 127.0.0.1 (a trustme certificate the connector trusts through its
tls_ca_file) that verifies the JWT-bearer assertion with the service account's public key, and an
SMTP sink on loopback that requires AUTH XOAUTH2 with that token. The service account's key is
generated here (RSA 2048) and written as Google Cloud writes it, its token_uri pointing at the fake.

relaygate.delivery.google_oauth is imported inside the tests that use it, so that each test fails
on its own against a tree without the feature."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import trustme
from aiosmtpd.smtp import AuthResult
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from relaygate.config.loader import ConfigError, parse_text
from relaygate.delivery.oauth import TokenError
from relaygate.queue.model import RecipientStatus
from tests.delivery.helpers import Handler, start_sink
from tests.queue_manager.helpers import send, start_relay, wait_for

CLIENT_EMAIL = "relaygate@corp-mail-123456.iam.gserviceaccount.com"
KEY_ID = "0123456789abcdef0123456789abcdef01234567"
MAILBOX = "scanner-relay@corp.test"
SCOPE = "https://mail.google.com/"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Issued:
    header: dict[str, Any]
    claims: dict[str, Any]
    assertion: str


class FakeGoogle:
    """POST /token: the jwt-bearer grant, checked as Google checks it. `refuse` = (status, error,
    description) answers every request with that error instead."""

    def __init__(self, cert: trustme.LeafCert, public_key: rsa.RSAPublicKey) -> None:
        self.public_key = public_key
        self.issued: list[Issued] = []
        self.rejected: list[str] = []  # why the fake refused a request it did not expect to
        self.refuse: tuple[int, str, str] | None = None
        self.requests = 0  # POSTs received, refused ones included
        self.expires_in = 3599
        self.clock = time.time
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                owner.requests += 1
                if owner.refuse is not None:
                    code, error, description = owner.refuse
                    self._json(code, {"error": error, "error_description": description})
                    return
                why = owner.check(self.path, form)
                if why:
                    owner.rejected.append(why)
                    self._json(400, {"error": "invalid_grant", "error_description": why})
                    return
                n = len(owner.issued) - 1
                self._json(
                    200,
                    {
                        "access_token": f"ya29.token-{n}",
                        "expires_in": owner.expires_in,
                        "token_type": "Bearer",
                    },
                )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def token_uri(self) -> str:
        return f"https://127.0.0.1:{self.port}/token"

    def check(self, path: str, form: dict[str, list[str]]) -> str:
        """'' when the request is a valid jwt-bearer grant for MAILBOX (and records it)."""
        if path != "/token":
            return f"path {path}"
        if form.get("grant_type") != [JWT_BEARER]:
            return f"grant_type {form.get('grant_type')}"
        assertion = (form.get("assertion") or [""])[0]
        parts = assertion.split(".")
        if len(parts) != 3:
            return "not a JWT"
        header = json.loads(_unb64(parts[0]))
        claims = json.loads(_unb64(parts[1]))
        try:
            self.public_key.verify(
                _unb64(parts[2]),
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "Invalid JWT Signature."
        if header.get("alg") != "RS256" or header.get("kid") != KEY_ID:
            return f"header {header}"
        now = self.clock()
        if claims.get("iss") != CLIENT_EMAIL:
            return f"iss {claims.get('iss')}"
        if claims.get("sub") != MAILBOX:
            return f"sub {claims.get('sub')}"
        if claims.get("aud") != self.token_uri:
            return f"aud {claims.get('aud')}"
        if claims.get("scope") != SCOPE:
            return f"scope {claims.get('scope')}"
        iat, exp = claims.get("iat"), claims.get("exp")
        if not isinstance(iat, int) or not isinstance(exp, int):
            return "iat/exp"
        if not (iat - 300 <= now and exp > now and 0 < exp - iat <= 3600):
            return f"Invalid JWT: Token must be a short-lived token (iat {iat}, exp {exp})"
        self.issued.append(Issued(header, claims, assertion))
        return ""

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Account:
    key_file: Path
    ca_file: Path
    pem: str


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def google(
    ca: trustme.CA, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeGoogle]:
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)  # loopback only, straight to the fake
    server = FakeGoogle(ca.issue_cert("127.0.0.1"), rsa_key.public_key())
    try:
        yield server
    finally:
        server.close()


def write_key_file(path: Path, key: rsa.RSAPrivateKey, token_uri: str, **changes: Any) -> str:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    info = {
        "type": "service_account",
        "project_id": "corp-mail-123456",
        "private_key_id": KEY_ID,
        "private_key": pem,
        "client_email": CLIENT_EMAIL,
        "client_id": "109876543210987654321",
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "universe_domain": "googleapis.com",
    }
    info.update(changes)
    path.write_text(json.dumps(info, indent=2))
    return pem


@pytest.fixture
def account(
    google: FakeGoogle, ca: trustme.CA, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> Account:
    ca_file = tmp_path / "google-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    key_file = tmp_path / "relaygate-sa.json"
    pem = write_key_file(key_file, rsa_key, google.token_uri)
    return Account(key_file, ca_file, pem)


def provider(account: Account, **kwargs: Any) -> Any:
    from relaygate.delivery.google_oauth import GoogleTokenProvider

    return GoogleTokenProvider(
        connector_name="Outbound to Gmail",
        key_file=account.key_file,
        subject=MAILBOX,
        ca_file=account.ca_file,
        **kwargs,
    )


# --------------------------------------------------------------------------------------------------
# the token provider


async def test_a_signed_jwt_bearer_assertion_gets_a_token_kept_for_the_next_calls(
    google: FakeGoogle, account: Account
) -> None:
    p = provider(account)
    assert await p() == "ya29.token-0"
    assert await p() == "ya29.token-0"
    assert await p() == "ya29.token-0"
    assert google.rejected == []
    assert len(google.issued) == 1  # cached: one token request for three calls
    claims = google.issued[0].claims
    assert claims["exp"] - claims["iat"] == 3600
    assert google.issued[0].header == {"alg": "RS256", "typ": "JWT", "kid": KEY_ID}


async def test_a_token_near_its_expiry_is_renewed_with_a_new_jwt(
    google: FakeGoogle, account: Account
) -> None:
    now = [time.time()]
    google.clock = lambda: now[0]  # the fake checks iat/exp on the same clock
    p = provider(account, clock=lambda: now[0])
    assert await p() == "ya29.token-0"
    now[0] += 3000  # 50 minutes: more than 5 minutes left of 3599 s
    assert await p() == "ya29.token-0"
    assert len(google.issued) == 1
    now[0] += 400  # 56 minutes 40: renewed ahead of the hour
    assert await p() == "ya29.token-1"
    assert await p() == "ya29.token-1"
    assert len(google.issued) == 2 and google.rejected == []
    first, second = google.issued
    assert second.claims["iat"] - first.claims["iat"] == 3400
    assert second.claims["exp"] - second.claims["iat"] == 3600
    assert second.assertion != first.assertion


async def test_an_expired_token_is_renewed_with_a_fresh_assertion(
    google: FakeGoogle, account: Account
) -> None:
    """A token Google gives for 2 s is renewed after it ran out, with a newly signed JWT."""
    google.expires_in = 2
    p = provider(account)
    assert await p() == "ya29.token-0"
    assert await p() == "ya29.token-0"  # within its lifetime less a tenth
    assert len(google.issued) == 1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        token = await p()
        if token != "ya29.token-0":
            break
        await asyncio.sleep(0.2)
    assert token == "ya29.token-1"
    assert len(google.issued) == 2
    first, second = google.issued
    assert second.assertion != first.assertion
    assert second.claims["iat"] >= first.claims["iat"] + 1
    assert google.rejected == []


@pytest.mark.parametrize("expires_in", [float("nan"), "NaN", "soon", None, -5, 10**12])
async def test_an_odd_expires_in_still_gives_the_token_kept_for_a_bounded_time(
    google: FakeGoogle, account: Account, expires_in: Any
) -> None:
    """expires_in NaN (json reads the NaN literal; float() the string) made the provider raise
    ValueError (its log line's int(NaN)): the token it had been given was lost, and the client
    saw no TokenError, only 'OAuth token provider failed: ValueError' (review, reproduced)."""
    google.expires_in = expires_in
    now = [time.time()]
    google.clock = lambda: now[0]
    p = provider(account, clock=lambda: now[0])
    assert await p() == "ya29.token-0"
    now[0] += 24 * 3600 + 1  # whatever it said, never kept beyond a day
    assert await p() == "ya29.token-1"


async def test_invalidate_drops_the_token(google: FakeGoogle, account: Account) -> None:
    p = provider(account)
    assert await p() == "ya29.token-0"
    await p.invalidate()
    assert await p() == "ya29.token-1"
    assert len(google.issued) == 2


async def test_a_late_refusal_of_the_old_token_keeps_the_new_one(
    google: FakeGoogle, account: Account
) -> None:
    """Several deliveries refused the same revoked token at once: the first drops it and gets a
    new one, the others' refusals (of the old token) keep the new one. Before, each refusal
    dropped whatever was cached: one token request per refused delivery (review, reproduced:
    three requests)."""
    p = provider(account)
    old = await p()
    await p.invalidate(old)  # the first delivery's 535
    new = await p()
    await p.invalidate(old)  # a second delivery's 535, to the same old token
    assert await p() == new == "ya29.token-1"
    assert len(google.issued) == 2


@pytest.mark.parametrize(
    ("error", "description"),
    [
        ("invalid_grant", "Invalid JWT Signature."),
        (
            "unauthorized_client",
            "Client is unauthorized to retrieve access tokens using this method, or client not "
            "authorized for any of the scopes requested.",
        ),
    ],
)
async def test_a_refusal_is_named_by_google_s_error_never_by_the_key(
    google: FakeGoogle, account: Account, error: str, description: str
) -> None:
    google.refuse = (400 if error == "invalid_grant" else 401, error, description)
    with pytest.raises(TokenError) as info:
        await provider(account)()
    text = str(info.value)
    assert f"{error} ({description})" in text
    assert "Outbound to Gmail" in text and CLIENT_EMAIL in text and MAILBOX in text
    assert "PRIVATE KEY" not in text and account.pem.splitlines()[1] not in text


async def test_deliveries_waiting_for_a_token_request_that_failed_share_its_error(
    google: FakeGoogle, account: Account
) -> None:
    """Five deliveries need a token at once and Google refuses the request: one request, five
    TokenErrors. Before, each waiting delivery made its own request after the one before it
    failed (review, reproduced: five requests; with an endpoint that does not answer, five
    timeouts one after the other, every delivery of the connector waiting for all of them)."""
    google.refuse = (401, "unauthorized_client", "Client is unauthorized.")
    p = provider(account)
    results = await asyncio.gather(*(p() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, TokenError) for r in results)
    assert all("unauthorized_client" in str(r) for r in results)
    assert google.requests == 1
    google.refuse = None  # a later delivery asks again
    assert await p() == "ya29.token-0"
    assert google.requests == 2


async def test_the_token_endpoint_s_certificate_is_verified(
    google: FakeGoogle, account: Account
) -> None:
    p = provider(account)
    p.ca_file = None  # the system trust store does not know the test CA
    with pytest.raises(TokenError, match="certificate validation failed"):
        await p()
    assert google.issued == []


async def test_an_unusable_key_file_is_a_token_error_naming_the_file(
    account: Account, tmp_path: Path
) -> None:
    account.key_file.write_text('{"type": "service_account"}')
    with pytest.raises(TokenError) as info:
        await provider(account)()
    assert "oauth_service_account_file" in str(info.value)
    assert "client_email" in str(info.value) and "private_key" in str(info.value)


# --------------------------------------------------------------------------------------------------
# end to end: the queue manager, the fake Google, an SMTP sink requiring AUTH XOAUTH2


class XOAuth2Sink(Handler):
    """Records the raw XOAUTH2 strings; `accept` is the token the sink takes for MAILBOX."""

    def __init__(self, accept: str) -> None:
        super().__init__(oauth_tokens={MAILBOX: accept})
        self.blobs: list[bytes] = []

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) >= 2:
            self.blobs.append(base64.b64decode(args[1]))
        return await super().auth_XOAUTH2(server, args)


def gmail_connector(port: int, account: Account, *extra: str) -> str:
    lines = [
        "[[send_connectors]]",
        'name = "Outbound to Gmail"',
        'address_spaces = ["example.com"]',
        "dns_routing_enabled = false",
        f'smart_hosts = ["[127.0.0.1]:{port}"]',
        "require_tls = true",
        f'tls_ca_file = "{account.ca_file}"',
        'smart_host_auth_mechanism = "XOAUTH2"',
        'oauth_provider = "google"',
        f'oauth_service_account_file = "{account.key_file}"',
        f'auth_username = "{MAILBOX}"',
        *extra,
    ]
    return "\n" + "\n".join(lines) + "\n"


async def _sink(ca: trustme.CA, handler: Handler) -> Any:
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    return await start_sink(
        handler, tls_context=server_tls, auth_required=True, require_starttls=True
    )


DATA = b"From: scanner@corp.test\r\nSubject: scan\r\n\r\nscanned\r\n"


def _secrets_absent(texts: list[str], account: Account, google: FakeGoogle) -> None:
    key_line = account.pem.splitlines()[1]
    for text in texts:
        assert "PRIVATE KEY" not in text and key_line not in text
        for issued in google.issued:
            assert issued.assertion.split(".")[2] not in text


async def test_the_relay_delivers_through_gmail_with_one_token_for_several_messages(
    google: FakeGoogle,
    account: Account,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    sink = await _sink(ca, XOAuth2Sink(accept="ya29.token-0"))
    relay = await start_relay(tmp_path / "data", {}, extra=gmail_connector(sink.port, account))
    try:
        for rcpt in ("bob@example.com", "carol@example.com", "dave@example.com"):
            assert (await send(relay, "scanner@corp.test", [rcpt], DATA))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 3, timeout=15.0)
        assert all(m["tls"] and m["auth"] == MAILBOX for m in sink.handler.messages)
        assert len(google.issued) == 1  # one token request for three messages
        assert google.rejected == []
        handler = sink.handler
        assert isinstance(handler, XOAuth2Sink)
        assert handler.blobs[0] == f"user={MAILBOX}\x01auth=Bearer ya29.token-0\x01\x01".encode()

        async def all_delivered() -> bool:
            msgs = await relay.store.list_messages()
            return len(msgs) == 3 and all(
                m.recipients[0].status == RecipientStatus.DELIVERED for m in msgs
            )

        assert await wait_for(all_delivered, timeout=10.0)
    finally:
        await relay.stop()
        await sink.close()
    _secrets_absent([caplog.text], account, google)


async def test_a_535_drops_the_token_and_the_relay_delivers_with_a_new_one(
    google: FakeGoogle, account: Account, ca: trustme.CA, tmp_path: Path
) -> None:
    """The sink took the first token, then refuses it (revoked while cached): AUTH → 535,
    a new JWT, a new token, AUTH again on the same connection, delivered on the first attempt."""
    sink = await _sink(ca, XOAuth2Sink(accept="ya29.token-0"))
    relay = await start_relay(tmp_path / "data", {}, extra=gmail_connector(sink.port, account))
    try:
        assert relay.manager is not None and relay.manager.pool is not None
        relay.manager.pool.idle_seconds = 0  # a new connection, and AUTH, for each message
        assert (await send(relay, "scanner@corp.test", ["alice@example.com"], DATA))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 1, timeout=15.0)
        sink.handler.oauth_tokens[MAILBOX] = "ya29.token-1"
        assert (await send(relay, "scanner@corp.test", ["bob@example.com"], DATA))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 2, timeout=15.0)
        assert len(google.issued) == 2
        assert sink.handler.auth_seen == [("XOAUTH2", MAILBOX)] * 3
        assert sink.handler.connections == 2

        async def delivered() -> bool:
            msgs = await relay.store.list_messages()
            return len(msgs) == 2 and all(
                m.recipients[0].status == RecipientStatus.DELIVERED for m in msgs
            )

        assert await wait_for(delivered, timeout=10.0)
        msgs = await relay.store.list_messages()
        assert all(m.recipients[0].attempts == 1 for m in msgs)
    finally:
        await relay.stop()
        await sink.close()


async def test_a_535_to_a_token_never_accepted_is_not_retried_on_the_connection(
    google: FakeGoogle, account: Account, ca: trustme.CA, tmp_path: Path
) -> None:
    """A token just issued and refused (the mailbox may not use SMTP AUTH, the delegation lacks
    the scope) would be refused again: one AUTH per connection, not a new token and a second
    failed AUTH each time (failed logins count towards the account's lock-out)."""
    sink = await _sink(ca, XOAuth2Sink(accept="ya29.never"))
    relay = await start_relay(tmp_path / "data", {}, extra=gmail_connector(sink.port, account))
    try:
        assert (await send(relay, "scanner@corp.test", ["bob@example.com"], DATA))[0] == 250

        async def deferred() -> Any:
            msgs = await relay.store.list_messages()
            return len(msgs) == 1 and msgs[0].recipients[0].last_error

        assert await wait_for(deferred, timeout=15.0)
    finally:
        await relay.stop()
        await sink.close()
    assert sink.handler.messages == []
    assert sink.handler.connections >= 1
    assert len(sink.handler.auth_seen) <= sink.handler.connections
    assert len(google.issued) <= sink.handler.connections


@pytest.mark.parametrize(
    ("status", "error", "description"),
    [
        (400, "invalid_grant", "Invalid JWT Signature."),
        (
            401,
            "unauthorized_client",
            "Client is unauthorized to retrieve access tokens using this method, or client not "
            "authorized for any of the scopes requested.",
        ),
    ],
)
async def test_a_refused_token_request_defers_with_google_s_error_in_last_error(
    google: FakeGoogle,
    account: Account,
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    status: int,
    error: str,
    description: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    google.refuse = (status, error, description)
    sink = await _sink(ca, XOAuth2Sink(accept="ya29.token-0"))
    relay = await start_relay(tmp_path / "data", {}, extra=gmail_connector(sink.port, account))
    try:
        assert (await send(relay, "scanner@corp.test", ["bob@example.com"], DATA))[0] == 250

        async def deferred() -> Any:
            msgs = await relay.store.list_messages()
            if len(msgs) == 1 and msgs[0].recipients[0].last_error:
                return msgs[0].recipients[0]
            return None

        rcpt = await wait_for(deferred, timeout=15.0)
        assert rcpt.status == RecipientStatus.DEFERRED
        assert "451 4.7.0 SMTPSEND.Auth.TokenUnavailable" in rcpt.last_error
        assert error in rcpt.last_error and description[:40] in rcpt.last_error
        assert sink.handler.messages == [] and sink.handler.mail_froms == []
    finally:
        await relay.stop()
        await sink.close()
    log_files = [
        p.read_text(errors="replace") for p in (tmp_path / "data").rglob("*") if p.is_file()
    ]
    assert error in caplog.text
    _secrets_absent([caplog.text, rcpt.last_error, *log_files], account, google)


# --------------------------------------------------------------------------------------------------
# configuration


BASE = """
[server]
name = "R"
fqdn = "relay.test"
[[accepted_domains]]
domain = "corp.test"
[[send_connectors]]
name = "Gmail"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["smtp.gmail.com"]
port = 587
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
"""


def _errors(text: str) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_text(text, "<test>")
    return {p.path: p.message for p in info.value.problems}


def test_a_google_connector_loads_with_the_gmail_scope(tmp_path: Path) -> None:
    from relaygate.delivery.google_oauth import GOOGLE_SCOPE
    from relaygate.delivery.oauth import build_token_provider

    text = BASE + (
        f'oauth_provider = "google"\noauth_service_account_file = "{tmp_path / "sa.json"}"\n'
        f'auth_username = "{MAILBOX}"\n'
    )
    cfg = parse_text(text, "<test>")
    s = cfg.send_connectors[0]
    assert s.oauth_provider == "google"
    p = build_token_provider(s)
    assert type(p).__name__ == "GoogleTokenProvider"
    assert p.scope == GOOGLE_SCOPE == SCOPE  # type: ignore[attr-defined]
    entra = parse_text(
        BASE
        + 'auth_username = "a@corp.test"\noauth_tenant_id = "t"\noauth_client_id = "c"\n'
        + 'oauth_client_secret_env = "X"\n',
        "<test>",
    ).send_connectors[0]
    assert entra.oauth_provider == "entra"
    assert type(build_token_provider(entra)).__name__ == "OAuthTokenProvider"


def test_google_needs_the_key_file_and_a_mailbox_address() -> None:
    errors = _errors(BASE + 'oauth_provider = "google"\nauth_username = "scanner"\n')
    assert "send_connectors[0].oauth_service_account_file" in errors
    assert "not a mail address" in errors["send_connectors[0].auth_username"]
    errors = _errors(BASE + 'oauth_provider = "google"\noauth_service_account_file = "/x.json"\n')
    assert "is required" in errors["send_connectors[0].auth_username"]


def test_entra_keys_with_google_and_the_key_file_with_entra_are_errors() -> None:
    errors = _errors(
        BASE
        + 'oauth_provider = "google"\noauth_service_account_file = "/x.json"\n'
        + f'auth_username = "{MAILBOX}"\noauth_tenant_id = "t"\noauth_client_secret_env = "S"\n'
        + 'oauth_authority_host = "https://login.microsoftonline.us"\n'
    )
    for key in ("oauth_tenant_id", "oauth_client_secret_env", "oauth_authority_host"):
        assert "oauth_provider = 'entra'" in errors[f"send_connectors[0].{key}"]
    errors = _errors(
        BASE
        + 'auth_username = "a@corp.test"\noauth_tenant_id = "t"\noauth_client_id = "c"\n'
        + 'oauth_client_secret_env = "X"\noauth_service_account_file = "/x.json"\n'
    )
    assert "oauth_provider = 'google'" in errors["send_connectors[0].oauth_service_account_file"]


def test_an_unknown_provider_and_google_without_xoauth2_are_errors() -> None:
    errors = _errors(BASE + 'oauth_provider = "gmail"\n')
    assert "send_connectors[0].oauth_provider" in errors
    text = BASE.replace('"XOAUTH2"', '"BasicAuth"') + (
        'oauth_provider = "google"\nauth_username = "a@corp.test"\nauth_password_env = "P"\n'
    )
    assert "XOAUTH2" in _errors(text)["send_connectors[0].oauth_provider"]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "cannot read"),
        ("not json", "is not JSON"),
        ('{"type": "service_account", "client_email": "x@y"}', "lacks private_key"),
        ("bad-key", "private_key is not a PEM private key"),
        ("ec-key", "not an RSA key"),
        ("authorized_user", "not 'service_account'"),
        ("http-uri", "must be an https:// URL"),
    ],
)
def test_check_reads_the_key_file(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, content: str | None, expected: str
) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from relaygate.cli.check import service_account_problems

    key_file = tmp_path / "sa.json"
    uri = "https://oauth2.googleapis.com/token"
    if content == "bad-key":
        write_key_file(key_file, rsa_key, uri, private_key="-----BEGIN PRIVATE KEY-----\nAAAA\n")
    elif content == "ec-key":
        pem = (
            ec.generate_private_key(ec.SECP256R1())
            .private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            .decode()
        )
        write_key_file(key_file, rsa_key, uri, private_key=pem)
    elif content == "authorized_user":
        write_key_file(key_file, rsa_key, uri, type="authorized_user")
    elif content == "http-uri":
        write_key_file(key_file, rsa_key, "http://oauth2.googleapis.com/token")
    elif content is not None:
        key_file.write_text(content)
    cfg = parse_text(
        BASE
        + f'oauth_provider = "google"\noauth_service_account_file = "{key_file}"\n'
        + f'auth_username = "{MAILBOX}"\n',
        "<test>",
    )
    problems = service_account_problems(cfg)
    assert len(problems) == 1
    assert problems[0].path == "send_connectors[0].oauth_service_account_file"
    assert problems[0].connector == "Gmail"
    assert expected in problems[0].message
    assert "PRIVATE KEY" not in problems[0].message
    write_key_file(key_file, rsa_key, uri)
    assert service_account_problems(cfg) == []


def test_explain_and_the_connector_list_name_the_service_account(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from relaygate.cli import tables
    from relaygate.cli.send_connectors import _list_table

    monkeypatch.setattr(tables, "is_narrow", lambda: False)  # every column, as on a wide console
    from relaygate.policy.explain import _route_for

    key_file = tmp_path / "sa.json"
    write_key_file(key_file, rsa_key, "https://oauth2.googleapis.com/token")
    cfg = parse_text(
        BASE
        + f'oauth_provider = "google"\noauth_service_account_file = "{key_file}"\n'
        + f'auth_username = "{MAILBOX}"\n',
        "<test>",
    )
    label = f"XOAUTH2 (Google service account {CLIENT_EMAIL} as {MAILBOX})"
    assert _route_for(cfg, "bob@example.com")["auth"] == label
    table = _list_table(cfg, cfg.send_connectors)
    cells = [str(c) for col in table.columns for c in col._cells]
    assert label in cells


def test_a_reload_keeps_the_provider_and_its_token_unless_its_inputs_changed(
    tmp_path: Path,
) -> None:
    from relaygate.queue.manager import _build_token_providers

    def config(key_file: str) -> Any:
        return parse_text(
            BASE
            + f'oauth_provider = "google"\noauth_service_account_file = "{key_file}"\n'
            + f'auth_username = "{MAILBOX}"\n',
            "<test>",
        )

    first = _build_token_providers(config("/etc/relaygate/sa.json"), {})
    again = _build_token_providers(config("/etc/relaygate/sa.json"), first)
    assert again["Gmail"] is first["Gmail"]
    other = _build_token_providers(config("/etc/relaygate/sa-rotated.json"), first)
    assert other["Gmail"] is not first["Gmail"]


# --------------------------------------------------------------------------------------------------
# a token endpoint that answers too slowly or too much


class TricklingEndpoint:
    """HTTPS on 127.0.0.1 that answers 200 and then either trickles its body a byte at a time
    ("slow": never idle as long as a read timeout) or sends JSON without end ("huge"), for
    `duration` seconds at most. `sent` counts the body bytes written."""

    def __init__(self, cert: trustme.LeafCert, mode: str, duration: float = 12.0) -> None:
        self.sent = 0
        self.stop = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                end = time.monotonic() + duration
                try:
                    self.wfile.write(b'{"access_token": "ya29.slow", "padding": "')
                    while time.monotonic() < end and not owner.stop.is_set():
                        if mode == "slow":
                            self.wfile.write(b"x")
                            self.wfile.flush()
                            owner.sent += 1
                            time.sleep(0.2)
                        else:
                            self.wfile.write(b"x" * 65536)
                            owner.sent += 65536
                            time.sleep(0.02)
                    self.wfile.write(b'"}')
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.token_uri = f"https://127.0.0.1:{self.server.server_address[1]}/token"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("mode", ["slow", "huge"])
async def test_a_slow_or_endless_token_response_is_a_token_error_within_the_timeout(
    ca: trustme.CA, rsa_key: rsa.RSAPrivateKey, tmp_path: Path, mode: str
) -> None:
    """The timeout bounds the whole request (not each read), and the body is bounded: the
    provider's lock is held meanwhile, so every delivery through the connector would wait."""
    endpoint = TricklingEndpoint(ca.issue_cert("127.0.0.1"), mode)
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        key_file = tmp_path / "sa.json"
        write_key_file(key_file, rsa_key, endpoint.token_uri)
        p = provider(Account(key_file, ca_file, ""), timeout=1.5)
        started = time.monotonic()
        with pytest.raises(TokenError, match="token request to"):
            await asyncio.wait_for(p(), 6.0)
        assert time.monotonic() - started < 4.0
        assert endpoint.sent < 1024 * 1024
    finally:
        endpoint.close()
