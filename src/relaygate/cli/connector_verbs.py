"""list/show/new/set/remove: the verbs receive and send connectors share.

`register_object_verbs` adds them to a verb group for one kind, as Get-/New-/Set-/Remove-<noun>; the
group supplies its list table and what `new` and `set` do before the generated flags are applied.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, die, emit_json, load_or_exit
from relaygate.cli.config_objects import Kind, find, obj_json, print_listing, print_object
from relaygate.cli.file_edits import describe_object, edit_named, run_edit
from relaygate.cli.model_flags import (
    apply_options,
    command,
    common_params,
    keyword_option,
    name_argument,
    option_params,
)
from relaygate.config import edit as ed
from relaygate.config import model as m

__all__ = ["Prepare", "register_object_verbs"]

# Adjusts a table and the flags' values before the generated flags are applied to it.
Prepare = Callable[[TomlTable, dict[str, Any]], None]


def register_object_verbs(
    group: typer.Typer,
    kind: Kind,
    noun: str,
    *,
    cli: str,
    list_table: Callable[[m.Config, tuple[Any, ...]], Table],
    prepare_new: Prepare | None = None,
    prepare_set: Prepare | None = None,
) -> None:
    """list/show/new/set/remove for `kind` (Exchange's `noun`), reached as `cli` (for messages)."""

    @group.command("list")
    def list_cmd(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        cfg = load_or_exit(config)
        items = getattr(cfg, kind.array)
        print_listing(
            json_out,
            [obj_json(kind, obj, cfg) for obj in items],
            f"No {kind.label}s.",
            lambda: list_table(cfg, items),
        )

    list_cmd.__doc__ = f"List {kind.label}s (Get-{noun})."

    @group.command("show")
    def show_cmd(
        name: str = typer.Argument(..., help=f"The {kind.label}'s name."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        cfg = load_or_exit(config)
        obj = find(kind, cfg, name)
        if json_out:
            emit_json(obj_json(kind, obj, cfg))
        else:
            print_object(kind, obj, cfg)

    show_cmd.__doc__ = (
        f"Show every setting of a {kind.label}, defaults included (Get-{noun} | Format-List)."
    )

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
            table = ed.new_table([("name", name)], separate=bool(doc.body))
            if prepare_new is not None:
                prepare_new(table, kw)
            apply_options(kind, table, kw, creating=True)
            ed.append_table(doc, kind.array, table)
            return name

        run_edit(
            config,
            json_out,
            mutate,
            create=True,
            describe=describe_object(kind, "created", lambda: name),
        )

    new_params = [
        name_argument("name_arg", f"The new {kind.label}'s name.", required=False),
        keyword_option("name", "--name", "The name (alternative to NAME).", str | None),
        *option_params(kind, creating=True),
        *common_params(),
    ]
    group.command("new")(
        command(
            new_impl, new_params, f"Create a {kind.label} (New-{noun}); creates the file if needed."
        )
    )

    def set_impl(**kw: Any) -> None:
        identity, new_name = kw.pop("identity"), kw.pop("name")
        config, json_out = kw.pop("config"), kw.pop("json_out")

        def change(doc: TOMLDocument, index: int, table: TomlTable) -> str | None:
            if prepare_set is not None:
                prepare_set(table, kw)
            touched = apply_options(kind, table, kw)
            if new_name is not None:
                ed.set_key(table, "name", new_name)
                touched.append("name")
            if not touched:
                raise ed.EditError(
                    f"nothing to change: give at least one setting (see `{cli} set --help`)"
                )
            return new_name

        edit_named(kind, identity, "updated", change, config, json_out)

    set_params = [
        name_argument("identity", f"The {kind.label} to change."),
        keyword_option("name", "--name", "Rename the connector.", str | None),
        *option_params(kind, creating=False),
        *common_params(),
    ]
    group.command("set")(
        command(set_impl, set_params, f"Change settings of a {kind.label} (Set-{noun}).")
    )

    @group.command("remove")
    def remove_cmd(
        name: str = typer.Argument(..., help=f"The {kind.label} to remove."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        def change(doc: TOMLDocument, index: int, table: TomlTable) -> None:
            ed.remove_table(doc, kind.array, index)

        edit_named(kind, name, "removed", change, config, json_out)

    remove_cmd.__doc__ = f"Remove a {kind.label} (Remove-{noun})."
