"""Signing in to and out of the web admin centre (relaygate.admin.web), when
admin.api_token_file is set: /login takes the API token and sets the session cookie, a client
that guessed wrong too often waits, /logout ends the session everywhere.

Separate from the pages: it is the one place that reads the token from a form.
"""

from __future__ import annotations

import hmac
import time

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relaygate.admin.api import LOCKED_CHECK_INTERVAL, retry_after
from relaygate.admin.web_common import (
    SESSION_LIFETIME,
    _form,
    _message,
    _post_refused,
    _session_cookie,
    _session_issued,
    render,
    session_value,
)


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
