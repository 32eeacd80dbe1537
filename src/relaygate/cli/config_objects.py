"""The config objects the connectors-as-code verbs edit, and how they are shown.

A `Kind` names one `[[array]]` of the config file (receive connectors, send connectors, accepted
domains) with its model class. This module finds objects of a kind by name and presents them: JSON
values, text values (as Get-* | Format-List would), the `show` table, the difference between two
versions of an object, and the common shape of a `list` verb.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from relaygate.address_patterns import AddressRule
from relaygate.audit import relay_grant
from relaygate.cli.common import console, die, emit_json
from relaygate.cli.tables import print_narrow_hint
from relaygate.config import model as m
from relaygate.config import values as v

__all__ = [
    "DOMAIN",
    "RECEIVE",
    "SEND",
    "Kind",
    "change_lines",
    "default_of",
    "diff",
    "field_hint",
    "find",
    "find_obj",
    "json_value",
    "model_field",
    "norm_name",
    "obj_json",
    "print_listing",
    "print_object",
    "text_value",
]


@dataclasses.dataclass(frozen=True)
class Kind:
    array: str
    cls: type
    label: str
    key: str = "name"
    # fields never offered as flags: edited by their own verbs or creation-only
    hidden: frozenset[str] = frozenset()
    creation_only: frozenset[str] = frozenset()


RECEIVE = Kind(
    "receive_connectors",
    m.ReceiveConnector,
    "receive connector",
    hidden=frozenset({"name", "permissions"}),
    creation_only=frozenset({"usage", "transport_role"}),
)
SEND = Kind("send_connectors", m.SendConnector, "send connector", hidden=frozenset({"name"}))
DOMAIN = Kind(
    "accepted_domains",
    m.AcceptedDomain,
    "accepted domain",
    key="domain",
    hidden=frozenset({"domain"}),
)


# -- the model's fields -------------------------------------------------------------------------------


def model_field(kind: Kind, field: str) -> dataclasses.Field[Any]:
    return next(f for f in dataclasses.fields(kind.cls) if f.name == field)


def field_hint(kind: Kind, field: str) -> Any:
    return _type_hints(kind.cls)[field]


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Once per model class: get_type_hints evaluates every field's annotation string (the model
    # uses `from __future__ import annotations`), and the verbs' options ask for hundreds of fields.
    return typing.get_type_hints(cls)


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


# -- finding objects ----------------------------------------------------------------------------------


def norm_name(name: str) -> str:
    """A name or domain as the verbs compare it: case-insensitive, no trailing dot."""
    return name.strip().lower().rstrip(".")


def find_obj(items: Iterable[Any] | None, key: str, name: str) -> Any:
    """The object of `items` whose `key` is `name`: spelled as given (any case) first, else both
    sides compared as `norm_name` ("Relay." and "Relay" can be two connectors), or None."""
    candidates = list(items or ())
    for same in (str.lower, norm_name):
        wanted = same(name)
        for obj in candidates:
            if same(str(getattr(obj, key))) == wanted:
                return obj
    return None


def find(kind: Kind, config: m.Config, name: str) -> Any:
    """The object of `kind` named `name`, or exit 1 naming the ones there are."""
    items = getattr(config, kind.array)
    obj = find_obj(items, kind.key, name)
    if obj is not None:
        return obj
    names = ", ".join(repr(getattr(o, kind.key)) for o in items) or "none"
    die(f"no {kind.label} named {name!r} (have: {names})")


# -- values -------------------------------------------------------------------------------------------


def json_value(value: Any) -> Any:
    if isinstance(value, timedelta):
        return v.format_timespan(value)
    if isinstance(value, v.Binding):
        return str(value)
    if isinstance(value, v.IPRange | AddressRule):
        return value.text
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, m.Permission):
        return {
            "user": value.user,
            "extended_rights": list(value.extended_rights),
            "deny": value.deny,
        }
    if isinstance(value, tuple | list):
        return [json_value(x) for x in value]
    return value


def text_value(kind: Kind, field: str, value: Any) -> str:
    if value is None:
        if int in typing.get_args(field_hint(kind, field)):
            return "unlimited"
        return "(not set)"
    if model_field(kind, field).metadata.get("parse") is v.parse_size and isinstance(value, int):
        return f"{v.format_size(value)} ({value:,} bytes)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, m.Permission):
        verb = "deny" if value.deny else "allow"
        return f"{value.user}: {verb} {', '.join(value.extended_rights)}"
    if isinstance(value, tuple | list):
        return (
            ", ".join(
                text_value(kind, field, x) if isinstance(x, m.Permission) else str(json_value(x))
                for x in value
            )
            or "(none)"
        )
    if value == "":
        return '""'
    return str(json_value(value))


# -- objects ------------------------------------------------------------------------------------------


def obj_json(kind: Kind, obj: Any, config: m.Config | None = None) -> dict[str, Any]:
    data = {f.name: json_value(getattr(obj, f.name)) for f in dataclasses.fields(kind.cls)}
    if kind is RECEIVE and config is not None:
        grant = relay_grant(obj)
        data = {"identity": f"{config.server.name}\\{obj.name}", **data}
        data["relay"] = {
            "anonymous": grant.anonymous,
            "method_a": list(grant.method_a),
            "method_b": grant.method_b,
            "authenticated": grant.authenticated,
            "description": grant.describe(),
        }
    return data


def print_object(kind: Kind, obj: Any, config: m.Config) -> None:
    title = (
        f"{kind.label.capitalize()} {config.server.name}\\{obj.name}"
        if kind is RECEIVE
        else f"{kind.label.capitalize()} {getattr(obj, kind.key)}"
    )
    table = Table(title=escape(title), title_justify="left", header_style="bold", show_header=True)
    table.add_column("Key", no_wrap=True)
    table.add_column("Value", overflow="fold")
    for f in dataclasses.fields(kind.cls):
        table.add_row(Text(f.name), Text(text_value(kind, f.name, getattr(obj, f.name))))
    if kind is RECEIVE:
        table.add_row(Text("(relay)", style="bold"), Text(relay_grant(obj).describe()))
    console.print(table)


def print_listing(
    json_out: bool,
    rows: list[Any],
    empty: str,
    make_table: Callable[[], Table],
    *,
    narrow_layout: bool = True,
) -> None:
    """What a `list` verb prints: the rows as JSON, `empty` when there are none, else the table.
    `narrow_layout`: the table is a `tables.list_table`, which a narrow terminal cuts (and the
    hint after it says so); a table that shows everything at any width gets no hint."""
    if json_out:
        emit_json(rows)
        return
    if not rows:
        console.print(empty, markup=False)
        return
    console.print(make_table())
    if narrow_layout:
        print_narrow_hint()


def diff(kind: Kind, before: Any, after: Any) -> dict[str, dict[str, Any]]:
    changes: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(kind.cls):
        old = getattr(before, f.name) if before is not None else None
        new = getattr(after, f.name) if after is not None else None
        if old != new:
            changes[f.name] = {"from": json_value(old), "to": json_value(new)}
    return changes


def change_lines(kind: Kind, before: Any, after: Any) -> str:
    lines = []
    for f in dataclasses.fields(kind.cls):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old != new:
            lines.append(
                f"\n  {f.name}: {text_value(kind, f.name, old)} → {text_value(kind, f.name, new)}"
            )
    return "".join(lines)
