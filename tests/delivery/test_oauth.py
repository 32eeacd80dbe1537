"""XOAUTH2 to Microsoft 365 with msal: a fake Entra ID token service over HTTPS on loopback (its
OpenID configuration and its v2.0 token endpoint, trusted through REQUESTS_CA_BUNDLE), the real msal
client-credentials flow, and an SMTP sink that accepts only that token.

The fake takes a client secret or a certificate credential: a client assertion JWT it verifies as
Entra ID does (the certificate named by x5t#S256 must be registered, the signature must verify
against it, aud must be its token endpoint, iss = sub = client_id, the assertion within its time
range and its jti not seen before), answering Entra ID's errors otherwise."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
import trustme

from relaygate.config.loader import ConfigError, parse_text
from relaygate.delivery import oauth
from relaygate.delivery.oauth import OAuthTokenProvider, TokenError
from relaygate.queue.model import RecipientStatus
from tests.delivery import helpers
from tests.delivery.helpers import Handler, start_sink
from tests.queue_manager.helpers import send, start_relay, wait_for


@pytest.fixture(autouse=True, params=[True, False], ids=["pipelined", "one-by-one"])
def pipelining(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Every test here runs against sinks that advertise PIPELINING and against sinks that do not:
    the client's two transaction paths must give the same outcomes."""
    monkeypatch.setattr(helpers, "PIPELINING", request.param)
    return bool(request.param)


TENANT = "11111111-2222-3333-4444-555555555555"
#: the tenant's domain name, which oauth_tenant_id may give instead of its id: Entra ID's discovery
#: for it answers the tenant's endpoints by id, as the real one does
TENANT_DOMAIN = "corp.onmicrosoft.test"
CLIENT_ID = "66666666-7777-8888-9999-000000000000"
SECRET = "s3cr3t~value.that-must-never-leak"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJSUzI1NiJ9.fake-access-token"
SCOPE = "https://outlook.office365.com/.default"


def _b64decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


def x5t_s256(certificate: Any) -> str:
    """base64url SHA-256 of a cryptography certificate's DER (the JWT header's x5t#S256)."""
    from cryptography.hazmat.primitives import hashes

    digest = certificate.fingerprint(hashes.SHA256())
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class FakeEntra:
    """/{tenant}/v2.0/.well-known/openid-configuration (also by TENANT_DOMAIN) and
    /{tenant}/oauth2/v2.0/token."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.token_requests: list[dict[str, list[str]]] = []
        #: the certificates uploaded to the app registration, by x5t#S256
        self.registered: dict[str, Any] = {}
        #: (header, claims) of every client assertion that passed
        self.assertions: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.seen_jti: set[str] = set()
        #: set: each token issued is a new one (TOKEN-1, TOKEN-2...), else always TOKEN
        self.fresh_tokens = False
        #: (status, body): the token endpoint's answer instead (an HTML page from a proxy...)
        self.answer: tuple[int, bytes] | None = None
        #: set: the token endpoint reads the request and answers nothing until close()
        self.hang = False
        self.released = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                base = f"https://127.0.0.1:{owner.port}/{TENANT}"
                if any(
                    self.path.startswith(f"/{t}/v2.0/.well-known/openid-configuration")
                    for t in (TENANT, TENANT_DOMAIN)
                ):
                    self._json(
                        200,
                        {
                            "issuer": f"{base}/v2.0",
                            "authorization_endpoint": f"{base}/oauth2/v2.0/authorize",
                            "token_endpoint": f"{base}/oauth2/v2.0/token",
                        },
                    )
                else:
                    self._json(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = parse_qs(self.rfile.read(length).decode())
                owner.token_requests.append(form)
                if owner.hang:
                    owner.released.wait()
                    return
                if owner.answer is not None:
                    code, body = owner.answer
                    self.send_response(code)
                    self.send_header("Content-Type", "text/html")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                if self.path != f"/{TENANT}/oauth2/v2.0/token":
                    self._json(404, {"error": "not_found"})
                elif "client_assertion" in form or "client_assertion_type" in form:
                    refusal = owner.verify_assertion(form)
                    if refusal is not None:
                        self._json(
                            401,
                            {
                                "error": "invalid_client",
                                "error_description": refusal + "\r\nTrace ID: 0000",
                            },
                        )
                    else:
                        self._json(
                            200,
                            {"token_type": "Bearer", "expires_in": 3599, "access_token": TOKEN},
                        )
                elif form.get("client_secret") != [SECRET]:
                    self._json(
                        401,
                        {
                            "error": "invalid_client",
                            "error_description": "AADSTS7000215: Invalid client secret provided."
                            "\r\nTrace ID: 0000\r\nCorrelation ID: 1111",
                        },
                    )
                else:
                    token = f"{TOKEN}-{len(owner.token_requests)}" if owner.fresh_tokens else TOKEN
                    self._json(
                        200, {"token_type": "Bearer", "expires_in": 3599, "access_token": token}
                    )

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def authority_host(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def token_endpoint(self) -> str:
        return f"https://127.0.0.1:{self.port}/{TENANT}/oauth2/v2.0/token"

    def register(self, certificate: Any) -> None:
        """Upload a certificate (cryptography's x509.Certificate) to the app registration."""
        self.registered[x5t_s256(certificate)] = certificate

    def verify_assertion(self, form: dict[str, list[str]]) -> str | None:
        """None when the client assertion is good, else Entra ID's refusal (AADSTS code)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding

        if form.get("client_assertion_type") != [CLIENT_ASSERTION_TYPE]:
            return "AADSTS50027: Invalid client_assertion_type."
        if "client_secret" in form:
            return "AADSTS700025: Client secret and client assertion both given."
        try:
            (assertion,) = form["client_assertion"]
            head, body, sig = assertion.split(".")
            header = json.loads(_b64decode(head))
            claims = json.loads(_b64decode(body))
            signature = _b64decode(sig)
        except (KeyError, ValueError):
            return "AADSTS50012: Client assertion is not a JWT."
        certificate = self.registered.get(str(header.get("x5t#S256")))
        if certificate is None:
            return (
                "AADSTS700027: The certificate with identifier used to sign the client "
                "assertion is not registered on application."
            )
        alg = header.get("alg")
        pad: Any = (
            padding.PKCS1v15()
            if alg == "RS256"
            else padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH)
            if alg == "PS256"
            else None
        )
        if pad is None:
            return f"AADSTS5002738: Invalid JWT token. '{alg}' is not a supported algorithm."
        try:
            certificate.public_key().verify(
                signature, f"{head}.{body}".encode(), pad, hashes.SHA256()
            )
        except InvalidSignature:
            return "AADSTS700027: Client assertion contains an invalid signature."
        if claims.get("aud") != self.token_endpoint:
            return f"AADSTS700212: No matching federated identity record for aud {claims.get('aud')!r}."
        client_id = form.get("client_id", [""])[0]
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            return (
                "AADSTS700021: Client assertion application identifier doesn't match 'client_id'."
            )
        now = time.time()
        exp, nbf = claims.get("exp"), claims.get("nbf", claims.get("iat"))
        if not isinstance(exp, int) or not isinstance(nbf, int) or not nbf - 300 <= now < exp:
            return "AADSTS700024: Client assertion is not within its valid time range."
        if exp - nbf > 600:
            return "AADSTS700024: Client assertion lifetime is longer than 10 minutes."
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or jti in self.seen_jti:
            return "AADSTS700023: Client assertion jti is missing or was used before."
        self.seen_jti.add(jti)
        self.assertions.append((header, claims))
        return None

    def close(self) -> None:
        self.released.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def entra(ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeEntra]:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(bundle))  # msal's requests session trusts it
    server = FakeEntra(ca.issue_cert("127.0.0.1"))
    try:
        yield server
    finally:
        server.close()


def provider(entra: FakeEntra, secret: str = SECRET) -> OAuthTokenProvider:
    return OAuthTokenProvider(
        connector_name="Outbound to Microsoft 365",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        secret_env="RG_TEST_OAUTH_SECRET",
        authority_host=entra.authority_host,
        environ={"RG_TEST_OAUTH_SECRET": secret},
    )


async def test_client_credentials_token_and_the_cache(entra: FakeEntra) -> None:
    p = provider(entra)
    assert await p() == TOKEN
    assert await p() == TOKEN  # msal's cache: no second request
    assert len(entra.token_requests) == 1
    form = entra.token_requests[0]
    assert form["grant_type"] == ["client_credentials"]
    assert form["client_id"] == [CLIENT_ID]
    assert form["scope"] == [SCOPE]


async def test_a_refused_secret_is_named_by_entra_s_error_never_by_the_secret(
    entra: FakeEntra,
) -> None:
    wrong = "wrong-secret-value"
    with pytest.raises(TokenError) as info:
        await provider(entra, secret=wrong)()
    text = str(info.value)
    assert "invalid_client" in text and "AADSTS7000215" in text
    assert "Outbound to Microsoft 365" in text
    assert wrong not in text and SECRET not in text
    assert "Trace ID" not in text  # the first line of the description only


async def test_deliveries_waiting_for_a_token_request_that_failed_share_its_error(
    entra: FakeEntra,
) -> None:
    """Five deliveries need a token at once and Entra ID refuses the secret: one request, five
    TokenErrors. Before, each waiting delivery made its own request after the one before it
    failed (review, reproduced: five requests; with an endpoint that does not answer, five
    timeouts one after the other, every delivery of the connector waiting for all of them)."""
    p = provider(entra, secret="wrong-secret-value")
    results = await asyncio.gather(*(p() for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, TokenError) for r in results)
    assert all("AADSTS7000215" in str(r) for r in results)
    assert len(entra.token_requests) == 1
    with pytest.raises(TokenError):  # a later delivery asks again
        await p()
    assert len(entra.token_requests) == 2


async def test_a_missing_secret_names_the_variable(entra: FakeEntra) -> None:
    p = OAuthTokenProvider(
        connector_name="M365",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        secret_env="RG_UNSET_SECRET_VAR",
        authority_host=entra.authority_host,
        environ={},
    )
    with pytest.raises(TokenError, match="RG_UNSET_SECRET_VAR"):
        await p()
    assert entra.token_requests == []


async def test_a_secret_file_is_read_without_its_newline(entra: FakeEntra, tmp_path: Path) -> None:
    secret_file = tmp_path / "m365.secret"
    secret_file.write_text(SECRET + "\n")
    p = OAuthTokenProvider(
        connector_name="M365",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        secret_file=secret_file,
        authority_host=entra.authority_host,
    )
    assert await p() == TOKEN


async def test_a_secret_file_saved_by_notepad_is_read_or_named(
    entra: FakeEntra, tmp_path: Path
) -> None:
    """A secret file with a UTF-8 BOM (Notepad's 'UTF-8 with BOM') sent the BOM as part of the
    secret (Entra refused it: invalid_client); one saved as UTF-16 was 'token request ...
    failed: UnicodeDecodeError', as if the network had failed (review, reproduced)."""
    secret_file = tmp_path / "m365.secret"

    def provider_of_file() -> OAuthTokenProvider:
        return OAuthTokenProvider(
            connector_name="M365",
            tenant_id=TENANT,
            client_id=CLIENT_ID,
            secret_file=secret_file,
            authority_host=entra.authority_host,
        )

    secret_file.write_bytes(b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n")
    assert await provider_of_file()() == TOKEN
    secret_file.write_bytes((SECRET + "\r\n").encode("utf-16"))
    with pytest.raises(TokenError) as info:
        await provider_of_file()()
    text = str(info.value)
    assert "oauth_client_secret_file" in text and str(secret_file) in text
    assert "not UTF-8" in text and "token request" not in text
    assert len(entra.token_requests) == 1


def test_a_reload_takes_up_a_secret_rotated_in_its_file(tmp_path: Path) -> None:
    """The secret renewed in oauth_client_secret_file, then a reload (as for a certificate): a
    new provider, whose next token request sends the new secret. Before, the reload kept the
    provider (its path had not changed) and msal's application the old secret: once the old
    one was deleted from the app, the next token request was refused and that attempt's mail
    deferred (review, reproduced: the same provider after the reload)."""
    from relaygate.queue.manager import _build_token_providers

    secret_file = tmp_path / "m365.secret"
    secret_file.write_text("old-secret\n")
    config = parse_text(
        f"""
[server]
name = "R"
fqdn = "relay.test"
[[accepted_domains]]
domain = "corp.test"
[[send_connectors]]
name = "M365"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["smtp.office365.com"]
port = 587
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
oauth_client_secret_file = "{secret_file}"
""",
        "<test>",
    )
    first = _build_token_providers(config, {})
    assert _build_token_providers(config, first)["M365"] is first["M365"]  # nothing changed
    secret_file.write_text(SECRET + "\n")
    assert _build_token_providers(config, first)["M365"] is not first["M365"]


async def test_a_secret_replaced_after_entra_refused_it_is_used_without_a_restart(
    entra: FakeEntra, tmp_path: Path
) -> None:
    """Before, the msal application kept the refused secret: every later request sent it again
    until the process restarted (review, reproduced)."""
    secret_file = tmp_path / "m365.secret"
    secret_file.write_text("old-expired-secret\n")
    p = OAuthTokenProvider(
        connector_name="M365",
        tenant_id=TENANT,
        client_id=CLIENT_ID,
        secret_file=secret_file,
        authority_host=entra.authority_host,
    )
    with pytest.raises(TokenError, match="invalid_client"):
        await p()
    secret_file.write_text(SECRET + "\n")  # the administrator puts the new secret in place
    assert await p() == TOKEN
    assert [r.get("client_secret") for r in entra.token_requests] == [
        ["old-expired-secret"],
        [SECRET],
    ]


async def test_a_late_refusal_of_the_old_token_keeps_the_new_one(entra: FakeEntra) -> None:
    """Several deliveries refused the same revoked token at once (535, Graph's 401): the first
    drops it and gets a new one, the others' refusals (of the old token) keep the new one.
    Before, each refusal dropped msal's application and its cache: one token request per
    refused delivery (review, reproduced: three requests)."""
    entra.fresh_tokens = True
    p = provider(entra)
    old = await p()
    await p.invalidate(old)  # the first delivery's 535
    new = await p()
    await p.invalidate(old)  # a second delivery's 535, to the same old token
    assert await p() == new == f"{TOKEN}-2"
    assert len(entra.token_requests) == 2


async def test_a_token_endpoint_that_never_answers_is_a_token_error_within_the_timeout(
    entra: FakeEntra, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msal's requests had no timeout: a token endpoint (or a proxy) that took the request and
    never answered held the provider's lock for ever, and with it every delivery of the
    connector, with nothing in LastError (review, reproduced: no answer after 10 s)."""
    monkeypatch.setattr(oauth, "TOKEN_REQUEST_TIMEOUT", 1.0, raising=False)
    entra.hang = True
    p = provider(entra)
    started = time.monotonic()
    try:
        with pytest.raises(TokenError) as info:
            await asyncio.wait_for(p(), 10.0)
    finally:
        entra.released.set()  # else the loop's end waits for msal's thread
    assert time.monotonic() - started < 5.0
    text = str(info.value)
    assert "Outbound to Microsoft 365" in text and entra.authority_host in text
    assert "no answer within 1 s" in text
    assert len(entra.token_requests) == 1


@pytest.mark.parametrize(
    ("status", "said"),
    [(502, "HTTP 502"), (200, "the answer is not JSON"), (403, "the answer is not JSON")],
)
async def test_an_answer_that_is_not_entra_s_is_named_by_its_status(
    entra: FakeEntra, status: int, said: str
) -> None:
    """A proxy's or gateway's HTML page instead of Entra ID's JSON: the admin read 'failed:
    MsalServiceError' or 'failed: JSONDecodeError' (review, reproduced)."""
    entra.answer = (status, b"<html><body><h1>Bad gateway</h1></body></html>")
    with pytest.raises(TokenError) as info:
        await provider(entra)()
    assert said in str(info.value) and "Outbound to Microsoft 365" in str(info.value)


async def test_an_answer_that_is_not_json_is_not_logged_whole_by_msal(
    entra: FakeEntra, caplog: pytest.LogCaptureFixture
) -> None:
    """msal logged the whole page (a proxy's HTML, kilobytes) with a traceback at ERROR in the
    service log, on top of the TokenError's line ("the answer is not JSON"): the records the
    service log's root handler gets hold no msal line of the page (caplog's handler sits on the
    root logger, as the service log's does)."""
    page = "<html><body><h1>Proxy Authentication Required</h1>" + "x" * 4000 + "</body></html>"
    entra.answer = (200, page.encode())
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TokenError) as info:
        await provider(entra)()
    assert "the answer is not JSON" in str(info.value)
    loud = [r for r in caplog.records if r.name.startswith("msal") and r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage()[:200] for r in loud]
    assert "Proxy Authentication Required" not in caplog.text
    # Another msal error record still gets through (only this redundant one is dropped).
    with caplog.at_level(logging.ERROR):
        logging.getLogger("msal.oauth2cli.oauth2").error("some other msal error")
    assert "some other msal error" in caplog.text


async def test_a_token_endpoint_whose_certificate_fails_validation_says_so(
    entra: FakeEntra, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The endpoint's certificate is not trusted (a TLS-inspecting proxy, a private CA):
    the admin read 'failed: SSLError' (review, reproduced)."""
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other))
    with pytest.raises(TokenError) as info:
        await provider(entra)()
    text = str(info.value)
    assert "certificate validation failed" in text and entra.authority_host in text
    assert entra.token_requests == []


def test_the_authority_must_be_https() -> None:
    text = f"""
[server]
name = "R"
fqdn = "relay.test"
[[accepted_domains]]
domain = "corp.test"
[[send_connectors]]
name = "M365"
address_spaces = ["*"]
smart_hosts = ["smtp.office365.com"]
port = 587
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
oauth_client_secret_env = "M365_SECRET"
oauth_authority_host = "http://login.example"
"""
    with pytest.raises(ConfigError) as info:
        parse_text(text, "<test>")
    assert "oauth_authority_host" in str(info.value) and "https://" in str(info.value)


async def test_the_queue_manager_delivers_with_an_msal_token(
    entra: FakeEntra, ca: trustme.CA, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: a relay whose send connector authenticates with XOAUTH2 to a smart host that
    requires AUTH over STARTTLS; two messages, one token request."""
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_tls)
    sink = await start_sink(
        Handler(oauth_tokens={"relay@corp.test": TOKEN}),
        tls_context=server_tls,
        auth_required=True,
        require_starttls=True,
    )
    monkeypatch.setenv("RG_TEST_M365_SECRET", SECRET)
    extra = f"""
[[send_connectors]]
name = "Outbound to Microsoft 365"
address_spaces = ["example.com"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:{sink.port}"]
require_tls = true
smart_host_auth_mechanism = "XOAUTH2"
auth_username = "relay@corp.test"
oauth_tenant_id = "{TENANT}"
oauth_client_id = "{CLIENT_ID}"
oauth_client_secret_env = "RG_TEST_M365_SECRET"
oauth_authority_host = "{entra.authority_host}"
"""
    relay = await start_relay(tmp_path / "data", {}, extra=extra)
    try:
        data = b"From: scanner@corp.test\r\nSubject: scan\r\n\r\nscanned\r\n"
        for rcpt in ("bob@example.com", "carol@example.com"):
            assert (await send(relay, "scanner@corp.test", [rcpt], data))[0] == 250
        await wait_for(lambda: len(sink.handler.messages) == 2, timeout=15.0)
        assert all(m["tls"] and m["auth"] == "relay@corp.test" for m in sink.handler.messages)
        assert len(entra.token_requests) == 1

        async def all_delivered() -> bool:  # the sink's 250 comes before the result is stored
            msgs = await relay.store.list_messages()
            return len(msgs) == 2 and all(
                m.recipients[0].status == RecipientStatus.DELIVERED for m in msgs
            )

        assert await wait_for(all_delivered, timeout=10.0)
    finally:
        await relay.stop()
        await sink.close()
