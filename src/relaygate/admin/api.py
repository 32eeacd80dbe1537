"""The admin listener's HTTP application: JSON API, /healthz, /metrics.

Routes (JSON unless said otherwise):

==============================================  ============================================
``GET /api/queue[?status=&limit=&after=...]``   messages (``relaygate.control.message_view``),
                                                oldest first; see "Paging and filters"
``GET /api/queue/{id}``                         one message with per-recipient detail and
                                                Subject
``POST /api/queue/{id}/retry``                  Retry-Queue / Resubmit (one message)
``POST /api/queue/{id}/suspend``                Suspend-Message
``POST /api/queue/{id}/resume``                 Resume-Message
``DELETE /api/queue/{id}[?with_ndr=true]``      Remove-Message [-WithNDR]
``POST /api/queue/{action}?from=&to=``          bulk: ``action`` (retry, suspend, resume,
``&queue=&status=[&with_ndr=&dry_run=]``        remove) on every message the filters match
                                                (Get-Message -Filter | Remove-Message...);
                                                see "Bulk operations"
``GET /api/queue/summary``                      message counts by status
``GET /api/queues``                             Get-Queue: the delivery queues
``GET /api/queues/{queue}``                     one delivery queue
``POST /api/queues/{queue}/retry``              Retry-Queue -Identity SERVER\\NextHop (on
                                                ``Unreachable``: Retry-Queue -Resubmit)
``GET /api/connectors/receive/{name}``          one receive connector: every key (as
                                                ``relaygate connector show``), identity, relay
                                                grant, session rights, audit findings
``GET /api/connectors/send/{name}``             one send connector: every key, route, pacing,
                                                overflow connector, its delivery queues, findings
``GET /healthz``                                liveness for probes: 200 when the store answers,
                                                else 503; the body is ``{"status": "ok"}``
                                                (``degraded``, ``error``) and nothing more
``GET /api/health``                             the same status code; the whole report (server,
                                                listeners, queue counts, back pressure, the
                                                store's error) to whoever may read the API,
                                                ``{"status"}`` alone to others
``GET /metrics``                                Prometheus text format
==============================================  ============================================

Paging and filters (``GET /api/queue``, Get-Message -Filter): ``limit`` from 0 to 100000 (default
1000); ``after``: a message identity, the list starts past it (queue ids are time-ordered, so this
is arrival order); ``status``: Active, Ready, Retry, Suspended, Unreachable, Delivered or Failed;
``from``: the FromAddress and ``to``: any recipient, each an address or a pattern with ``*`` at its
start or end (``*@scanners.corp.example``, ``scanner@*``), ASCII letters in any case, ``<>`` for
the null sender; ``queue``: the delivery queue (its NextHopDomain as a message shows it, e.g.
``[10.0.0.5]`` or ``example.com``, or ``Unreachable``; ``SERVER\\`` before it is allowed). The
response stays the object it was, ``{"server": ..., "messages": [...]}``, with one key added:
``"next_after"``, the value of ``after`` for the next page, or null when nothing follows; when
there is a next page a ``Link: </api/queue?...&after=ID>; rel="next"`` header says the same
(RFC 8288). Chosen over a bare list plus a header because the body already was an object
(clients read ``messages``), and an added key breaks none of them. The cursor, the status,
``from`` and ``to`` are in the store's query; Active, Unreachable and ``queue`` are worked out
from the lease and from routing for each message the store returns, at most 100000 of them per
request: if that many were looked at before the page was full, the page comes back shorter, with
``next_after`` at the last message looked at. A bad value is a 400 whose error names the
parameter.

Get-Queue (``GET /api/queues``): ``{"server", "queues": [...], "truncated"}``, one entry per
delivery queue with messages in it: ``Identity`` (``SERVER\\NextHopDomain``), ``DeliveryType``
(SmartHostConnectorDelivery, DnsConnectorDelivery, Unreachable), ``NextHopDomain``,
``SendConnector``, ``Status`` (Active: a message of it is being delivered; Ready: something in it
is due; Retry: all of it waits for a later attempt; Suspended: all its messages are suspended),
``MessageCount``, ``RecipientCount``, ``NextRetryTime``, ``LastRetryTime``, ``LastError``.
Every unfinished message is counted, however many; ``truncated`` is always false (it stays for
callers that read it: before, only the first 100000 unfinished messages were counted).
``POST /api/queues/{queue}/retry`` makes every message with a recipient in that queue due
now (all its unfinished recipients), except suspended ones, and answers ``{"Identity",
"NextHopDomain", "Resubmit", "RetriedCount", "Retried": [message identities], "SuspendedCount"}``;
404 when no message waits in the queue.

Bulk operations (``POST /api/queue/{retry|suspend|resume|remove}``): the action on every message
``GET /api/queue`` would list with the same ``from``, ``to``, ``queue`` and ``status`` (and
``after``), at most 100000 of them per request. At least one of ``from``, ``to``, ``queue``,
``status`` is required (400 naming them otherwise: nobody empties the queue by accident;
``from=*`` or ``to=*@*``, which match every address, are no filter, and a filter given empty,
``status=Retry&from=``, is refused rather than dropped);
``with_ndr=true`` (remove only) sends NDRs as the single remove does; ``dry_run=true`` changes
nothing and lists what would be acted on (a flag given without a value, ``&dry_run``, is true:
it used to read as false, so a dry run asked for that way removed what it was to list;
``with_ndr=`` given empty is a 400, not an NDR to every sender). The answer: ``{"server", "action", "dry_run",
"with_ndr", "matched", "done", "would_do", "skipped": [{"identity", "reason"}], "identities",
"ndrs", "limit_reached", "next_after"}``: ``identities`` are the messages acted on (in a dry run,
those it would act on, ``would_do`` of them, and ``done`` is 0); ``skipped`` those the action
does not apply to (in a dry run: would not, by the messages' state now), with the reason: a message being
delivered now (Active) is not removed (the single ``DELETE`` answers 409 for it), an already
suspended one is not suspended again, a suspended one is not retried, one not suspended is not
resumed, a Delivered or Failed one is neither retried nor suspended. ``limit_reached`` true:
100000 messages were looked at or matched and more may match: send the request again with
``after`` set to ``next_after``. The status is 200 whenever the filters were valid, skips or not.

Parameters go in the query string: a ``POST`` or ``DELETE`` under ``/api/`` with a body is a 400
(its body would be ignored: ``-d dry_run=true`` given to curl was, and the remove went ahead), and
so is a query parameter a state-changing route does not read (``&dryrun=true``, ``&sender=``),
naming it.

``{id}`` is ``SERVER\\QueueId`` (URL-encoded) or the bare queue id. Errors are
``{"error": "...", "status": N}`` with 400/401/403/404/409/429/503.

Protection (the listener is meant for loopback or a management network):

* ``admin.api_token_file`` set → every ``/api/`` route except ``/api/health`` needs
  ``Authorization: Bearer <token>`` (the CLI sends it), and so does ``/metrics`` with
  ``admin.metrics_require_token``: 401 with ``WWW-Authenticate: Bearer`` otherwise, the token
  compared in constant time; ``/api/health`` gives its whole report only with the token (a wrong
  one is a 401, as elsewhere); after 10 wrong tokens in a minute from one client (its IPv4
  address, its IPv6 /64, or any loopback address: `guess_key`; API,
  /metrics and sign-in page together) it is blocked: one of its tokens is checked every 6 s
  (the right one gets in, a wrong one gets 429), the others get 429 with ``Retry-After``, until
  fewer than 10 wrong ones fall in the last minute;
  a reload reads the file again and ``metrics_require_token`` with it (the guard reads both from
  the app's state at each request; ``AdminServer.apply_token``);
* ``/healthz`` stays open (load balancers send no token) and says only ok, degraded or error;
* requests whose ``Host`` is a DNS name other than ``localhost``, ``server.fqdn`` or ``server.name``
  are refused (DNS rebinding), and so are state-changing requests whose ``Origin`` is another site
  (cross-site request forgery from a browser on the admin's machine).

The web admin centre (HTML pages, `relaygate.admin.web`) is served by the same application and behind
the same guard: ``/``, ``/queue``, ``/queue/{id}``, ``/explain``, ``/connectors/{receive,send}/{name}``,
``/login``, ``/static/…``.
`create_app(relay, extra_routes=...)` takes further routes.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus, urlencode, urlsplit

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from relaygate.control import BULK_ACTIONS, MAX_LIST_LIMIT, Conflict, NotFound, QueueControl
from relaygate.file_modes import mode_granting
from relaygate.policy.address_rules import SendAsList
from relaygate.queue.store import StoreError
from relaygate.smtp.limits import SlidingWindow
from relaygate.worker_stats import NodeFigures, node_figures

__all__ = [
    "API_PREFIX",
    "MetricsCollector",
    "TokenFileError",
    "client_network",
    "create_app",
    "guess_key",
    "health_report",
    "read_token",
    "token_mode_warning",
]

log = logging.getLogger("relaygate.admin")

API_PREFIX = "/api"
HEALTH_DETAIL_PATH = "/api/health"
_OPEN_PATHS = ("/healthz", HEALTH_DETAIL_PATH, "/metrics")
#: request.state key set by the guard: the request may read the whole health report
_HEALTH_DETAIL = "relaygate_health_detail"
_SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


class TokenFileError(ValueError):
    """``admin.api_token_file`` is set but holds no token."""


def read_token(path: Path | None) -> str | None:
    """The API token from ``admin.api_token_file`` (first line, stripped); None when no file is
    configured. A file that is configured but empty raises :class:`TokenFileError`: the token is
    there to protect the queue, so a file emptied by mistake must not open the API and the admin
    centre to everyone (``OSError`` when it cannot be read)."""
    if path is None:
        return None
    try:
        # utf-8-sig: Notepad and PowerShell 5.1 (Set-Content -Encoding UTF8) write a BOM first
        token = Path(path).read_text(encoding="utf-8-sig").strip().splitlines()
    except UnicodeDecodeError:
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r} is not UTF-8 text (saved as UTF-16?)"
        ) from None
    if not token or not token[0].strip():
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r} is empty: its first line must be the API token"
        )
    value = token[0].strip()
    if not all("!" <= c <= "~" for c in value):
        # it travels in an HTTP header (Authorization: Bearer): ASCII without spaces or controls
        raise TokenFileError(
            f"admin.api_token_file {str(path)!r}: the API token must be printable ASCII "
            "without spaces"
        )
    return value


def token_mode_warning(path: Path | None) -> str | None:
    """A warning when ``admin.api_token_file`` is readable or writable by every local user (a
    copy keeps `cp`'s 0644): the listener is on loopback, so they all reach it, and the token is
    all that stops them listing and removing the queue. Group access is left alone (the admins
    who run `relaygate queue` read the file). None otherwise, or when it cannot be examined."""
    mode = None if path is None else mode_granting(path, 0o007)
    if mode is None:
        return None
    return (
        f"admin.api_token_file {str(path)!r} has mode {mode:04o}: every local user can read the "
        f"API token and use the queue's API and the admin centre with it; chmod o-rwx {path}"
    )


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


#: The query parameters of a bulk operation (``POST /api/queue/{action}``).
_BULK_PARAMS = ("from", "to", "queue", "status", "after", "with_ndr", "dry_run")


def _unread_params(request: Request, known: Sequence[str]) -> Response | None:
    """A 400 naming the query parameters a state-changing route does not read, or None. Left
    unread, they changed nothing about what was done: ``&dryrun=true`` (misspelt) or
    ``&sender=...`` (the filter is ``from``) removed every message the other filters matched."""
    unknown = sorted(set(request.query_params.keys()) - set(known))
    if not unknown:
        return None
    takes = f"it takes {', '.join(known)}" if known else "it takes none"
    return _error(400, f"unknown query parameter(s) {', '.join(unknown)}: {takes}")


def _given_empty(request: Request, name: str) -> bool:
    """Whether ``name=`` came with nothing (or blanks) after the ``=``, as ``with_ndr=$NDR`` gives
    with NDR unset, told from the bare ``name`` (parsed alike: both read as "")."""
    for part in request.url.query.split("&"):
        key, equals, value = part.partition("=")
        if equals and unquote_plus(key) == name and not unquote_plus(value).strip():
            return True
    return False


def _with_ndr(request: Request) -> bool | Response:
    """``with_ndr`` of a remove, or the 400 to answer. Given empty it is refused: it read as false
    until a bare flag became true, and taken as true it sends an NDR to every sender, mail that
    cannot be called back (``dry_run=`` stays a dry run: it only ever does less)."""
    if _given_empty(request, "with_ndr"):
        return _error(400, "with_ndr is empty: give true or false (or a bare &with_ndr for true)")
    value = _flag(request, "with_ndr")
    return _error(400, "with_ndr must be true or false") if value is None else value


def _flag(request: Request, name: str) -> bool | None:
    """A boolean query parameter: False when absent; True when ``true``, ``1``, ``yes`` or
    given without a value (``?dry_run``, ``?dry_run=``), False for ``false``, ``0``, ``no``
    (any case); None for anything else (the caller's 400). A bare flag is true, not false:
    ``POST /api/queue/remove?to=...&dry_run`` asks for a dry run, and reading it as false
    removed every matching message."""
    value = request.query_params.get(name)
    if value is None:
        return False
    value = value.strip().lower()
    if value in _TRUE or not value:
        return True
    return False if value in _FALSE else None


#: Messages of a /api/queue page rendered to JSON between two turns of the event loop.
_JSON_CHUNK = 500


def _json(value: Any) -> str:
    """``value`` as JSONResponse renders it."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)


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


#: Wrong tokens (the API's bearer token, the admin centre's sign-in) one client may try in a
#: minute; past them the client is blocked until fewer than that many fall in the last minute.
#: With the listener reachable from the network the token is all that guards the queue.
#: A client is its address, an IPv6 one its /64 (`guess_key`).
TOKEN_GUESS_LIMIT = 10
#: Seconds between two checks of a blocked client's tokens: one in this many is compared (the
#: right one gets in, a wrong one is a 429 and counts), the others get 429 unchecked. Refusing
#: them all let anyone who shares the admin's address (every local user on a loopback
#: listener, everyone behind one NAT) lock the admin out for as long as they went on failing;
#: one check in 6 s keeps guessing at the limit's own rate, ten a minute.
LOCKED_CHECK_INTERVAL = 6.0

#: The IPv6 prefix one client is counted by: a /64 is one network, one subscriber's or one
#: host's (SLAAC, privacy addresses), and whoever has one has 2^64 addresses to guess from.
_IPV6_CLIENT_PREFIX = 64
_IPV6_HOST_BITS = 128 - _IPV6_CLIENT_PREFIX


#: The key every loopback address counts under (`guess_key`).
LOOPBACK_CLIENT = "loopback"


def client_network(client: str) -> str:
    """Whose connection ``client`` (the address the listener reports) is: an IPv4 address
    itself; an IPv6 address its /64 (``2001:db8:1:2::/64``: one subscriber's or one host's,
    SLAAC and privacy addresses); an IPv4-mapped IPv6 address (an IPv4 client of a dual-stack
    listener) the IPv4 address, as it counts when it comes over IPv4. Anything that is not an
    address (no client at all: "") is its own key. The listener's connection cap compares it."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        network = ipaddress.IPv6Address(int(ip) >> _IPV6_HOST_BITS << _IPV6_HOST_BITS)
        return f"{network}/{_IPV6_CLIENT_PREFIX}"
    return str(ip)


def guess_key(client: str) -> str:
    """Whose wrong tokens ``client`` counts towards: its `client_network` (else ten guesses a
    minute from each address of an IPv6 /64 would be 2^64 times ten), and every loopback
    address (127.0.0.0/8, ::1, ::ffff:127.x.y.z) one client, LOOPBACK_CLIENT: a local user
    can connect from any of them, and counted apart they gave sixteen million times ten
    guesses a minute."""
    try:
        ip = ipaddress.ip_address(client.partition("%")[0])
    except ValueError:
        return client_network(client)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return LOOPBACK_CLIENT if ip.is_loopback else client_network(client)


class TokenGuesses:
    """Wrong API tokens per client over a sliding minute (see TOKEN_GUESS_LIMIT): the methods
    take the client's address as the listener reports it, and count it by ``guess_key``."""

    WINDOW = 60.0

    def __init__(self, limit: int = TOKEN_GUESS_LIMIT) -> None:
        self.limit = limit
        self._window = SlidingWindow(self.WINDOW)
        self._checked: dict[str, float] = {}  # blocked client's key -> its last token check

    def blocked(self, client: str) -> bool:
        return self._window.count(guess_key(client), time.monotonic()) >= self.limit

    def take_check(self, client: str) -> float:
        """For a blocked client: 0 when its token may be compared now (that check is taken:
        the next is due LOCKED_CHECK_INTERVAL later), else the seconds until it may be."""
        key = guess_key(client)
        now = time.monotonic()
        last = self._checked.get(key)
        if last is not None and now - last < LOCKED_CHECK_INTERVAL:
            return LOCKED_CHECK_INTERVAL - (now - last)
        if len(self._checked) >= self._window.max_keys:  # bounded, as the window is
            self._checked = {
                k: t for k, t in self._checked.items() if now - t < LOCKED_CHECK_INTERVAL
            }
        self._checked[key] = now
        return 0.0

    def wrong(self, client: str) -> None:
        key = guess_key(client)
        now = time.monotonic()
        self._window.add(key, now)
        if self._window.count(key, now) == self.limit:
            # Once per block (a blocked client's attempts are not counted): before, guessing
            # left no trace in the service log.
            log.warning(
                "admin listener: %d wrong API tokens in a minute from %s: its tokens are checked "
                "once in %g s (the others get 429) until fewer fall in a minute",
                self.limit,
                key if key == client else f"{client} ({key})",
                LOCKED_CHECK_INTERVAL,
            )


def too_many_guesses(wait: float) -> JSONResponse:
    """The 429 of a blocked client (`TokenGuesses`): ``wait``, the seconds until its next
    token is checked, as Retry-After."""
    seconds = retry_after(wait)
    response = _error(
        429,
        "too many wrong API tokens from this address (its IPv6 /64, or any loopback address): "
        f"one token is checked every {LOCKED_CHECK_INTERVAL:g} s until fewer than "
        f"{TOKEN_GUESS_LIMIT} wrong ones fall in a minute; the next in {seconds} s",
    )
    response.headers["Retry-After"] = str(seconds)
    return response


def retry_after(wait: float) -> int:
    """Whole seconds for a Retry-After header (RFC 9110 §10.2.3), at least 1."""
    return max(1, math.ceil(wait))


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


def users_without_send_as(relay: Any) -> list[str]:
    """The SMTP AUTH users without a send-as list, as the SMTP service last read its users file
    (for the audit findings; none before it runs)."""
    ctx = getattr(relay, "ctx", None)
    return ctx.users.without_send_as() if ctx is not None else []


def user_send_as(relay: Any, user: str) -> SendAsList | None:
    """`user`'s send-as list as the SMTP service last read its users file (for explain)."""
    ctx = getattr(relay, "ctx", None)
    return ctx.users.send_as(user) if ctx is not None else None


def user_unknown_in(relay: Any, user: str) -> str | None:
    """The users file's path when, as the SMTP service last read it, it does not hold `user`
    (AUTH as `user` fails: for explain); None when it does, or before the service runs."""
    ctx = getattr(relay, "ctx", None)
    if ctx is None or user.lower() in ctx.users:
        return None
    return str(ctx.users.path)


def open_sessions(relay: Any) -> dict[str, int]:
    """Open SMTP sessions per receive connector name, of every worker of the node (none before
    it listens)."""
    return node_figures(relay).open_sessions


class MetricsCollector:
    """Prometheus collector over the manager's counters and the last queue counts."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterable[Any]:
        queue = GaugeMetricFamily(
            "relaygate_queue_messages", "Messages in the queue by status", labels=["status"]
        )
        for key in ("ready", "retry", "suspended", "delivered", "failed"):
            queue.add_metric([key.capitalize()], float(self.counts.get(key, 0)))
        yield queue
        yield GaugeMetricFamily(
            "relaygate_queue_recipients_pending",
            "Recipients not yet delivered or failed",
            value=float(self.counts.get("recipients_pending", 0)),
        )
        yield GaugeMetricFamily(
            "relaygate_queue_active_messages",
            "Messages under a live delivery lease",
            value=float(self.counts.get("active", 0)),
        )
        figures = node_figures(self.relay)  # with server.workers > 1: every worker's, summed
        stats = figures.delivery
        recipients = CounterMetricFamily(
            "relaygate_delivery_recipients",
            "Recipient delivery outcomes",
            labels=["outcome"],
        )
        for key in ("delivered", "deferred", "failed", "paced", "expired"):
            recipients.add_metric([key], float(stats.get(key, 0)))
        yield recipients
        yield CounterMetricFamily(
            "relaygate_delivery_runs", "Delivery runs (one per message attempt)",
            value=float(stats.get("attempts", 0)),
        )  # fmt: skip
        dsn = CounterMetricFamily(
            "relaygate_dsn", "Delivery status notifications generated", labels=["type"]
        )
        dsn.add_metric(["failed"], float(stats.get("ndr", 0)))
        dsn.add_metric(["delayed"], float(stats.get("delay_notices", 0)))
        yield dsn
        yield GaugeMetricFamily(
            "relaygate_deliveries_in_flight",
            "Messages being delivered now",
            value=float(figures.in_flight),
        )
        manager = getattr(self.relay, "manager", None)
        if manager is not None:
            yield GaugeMetricFamily(
                "relaygate_queue_clock_skew",
                "1 while the shared queue (PostgreSQL) refuses this node's leases because its "
                "clock is off the queue database's by more than a third of queue.lease_duration: "
                "it delivers nothing meanwhile",
                value=0.0 if getattr(manager, "clock_skew", None) is None else 1.0,
            )
        yield from self._sessions(figures)
        yield from self._received(figures)
        yield self._certificates()
        pressure = getattr(self.relay, "pressure", None)
        if pressure is not None:
            yield GaugeMetricFamily(
                "relaygate_back_pressure",
                "1 while new messages are refused for lack of disk space (452 4.3.1)",
                value=1.0 if pressure.high else 0.0,
            )
            if pressure.space is not None:
                yield GaugeMetricFamily(
                    "relaygate_queue_disk_free_bytes",
                    "Free space on the queue's file system at the last sample",
                    value=float(pressure.space.free),
                )

    def _certificates(self) -> Any:
        """The notAfter of each certificate the relay holds, as read at start or the last
        reload (certificates.py): alert on `relaygate_certificate_expiry_timestamp_seconds - time()
        < 30 * 86400`."""
        family = GaugeMetricFamily(
            "relaygate_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate (Unix time), as read at start or the last reload; "
            "use: listener, smtp_client, entra_credential",
            labels=["use", "name", "file"],
        )
        # One sample per label set: a receive connector named like server.name with the server's
        # file is the same (use, name, file) twice, and Prometheus rejects a scrape with a
        # duplicate sample. The same file has the same date; should it differ, the earlier counts.
        samples: dict[tuple[str, str, str], float] = {}
        for cert in getattr(self.relay, "certificates", ()):
            labels = (cert.ref.use, cert.ref.name, str(cert.ref.file))
            samples[labels] = min(samples.get(labels, cert.timestamp), cert.timestamp)
        for labels, value in samples.items():
            family.add_metric(list(labels), value)
        return family

    def _received(self, figures: NodeFigures) -> Iterable[Any]:
        """What the receive connectors took and refused, since the node (its workers) started."""
        smtp = figures.smtp
        families = (
            ("relaygate_smtp_sessions_admitted", "SMTP sessions admitted", smtp.sessions),
            (
                "relaygate_smtp_connections_refused",
                "Connections refused with 421 by max_inbound_connection(_per_source)",
                smtp.connections_refused,
            ),
            (
                "relaygate_smtp_messages_received",
                "Messages accepted (250 after DATA)",
                smtp.messages,
            ),
            ("relaygate_smtp_received_bytes", "Bytes of the messages accepted", smtp.bytes),
        )
        for name, text, counts in families:
            family = CounterMetricFamily(name, text, labels=["connector"])
            for connector, n in sorted(counts.items()):
                family.add_metric([connector], float(n))
            yield family
        refusals = CounterMetricFamily(
            "relaygate_smtp_refusals",
            "Replies of 400 and above (a refused recipient, message or command), by reply",
            labels=["connector", "code", "status"],
        )
        for (connector, code, status), n in sorted(smtp.refusals.items()):
            refusals.add_metric([connector, str(code), status], float(n))
        yield refusals

    def _sessions(self, figures: NodeFigures) -> Iterable[Any]:
        """Open SMTP sessions per receive connector, next to the connector's limit: with
        process_open_fds / process_max_fds what an operator alerts on before clients get 421s
        or dropped connections."""
        ctx = getattr(self.relay, "ctx", None)
        open_now = figures.open_sessions
        sessions = GaugeMetricFamily(
            "relaygate_smtp_sessions", "Open inbound SMTP sessions", labels=["connector"]
        )
        limits = GaugeMetricFamily(
            "relaygate_smtp_session_limit",
            "max_inbound_connection of the receive connector (absent: unlimited)",
            labels=["connector"],
        )
        for connector in self.relay.config.receive_connectors:
            if not connector.enabled:
                continue
            sessions.add_metric([connector.name], float(open_now.get(connector.name, 0)))
            if connector.max_inbound_connection is not None:
                limits.add_metric([connector.name], float(connector.max_inbound_connection))
        yield sessions
        yield limits
        memory = getattr(ctx, "data_memory", None)
        if memory is not None:
            yield GaugeMetricFamily(
                "relaygate_data_in_memory_bytes",
                "Message bytes held by sessions receiving or committing them",
                value=float(figures.data_in_memory),
            )
            yield GaugeMetricFamily(
                "relaygate_data_in_memory_limit_bytes",
                "server.max_data_in_memory: past it a message gets 452 4.3.1",
                value=float(memory.limit),
            )


async def health_report(
    relay: Any, control: QueueControl, started: float
) -> tuple[dict[str, Any], int]:
    """The body of ``/api/health`` and its HTTP status (200, or 503 when the store fails);
    the web dashboard shows the same report."""
    manager = getattr(relay, "manager", None)
    server = getattr(relay, "server", None)
    body: dict[str, Any] = {
        "status": "ok",
        "server": relay.config.server.name,
        "fqdn": relay.config.server.fqdn,
        "uptime_seconds": round(time.time() - started, 1),
        "smtp": [f"{h}:{p}" for h, p in (getattr(server, "endpoints", None) or [])],
        "queue_manager": {
            "running": bool(getattr(manager, "running", False)),
            "in_flight": int(getattr(manager, "in_flight", 0) or 0),
            # why the shared queue refuses this node's leases (its clock), None while it leases
            "clock_skew": getattr(manager, "clock_skew", None),
        },
    }
    try:
        body["queue"] = await control.shared_counts()
    except Exception as exc:
        body["status"] = "error"
        body["error"] = f"queue store: {exc}"
        return body, 503
    if manager is not None and not body["queue_manager"]["running"]:
        body["status"] = "degraded"
    if body["queue_manager"]["clock_skew"] is not None:
        # Degraded, not down: the node still receives (its messages stored for the others to
        # deliver), but delivers nothing until its clock agrees with the queue database's.
        body["status"] = "degraded"
    pressure = getattr(relay, "pressure", None)
    if pressure is not None:
        space = pressure.space
        body["back_pressure"] = {
            "active": pressure.high,
            "disk_free_bytes": space.free if space is not None else None,
            "min_free_disk_space": pressure.min_free,
        }
        if pressure.high:
            body["status"] = "degraded"
    return body, 200


def create_app(
    relay: Any,
    *,
    token: str | None = None,
    extra_routes: Sequence[BaseRoute] = (),
    web: bool = True,
) -> Starlette:
    """The admin application for ``relay`` (an object with ``config``, ``store``, ``manager``).
    ``token``: the bearer token the API requires (None: no token); the web admin centre then asks
    for the same token once and keeps a session cookie. ``web``: serve the web admin centre's
    HTML pages (`relaygate.admin.web`) next to the API."""
    control = QueueControl.for_relay(relay)
    registry = CollectorRegistry(auto_describe=False)
    collector = MetricsCollector(relay)
    registry.register(collector)
    # process_open_fds, process_max_fds, process_resident_memory_bytes, process_cpu_seconds_total
    ProcessCollector(registry=registry)
    started = time.time()

    async def queue_list(request: Request) -> Response:
        q = request.query_params
        text = q.get("limit", "1000").strip()
        # digits only (int() also takes "1_000", "١٠" and numbers too big for the database)
        if not (text.isascii() and text.isdigit() and len(text) <= 9) or (
            int(text) > MAX_LIST_LIMIT
        ):
            return _error(400, f"limit must be a whole number from 0 to {MAX_LIST_LIMIT}")
        filters = {
            key: (q.get(param) or "").strip() or None
            for key, param in (
                ("status", "status"),
                ("after", "after"),
                ("sender", "from"),
                ("recipient", "to"),
                ("queue", "queue"),
            )
        }
        try:
            page = await control.list_page(limit=int(text), **filters)
        except ValueError as exc:
            return _error(400, str(exc))
        # Up to 100,000 messages make tens of MB of JSON: rendered a chunk at a time, handing
        # the loop (which serves SMTP) back in between, as JSONResponse would render it at once.
        messages: list[str] = []
        for i in range(0, len(page.messages), _JSON_CHUNK):
            if i:
                await asyncio.sleep(0)
            messages.extend(_json(m) for m in page.messages[i : i + _JSON_CHUNK])
        body = (
            f'{{"server":{_json(relay.config.server.name)},"messages":[{",".join(messages)}],'
            f'"next_after":{_json(page.next_after)}}}'
        )
        response = Response(body.encode("utf-8"), media_type="application/json")
        if page.next_after is not None:
            params = [(k, v) for k, v in q.multi_items() if k != "after"]
            query = urlencode([*params, ("after", page.next_after)])
            response.headers["Link"] = f'<{request.url.path}?{query}>; rel="next"'
        return response

    async def queues_list(request: Request) -> Response:
        return JSONResponse(await control.queues())

    async def queues_show(request: Request) -> Response:
        return await _call(control.queue, request.path_params["identity"])

    async def queues_retry(request: Request) -> Response:
        if (refused := _unread_params(request, ())) is not None:
            return refused
        return await _call(control.retry_queue, request.path_params["identity"])

    async def queue_summary(request: Request) -> Response:
        return JSONResponse(await control.counts())

    async def queue_show(request: Request) -> Response:
        return await _call(control.show, request.path_params["identity"])

    async def queue_retry(request: Request) -> Response:
        if (refused := _unread_params(request, ())) is not None:
            return refused
        return await _call(control.retry, request.path_params["identity"])

    async def queue_suspend(request: Request) -> Response:
        if (refused := _unread_params(request, ())) is not None:
            return refused
        return await _call(control.suspend, request.path_params["identity"])

    async def queue_resume(request: Request) -> Response:
        if (refused := _unread_params(request, ())) is not None:
            return refused
        return await _call(control.resume, request.path_params["identity"])

    async def queue_remove(request: Request) -> Response:
        if (refused := _unread_params(request, ("with_ndr",))) is not None:
            return refused
        with_ndr = _with_ndr(request)
        if isinstance(with_ndr, Response):
            return with_ndr
        return await _call(control.remove, request.path_params["identity"], with_ndr=with_ndr)

    def bulk_route(action: str) -> Route:
        async def queue_bulk(request: Request) -> Response:
            if (refused := _unread_params(request, _BULK_PARAMS)) is not None:
                return refused
            q = request.query_params
            with_ndr = _with_ndr(request)
            if isinstance(with_ndr, Response):
                return with_ndr
            dry_run = _flag(request, "dry_run")
            if dry_run is None:
                return _error(400, "dry_run must be true or false")
            flags = {"with_ndr": with_ndr, "dry_run": dry_run}
            params = {
                key: q.get(param)
                for key, param in (
                    ("sender", "from"),
                    ("recipient", "to"),
                    ("queue", "queue"),
                    ("status", "status"),
                    ("after", "after"),
                )
            }
            try:
                body = await control.bulk(
                    action, **params, with_ndr=flags["with_ndr"], dry_run=flags["dry_run"]
                )
            except ValueError as exc:
                return _error(400, str(exc))
            return JSONResponse(body)

        return Route(f"{API_PREFIX}/queue/{action}", queue_bulk, methods=["POST"])

    async def receive_connector_show(request: Request) -> Response:
        from relaygate.admin import connectors as views
        from relaygate.audit import audit

        config = relay.config
        name = request.path_params["name"]
        connector = views.find_receive(config, name)
        if connector is None:
            return _error(404, f"no receive connector named {name!r}")
        findings = audit(
            config,
            certificates=getattr(relay, "certificates", ()),
            users_without_send_as=users_without_send_as(relay),
        )
        return JSONResponse(views.receive_connector_view(config, connector, findings))

    async def send_connector_show(request: Request) -> Response:
        from relaygate.admin import connectors as views
        from relaygate.audit import audit

        config = relay.config
        name = request.path_params["name"]
        connector = views.find_send(config, name)
        if connector is None:
            return _error(404, f"no send connector named {name!r}")
        findings = audit(
            config,
            certificates=getattr(relay, "certificates", ()),
            users_without_send_as=users_without_send_as(relay),
        )
        view = views.send_connector_view(config, connector, findings, await control.queues())
        return JSONResponse(view)

    async def health(request: Request) -> Response:
        body, status = await health_report(relay, control, started)
        if request.url.path == HEALTH_DETAIL_PATH and request.scope.get("state", {}).get(
            _HEALTH_DETAIL
        ):
            return JSONResponse(body, status_code=status)
        # A probe (and whoever reaches the listener) learns up, degraded or down: no names,
        # addresses, queue figures or error texts (those are the API's, behind its token).
        return JSONResponse({"status": body["status"]}, status_code=status)

    async def metrics(request: Request) -> Response:
        try:
            collector.counts = await control.shared_counts()
        except Exception as exc:
            log.warning("metrics: queue counts unavailable: %s", exc)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    routes: list[BaseRoute] = [
        Route("/healthz", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route(f"{API_PREFIX}/health", health, methods=["GET"]),
        Route(f"{API_PREFIX}/queue", queue_list, methods=["GET"]),
        Route(f"{API_PREFIX}/queue/summary", queue_summary, methods=["GET"]),
        # before /api/queue/{identity}: POST /api/queue/remove is the bulk remove
        *(bulk_route(action) for action in BULK_ACTIONS),
        Route(f"{API_PREFIX}/queue/{{identity}}", queue_show, methods=["GET"]),
        Route(f"{API_PREFIX}/queue/{{identity}}", queue_remove, methods=["DELETE"]),
        Route(f"{API_PREFIX}/queue/{{identity}}/retry", queue_retry, methods=["POST"]),
        Route(f"{API_PREFIX}/queue/{{identity}}/suspend", queue_suspend, methods=["POST"]),
        Route(f"{API_PREFIX}/queue/{{identity}}/resume", queue_resume, methods=["POST"]),
        Route(f"{API_PREFIX}/queues", queues_list, methods=["GET"]),
        Route(f"{API_PREFIX}/queues/{{identity}}", queues_show, methods=["GET"]),
        Route(f"{API_PREFIX}/queues/{{identity}}/retry", queues_retry, methods=["POST"]),
        Route(
            f"{API_PREFIX}/connectors/receive/{{name:path}}",
            receive_connector_show,
            methods=["GET"],
        ),
        Route(f"{API_PREFIX}/connectors/send/{{name:path}}", send_connector_show, methods=["GET"]),
    ]
    if web:
        from relaygate.admin.web import web_routes  # the pages import this module

        routes.extend(web_routes())
    routes.extend(extra_routes)

    async def store_failed(request: Request, exc: Exception) -> Response:
        # The queue database failing (PostgreSQL down, SQLite I/O error): 503 with the API's JSON
        # error, or the admin centre's page, rather than Starlette's plain-text 500.
        log.warning("admin %s %s: queue store: %s", request.method, request.url.path, exc)
        message = f"queue store unavailable: {exc}"
        if web and not request.url.path.startswith(API_PREFIX + "/"):
            from relaygate.admin.web import error_page

            return error_page(request, "Queue store unavailable", message, 503)
        return _error(503, message)

    app = Starlette(routes=routes, exception_handlers={StoreError: store_failed})
    app.state.token_guesses = TokenGuesses()
    app.state.metrics_require_token = bool(
        getattr(relay.config.admin, "metrics_require_token", False)
    )
    app.add_middleware(_Guard, relay=relay, state=app.state)
    app.state.signed_out = {}  # admin centre session cookies signed out: value -> issued
    app.state.control = control
    app.state.relay = relay
    app.state.token = token
    app.state.started = started
    return app


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Response:
    try:
        return JSONResponse(await fn(*args, **kwargs))
    except NotFound as exc:
        return _error(404, str(exc.args[0]) if exc.args else "not found")
    except Conflict as exc:
        return _error(409, str(exc))
