"""PROXY protocol v1/v2 (HAProxy), honoured only from `server.trusted_proxies`.

From anyone else a `PROXY ...` line is just an unrecognised command (security-bar item 47).
A malformed header from a trusted proxy closes the connection.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = ["V2_SIGNATURE", "ProxyError", "parse_v1", "parse_v2"]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


class ProxyError(ValueError):
    pass


def parse_v1(line: bytes) -> tuple[str, int] | None:
    """`PROXY TCP4 src dst sport dport` → (src, sport); `PROXY UNKNOWN` → None (keep the real peer)."""
    parts = line.decode("ascii", "strict").split(" ")
    if len(parts) < 2 or parts[0] != "PROXY":
        raise ProxyError("not a PROXY v1 header")
    if parts[1] == "UNKNOWN":
        return None
    if parts[1] not in ("TCP4", "TCP6") or len(parts) != 6:
        raise ProxyError("malformed PROXY v1 header")
    src = ipaddress.ip_address(parts[2])
    ipaddress.ip_address(parts[3])
    if (src.version == 4) != (parts[1] == "TCP4"):
        raise ProxyError("PROXY v1 family does not match the address")
    port = int(parts[4])
    if not 0 <= port < 65536:
        raise ProxyError("bad port")
    return str(src), port


def parse_v2(header: bytes) -> tuple[tuple[str, int] | None, int]:
    """Parse a v2 header at the start of `header`. Returns (source or None for LOCAL, header length).
    Raises ProxyError if malformed, or `IndexError` if more bytes are needed."""
    if len(header) < 16:
        raise IndexError("need more bytes")
    if not header.startswith(V2_SIGNATURE):
        raise ProxyError("not a PROXY v2 header")
    ver_cmd, fam, length = header[12], header[13], struct.unpack("!H", header[14:16])[0]
    total = 16 + length
    if len(header) < total:
        raise IndexError("need more bytes")
    if ver_cmd >> 4 != 2:
        raise ProxyError("unsupported PROXY version")
    if ver_cmd & 0x0F == 0:  # LOCAL: health check from the proxy itself
        return None, total
    body = header[16:total]
    if fam == 0x11 and length >= 12:
        src = ipaddress.IPv4Address(body[0:4])
        return (str(src), struct.unpack("!H", body[8:10])[0]), total
    if fam == 0x21 and length >= 36:
        src6 = ipaddress.IPv6Address(body[0:16])
        return (str(src6), struct.unpack("!H", body[32:34])[0]), total
    raise ProxyError("unsupported PROXY v2 address family")
