#!/usr/bin/env python3
"""The floor: the least a durable Python relay on uvloop does per message (bench/floor.py).

Not RelayGate and not a product: no policy, no queue to list or retry, no logs, no DKIM, no bounds
on input. What it keeps is the part of a relay's work that no design can leave out, so that
bench/floor.py can show how far RelayGate's own per-message work is from it:

- receive: one asyncio Protocol per connection, one reply per command line, DATA read until
  CRLF.CRLF with one `find` per chunk;
- before the 250: the message is appended to a per-process journal and `fdatasync`ed. One writer
  thread takes everything waiting and makes one write and one sync for it (group commit), as
  RelayGate's queue writer does;
- after the 250: the message is delivered to the smart host over one pooled connection per
  process (MAIL, RCPT and DATA pipelined, then the body), and the delivery is recorded in the
  same journal, durably: the second write a relay makes per message;
- `--workers N` processes share the port with SO_REUSEPORT, like RelayGate's workers;
- `--store sqlite`: the same writes as rows in SQLite (WAL, synchronous=FULL, one transaction per
  group), to tell the database's cost from the rest of RelayGate's work;
- `--parts policy,logs,store` (or `all`) with `--config RELAYGATE.toml`: RelayGate's own policy,
  logs and queue store on this lean path (bench/floor_parts.py).

    python bench/floor_server.py --port 2626 --smart-host 127.0.0.1:2627 --dir /tmp/floor [--store sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import queue
import socket
import sqlite3
import threading
from pathlib import Path
from typing import Any, cast

import uvloop

EHLO_REPLY = b"250-floor.localdomain\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
END_OF_DATA = b"\r\n.\r\n"


class Journal:
    """Append-only file; `commit` resolves once the bytes are on disk. One thread, group commit."""

    def __init__(self, path: Path, loop: asyncio.AbstractEventLoop) -> None:
        self.path = path
        self.loop = loop
        self.open()
        self.pending: queue.SimpleQueue[tuple[bytes, asyncio.Future[None]]] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="journal", daemon=True)
        self.thread.start()

    def open(self) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write(self, batch: list[bytes]) -> None:
        os.writev(self.fd, batch)
        os.fdatasync(self.fd)

    def commit(self, data: bytes) -> asyncio.Future[None]:
        future = self.loop.create_future()
        self.pending.put((data, future))
        return future

    def _run(self) -> None:
        while True:  # a daemon thread: it ends with the process
            batch = [self.pending.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 256:
                    batch.append(self.pending.get_nowait())
            self.write([data for data, _ in batch])
            for _, future in batch:
                self.loop.call_soon_threadsafe(_resolve, future)


class SqliteJournal(Journal):
    """The same group commit into SQLite (WAL, synchronous=FULL), one row per call: `--store
    sqlite` shows what a database costs on this path, apart from the rest of RelayGate's work."""

    def open(self) -> None:
        # Opened in the loop's thread, used only by the writer thread (never at the same time).
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode = WAL")
        self.db.execute("PRAGMA synchronous = FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY, data BLOB)")

    def write(self, batch: list[bytes]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO log (data) VALUES (?)", [(data,) for data in batch])
        self.db.execute("COMMIT")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Connected:
    """One SMTP client connection kept open: connect, EHLO, read replies (multi-line ones whole).
    The floor's deliverers and bench/delivery_cost.py's lean deliverer share it."""

    def __init__(self, host: str, port: int, helo: str = "floor.localdomain") -> None:
        self.host, self.port = host, port
        self.helo = helo
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _reply(self) -> bytes:
        assert self.reader is not None
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("smart host closed the connection")
            if line[3:4] != b"-":
                return line

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        await self._reply()
        self.writer.write(b"EHLO " + self.helo.encode("ascii") + b"\r\n")
        await self._reply()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class Deliverer(Connected):
    """One pooled connection to the smart host; one transaction at a time."""

    def __init__(self, host: str, port: int, journal: Journal) -> None:
        super().__init__(host, port)
        self.journal = journal
        self.todo: asyncio.Queue[bytes] = asyncio.Queue()

    async def run(self) -> None:
        while True:
            body = await self.todo.get()
            try:
                if self.writer is None:
                    await self._connect()
                assert self.writer is not None
                self.writer.write(
                    b"MAIL FROM:<bench@bench.example>\r\nRCPT TO:<rcpt@remote.example>\r\nDATA\r\n"
                )
                replies = [await self._reply() for _ in range(3)]
                if not replies[2].startswith(b"354"):
                    raise ConnectionError(f"smart host refused: {replies!r}")
                self.writer.write(body)
                if not (await self._reply()).startswith(b"250"):
                    raise ConnectionError("smart host refused the message")
            except (OSError, ConnectionError):
                self.writer = None  # the floor does not retry: the benchmark counts at the sink
                continue
            await self.journal.commit(b"delivered\n")


class FloorSession(asyncio.Protocol):
    def __init__(self, journal: Journal, deliverer: Deliverer | None) -> None:
        self.journal = journal
        self.deliverer = deliverer
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.data: bytearray | None = None
        self.committing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.write(b"220 floor.localdomain ESMTP\r\n")

    def data_received(self, chunk: bytes) -> None:
        if self.data is None:
            self.buf += chunk
            self._commands()
            return
        start = max(0, len(self.data) - len(END_OF_DATA))
        self.data += chunk
        end = self.data.find(END_OF_DATA, start)
        if end < 0:
            return
        body = bytes(self.data[2 : end + len(END_OF_DATA)])  # without the CRLF put first
        self.buf += self.data[end + len(END_OF_DATA) :]  # commands pipelined behind the dot
        self.data = None
        self.committing = True  # they wait for this message's 250, which comes first
        self.journal.commit(body).add_done_callback(lambda _: self._accepted(body))

    def _commands(self) -> None:
        assert self.transport is not None
        while self.data is None and not self.committing and b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(EHLO_REPLY)
            elif verb == b"DATA":
                self.data = bytearray(b"\r\n")  # so that an empty body's "." ends it too
                self.transport.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                if self.buf:  # the body came behind DATA already
                    body, self.buf = self.buf, b""
                    self.data_received(body)
            elif verb == b"QUIT":
                self.transport.write(b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 2.0.0 OK\r\n")

    def _accepted(self, body: bytes) -> None:
        self.committing = False
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(b"250 2.0.0 Queued\r\n")
        if self.deliverer is not None:
            self.deliverer.todo.put_nowait(body)
        self._commands()


async def serve(
    port: int,
    smart_host: tuple[str, int] | None,
    directory: Path,
    store: str,
    parts: frozenset[str] = frozenset(),
    config: Path | None = None,
) -> None:
    loop = asyncio.get_running_loop()
    kind = SqliteJournal if store == "sqlite" else Journal
    journal = kind(directory / f"{store}-{os.getpid()}", loop)
    deliverer: Any = None
    if parts:
        # Only then: the plain floor imports nothing of RelayGate.
        from floor_parts import Parts, PartsDeliverer, PartsSession

        assert config is not None
        shared = Parts(parts, config, directory)
        await shared.open()
        from relaygate.app import tune_gc

        tune_gc()  # as a RelayGate worker does after start-up: RelayGate's heap, RelayGate's GC
        if smart_host:
            deliverer = PartsDeliverer(*smart_host, journal, shared)

        def factory() -> asyncio.Protocol:
            return PartsSession(shared, journal, deliverer)
    else:
        deliverer = Deliverer(*smart_host, journal) if smart_host else None

        def factory() -> asyncio.Protocol:
            return FloorSession(journal, deliverer)

    delivering = loop.create_task(deliverer.run()) if deliverer else None  # held: not collected
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    server = await loop.create_server(factory, sock=sock, backlog=1024)
    async with server:
        await server.serve_forever()
    del delivering


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--smart-host", help="HOST:PORT to deliver to (default: do not deliver)")
    ap.add_argument("--dir", type=Path, required=True, help="where the journals go")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--store",
        choices=("journal", "sqlite"),
        default="journal",
        help="where the durable writes go: an appended file (default) or an SQLite table",
    )
    ap.add_argument(
        "--parts",
        default="",
        help="RelayGate's own parts on the hot path: comma-separated policy, logs, store, or all",
    )
    ap.add_argument("--config", type=Path, help="the RelayGate config file the parts use")
    args = ap.parse_args()
    parts: frozenset[str] = frozenset()
    if args.parts:
        from floor_parts import parse_parts

        try:
            parts = parse_parts(args.parts)
        except ValueError as exc:
            ap.error(f"--parts: {exc}")
    if parts and args.config is None:
        ap.error("--parts needs --config (the RelayGate config file of the benchmark)")
    smart_host = None
    if args.smart_host:
        host, _, port = args.smart_host.rpartition(":")
        smart_host = (host, int(port))
    if "store" in parts:
        from floor_parts import prepare_store

        prepare_store(args.dir)
    for _ in range(args.workers - 1):
        if os.fork() == 0:
            break  # a child serves too; the parent forks the rest and serves last
    uvloop.run(serve(args.port, smart_host, args.dir, args.store, parts, args.config))


if __name__ == "__main__":
    main()
