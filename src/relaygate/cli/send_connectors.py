"""`relaygate send-connector`: outbound routes in the config file (Get/New/Set/Remove-SendConnector).

list/show/new/set/remove come from `connector_verbs` with flags generated from the model. As with
New-SendConnector, giving smart hosts without --dns-routing-enabled routes through them.
"""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table
from rich.text import Text
from tomlkit.items import Table as TomlTable

from relaygate.cli.config_objects import SEND
from relaygate.cli.connector_verbs import register_object_verbs
from relaygate.cli.tables import CUT, WHOLE, WIDE, list_table
from relaygate.config import model as m
from relaygate.config.values import parse_smart_host
from relaygate.delivery.graph import is_graph, route_label
from relaygate.delivery.oauth import auth_label
from relaygate.queue import pacing

__all__ = ["register"]


def _smart_host_routing(table: TomlTable, opts: dict[str, Any]) -> None:
    """Giving smart hosts without --dns-routing-enabled means 'route through them' (as New-SendConnector)."""
    if opts.get("dns_routing_enabled") is not None:
        return
    if opts.get("smart_hosts") or opts.get("add_smart_hosts"):
        opts["dns_routing_enabled"] = False


def _smart_host_endpoint(entry: str, port: int) -> str:
    """`host:port` as delivery reaches it: the entry's own port, else the connector's (an entry
    with its own port was shown with the connector's appended too: "smtp.corp.example:2525:25")."""
    try:
        host, port, _ = parse_smart_host(entry, port)
    except ValueError:  # `check` refuses it; shown as written
        return entry
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _list_table(cfg: m.Config, items: tuple[m.SendConnector, ...]) -> Table:
    columns = [
        ("Name", WHOLE),
        ("Enabled", WHOLE),
        ("AddressSpaces", CUT),
        ("Route", CUT),
        ("Auth", WIDE),
        ("RequireTLS", WIDE),
        ("Cost", WHOLE),
        ("Pacing", WIDE),
    ]
    rows = []
    for s in items:
        route = (
            route_label(s)
            if is_graph(s)
            else "MX (DNS)"
            if s.dns_routing_enabled
            else ", ".join(_smart_host_endpoint(h, s.port) for h in s.smart_hosts)
        )
        rows.append(
            [
                Text(x)
                for x in (
                    s.name,
                    "true" if s.enabled else "false",
                    ", ".join(s.address_spaces),
                    route,
                    auth_label(s) or "None",
                    "true" if s.require_tls else "false",
                    str(s.cost),
                    pacing.describe(s),
                )
            ]
        )
    return list_table(columns, rows)


def register(app: typer.Typer) -> None:
    send = typer.Typer(
        help="Send connectors: outbound routes (Get/New/Set/Remove-SendConnector).",
        no_args_is_help=True,
    )
    register_object_verbs(
        send,
        SEND,
        "SendConnector",
        cli="relaygate send-connector",
        list_table=_list_table,
        prepare_new=_smart_host_routing,
        prepare_set=_smart_host_routing,
    )
    app.add_typer(send, name="send-connector")
