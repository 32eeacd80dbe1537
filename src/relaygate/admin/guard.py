"""The admin listener's guard (`_Guard`, ASGI middleware): the Host allow-list, same-origin for
state changes, the bearer token on /api/ and /metrics, no body on a state-changing API request.

Apart from the routes it stands in front of: the API and the admin centre's pages alike."""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from relaygate.admin.api_json import _error
from relaygate.admin.token_guesses import LOCKED_CHECK_INTERVAL, TokenGuesses, too_many_guesses

API_PREFIX = "/api"
HEALTH_DETAIL_PATH = "/api/health"
_OPEN_PATHS = ("/healthz", HEALTH_DETAIL_PATH, "/metrics")
#: request.state key set by the guard: the request may read the whole health report
_HEALTH_DETAIL = "relaygate_health_detail"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _host_name(host_header: str) -> str:
    host = host_header.strip()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _unauthorized() -> JSONResponse:
    response = _error(401, "missing or wrong API token (admin.api_token_file)")
    # RFC 6750 §3: a 401 for a bearer-token resource says which scheme it takes
    response.headers["WWW-Authenticate"] = 'Bearer realm="relaygate"'
    return response


class _Guard:
    """ASGI middleware: Host allow-list, same-origin for state changes, bearer token (on /api/,
    and on /metrics with ``metrics_require_token``), both read from the app's state per request."""

    def __init__(self, app: ASGIApp, relay: Any, state: Any) -> None:
        self.app = app
        self.relay = relay
        self.state = state  # the app's: `token` changes at a reload (AdminServer.apply_token)
        self.guesses: TokenGuesses = state.token_guesses

    def _check_token(self, scope: Scope, given: str) -> Response | None:
        """None when ``given`` (the Authorization header) carries the token; else the answer:
        401, or 429 while the client (``guess_key``) is blocked for too many wrong tokens (its
        token then checked at a low rate: `TokenGuesses.take_check`). Without a token configured
        nothing can match (``metrics_require_token`` is refused without one by validation;
        should it get here anyway, /metrics stays closed)."""
        client = (scope.get("client") or ("", 0))[0]
        blocked = self.guesses.blocked(client)
        # only a token offered takes one of a blocked client's checks: a request without one
        # (a scraper, a curl missing its -H) is no guess, and must not use up the admin's turn
        if blocked and given and (wait := self.guesses.take_check(client)) > 0:
            return too_many_guesses(wait)
        scheme, _, value = given.partition(" ")
        token: str | None = self.state.token
        if (
            token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(value.strip().encode(), token.encode())
        ):
            return None
        if given:  # a token was offered, and it was wrong
            self.guesses.wrong(client)
        return too_many_guesses(LOCKED_CHECK_INTERVAL) if blocked else _unauthorized()

    def _allowed_host(self, host_header: str) -> bool:
        name = _host_name(host_header).lower().rstrip(".")
        if not name or _is_ip(name) or name == "localhost":
            return True
        server = self.relay.config.server
        return name in {str(server.fqdn).lower(), str(server.name).lower()}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope.get("path", "")
        method = scope.get("method", "GET")
        response: Response | None = None
        host = headers.get("host", "")
        if not self._allowed_host(host):
            response = _error(403, f"host {host!r} is not this relay")
        elif method not in _SAFE_METHODS and "origin" in headers:
            origin = urlsplit(headers["origin"])
            if origin.netloc.lower() != host.lower():
                response = _error(403, "cross-origin request refused")
        if response is None:
            token: str | None = self.state.token  # AdminServer.apply_token sets it at a reload
            if path.startswith(API_PREFIX + "/") and path not in _OPEN_PATHS:
                if token:
                    response = self._check_token(scope, headers.get("authorization", ""))
            elif path == "/metrics":
                if self.state.metrics_require_token:
                    response = self._check_token(scope, headers.get("authorization", ""))
            elif path == HEALTH_DETAIL_PATH:
                # open to probes (the short answer); the whole report to whoever may read the
                # API: anyone without a token configured, else a request with the right one
                given = headers.get("authorization", "")
                if not token:
                    scope.setdefault("state", {})[_HEALTH_DETAIL] = True
                elif given:
                    response = self._check_token(scope, given)
                    if response is None:
                        scope.setdefault("state", {})[_HEALTH_DETAIL] = True
        if response is None and _ignored_body(path, method, headers):
            response = _error(
                400,
                "the API takes its parameters in the query string (?dry_run=true&from=...), "
                "not in the request's body, which it would ignore",
            )
        if response is not None:
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _ignored_body(path: str, method: str, headers: dict[str, str]) -> bool:
    """A state-changing API request with a body: the API reads only its query string, so
    ``curl -X POST '/api/queue/remove?to=...' -d dry_run=true`` removed every matching message
    with the dry run it asked for left unread. Refused instead (the CLI sends no body)."""
    if not path.startswith(API_PREFIX + "/") or method in _SAFE_METHODS:
        return False
    length = headers.get("content-length", "").strip()
    return "transfer-encoding" in headers or (bool(length) and length != "0")
