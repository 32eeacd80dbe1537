"""PIPELINING on the delivery side (RFC 2920), against a sink that insists on it.

`GroupSink` reads MAIL, the RCPTs and DATA before it answers any of them, then answers them all at
once (or one octet per segment). A client that waits for the MAIL reply before sending RCPT never
gets one and times out, so these tests fail unless the group really is pipelined and every reply in
a segment (or split across segments) is read.
"""

from __future__ import annotations

import asyncio

import pytest

from relaygate.delivery.client import ConnectionPool, deliver
from relaygate.delivery.pipeline import ReplyReader

from .helpers import Connector, LoopbackServer, hop

MSG = b"From: printer@corp.test\r\nSubject: scan\r\n\r\nHello\r\n.dot line\r\n"


class GroupSink(LoopbackServer):
    def __init__(
        self,
        *,
        rcpt_codes: dict[str, str] | None = None,
        byte_by_byte: bool = False,
        data_despite_no_rcpt: bool = False,
    ) -> None:
        self.rcpt_codes = rcpt_codes or {}
        self.byte_by_byte = byte_by_byte
        self.data_despite_no_rcpt = data_despite_no_rcpt
        self.groups: list[list[bytes]] = []  # the commands of each MAIL...DATA group
        self.contents: list[bytes] = []
        self.after: list[bytes] = []  # commands after a transaction (RSET, QUIT)
        self.connections = 0

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.byte_by_byte:
            writer.write(data)
            await writer.drain()
            return
        for i in range(len(data)):
            writer.write(data[i : i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._send(writer, b"220 group.test ESMTP\r\n")
            while True:
                line = await reader.readline()
                if not line:
                    return
                verb = line[:4].upper()
                if verb == b"EHLO":
                    await self._send(
                        writer, b"250-group.test\r\n250-PIPELINING\r\n250 SIZE 10000000\r\n"
                    )
                elif verb == b"MAIL":
                    group = [line.rstrip()]
                    while not group[-1].upper().startswith(b"DATA"):
                        nxt = await reader.readline()
                        if not nxt:
                            return
                        group.append(nxt.rstrip())
                    self.groups.append(group)
                    answers = [b"250-2.1.0 sender\r\n250 2.1.0 OK\r\n"]  # a multi-line reply
                    ok = 0
                    for cmd in group[1:-1]:
                        rcpt = cmd[len(b"RCPT TO:<") : -1].decode()
                        code = self.rcpt_codes.get(rcpt, "250 2.1.5 OK")
                        ok += code.startswith("250")
                        answers.append(code.encode() + b"\r\n")
                    start_data = ok or self.data_despite_no_rcpt
                    answers.append(b"354 go ahead\r\n" if start_data else b"554 5.5.1 no rcpt\r\n")
                    await self._send(writer, b"".join(answers))
                    if start_data:
                        content = await reader.readuntil(b"\r\n.\r\n") if ok else b""
                        if not ok:
                            content = await reader.readline()  # the lone "." ending it
                        self.contents.append(content)
                        await self._send(writer, b"250 2.6.0 queued\r\n")
                else:
                    self.after.append(line.rstrip())
                    if verb == b"QUIT":
                        await self._send(writer, b"221 2.0.0 bye\r\n")
                        return
                    await self._send(writer, b"250 2.0.0 OK\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


async def send(sink: GroupSink, rcpts: list[str], **kw):
    return await deliver(
        [hop(sink.port)],
        connector=Connector(),
        helo_name="relay.corp.test",
        sender="printer@corp.test",
        recipients=rcpts,
        data=MSG,
        timeout=3.0,
        **kw,
    )


async def test_mail_rcpts_and_data_go_in_one_group_and_the_replies_are_read_in_order():
    sink = await GroupSink().start()
    try:
        out = await send(sink, ["a@dest.test", "b@dest.test", "c@dest.test"])
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test", "b@dest.test", "c@dest.test"]
    assert out.data_reply is not None and out.data_reply.code == 250
    [group] = sink.groups
    assert group[0].startswith(b"MAIL FROM:<printer@corp.test>")
    assert group[1:] == [
        b"RCPT TO:<a@dest.test>",
        b"RCPT TO:<b@dest.test>",
        b"RCPT TO:<c@dest.test>",
        b"DATA",
    ]
    assert sink.contents == [MSG.replace(b"\r\n.dot", b"\r\n..dot") + b".\r\n"]


async def test_replies_split_into_single_octets_are_reassembled():
    sink = GroupSink(byte_by_byte=True, rcpt_codes={"b@dest.test": "550 5.1.1 unknown"})
    await sink.start()
    try:
        out = await send(sink, ["a@dest.test", "b@dest.test"])
    finally:
        await sink.close()
    assert out.delivered == ["a@dest.test"]
    assert out.failed == ["b@dest.test"]
    assert out.per_recipient["b@dest.test"].code == 550


async def test_a_server_that_starts_data_without_a_valid_recipient_gets_an_empty_end_and_rset():
    sink = GroupSink(
        rcpt_codes={"a@dest.test": "550 5.1.1 unknown", "b@dest.test": "550 5.1.1 unknown"},
        data_despite_no_rcpt=True,
    )
    await sink.start()
    pool = ConnectionPool(idle_seconds=5.0)
    try:
        out = await send(sink, ["a@dest.test", "b@dest.test"], pool=pool)
        assert out.failed == ["a@dest.test", "b@dest.test"]
        assert sink.contents == [b".\r\n"]  # the content ended at once: nothing delivered
        assert sink.after == [b"RSET"]
        again = await send(sink, ["c@dest.test"], pool=pool)  # the session is reusable
        assert again.delivered == ["c@dest.test"]
        assert sink.connections == 1
    finally:
        await pool.aclose()
        await sink.close()


def test_reply_parser_handles_several_replies_and_partial_lines():
    class Transport(asyncio.Transport):
        def __init__(self) -> None:
            super().__init__()
            self.protocol: asyncio.BaseProtocol = asyncio.Protocol()

        def get_protocol(self) -> asyncio.BaseProtocol:
            return self.protocol

        def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
            self.protocol = protocol

    transport = Transport()
    inner = transport.protocol
    reader = ReplyReader.install(transport)
    assert transport.protocol is reader
    reader.data_received(b"250 ok\r\n250-one\r\n250-two\r")
    reader.data_received(b"\n250 three\r\n354 go")
    assert list(reader._replies) == [(250, "ok"), (250, "one\ntwo\nthree")]
    reader.data_received(b" ahead\r\n")
    assert reader._replies[-1] == (354, "go ahead")
    reader.restore()
    assert transport.protocol is inner


@pytest.mark.parametrize("tls", [False, True], ids=["tcp", "starttls"])
def test_pipelined_on_uvloop_with_a_pooled_session(
    tls: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay runs on uvloop, whose transports (TCP, and TLS after STARTTLS) must hand their
    protocol slot over and back too; uvloop's TCPTransport is no asyncio.Transport subclass. The
    other tests run on asyncio's loop. Three messages on one pooled session, pipelined."""
    import ssl

    import trustme
    import uvloop

    from . import pipeline_spy
    from .helpers import Handler, start_sink

    installs = pipeline_spy.count_installs(monkeypatch)

    async def main() -> None:
        ca = trustme.CA()
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("sink.test", "127.0.0.1").configure_cert(ctx)
        sink = await start_sink(Handler(), tls_context=ctx if tls else None)
        pool = ConnectionPool(idle_seconds=5.0)
        try:
            for i in range(3):
                out = await deliver(
                    [hop(sink.port)],
                    connector=Connector(),
                    helo_name="relay.corp.test",
                    sender="printer@corp.test",
                    recipients=[f"a{i}@dest.test", f"b{i}@dest.test"],
                    data=MSG,
                    timeout=5.0,
                    pool=pool,
                )
                assert out.delivered == [f"a{i}@dest.test", f"b{i}@dest.test"]
        finally:
            await pool.aclose()
            await sink.close()
        assert [m["tls"] for m in sink.handler.messages] == [tls, tls, tls]
        assert sink.handler.connections == 1

    uvloop.run(main())
    assert installs == [3], "the transactions did not take the pipelined path"
