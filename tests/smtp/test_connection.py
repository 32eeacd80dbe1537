"""smtp/connection.py: the session's transport, on real loopback sockets (no relay around it)."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Awaitable, Callable

import pytest

from relaygate.smtp import connection as connection_module
from relaygate.smtp.connection import Connection

Runner = Callable[[Callable[["Served"], Awaitable[None]]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a test body with a listener, on both loops: `relaygate serve` runs uvloop, the
    in-process relay of the other tests asyncio's own."""

    def runner(body: Callable[[Served], Awaitable[None]]) -> None:
        async def main() -> None:
            served = await Served().start()
            try:
                await body(served)
            finally:
                await served.close()

        if request.param == "uvloop":
            import uvloop

            uvloop.run(main())
        else:
            asyncio.run(main())

    return runner


class Served:
    """A listener whose every accepted socket becomes a Connection handed to `accepted`."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Connection] = asyncio.Queue()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.sockets: list[socket.socket] = []  # the clients' ends, closed with the listener

    async def start(self) -> Served:
        async def on_connect(conn: Connection) -> None:
            await self.accepted.put(conn)
            await asyncio.sleep(3600)  # the test drives the connection

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: Connection(on_connect), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def client(self, *, rcvbuf: int | None = None) -> tuple[socket.socket, Connection]:
        """A client and the server's Connection for it. `rcvbuf`: the client's receive buffer,
        fixed before connecting (no autotuning: a kernel whose tcp_rmem allows 32 MB absorbs
        megabytes of a write the client never reads)."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.settimeout(5)
        sock.connect(("127.0.0.1", self.port))
        sock.setblocking(False)
        self.sockets.append(sock)
        conn = await asyncio.wait_for(self.accepted.get(), 5)
        return sock, conn

    async def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        assert self.server is not None
        self.server.close()


async def send(sock: socket.socket, data: bytes) -> None:
    await asyncio.get_running_loop().sock_sendall(sock, data)


def test_read_hands_over_what_arrived_and_keeps_the_rest_past_n(run: Runner) -> None:
    async def body(served: Served) -> None:
        sock, conn = await served.client()
        # the loop set TCP_NODELAY on the accepted socket (the server relies on it)
        server_side = conn.get_extra_info("socket")
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        await send(sock, b"EHLO a\r\n")
        assert await asyncio.wait_for(conn.read(1024), 5) == b"EHLO a\r\n"
        await send(sock, b"MAIL FROM:<a@b.example>\r\n")
        await send(sock, b"RCPT TO:<c@d.example>\r\n")
        await asyncio.sleep(0.1)  # both segments in before the next read
        got = await conn.read(10)
        assert got == b"MAIL FROM:"
        assert await conn.read(1024) == b"<a@b.example>\r\nRCPT TO:<c@d.example>\r\n"

    run(body)


@pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="Linux's TCP_QUICKACK")
def test_ack_now_sets_quickack_on_the_tcp_socket(run: Runner) -> None:
    # The session calls it before each read of message data (tests/smtp/test_delayed_ack.py shows
    # what it is for); here: it reaches the real socket on both loops, after a command exchange
    # that put the connection in the kernel's delayed-ACK ("pingpong") mode.
    async def body(served: Served) -> None:
        sock, conn = await served.client()
        server_side = conn.get_extra_info("socket")
        loop = asyncio.get_running_loop()
        for _ in range(3):
            await send(sock, b"NOOP\r\n")
            assert await asyncio.wait_for(conn.read(1024), 5) == b"NOOP\r\n"
            conn.write(b"250 2.0.0 OK\r\n")
            assert await asyncio.wait_for(loop.sock_recv(sock, 100), 5) == b"250 2.0.0 OK\r\n"
        await send(sock, b"x" * 100)
        assert await asyncio.wait_for(conn.read(1024), 5) == b"x" * 100
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 0
        conn.ack_now()
        assert server_side.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1

    run(body)


def test_eof_reads_empty_and_the_replies_still_go_out(run: Runner) -> None:
    async def body(served: Served) -> None:
        sock, conn = await served.client()
        await send(sock, b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)  # the client half-closes after its last command
        assert await asyncio.wait_for(conn.read(1024), 5) == b"QUIT\r\n"
        assert await asyncio.wait_for(conn.read(1024), 5) == b""
        assert await conn.read(1024) == b""  # and stays at EOF
        conn.write(b"221 2.0.0 Bye\r\n")
        await conn.drain()
        loop = asyncio.get_running_loop()
        assert await asyncio.wait_for(loop.sock_recv(sock, 100), 5) == b"221 2.0.0 Bye\r\n"

    run(body)


def test_a_reset_connection_raises_on_read_and_drain(run: Runner) -> None:
    async def body(served: Served) -> None:
        sock, conn = await served.client()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
        with pytest.raises(ConnectionError):
            await asyncio.wait_for(conn.read(1024), 5)
        with pytest.raises(ConnectionError):
            await conn.drain()

    run(body)


@pytest.mark.parametrize("in_data", [False, True])
def test_reading_pauses_while_too_much_is_unread(run: Runner, in_data: bool) -> None:
    """Past 64 KB unread between messages, past 2 MB while a message is read (DATA)."""

    async def body(served: Served) -> None:
        sock, conn = await served.client()
        conn.reading_message(in_data)
        block = b"x" * (256 * 1024)
        blocks = 16 if in_data else 4
        sender = asyncio.ensure_future(send(sock, block * blocks))
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not conn.transport.is_reading():
                break
        assert not conn.transport.is_reading()  # paused: the rest waits in the kernel
        limit = connection_module._PAUSE_ABOVE if in_data else 64 * 1024
        assert limit < conn.unread <= limit + len(block)
        got = 0
        while got < len(block) * blocks:
            got += len(await asyncio.wait_for(conn.read(1024 * 1024), 5))
        await asyncio.wait_for(sender, 5)
        assert conn.transport.is_reading()

    run(body)


def test_discard_unread_drops_what_the_session_has_not_read(run: Runner) -> None:
    async def body(served: Served) -> None:
        sock, conn = await served.client()
        await send(sock, b"STARTTLS\r\n")
        assert await asyncio.wait_for(conn.read(1024), 5) == b"STARTTLS\r\n"
        await send(sock, b"RSET\r\nMAIL FROM:<x@y.example>\r\n")  # injected behind it
        await asyncio.sleep(0.1)
        assert conn.discard_unread() == len(b"RSET\r\nMAIL FROM:<x@y.example>\r\n")
        await send(sock, b"EHLO b\r\n")
        assert await asyncio.wait_for(conn.read(1024), 5) == b"EHLO b\r\n"

    run(body)


def test_drain_waits_for_a_client_that_does_not_read(run: Runner) -> None:
    async def body(served: Served) -> None:
        sock, conn = await served.client(rcvbuf=64 * 1024)
        # The server's send buffer fixed too: autotuning (tcp_wmem up to 4 MB) let the kernel
        # take in what the transport held, so the drain finished although nothing was read.
        server_sock = conn.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        high_water = conn.transport.get_write_buffer_limits()[1]
        for _ in range(64):  # until the transport's buffer is over its high-water mark
            conn.write(b"y" * (1024 * 1024))
            if conn.transport.get_write_buffer_size() > high_water:
                break
        assert conn.transport.get_write_buffer_size() > high_water
        drain = asyncio.ensure_future(conn.drain())
        await asyncio.sleep(0.2)
        assert not drain.done()  # the client reads nothing
        loop = asyncio.get_running_loop()
        while not drain.done():
            try:
                await asyncio.wait_for(loop.sock_recv(sock, 1024 * 1024), 0.2)
            except TimeoutError:
                pass
        await drain

    run(body)
