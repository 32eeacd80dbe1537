"""The rules of [queue] (`_queue_rules`): time spans, the lease, the PostgreSQL URL and message
size (`PG_MAX_MESSAGE_SIZE`), server.name on a shared queue (`_cluster_name_rules`).

Apart from the connector rules: they read the queue's keys and the store it uses."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta

from relaygate.config.loader import Problem
from relaygate.config.model import Config
from relaygate.config.validate_values import _not_an_address
from relaygate.config.values import format_timespan

#: The biggest message the PostgreSQL queue takes: a bytea value holds at most 1 GB, and the
#: stored message is the received one plus its Received header.
PG_MAX_MESSAGE_SIZE = 1023 * 1024 * 1024

#: TransientFailureRetryCount and MessageExpirationTimeout's upper bounds (exchange-semantics.md §7.3).
MAX_TRANSIENT_FAILURE_RETRY_COUNT = 15
MAX_MESSAGE_EXPIRATION = timedelta(days=90)

#: A lease renewed every third of its length must outlast a delivery's slowest reply wait.
_MIN_LEASE = timedelta(seconds=3)
#: A server.name of the form the worker processes' lease owners take (app.worker_node_id:
#: "<server.name>-w<index>"), found whole in the name.
_WORKER_OWNER_NAME = re.compile(r"(.+)-w[0-9]+")


#: [queue] time spans that 00:00:00 makes harmful (an admin may write it for "none"), and why.
_QUEUE_SPANS_ABOVE_ZERO = (
    (
        "message_expiration_timeout",
        "which expires every message before its first delivery attempt (each gets an NDR); "
        "Exchange's default is 2.00:00:00",
    ),
    ("transient_failure_retry_interval", "which retries a failing destination without pause"),
    ("message_retry_interval", "which retries a failing destination without pause"),
)


def _cluster_name_rules(config: Config) -> list[Problem]:
    """server.name on a shared queue: not a lease owner of another node's worker. The workers
    of node "edge" lease as "edge-w<i>" and a start of "edge" drops those owners' leases, so a
    node named "edge-w1" would share its owner with one of them and lose its leases in flight to
    the other nodes: its messages delivered twice. (On SQLite the queue is this node's alone.)"""
    name = str(config.server.name)
    match = _WORKER_OWNER_NAME.fullmatch(name)
    if match is None:
        return []
    return [
        Problem(
            config.source,
            "server.name",
            f"{name!r} ends in -w<number>, the queue lease owner of the worker processes of a "
            f"node named {match.group(1)!r}: on a shared queue the two nodes would take each "
            "other's leases and deliver messages twice; choose a name without it "
            f"(e.g. {match.group(1) + '-W' + name[match.end(1) + 2 :]!r})",
        )
    ]


def _exchange_range_rules(config: Config) -> list[Problem]:
    """The upper bounds Set-TransportService puts on the retry count and the expiry (§7.3). No
    lower bound on the expiry (Exchange's is 5 s): tests and labs shorten it to seconds."""
    src, q = config.source, config.queue
    problems: list[Problem] = []
    count = q.transient_failure_retry_count
    if count > MAX_TRANSIENT_FAILURE_RETRY_COUNT:
        problems.append(
            Problem(
                src,
                "queue.transient_failure_retry_count",
                f"{count} is outside the allowed range 0-{MAX_TRANSIENT_FAILURE_RETRY_COUNT}",
            )
        )
    if q.message_expiration_timeout > MAX_MESSAGE_EXPIRATION:
        problems.append(
            Problem(
                src,
                "queue.message_expiration_timeout",
                f"must be at most {format_timespan(MAX_MESSAGE_EXPIRATION)} (Exchange's limit)",
            )
        )
    return problems


def _queue_rules(config: Config, position: Callable[[int], int]) -> list[Problem]:
    """[queue] keys; `position(i)`: the file index of the i-th receive connector."""
    src, q = config.source, config.queue
    problems: list[Problem] = []
    for key, harm in _QUEUE_SPANS_ABOVE_ZERO:
        if key == "transient_failure_retry_interval" and q.transient_failure_retry_count == 0:
            continue  # never waited: no fast retry is made (a file may say 00:00:00 for "none")
        if getattr(q, key) <= timedelta(0):
            problems.append(Problem(src, f"queue.{key}", f"must be greater than 00:00:00, {harm}"))
    problems.extend(_exchange_range_rules(config))
    if q.lease_duration < _MIN_LEASE:
        problems.append(
            Problem(src, "queue.lease_duration", "must be at least 00:00:03 (3 seconds)")
        )
    admin = q.admin_notification_address.strip()
    if admin:
        why = _not_an_address(admin)
        if why is not None:
            problems.append(
                Problem(
                    src,
                    "queue.admin_notification_address",
                    f"{admin!r} is not a mail address (name@domain){why}",
                )
            )
    if q.store != "postgresql":
        return problems
    problems.extend(_cluster_name_rules(config))
    for i, c in enumerate(config.receive_connectors):
        if c.max_message_size > PG_MAX_MESSAGE_SIZE:
            problems.append(
                Problem(
                    src,
                    f"receive_connectors[{position(i)}].max_message_size",
                    'at most 1023MB with queue.store = "postgresql" (PostgreSQL stores a value '
                    "of at most 1 GB: a bigger message would be accepted and never stored)",
                    c.name,
                )
            )
    if not q.database_url.strip():
        problems.append(
            Problem(
                src,
                "queue.database_url",
                'required with store = "postgresql", e.g. '
                '"postgresql://relaygate@db.corp.example/relaygate"',
            )
        )
        return problems
    url = q.database_url.strip()
    if "://" in url and not url.startswith(("postgresql://", "postgres://")):
        problems.append(
            Problem(
                src,
                "queue.database_url",
                "must start with postgresql:// (or be a libpq key=value string)",
            )
        )
        return problems
    from psycopg.conninfo import conninfo_to_dict

    try:
        conninfo_to_dict(url)
    except Exception as exc:  # psycopg.ProgrammingError: its message names what is wrong
        # ...and quotes the offending part of the URL, which may be the password (`check`
        # prints it, `serve` and a refused reload log it): the quoted parts are left out.
        reason = _QUOTED.sub('"…"', " ".join(str(exc).split()))
        problems.append(Problem(src, "queue.database_url", f"not a valid PostgreSQL URL: {reason}"))
    return problems


#: A quoted part of a libpq error message (a token, or the whole URL).
_QUOTED = re.compile(r'"[^"]*"')
