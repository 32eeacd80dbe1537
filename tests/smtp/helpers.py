"""Client-side helpers for the receive-service tests: raw sockets that speak SMTP byte by byte.

`RawClient` is the "telnet" of these tests: it writes exactly the bytes given (one `send` = one write,
TCP_NODELAY) and reads complete replies (multi-line aware), so pipelining and byte-level framing are
under the test's control.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from tests.support.ports import free_port

__all__ = [
    "CLOSED",
    "RawClient",
    "Reply",
    "free_port",
    "normalise",
    "swaks",
]

CLOSED = "<closed>"


class Reply:
    """One SMTP reply: code and its lines (without the code prefix)."""

    def __init__(self, code: int, lines: list[str]) -> None:
        self.code = code
        self.lines = lines

    @property
    def text(self) -> str:
        """The last line as sent on the wire: '250 2.1.0 Sender OK'."""
        return f"{self.code} {self.lines[-1]}" if self.lines else str(self.code)

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.lines!r})"


class RawClient:
    def __init__(
        self,
        port: int,
        *,
        source: str = "127.0.0.5",
        host: str = "127.0.0.1",
        timeout: float = 5.0,
        tls: ssl.SSLContext | None = None,
        preamble: bytes = b"",
    ) -> None:
        sock = socket.create_connection((host, port), timeout=timeout, source_address=(source, 0))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if preamble:  # in clear, before TLS (a load balancer's PROXY header)
            sock.sendall(preamble)
        if tls is not None:
            sock = tls.wrap_socket(sock, server_hostname="relay.corp.example")
        self.sock: socket.socket = sock
        self.host = host
        self.buf = b""
        self.timeout = timeout
        self.received = b""  # every byte read, for transcripts

    # -- bytes ------------------------------------------------------------------------------------
    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _more(self) -> bool:
        try:
            chunk = self.sock.recv(65536)
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            chunk = b""
        if not chunk:
            return False
        self.buf += chunk
        self.received += chunk
        return True

    def read_line(self) -> str | None:
        while b"\r\n" not in self.buf:
            if not self._more():
                return None
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line.decode("utf-8", "replace")

    def reply(self) -> Reply | None:
        """The next complete reply, or None if the server closed first."""
        lines: list[str] = []
        while True:
            line = self.read_line()
            if line is None:
                return None
            code = int(line[:3])
            lines.append(line[4:])
            if line[3:4] != "-":
                return Reply(code, lines)

    def expect(self, code: int) -> Reply:
        r = self.reply()
        assert r is not None, f"connection closed, expected {code}"
        assert r.code == code, f"expected {code}, got {r!r}"
        return r

    def cmd(self, line: str, code: int | None = None) -> Reply:
        self.send(line.encode() + b"\r\n")
        r = self.reply()
        assert r is not None, f"connection closed after {line!r}"
        if code is not None:
            assert r.code == code, f"{line!r}: expected {code}, got {r!r}"
        return r

    def replies_until_close(self, limit: int = 100) -> list[Reply]:
        out: list[Reply] = []
        for _ in range(limit):
            r = self.reply()
            if r is None:
                break
            out.append(r)
        return out

    def is_closed(self, wait: float = 2.0) -> bool:
        """True when the server closes without sending anything more (within `wait` seconds)."""
        self.sock.settimeout(wait)
        try:
            return not self._more() and not self.buf
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)

    def nothing_within(self, wait: float) -> bool:
        """True when no byte arrives within `wait` seconds (and the connection stays open)."""
        self.sock.settimeout(wait)
        try:
            self._more()  # data or EOF: either way something happened
        except TimeoutError:
            return not self.buf
        finally:
            self.sock.settimeout(self.timeout)
        return False

    def starttls(self, ctx: ssl.SSLContext) -> None:
        self.sock = ctx.wrap_socket(self.sock, server_hostname="relay.corp.example")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- SMTP shortcuts ---------------------------------------------------------------------------
    def greet(self, helo: str = "EHLO client.corp.example") -> Reply:
        self.expect(220)
        return self.cmd(helo, 250)


_VARIABLE = [
    (re.compile(r"ready at .*$"), "ready at <date>"),
    (re.compile(r"InternalId=[0-9A-F]+"), "InternalId=<id>"),
    (re.compile(r"<[0-9A-F]{16}@"), "<<id>@"),
    (re.compile(r"\d+ bytes in [0-9.]+, [0-9.]+ KB/sec"), "<n> bytes in <t>, <r> KB/sec"),
]


def normalise(text: str) -> str:
    """A reply line with its per-run parts (dates, ids, timings) replaced by placeholders."""
    for pattern, repl in _VARIABLE:
        text = pattern.sub(repl, text)
    return text


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def swaks(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run swaks (the Debian package; `make test` installs it). Skipped, saying why, only if absent."""
    exe = shutil.which("swaks")
    if exe is None:
        pytest.skip("swaks is not installed (apt-get install swaks; `make test` installs it)")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)
