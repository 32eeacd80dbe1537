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

This module holds the routes (`create_app`); beside it, one seam each: guard.py (the guard in front
of every route: Host, Origin, the bearer token, no body), token_file.py (``admin.api_token_file``
read), token_guesses.py (wrong tokens counted per client, the 429), api_params.py (the query
parameters of the state-changing routes), api_json.py (the JSON error body), relay_status.py (the
health report and what the SMTP service last read), metrics.py (the /metrics collector). The
names the rest of RelayGate imports from here are re-exported.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlencode

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from relaygate.admin.api_json import _JSON_CHUNK, _error, _json
from relaygate.admin.api_params import _BULK_PARAMS, _flag, _unread_params, _with_ndr
from relaygate.admin.guard import _HEALTH_DETAIL, _Guard
from relaygate.admin.guard import API_PREFIX as API_PREFIX
from relaygate.admin.guard import HEALTH_DETAIL_PATH as HEALTH_DETAIL_PATH
from relaygate.admin.metrics import MetricsCollector as MetricsCollector
from relaygate.admin.relay_status import health_report as health_report
from relaygate.admin.relay_status import open_sessions as open_sessions
from relaygate.admin.relay_status import relay_findings
from relaygate.admin.relay_status import user_send_as as user_send_as
from relaygate.admin.relay_status import user_unknown_in as user_unknown_in
from relaygate.admin.relay_status import users_without_send_as as users_without_send_as
from relaygate.admin.token_file import TokenFileError as TokenFileError
from relaygate.admin.token_file import read_token as read_token
from relaygate.admin.token_file import token_mode_warning as token_mode_warning
from relaygate.admin.token_guesses import LOCKED_CHECK_INTERVAL as LOCKED_CHECK_INTERVAL
from relaygate.admin.token_guesses import LOOPBACK_CLIENT as LOOPBACK_CLIENT
from relaygate.admin.token_guesses import TOKEN_GUESS_LIMIT as TOKEN_GUESS_LIMIT
from relaygate.admin.token_guesses import TokenGuesses as TokenGuesses
from relaygate.admin.token_guesses import client_network as client_network
from relaygate.admin.token_guesses import guess_key as guess_key
from relaygate.admin.token_guesses import retry_after as retry_after
from relaygate.admin.token_guesses import too_many_guesses as too_many_guesses
from relaygate.control import BULK_ACTIONS, MAX_LIST_LIMIT, Conflict, NotFound, QueueControl
from relaygate.queue.store import StoreError

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

        config = relay.config
        name = request.path_params["name"]
        connector = views.find_receive(config, name)
        if connector is None:
            return _error(404, f"no receive connector named {name!r}")
        findings = relay_findings(relay, config)
        return JSONResponse(views.receive_connector_view(config, connector, findings))

    async def send_connector_show(request: Request) -> Response:
        from relaygate.admin import connectors as views

        config = relay.config
        name = request.path_params["name"]
        connector = views.find_send(config, name)
        if connector is None:
            return _error(404, f"no send connector named {name!r}")
        findings = relay_findings(relay, config)
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
