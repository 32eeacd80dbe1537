"""Connectors as code: `connector`, `permission`, `domain` and `send-connector` verbs.

Get-/New-/Set-/Remove-ReceiveConnector, Add-ADPermission, *-AcceptedDomain and *-SendConnector as
commands that edit the config file. The flags are generated from the model's fields (kebab case of the
TOML key, which is the snake case of Exchange's parameter), so every key has a flag:
`--remote-ip-ranges`, `--max-message-size`, `--require-tls/--no-require-tls`, ...
Multi-valued keys take `--KEY` (replace: repeat the flag or separate with commas), `--add-KEY` and
`--remove-KEY`. An empty value (`--banner ""`) removes the key so the default applies again.

Every edit goes through `relaygate.config.edit`: comments and layout survive, the result is validated
as `relaygate check` validates it (a refused edit prints check's messages and leaves the file
byte-identical), and the write is atomic.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text
from tomlkit.items import Array
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.audit import relay_grant
from relaygate.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    console,
    die,
    emit_json,
    err_console,
    load_or_exit,
)
from relaygate.config import ConfigError, default_config_path
from relaygate.config import edit as ed
from relaygate.config import model as m
from relaygate.config import values as v
from relaygate.config.loader import DEFAULT_PATH
from relaygate.policy.rights import (
    EXTENDED_RIGHTS,
    EXTERNALLY_SECURED,
    GROUP_GRANTS,
    is_externally_secured,
)

__all__ = ["register"]

_LIST_PANEL = "Multi-valued (--KEY replaces; --add-KEY / --remove-KEY edit entries)"
_SETTINGS_PANEL = "Settings"


# -- the object kinds the verbs edit ----------------------------------------------------------------


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


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _fields(kind: Kind) -> list[dataclasses.Field[Any]]:
    return [f for f in dataclasses.fields(kind.cls) if f.name not in kind.hidden]


def _hint(kind: Kind, field: str) -> Any:
    return typing.get_type_hints(kind.cls)[field]


def _shape(kind: Kind, field: str) -> str:
    hint = _hint(kind, field)
    if typing.get_origin(hint) is tuple:
        return "list"
    if hint is bool:
        return "bool"
    return "scalar"


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _field_help(kind: Kind, f: dataclasses.Field[Any]) -> str:
    default = _default_of(f)
    choices = f.metadata.get("choices", ())
    text = _exchange_name(f.name)
    if choices:
        text += f": {' | '.join(choices)}"
    shown = _text_value(kind, f.name, default)
    text += f". Default: {shown}."
    if f.name in kind.creation_only:
        text += " Set at creation only (as in Exchange)."
    return text


# -- value conversion ----------------------------------------------------------------------------------

_INT = re.compile(r"^\s*\d+\s*$")


def _scalar_toml(kind: Kind, field: str, text: str) -> Any:
    """A flag's text → the TOML value to write; "" → None (remove the key: the default applies).
    Values the loader rejects are written as given so the refusal names the key as `check` does."""
    if text == "":
        return None
    hint = _hint(kind, field)
    args = typing.get_args(hint)
    meta_parse = next(
        (f.metadata.get("parse") for f in dataclasses.fields(kind.cls) if f.name == field), None
    )
    if (hint is int or int in args or meta_parse is v.parse_size) and _INT.match(text):
        return int(text)
    return text


def _split(values: list[str] | None) -> list[str]:
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
    f = next(f for f in dataclasses.fields(kind.cls) if f.name == field)
    return [str(x.text if isinstance(x, v.IPRange) else x) for x in _default_of(f) or ()]


def _apply_options(
    kind: Kind, table: TomlTable, opts: dict[str, Any], *, creating: bool = False
) -> list[str]:
    """Apply the generated flags to `table`; returns the keys touched."""
    touched: list[str] = []
    for f in _fields(kind):
        name = f.name
        if name in kind.creation_only and not creating:
            continue
        shape = _shape(kind, name)
        if shape == "list":
            replace = opts.get(name)
            add = _split(opts.get(f"add_{name}"))
            remove = _split(opts.get(f"remove_{name}"))
            if replace is None and not add and not remove:
                continue
            current = _split(replace) if replace is not None else _effective_list(kind, table, name)
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
                    raise ed.EditError(
                        f"{entry!r} is not in {name} (have: {have}); nothing changed"
                    )
                idx = keys.index(k)
                del current[idx], keys[idx]
                if in_place is not None:
                    del in_place[idx]
            if in_place is None:
                ed.set_key(table, name, current)
            touched.append(name)
        elif shape == "bool":
            value = opts.get(name)
            if value is None:
                continue
            ed.set_key(table, name, bool(value))
            touched.append(name)
        else:
            value = opts.get(name)
            if value is None:
                continue
            ed.set_key(table, name, _scalar_toml(kind, name, value))
            touched.append(name)
    return touched


# -- presenting model objects -------------------------------------------------------------------------


def _json_value(value: Any) -> Any:
    if isinstance(value, timedelta):
        return v.format_timespan(value)
    if isinstance(value, v.Binding):
        return str(value)
    if isinstance(value, v.IPRange):
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
        return [_json_value(x) for x in value]
    return value


def _text_value(kind: Kind, field: str, value: Any) -> str:
    hint = _hint(kind, field)
    f = next(f for f in dataclasses.fields(kind.cls) if f.name == field)
    if value is None:
        if int in typing.get_args(hint):
            return "unlimited"
        return "(not set)"
    if f.metadata.get("parse") is v.parse_size and isinstance(value, int):
        return f"{v.format_size(value)} ({value:,} bytes)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, m.Permission):
        verb = "deny" if value.deny else "allow"
        return f"{value.user}: {verb} {', '.join(value.extended_rights)}"
    if isinstance(value, tuple | list):
        return (
            ", ".join(
                _text_value(kind, field, x) if isinstance(x, m.Permission) else str(_json_value(x))
                for x in value
            )
            or "(none)"
        )
    if value == "":
        return '""'
    return str(_json_value(value))


def _obj_json(kind: Kind, obj: Any, config: m.Config | None = None) -> dict[str, Any]:
    data = {f.name: _json_value(getattr(obj, f.name)) for f in dataclasses.fields(kind.cls)}
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


def _find(kind: Kind, config: m.Config, name: str) -> Any:
    items = getattr(config, kind.array)
    norm = name.strip().lower().rstrip(".")
    for obj in items:
        if str(getattr(obj, kind.key)).lower() == norm:
            return obj
    names = ", ".join(repr(getattr(o, kind.key)) for o in items) or "none"
    die(f"no {kind.label} named {name!r} (have: {names})")


def _print_object(kind: Kind, obj: Any, config: m.Config) -> None:
    title = (
        f"{kind.label.capitalize()} {config.server.name}\\{obj.name}"
        if kind is RECEIVE
        else f"{kind.label.capitalize()} {getattr(obj, kind.key)}"
    )
    table = Table(title=title, title_justify="left", header_style="bold", show_header=True)
    table.add_column("Key", no_wrap=True)
    table.add_column("Value", overflow="fold")
    for f in dataclasses.fields(kind.cls):
        table.add_row(Text(f.name), Text(_text_value(kind, f.name, getattr(obj, f.name))))
    if kind is RECEIVE:
        table.add_row(Text("(relay)", style="bold"), Text(relay_grant(obj).describe()))
    console.print(table)


def _diff(kind: Kind, before: Any, after: Any) -> dict[str, dict[str, Any]]:
    changes: dict[str, dict[str, Any]] = {}
    for f in dataclasses.fields(kind.cls):
        old = getattr(before, f.name) if before is not None else None
        new = getattr(after, f.name) if after is not None else None
        if old != new:
            changes[f.name] = {"from": _json_value(old), "to": _json_value(new)}
    return changes


# -- running an edit --------------------------------------------------------------------------------


def _edit_path(config: Path | None) -> Path:
    resolved = default_config_path(config)
    return resolved if resolved is not None else DEFAULT_PATH


def _run_edit(
    config: Path | None,
    json_out: bool,
    mutate: Callable[[TOMLDocument], Any],
    *,
    create: bool = False,
    describe: Callable[[ed.EditResult[Any]], tuple[str, dict[str, Any]]],
) -> None:
    path = _edit_path(config)
    try:
        result = ed.apply_edit(path, mutate, create=create)
    except ed.EditError as exc:
        if json_out:
            emit_json({"ok": False, "file": str(path), "error": str(exc)})
            raise typer.Exit(1) from None
        die(str(exc))
    except ConfigError as exc:
        if json_out:
            emit_json(
                {
                    "ok": False,
                    "file": str(path),
                    "errors": [
                        {
                            "path": p.path,
                            "connector": p.connector,
                            "message": p.message,
                            "text": str(p),
                        }
                        for p in exc.problems
                    ],
                }
            )
        else:
            for problem in exc.problems:
                err_console.print(str(problem), markup=False)
            err_console.print(
                f"{len(exc.problems)} error(s): change refused, {path} left unchanged.",
                markup=False,
            )
        raise typer.Exit(1) from None
    message, data = describe(result)
    if json_out:
        emit_json(
            {
                "ok": True,
                "file": str(path),
                "changed": result.changed,
                "created": result.created,
                **data,
            }
        )
        return
    console.print(message, markup=False)
    if not result.changed:
        console.print("  (no change: the file already says this)", markup=False)


def _change_lines(kind: Kind, before: Any, after: Any) -> str:
    lines = []
    for f in dataclasses.fields(kind.cls):
        old, new = getattr(before, f.name), getattr(after, f.name)
        if old != new:
            lines.append(
                f"\n  {f.name}: {_text_value(kind, f.name, old)} → {_text_value(kind, f.name, new)}"
            )
    return "".join(lines)


def _find_obj(items: tuple[Any, ...] | None, key: str, name: str) -> Any:
    for obj in items or ():
        if str(getattr(obj, key)).lower() == name.strip().lower().rstrip("."):
            return obj
    return None


def _describe_object(
    kind: Kind, action: str, name_fn: Callable[[], str]
) -> Callable[[ed.EditResult[Any]], tuple[str, dict[str, Any]]]:
    def describe(result: ed.EditResult[Any]) -> tuple[str, dict[str, Any]]:
        name = name_fn()
        after = _find_obj(getattr(result.config, kind.array), kind.key, name)
        before_items = getattr(result.before, kind.array) if result.before is not None else None
        old_name = result.value if isinstance(result.value, str) else name
        before = _find_obj(before_items, kind.key, old_name)
        changes = _diff(kind, before, after) if action != "created" else {}
        data: dict[str, Any] = {
            "action": action,
            kind.array[:-1]: _obj_json(kind, after, result.config) if after else None,
        }
        if action == "removed":
            data[kind.array[:-1]] = (
                _obj_json(kind, before, result.before) if before else {kind.key: name}
            )
        else:
            data["changes"] = changes
        verb = {"created": "Created", "updated": "Updated", "removed": "Removed"}[action]
        where = f"{result.path}" + (" (new file)" if result.created else "")
        lines = (
            _change_lines(kind, before, after) if action == "updated" and before and after else ""
        )
        return f"{verb} {kind.label} {name!r} in {where}.{lines}", data

    return describe


# -- generated commands -----------------------------------------------------------------------------


def _option_params(kind: Kind, *, creating: bool) -> list[inspect.Parameter]:
    params: list[inspect.Parameter] = []
    kw = inspect.Parameter.KEYWORD_ONLY
    for f in _fields(kind):
        if f.name in kind.creation_only and not creating:
            continue
        shape = _shape(kind, f.name)
        flag = _flag(f.name)
        help_text = _field_help(kind, f)
        if shape == "list":
            params.append(
                inspect.Parameter(
                    f.name,
                    kw,
                    default=typer.Option(
                        None,
                        flag,
                        help=help_text + " Replaces the list.",
                        rich_help_panel=_LIST_PANEL,
                    ),
                    annotation=list[str] | None,
                )
            )
            params.append(
                inspect.Parameter(
                    f"add_{f.name}",
                    kw,
                    default=typer.Option(
                        None,
                        f"--add-{flag[2:]}",
                        help=f"Add entries to {f.name}.",
                        rich_help_panel=_LIST_PANEL,
                    ),
                    annotation=list[str] | None,
                )
            )
            params.append(
                inspect.Parameter(
                    f"remove_{f.name}",
                    kw,
                    default=typer.Option(
                        None,
                        f"--remove-{flag[2:]}",
                        help=f"Remove entries from {f.name}.",
                        rich_help_panel=_LIST_PANEL,
                    ),
                    annotation=list[str] | None,
                )
            )
        elif shape == "bool":
            params.append(
                inspect.Parameter(
                    f.name,
                    kw,
                    default=typer.Option(
                        None,
                        f"{flag}/--no-{flag[2:]}",
                        help=help_text,
                        rich_help_panel=_SETTINGS_PANEL,
                    ),
                    annotation=bool | None,
                )
            )
        else:
            params.append(
                inspect.Parameter(
                    f.name,
                    kw,
                    default=typer.Option(
                        None,
                        flag,
                        help=help_text + ' "" resets to the default.',
                        rich_help_panel=_SETTINGS_PANEL,
                    ),
                    annotation=str | None,
                )
            )
    return params


def _common_params() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter("config", kw, default=CONFIG_OPTION, annotation=Path | None),
        inspect.Parameter("json_out", kw, default=JSON_OPTION, annotation=bool),
    ]


def _command(
    impl: Callable[..., None], params: list[inspect.Parameter], doc: str
) -> Callable[..., None]:
    def command(**kwargs: Any) -> None:
        impl(**kwargs)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


def _identity_param(name: str, help_text: str) -> inspect.Parameter:
    return inspect.Parameter(
        name,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        default=typer.Argument(..., metavar="NAME", help=help_text),
        annotation=str,
    )


def _register_object_verbs(group: typer.Typer, kind: Kind, noun: str) -> None:
    """list/show/new/set/remove for receive or send connectors."""

    @group.command("list")
    def list_cmd(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        cfg = load_or_exit(config)
        items = getattr(cfg, kind.array)
        if json_out:
            emit_json([_obj_json(kind, obj, cfg) for obj in items])
            return
        if not items:
            console.print(f"No {kind.label}s.", markup=False)
            return
        console.print(_list_table(kind, cfg, items))

    list_cmd.__doc__ = f"List {kind.label}s (Get-{noun})."

    @group.command("show")
    def show_cmd(
        name: str = typer.Argument(..., help=f"The {kind.label}'s name."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        cfg = load_or_exit(config)
        obj = _find(kind, cfg, name)
        if json_out:
            emit_json(_obj_json(kind, obj, cfg))
        else:
            _print_object(kind, obj, cfg)

    show_cmd.__doc__ = (
        f"Show every setting of a {kind.label}, defaults included (Get-{noun} | Format-List)."
    )

    # new
    def new_impl(**kw: Any) -> None:
        positional, option = kw.pop("name_arg"), kw.pop("name")
        config, json_out = kw.pop("config"), kw.pop("json_out")
        if positional and option and positional != option:
            die(f"two names given: {positional!r} and --name {option!r}", 2)
        name = positional or option
        if not name:
            die(f"give the new {kind.label}'s name (NAME or --name)", 2)

        def mutate(doc: TOMLDocument) -> str:
            for table in ed.tables(doc, kind.array):
                if str(table.get("name", "")).lower() == name.lower():
                    raise ed.EditError(f"a {kind.label} named {table.get('name')!r} already exists")
            separate = bool(doc.body)
            table = ed.new_table([("name", name)], separate=separate)
            if kind is RECEIVE:
                _seed_new_receive(table, kw)
            if kind is SEND:
                _smart_host_routing(table, kw)
            _apply_options(kind, table, kw, creating=True)
            ed.append_table(doc, kind.array, table)
            return name

        _run_edit(
            config,
            json_out,
            mutate,
            create=True,
            describe=_describe_object(kind, "created", lambda: name),
        )

    new_params = [
        inspect.Parameter(
            "name_arg",
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=typer.Argument(None, metavar="NAME", help=f"The new {kind.label}'s name."),
            annotation=str | None,
        ),
        inspect.Parameter(
            "name",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--name", help="The name (alternative to NAME)."),
            annotation=str | None,
        ),
        *_option_params(kind, creating=True),
        *_common_params(),
    ]
    group.command("new")(
        _command(
            new_impl, new_params, f"Create a {kind.label} (New-{noun}); creates the file if needed."
        )
    )

    # set
    def set_impl(**kw: Any) -> None:
        identity, new_name = kw.pop("identity"), kw.pop("name")
        config, json_out = kw.pop("config"), kw.pop("json_out")
        final = {"name": identity}

        def mutate(doc: TOMLDocument) -> str:
            _, table = ed.find_table(doc, kind.array, "name", identity, kind.label)
            old = str(table["name"])
            final["name"] = old
            if kind is SEND:
                _smart_host_routing(table, kw)
            touched = _apply_options(kind, table, kw)
            if new_name is not None:
                ed.set_key(table, "name", new_name)
                final["name"] = new_name
                touched.append("name")
            if not touched:
                raise ed.EditError(
                    f"nothing to change: give at least one setting (see `{noun_cli(kind)} set --help`)"
                )
            return old

        _run_edit(
            config,
            json_out,
            mutate,
            describe=_describe_object(kind, "updated", lambda: final["name"]),
        )

    set_params = [
        _identity_param("identity", f"The {kind.label} to change."),
        inspect.Parameter(
            "name",
            inspect.Parameter.KEYWORD_ONLY,
            default=typer.Option(None, "--name", help="Rename the connector."),
            annotation=str | None,
        ),
        *_option_params(kind, creating=False),
        *_common_params(),
    ]
    group.command("set")(
        _command(set_impl, set_params, f"Change settings of a {kind.label} (Set-{noun}).")
    )

    @group.command("remove")
    def remove_cmd(
        name: str = typer.Argument(..., help=f"The {kind.label} to remove."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        final = {"name": name}

        def mutate(doc: TOMLDocument) -> str:
            index, table = ed.find_table(doc, kind.array, "name", name, kind.label)
            final["name"] = str(table["name"])
            ed.remove_table(doc, kind.array, index)
            return final["name"]

        _run_edit(
            config,
            json_out,
            mutate,
            describe=_describe_object(kind, "removed", lambda: final["name"]),
        )

    remove_cmd.__doc__ = f"Remove a {kind.label} (Remove-{noun})."


def noun_cli(kind: Kind) -> str:
    return "relaygate connector" if kind is RECEIVE else "relaygate send-connector"


def _seed_new_receive(table: TomlTable, opts: dict[str, Any]) -> None:
    """Write usage and what it seeds (PermissionGroups, AuthMechanism, fixed Bindings/ranges) explicitly,
    as Get-ReceiveConnector would show them, unless the flags set those keys."""
    from relaygate.config.loader import _seed_usage

    role = opts.get("transport_role") or "FrontendTransport"
    usage = opts.get("usage") or "Custom"
    ed.set_key(table, "transport_role", role)
    ed.set_key(table, "usage", usage)
    opts["transport_role"] = opts["usage"] = None  # written above
    seeded = _seed_usage({"usage": usage})
    for key in ("bindings", "remote_ip_ranges", "auth_mechanism", "permission_groups"):
        if key in seeded and opts.get(key) is None:
            ed.set_key(table, key, list(seeded[key]))


def _smart_host_routing(table: TomlTable, opts: dict[str, Any]) -> None:
    """Giving smart hosts without --dns-routing-enabled means 'route through them' (as New-SendConnector)."""
    if opts.get("dns_routing_enabled") is not None:
        return
    if opts.get("smart_hosts") or opts.get("add_smart_hosts"):
        opts["dns_routing_enabled"] = False


def _list_table(kind: Kind, cfg: m.Config, items: tuple[Any, ...]) -> Table:
    table = Table(header_style="bold")
    if kind is RECEIVE:
        for col in (
            "Identity",
            "Enabled",
            "Role",
            "Bindings",
            "RemoteIPRanges",
            "PermissionGroups",
            "AuthMechanism",
            "Relay",
        ):
            table.add_column(col, overflow="fold")
        for c in items:
            ranges = [r.text for r in c.remote_ip_ranges]
            shown = ", ".join(ranges[:4]) + (
                f" (+{len(ranges) - 4} more)" if len(ranges) > 4 else ""
            )
            table.add_row(
                *(
                    Text(x)
                    for x in (
                        f"{cfg.server.name}\\{c.name}",
                        "true" if c.enabled else "false",
                        c.transport_role,
                        ", ".join(str(b) for b in c.bindings),
                        shown or "(none)",
                        ", ".join(c.permission_groups) or "None",
                        ", ".join(c.auth_mechanism),
                        relay_grant(c).describe(),
                    )
                )
            )
    else:
        for col in ("Name", "Enabled", "AddressSpaces", "Route", "Auth", "RequireTLS", "Cost"):
            table.add_column(col, overflow="fold")
        for s in items:
            route = (
                "MX (DNS)"
                if s.dns_routing_enabled
                else ", ".join(f"{h}:{s.port}" for h in s.smart_hosts)
            )
            table.add_row(
                *(
                    Text(x)
                    for x in (
                        s.name,
                        "true" if s.enabled else "false",
                        ", ".join(s.address_spaces),
                        route,
                        s.smart_host_auth_mechanism,
                        "true" if s.require_tls else "false",
                        str(s.cost),
                    )
                )
            )
    return table


# -- enable / disable -------------------------------------------------------------------------------


def _register_enable(group: typer.Typer) -> None:
    for verb, value in (("enable", True), ("disable", False)):

        def make(value: bool = value, verb: str = verb) -> Callable[..., None]:
            def cmd(
                name: str = typer.Argument(..., help="The receive connector."),
                config: Path | None = CONFIG_OPTION,
                json_out: bool = JSON_OPTION,
            ) -> None:
                final = {"name": name}

                def mutate(doc: TOMLDocument) -> str:
                    _, table = ed.find_table(doc, RECEIVE.array, "name", name, RECEIVE.label)
                    final["name"] = str(table["name"])
                    ed.set_key(table, "enabled", value)
                    return final["name"]

                _run_edit(
                    config,
                    json_out,
                    mutate,
                    describe=_describe_object(RECEIVE, "updated", lambda: final["name"]),
                )

            cmd.__doc__ = (
                f"{verb.capitalize()} a receive connector ({verb.capitalize()}-ReceiveConnector)."
            )
            return cmd

        group.command(verb)(make())


# -- permissions (Add-ADPermission) -----------------------------------------------------------------


def _canonical_right(right: str) -> str:
    return next((r for r in EXTENDED_RIGHTS if r.lower() == right.lower()), right)


def _permission_rows(
    cfg: m.Config, connectors: tuple[m.ReceiveConnector, ...]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for c in connectors:
        for group in c.permission_groups:
            grant = GROUP_GRANTS.get(group)
            if grant is None:
                continue
            principal, rights = grant
            if group == "ExchangeServers" and is_externally_secured(c):
                from relaygate.policy.rights import _EXTERNALLY_SECURED_RIGHTS

                principal, rights = EXTERNALLY_SECURED, _EXTERNALLY_SECURED_RIGHTS
            rows.append(
                {
                    "connector": c.name,
                    "identity": f"{cfg.server.name}\\{c.name}",
                    "user": principal,
                    "extended_rights": [r for r in EXTENDED_RIGHTS if r in rights],
                    "deny": False,
                    "inherited": True,
                    "source": f"PermissionGroups {group}",
                }
            )
        for p in c.permissions:
            rows.append(
                {
                    "connector": c.name,
                    "identity": f"{cfg.server.name}\\{c.name}",
                    "user": p.user,
                    "extended_rights": list(p.extended_rights),
                    "deny": p.deny,
                    "inherited": False,
                    "source": "permissions (Add-ADPermission)",
                }
            )
    return rows


def _register_permission(group: typer.Typer) -> None:
    @group.command("list")
    def list_cmd(
        connector: str | None = typer.Argument(None, help="Only this receive connector."),
        explicit: bool = typer.Option(
            False, "--explicit", help="Only the explicit permissions, not the groups'."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """List extended rights per connector: from permission groups and explicit grants (Get-ADPermission)."""
        cfg = load_or_exit(config)
        connectors = (_find(RECEIVE, cfg, connector),) if connector else cfg.receive_connectors
        rows = [r for r in _permission_rows(cfg, connectors) if not (explicit and r["inherited"])]
        if json_out:
            emit_json(rows)
            return
        if not rows:
            console.print("No permissions.", markup=False)
            return
        table = Table(header_style="bold")
        for col in ("Identity", "User", "Deny", "ExtendedRights", "Source"):
            table.add_column(col, overflow="fold")
        for r in rows:
            table.add_row(
                Text(r["identity"]),
                Text(r["user"]),
                Text("true" if r["deny"] else "false"),
                Text("\n".join(r["extended_rights"])),
                Text(r["source"]),
            )
        console.print(table)

    @group.command("add")
    def add_cmd(
        connector: str = typer.Argument(..., help="The receive connector."),
        user: str = typer.Option(
            ..., "--user", help='Principal, e.g. "NT AUTHORITY\\ANONYMOUS LOGON".'
        ),
        extended_rights: list[str] = typer.Option(
            ...,
            "--extended-rights",
            help="Right(s), e.g. ms-Exch-SMTP-Accept-Any-Recipient (repeat or comma-separate).",
        ),
        deny: bool = typer.Option(False, "--deny", help="A deny entry: takes the rights away."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Grant extended rights on a connector (Add-ADPermission -User -ExtendedRights)."""
        rights = [_canonical_right(r) for r in _split(extended_rights)]
        if not rights:
            die("--extended-rights is empty", 2)
        final = {"name": connector}

        def mutate(doc: TOMLDocument) -> None:
            _, table = ed.find_table(doc, RECEIVE.array, "name", connector, RECEIVE.label)
            final["name"] = str(table["name"])
            perms = ed.tables(table, "permissions")
            for p in perms:
                if (
                    str(p.get("user", "")).lower() == user.lower()
                    and bool(p.get("deny", False)) == deny
                ):
                    current = ed.list_value(p, "extended_rights")
                    lowered = [x.lower() for x in current]
                    current += [r for r in rights if r.lower() not in lowered]
                    ed.set_key(p, "extended_rights", current)
                    return
            entry = [("user", user), ("extended_rights", rights)] + (
                [("deny", True)] if deny else []
            )
            ed.append_table(table, "permissions", ed.new_table(entry))

        _run_edit(
            config,
            json_out,
            mutate,
            describe=_describe_object(RECEIVE, "updated", lambda: final["name"]),
        )

    @group.command("remove")
    def remove_cmd(
        connector: str = typer.Argument(..., help="The receive connector."),
        user: str = typer.Option(..., "--user", help="Principal whose grant to remove."),
        extended_rights: list[str] = typer.Option(
            [],
            "--extended-rights",
            help="Right(s) to remove; omit to remove every right of this user.",
        ),
        deny: bool = typer.Option(False, "--deny", help="Remove from the deny entry instead."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Take extended rights away again (Remove-ADPermission)."""
        rights = {_canonical_right(r).lower() for r in _split(extended_rights)}
        final = {"name": connector}

        def mutate(doc: TOMLDocument) -> None:
            _, table = ed.find_table(doc, RECEIVE.array, "name", connector, RECEIVE.label)
            final["name"] = str(table["name"])
            perms = ed.tables(table, "permissions")
            found = False
            for index in range(len(perms) - 1, -1, -1):
                p = perms[index]
                if (
                    str(p.get("user", "")).lower() != user.lower()
                    or bool(p.get("deny", False)) != deny
                ):
                    continue
                current = ed.list_value(p, "extended_rights")
                keep = [r for r in current if rights and r.lower() not in rights]
                if len(keep) != len(current):
                    found = True
                if keep:
                    ed.set_key(p, "extended_rights", keep)
                else:
                    ed.remove_table(table, "permissions", index)
            if not found:
                what = ", ".join(sorted(rights)) if rights else "any right"
                raise ed.EditError(
                    f"{final['name']!r} has no {'deny ' if deny else ''}permission for {user!r} with {what}"
                )

        _run_edit(
            config,
            json_out,
            mutate,
            describe=_describe_object(RECEIVE, "updated", lambda: final["name"]),
        )


# -- accepted domains -------------------------------------------------------------------------------


def _register_domain(group: typer.Typer) -> None:
    @group.command("list")
    def list_cmd(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        """List accepted domains (Get-AcceptedDomain)."""
        cfg = load_or_exit(config)
        rows = [_obj_json(DOMAIN, d) for d in cfg.accepted_domains]
        if json_out:
            emit_json(rows)
            return
        if not rows:
            console.print("No accepted domains.", markup=False)
            return
        table = Table(header_style="bold")
        for col in ("DomainName", "DomainType", "Default"):
            table.add_column(col)
        for d in cfg.accepted_domains:
            table.add_row(
                Text(d.domain), Text(d.domain_type), Text("true" if d.default else "false")
            )
        console.print(table)

    def domain_edit(
        action: str,
        domain: str,
        mutate_table: Callable[[TOMLDocument], None],
        config: Path | None,
        json_out: bool,
    ) -> None:
        norm = domain.strip().lower().rstrip(".")

        def describe(result: ed.EditResult[Any]) -> tuple[str, dict[str, Any]]:
            after = _find_obj(result.config.accepted_domains, "domain", norm)
            before = _find_obj(
                result.before.accepted_domains if result.before else None, "domain", norm
            )
            data: dict[str, Any] = {
                "action": action,
                "accepted_domain": _obj_json(DOMAIN, after or before)
                if (after or before)
                else {"domain": norm},
            }
            if action != "removed":
                data["changes"] = _diff(DOMAIN, before, after) if action == "updated" else {}
            verb = {"created": "Added", "updated": "Updated", "removed": "Removed"}[action]
            lines = (
                _change_lines(DOMAIN, before, after)
                if action == "updated" and before and after
                else ""
            )
            return f"{verb} accepted domain {norm} in {result.path}.{lines}", data

        _run_edit(config, json_out, mutate_table, create=action == "created", describe=describe)

    def clear_default(doc: TOMLDocument, keep: str) -> None:
        for t in ed.tables(doc, DOMAIN.array):
            if str(t.get("domain", "")).lower().rstrip(".") != keep and t.get("default"):
                ed.set_key(t, "default", None)

    @group.command("add")
    def add_cmd(
        domain: str = typer.Argument(..., help="corp.example or *.corp.example"),
        domain_type: str = typer.Option(
            "Authoritative", "--domain-type", help="Authoritative | InternalRelay | ExternalRelay."
        ),
        default: bool = typer.Option(
            False, "--default", help="Make it the default domain (postmaster@ for NDRs)."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Add an accepted domain (New-AcceptedDomain -DomainName -DomainType)."""
        norm = domain.strip().lower().rstrip(".")

        def mutate(doc: TOMLDocument) -> None:
            for t in ed.tables(doc, DOMAIN.array):
                if str(t.get("domain", "")).lower().rstrip(".") == norm:
                    raise ed.EditError(f"{norm} is already an accepted domain")
            entries: list[tuple[str, Any]] = [("domain", norm), ("domain_type", domain_type)]
            if default:
                clear_default(doc, norm)
                entries.append(("default", True))
            ed.append_table(doc, DOMAIN.array, ed.new_table(entries, separate=bool(doc.body)))

        domain_edit("created", domain, mutate, config, json_out)

    @group.command("set")
    def set_cmd(
        domain: str = typer.Argument(..., help="The accepted domain."),
        domain_type: str | None = typer.Option(
            None, "--domain-type", help="Authoritative | InternalRelay | ExternalRelay."
        ),
        default: bool | None = typer.Option(
            None, "--default/--no-default", help="Make it (or stop it being) the default."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Change an accepted domain (Set-AcceptedDomain)."""
        norm = domain.strip().lower().rstrip(".")

        def mutate(doc: TOMLDocument) -> None:
            _, t = ed.find_table(doc, DOMAIN.array, "domain", norm, DOMAIN.label)
            if domain_type is None and default is None:
                raise ed.EditError("nothing to change: give --domain-type or --default")
            if domain_type is not None:
                ed.set_key(t, "domain_type", domain_type)
            if default:
                clear_default(doc, norm)
                ed.set_key(t, "default", True)
            elif default is False:
                ed.set_key(t, "default", None)

        domain_edit("updated", domain, mutate, config, json_out)

    @group.command("remove")
    def remove_cmd(
        domain: str = typer.Argument(..., help="The accepted domain."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Remove an accepted domain (Remove-AcceptedDomain). The default domain cannot be removed while
        other domains exist."""
        norm = domain.strip().lower().rstrip(".")

        def mutate(doc: TOMLDocument) -> None:
            index, t = ed.find_table(doc, DOMAIN.array, "domain", norm, DOMAIN.label)
            if t.get("default") and len(ed.tables(doc, DOMAIN.array)) > 1:
                raise ed.EditError(
                    f"{norm} is the default accepted domain; make another one the default first "
                    "(`relaygate domain set OTHER --default`)"
                )
            ed.remove_table(doc, DOMAIN.array, index)

        domain_edit("removed", domain, mutate, config, json_out)


# -- registration -----------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    connector = typer.Typer(
        help="Receive connectors in the config file (Get/New/Set/Remove-ReceiveConnector).",
        no_args_is_help=True,
    )
    _register_object_verbs(connector, RECEIVE, "ReceiveConnector")
    _register_enable(connector)
    app.add_typer(connector, name="connector")

    permission = typer.Typer(
        help="Extended rights on receive connectors (Add-/Remove-/Get-ADPermission).",
        no_args_is_help=True,
    )
    _register_permission(permission)
    app.add_typer(permission, name="permission")

    domain = typer.Typer(
        help="Accepted domains (Get/New/Set/Remove-AcceptedDomain).", no_args_is_help=True
    )
    _register_domain(domain)
    app.add_typer(domain, name="domain")

    send = typer.Typer(
        help="Send connectors: outbound routes (Get/New/Set/Remove-SendConnector).",
        no_args_is_help=True,
    )
    _register_object_verbs(send, SEND, "SendConnector")
    app.add_typer(send, name="send-connector")
