"""Two questions several groups of rules ask of a value: was the key given in the file
(`_given`), and is this text an address (`_not_an_address`).

Apart so that the receive connector, send connector, server and queue rules share them without
importing one another."""

from __future__ import annotations

from typing import Any

from relaygate import replies
from relaygate.addresses import AddressError, parse_path


def _given(raw: dict[str, Any], key: str) -> bool:
    """The file gave `key` a non-empty value (its bad entries were reported by the loader already)."""
    value = raw.get(key)
    return bool(value.strip()) if isinstance(value, str) else bool(value)


def _not_an_address(text: str) -> str | None:
    """None when `text` is a mail address (name@domain), else why not (": reason" or "")."""
    try:
        address = parse_path(
            f"<{text}>",
            allow_null=False,
            allow_postmaster=False,
            error=replies.UNRECOGNIZED_COMMAND,
        )
        why = "" if address is None or address.domain else ": no domain"
    except AddressError as exc:
        address, why = None, f": {exc.reason}"
    return None if address is not None and address.domain else why
