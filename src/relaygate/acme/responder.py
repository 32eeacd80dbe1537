"""The HTTP-01 challenge responder: a small HTTP server that answers
``GET /.well-known/acme-challenge/<token>`` with the key authorization of a pending challenge.

Kept apart because it faces the internet (port 80, all the time on a cluster's nodes): its
limits (request timeout, connections at once, database look-ups at once) are here, next to the
code they bound.
"""

from __future__ import annotations

import http.server
import logging
import re
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("relaygate.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
#: The responder (port 80, all the time on a cluster's nodes): a request must arrive within
#: RESPONDER_TIMEOUT (slowloris); past MAX_RESPONDER_CONNECTIONS at once a new connection is
#: closed unanswered; at most MAX_LOOKUPS tokens are looked up in the queue database at once
#: (one connection each: PostgreSQL's max_connections is the mail queue's too).
RESPONDER_TIMEOUT = 10.0
MAX_RESPONDER_CONNECTIONS = 64
MAX_LOOKUPS = 4
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,128}$")  # RFC 8555 §8.3: base64url, >= 128 bits


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
