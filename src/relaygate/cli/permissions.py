"""`relaygate permission`: extended rights on receive connectors (Add-/Remove-/Get-ADPermission).

`list` shows the rights a connector's permission groups grant next to its explicit `permissions`
entries; `add` and `remove` edit the explicit entries, one per user and allow/deny.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, die, load_or_exit
from relaygate.cli.config_objects import RECEIVE, find, print_listing
from relaygate.cli.file_edits import edit_named
from relaygate.cli.model_flags import split
from relaygate.cli.receive_connectors import CONNECTOR_ARGUMENT
from relaygate.cli.tables import CUT, WHOLE, WIDE, list_table
from relaygate.config import edit as ed
from relaygate.config import model as m
from relaygate.importer.exchange import canonical_user
from relaygate.policy.rights import (
    EXTENDED_RIGHTS,
    EXTERNALLY_SECURED,
    GROUP_GRANTS,
    is_externally_secured,
)

__all__ = ["register"]

# How a connector's grants are written in the file (named when they are not written so).
_PERMISSIONS_HEADER = "receive_connectors.permissions"


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


def _rows_table(rows: list[dict[str, Any]]) -> Table:
    columns = [
        ("Identity", WHOLE),
        ("User", CUT),
        ("Deny", WHOLE),
        ("ExtendedRights", CUT),
        ("Source", WIDE),
    ]
    cells = [
        [
            Text(r["identity"]),
            Text(r["user"]),
            Text("true" if r["deny"] else "false"),
            Text("\n".join(r["extended_rights"])),
            Text(r["source"]),
        ]
        for r in rows
    ]
    return list_table(columns, cells)


def _is_entry(p: TomlTable, user: str, deny: bool) -> bool:
    """Whether the `permissions` table `p` is the allow (or deny) entry of `user` (both spellings of
    a well-known principal, e.g. ANONYMOUS LOGON and NT AUTHORITY\\ANONYMOUS LOGON, match)."""
    same = canonical_user(str(p.get("user", ""))).lower() == canonical_user(user).lower()
    return same and bool(p.get("deny", False)) == deny


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
        connectors = (find(RECEIVE, cfg, connector),) if connector else cfg.receive_connectors
        rows = [r for r in _permission_rows(cfg, connectors) if not (explicit and r["inherited"])]
        print_listing(json_out, rows, "No permissions.", lambda: _rows_table(rows))

    @group.command("add")
    def add_cmd(
        connector: str = CONNECTOR_ARGUMENT,
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
        # the policy matches Exchange's spelling of well-known principals
        user = canonical_user(user)
        rights = [_canonical_right(r) for r in split(extended_rights)]
        if not rights:
            die("--extended-rights is empty", 2)

        def change(doc: TOMLDocument, index: int, table: TomlTable) -> None:
            for p in ed.tables(table, "permissions", header=_PERMISSIONS_HEADER):
                if _is_entry(p, user, deny):
                    current = ed.list_value(p, "extended_rights")
                    lowered = [x.lower() for x in current]
                    current += [r for r in rights if r.lower() not in lowered]
                    ed.set_key(p, "extended_rights", current)
                    return
            entry = [("user", user), ("extended_rights", rights)] + (
                [("deny", True)] if deny else []
            )
            ed.append_table(table, "permissions", ed.new_table(entry))

        edit_named(RECEIVE, connector, "updated", change, config, json_out)

    @group.command("remove")
    def remove_cmd(
        connector: str = CONNECTOR_ARGUMENT,
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
        user = canonical_user(user)
        rights = {_canonical_right(r).lower() for r in split(extended_rights)}

        def change(doc: TOMLDocument, index: int, table: TomlTable) -> None:
            perms = ed.tables(table, "permissions", header=_PERMISSIONS_HEADER)
            found = False
            for i in range(len(perms) - 1, -1, -1):
                p = perms[i]
                if not _is_entry(p, user, deny):
                    continue
                current = ed.list_value(p, "extended_rights")
                keep = [r for r in current if rights and r.lower() not in rights]
                if len(keep) != len(current):
                    found = True
                if keep:
                    ed.set_key(p, "extended_rights", keep)
                else:
                    ed.remove_table(table, "permissions", i)
            if not found:
                what = ", ".join(sorted(rights)) if rights else "any right"
                raise ed.EditError(
                    f"{str(table['name'])!r} has no {'deny ' if deny else ''}permission for {user!r} with {what}"
                )

        edit_named(RECEIVE, connector, "updated", change, config, json_out)


def register(app: typer.Typer) -> None:
    permission = typer.Typer(
        help="Extended rights on receive connectors (Add-/Remove-/Get-ADPermission).",
        no_args_is_help=True,
    )
    _register_permission(permission)
    app.add_typer(permission, name="permission")
