"""Connection and rate accounting per connector and per source (exchange-semantics.md §1.4, §5.4)."""

from __future__ import annotations

import functools
import ipaddress
import logging
import os
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import NamedTuple

from relaygate import replies
from relaygate.config.model import ReceiveConnector
from relaygate.replies import Reply
from relaygate.smtp.shared_rates import SharedRateTable, key_digest

__all__ = [
    "AuthFailures",
    "ConnectionLimits",
    "DataMemory",
    "RateLimiter",
    "SlidingWindow",
    "default_data_memory",
]

logger = logging.getLogger("relaygate.smtp")


def connection_refusal(connector: ReceiveConnector, active: int, from_source: int) -> Reply | None:
    """The 421 for one more session on `connector` with `active` open on it and `from_source`
    from its client's address, or None (relaygate.node_connections counts them for the node)."""
    if connector.max_inbound_connection is not None and active >= connector.max_inbound_connection:
        return replies.SERVER_CONNECTIONS_EXCEEDED
    per_source = connector.max_inbound_connection_per_source
    if per_source is not None and from_source >= per_source:
        return replies.SOURCE_CONNECTIONS_EXCEEDED
    if connector.max_inbound_connection is not None:
        # Percentage of the connections still available on the connector (at least one).
        available = connector.max_inbound_connection - active
        share = max(1, available * connector.max_inbound_connection_percentage_per_source // 100)
        if from_source >= share:
            return replies.SOURCE_CONNECTIONS_EXCEEDED
    return None


@dataclass
class ConnectionLimits:
    """Counts open sessions per connector and per (connector, source IP)."""

    per_connector: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    per_source: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))

    def admit(self, connector: ReceiveConnector, source: str) -> Reply | None:
        """Count a new session in, or return the 421 to send. Call `release` when it ends."""
        name = connector.name
        active = self.per_connector[name]
        from_source = self.per_source[(name, source)]
        refusal = connection_refusal(connector, active, from_source)
        if refusal is None:
            self.per_connector[name] = active + 1
            self.per_source[(name, source)] = from_source + 1
        return refusal

    def release(self, connector: ReceiveConnector, source: str) -> None:
        name = connector.name
        self.per_connector[name] -= 1
        key = (name, source)
        self.per_source[key] -= 1
        if self.per_source[key] <= 0:
            del self.per_source[key]

    def total(self) -> int:
        return sum(self.per_connector.values())


class DataMemory:
    """The message bytes this process holds for messages in transit, against a budget.

    Each session's DATA is bounded by its connector's max_message_size (36 MB by default), but
    thousands of sessions may be in DATA at once: together they could take more memory than the
    machine has, and then every message in flight is lost to the OOM killer. Each session takes
    what it reads from here; when the budget is spent the message is read to its end without
    keeping it and refused with 452 4.3.1 (Exchange's reply under memory back pressure), so the
    client retries later.
    """

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


def default_data_memory(workers: int) -> int:
    """A quarter of the machine's memory, divided among the worker processes (at least 64 MB)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 4 * 1024**3
    return max(64 * 1024**2, total // 4 // max(1, workers))


class SlidingWindow:
    """Events per key in the last `window` seconds. Keys whose events have all expired are
    dropped when the table grows past `max_keys`, so a scan from many sources stays bounded."""

    def __init__(self, window: float, max_keys: int = 65536) -> None:
        self.window = window
        self.max_keys = max_keys
        self._events: dict[object, deque[float]] = {}

    def count(self, key: object, now: float) -> int:
        events = self._events.get(key)
        if events is None:
            return 0
        while events and events[0] <= now - self.window:
            events.popleft()
        if not events:
            del self._events[key]
            return 0
        return len(events)

    def add(self, key: object, now: float) -> None:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._prune(now)
            events = self._events[key] = deque()
        events.append(now)

    def discard(self, key: object, at: float) -> None:
        """Forget one event added at `at` (if it is still in the window)."""
        events = self._events.get(key)
        if events is not None:
            try:
                events.remove(at)
            except ValueError:
                pass

    def _prune(self, now: float) -> None:
        horizon = now - self.window
        for key in [k for k, events in self._events.items() if not events or events[-1] <= horizon]:
            del self._events[key]


class _NodeCounts:
    """What a per-source count needs to be kept for the node with several workers: the table the
    workers share (smtp/shared_rates.py, None with one process) and whether an address's sessions
    may reach several workers (`share_ip`)."""

    #: The configuration key whose counts these are (for the log).
    LIMIT_KEY = ""

    def __init__(self, shared: SharedRateTable | None) -> None:
        #: The node's table shared with the other workers, or None (one process: all local).
        self.shared = shared
        #: Per-address keys in the shared table too: an address's sessions may reach any worker
        #: (`unsteered` or `proxied`, kept by `share_addresses`).
        self.share_ip = False
        self._unsteered = False
        self._proxied = False
        self._degraded_logged = False

    def share_addresses(
        self, *, unsteered: bool | None = None, proxied: bool | None = None
    ) -> None:
        """Whether an address's sessions may reach several workers: `unsteered`, a listener the
        kernel does not steer by client address (`worker_balance = "connection"`, or the
        program was refused); `proxied`, trusted proxies are configured (a client's address then
        comes from the PROXY header, and the kernel steers by the proxy's: a client reaching the
        relay through two proxies may reach two workers)."""
        if unsteered is not None:
            self._unsteered = unsteered
        if proxied is not None:
            self._proxied = proxied
        self.share_ip = self._unsteered or self._proxied

    def _degraded(self, why: str) -> None:
        if not self._degraded_logged:
            self._degraded_logged = True
            logger.warning(
                "shared rate table %s: %s; some %s counts are kept by this worker alone "
                "(logged once)",
                self.shared.path if self.shared is not None else "",
                why,
                self.LIMIT_KEY,
            )


class RateLimiter(_NodeCounts):
    """MessageRateLimit: messages per minute (a sliding 60-second window) per source, where the
    source is what MessageRateSource names: `IPAddress` the client's IP address, `User` the
    authenticated user, `All` both (each counted, either over the limit refuses), `None` no limit.

    An anonymous session on a `User` connector is counted per IP address: Exchange's behaviour
    there is not documented (exchange-semantics.md §1.4 gives only the values), and not counting
    it at all would leave anonymous mail unlimited on a connector that asked for a limit.

    One process (`server.workers = 1`) counts everything here, exactly. With several workers the
    supervisor gives them a table they all count in (`shared`, smtp/shared_rates.py), so a limit
    holds for the node whatever worker a session is on. It is used for the keys whose sessions can
    reach several workers: users always (smtp/steering.py keeps one *address* on one worker, not
    one user); addresses only when `share_ip` is set (`worker_balance = "connection"`, the
    kernel refused the steering program, or trusted proxies: `share_addresses`), since otherwise
    all of an address's sessions are on this worker and counting it here is exact and cheaper.
    The shared table counts in per-second buckets: a message counts for 60 to 61 seconds there
    (never less than the window). A key the shared table has no room for, or a message for which
    its lock could not be had, is counted here (logged once): the limit then holds per worker for
    that key, as before the table existed.

    A message is counted when it is queued and checked at MAIL, so sessions of one source sending
    at the same moment may together pass the limit by at most their number less one."""

    WINDOW = 60.0
    LIMIT_KEY = "message_rate_limit"

    def __init__(self, shared: SharedRateTable | None = None) -> None:
        super().__init__(shared)
        self._window = SlidingWindow(self.WINDOW)

    @staticmethod
    def _keys(
        connector: ReceiveConnector, source: str, user: str | None
    ) -> list[tuple[str, str, str]]:
        mode = connector.message_rate_source
        if mode == "None":
            return []
        if mode == "User" and user:
            return [(connector.name, "user", user)]
        if mode == "All" and user:
            return [(connector.name, "ip", source), (connector.name, "user", user)]
        return [(connector.name, "ip", source)]

    def allowed(
        self,
        connector: ReceiveConnector,
        source: str,
        now: float | None = None,
        *,
        user: str | None = None,
    ) -> bool:
        limit = connector.message_rate_limit
        if limit is None:
            return True
        now = time.monotonic() if now is None else now
        keys = self._keys(connector, source, user)
        # Counted here, as with one process, unless the connector counts users (their sessions
        # may reach any worker) or an address's sessions may reach any worker too (share_ip).
        # Two tests only on this, the common path, and a loop rather than all() over a
        # generator, which pays for them (bench/rate_limiter.py).
        if self.shared is None or (
            connector.message_rate_source == "IPAddress" and not self.share_ip
        ):
            window = self._window
            for key in keys:  # noqa: SIM110 (see above)
                if window.count(key, now) >= limit:
                    return False
            return True
        return self._allowed_shared(keys, limit, now)

    # The shared paths are methods of their own: their comprehensions would make the common
    # paths above create closure cells on every call (measured: bench/rate_limiter.py).
    def _allowed_shared(self, keys: list[tuple[str, str, str]], limit: int, now: float) -> bool:
        assert self.shared is not None
        window, share_ip = self._window, self.share_ip
        shared_keys = [k for k in keys if k[1] == "user" or share_ip]
        if not all(window.count(k, now) < limit for k in keys if k not in shared_keys):
            return False
        if not shared_keys:  # an anonymous session counted by address, or "None": no lock
            return True
        counts = self.shared.counts([key_digest(*k) for k in shared_keys], now)
        if counts is None:
            self._degraded("its lock was held too long")
            counts = [0] * len(shared_keys)
        # plus what was counted here when the shared table had no room or no lock for it
        return all(
            n + window.count(k, now) < limit for n, k in zip(counts, shared_keys, strict=True)
        )

    def record(
        self,
        connector: ReceiveConnector,
        source: str,
        now: float | None = None,
        *,
        user: str | None = None,
    ) -> None:
        if connector.message_rate_limit is None:
            return
        now = time.monotonic() if now is None else now
        if self.shared is None or (
            connector.message_rate_source == "IPAddress" and not self.share_ip
        ):
            for key in self._keys(connector, source, user):
                self._window.add(key, now)
            return
        self._record_shared(self._keys(connector, source, user), now)

    def _record_shared(self, keys: list[tuple[str, str, str]], now: float) -> None:
        assert self.shared is not None
        window, share_ip = self._window, self.share_ip
        shared_keys = {key_digest(*k): k for k in keys if k[1] == "user" or share_ip}
        missed = self.shared.add(list(shared_keys), now) if shared_keys else []
        if missed:
            self._degraded("it is full or its lock was held too long")
        for key in keys:
            if key not in shared_keys.values():
                window.add(key, now)
        for digest in missed:
            window.add(shared_keys[digest], now)


@functools.lru_cache(maxsize=4096)
def _ipv6_network(address: str, prefix: int) -> str:
    """The network of `prefix` bits holding the IPv6 `address` (cached: AUTH asks twice per
    attempt, and a client usually tries again)."""
    return str(ipaddress.IPv6Network((address, prefix), strict=False))


class _Attempt(NamedTuple):
    """An AUTH attempt counted as failed by `AuthFailures.begin`, and where it was counted."""

    key: tuple[str, str, str]
    at: float
    #: In the node's shared table (else in this process's window).
    shared: bool


class AuthFailures(_NodeCounts):
    """logon_failure_rate_limit: failed AUTH per minute per (connector, client IP address), across
    connections (max_logon_failures only ends one connection, and a client reconnects at once).

    An attempt is counted when its password is about to be checked (`begin`) and forgotten if it
    succeeds (`succeeded`), so concurrent attempts from one address cannot pass the check together
    and a client that hangs up while its failure is tarpitted is counted all the same.

    With several workers, an address whose sessions may reach several of them (`share_ip`, as for
    RateLimiter: `worker_balance = "connection"`, no steering program, trusted proxies) is
    counted in the table the workers share, so the limit is the node's, not N times it per
    worker; there a failure counts for 60 to 61 seconds (per-second buckets). Otherwise all of
    an address's sessions are on this worker, and counting here is exact and cheaper. An attempt
    the shared table had no room or no lock for is counted here (logged once)."""

    WINDOW = 60.0
    LIMIT_KEY = "logon_failure_rate_limit"

    def __init__(self, shared: SharedRateTable | None = None) -> None:
        super().__init__(shared)
        self._window = SlidingWindow(self.WINDOW)

    @staticmethod
    def counted_as(connector: ReceiveConnector, source: str) -> str:
        """What `source`'s failures are counted under: the address, or for an IPv6 client its
        network of logon_failure_ipv6_prefix_length bits ("2001:db8:1:2::/64")."""
        prefix = connector.logon_failure_ipv6_prefix_length
        if prefix < 128 and ":" in source:  # IPv4-mapped clients reach here as IPv4
            return _ipv6_network(source, prefix)
        return source

    def _key(self, connector: ReceiveConnector, source: str) -> tuple[str, str, str]:
        return (connector.name, "auth-failures", self.counted_as(connector, source))

    def _share(self, key: tuple[str, str, str]) -> bool:
        """Count `key` in the node's table: its sessions may reach several workers. An address's
        may when share_ip; an IPv6 network's always, as steering hashes whole addresses."""
        return self.shared is not None and (self.share_ip or "/" in key[2])

    def allowed(self, connector: ReceiveConnector, source: str, now: float | None = None) -> bool:
        limit = connector.logon_failure_rate_limit
        if limit is None:
            return True
        now = time.monotonic() if now is None else now
        key = self._key(connector, source)
        # plus what was counted here when the shared table had no room or no lock for it
        failed = self._window.count(key, now)
        if self._share(key):
            assert self.shared is not None
            counts = self.shared.counts([key_digest(*key)], now)
            if counts is None:
                self._degraded("its lock was held too long")
            else:
                failed += counts[0]
        return failed < limit

    def begin(self, connector: ReceiveConnector, source: str) -> _Attempt | None:
        """Count an attempt as failed until `succeeded`; returns its token (None: not counted)."""
        if connector.logon_failure_rate_limit is None:
            return None
        now = time.monotonic()
        key = self._key(connector, source)
        if self._share(key):
            assert self.shared is not None
            if not self.shared.add([key_digest(*key)], now):
                return _Attempt(key, now, shared=True)
            self._degraded("it is full or its lock was held too long")
        self._window.add(key, now)
        return _Attempt(key, now, shared=False)

    def succeeded(self, connector: ReceiveConnector, source: str, attempt: _Attempt | None) -> None:
        if attempt is None:
            return
        if not attempt.shared:
            self._window.discard(attempt.key, attempt.at)
        elif self.shared is not None and not self.shared.subtract(
            key_digest(*attempt.key), attempt.at
        ):
            # The success stays counted as a failure until it expires: a user who signs in
            # right may then be refused sooner, never an attacker later.
            self._degraded("its lock was held too long")
