"""A supervised worker's side of its link to the supervisor (relaygate.workers).

What a worker says on its link (ready, the configuration it applied, heartbeats), how it tells
that the supervisor is gone, and what the supervisor hands it through its environment: whether
it is supervised or started again, the configuration text to start with, the queue store the
node started with. Separate from the supervisor because these run in the worker (relaygate.app
imports them, through relaygate.workers, which re-exports every name here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import select
import socket
from pathlib import Path

from relaygate.config import Config, parse_text
from relaygate.config.loader import read_config_text

logger = logging.getLogger("relaygate.workers")


#: Set by the supervisor for its workers: the queue store the node started with, and its
#: server.acme_directory_url as last applied (JSON).
PINNED_QUEUE_ENV = "RELAYGATE_WORKER_QUEUE"
#: The longest a worker waits between two heartbeats (`heartbeat_interval`).
HEARTBEAT_MAX = 5.0
#: What the supervisor writes on a worker's link, the only thing it ever writes there: a second
#: stop signal reached it, the worker cuts its sessions and deliveries short (relaygate.app).
HURRY_LINE = b"hurry\n"


def worker_ready(
    link: socket.socket, *, endpoints: str, admin: str, config: str | None = None
) -> None:
    """Called by a worker once it listens: tell the supervisor (one JSON line on the link), with
    the digest of the configuration text it runs (`text_digest`)."""
    said = {"pid": os.getpid(), "endpoints": endpoints, "admin": admin, "config": config}
    link.sendall((json.dumps(said) + "\n").encode())


def config_applied(link: socket.socket, digest: str) -> None:
    """Called by a worker that applied a reload: the digest of the text it now runs."""
    with contextlib.suppress(OSError):  # the supervisor is gone (EOF stops us) or a full buffer
        link.send(b'{"config": "%s"}\n' % digest.encode())


def text_digest(text: str) -> str:
    """What names a configuration text on the link (the supervisor keeps the texts)."""
    return hashlib.sha256(text.encode()).hexdigest()


def supervised_worker() -> bool:
    """Whether this process is a worker its supervisor hands its configuration (`handed_config`):
    it does not read the config file itself."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    return bool(raw and json.loads(raw).get("node_config"))


def started_again() -> bool:
    """Whether this process is a worker its supervisor started again (the worker of its index
    before it exited): files the node's configuration names may have broken since the node
    started (a reload refused them), and such a worker serves without what cannot be loaded
    rather than exit at every restart. At the node's start they must all load."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    return bool(raw and json.loads(raw).get("started_again"))


def handed_config(config_path: Path, which: str) -> tuple[Config, str] | None:
    """A supervised worker's configuration: the text its supervisor handed it (``"node"``: what
    the node runs, to start with; ``"offered"``: a reload), parsed as the config file (its
    name in messages, relative paths from its directory), and that text's digest. None when
    the process was not started by a supervisor that hands its workers their configuration."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    handed = json.loads(raw).get(f"{which}_config") if raw else None
    if not handed:
        return None
    text = read_config_text(Path(handed))
    return parse_text(text, str(config_path), base_dir=config_path.parent), text_digest(text)


def heartbeat_interval(config: Config) -> float:
    """How often a worker tells its supervisor that its event loop turns: a few times per
    ``server.worker_hang_timeout``, at most every 5 s."""
    timeout = config.server.worker_hang_timeout.total_seconds()
    return max(0.2, min(HEARTBEAT_MAX, timeout / 4)) if timeout > 0 else HEARTBEAT_MAX


def send_heartbeat(link: socket.socket, every: float = HEARTBEAT_MAX) -> None:
    """One heartbeat line on the worker's (non-blocking) link, with the worker's interval until
    the next one (`every`); a full buffer skips one."""
    with contextlib.suppress(OSError):  # full (skip one), or the supervisor is gone (EOF stops us)
        link.send(b'{"alive": 1, "every": %.3f}\n' % every)


def supervisor_alive(link_fd: int) -> bool:
    """Whether the supervisor at the other end of a worker's link still runs: the link is at EOF
    (the supervisor closed it, or died, SIGKILL included: the kernel closes its end as the process
    exits) when it is readable with nothing to read (the supervisor writes only HURRY_LINE)."""
    link = socket.socket(fileno=link_fd)
    try:
        if not select.select([link], [], [], 0)[0]:
            return True
        try:
            return link.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:  # reset: the other end is gone
            return False
    finally:
        link.detach()  # the descriptor stays the worker's (relaygate.app._main reads it)


def _pinned_balance(config: Config, balance: str | None) -> Config:
    """`config` with the node's worker_balance (its supervisor's start's): the open-connection
    table is made, or not, for it (relaygate.node_connections), and a worker started again after
    a reload that changed it (which waits for a restart) balances and counts as its siblings."""
    if balance is None or balance == config.server.worker_balance:
        return config
    logger.warning(
        "server.worker_balance changed since relaygate serve started: this worker keeps its "
        "siblings' (%s) until relaygate serve restarts",
        balance,
    )
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, worker_balance=balance)
    )


def pinned_queue(config: Config) -> Config:
    """A worker's config with the queue store, data directory and worker_balance its
    supervisor started with (see ``_spawn``), and ACME on or off as the supervisor last applied
    it (only the supervisor runs the client)."""
    raw = os.environ.get(PINNED_QUEUE_ENV)
    if not raw:
        return config
    pinned = json.loads(raw)
    url = pinned.get("acme_directory_url")
    if url is not None and bool(url) != bool(config.server.acme_directory_url):
        logger.warning(
            "server.acme_directory_url: ACME on or off as the supervisor last applied it (the "
            "file says otherwise: this worker keeps ACME as its siblings until the next reload)"
        )
        server = dataclasses.replace(config.server, acme_directory_url=url)
        config = dataclasses.replace(config, server=server)
    config = _pinned_balance(config, pinned.get("worker_balance"))
    data_dir = pinned.get("data_dir")
    if data_dir is not None and Path(data_dir) != config.server.data_dir:
        logger.warning(
            "server.data_dir changed since relaygate serve started: this worker keeps the data "
            "directory of its siblings (%s) until relaygate serve restarts",
            data_dir,
        )
        server = dataclasses.replace(config.server, data_dir=Path(data_dir))
        config = dataclasses.replace(config, server=server)
    queue = config.queue
    if (queue.store, queue.database_url) == (pinned["store"], pinned["database_url"]):
        return config
    logger.warning(
        "queue.store or queue.database_url changed since relaygate serve started: this worker "
        "keeps the queue of its siblings until relaygate serve restarts"
    )
    return dataclasses.replace(
        config,
        queue=dataclasses.replace(
            queue, store=pinned["store"], database_url=pinned["database_url"]
        ),
    )
