"""A small asyncio SMTP client that times end-of-DATA → 250 (the durable-acceptance latency).

Each session connects once, says EHLO, and sends its messages one after another (MAIL, RCPT, DATA
each waiting for its reply, no pipelining), so what is timed is exactly the server's work between
the final "." and its reply: parsing, storing, fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field


def make_message(size: int, *, sender: str, recipient: str, seq: int = 0) -> bytes:
    """A plain RFC 5322 message with a body of about `size` bytes in 78-column lines, dot-safe."""
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench {seq}\r\n"
        f"Message-ID: <bench.{seq}.{time.time_ns()}@bench.example>\r\n\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    lines, rest = divmod(max(size, 0), len(line))
    body = line * lines + (b"y" * max(rest - 2, 0) + b"\r\n" if rest else b"")
    return head + body


@dataclass
class LatencyResult:
    samples: list[float] = field(default_factory=list)  # seconds, end of DATA → 250
    errors: list[str] = field(default_factory=list)
    wall: float = 0.0


async def _reply(reader: asyncio.StreamReader) -> tuple[int, str]:
    lines = []
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("server closed the connection")
        lines.append(line.decode("utf-8", "replace").rstrip("\r\n"))
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


async def _expect(reader: asyncio.StreamReader, code: int, what: str) -> None:
    got, text = await _reply(reader)
    if got != code:
        raise RuntimeError(f"{what}: expected {code}, got {text!r}")


async def one_session(
    host: str,
    port: int,
    *,
    messages: int,
    size: int,
    sender: str,
    recipient: str,
    result: LatencyResult,
    source: str | None = None,
    timeout: float = 60.0,
) -> None:
    payload = make_message(size, sender=sender, recipient=recipient) + b".\r\n"
    writer = None
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, local_addr=(source, 0) if source else None, limit=1 << 20
            ),
            timeout,
        )
        await asyncio.wait_for(_expect(reader, 220, "banner"), timeout)
        writer.write(b"EHLO latency.bench.example\r\n")
        await asyncio.wait_for(_expect(reader, 250, "EHLO"), timeout)
        for _ in range(messages):
            writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
            await asyncio.wait_for(_expect(reader, 250, "MAIL"), timeout)
            writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
            await asyncio.wait_for(_expect(reader, 250, "RCPT"), timeout)
            writer.write(b"DATA\r\n")
            await asyncio.wait_for(_expect(reader, 354, "DATA"), timeout)
            writer.write(payload)
            await asyncio.wait_for(writer.drain(), timeout)
            t0 = time.perf_counter()
            code, text = await asyncio.wait_for(_reply(reader), timeout)
            elapsed = time.perf_counter() - t0
            if code != 250:
                raise RuntimeError(f"end of DATA: expected 250, got {text!r}")
            result.samples.append(elapsed)
        writer.write(b"QUIT\r\n")
        await asyncio.wait_for(writer.drain(), timeout)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_reply(reader), 5)
    except (OSError, RuntimeError, TimeoutError, ValueError) as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def measure(
    host: str,
    port: int,
    *,
    sessions: int,
    total: int,
    size: int,
    sender: str = "latency@bench.example",
    recipient: str = "rcpt@remote.example",
    cap: float = 120.0,
) -> LatencyResult:
    """`sessions` concurrent sessions sending about `total` messages between them."""
    per = max(1, -(-total // sessions))
    result = LatencyResult()
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(
            one_session(
                host,
                port,
                messages=per,
                size=size,
                sender=sender,
                recipient=recipient,
                result=result,
            )
        )
        for _ in range(sessions)
    ]
    _done, pending = await asyncio.wait(tasks, timeout=cap)
    for task in pending:
        task.cancel()
        result.errors.append("latency session cancelled: time cap reached")
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    result.wall = time.perf_counter() - t0
    return result


def measure_sync(host: str, port: int, **kwargs: object) -> LatencyResult:
    return asyncio.run(measure(host, port, **kwargs))  # type: ignore[arg-type]
