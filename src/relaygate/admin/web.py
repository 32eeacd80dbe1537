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
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from relaygate.admin import connectors as connector_views
from relaygate.admin.api import (
    LOCKED_CHECK_INTERVAL,
    health_report,
    open_sessions,
    retry_after,
    user_send_as,
    user_unknown_in,
    users_without_send_as,
)
from relaygate.audit import SEVERITIES, Finding, audit, relay_grant, summary
from relaygate.config.model import Config, ReceiveConnector, SendConnector
from relaygate.config.values import parse_binding
from relaygate.control import (
    MAX_LIST_LIMIT,
    MESSAGE_STATUSES,
    Conflict,
    NotFound,
    QueueControl,
    bulk_filter_problem,
    normalise_id,
    queue_name,
)
from relaygate.delivery.oauth import auth_label
from relaygate.delivery.routing import DELIVERY_UNREACHABLE
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

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")
#: The session cookie's name, before the listener's port (`session_cookie`).
SESSION_COOKIE = "relaygate_admin_session"
QUEUE_PAGE_LIMIT = 500
MAX_FORM_BYTES = 64 * 1024
ACTIONS = ("retry", "suspend", "resume", "remove")
_DONE = {
    "retry": "Retry requested for",
    "suspend": "Suspended",
    "resume": "Resumed",
    "remove": "Removed",
    "remove-ndr": "Removed (with an NDR to the sender)",
}
_FINAL = ("Delivered", "Failed")
#: The bulk buttons of /queue (when a filter is set): action → what the notice says was done.
BULK_WEB_ACTIONS = {"suspend": "Suspended", "resume": "Resumed", "remove": "Removed (no NDR)"}
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_SPLIT_ADDRESSES = re.compile(r"[\s,;]+")


def _size(value: Any) -> str:
    n = float(value or 0)
    for unit in ("B", "KB", "MB"):
        if n < 1024 or unit == "MB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} MB"  # pragma: no cover


def _when(value: Any) -> str:
    """ISO 8601 UTC (``2025-01-02T03:04:05Z``) → ``2025-01-02 03:04:05 UTC``; None → ``—``."""
    if not value:
        return "—"
    text = str(value)
    return text.replace("T", " ").removesuffix("Z") + " UTC" if text.endswith("Z") else text


_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES_DIR),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)
_env.filters["size"] = _size
_env.filters["when"] = _when


def connector_url(kind: str, name: Any) -> str:
    """The page of the ``kind`` (``receive`` | ``send``) connector ``name``, URL-encoded."""
    return f"/connectors/{kind}/" + quote(str(name), safe="")


_env.globals["connector_url"] = connector_url


#: How long a sign-in lasts (the cookie's Max-Age, and checked on every request).
SESSION_LIFETIME = 12 * 3600


def session_value(token: str, issued: int | None = None) -> str:
    """The session cookie's value: when it was issued and an HMAC of that with the token as the
    key, so the cookie never holds the token, ends after SESSION_LIFETIME, and changing the token
    ends every session."""
    issued = int(time.time()) if issued is None else issued
    mac = hmac.new(
        token.encode(), b"relaygate admin centre session v2 %d" % issued, hashlib.sha256
    ).hexdigest()
    return f"{issued}.{mac}"


def _session_issued(token: str, value: str) -> int | None:
    """When a valid, live session cookie was issued; None for anything else."""
    issued_text, _, _mac = value.partition(".")
    if not issued_text.isascii() or not issued_text.isdigit() or len(issued_text) > 12:
        return None
    issued = int(issued_text)
    if not hmac.compare_digest(value.encode(), session_value(token, issued).encode()):
        return None
    if not -60 <= time.time() - issued < SESSION_LIFETIME:  # a minute of clock skew ahead
        return None
    return issued


def session_cookie(port: int | None) -> str:
    """The name of the session cookie of the admin listener on ``port``. Browsers keep cookies
    per host, not per port (RFC 6265 §8.5): with one name for all, signing in to a second
    relay's admin centre on the same host (127.0.0.1:8025 and :8026) replaced the first one's
    cookie and signed the browser out of it."""
    return f"{SESSION_COOKIE}_{port}" if port else SESSION_COOKIE


def _session_cookie(request: Request) -> str:
    """The session cookie's name for this listener: by the port it accepted ``request`` on."""
    server = request.scope.get("server")
    return session_cookie(server[1] if server else None)


def _signed_in(request: Request) -> bool:
    token: str | None = request.app.state.token
    if not token:
        return True
    given = request.cookies.get(_session_cookie(request), "")
    if given in request.app.state.signed_out:
        return False
    return _session_issued(token, given) is not None


def render(request: Request, template: str, context: dict[str, Any], status: int = 200) -> Response:
    relay = request.app.state.relay
    page = _env.get_template(template).render(
        server_name=str(relay.config.server.name),
        fqdn=str(relay.config.server.fqdn),
        path=request.url.path,
        session=bool(request.app.state.token) and _signed_in(request),
        **context,
    )
    return HTMLResponse(page, status_code=status, headers=_SECURITY_HEADERS)


def _message(request: Request, title: str, text: str, status: int) -> Response:
    return render(request, "message.html", {"title": title, "text": text}, status)


def error_page(request: Request, title: str, text: str, status: int) -> Response:
    """An error as a page of the admin centre (only for a signed-in user when a token is set)."""
    if not _signed_in(request):
        return _message(request, title, "The admin centre needs the API token.", status)
    return _message(request, title, text, status)


def _post_refused(request: Request) -> Response | None:
    """Same-origin only (the guard already refused a foreign Origin; here a POST without one is
    refused too), and signed in when a token is configured."""
    origin = request.headers.get("origin")
    host = request.headers.get("host", "").lower()
    if not origin or urlsplit(origin).netloc.lower() != host:
        return _message(
            request,
            "Refused",
            "Only the admin centre's own forms may change the queue (same-origin POST with an "
            "Origin header); scripts use the JSON API.",
            403,
        )
    site = request.headers.get("sec-fetch-site")
    if site is not None and site != "same-origin":
        return _message(request, "Refused", "cross-site request refused", 403)
    return None


def _login_redirect(request: Request) -> Response | None:
    if _signed_in(request):
        return None
    return RedirectResponse("/login", status_code=303)


async def _form(request: Request) -> dict[str, list[str]]:
    """An urlencoded form body (at most MAX_FORM_BYTES)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise ValueError("form too large")
    return parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)


# -- view data -------------------------------------------------------------------------------------


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


def _notice(request: Request) -> str | None:
    """The line shown after an action's redirect (only known verbs and a valid queue id)."""
    done = request.query_params.get("done", "")
    if done not in _DONE:
        return None
    identity = request.query_params.get("id") or request.path_params.get("identity", "")
    try:
        qid = normalise_id(identity)
    except NotFound:
        return None
    return f"{_DONE[done]} {request.app.state.relay.config.server.name}\\{qid}."


# -- handlers --------------------------------------------------------------------------------------


def _certificates(request: Request) -> Any:
    """The relay's certificate expiry dates (read at start and reload) for the audit findings."""
    return getattr(request.app.state.relay, "certificates", ())


def _findings(request: Request, config: Config) -> list[Finding]:
    """`relaygate audit`'s findings for `config`, with the certificates and the users file as the
    relay last read them (no I/O here)."""
    relay = request.app.state.relay
    return audit(
        config,
        certificates=_certificates(request),
        users_without_send_as=users_without_send_as(relay),
    )


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


#: The query parameters of /queue, as the API names them, and list_page's argument for each.
_QUEUE_FILTERS = (
    ("status", "status"),
    ("from", "sender"),
    ("to", "recipient"),
    ("queue", "queue"),
)


def _queue_notice(request: Request, queues: list[dict[str, Any]]) -> str | None:
    """The line shown after a queue's Retry button (known verb, count in digits), naming the
    queue only when it is one of ``queues`` (Get-Queue now) or Unreachable: the name comes from
    the URL, and any text there was shown as the admin centre's own notice, so a link could
    put "... your token has expired, run ..." in it."""
    q = request.query_params
    count = q.get("count", "")
    if q.get("done") != "retry-queue" or not (count.isascii() and count.isdigit()):
        return None
    server = str(request.app.state.relay.config.server.name)
    try:
        name = queue_name(q.get("queue", ""), server)
    except ValueError:
        return None
    known = {str(v["NextHopDomain"]).lower() for v in queues} | {DELIVERY_UNREACHABLE.lower()}
    if name.lower() not in known:  # delivered since, or not a queue
        return f"Retry requested for {int(count)} message(s)."
    return f"Retry requested for {int(count)} message(s) in {server}\\{name}."


async def queue_page(request: Request) -> Response:
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    control: QueueControl = request.app.state.control
    q = request.query_params
    form = {param: (q.get(param) or "").strip() for param, _arg in _QUEUE_FILTERS}
    after = (q.get("after") or "").strip()
    text = (q.get("limit") or "").strip()
    limit = QUEUE_PAGE_LIMIT
    error, code = None, 200
    if text:
        if (
            text.isascii()
            and text.isdigit()
            and len(text) <= 6
            and 1 <= int(text) <= QUEUE_PAGE_LIMIT
        ):
            limit = int(text)
        else:
            error, code = f"limit must be a whole number from 1 to {QUEUE_PAGE_LIMIT}", 400
    messages: list[dict[str, Any]] = []
    next_url = None
    if error is None:
        args = {arg: form[param] or None for param, arg in _QUEUE_FILTERS}
        try:
            page = await control.list_page(limit=limit, after=after or None, **args)
        except ValueError as exc:
            error, code = str(exc), 400
        else:
            messages = page.messages
            if page.next_after is not None:
                kept = [(k, v) for k, v in form.items() if v]
                if text:
                    kept.append(("limit", str(limit)))
                next_url = "/queue?" + urlencode([*kept, ("after", page.next_after)])
    first_url = "/queue?" + urlencode([(k, v) for k, v in form.items() if v]) if after else None
    queues = await control.queues()
    context = {
        "messages": messages,
        "queues": queues["queues"],
        "form": form,
        "status": form["status"],
        "statuses": MESSAGE_STATUSES,
        "after": after,
        "next_url": next_url,
        "first_url": first_url,
        "queue_url": lambda name: "/queue?" + urlencode({"queue": name}),
        "queue_path": lambda identity: "/queues/" + quote(identity, safe="") + "/retry",
        "notice": (
            _notice(request) or _queue_notice(request, queues["queues"]) or _bulk_notice(request)
        ),
        "filtered": any(form.values()),
        # the bulk buttons only where bulk would take these filters (not `from = *` alone)
        "bulk_problem": bulk_filter_problem(
            "action", **{arg: form[param] or None for param, arg in _QUEUE_FILTERS}
        ),
        "error": error,
        "final": _FINAL,
    }
    return render(request, "queue.html", context, code)


def _bulk_notice(request: Request) -> str | None:
    """The line shown after a bulk button (known action, counts in digits)."""
    q = request.query_params
    action = q.get("bulk", "")
    counts = [q.get(k, "") for k in ("n", "matched", "skipped")]
    if action not in BULK_WEB_ACTIONS or not all(c.isascii() and c.isdigit() for c in counts):
        return None
    done, matched, skipped = (int(c) for c in counts)
    line = f"{BULK_WEB_ACTIONS[action]} {done} of {matched} matching message(s)."
    if skipped:
        line += (
            f" {skipped} skipped (being delivered now, or already in that state: "
            "`relaygate queue` or the API list them with the reason)."
        )
    if q.get("more") == "1":
        line += f" More than {MAX_LIST_LIMIT} matched: press the button again for the rest."
    return line


async def queue_bulk(request: Request) -> Response:
    """The Suspend all / Resume all / Remove all buttons of a filtered /queue."""
    if not _signed_in(request):
        return _message(request, "Sign in first", "The admin centre needs the API token.", 401)
    if (refused := _post_refused(request)) is not None:
        return refused
    try:
        form = await _form(request)
    except ValueError as exc:
        return _message(request, "Bad request", str(exc), 413)

    def field(name: str) -> str:
        return form.get(name, [""])[0].strip()

    action = field("action")
    if action not in BULK_WEB_ACTIONS:
        return _message(request, "Bad request", f"unknown action {action!r}", 400)
    if field("confirm") != "yes":
        return _message(
            request, "Not confirmed", "Tick the box: it acts on every matching message.", 400
        )
    filters = {param: field(param) for param, _arg in _QUEUE_FILTERS}
    control: QueueControl = request.app.state.control
    try:
        body = await control.bulk(
            action,
            status=filters["status"] or None,
            sender=filters["from"] or None,
            recipient=filters["to"] or None,
            queue=filters["queue"] or None,
        )
    except ValueError as exc:
        return _message(request, "Bad request", str(exc), 400)
    query = [
        *((k, v) for k, v in filters.items() if v),
        ("bulk", action),
        ("n", str(body["done"])),
        ("matched", str(body["matched"])),
        ("skipped", str(len(body["skipped"]))),
        ("more", "1" if body["limit_reached"] else "0"),
    ]
    return RedirectResponse("/queue?" + urlencode(query), status_code=303)


async def queue_retry(request: Request) -> Response:
    """The Retry button of a delivery queue (Retry-Queue; -Resubmit on Unreachable)."""
    if not _signed_in(request):
        return _message(request, "Sign in first", "The admin centre needs the API token.", 401)
    if (refused := _post_refused(request)) is not None:
        return refused
    control: QueueControl = request.app.state.control
    try:
        done = await control.retry_queue(request.path_params["identity"])
    except NotFound as exc:
        return _message(request, "Not found", str(exc.args[0]) if exc.args else "not found", 404)
    query = {"done": "retry-queue", "queue": done["NextHopDomain"], "count": done["RetriedCount"]}
    return RedirectResponse("/queue?" + urlencode(query), status_code=303)


async def message_page(request: Request) -> Response:
    if (redirect := _login_redirect(request)) is not None:
        return redirect
    control: QueueControl = request.app.state.control
    try:
        message = await control.show(request.path_params["identity"])
    except NotFound as exc:
        return _message(request, "Not found", str(exc), 404)
    context = {"m": message, "notice": _notice(request), "final": _FINAL}
    return render(request, "message_detail.html", context)


async def message_action(request: Request) -> Response:
    if not _signed_in(request):
        return _message(request, "Sign in first", "The admin centre needs the API token.", 401)
    if (refused := _post_refused(request)) is not None:
        return refused
    identity, action = request.path_params["identity"], request.path_params["action"]
    if action not in ACTIONS:
        return _message(request, "Not found", f"unknown action {action!r}", 404)
    try:
        form = await _form(request)
    except ValueError as exc:
        return _message(request, "Bad request", str(exc), 413)
    with_ndr = action == "remove" and form.get("with_ndr", [""])[0] == "true"
    control: QueueControl = request.app.state.control
    try:
        qid = normalise_id(identity)
        if action == "remove":
            await control.remove(qid, with_ndr=with_ndr)
        else:
            await getattr(control, action)(qid)
    except NotFound as exc:
        return _message(request, "Not found", str(exc.args[0]) if exc.args else "not found", 404)
    except Conflict as exc:
        return _message(request, "Not possible", str(exc), 409)
    done = "remove-ndr" if with_ndr else action
    if action != "remove" and form.get("back", [""])[0] == "message":
        url = f"/queue/{qid}?{urlencode({'done': done})}"
    else:
        url = f"/queue?{urlencode({'done': done, 'id': qid})}"
    return RedirectResponse(url, status_code=303)


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


async def login_page(request: Request) -> Response:
    if not request.app.state.token:
        return RedirectResponse("/", status_code=303)
    return render(request, "login.html", {"error": None})


async def login_submit(request: Request) -> Response:
    token: str | None = request.app.state.token
    if not token:
        return RedirectResponse("/", status_code=303)
    if (refused := _post_refused(request)) is not None:
        return refused
    try:
        given = (await _form(request)).get("token", [""])[0].strip()
    except ValueError as exc:
        return _message(request, "Bad request", str(exc), 413)
    guesses = request.app.state.token_guesses
    client = request.client.host if request.client else ""
    # Blocked for too many wrong tokens (this address may be shared: every local user's is
    # 127.0.0.1): the token is still checked, at a low rate (`TokenGuesses.take_check`).
    blocked = guesses.blocked(client)
    if blocked and given and (wait := guesses.take_check(client)) > 0:
        return _too_many_guesses_page(request, wait)
    if not hmac.compare_digest(given.encode(), token.encode()):
        guesses.wrong(client)
        if blocked:
            return _too_many_guesses_page(request, LOCKED_CHECK_INTERVAL)
        return render(request, "login.html", {"error": "wrong token"}, 401)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        _session_cookie(request),
        session_value(token),
        max_age=SESSION_LIFETIME,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


def _too_many_guesses_page(request: Request, wait: float) -> Response:
    """The sign-in page's 429 while this address is blocked for wrong tokens; ``wait``: the
    seconds until its next token is checked."""
    seconds = retry_after(wait)
    error = (
        "too many wrong tokens from this address (its IPv6 /64, or any loopback address): "
        f"one is checked every {LOCKED_CHECK_INTERVAL:g} s; try again in {seconds} s"
    )
    response = render(request, "login.html", {"error": error}, 429)
    response.headers["Retry-After"] = str(seconds)
    return response


async def logout(request: Request) -> Response:
    if (refused := _post_refused(request)) is not None:
        return refused
    token: str | None = request.app.state.token
    given = request.cookies.get(_session_cookie(request), "")
    if token and _session_issued(token, given) is not None:
        # Signed out for good, not only in this browser: a copy of the cookie stops working too.
        # Kept until it would have ended anyway (this process's memory: a restart forgets it).
        signed_out: dict[str, int] = request.app.state.signed_out
        now = time.time()
        for value, issued in list(signed_out.items()):
            if now - issued >= SESSION_LIFETIME:
                del signed_out[value]
        signed_out[given] = _session_issued(token, given) or 0
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(_session_cookie(request), path="/")
    return response


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
