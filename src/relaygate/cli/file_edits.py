"""Running one edit of the config file from a verb, and reporting it.

Every edit goes through `relaygate.config.edit`: comments and layout survive, the result is validated
as `relaygate check` validates it (a refused edit prints check's messages and leaves the file
byte-identical), and the write is atomic. This module turns the outcome into the verb's output: a
line (with the changed keys) or `--json`, and exit code 1 for a refused edit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.cli.common import console, die, emit_json, err_console, print_problems, problems_json
from relaygate.cli.config_objects import Kind, change_lines, diff, find_obj, obj_json
from relaygate.config import ConfigError, default_config_path
from relaygate.config import edit as ed
from relaygate.config.loader import DEFAULT_PATH

__all__ = ["Describe", "describe_object", "edit_named", "edit_report", "run_edit"]

# An edit's outcome → the text line and the `--json` fields.
Describe = Callable[[ed.EditResult[Any]], tuple[str, dict[str, Any]]]


def _edit_path(config: Path | None) -> Path:
    resolved = default_config_path(config)
    return resolved if resolved is not None else DEFAULT_PATH


def run_edit(
    config: Path | None,
    json_out: bool,
    mutate: Callable[[TOMLDocument], Any],
    *,
    create: bool = False,
    describe: Describe,
) -> None:
    """Apply `mutate` to the config file and print the outcome; exit 1 if the edit is refused."""
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
            emit_json({"ok": False, "file": str(path), "errors": problems_json(exc.problems)})
        else:
            print_problems(exc.problems)
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


def edit_report(
    kind: Kind, action: str, result: ed.EditResult[Any], name: str
) -> tuple[dict[str, Any], str]:
    """The `--json` fields of an edit of the object `name` (the object and its changes) and the text
    lines of the changed keys. A mutation that renames the object returns its old name."""
    after = find_obj(getattr(result.config, kind.array), kind.key, name)
    before_items = getattr(result.before, kind.array) if result.before is not None else None
    old_name = result.value if isinstance(result.value, str) else name
    before = find_obj(before_items, kind.key, old_name)
    data: dict[str, Any] = {"action": action}
    if action == "removed":
        data[kind.array[:-1]] = (
            obj_json(kind, before, result.before) if before else {kind.key: name}
        )
    else:
        data[kind.array[:-1]] = obj_json(kind, after, result.config) if after else None
        data["changes"] = diff(kind, before, after) if action == "updated" else {}
    lines = change_lines(kind, before, after) if action == "updated" and before and after else ""
    return data, lines


def describe_object(kind: Kind, action: str, name_fn: Callable[[], str]) -> Describe:
    """Report a created, updated or removed connector; `name_fn` gives its final name."""

    def describe(result: ed.EditResult[Any]) -> tuple[str, dict[str, Any]]:
        name = name_fn()
        data, lines = edit_report(kind, action, result, name)
        verb = {"created": "Created", "updated": "Updated", "removed": "Removed"}[action]
        where = f"{result.path}" + (" (new file)" if result.created else "")
        return f"{verb} {kind.label} {name!r} in {where}.{lines}", data

    return describe


def edit_named(
    kind: Kind,
    name: str,
    action: str,
    change: Callable[[TOMLDocument, int, TomlTable], str | None],
    config: Path | None,
    json_out: bool,
) -> None:
    """Edit the existing object `name` of `kind` and report it as `describe_object` does.

    `change(doc, index, table)` edits the object's table (found by name, case-insensitively) and
    returns its new name if it renames it, else None."""
    final = {"name": name}

    def mutate(doc: TOMLDocument) -> str:
        index, table = ed.find_table(doc, kind.array, kind.key, name, kind.label)
        old = str(table[kind.key])
        final["name"] = old
        renamed = change(doc, index, table)
        if renamed is not None:
            final["name"] = renamed
        return old

    run_edit(
        config, json_out, mutate, describe=describe_object(kind, action, lambda: final["name"])
    )
