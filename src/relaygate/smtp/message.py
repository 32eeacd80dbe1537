"""What the session does to message bytes: scan the header block, count hops, build the Received header.

Everything here works on whole byte strings with C-level operations (find, count, regex over the header
block only): no per-line Python work on DATA.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

__all__ = ["HeaderScan", "received_header", "scan_headers"]

_RECEIVED = re.compile(rb"^received[ \t]*:", re.IGNORECASE | re.MULTILINE)
_MESSAGE_ID = re.compile(
    rb"^message-id[ \t]*:[ \t]*(<[^>\r\n]{1,900}>)", re.IGNORECASE | re.MULTILINE
)


@dataclass(frozen=True, slots=True)
class HeaderScan:
    """Facts about a message's header block. `header_size` counts up to the blank line (or all)."""

    header_size: int
    hops: int
    message_id: str


def scan_headers(content: bytes) -> HeaderScan:
    end = content.find(b"\r\n\r\n")
    if content.startswith(b"\r\n"):
        end = 0
    header = content if end < 0 else content[: end + 2]
    hops = len(_RECEIVED.findall(header))
    m = _MESSAGE_ID.search(header)
    message_id = m.group(1).decode("ascii", "replace") if m else ""
    return HeaderScan(len(header), hops, message_id)


def has_bare_cr_or_lf(content: bytes) -> bool:
    """True when a CR or LF appears outside a CRLF pair (C-level passes, no loop).

    Every CRLF holds one CR and one LF, so the CRs and LFs together number exactly twice the CRLFs
    when there is no other; `translate` counts both in one pass (two passes instead of three).
    """
    crlf = content.count(b"\r\n")
    return len(content) - len(content.translate(None, b"\r\n")) != 2 * crlf


_date_cache: list[tuple[int, str]] = [(-1, "")]


def _date_now() -> str:
    """The RFC 5322 date of this second, formatted once per second (every message needs one)."""
    second = int(time.time())
    cached = _date_cache[0]
    if cached[0] != second:
        cached = (second, format_datetime(datetime.fromtimestamp(second, UTC).astimezone()))
        _date_cache[0] = cached
    return cached[1]


def received_header(
    *,
    helo: str,
    client_ip: str,
    fqdn: str,
    connector: str,
    protocol: str,
    queue_id: str,
    recipient: str | None,
    now: datetime | None = None,
) -> bytes:
    """One RFC 5321 §4.4 trace header: the real peer address, HELO shown but not trusted."""
    when = format_datetime(now) if now is not None else _date_now()
    safe_helo = (
        "".join(ch for ch in helo if 33 <= ord(ch) < 127 and ch not in "()\\")[:255] or "unknown"
    )
    ip = client_ip if ":" not in client_ip else f"IPv6:{client_ip}"
    header = (
        f"Received: from {safe_helo} ([{ip}])\r\n"
        f"\tby {fqdn} (RelayGate; {connector.replace('(', '').replace(')', '')})\r\n"
        f"\twith {protocol} id {queue_id}"
    )
    if recipient:
        header += f"\r\n\tfor <{recipient}>"
    return (header + f"; {when}\r\n").encode("utf-8", "replace")
