"""`relaygate domain`: accepted domains in the config file (Get/New/Set/Remove-AcceptedDomain).

Domains are compared case-insensitively without a trailing dot and written that way. At most one is
the default (postmaster@ for NDRs): making one the default clears the flag on the others.
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

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, load_or_exit
from relaygate.cli.config_objects import DOMAIN, norm_name, obj_json, print_listing
from relaygate.cli.file_edits import edit_report, run_edit
from relaygate.config import edit as ed
from relaygate.config import model as m

__all__ = ["register"]

_DOMAIN_TYPES = "Authoritative | InternalRelay | ExternalRelay."


def _domains_table(cfg: m.Config) -> Table:
    table = Table(header_style="bold")
    for col in ("DomainName", "DomainType", "Default"):
        table.add_column(col)
    for d in cfg.accepted_domains:
        table.add_row(Text(d.domain), Text(d.domain_type), Text("true" if d.default else "false"))
    return table


def _domain_of(table: TomlTable) -> str:
    return str(table.get("domain", "")).lower().rstrip(".")


def _clear_default(doc: TOMLDocument, keep: str) -> None:
    for t in ed.tables(doc, DOMAIN.array):
        if _domain_of(t) != keep and t.get("default"):
            ed.set_key(t, "default", None)


def _domain_edit(
    action: str,
    norm: str,
    mutate: Callable[[TOMLDocument], None],
    config: Path | None,
    json_out: bool,
) -> None:
    """Run an edit of the accepted domain `norm` and report it."""

    def describe(result: ed.EditResult[Any]) -> tuple[str, dict[str, Any]]:
        data, lines = edit_report(DOMAIN, action, result, norm)
        if data["accepted_domain"] is None:
            data["accepted_domain"] = {"domain": norm}
        verb = {"created": "Added", "updated": "Updated", "removed": "Removed"}[action]
        return f"{verb} accepted domain {norm} in {result.path}.{lines}", data

    run_edit(config, json_out, mutate, create=action == "created", describe=describe)


def _register_domain(group: typer.Typer) -> None:
    @group.command("list")
    def list_cmd(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        """List accepted domains (Get-AcceptedDomain)."""
        cfg = load_or_exit(config)
        rows = [obj_json(DOMAIN, d) for d in cfg.accepted_domains]
        print_listing(
            json_out,
            rows,
            "No accepted domains.",
            lambda: _domains_table(cfg),
            narrow_layout=False,  # three short columns, folded rather than cut
        )

    @group.command("add")
    def add_cmd(
        domain: str = typer.Argument(..., help="corp.example or *.corp.example"),
        domain_type: str = typer.Option("Authoritative", "--domain-type", help=_DOMAIN_TYPES),
        default: bool = typer.Option(
            False, "--default", help="Make it the default domain (postmaster@ for NDRs)."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Add an accepted domain (New-AcceptedDomain -DomainName -DomainType)."""
        norm = norm_name(domain)

        def mutate(doc: TOMLDocument) -> None:
            for t in ed.tables(doc, DOMAIN.array):
                if _domain_of(t) == norm:
                    raise ed.EditError(f"{norm} is already an accepted domain")
            entries: list[tuple[str, Any]] = [("domain", norm), ("domain_type", domain_type)]
            if default:
                _clear_default(doc, norm)
                entries.append(("default", True))
            ed.append_table(doc, DOMAIN.array, ed.new_table(entries, separate=bool(doc.body)))

        _domain_edit("created", norm, mutate, config, json_out)

    @group.command("set")
    def set_cmd(
        domain: str = typer.Argument(..., help="The accepted domain."),
        domain_type: str | None = typer.Option(None, "--domain-type", help=_DOMAIN_TYPES),
        default: bool | None = typer.Option(
            None, "--default/--no-default", help="Make it (or stop it being) the default."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Change an accepted domain (Set-AcceptedDomain)."""
        norm = norm_name(domain)

        def mutate(doc: TOMLDocument) -> None:
            _, t = ed.find_table(doc, DOMAIN.array, "domain", norm, DOMAIN.label)
            if domain_type is None and default is None:
                raise ed.EditError("nothing to change: give --domain-type or --default")
            if domain_type is not None:
                ed.set_key(t, "domain_type", domain_type)
            if default:
                _clear_default(doc, norm)
                ed.set_key(t, "default", True)
            elif default is False:
                ed.set_key(t, "default", None)

        _domain_edit("updated", norm, mutate, config, json_out)

    @group.command("remove")
    def remove_cmd(
        domain: str = typer.Argument(..., help="The accepted domain."),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Remove an accepted domain (Remove-AcceptedDomain). The default domain cannot be removed while
        other domains exist."""
        norm = norm_name(domain)

        def mutate(doc: TOMLDocument) -> None:
            index, t = ed.find_table(doc, DOMAIN.array, "domain", norm, DOMAIN.label)
            if t.get("default") and len(ed.tables(doc, DOMAIN.array)) > 1:
                raise ed.EditError(
                    f"{norm} is the default accepted domain; make another one the default first "
                    "(`relaygate domain set OTHER --default`)"
                )
            ed.remove_table(doc, DOMAIN.array, index)

        _domain_edit("removed", norm, mutate, config, json_out)


def register(app: typer.Typer) -> None:
    domain = typer.Typer(
        help="Accepted domains (Get/New/Set/Remove-AcceptedDomain).", no_args_is_help=True
    )
    _register_domain(domain)
    app.add_typer(domain, name="domain")
