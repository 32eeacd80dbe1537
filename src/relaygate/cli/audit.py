"""`relaygate audit`: findings with severity and the fix; exit 1 when any finding is high."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from relaygate.audit import audit, has_high, summary
from relaygate.certificates import read_expiries
from relaygate.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    config_source,
    console,
    emit_json,
    load_or_exit,
)
from relaygate.config.model import Config
from relaygate.config.relative_paths import as_the_relay_reads
from relaygate.dkim.keys import rsa_key_sizes
from relaygate.smtp.auth import UserStore, users_path

_STYLE = {"high": "bold red", "medium": "yellow", "low": "cyan", "info": "dim"}


def _users_without_send_as(config: Config) -> list[str]:
    """The SMTP AUTH users with no send-as list (a users file that cannot be read: none; the
    server reports that file itself)."""
    try:
        store = UserStore(users_path(Path(config.server.data_dir), config.server.users_file))
    except (OSError, ValueError):
        return []
    return store.without_send_as()


def register(app: typer.Typer) -> None:
    @app.command("audit")
    def audit_cmd(
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
        max_prefix_v4: int = typer.Option(
            24,
            "--max-prefix-v4",
            min=0,
            max=32,
            help="Relay ranges wider than this IPv4 prefix are high.",
        ),
        max_prefix_v6: int = typer.Option(
            64,
            "--max-prefix-v6",
            min=0,
            max=128,
            help="Relay ranges wider than this IPv6 prefix are high.",
        ),
    ) -> None:
        """Flag open relays, over-broad ranges, overlaps, missing limits, logging off, TLS off,
        certificates expired or expiring within 30 days."""
        # Relative file paths as the running relay reads them (from its working directory)
        cfg, relative = as_the_relay_reads(load_or_exit(config))
        # The certificates' expiry dates, read from their files (one that cannot be read is a
        # `check` error, not repeated here).
        findings = audit(
            cfg,
            max_prefix_v4=max_prefix_v4,
            max_prefix_v6=max_prefix_v6,
            certificates=read_expiries(cfg),
            users_without_send_as=_users_without_send_as(cfg),
            relative_files=relative,
            dkim_key_sizes=rsa_key_sizes(cfg),
        )
        counts = summary(findings)
        source = config_source(config)
        if json_out:
            emit_json(
                {
                    "source": source,
                    "findings": [f.to_dict() for f in findings],
                    "summary": counts,
                    "exit_code": 1 if has_high(findings) else 0,
                }
            )
        elif not findings:
            console.print(f"{source}: no findings.", markup=False)
        else:
            table = Table(header_style="bold", show_lines=True)
            table.add_column("Severity")
            table.add_column("Connector", overflow="fold")
            table.add_column("Key", overflow="fold")
            table.add_column("Finding", overflow="fold", ratio=3)
            table.add_column("Fix", overflow="fold", ratio=2)
            for f in findings:
                table.add_row(
                    Text(f.severity.upper(), style=_STYLE[f.severity]),
                    Text(f.connector or "(server)"),
                    Text(f.key),
                    Text(f.message),
                    Text(f.fix),
                )
            console.print(table)
            parts = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
            console.print(f"{source}: {len(findings)} finding(s): {parts}.", markup=False)
        if has_high(findings):
            raise typer.Exit(1)
