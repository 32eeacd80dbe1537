"""The query parameters of the state-changing routes: those a route does not read (a 400), the
boolean flags (``dry_run``, ``with_ndr``).

Apart from the routes: each rule here is one a bulk remove or a single remove relies on."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import unquote_plus

from starlette.requests import Request
from starlette.responses import Response

from relaygate.admin.api_json import _error

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
