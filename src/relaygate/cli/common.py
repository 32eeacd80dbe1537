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
    "load_or_exit",
    "print_problems",
    "problems_json",
]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

CONFIG_OPTION = typer.Option(
    None, "--config", "-c", help="Config file (default: $RELAYGATE_CONFIG, then ./relaygate.toml)."
)
JSON_OPTION = typer.Option(False, "--json", help="Print machine-readable JSON.")


def die(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True)
    raise typer.Exit(code)


def load_or_exit(path: Path | None) -> Config:
    """Load the config or print every problem and exit 1."""
    try:
        return load_config(path)
    except ConfigError as exc:
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
