"""The API's JSON: its error body (`_error`) and values rendered as JSONResponse renders them
(`_json`).

Apart because the guard, the token checks, the parameters and the routes all answer with them."""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

#: Messages of a /api/queue page rendered to JSON between two turns of the event loop.
_JSON_CHUNK = 500


def _json(value: Any) -> str:
    """``value`` as JSONResponse renders it."""
    return json.dumps(
        value, ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status)
