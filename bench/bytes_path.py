#!/usr/bin/env python3
"""Per-message byte work on RelayGate's receive and delivery paths, timed in isolation.

What every accepted message goes through (receive: bare CR/LF check, header scan, SHA-256 in the
store; delivery: prepare_data, dot_stuff, the 8-bit check, aiosmtplib's own line-ending pass) at
10 KB and 1 MB, with a C-level alternative next to the slow ones, so the owners can see what a change
buys. A function that no longer exists is reported as missing, not as an error.

    .venv/bin/python bench/bytes_path.py
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from smtpclient import make_message


def _get(module: str, name: str) -> Callable[[bytes], object] | None:
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError):
        return None


def _dot_stuff_c(data: bytes) -> bytes:
    """C-level RFC 5321 §4.5.2 transparency on CRLF-only text."""
    out = data.replace(b"\r\n.", b"\r\n..")
    return b"." + out if out.startswith(b".") else out


def _wire(message: bytes) -> bytes:
    """The message as a client sends it after the 354: dot-stuffed, then the terminator."""
    return _dot_stuff_c(message) + b".\r\n"


def _with_dot_lines(message: bytes) -> bytes:
    """Every tenth line starts with "." (a signature, quoted-printable soft breaks, a diff)."""
    lines = message.split(b"\r\n")
    return b"\r\n".join(b"." + line if i % 10 == 5 else line for i, line in enumerate(lines))


# The wire form of this size's message, plain and with dot-led lines (made once per size, untimed).
_WIRE: dict[str, bytes] = {}


def _read_data(wire: bytes) -> object:
    """DataReader over `wire` in the session's 256 KB reads, then its result."""
    reader_class = _get("relaygate.smtp.message", "DataReader")
    if reader_class is None:
        return None
    reader = reader_class(len(wire) * 2)  # type: ignore[call-arg]
    for start in range(0, len(wire), 262144):
        if reader.feed(wire[start : start + 262144]):  # type: ignore[attr-defined]
            return reader.result()  # type: ignore[attr-defined]
    raise AssertionError("no terminator")


def cases() -> list[tuple[str, Callable[[bytes], object] | None]]:
    return [
        ("receive: DataReader feed + result", lambda m: _read_data(_WIRE["plain"])),
        ("  the same, every 10th line dot-led", lambda m: _read_data(_WIRE["dotted"])),
        ("receive: has_bare_cr_or_lf", _get("relaygate.smtp.message", "has_bare_cr_or_lf")),
        ("receive: scan_headers", _get("relaygate.smtp.message", "scan_headers")),
        ("store: sha256", lambda m: hashlib.sha256(m).digest()),
        ("deliver: any(b > 0x7F for b in prepared)", lambda m: any(b > 0x7F for b in m)),
        ("  alternative: not prepared.isascii()", lambda m: not m.isascii()),
        ("deliver: prepare_data", _get("relaygate.delivery.wire", "prepare_data")),
        ("deliver: dot_stuff (regex (?m)^\\.)", _get("relaygate.delivery.wire", "dot_stuff")),
        ("  alternative: bytes.replace(b'\\r\\n.', ...)", _dot_stuff_c),
        (
            "deliver: aiosmtplib normalize_message_line_endings",
            _get("aiosmtplib.protocol", "normalize_message_line_endings"),
        ),
    ]


def main() -> int:
    print(f"{'size':>7}  {'ms/message':>10}  function")
    for size in (10 * 1024, 1024 * 1024):
        message = make_message(size, sender="a@bench.example", recipient="b@remote.example")
        rounds = 50 if size < 100_000 else 5
        _WIRE.update(plain=_wire(message), dotted=_wire(_with_dot_lines(message)))
        for name, fn in cases():
            if fn is None:
                print(f"{size // 1024:>4} KB  {'missing':>10}  {name}")
                continue
            fn(message)
            t0 = time.perf_counter()
            for _ in range(rounds):
                fn(message)
            ms = (time.perf_counter() - t0) / rounds * 1000
            print(f"{size // 1024:>4} KB  {ms:>10.3f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
