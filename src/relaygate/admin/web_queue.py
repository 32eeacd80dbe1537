"""The queue pages of the web admin centre (relaygate.admin.web): /queue (the delivery
queues, then a page of messages with their filters and the bulk buttons), one message, and
the actions on them (retry, suspend, resume, remove, bulk), which call
`relaygate.control.QueueControl` and redirect back with a notice.

Separate from web.py because the queue is the one part of the admin centre that changes
anything besides a sign-in.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlencode

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from relaygate.admin.web_common import (
    _form,
    _login_redirect,
    _message,
    _post_refused,
    _signed_in,
    render,
)
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
from relaygate.delivery.routing import DELIVERY_UNREACHABLE

QUEUE_PAGE_LIMIT = 500
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
