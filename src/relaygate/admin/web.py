"""The web admin centre: HTML pages over the same functions as the JSON API and the CLI.

Server-rendered Jinja2 (autoescaped), one stylesheet, no JavaScript: every page works with plain
links and forms.

=================================  ==================================================================
``GET /``                          dashboard: health, queue counts, receive connectors (bindings,
                                   RemoteIPRanges, relay method from `relaygate.audit.relay_grant`),
                                   send connectors, audit findings (`relaygate.audit.audit`)
``GET /queue[?status=S&from=&to=``  the delivery queues (Get-Queue: each links to its messages, with
``&queue=&after=&limit=]``          a Retry button), then the messages (Get-Message -Filter, a page
                                   of ``limit``, at most 500, with a "Next page" link carrying the
                                   cursor ``after``), with Retry / Suspend / Resume / Remove buttons
``GET /queue/{id}``                one message with per-recipient detail
``POST /queues/{queue}/retry``     Retry-Queue (``Unreachable``: -Resubmit), then 303 to the queue
``POST /queue/{id}/{action}``      ``retry`` | ``suspend`` | ``resume`` | ``remove`` (form field
                                   ``with_ndr=true`` for Remove-Message -WithNDR): calls
                                   `relaygate.control.QueueControl`, then 303 back to the page
``POST /queue/bulk``               ``action`` = ``suspend`` | ``resume`` | ``remove`` (no NDR) on
                                   every message the form's ``status``/``from``/``to``/``queue``
                                   match (``QueueControl.bulk``, a filter required, the box
                                   ``confirm=yes`` ticked), then 303 to /queue with the counts
``GET /explain?client_ip=…``       what ``relaygate explain`` shows (`relaygate.policy.explain`)
``GET /connectors/receive/{name}``  one receive connector, read-only: every key as ``relaygate
                                   connector show`` prints it, the relay grant, the rights of an
                                   anonymous and an authenticated session, its audit findings
``GET /connectors/send/{name}``     one send connector, read-only: every key, route, pacing (and
                                   its overflow connector), its delivery queues, its findings
``GET/POST /login``, ``POST /logout``  only when ``admin.api_token_file`` is set
``GET /static/admin.css``          the stylesheet
=================================  ==================================================================

Security:

* every request passes the API's guard (`relaygate.admin.api`): Host allow-list (DNS rebinding) and
  refusal of a POST whose ``Origin`` is another site;
* the POST routes here also *require* an ``Origin`` header (browsers send one with every POST) and
  refuse a ``Sec-Fetch-Site`` other than ``same-origin``: only the admin centre's own forms change
  the queue; scripts use the JSON API;
* with ``admin.api_token_file`` set, every page and action needs a session: ``/login`` takes the API
  token and sets an HttpOnly, SameSite=Strict cookie holding an HMAC made with the token (never the
  token), valid for 12 hours, named with the listener's port (``relaygate_admin_session_8025``:
  cookies are per host, not per port, and two relays on one host must not replace each other's); signing out ends that session everywhere (until a restart);
  without a token file the pages are open to whoever reaches the listener, exactly like the API;
* HTML responses carry a Content-Security-Policy without any script source and with
  ``frame-ancestors 'none'`` (no clickjacking of the buttons), ``nosniff``, ``no-store`` and
  ``Referrer-Policy: same-origin``.

This module holds the dashboard, the explain and connector pages, the rows they show (relay
method, send connector routes, explain results) and the routes; and re-exports the names the
rest of the code imports from here. Beside it: what every page uses, the templates, the
security headers, the session cookie and the checks of a POST (web_common.py), the queue and
message pages and their actions (web_queue.py), and signing in and out (web_login.py).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any
from urllib.parse import urlencode

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from relaygate.admin import connectors as connector_views
from relaygate.admin.api import (
    health_report,
    open_sessions,
    user_send_as,
    user_unknown_in,
)
from relaygate.admin.relay_status import relay_findings
from relaygate.admin.web_common import (
    SESSION_COOKIE,
    STATIC_DIR,
    TEMPLATES_DIR,
    _login_redirect,
    connector_url,
    error_page,
    render,
    session_cookie,
    session_value,
)
from relaygate.admin.web_common import SESSION_LIFETIME as SESSION_LIFETIME
from relaygate.admin.web_login import login_page, login_submit, logout
from relaygate.admin.web_queue import (
    message_action,
    message_page,
    queue_bulk,
    queue_page,
    queue_retry,
)
from relaygate.audit import SEVERITIES, Finding, relay_grant, summary
from relaygate.config.model import Config, ReceiveConnector, SendConnector
from relaygate.config.values import parse_binding
from relaygate.control import QueueControl
from relaygate.delivery.oauth import auth_label
from relaygate.policy.address_rules import SendAsList
from relaygate.policy.explain import endpoints_for, explain
from relaygate.queue import pacing

__all__ = [
    "SESSION_COOKIE",
    "STATIC_DIR",
    "TEMPLATES_DIR",
    "connector_rows",
    "connector_url",
    "error_page",
    "explain_results",
    "relay_method",
    "render",
    "route_text",
    "send_connector_rows",
    "session_cookie",
    "session_value",
    "web_routes",
]


_SPLIT_ADDRESSES = re.compile(r"[\s,;]+")


def relay_method(connector: ReceiveConnector) -> tuple[str, str]:
    """(short label, audit's description) of how anonymous clients relay through ``connector``:
    ``A`` (AnonymousUsers + explicit permission), ``B`` (ExternalAuthoritative + ExchangeServers),
    ``A + B``, ``anonymous`` (granted otherwise), ``after AUTH only`` or ``none``."""
    grant = relay_grant(connector)
    if not grant.anonymous:
        return ("after AUTH only" if grant.authenticated else "none"), grant.describe()
    methods = [name for name, on in (("A", bool(grant.method_a)), ("B", grant.method_b)) if on]
    return (" + ".join(methods) or "anonymous"), grant.describe()


def connector_rows(
    config: Config, open_sessions: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """The receive connectors as the dashboard shows them; `open_sessions`: the node's open
    SMTP sessions per connector name."""
    rows = []
    open_sessions = open_sessions or {}
    for c in config.receive_connectors:
        method, detail = relay_method(c)
        rows.append(
            {
                "name": c.name,
                "enabled": c.enabled,
                "usage": c.usage,
                "role": c.transport_role,
                "bindings": [str(b) for b in c.bindings],
                "ranges": c.relay_ranges_text,
                "auth": list(c.auth_mechanism),
                "groups": list(c.permission_groups),
                "relay": method,
                "relay_detail": detail,
                "sessions": open_sessions.get(c.name, 0),
                "session_limit": c.max_inbound_connection,
            }
        )
    return rows


_HOST_WITH_PORT = re.compile(r"(\]|^[^:\[\]]+):\d+$")


def route_text(c: SendConnector) -> str:
    if c.delivery_method == "Graph":
        from relaygate.delivery.graph import route_label

        return f"{route_label(c)} via {c.graph_endpoint}"
    if c.dns_routing_enabled or not c.smart_hosts:
        return f"MX lookup (DNS), port {c.port}"
    hosts = ", ".join(c.smart_hosts)
    if all(_HOST_WITH_PORT.search(h) for h in c.smart_hosts):
        return f"smart hosts {hosts}"
    return f"smart hosts {hosts} (port {c.port})"


def send_connector_rows(config: Config) -> list[dict[str, Any]]:
    return [
        {
            "name": c.name,
            "enabled": c.enabled,
            "address_spaces": list(c.address_spaces),
            "route": route_text(c),
            "auth": auth_label(c) or "None",
            "require_tls": c.require_tls,
            "pacing": pacing.describe(c),
            "send_as": c.send_as,
        }
        for c in config.send_connectors
    ]


def explain_results(
    config: Config,
    *,
    client_ip: str,
    local: str,
    sender: str | None,
    recipients: list[str],
    auth_user: str | None,
    send_as: SendAsList | None = None,
    unknown_in: str | None = None,
) -> list[dict[str, Any]]:
    """What ``relaygate explain`` computes: one result per local endpoint (``local`` or every
    binding). Raises ValueError with the field's name for bad input."""
    try:
        ipaddress.ip_address(client_ip.partition("%")[0])
    except ValueError:
        raise ValueError(f"client IP: {client_ip!r} is not an IP address") from None
    if local:
        try:
            b = parse_binding(local)
        except ValueError as exc:
            raise ValueError(f"local endpoint: {exc}") from None
        endpoints = [(b.address, b.port)]
    else:
        endpoints = endpoints_for(config, client_ip)
        if not endpoints:
            raise ValueError("the configuration has no receive connector bindings")
    return [
        explain(
            config,
            client_ip=client_ip,
            local=ep,
            sender=sender,
            recipients=recipients,
            authenticated_user=auth_user,
            send_as=send_as,
            unknown_in=unknown_in,
        ).to_dict()
        for ep in endpoints
    ]


def _findings(request: Request, config: Config) -> list[Finding]:
    """`relaygate audit`'s findings for `config`, as the relay last read its files."""
    return relay_findings(request.app.state.relay, config)


async def dashboard(request: Request) -> Response:
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    state = request.app.state
    health, status = await health_report(state.relay, state.control, state.started)
    config = state.relay.config
    findings = _findings(request, config)
    context = {
        "health": health,
        "counts": health.get("queue") or {},
        "connectors": connector_rows(config, open_sessions(state.relay)),
        "send_connectors": send_connector_rows(config),
        "findings": [f.to_dict() for f in findings],
        "findings_summary": summary(findings),
        "severities": SEVERITIES,
    }
    return render(request, "dashboard.html", context, status)


async def explain_page(request: Request) -> Response:
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    q = request.query_params
    client_ip = q.get("client_ip", "").strip()
    local = q.get("local", "").strip()
    sender_text = q.get("from", "").strip()
    auth_user = q.get("auth_user", "").strip()
    recipients = [a for value in q.getlist("to") for a in _SPLIT_ADDRESSES.split(value) if a]
    form = {
        "client_ip": client_ip,
        "local": local,
        "from": sender_text,
        "to": "\n".join(recipients),
        "auth_user": auth_user,
    }
    results: list[dict[str, Any]] = []
    error, code = None, 200
    if client_ip:
        try:
            relay = request.app.state.relay
            results = explain_results(
                relay.config,
                client_ip=client_ip,
                local=local,
                sender=sender_text or None,
                recipients=recipients,
                auth_user=auth_user or None,
                send_as=user_send_as(relay, auth_user) if auth_user else None,
                unknown_in=user_unknown_in(relay, auth_user) if auth_user else None,
            )
        except ValueError as exc:
            error, code = str(exc), 400
    context = {"form": form, "results": results, "error": error}
    return render(request, "explain.html", context, code)


async def receive_connector_page(request: Request) -> Response:
    """One receive connector, read-only (Get-ReceiveConnector | Format-List)."""
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    config = request.app.state.relay.config
    name = request.path_params["name"]
    connector = connector_views.find_receive(config, name)
    if connector is None:
        return error_page(request, "Not found", f"No receive connector named {name!r}.", 404)
    findings = _findings(request, config)
    view = connector_views.receive_connector_view(config, connector, findings)
    return render(request, "receive_connector.html", {"c": view})


async def send_connector_page(request: Request) -> Response:
    """One send connector, read-only (Get-SendConnector | Format-List), with its queues."""
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    config = request.app.state.relay.config
    name = request.path_params["name"]
    connector = connector_views.find_send(config, name)
    if connector is None:
        return error_page(request, "Not found", f"No send connector named {name!r}.", 404)
    control: QueueControl = request.app.state.control
    view = connector_views.send_connector_view(
        config,
        connector,
        _findings(request, config),
        await control.queues(),
    )
    context = {"c": view, "queue_url": lambda q: "/queue?" + urlencode({"queue": q})}
    return render(request, "send_connector.html", context)


def web_routes() -> list[BaseRoute]:
    """The admin centre's routes, for `relaygate.admin.api.create_app`."""
    return [
        Route("/", dashboard, methods=["GET"]),
        Route("/queue", queue_page, methods=["GET"]),
        Route("/queue/bulk", queue_bulk, methods=["POST"]),
        Route("/queue/{identity}", message_page, methods=["GET"]),
        Route("/queue/{identity}/{action}", message_action, methods=["POST"]),
        Route("/queues/{identity}/retry", queue_retry, methods=["POST"]),
        Route("/explain", explain_page, methods=["GET"]),
        Route("/connectors/receive/{name:path}", receive_connector_page, methods=["GET"]),
        Route("/connectors/send/{name:path}", send_connector_page, methods=["GET"]),
        Route("/login", login_page, methods=["GET"]),
        Route("/login", login_submit, methods=["POST"]),
        Route("/logout", logout, methods=["POST"]),
        Mount("/static", app=StaticFiles(directory=STATIC_DIR), name="static"),
    ]
