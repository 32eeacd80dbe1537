"""PROXY protocol v1/v2 (HAProxy), honoured only from `server.trusted_proxies`.

From anyone else a `PROXY ...` line is just an unrecognised command (security-bar item 47).
A malformed header from a trusted proxy closes the connection.
"""

from __future__ import annotations

import ipaddress
import struct

__all__ = [
    "V1_MAX",
    "V2_SIGNATURE",
    "ProxyError",
    "header_length",
    "parse_header",
    "parse_v1",
    "parse_v2",
]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the longest v1 header, CRLF included (the specification's figure)


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
    if ver_cmd & 0x0F != 1:  # the specification: drop a connection with an unassigned command
        raise ProxyError("unsupported PROXY v2 command")
    body = header[16:total]
    if fam == 0x11 and length >= 12:
        src = ipaddress.IPv4Address(body[0:4])
        return (str(src), struct.unpack("!H", body[8:10])[0]), total
    if fam == 0x21 and length >= 36:
        src6 = ipaddress.IPv6Address(body[0:16])
        return (str(src6), struct.unpack("!H", body[32:34])[0]), total
    raise ProxyError("unsupported PROXY v2 address family")


def header_length(buf: bytes) -> int | None:
    """How long the PROXY header at the start of ``buf`` is, or ``None`` if ``buf`` is a
    beginning of one and more bytes are needed. Raises ProxyError if ``buf`` cannot start one.
    Lets a reader take the header off a socket and leave what follows (a TLS ClientHello)."""
    if buf.startswith(b"PROXY "):
        end = buf.find(b"\r\n", 0, V1_MAX)
        if end >= 0:
            return end + 2
        if len(buf) >= V1_MAX:
            raise ProxyError("PROXY v1 header without CRLF")
        return None
    if b"PROXY "[: len(buf)] == buf:
        return None
    if buf.startswith(V2_SIGNATURE):
        if len(buf) < 16:
            return None
        return 16 + struct.unpack("!H", buf[14:16])[0]
    if V2_SIGNATURE[: len(buf)] == buf:
        return None
    raise ProxyError("not a PROXY header")


def parse_header(header: bytes) -> tuple[str, int] | None:
    """The source a complete v1 or v2 header names (None: LOCAL/UNKNOWN, keep the peer)."""
    if header.startswith(V2_SIGNATURE):
        return parse_v2(header)[0]
    return parse_v1(header[:-2])
