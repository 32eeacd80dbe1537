"""`relaygate serve`: run listeners, queue, delivery and the admin centre."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import typer

from relaygate.cli.common import CONFIG_OPTION, load_or_exit

# Set by the supervisor when `server.workers` > 1 (relaygate.workers); not for administrators.
WORKER_INDEX_OPTION = typer.Option(None, "--worker-index", hidden=True)
WORKER_LINK_OPTION = typer.Option(None, "--worker-link-fd", hidden=True)
LOG_FORMAT_OPTION = typer.Option(
    None,
    "--log-format",
    metavar="text|json",
    help="The service log on stderr: text lines or one JSON object a line "
    "(default: server.log_format). Applies before the config file is read.",
)
LOG_LEVEL_OPTION = typer.Option(
    None,
    "--log-level",
    metavar="DEBUG|INFO|WARNING|ERROR",
    help="The service log's least severe level (default: server.log_level).",
)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path | None = CONFIG_OPTION,
        log_format: str | None = LOG_FORMAT_OPTION,
        log_level: str | None = LOG_LEVEL_OPTION,
        worker_index: int | None = WORKER_INDEX_OPTION,
        worker_link_fd: int | None = WORKER_LINK_OPTION,
    ) -> None:
        """Run the relay (with no config file: the safe embedded default on 127.0.0.1:2525).

        With `server.workers` > 1 it supervises that many worker processes sharing the ports.
        --log-format and --log-level win over server.log_format and server.log_level, at start
        and on reloads, in the supervisor and every worker."""
        from relaygate.logs import service

        service.hold_standard_fds()  # before anything opens a file that could take 0, 1 or 2
        # A reload asked for before the handler is in place (the start may wait up to 120 s for
        # a killed supervisor's workers: relaygate.node_lock) must not stop the process, as the
        # default action does; the file watchers take any edit made meanwhile.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        log_format = _choice("--log-format", log_format, service.LOG_FORMATS)
        log_level = _choice("--log-level", log_level, service.LOG_LEVELS)
        service.set_overrides(log_format=log_format, log_level=log_level)
        start_format = log_format
        if start_format is None and worker_index is not None:
            # a worker started by its supervisor: the supervisor's format until the file is read
            start_format = os.environ.get(service.START_FORMAT_ENV)
        from relaygate.workers import supervised_worker

        if worker_index is not None and supervised_worker():
            pass  # its supervisor parsed the text it hands it (relaygate.app.run reads it)
        elif start_format == "json":
            # A config error at start is a JSON line too (the file's own log_format is unknown).
            service.configure("json", log_level or "INFO", worker=worker_index)
            _load_or_log(config)
        else:
            load_or_exit(config)  # print every problem and exit 1 before binding anything
        from relaygate.app import run

        run(config, worker_index=worker_index, link_fd=worker_link_fd)


def _choice(flag: str, value: str | None, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    for choice in choices:
        if value.lower() == choice.lower():
            return choice
    raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}", param_hint=flag)


def _load_or_log(path: Path | None) -> None:
    """`load_or_exit` in the JSON service log: one error line a problem (with its key and
    connector as fields), then exit 1."""
    from relaygate.config import ConfigError, load_config

    logger = logging.getLogger("relaygate")
    try:
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            logger.error(
                "%s",
                problem,
                extra={
                    "key": problem.path,
                    "connector": problem.connector,
                    "source": problem.source,
                },
            )
        logger.error("cannot start: %d configuration error(s)", len(exc.problems))
        raise typer.Exit(1) from None
