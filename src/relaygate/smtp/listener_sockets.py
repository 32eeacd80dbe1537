"""Which listening sockets a configuration needs, and how each is bound.

Separate from the listeners' life (listener_sync.py, server.py) because the supervisor of worker
processes needs only this: `check_bindings_free` binds each endpoint once without SO_REUSEPORT
(and closes it) to find another process listening there, before it starts its workers and at
reload, without an event loop or a server. `listener_bindings` leaves out a specific address a
wildcard socket of the same TLS mode receives already.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from relaygate.config.model import Config
from relaygate.config.values import Binding, wildcard_covers

# Connections the kernel completes before the event loop accepts them (capped by
# net.core.somaxconn). When the queue is full, a new client's SYN is dropped and it waits for its
# retransmission, 1 s and more: a burst of devices reconnecting must not meet that.
LISTEN_BACKLOG = 1024


class ListenerError(OSError):
    """A listener could not be opened; `binding` names it, and `config` the receive connectors
    whose bindings it is (an administrator looks for the connector, not the socket)."""

    def __init__(self, binding: Binding, exc: OSError, config: Config | None = None) -> None:
        names = [
            f'"{c.name}"'
            for c in (config.receive_connectors if config is not None else ())
            if c.enabled and binding in c.bindings
        ]
        owner = (
            f" (bindings of receive connector{'s' if len(names) > 1 else ''} {', '.join(names)})"
            if names
            else ""
        )
        super().__init__(exc.errno, f"cannot listen on {binding}{owner}: {exc.strerror or exc}")
        self.binding = binding

    def __str__(self) -> str:
        return str(self.strerror)  # not "[Errno None] ..." for a TLS error


def listener_bindings(config: Config) -> dict[Binding, bool]:
    """The sockets to open: distinct bindings of enabled connectors → implicit TLS.

    A specific address is left out when a wildcard socket of the same TLS mode already receives its
    connections on that port (0.0.0.0 for IPv4; [::] for IPv6, and for IPv4 too when it is
    dual-stack): two sockets would conflict (EADDRINUSE without SO_REUSEPORT), and the connector
    is chosen by the connection's real local address anyway, so the exact binding still wins
    (selection rule 2). `relaygate check` refuses a wildcard and a specific address of different
    TLS modes on one port; if it is met here, the specific socket is tried and its error reported."""
    wanted: dict[Binding, bool] = {}
    for c in config.receive_connectors:
        if not c.enabled:
            continue
        for b in c.bindings:
            wanted[b] = wanted.get(b, False) or c.tls_mode == "implicit"
    wildcards = [(w, implicit) for w, implicit in wanted.items() if w.is_wildcard]
    return {
        b: implicit
        for b, implicit in wanted.items()
        if b.is_wildcard
        or not any(
            w_implicit == implicit and wildcard_covers(w, b, ipv6_only=config.ipv6_only(w.port))
            for w, w_implicit in wildcards
        )
    }


def check_bindings_free(
    config: Config, *, node_holds: Callable[[Binding], bool] | None = None
) -> None:
    """Raise ListenerError (naming the binding and its connectors) if a listener of `config`
    cannot be bound by a socket WITHOUT SO_REUSEPORT: another process listens there.

    Worker processes bind with SO_REUSEPORT, which the kernel lets any process of the same user
    share: a second node started on a port another node's workers hold would bind it too,
    say ready, and split (or silently take over) the first's connections. A socket without
    SO_REUSEPORT meets EADDRINUSE there, so the supervisor binds each endpoint that way (and
    closes it: it never listens) before it starts its workers, and at reload (`node_holds`:
    whether the listener in the way of a binding is the node's own, supervisor_reload.py)."""
    for binding in listener_bindings(config):
        try:
            # as the listeners do (SO_REUSEADDR, IPV6_V6ONLY), so only a listener conflicts
            _bound_socket(config, binding, reuse_port=False).close()
        except OSError as exc:
            if not (exc.errno == errno.EADDRINUSE and node_holds and node_holds(binding)):
                raise ListenerError(binding, exc, config) from exc


def _bound_socket(config: Config, binding: Binding, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to `binding` as a listener binds it (SO_REUSEADDR; IPV6_V6ONLY as
    `config` says for the port; SO_REUSEPORT if asked), not listening yet. IPPROTO_TCP, not 0:
    asyncio sets TCP_NODELAY only on sockets that say they are TCP (uvloop on every one), and
    each reply must leave at once. Closed again if it cannot be bound (OSError)."""
    family = socket.AF_INET6 if binding.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(
                socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if config.ipv6_only(binding.port) else 0
            )
        sock.bind((binding.address, binding.port))
    except OSError:
        sock.close()
        raise
    return sock
