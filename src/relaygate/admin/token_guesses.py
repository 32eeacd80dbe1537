"""Wrong API tokens counted per client (`TokenGuesses`, `guess_key`), and the 429 of a client
blocked for too many (`too_many_guesses`).

Apart from the guard that asks it: the admin centre's sign-in page counts its wrong tokens here too,
and the admin server compares clients by `client_network`."""

from __future__ import annotations

import ipaddress
import logging
import math
import time

from starlette.responses import JSONResponse

from relaygate.admin.api_json import _error
from relaygate.smtp.limits import SlidingWindow

log = logging.getLogger("relaygate.admin")


#: Wrong tokens (the API's bearer token, the admin centre's sign-in) one client may try in a
#: minute; past them the client is blocked until fewer than that many fall in the last minute.
#: With the listener reachable from the network the token is all that guards the queue.
#: A client is its address, an IPv6 one its /64 (`guess_key`).
TOKEN_GUESS_LIMIT = 10
#: Seconds between two checks of a blocked client's tokens: one in this many is compared (the
#: right one gets in, a wrong one is a 429 and counts), the others get 429 unchecked. Refusing
#: them all let anyone who shares the admin's address (every local user on a loopback
#: listener, everyone behind one NAT) lock the admin out for as long as they went on failing;
#: one check in 6 s keeps guessing at the limit's own rate, ten a minute.
LOCKED_CHECK_INTERVAL = 6.0

#: The IPv6 prefix one client is counted by: a /64 is one network, one subscriber's or one
#: host's (SLAAC, privacy addresses), and whoever has one has 2^64 addresses to guess from.
_IPV6_CLIENT_PREFIX = 64
_IPV6_HOST_BITS = 128 - _IPV6_CLIENT_PREFIX


#: The key every loopback address counts under (`guess_key`).
LOOPBACK_CLIENT = "loopback"


def client_network(client: str) -> str:
    """Whose connection ``client`` (the address the listener reports) is: an IPv4 address
    itself; an IPv6 address its /64 (``2001:db8:1:2::/64``: one subscriber's or one host's,
    SLAAC and privacy addresses); an IPv4-mapped IPv6 address (an IPv4 client of a dual-stack
    listener) the IPv4 address, as it counts when it comes over IPv4. Anything that is not an
    address (no client at all: "") is its own key. The listener's connection cap compares it."""
    try:
        ip = ipaddress.ip_address(client)
    except ValueError:
        return client
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        network = ipaddress.IPv6Address(int(ip) >> _IPV6_HOST_BITS << _IPV6_HOST_BITS)
        return f"{network}/{_IPV6_CLIENT_PREFIX}"
    return str(ip)


def guess_key(client: str) -> str:
    """Whose wrong tokens ``client`` counts towards: its `client_network` (else ten guesses a
    minute from each address of an IPv6 /64 would be 2^64 times ten), and every loopback
    address (127.0.0.0/8, ::1, ::ffff:127.x.y.z) one client, LOOPBACK_CLIENT: a local user
    can connect from any of them, and counted apart they gave sixteen million times ten
    guesses a minute."""
    try:
        ip = ipaddress.ip_address(client.partition("%")[0])
    except ValueError:
        return client_network(client)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return LOOPBACK_CLIENT if ip.is_loopback else client_network(client)


class TokenGuesses:
    """Wrong API tokens per client over a sliding minute (see TOKEN_GUESS_LIMIT): the methods
    take the client's address as the listener reports it, and count it by ``guess_key``."""

    WINDOW = 60.0

    def __init__(self, limit: int = TOKEN_GUESS_LIMIT) -> None:
        self.limit = limit
        self._window = SlidingWindow(self.WINDOW)
        self._checked: dict[str, float] = {}  # blocked client's key -> its last token check

    def blocked(self, client: str) -> bool:
        return self._window.count(guess_key(client), time.monotonic()) >= self.limit

    def take_check(self, client: str) -> float:
        """For a blocked client: 0 when its token may be compared now (that check is taken:
        the next is due LOCKED_CHECK_INTERVAL later), else the seconds until it may be."""
        key = guess_key(client)
        now = time.monotonic()
        last = self._checked.get(key)
        if last is not None and now - last < LOCKED_CHECK_INTERVAL:
            return LOCKED_CHECK_INTERVAL - (now - last)
        if len(self._checked) >= self._window.max_keys:  # bounded, as the window is
            self._checked = {
                k: t for k, t in self._checked.items() if now - t < LOCKED_CHECK_INTERVAL
            }
        self._checked[key] = now
        return 0.0

    def wrong(self, client: str) -> None:
        key = guess_key(client)
        now = time.monotonic()
        self._window.add(key, now)
        if self._window.count(key, now) == self.limit:
            # Once per block (a blocked client's attempts are not counted): before, guessing
            # left no trace in the service log.
            log.warning(
                "admin listener: %d wrong API tokens in a minute from %s: its tokens are checked "
                "once in %g s (the others get 429) until fewer fall in a minute",
                self.limit,
                key if key == client else f"{client} ({key})",
                LOCKED_CHECK_INTERVAL,
            )


def too_many_guesses(wait: float) -> JSONResponse:
    """The 429 of a blocked client (`TokenGuesses`): ``wait``, the seconds until its next
    token is checked, as Retry-After."""
    seconds = retry_after(wait)
    response = _error(
        429,
        "too many wrong API tokens from this address (its IPv6 /64, or any loopback address): "
        f"one token is checked every {LOCKED_CHECK_INTERVAL:g} s until fewer than "
        f"{TOKEN_GUESS_LIMIT} wrong ones fall in a minute; the next in {seconds} s",
    )
    response.headers["Retry-After"] = str(seconds)
    return response


def retry_after(wait: float) -> int:
    """Whole seconds for a Retry-After header (RFC 9110 §10.2.3), at least 1."""
    return max(1, math.ceil(wait))
