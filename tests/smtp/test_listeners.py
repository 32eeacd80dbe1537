"""Listeners: one per distinct binding — IPv4, IPv6, wildcard, several ports — and the connector is
chosen per connection from the local endpoint and the client address."""

from __future__ import annotations

import socket

from tests.smtp.conftest import relay, relay_connector  # noqa: F401


def banner(host: str, port: int, source: str | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_ipv6_wildcard_and_several_ports(relay):  # noqa: F811
    r = relay(
        [
            relay_connector(
                ["127.0.0.0/8", "::1"],
                name="Loopback v4+v6",
                bindings=["127.0.0.1:{port}", "[::1]:{port}"],
                banner="220 v4v6 ready",
            ),
            relay_connector(
                ["127.0.0.0/8"],
                name="Wildcard second port",
                bindings=["0.0.0.0:{port2}"],
                banner="220 wildcard ready",
            ),
            relay_connector(
                ["127.0.0.9"],
                name="Exact third port",
                bindings=["127.0.0.1:{port3}"],
                banner="220 exact ready",
            ),
        ]
    )
    assert banner("127.0.0.1", r.ports[0]) == b"220 v4v6 ready\r\n"
    assert banner("::1", r.ports[0]) == b"220 v4v6 ready\r\n"  # IPv6 listener, IPv6 client range
    assert banner("127.0.0.1", r.ports[1]) == b"220 wildcard ready\r\n"  # 0.0.0.0 binding
    assert banner("127.0.0.2", r.ports[1]) == b"220 wildcard ready\r\n"  # any local IPv4 address
    # Third port: only 127.0.0.9 is in range; anyone else is closed without a banner.
    assert banner("127.0.0.1", r.ports[2], source="127.0.0.9") == b"220 exact ready\r\n"
    assert banner("127.0.0.1", r.ports[2], source="127.0.0.5") == b""
