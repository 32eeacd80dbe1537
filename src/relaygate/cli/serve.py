"""`relaygate serve`: run listeners, queue, delivery and the admin centre."""

from __future__ import annotations

from pathlib import Path

import typer

from relaygate.cli.common import CONFIG_OPTION, load_or_exit


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(config: Path | None = CONFIG_OPTION) -> None:
        """Run the relay (with no config file: the safe embedded default on 127.0.0.1:2525)."""
        load_or_exit(config)  # print every problem and exit 1 before binding anything
        from relaygate.app import run

        run(config)
