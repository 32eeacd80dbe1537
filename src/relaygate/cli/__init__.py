"""Command line: one module per verb group, each exposing `register(app)`; parsing and printing only."""

from __future__ import annotations

import importlib

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="relaygate",
    help="RelayGate: an SMTP relay administered like an Exchange receive connector.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module registers its verbs. A module that is missing is skipped so partial builds still run.
_VERB_MODULES = [
    "serve",
    "check",
    "explain",
    "receive_connectors",
    "permissions",
    "accepted_domains",
    "send_connectors",
    "audit",
    "queue",
    "trace",
    "testsend",
    "doctor",
    "dkim",
    "importer",
    "user",
]

for _name in _VERB_MODULES:
    try:
        _module = importlib.import_module(f"relaygate.cli.{_name}")
    except ModuleNotFoundError as exc:  # only tolerate the module itself being absent
        if exc.name != f"relaygate.cli.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    app()
