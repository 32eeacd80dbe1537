"""systemd's service notifications (``Type=notify``): ready, reloading, stopping, status, watchdog.

Under systemd with ``Type=notify`` (packaging/relaygate.service) the service is "active" only when
``relaygate serve`` says ``READY=1``, that is once every SMTP listener (and every worker, with
``server.workers`` > 1) accepts connections: units ordered after it, and ``systemctl start``
itself, wait for that instead of for the fork. ``systemctl reload`` (SIGHUP) shows as
``reloading`` until the configuration is applied, and ``systemctl stop`` as ``deactivating``
while sessions and deliveries finish. With ``WatchdogSec=`` set, the process that systemd
started pings the watchdog from its main loop, so a loop that stops turning (a hang) gets the
service restarted.

The protocol is one datagram per message on the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(``@`` for the abstract namespace), ``KEY=VALUE`` lines. Without that variable (not started by
systemd), every call does nothing. Only the process systemd started notifies (the supervisor, or
the single process): the supervisor takes the variables out of its workers' environment.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["ENV_VARS", "Notifier", "watchdog_interval"]

logger = logging.getLogger("relaygate")

#: The variables systemd sets for the notifying process, which workers must not inherit.
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def watchdog_interval() -> float | None:
    """Seconds between watchdog pings (half of ``WatchdogSec=``, as sd_watchdog_enabled(3)
    advises), or None when systemd expects none from this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6


class Notifier:
    """Sends notifications to ``$NOTIFY_SOCKET``, read once at construction."""

    def __init__(self) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send ``fields`` (``"READY=1"``, ``"STATUS=..."``) as one message; never raises: a
        relay does not stop because systemd's socket went away."""
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields).encode(), self._address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                logger.warning("cannot notify systemd at $NOTIFY_SOCKET: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        # MONOTONIC_USEC: systemd (253+, Type=notify-reload) matches it to the reload it asked for
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=reloading the configuration")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=stopping: finishing sessions and deliveries")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
