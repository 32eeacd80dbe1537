"""Command-line flags generated from the config model, and applying them to a TOML table.

Every field of a kind that is not hidden gets a flag: the kebab case of its TOML key, which is the
snake case of Exchange's parameter (`--remote-ip-ranges`, `--max-message-size`, ...). Booleans get
`--KEY/--no-KEY`; multi-valued keys take `--KEY` (replace: repeat the flag or separate with commas),
`--add-KEY` and `--remove-KEY`; an empty value (`--banner ""`) removes the key so the default applies
again. Commands with generated flags are built from `inspect.Parameter`s with `command`.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from tomlkit.items import Array
from tomlkit.items import Table as TomlTable

from relaygate.address_patterns import parse_address_rule
from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION
from relaygate.cli.config_objects import (
    RECEIVE,
    Kind,
    default_of,
    field_hint,
    model_field,
    text_value,
)
from relaygate.config import edit as ed
from relaygate.config import values as v

__all__ = [
    "apply_options",
    "command",
    "common_params",
    "keyword_option",
    "name_argument",
    "option_params",
    "split",
]

_LIST_PANEL = "Multi-valued (--KEY replaces; --add-KEY / --remove-KEY edit entries)"
_SETTINGS_PANEL = "Settings"

_ACRONYMS = {"ip": "IP", "ehlo": "EHLO", "dns": "DNS", "tls": "Tls", "xoauth2": "XOAUTH2"}
_EXCHANGE_NAMES = {
    "require_tls": "RequireTLS",
    "fqdn": "Fqdn",
    "dns_routing_enabled": "DNSRoutingEnabled",
}


def _exchange_name(field: str) -> str:
    return _EXCHANGE_NAMES.get(field) or "".join(
        _ACRONYMS.get(p, p.capitalize()) for p in field.split("_")
    )


def _editable_fields(kind: Kind, *, creating: bool) -> list[dataclasses.Field[Any]]:
    """The fields offered as flags: not hidden, and creation-only ones only when creating."""
    return [
        f
        for f in dataclasses.fields(kind.cls)
        if f.name not in kind.hidden and (creating or f.name not in kind.creation_only)
    ]


def _shape(kind: Kind, field: str) -> str:
    hint = field_hint(kind, field)
    if typing.get_origin(hint) is tuple:
        return "list"
    if hint is bool:
        return "bool"
    return "scalar"


def _field_help(kind: Kind, f: dataclasses.Field[Any]) -> str:
    choices = f.metadata.get("choices", ())
    text = _exchange_name(f.name)
    if choices:
        text += f": {' | '.join(choices)}"
    text += f". Default: {text_value(kind, f.name, default_of(f))}."
    if f.name in kind.creation_only:
        text += " Set at creation only (as in Exchange)."
    return text


# -- building commands ------------------------------------------------------------------------------


def keyword_option(
    name: str, decls: str, help_text: str, annotation: Any, panel: str | None = None
) -> inspect.Parameter:
    """A keyword parameter for `command`: an option that defaults to None (not given)."""
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=typer.Option(None, decls, help=help_text, rich_help_panel=panel),
        annotation=annotation,
    )


def name_argument(name: str, help_text: str, *, required: bool = True) -> inspect.Parameter:
    """The positional NAME argument of a generated command."""
    return inspect.Parameter(
        name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(... if required else None, metavar="NAME", help=help_text),
        annotation=str if required else str | None,
    )


def option_params(kind: Kind, *, creating: bool) -> list[inspect.Parameter]:
    """The generated flags of `kind`, in the model's field order."""
    params: list[inspect.Parameter] = []
    for f in _editable_fields(kind, creating=creating):
        shape = _shape(kind, f.name)
        flag = "--" + f.name.replace("_", "-")
        help_text = _field_help(kind, f)
        if shape == "list":
            params += [
                keyword_option(
                    f.name, flag, help_text + " Replaces the list.", list[str] | None, _LIST_PANEL
                ),
                keyword_option(
                    f"add_{f.name}",
                    f"--add-{flag[2:]}",
                    f"Add entries to {f.name}.",
                    list[str] | None,
                    _LIST_PANEL,
                ),
                keyword_option(
                    f"remove_{f.name}",
                    f"--remove-{flag[2:]}",
                    f"Remove entries from {f.name}.",
                    list[str] | None,
                    _LIST_PANEL,
                ),
            ]
        elif shape == "bool":
            params.append(
                keyword_option(
                    f.name, f"{flag}/--no-{flag[2:]}", help_text, bool | None, _SETTINGS_PANEL
                )
            )
        else:
            params.append(
                keyword_option(
                    f.name,
                    flag,
                    help_text + ' "" resets to the default.',
                    str | None,
                    _SETTINGS_PANEL,
                )
            )
    return params


def common_params() -> list[inspect.Parameter]:
    """--config and --json, last on every generated command."""
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config", kw, default=CONFIG_OPTION, annotation=Path | None),
        inspect.Parameter("json_out", kw, default=JSON_OPTION, annotation=bool),
    ]


def command(
    impl: Callable[..., None], params: list[inspect.Parameter], doc: str
) -> Callable[..., None]:
    """A function typer can register whose parameters are `params`; it calls `impl(**kwargs)`."""

    def command(**kwargs: Any) -> None:
        impl(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


# -- applying the flags ---------------------------------------------------------------------------------

_INT = re.compile(r"^\s*\d+\s*$")


def _scalar_toml(kind: Kind, field: str, text: str) -> Any:
    """A flag's text → the TOML value to write; "" → None (remove the key: the default applies).
    Values the loader rejects are written as given so the refusal names the key as `check` does."""
    if text == "":
        return None
    hint = field_hint(kind, field)
    args = typing.get_args(hint)
    meta_parse = model_field(kind, field).metadata.get("parse")
    if (hint is int or int in args or meta_parse is v.parse_size) and _INT.match(text):
        return int(text)
    return text


def split(values: list[str] | None) -> list[str]:
    """Repeated and comma-separated flag values as one list of entries."""
    out: list[str] = []
    for value in values or []:
        out.extend(part.strip() for part in value.split(",") if part.strip())
    return out


def _entry_key(field: str, text: str) -> tuple[Any, ...]:
    try:
        if field in ("remote_ip_ranges", "trusted_proxies"):
            r = v.parse_ip_range(text)
            return ("ip", r.version, r.first, r.last)
        if field == "bindings":
            b = v.parse_binding(text)
            return ("binding", b.address, b.port)
        if field in ("allowed_senders", "allowed_recipients"):
            return ("address", parse_address_rule(text).text)
    except ValueError:
        pass
    return ("text", text.strip().lower())


def _effective_list(kind: Kind, table: TomlTable, field: str) -> list[str]:
    """The current entries of a multi-valued key, including the usage-seeded or model default."""
    if field in table:
        return ed.list_value(table, field)
    if kind is RECEIVE:
        from relaygate.config.loader import _seed_usage

        seeded = _seed_usage(dict(table.unwrap()))
        if field in seeded:
            value = seeded[field]
            return [str(x) for x in value] if isinstance(value, list) else [str(value)]
    default = default_of(model_field(kind, field))
    return [str(x.text if isinstance(x, v.IPRange) else x) for x in default or ()]


def _edit_list(kind: Kind, table: TomlTable, name: str, opts: dict[str, Any]) -> bool:
    """Apply --KEY / --add-KEY / --remove-KEY of a multi-valued key; False if none was given."""
    replace = opts.get(name)
    add = split(opts.get(f"add_{name}"))
    remove = split(opts.get(f"remove_{name}"))
    if replace is None and not add and not remove:
        return False
    current = split(replace) if replace is not None else _effective_list(kind, table, name)
    # Edit an existing TOML array in place so comments on its entries survive.
    existing = table.get(name) if replace is None else None
    in_place = existing if isinstance(existing, Array) else None
    keys = [_entry_key(name, x) for x in current]
    for entry in add:
        if _entry_key(name, entry) not in keys:
            current.append(entry)
            keys.append(_entry_key(name, entry))
            if in_place is not None:
                in_place.append(entry)
    for entry in remove:
        k = _entry_key(name, entry)
        if k not in keys:
            have = ", ".join(current) or "(empty)"
            raise ed.EditError(f"{entry!r} is not in {name} (have: {have}); nothing changed")
        # Every spelling of it ("10.0.0.5" and "10.0.0.5/32"): one left behind still grants.
        for idx in reversed([i for i, key in enumerate(keys) if key == k]):
            del current[idx], keys[idx]
            if in_place is not None:
                del in_place[idx]
    if in_place is None:
        ed.set_key(table, name, current)
    return True


def apply_options(
    kind: Kind, table: TomlTable, opts: dict[str, Any], *, creating: bool = False
) -> list[str]:
    """Apply the generated flags to `table`; returns the keys touched."""
    touched: list[str] = []
    for f in _editable_fields(kind, creating=creating):
        name = f.name
        shape = _shape(kind, name)
        if shape == "list":
            if _edit_list(kind, table, name, opts):
                touched.append(name)
            continue
        value = opts.get(name)
        if value is None:
            continue
        ed.set_key(table, name, bool(value) if shape == "bool" else _scalar_toml(kind, name, value))
        touched.append(name)
    return touched
