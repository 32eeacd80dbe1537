"""`relaygate serve`: run listeners, queue, delivery and the admin centre."""

from __future__ import annotations

from pathlib import Path

import typer

from relaygate.cli.common import CONFIG_OPTION, load_or_exit

# Set by the supervisor when `server.workers` > 1 (relaygate.workers); not for administrators.
WORKER_INDEX_OPTION = typer.Option(None, "--worker-index", hidden=True)
WORKER_LINK_OPTION = typer.Option(None, "--worker-link-fd", hidden=True)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path | None = CONFIG_OPTION,
        worker_index: int | None = WORKER_INDEX_OPTION,
        worker_link_fd: int | None = WORKER_LINK_OPTION,
    ) -> None:
        """Run the relay (with no config file: the safe embedded default on 127.0.0.1:2525).

        With `server.workers` > 1 it supervises that many worker processes sharing the ports."""
        load_or_exit(config)  # print every problem and exit 1 before binding anything
        from relaygate.app import run

        run(config, worker_index=worker_index, link_fd=worker_link_fd)
