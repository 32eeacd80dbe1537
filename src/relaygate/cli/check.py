"""`relaygate check`: validate the configuration, listing every error at once."""

from __future__ import annotations

from pathlib import Path

import typer

from relaygate.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    config_source,
    console,
    emit_json,
    print_problems,
    problems_json,
)
from relaygate.config import ConfigError, load_config


def register(app: typer.Typer) -> None:
    @app.command()
    def check(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        """Validate the config file; exit 1 with every error listed."""
        source = config_source(config)
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            if json_out:
                emit_json({"valid": False, "source": source, "errors": problems_json(exc.problems)})
            else:
                print_problems(exc.problems, console)
                console.print(f"{source}: {len(exc.problems)} error(s)", markup=False)
            raise typer.Exit(1) from None
        summary = {
            "valid": True,
            "source": source,
            "receive_connectors": len(cfg.receive_connectors),
            "send_connectors": len(cfg.send_connectors),
            "accepted_domains": len(cfg.accepted_domains),
        }
        if json_out:
            emit_json(summary)
        else:
            console.print(
                f"{source}: OK ({summary['receive_connectors']} receive connector(s), "
                f"{summary['send_connectors']} send connector(s), {summary['accepted_domains']} accepted domain(s))",
                markup=False,
            )
