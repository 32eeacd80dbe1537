"""File descriptors for the connections the configuration allows.

Every SMTP session, delivery connection, log file and database handle is a file descriptor, and
most Linux systems start a service with a soft RLIMIT_NOFILE of 1024 (systemd's default, so that
programs still using select() keep working). With the receive connectors' default
`max_inbound_connection` of 5000 the relay would run out long before its own limit: uvloop (libuv)
then accepts each further connection and closes it at once, so a client sees the connection
drop without a reply, and nothing is logged.

So at start-up the soft limit is raised to the hard limit (what systemd.exec(5) advises programs
that need more to do themselves, and what Go's runtime does); the event loop uses epoll, never
select(). If even the hard limit is below what the configuration can need, a warning names the
keys behind the figure and how to raise it.
"""

from __future__ import annotations

import logging
import resource

from relaygate.config.model import Config

__all__ = ["RESERVED", "descriptors_needed", "raise_fd_limit"]

logger = logging.getLogger("relaygate")

#: Descriptors a process uses besides SMTP connections: the queue database and its WAL, readers
#: and writer, spool files, protocol and tracking logs, the admin listener and its clients, DNS
#: sockets, the supervisor link. Measured at ~30 on an idle relay; the rest is headroom.
RESERVED = 256

#: Linux's default fs.nr_open: the most a soft limit can be when the hard limit is "unlimited".
_NR_OPEN_DEFAULT = 1024 * 1024


def descriptors_needed(config: Config) -> int | None:
    """Descriptors one process may need: the inbound connections every enabled receive connector
    allows (each worker counts its own), one per concurrent delivery, and `RESERVED`. None when
    an enabled connector has no `max_inbound_connection` (unlimited): no figure is enough."""
    inbound = 0
    for connector in config.receive_connectors:
        if not connector.enabled:
            continue
        if connector.max_inbound_connection is None:
            return None
        inbound += connector.max_inbound_connection
    return inbound + config.queue.max_concurrent_deliveries + RESERVED


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return _NR_OPEN_DEFAULT


def raise_fd_limit(config: Config) -> None:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; warn if that is not enough."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = _nr_open() if hard == resource.RLIM_INFINITY else hard
    after = soft
    if soft != resource.RLIM_INFINITY and soft < ceiling:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
            after = ceiling
        except (OSError, ValueError) as exc:
            logger.warning("cannot raise the file descriptor limit from %d: %s", soft, exc)
    needed = descriptors_needed(config)
    if after != soft:
        logger.info("file descriptor limit raised from %d to %d", soft, after)
    if needed is not None and after < needed:
        connectors = ", ".join(
            f"'{c.name}' {c.max_inbound_connection}" for c in config.receive_connectors if c.enabled
        )
        logger.warning(
            "file descriptor limit %d (hard limit %d) is below the %d this configuration can "
            "need (receive connectors' max_inbound_connection: %s; queue.max_concurrent_deliveries "
            "%d; %d for the queue, logs and admin): past it clients are disconnected without a "
            "reply. Raise the hard limit (LimitNOFILE= in the systemd unit, `ulimit -Hn` as root) "
            "or lower max_inbound_connection",
            after,
            ceiling,
            needed,
            connectors,
            config.queue.max_concurrent_deliveries,
            RESERVED,
        )
