"""ACME (RFC 8555) for the listener certificate: the HTTP-01 challenge, renewal in the background.

With ``server.acme_directory_url`` set, one process of the node (the only one, or the supervisor of
``server.workers > 1``) runs an :class:`AcmeManager` thread (never a worker). It keeps ``<data_dir>/acme/``:

* ``account.key``: the ACME account's key (EC P-256), created on the first order;
* ``certificate.key`` and ``certificate.pem``: the listener certificate's key and chain (leaf
  first), replaced together under ``.lock`` (a reader takes the lock shared: never one file's new
  version beside the other's old one).

Every file is written atomically (temporary file, fsync, rename, fsync of the directory), mode 0600.

An order answers the HTTP-01 challenge with a small HTTP server on ``server.acme_http_listen``
that runs only while the order is pending: it answers ``GET /.well-known/acme-challenge/<token>``
for the order's tokens and 404 to anything else. The certificate is renewed when it expires within
``acme_renew_before``; the expiry is looked at every ``acme_check_interval`` (also the least time
between two orders). A failure (CA unreachable, challenge refused) is logged with the CA's problem
document and retried after min(1 minute, acme_check_interval), doubling up to 6 hours; the
listeners keep the certificate they have (or, before the first one, STARTTLS is not offered).

Several nodes on one PostgreSQL queue (``queue.store = "postgresql"``) run one ACME client for
the cluster (:class:`ClusterShare`): the node holding an advisory lock on the names orders, and
publishes the certificate (chain and key) and the pending challenge tokens in the queue database;
every node copies the certificate into its own files and runs the challenge responder all the
time, answering tokens from the database (the CA may reach any node behind the load balancer).

The listeners take the files as their certificate (smtp/tls.py ``listener_files``): every process
of the node watches ``certificate.pem`` (``Relay.watch_config``, every 2 s) and swaps its TLS
contexts when it changes, as a reload does for a renewed file: sessions stay open, new ones get
the new certificate. The ACME client itself is httpx + cryptography: JWS ES256, no other
dependency.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.server
import json
import logging
import os
import re
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "ACME_DIR",
    "AcmeClient",
    "AcmeError",
    "AcmeManager",
    "ChallengeResponder",
    "acme_domains",
    "acme_enabled",
    "acme_files",
    "files_lock",
]

logger = logging.getLogger("relaygate.acme")

ACME_DIR = "acme"
CERTIFICATE_FILE = "certificate.pem"
KEY_FILE = "certificate.key"
ACCOUNT_KEY_FILE = "account.key"
LOCK_FILE = ".lock"

#: One HTTP request to the CA; one order from newOrder to the certificate.
REQUEST_TIMEOUT = 15.0
ORDER_TIMEOUT = 120.0
#: Failure back-off: the first retry after min(this, acme_check_interval), doubling up to MAX.
RETRY_FIRST = 60.0
RETRY_MAX = 6 * 3600.0
CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
#: The responder (port 80, all the time on a cluster's nodes): a request must arrive within
#: RESPONDER_TIMEOUT (slowloris); past MAX_RESPONDER_CONNECTIONS at once a new connection is
#: closed unanswered; at most MAX_LOOKUPS tokens are looked up in the queue database at once
#: (one connection each: PostgreSQL's max_connections is the mail queue's too).
RESPONDER_TIMEOUT = 10.0
MAX_RESPONDER_CONNECTIONS = 64
MAX_LOOKUPS = 4
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # RFC 8555 §8.3: base64url, >= 128 bits


def acme_enabled(server: Any) -> bool:
    return bool(getattr(server, "acme_directory_url", ""))


def acme_domains(server: Any) -> tuple[str, ...]:
    """The certificate's names: ``acme_domains``, or the server's fqdn; as the CA and the
    certificate write them (lower case, no final dot), each once."""
    names = tuple(server.acme_domains) or (str(server.fqdn),)
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names))


def acme_files(data_dir: Path) -> tuple[Path, Path]:
    """(certificate chain, key) of the ACME certificate under ``data_dir``."""
    folder = Path(data_dir) / ACME_DIR
    return folder / CERTIFICATE_FILE, folder / KEY_FILE


@contextlib.contextmanager
def files_lock(data_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """The lock that keeps certificate.pem and certificate.key a pair: the writer holds it
    exclusive while it replaces both, a reader shared while it loads them."""
    folder = Path(data_dir) / ACME_DIR
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # nothing obtained yet: nothing to keep in step
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes) -> None:
    """`data` into `path`, mode 0600, atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class AcmeError(Exception):
    """An order failed; the message carries the CA's problem document (RFC 8555 §6.7) when it
    sent one, else what went wrong on the way (connection, timeout)."""


def _problem(response: httpx.Response) -> str:
    try:
        doc = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    if not isinstance(doc, dict):
        return f"HTTP {response.status_code}"
    parts = [f"{doc.get('type', 'error')}: {doc.get('detail', '')}".strip()]
    for sub in doc.get("subproblems") or ():
        if isinstance(sub, dict):
            who = (sub.get("identifier") or {}).get("value", "")
            parts.append(f"{who}: {sub.get('type', '')}: {sub.get('detail', '')}")
    return f"HTTP {response.status_code} " + "; ".join(parts)


# ----------------------------------------------------------------------------- keys and JWS


def _load_or_create_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private(path, _key_pem(key))
    return key


def _key_pem(key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def _jwk(key: Any) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64(numbers.x.to_bytes(32, "big")),
        "y": _b64(numbers.y.to_bytes(32, "big")),
    }


def _thumbprint(jwk: dict[str, str]) -> str:
    """RFC 7638: SHA-256 of the required members, sorted, without white space."""
    canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":")).encode()
    return _b64(hashlib.sha256(canonical).digest())


def _sign_es256(key: Any, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


# ----------------------------------------------------------------------------- the responder


class ChallengeResponder:
    """The HTTP-01 responder: ``GET /.well-known/acme-challenge/<token>`` → the key
    authorization of a pending challenge, 404 for anything else. Runs in its own thread."""

    def __init__(
        self, host: str, port: int, *, lookup: Callable[[str], str | None] | None = None
    ) -> None:
        self.host, self.port = host, port
        self.tokens: dict[str, str] = {}
        #: Where a token not in `tokens` is looked up (a cluster: the queue database, where the
        #: node that runs the order put it).
        self.lookup = lookup
        #: Called for each token added (a cluster: puts it in the queue database).
        self.publish: Callable[[str, str], None] | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lookups = threading.BoundedSemaphore(MAX_LOOKUPS)

    @property
    def running(self) -> bool:
        return self._server is not None

    def add(self, token: str, key_authorization: str) -> None:
        self.tokens[token] = key_authorization
        if self.publish is not None:
            self.publish(token, key_authorization)

    def answer(self, token: str) -> str | None:
        found = self.tokens.get(token)
        if found is None and self.lookup is not None and _TOKEN.match(token):
            if not self._lookups.acquire(timeout=RESPONDER_TIMEOUT):
                return None  # a flood of unknown tokens: as if unknown
            try:
                found = self.lookup(token)
            except Exception as exc:  # the database is away: as if unknown
                logger.warning("ACME challenge responder: token lookup failed: %s", exc)
            finally:
                self._lookups.release()
        return found

    def start(self) -> None:
        answer_for = self.answer

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "RelayGate-ACME"
            sys_version = ""
            timeout = RESPONDER_TIMEOUT  # each read (socket timeout; StreamRequestHandler)

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                answer = None
                if path.startswith(CHALLENGE_PREFIX):
                    answer = answer_for(path[len(CHALLENGE_PREFIX) :])
                if answer is None:
                    self.send_error(404)
                    return
                body = answer.encode("ascii")
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                from relaygate.logs.protocol import escape_controls

                # the request line is the client's: no escape sequence or CR into the log
                logger.info(
                    "ACME challenge responder: %s %s",
                    self.client_address[0],
                    escape_controls(format % args),
                )

        family = __import__("socket").AF_INET6 if ":" in self.host else None

        slots = threading.BoundedSemaphore(MAX_RESPONDER_CONNECTIONS)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True
            if family is not None:
                address_family = family

            def process_request(self, request: Any, client_address: Any) -> None:
                if not slots.acquire(blocking=False):  # too many at once: no thread for it
                    self.shutdown_request(request)
                    return
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()
                    raise

            def process_request_thread(self, request: Any, client_address: Any) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        self._server = Server((self.host, self.port), Handler)
        self._server.timeout = 5
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


# ----------------------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate obtained: its chain (PEM, leaf first) and key (PEM), the leaf's serial and
    notAfter."""

    chain_pem: bytes
    key_pem: bytes
    serial: int
    not_after: datetime


class AcmeClient:
    """One ACME account at one CA (blocking; run in the manager's thread)."""

    def __init__(
        self,
        directory_url: str,
        account_key: Any,
        *,
        email: str = "",
        ca_file: Path | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        #: set when the relay stops: a pending order gives up at its next poll
        self.stop = stop or threading.Event()
        self.directory_url = directory_url
        self.key = account_key
        self.jwk = _jwk(account_key)
        self.email = email
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            verify = ssl.create_default_context(cafile=str(ca_file))
        self.http = httpx.Client(
            verify=verify,
            timeout=REQUEST_TIMEOUT,
            headers={"User-Agent": "RelayGate-ACME"},
            follow_redirects=False,
        )
        self.directory: dict[str, Any] = {}
        self.kid = ""
        self._nonce = ""

    def close(self) -> None:
        self.http.close()

    def _request(self, method: str, url: str, **kw: Any) -> httpx.Response:
        try:
            response = self.http.request(method, url, **kw)
        except httpx.HTTPError as exc:
            raise AcmeError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
        nonce = response.headers.get("Replay-Nonce")
        if nonce:
            self._nonce = nonce
        return response

    def _new_nonce(self) -> str:
        if self._nonce:
            nonce, self._nonce = self._nonce, ""
            return nonce
        response = self._request("HEAD", self.directory["newNonce"])
        nonce, self._nonce = self._nonce, ""
        if not nonce:
            raise AcmeError(f"newNonce: no Replay-Nonce (HTTP {response.status_code})")
        return nonce

    def post(self, url: str, payload: Any, *, jwk: bool = False) -> httpx.Response:
        """A JWS-signed POST (payload None: POST-as-GET), retried on badNonce (RFC 8555 §6.5)."""
        for _attempt in range(5):
            protected: dict[str, Any] = {"alg": "ES256", "nonce": self._new_nonce(), "url": url}
            if jwk:
                protected["jwk"] = self.jwk
            else:
                protected["kid"] = self.kid
            body64 = "" if payload is None else _b64(json.dumps(payload).encode())
            head64 = _b64(json.dumps(protected).encode())
            signature = _sign_es256(self.key, f"{head64}.{body64}".encode("ascii"))
            response = self._request(
                "POST",
                url,
                content=json.dumps(
                    {"protected": head64, "payload": body64, "signature": _b64(signature)}
                ),
                headers={"Content-Type": "application/jose+json"},
            )
            if response.status_code == 400 and "badNonce" in response.text:
                continue
            if response.status_code >= 400:
                raise AcmeError(f"{url}: {_problem(response)}")
            return response
        raise AcmeError(f"{url}: the CA refused five nonces in a row (badNonce)")

    def register(self) -> None:
        response = self._request("GET", self.directory_url)
        if response.status_code != 200:
            raise AcmeError(f"directory {self.directory_url}: {_problem(response)}")
        try:
            self.directory = response.json()
            self.directory["newNonce"], self.directory["newAccount"], self.directory["newOrder"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AcmeError(f"directory {self.directory_url}: not an ACME directory") from exc
        payload: dict[str, Any] = {"termsOfServiceAgreed": True}
        if self.email:
            payload["contact"] = [f"mailto:{self.email}"]
        response = self.post(self.directory["newAccount"], payload, jwk=True)
        self.kid = response.headers.get("Location", "")
        if not self.kid:
            raise AcmeError("newAccount: the CA gave no account URL")

    def _poll(self, url: str, done: Callable[[dict[str, Any]], bool], deadline: float) -> Any:
        while True:
            response = self.post(url, None)
            doc = response.json()
            if done(doc):
                return doc
            if time.monotonic() >= deadline:
                raise AcmeError(f"{url}: still {doc.get('status')!r} after {ORDER_TIMEOUT:.0f} s")
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            if self.stop.wait(min(max(wait, 0.2), 5.0, max(0.0, deadline - time.monotonic()))):
                raise AcmeError("the relay is stopping: order abandoned")

    def order(self, domains: tuple[str, ...], responder: ChallengeResponder) -> Issued:
        """newOrder → HTTP-01 for each authorization → finalize with a new key → the chain."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        deadline = time.monotonic() + ORDER_TIMEOUT
        identifiers = [{"type": "dns", "value": d} for d in domains]
        response = self.post(self.directory["newOrder"], {"identifiers": identifiers})
        order_url = response.headers.get("Location", "")
        order = response.json()
        thumbprint = _thumbprint(self.jwk)
        for authz_url in order.get("authorizations", ()):
            authz = self.post(authz_url, None).json()
            name = (authz.get("identifier") or {}).get("value", "?")
            if authz.get("status") == "valid":
                continue
            challenge = next(
                (c for c in authz.get("challenges", ()) if c.get("type") == "http-01"), None
            )
            if challenge is None:
                raise AcmeError(f"{name}: the CA offers no http-01 challenge")
            token = str(challenge["token"])
            responder.add(token, f"{token}.{thumbprint}")
            self.post(challenge["url"], {})
            authz = self._poll(
                authz_url, lambda a: a.get("status") not in ("pending", "processing"), deadline
            )
            if authz.get("status") != "valid":
                errors = [
                    c.get("error") for c in authz.get("challenges", ()) if c.get("error")
                ] or [authz.get("error")]
                detail = "; ".join(
                    f"{e.get('type', '')}: {e.get('detail', '')}"
                    for e in errors
                    if isinstance(e, dict)
                )
                raise AcmeError(
                    f"{name}: authorization {authz.get('status')}: {detail or 'no detail'}"
                )
        key = ec.generate_private_key(ec.SECP256R1())
        # The CN: the first name that fits one (ub-common-name 64), else none (the SANs are
        # what counts; a truncated name would be one more identifier the CA refuses).
        cn = next((d for d in domains if len(d) <= 64), None)
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn is not None else []
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name(subject))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(d) for d in domains]), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        der = csr.public_bytes(serialization.Encoding.DER)
        order = self.post(order["finalize"], {"csr": _b64(der)}).json()
        if order.get("status") != "valid":
            if not order_url:
                raise AcmeError("newOrder: the CA gave no order URL")
            order = self._poll(
                order_url, lambda o: o.get("status") not in ("pending", "processing", "ready"),
                deadline,
            )  # fmt: skip
        if order.get("status") != "valid" or not order.get("certificate"):
            raise AcmeError(
                f"order {order.get('status')}: {order.get('error') or 'no certificate'}"
            )
        response = self.post(order["certificate"], None)
        chain = response.content
        try:
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except (ValueError, IndexError) as exc:
            raise AcmeError(f"the CA's certificate cannot be read: {exc}") from exc
        return Issued(chain, _key_pem(key), leaf.serial_number, leaf.not_valid_after_utc)


# ----------------------------------------------------------------------------- a cluster


class ClusterShare:
    """Several nodes on one PostgreSQL queue (``queue.store = "postgresql"``) share one
    certificate for the same names: the node that holds an advisory lock on the names (on a
    connection of its own, for as long as it lives) runs the ACME client and publishes the
    certificate and the pending challenge tokens in two tables; the others copy the certificate
    to their own files and answer the challenges from the table (the CA may reach any node
    behind the load balancer). When that node dies its lock goes, and the next node to try
    takes over."""

    CERTIFICATES = "relaygate_acme_certificates"
    CHALLENGES = "relaygate_acme_challenges"

    def __init__(self, database_url: str, names: tuple[str, ...]) -> None:
        self.url = database_url
        self.names = ",".join(sorted(n.lower() for n in names))
        digest = hashlib.blake2b(f"relaygate-acme:{self.names}".encode(), digest_size=8)
        self.lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        self._leader: Any = None  # the connection holding the lock
        self._ready = False

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            self.url, autocommit=True, connect_timeout=5, application_name="relaygate-acme"
        )

    def _setup(self, conn: Any) -> None:
        if self._ready:
            return
        for _attempt in range(3):  # two nodes creating the tables at once: one wins, retry
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.CERTIFICATES} (names text PRIMARY KEY, "
                    "chain bytea NOT NULL, key bytea NOT NULL, updated timestamptz NOT NULL "
                    "DEFAULT now())"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self.CHALLENGES} (token text PRIMARY KEY, "
                    "key_authorization text NOT NULL, created timestamptz NOT NULL DEFAULT now())"
                )
                self._ready = True
                return
            except Exception:
                time.sleep(0.2)
        raise AcmeError(f"cannot create {self.CERTIFICATES} in the queue database")

    def lead(self) -> bool:
        """This process runs the ACME client for the names (it holds, or now takes, the lock)."""
        if self._leader is not None:
            try:
                self._leader.execute("SELECT 1")
                return True
            except Exception:  # the connection (and with it the lock) is gone
                self._close_leader()
        conn = self._connect()
        try:
            self._setup(conn)
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (self.lock_key,)).fetchone()
        except Exception:
            conn.close()
            raise
        if row is not None and row[0]:
            self._leader = conn
            return True
        conn.close()
        return False

    def fetch(self) -> tuple[bytes, bytes] | None:
        """(chain, key) published for the names, if any."""
        with self._connect() as conn:
            self._setup(conn)
            row = conn.execute(
                f"SELECT chain, key FROM {self.CERTIFICATES} WHERE names = %s", (self.names,)
            ).fetchone()
        return None if row is None else (bytes(row[0]), bytes(row[1]))

    def publish(self, chain: bytes, key: bytes) -> None:
        with self._connect() as conn:
            self._setup(conn)
            conn.execute(
                f"INSERT INTO {self.CERTIFICATES} (names, chain, key) VALUES (%s, %s, %s) "
                "ON CONFLICT (names) DO UPDATE SET chain = EXCLUDED.chain, key = EXCLUDED.key, "
                "updated = now()",
                (self.names, chain, key),
            )

    def put_token(self, token: str, key_authorization: str) -> None:
        with self._connect() as conn:
            self._setup(conn)
            conn.execute(f"DELETE FROM {self.CHALLENGES} WHERE created < now() - interval '1 day'")
            conn.execute(
                f"INSERT INTO {self.CHALLENGES} (token, key_authorization) VALUES (%s, %s) "
                "ON CONFLICT (token) DO NOTHING",
                (token, key_authorization),
            )

    def lookup(self, token: str) -> str | None:
        with self._connect() as conn:  # (no table yet: an error, the responder's 404)
            row = conn.execute(
                f"SELECT key_authorization FROM {self.CHALLENGES} WHERE token = %s", (token,)
            ).fetchone()
        return None if row is None else str(row[0])

    def drop_tokens(self, tokens: list[str]) -> None:
        if tokens:
            with self._connect() as conn:
                conn.execute(f"DELETE FROM {self.CHALLENGES} WHERE token = ANY(%s)", (tokens,))

    def _close_leader(self) -> None:
        if self._leader is not None:
            with contextlib.suppress(Exception):
                self._leader.close()
        self._leader = None

    def close(self) -> None:
        self._close_leader()


# ----------------------------------------------------------------------------- the manager


class AcmeManager:
    """Keeps the ACME certificate of ``config.server`` fresh, in a thread of its own.

    ``on_renewed()`` is called (from that thread) after new files are in place."""

    def __init__(self, config: Any, *, on_renewed: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failures = 0
        #: queue.store = "postgresql": one ACME client for the cluster (ClusterShare), and a
        #: challenge responder that runs all the time on every node
        self.cluster: ClusterShare | None = None
        self.responder: ChallengeResponder | None = None
        self._leading: bool | None = None
        self._responder_failed = False
        if getattr(config.queue, "store", "sqlite") == "postgresql" and config.queue.database_url:
            self.cluster = ClusterShare(config.queue.database_url, acme_domains(config.server))

    @property
    def folder(self) -> Path:
        return Path(self.config.server.data_dir) / ACME_DIR

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        self._thread = threading.Thread(target=self._run, name="relaygate-acme", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # a pending order stops at its next poll; an HTTP request takes at most this long
            self._thread.join(REQUEST_TIMEOUT + 10)
        if self.responder is not None:
            self.responder.stop()
        if self.cluster is not None:
            self.cluster.close()

    def _cluster_step(self) -> bool:
        """A cluster node: the responder up, the published certificate in this node's files.
        True: this node runs the ACME client now."""
        assert self.cluster is not None
        s = self.config.server
        if self.responder is None or not self.responder.running:
            from relaygate.config.values import parse_binding

            listen = parse_binding(s.acme_http_listen)
            responder = ChallengeResponder(listen.address, listen.port, lookup=self.cluster.lookup)
            responder.publish = self.cluster.put_token
            try:
                responder.start()
            except OSError as exc:
                # Logged, and tried again at the next step; the certificate the cluster
                # publishes is still taken below (a node that orders itself fails its order).
                if not self._responder_failed:
                    logger.error(
                        "ACME: the HTTP-01 responder cannot listen on %s "
                        "(server.acme_http_listen): %s; the CA's requests must reach another "
                        "node",
                        s.acme_http_listen,
                        exc.strerror or exc,
                    )
                self._responder_failed = True
            else:
                self.responder = responder
                self._responder_failed = False
        leading = self.cluster.lead()
        if leading != self._leading:
            logger.info(
                "ACME: %s",
                "this node runs the cluster's ACME client for "
                f"{self.cluster.names} (lock in the queue database)"
                if leading
                else f"another node runs the cluster's ACME client for {self.cluster.names}; "
                "this node takes the certificate from the queue database",
            )
            self._leading = leading
        published = self.cluster.fetch()
        if published is not None:
            chain, key = published
            cert_path, _key_path = acme_files(Path(s.data_dir))
            try:
                current = cert_path.read_bytes()
            except OSError:
                current = b""
            if current != chain:
                self._install(chain, key, "taken from the queue database")
        return leading

    def _install(self, chain: bytes, key: bytes, how: str) -> None:
        """Both files, replaced together under the lock; logged; `on_renewed`."""
        from cryptography import x509

        s = self.config.server
        leaf = x509.load_pem_x509_certificates(chain)[0]
        cert_path, key_path = acme_files(Path(s.data_dir))
        self.folder.mkdir(parents=True, exist_ok=True)
        with files_lock(Path(s.data_dir), exclusive=True):
            write_private(key_path, key)
            write_private(cert_path, chain)
        logger.info(
            "ACME: certificate for %s %s (serial %x, valid until %s): %s",
            ", ".join(acme_domains(s)),
            how,
            leaf.serial_number,
            f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}",
            cert_path,
        )
        if self.on_renewed is not None:
            try:
                self.on_renewed()
            except Exception:
                logger.exception("ACME: swapping in the new certificate failed")

    def apply(self, config: Any) -> None:
        """A reloaded configuration: its acme_* settings are used from the next check on."""
        self.config = config

    def due(self, now: datetime | None = None) -> str | None:
        """Why a certificate is to be ordered now (None: the current one is good)."""
        s = self.config.server
        cert, key = acme_files(Path(s.data_dir))
        if not cert.exists() or not key.exists():
            return "no certificate yet"
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificates(cert.read_bytes())[0]
        except (OSError, ValueError, IndexError):
            return f"{cert} cannot be read"
        names: set[str] = set()
        with contextlib.suppress(x509.ExtensionNotFound):
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
        wanted = {d.lower() for d in acme_domains(s)}
        if names != wanted:
            return f"names changed ({', '.join(sorted(names))} → {', '.join(sorted(wanted))})"
        from cryptography.hazmat.primitives import serialization

        try:
            private = serialization.load_pem_private_key(key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError):
            return f"{key} cannot be read"
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if private.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
            # a replacement interrupted between the key's rename and the chain's
            return f"{key} is not the key of {cert}"
        now = now or datetime.now(UTC)
        # at most two thirds of the certificate's life ahead: a CA's short-lived certificates
        # (step-ca: 24 h) are not ordered anew at every check when acme_renew_before is longer
        # than their whole life (each serves a third of it at least)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        if leaf.not_valid_after_utc - min(s.acme_renew_before, lifetime * 2 / 3) <= now:
            return (
                f"expires {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%SZ}, within acme_renew_before"
            )
        return None

    def _run(self) -> None:
        while not self._stop.is_set():
            interval = self.config.server.acme_check_interval.total_seconds()
            try:
                if self.cluster is not None and not self._cluster_step():
                    # another node orders; look again soon (it may die, or renew)
                    self.failures = 0
                    self._stop.wait(min(interval, 60.0))
                    continue
                reason = self.due()
                if reason is not None:
                    self.obtain(reason)
                self.failures = 0
                wait = interval
            except Exception as exc:  # a thread boundary: log, keep serving, retry later
                self.failures += 1
                # (the exponent capped: 2 ** 1024 does not convert to a float)
                doubling = 2 ** min(self.failures - 1, 32)
                wait = min(min(RETRY_FIRST, interval) * doubling, RETRY_MAX)
                self._log_failure(exc, wait)
            self._stop.wait(wait)

    def _log_failure(self, exc: Exception, wait: float) -> None:
        s = self.config.server
        cert, _key = acme_files(Path(s.data_dir))
        keeps = (
            "the listeners keep the current certificate"
            if cert.exists()
            else "STARTTLS is not offered (and implicit-TLS listeners use the self-signed "
            "certificate) until one is obtained"
        )
        detail = str(exc) if isinstance(exc, AcmeError | OSError) else repr(exc)
        logger.error(
            "ACME: cannot obtain a certificate for %s from %s (failure %d): %s; retry in %.0f s; %s",
            ", ".join(acme_domains(s)),
            s.acme_directory_url,
            self.failures,
            detail,
            wait,
            keeps,
        )

    def obtain(self, reason: str) -> Issued:
        """One order, now: account (created if need be), challenge, certificate, files."""
        s = self.config.server
        domains = acme_domains(s)
        logger.info(
            "ACME: ordering a certificate for %s from %s (%s)",
            ", ".join(domains),
            s.acme_directory_url,
            reason,
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        account_key = _load_or_create_key(self.folder / ACCOUNT_KEY_FILE)
        from relaygate.config.values import parse_binding

        listen = parse_binding(s.acme_http_listen)
        client = AcmeClient(
            s.acme_directory_url,
            account_key,
            email=s.acme_email,
            ca_file=s.acme_ca_file,
            stop=self._stop,
        )
        if self.cluster is not None and self.responder is None:
            client.close()
            raise AcmeError(
                f"the HTTP-01 responder cannot listen on {s.acme_http_listen} "
                "(server.acme_http_listen): this node cannot order for the cluster"
            )
        try:
            client.register()
            if self.responder is not None:  # a cluster's: runs all the time
                responder = self.responder
                try:
                    issued = client.order(domains, responder)
                finally:
                    tokens, responder.tokens = list(responder.tokens), {}
                    if self.cluster is not None:
                        with contextlib.suppress(Exception):
                            self.cluster.drop_tokens(tokens)
            else:
                responder = ChallengeResponder(listen.address, listen.port)
                try:
                    responder.start()
                except OSError as exc:
                    raise AcmeError(
                        f"the HTTP-01 responder cannot listen on {s.acme_http_listen} "
                        f"(server.acme_http_listen): {exc.strerror or exc}"
                    ) from exc
                try:
                    issued = client.order(domains, responder)
                finally:
                    responder.stop()
        finally:
            client.close()
        if self.cluster is not None:  # first: the other nodes copy it from there
            self.cluster.publish(issued.chain_pem, issued.key_pem)
        self._install(issued.chain_pem, issued.key_pem, "installed")
        return issued
