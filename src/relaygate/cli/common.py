"""Shared CLI plumbing: the --config/--json options, config loading with readable errors, output."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from relaygate.config import Config, ConfigError, Problem, default_config_path, load_config

__all__ = [
    "CONFIG_OPTION",
    "JSON_OPTION",
    "console",
    "die",
    "emit_json",
    "err_console",
    "fail",
    "json_requested",
    "load_or_exit",
    "print_problems",
    "problems_json",
    "remember_json",
]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Config file (default: $RELAYGATE_CONFIG, then ./relaygate.toml)."
)


class _JsonMode:
    """Whether the running command was given --json: a script that asked for JSON gets its errors
    as JSON on stdout too (`fail`, `load_or_exit`), not an empty stdout and text on stderr.
    Set by the option's callback, cleared when the command's context closes (the CLI tests run
    many commands in one process)."""

    on = False


def remember_json(ctx: typer.Context, value: bool) -> bool:
    """The callback of every --json option (JSON_OPTION's, and a verb's own with its own help)."""
    _JsonMode.on = bool(value)
    ctx.call_on_close(_clear_json_mode)
    return value


def _clear_json_mode() -> None:
    _JsonMode.on = False


JSON_OPTION = typer.Option(
    False, "--json", help="Print machine-readable JSON.", callback=remember_json
)


def json_requested() -> bool:
    """True while a command given --json runs: its errors are printed as JSON (`fail`)."""
    return _JsonMode.on


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print an error and return the exit to raise: `error: ...` on stderr, or with --json
    {"ok": false, "error": ...} on stdout (where the command's data would have been)."""
    if json_requested():
        emit_json({"ok": False, "error": message})
    else:
        err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    return typer.Exit(code)


def die(message: str, code: int = 1) -> NoReturn:
    raise fail(message, code)


def load_or_exit(path: Path | None) -> Config:
    """Load the config or print every problem (as JSON with --json) and exit 1."""
    try:
        return load_config(path)
    except ConfigError as exc:
        if json_requested():
            emit_json(
                {"ok": False, "source": config_source(path), "errors": problems_json(exc.problems)}
            )
        else:
            print_problems(exc.problems)
            err_console.print(f"{len(exc.problems)} error(s).", markup=False)
        raise typer.Exit(1) from None


def print_problems(problems: Iterable[Problem], to: Console = err_console) -> None:
    """One line a config problem, as `relaygate check` prints them."""
    for problem in problems:
        to.print(str(problem), markup=False)


def problems_json(problems: Iterable[Problem]) -> list[dict[str, Any]]:
    """Config problems as `relaygate check --json` lists them."""
    return [
        {"path": p.path, "connector": p.connector, "message": p.message, "text": str(p)}
        for p in problems
    ]


def config_source(path: Path | None) -> str:
    resolved = default_config_path(path)
    return str(resolved) if resolved else "<embedded default>"


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
