"""What every page of the web admin centre (relaygate.admin.web) uses: the Jinja2 templates
and their filters, `render` with the security headers, the error pages, the session cookie
(its HMAC value, name and lifetime) and the checks every POST and page goes through (the
refusal of a POST from another site, the sign-in redirect, the bounded form read).

Separate from the pages so that each group of pages (web.py, web_queue.py, web_login.py)
imports the same checks without importing the others.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

TEMPLATES_DIR = Path(__file__).with_name("templates")
STATIC_DIR = Path(__file__).with_name("static")
#: The session cookie's name, before the listener's port (`session_cookie`).
SESSION_COOKIE = "relaygate_admin_session"
MAX_FORM_BYTES = 64 * 1024
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
