"""`relaygate import exchange FILE...`: Exchange exports and protocol logs → receive and send connectors.

Dry run by default: prints the `[[receive_connectors]]` / `[[send_connectors]]` TOML that would be added and the usage report
from the protocol logs. `--write` merges the connectors into the config file (tomlkit, comments kept),
refusing names already present, validates the whole result as `relaygate check` would, and only then
replaces the file atomically. A refused write leaves the file byte-identical.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import tomlkit
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from tomlkit.items import Table as TomlTable
from tomlkit.toml_document import TOMLDocument

from relaygate.cli.common import fail, remember_json
from relaygate.config import ConfigError
from relaygate.config import edit as ed
from relaygate.importer.exchange import (
    ExchangeImportError,
    ImportResult,
    combine_results,
    decode_export,
    detect_format,
    is_open_relay,
    parse_exchange_export,
    relays_anonymously,
)
from relaygate.importer.protocol_logs import (
    UsageReport,
    analyze_protocol_logs,
    is_receive_protocol_log,
)

__all__ = ["register"]

ENV_VAR = "RELAYGATE_CONFIG"
DEFAULT_CONFIG = Path("relaygate.toml")
_LOG_HEAD_BYTES = 4096


def register(app: typer.Typer) -> None:
    import_app = typer.Typer(
        name="import",
        help="Import configuration from other systems.",
        no_args_is_help=True,
    )
    import_app.command("exchange")(exchange)
    app.add_typer(import_app, name="import")


_fail = fail  # with --json, errors are JSON too


def _config_path(explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_CONFIG


def _classify(paths: list[Path]) -> tuple[list[tuple[Path, str]], list[Path]]:
    """→ ([(export file, text)], [protocol log files or directories])."""
    exports: list[tuple[Path, str]] = []
    logs: list[Path] = []
    for path in paths:
        if path.is_dir():
            logs.append(path)
            continue
        try:
            with path.open("rb") as file:
                # A protocol log is told by its header: it is streamed later, not read whole here.
                head = file.read(_LOG_HEAD_BYTES)
                if is_receive_protocol_log(decode_export(head)):
                    logs.append(path)
                    continue
                text = decode_export(head + file.read())
        except OSError as exc:
            raise _fail(f"{path}: cannot read ({exc.strerror})") from None
        exports.append((path, text))
    return exports, logs


def _accepted_domains(config_path: Path, extra: list[str]) -> list[str]:
    domains = list(extra)
    try:
        raw = config_path.read_bytes()
    except FileNotFoundError:
        return domains
    except OSError as exc:
        raise _fail(f"{config_path}: cannot read the config ({exc.strerror})") from None
    try:
        text = raw.decode(
            "utf-8-sig"
        )  # a byte order mark (Notepad) is dropped, as load_config does
    except UnicodeDecodeError as exc:
        raise _fail(f"{config_path}: the config is not UTF-8 ({exc})") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return domains
    for entry in doc.get("accepted_domains", []):
        if (
            isinstance(entry, dict)
            and isinstance(entry.get("domain"), str)
            and entry["domain"] not in domains
        ):
            domains.append(entry["domain"])
    return domains


def _connector_table(connector: dict[str, Any], sources: list[str]) -> TomlTable:
    table = tomlkit.table()
    origin = ", ".join(sources) if sources else connector["name"]
    table.add(tomlkit.comment(f"imported from Exchange {origin}"))
    for key, value in connector.items():
        if key == "permissions":
            continue
        table[key] = value
    permissions = connector.get("permissions", [])
    if permissions:
        aot = tomlkit.aot()
        for entry in permissions:
            sub = tomlkit.table()
            for key, value in entry.items():
                sub[key] = value
            aot.append(sub)
        table.append("permissions", aot)
    return table


def _toml_for(result: ImportResult, *, send: bool = False) -> str:
    doc = tomlkit.document()
    aot = tomlkit.aot()
    connectors = result.send_connectors if send else result.connectors
    for connector in connectors:
        sources = [] if send else result.sources.get(connector["name"], [])
        table = _connector_table(connector, sources)
        if aot.body:
            table.trivia.indent = "\n"
        aot.append(table)
    if connectors:
        doc["send_connectors" if send else "receive_connectors"] = aot
    return re.sub(r"\n{3,}", "\n\n", tomlkit.dumps(doc))


def _apply_proposed_ranges(result: ImportResult, usage: UsageReport) -> None:
    for connector in result.connectors:
        proposed = usage.proposed_ranges(connector["name"])
        if proposed and not relays_anonymously(connector):
            # Who may relay is not at stake: narrowing would only refuse senders not seen (the
            # Internet's mail for the accepted domains, roaming users who authenticate).
            result.warnings.append(
                f"{connector['name']}: remote_ip_ranges not narrowed: anonymous clients cannot relay "
                "through it (it takes mail for the accepted domains, or relays after AUTH only), so "
                f"narrowing it to the {len(proposed)} address(es) seen in the protocol logs would refuse "
                "every other sender"
            )
        elif proposed:
            result.warnings.append(
                f"{connector['name']}: remote_ip_ranges narrowed from the protocol logs to {', '.join(proposed)} "
                f"(was {', '.join(connector.get('remote_ip_ranges', [])) or 'empty'})"
            )
            connector["remote_ip_ranges"] = proposed
            if connector["name"] in result.disabled_open_relays and not is_open_relay(connector):
                connector["enabled"] = True
                result.warnings.append(
                    f"{connector['name']}: enabled again: the ranges narrowed from the protocol logs no "
                    "longer make it an open relay"
                )
        else:
            result.warnings.append(
                f"{connector['name']}: no accepted message in the protocol logs; remote_ip_ranges left as exported"
            )


def _print_usage(console: Console, usage: UsageReport, result: ImportResult) -> None:
    imported = {c["name"].lower(): c for c in result.connectors}
    for key in sorted(usage.connectors, key=str.lower):
        connector = usage.connectors[key]
        table = Table(
            title=escape(f"Protocol-log usage: {connector.connector_id}"), title_justify="left"
        )
        table.add_column("Client IP", no_wrap=True)
        for column in ("Sessions", "Messages"):
            table.add_column(column, justify="right")
        table.add_column("Accepted recipients by domain")
        table.add_column("Relayed", justify="right", no_wrap=True)
        table.add_column("Relay denied", justify="right")
        table.add_column("Last seen (UTC)", no_wrap=True)
        for client in sorted(connector.clients.values(), key=lambda c: c.messages, reverse=True):
            relayed = client.relayed(usage.accepted_domains)
            relayed_text = "?" if relayed is None else (f"yes ({relayed})" if relayed else "no")
            table.add_row(
                escape(client.ip),
                str(client.sessions),
                str(client.messages),
                escape(
                    ", ".join(
                        f"{d or '(none)'} {n}" for d, n in sorted(client.recipient_domains.items())
                    )
                    or "-"
                ),
                relayed_text,
                str(client.relay_denied),
                escape(client.last_seen.replace("T", " ").rstrip("Z")),
            )
        console.print(table)
        proposed = connector.proposed_ranges()
        console.print(
            f"  proposed remote_ip_ranges: {escape(', '.join(proposed)) or '(no sender)'}"
        )
        current = imported.get(connector.name.lower())
        if current is not None:
            console.print(
                f"  exported remote_ip_ranges: {escape(', '.join(current.get('remote_ip_ranges', [])))}"
            )
        quiet = [c.ip for c in connector.clients.values() if c.messages == 0]
        if quiet:
            console.print(
                f"  connected without sending (not in the proposal): {escape(', '.join(sorted(quiet)))}"
            )
    if not usage.accepted_domains:
        console.print(
            "  (relayed = ?: give --accepted-domain or a config with [[accepted_domains]] to tell)",
            markup=False,
        )
    for warning in usage.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")


def _read_logs(paths: list[Path], accepted_domains: list[str]) -> UsageReport:
    """`analyze_protocol_logs` with a progress bar on stderr when it is a terminal."""
    err = Console(stderr=True)
    if not err.is_terminal:
        return analyze_protocol_logs(paths, accepted_domains)
    columns = (
        TextColumn("reading protocol logs"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, path: Path) -> None:
            bar.update(task, total=total, completed=done, description=escape(path.name))

        return analyze_protocol_logs(paths, accepted_domains, progress)


def _print_lists(console: Console, result: ImportResult) -> None:
    for error in result.errors:
        console.print(f"[red]error:[/] {escape(error)}")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if result.skipped:
        console.print(
            f"skipped {len(result.skipped)} Exchange setting(s) RelayGate has no key for:"
        )
        for item in result.skipped:
            console.print(f"  {escape(item)}")


def _disabled(connector: dict[str, Any]) -> bool:
    return connector.get("enabled", True) is False


def _named(connector: dict[str, Any]) -> str:
    """A connector's name in the summary, saying when it is written disabled (an open relay, a
    list cut short, Enabled False in Exchange): the name alone read as a live connector."""
    name = str(connector["name"])
    if _disabled(connector):
        return f"{name} (disabled: enabled = false, see the warnings above)"
    return name


def _write(config_path: Path, result: ImportResult) -> list[str]:
    """Merge into the config file through `relaygate.config.edit` (comments kept, validated as `check`
    validates, atomic write); → the problems that refused the write (empty when written)."""
    if result.errors:
        return [*result.errors, "nothing written"]
    if not result.connectors and not result.send_connectors:
        return ["no receive connector to write"]

    def mutate(doc: TOMLDocument) -> None:
        clashes = []
        for array, kind, connectors in (
            ("receive_connectors", "receive", result.connectors),
            ("send_connectors", "send", result.send_connectors),
        ):
            names = {str(t.get("name", "")).lower() for t in ed.tables(doc, array)}
            clashes += [(kind, c["name"]) for c in connectors if c["name"].lower() in names]
        if clashes:
            raise ed.EditError(
                "\n".join(
                    f"{config_path}: a {kind} connector named {name!r} already exists; remove or rename it first"
                    for kind, name in clashes
                )
            )
        for connector in result.connectors:
            table = _connector_table(connector, result.sources.get(connector["name"], []))
            table.trivia.indent = "\n"
            ed.append_table(doc, "receive_connectors", table)
        for connector in result.send_connectors:
            table = _connector_table(connector, [])
            table.trivia.indent = "\n"
            ed.append_table(doc, "send_connectors", table)

    try:
        ed.apply_edit(config_path, mutate, create=True)
    except ed.EditError as exc:
        return str(exc).splitlines()
    except ConfigError as exc:
        return [str(problem) for problem in exc.problems]
    return []


def exchange(
    files: list[Path] = typer.Argument(
        ...,
        help="Get-ReceiveConnector / Get-SendConnector / Get-ADPermission exports (Format-List, "
        "ConvertTo-Json, Export-Csv) "
        "and RECV*.LOG protocol logs or their directories; detected by content.",
        show_default=False,
    ),
    permissions: list[Path] = typer.Option(
        [], "--permissions", help="Get-ADPermission output for the connectors (repeatable)."
    ),
    logs: list[Path] = typer.Option(
        [], "--logs", help="A RECV*.LOG file or a directory of them (repeatable)."
    ),
    accepted_domain: list[str] = typer.Option(
        [],
        "--accepted-domain",
        help="An accepted domain, to tell relayed recipients apart (default: the config's accepted_domains).",
    ),
    narrow_ranges: bool = typer.Option(
        False,
        "--narrow-ranges",
        help="Replace remote_ip_ranges with the ranges proposed from the logs.",
    ),
    all_values: bool = typer.Option(
        False,
        "--all-values",
        help="Write every parameter, not only those that differ from Exchange's defaults.",
    ),
    write: bool = typer.Option(
        False, "--write", help="Merge into the config file (validated, atomic)."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Config file (default: $RELAYGATE_CONFIG or ./relaygate.toml)."
    ),
    as_json: bool = typer.Option(
        False,
        "--json",
        help="Print a JSON object instead of TOML and tables.",
        callback=remember_json,
    ),
) -> None:
    """Turn exported Exchange receive and send connectors (and protocol logs) into RelayGate connectors."""
    config_path = _config_path(config)
    exports, log_paths = _classify([*files, *permissions])
    log_paths.extend(logs)
    results: list[ImportResult] = []
    for path, text in exports:
        try:
            if detect_format(text) == "protocol-log":
                raise ExchangeImportError(
                    "an Exchange log that is not an SMTP receive protocol log"
                )
            results.append(parse_exchange_export(text, filename=str(path), full=all_values))
        except ExchangeImportError as exc:
            raise _fail(f"{path}: {exc}" if str(path) not in str(exc) else str(exc)) from None
    result = combine_results(results)
    usage = None
    if log_paths:
        missing = [p for p in log_paths if not p.exists()]
        if missing:
            raise _fail(f"{missing[0]}: no such file or directory")
        started = time.monotonic()
        usage = _read_logs(log_paths, _accepted_domains(config_path, accepted_domain))
        elapsed = time.monotonic() - started
        if narrow_ranges:
            _apply_proposed_ranges(result, usage)
    elif narrow_ranges:
        raise _fail("--narrow-ranges needs protocol logs (--logs)")

    problems: list[str] = []
    if write:
        problems = _write(config_path, result)

    if as_json:
        payload = {
            "connectors": result.connectors,
            "send_connectors": result.send_connectors,
            "permissions": result.permissions,
            "warnings": result.warnings,
            "skipped": result.skipped,
            "errors": result.errors,
            "sources": result.sources,
            "usage": usage.to_dict() if usage is not None else None,
            "written": str(config_path) if write and not problems else None,
            "disabled": [
                c["name"] for c in (*result.connectors, *result.send_connectors) if _disabled(c)
            ],
            "problems": problems,
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        console = Console(
            highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 160
        )
        if result.connectors and not (write and not problems):
            typer.echo(f"# receive connectors to add to {config_path} (dry run; --write to merge)")
            typer.echo(_toml_for(result))
        if result.send_connectors and not (write and not problems):
            typer.echo(f"# send connectors to add to {config_path} (dry run; --write to merge)")
            typer.echo(_toml_for(result, send=True))
        _print_lists(console, result)
        if usage is not None:
            _print_usage(console, usage, result)
            console.print(
                f"read {len(usage.files)} protocol log file(s), {usage.bytes / 1e6:,.1f} MB, "
                f"{usage.lines:,} lines in {elapsed:.1f} s"
            )
        if write and not problems and result.connectors:
            names = ", ".join(_named(c) for c in result.connectors)
            console.print(
                f"wrote {len(result.connectors)} connector(s) to {escape(str(config_path))}: {escape(names)}"
            )
        if write and not problems and result.send_connectors:
            names = ", ".join(_named(c) for c in result.send_connectors)
            console.print(
                f"wrote {len(result.send_connectors)} send connector(s) to {escape(str(config_path))}: "
                f"{escape(names)}"
            )
    if problems:
        err = Console(stderr=True, highlight=False, soft_wrap=True)
        err.print(f"[red]refused:[/] {escape(str(config_path))} was not changed")
        for problem in problems:
            err.print(f"  {escape(problem)}")
        raise typer.Exit(1)
    sys.stdout.flush()
