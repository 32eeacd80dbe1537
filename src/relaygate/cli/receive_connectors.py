"""`relaygate connector`: receive connectors in the config file (Get/New/Set/Remove-ReceiveConnector).

list/show/new/set/remove come from `connector_verbs` with flags generated from the model; `new`
writes the usage and what it seeds explicitly; enable/disable are Enable-/Disable-ReceiveConnector.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.audit import relay_grant
from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION
from relaygate.cli.config_objects import RECEIVE
from relaygate.cli.connector_verbs import register_object_verbs
from relaygate.cli.file_edits import edit_named
from relaygate.cli.tables import CUT, WHOLE, WIDE, list_table
from relaygate.config import edit as ed
from relaygate.config import model as m

__all__ = ["CONNECTOR_ARGUMENT", "register"]

# The NAME argument of the verbs that edit one receive connector.
CONNECTOR_ARGUMENT = typer.Argument(..., help="The receive connector.")


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


def _list_table(cfg: m.Config, items: tuple[m.ReceiveConnector, ...]) -> Table:
    columns = [
        ("Identity", WHOLE),
        ("Enabled", WHOLE),
        ("Role", WIDE),
        ("Bindings", CUT),
        ("RemoteIPRanges", CUT),
        ("PermissionGroups", WIDE),
        ("AuthMechanism", WIDE),
        ("Relay", CUT),
    ]
    rows = []
    for c in items:
        ranges = [r.text for r in c.remote_ip_ranges]
        shown = ", ".join(ranges[:4]) + (f" (+{len(ranges) - 4} more)" if len(ranges) > 4 else "")
        rows.append(
            [
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
            ]
        )
    return list_table(columns, rows)


def _register_enable(group: typer.Typer) -> None:
    for verb, value in (("enable", True), ("disable", False)):

        def make(value: bool = value, verb: str = verb) -> Callable[..., None]:
            def cmd(
                name: str = CONNECTOR_ARGUMENT,
                config: Path | None = CONFIG_OPTION,
                json_out: bool = JSON_OPTION,
            ) -> None:
                def change(doc: TOMLDocument, index: int, table: TomlTable) -> None:
                    ed.set_key(table, "enabled", value)

                edit_named(RECEIVE, name, "updated", change, config, json_out)

            cmd.__doc__ = (
                f"{verb.capitalize()} a receive connector ({verb.capitalize()}-ReceiveConnector)."
            )
            return cmd

        group.command(verb)(make())


def register(app: typer.Typer) -> None:
    connector = typer.Typer(
        help="Receive connectors in the config file (Get/New/Set/Remove-ReceiveConnector).",
        no_args_is_help=True,
    )
    register_object_verbs(
        connector,
        RECEIVE,
        "ReceiveConnector",
        cli="relaygate connector",
        list_table=_list_table,
        prepare_new=_seed_new_receive,
    )
    _register_enable(connector)
    app.add_typer(connector, name="connector")
