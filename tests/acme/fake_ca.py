"""A fake ACME CA on loopback: just enough of RFC 8555 over HTTPS for RelayGate's client
(directory, nonces, account, an order whose authorizations are already valid, finalize, the
certificate), issuing from its own root and intermediate, and told what to return (`mode`):

* ``good``: a chain for the CSR's names and key, valid 90 days;
* ``other-names``: the leaf names other.acme.test only;
* ``other-key``: the leaf carries another public key than the CSR's;
* ``expired``: the leaf expired yesterday;
* ``due``: the leaf expires in 10 days (within the default acme_renew_before, 30 days);
* ``wrong-intermediate``: the chain's intermediate (same name, another key) did not sign the leaf;
* ``garbage``: not PEM at all;
* ``ahead``: a good chain from a CA whose clock is 2 minutes ahead of the relay's (notBefore
  its "now", not backdated).

pebble cannot be made to return a wrong chain, hence this. JWS signatures are not checked (the
client's JWS is pebble's to check, in test_acme.py); the CSR is parsed for its names and key.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.server
import itertools
import json
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.acme.helpers import make_api_certificate
from tests.smtp.helpers import free_port

MODES = (
    "good",
    "other-names",
    "other-key",
    "expired",
    "due",
    "wrong-intermediate",
    "garbage",
    "ahead",
)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _ca(cn: str, key: Any, issuer: x509.Name, signer: Any) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(signer, hashes.SHA256())
    )


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class FakeCA:
    """The fake CA on 127.0.0.1 (HTTPS, its API certificate from `make_api_certificate`);
    `directory_url`, `ca_file` and `http_port` as `helpers.Pebble` has them."""

    def __init__(self, folder: Path, mode: str = "good") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.mode = mode
        self.ca_file, cert, key = make_api_certificate(folder)
        self.port = free_port()
        self.http_port = free_port()  # acme_http_listen's port (no CA fetches from it)
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca("Fake ACME Root", self.root_key, _name("Fake ACME Root"), self.root_key)
        self.inter_key = ec.generate_private_key(ec.SECP256R1())
        self.inter = _ca("Fake ACME Intermediate", self.inter_key, self.root.subject, self.root_key)
        # another intermediate of the same name: its signature is not the leaf's
        self.impostor_key = ec.generate_private_key(ec.SECP256R1())
        self.impostor = _ca(
            "Fake ACME Intermediate", self.impostor_key, self.root.subject, self.root_key
        )
        self.orders: dict[int, dict[str, Any]] = {}
        self.chains: dict[int, bytes] = {}
        #: the modes in which a certificate was asked for (finalize), in order
        self.issued: list[str] = []
        #: an Event: a finalize waits (up to 20 s) until it is set (an order pending at the CA);
        #: `finalizing` is set when one waits
        self.hold: threading.Event | None = None
        self.finalizing = threading.Event()
        #: > 0: newOrder is refused 429 rateLimited with this Retry-After (seconds); `new_orders`
        #: counts the newOrder requests
        self.retry_after = 0
        self.new_orders = 0
        self._ids = itertools.count(1)
        self._nonces = itertools.count(1)
        self._lock = threading.Lock()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(cert), str(key))
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), self._handler())
        self._server.daemon_threads = True
        self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def directory_url(self) -> str:
        return f"{self.base}/dir"

    def root_pem(self) -> bytes:
        return self.root.public_bytes(serialization.Encoding.PEM)

    def start(self) -> FakeCA:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:  # (shutdown() waits for serve_forever to have run)
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    # ----------------------------------------------------------------- certificates

    def leaf(
        self,
        names: list[str],
        public_key: Any,
        *,
        start: dt.datetime,
        end: dt.datetime,
        signer: Any = None,
    ) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(self.inter.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
            )
            .sign(signer or self.inter_key, hashes.SHA256())
        )

    def pem_chain(
        self, leaf: x509.Certificate, intermediate: x509.Certificate | None = None
    ) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.PEM)
            for c in (leaf, intermediate or self.inter, self.root)
        )

    def issue(self, csr: x509.CertificateSigningRequest) -> bytes:
        """The chain `mode` says to return for `csr`."""
        mode = self.mode
        self.issued.append(mode)
        now = dt.datetime.now(dt.UTC)
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = list(san.get_values_for_type(x509.DNSName))
        key = csr.public_key()
        start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=90)
        if mode == "garbage":
            return b"<html><body>500 Internal Server Error</body></html>\n"
        if mode == "other-names":
            names = ["other.acme.test"]
        elif mode == "other-key":
            key = ec.generate_private_key(ec.SECP256R1()).public_key()
        elif mode == "expired":
            start, end = now - dt.timedelta(days=91), now - dt.timedelta(days=1)
        elif mode == "ahead":
            start = now + dt.timedelta(minutes=2)
        elif mode == "due":
            start, end = now - dt.timedelta(days=80), now + dt.timedelta(days=10)
        leaf = self.leaf(names, key, start=start, end=end)  # type: ignore[arg-type]
        if mode == "wrong-intermediate":
            return self.pem_chain(leaf, self.impostor)
        return self.pem_chain(leaf)

    # ----------------------------------------------------------------- HTTP

    def _handler(self) -> type[http.server.BaseHTTPRequestHandler]:
        ca = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(
                self,
                status: int,
                body: bytes | dict[str, Any] = b"",
                *,
                location: str = "",
                content_type: str = "application/json",
                retry_after: int = 0,
            ) -> None:
                data = json.dumps(body).encode() if isinstance(body, dict) else body
                self.send_response(status)
                self.send_header("Replay-Nonce", f"nonce-{next(ca._nonces)}")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                if location:
                    self.send_header("Location", location)
                if retry_after:
                    self.send_header("Retry-After", str(retry_after))
                self.end_headers()
                self.wfile.write(data)

            def do_HEAD(self) -> None:
                self._send(200)

            def do_GET(self) -> None:
                if self.path == "/dir":
                    self._send(
                        200,
                        {
                            "newNonce": f"{ca.base}/nonce",
                            "newAccount": f"{ca.base}/account",
                            "newOrder": f"{ca.base}/order",
                        },
                    )
                else:
                    self._send(404, {"type": "urn:ietf:params:acme:error:malformed"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                jws = json.loads(self.rfile.read(length))
                payload = json.loads(_b64decode(jws["payload"])) if jws["payload"] else None
                parts = self.path.strip("/").split("/")
                with ca._lock:
                    self._route(parts, payload)

            def _route(self, parts: list[str], payload: Any) -> None:
                if parts == ["account"]:
                    self._send(201, {"status": "valid"}, location=f"{ca.base}/acct/1")
                elif parts == ["order"] and ca.retry_after:
                    ca.new_orders += 1
                    problem = {
                        "type": "urn:ietf:params:acme:error:rateLimited",
                        "detail": "too many certificates already issued for relay.acme.test",
                    }
                    self._send(429, problem, retry_after=ca.retry_after)
                elif parts == ["order"]:
                    ca.new_orders += 1
                    n = next(ca._ids)
                    ca.orders[n] = {
                        "status": "ready",
                        "identifiers": payload["identifiers"],
                        "authorizations": [f"{ca.base}/authz/{n}"],
                        "finalize": f"{ca.base}/finalize/{n}",
                    }
                    self._send(201, ca.orders[n], location=f"{ca.base}/order/{n}")
                elif parts[0] == "authz":
                    order = ca.orders[int(parts[1])]
                    ident = order["identifiers"][0]
                    self._send(200, {"status": "valid", "identifier": ident, "challenges": []})
                elif parts[0] == "finalize":
                    n = int(parts[1])
                    hold = ca.hold
                    if hold is not None:
                        ca.finalizing.set()
                        hold.wait(20)
                    csr = x509.load_der_x509_csr(_b64decode(payload["csr"]))
                    ca.chains[n] = ca.issue(csr)
                    ca.orders[n].update(status="valid", certificate=f"{ca.base}/cert/{n}")
                    self._send(200, ca.orders[n])
                elif parts[0] == "order":
                    self._send(200, ca.orders[int(parts[1])])
                elif parts[0] == "cert":
                    self._send(
                        200,
                        ca.chains[int(parts[1])],
                        content_type="application/pem-certificate-chain",
                    )
                else:
                    self._send(404, {"type": "urn:ietf:params:acme:error:malformed"})

        return Handler
