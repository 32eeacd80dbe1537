"""PROXY protocol v1/v2: honoured only from server.trusted_proxies, and then it selects the connector."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from tests.smtp.conftest import default_frontend, relay_connector

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(
    src: str, dst: str = "127.0.0.1", sport: int = 40000, dport: int = 25, *, local: bool = False
) -> bytes:
    if local:
        return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)
    body = (
        ipaddress.IPv4Address(src).packed
        + ipaddress.IPv4Address(dst).packed
        + struct.pack("!HH", sport, dport)
    )
    return V2_SIGNATURE + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


@pytest.fixture
def proxied(relay):
    return relay(
        [
            default_frontend(max_protocol_errors=20),
            relay_connector(["10.1.2.3"], name="Relay via LB"),
        ],
        server={"trusted_proxies": ["127.0.0.7"]},
    )


def relay_through(c, rcpt: str = "victim@external.example") -> tuple[str, str]:
    hello = c.cmd("EHLO printer.corp.example", 250).lines[0]
    c.cmd("MAIL FROM:<printer@corp.example>", 250)
    verdict = c.cmd(f"RCPT TO:<{rcpt}>")
    if verdict.code == 250:
        c.cmd("DATA", 354)
        c.send(b"Subject: via proxy\r\n\r\nbody\r\n.\r\n")
        c.expect(250)
    return hello, verdict.text


@pytest.mark.parametrize("version", [1, 2])
def test_proxy_from_trusted_balancer_selects_connector_by_proxied_address(proxied, version):
    header = (
        b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\n" if version == 1 else v2_header("10.1.2.3")
    )
    with proxied.raw("127.0.0.7") as c:
        c.send(header)
        c.expect(220)
        hello, verdict = relay_through(c)
    assert hello.endswith("Hello [10.1.2.3]")
    assert verdict == "250 2.1.5 Recipient OK"
    (msg,) = proxied.messages()
    assert msg.client_ip == "10.1.2.3" and msg.connector == "Relay via LB"
    assert proxied.data(msg.queue_id).startswith(
        b"Received: from printer.corp.example ([10.1.2.3])"
    )
    # Another proxied client is outside the relay range: Default Frontend, refused.
    other = b"PROXY TCP4 10.9.9.9 127.0.0.1 40001 25\r\n" if version == 1 else v2_header("10.9.9.9")
    with proxied.raw("127.0.0.7") as c:
        c.send(other)
        c.expect(220)
        hello, verdict = relay_through(c)
    assert hello.endswith("Hello [10.9.9.9]")
    assert verdict.startswith("550 5.7.54")


def test_proxy_header_and_first_command_in_one_write(proxied):
    with proxied.raw("127.0.0.7") as c:
        c.send(b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 25\r\nEHLO printer.corp.example\r\n")
        c.expect(220)
        assert c.expect(250).lines[0].endswith("Hello [10.1.2.3]")


def test_proxy_v2_local_keeps_the_real_peer(proxied):
    with proxied.raw("127.0.0.7") as c:
        c.send(v2_header("", local=True))
        c.expect(220)
        assert c.cmd("EHLO lb-health", 250).lines[0].endswith("Hello [127.0.0.7]")


def test_proxy_from_untrusted_peer_is_a_bad_command(proxied):
    with proxied.raw("127.0.0.5") as c:
        c.expect(220)
        assert (
            c.cmd("PROXY TCP4 10.1.2.3 127.0.0.1 40000 25").text == "500 5.3.3 Unrecognized command"
        )
        hello, verdict = relay_through(c)
    assert hello.endswith("Hello [127.0.0.5]")  # the client IP is unchanged
    assert verdict.startswith("550 5.7.54")
    assert proxied.messages() == []


@pytest.mark.parametrize(
    ("source", "connector"),
    [
        (
            "::ffff:10.1.2.3",
            "Relay via LB",
        ),  # IPv4-mapped: the IPv4 client it is (DESIGN decision 6)
        ("64:ff9b::a01:203", "Default Frontend"),  # NAT64 of 10.1.2.3: an IPv6 client
        ("::a01:203", "Default Frontend"),  # IPv4-compatible ::10.1.2.3 (deprecated)
        ("2002:a01:203::1", "Default Frontend"),  # 6to4 of 10.1.2.3
    ],
)
def test_an_ipv6_client_is_matched_as_ipv4_only_when_ipv4_mapped(relay, source, connector):
    """An address that embeds 10.1.2.3 in another IPv6 form is an IPv6 client: it never gets into an
    IPv4 range by it (a host holds such an address without being 10.1.2.3). Only ::ffff:0:0/96,
    what a dual-stack socket shows an IPv4 client as, is matched as IPv4; explain agrees."""
    from relaygate.policy.explain import explain

    r = relay(
        [
            default_frontend(remote_ip_ranges=["0.0.0.0-255.255.255.255", "::/0"]),
            relay_connector(["10.1.2.3"], name="Relay via LB"),
        ],
        server={"trusted_proxies": ["127.0.0.7"]},
    )
    with r.raw("127.0.0.7") as c:
        c.send(f"PROXY TCP6 {source} ::1 40000 25\r\n".encode())
        c.expect(220)
        hello, verdict = relay_through(c)
    if connector == "Relay via LB":
        assert hello.endswith("Hello [10.1.2.3]") and verdict == "250 2.1.5 Recipient OK"
        assert [m.connector for m in r.messages()] == [connector]
    else:
        assert hello.endswith(f"Hello [{source}]") and verdict.startswith("550 5.7.54")
        assert r.messages() == []
    explained = explain(
        r.config, client_ip=source, local=("127.0.0.1", r.port), sender=None, recipients=[]
    )
    assert explained.selection.connector is not None
    assert explained.selection.connector.name == connector


@pytest.mark.parametrize(
    "bad",
    [
        b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n",
        b"PROXY TCP6 10.1.2.3 127.0.0.1 1 2\r\n",
        b"EHLO x\r\n" * 3,
    ],
)
def test_malformed_proxy_from_trusted_balancer_closes(proxied, bad):
    with proxied.raw("127.0.0.7") as c:
        c.send(bad)
        assert c.is_closed(wait=3)
        assert c.received == b""


@pytest.mark.parametrize(
    ("buf", "expected"),
    [
        (b"", None),
        (b"PRO", None),
        (b"PROXY TCP4 10.0.0.1 10.0.0.2 1", None),
        (b"PROXY TCP4 10.0.0.1 10.0.0.2 1 2\r\n\x16\x03\x01", 34),
        (b"\r\n\r\n\x00\r\nQU", None),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11", None),
        (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + bytes(12) + b"\x16", 28),
    ],
)
def test_the_header_length_is_known_before_the_bytes_after_it_are_read(
    buf: bytes, expected: int | None
) -> None:
    """Used to take a PROXY header off a socket in front of implicit TLS without the ClientHello
    behind it: None asks for more bytes."""
    from relaygate.smtp import proxy

    assert proxy.header_length(buf) == expected


@pytest.mark.parametrize("buf", [b"\x16\x03\x01\x02\x00", b"EHLO x\r\n", b"PROXY " + b"x" * 120])
def test_anything_but_a_proxy_header_is_refused_at_once(buf: bytes) -> None:
    from relaygate.smtp import proxy

    with pytest.raises(proxy.ProxyError):
        proxy.header_length(buf)


@pytest.mark.parametrize(
    "header",
    [
        b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 465\r\n",
        v2_header("10.1.2.3"),
        v2_header("10.1.2.3")[:14]  # with 1000 bytes of TLVs (PP2_TYPE_NOOP)
        + struct.pack("!H", 12 + 1000)
        + v2_header("10.1.2.3")[16:]
        + b"\x04"
        + struct.pack("!H", 997)
        + bytes(997),
    ],
    ids=["v1", "v2", "v2-tlvs"],
)
def test_the_header_is_taken_off_the_socket_whatever_its_segments(header: bytes) -> None:
    """_take_proxy_header, the header cut in two at every place (a pause between the parts):
    it returns the source once the header is whole and leaves every byte after it (a
    ClientHello) on the socket, and an end of the connection before the header's end is an
    error at once, not a wait for PROXY_HEADER_TIMEOUT."""
    import asyncio
    import socket

    from relaygate.smtp.server import _take_proxy_header

    after = b"\x16\x03\x01\x02\x00\x01\x00"

    async def take(parts: list[bytes], then_close: bool) -> tuple[object, bytes]:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        with ours, theirs:
            task = asyncio.create_task(_take_proxy_header(ours))
            for part in parts:
                theirs.sendall(part)
                await asyncio.sleep(0.002)
            if then_close:
                theirs.shutdown(socket.SHUT_WR)
            try:
                result: object = await asyncio.wait_for(task, 2)
            except (ConnectionError, TimeoutError) as exc:
                return type(exc), b""
            ours.setblocking(True)
            ours.settimeout(1)
            return result, ours.recv(len(after) + 1)

    cuts = range(1, len(header)) if len(header) < 100 else [1, 15, 16, 17, 28, 29, 600, 1027]
    for cut in cuts:
        parts = [header[:cut], header[cut:] + after]
        assert asyncio.run(take(parts, False)) == (("10.1.2.3", 40000), after), cut
        assert asyncio.run(take([header[:cut]], True)) == (ConnectionResetError, b""), cut


def test_a_v2_header_with_an_unassigned_command_is_refused() -> None:
    """proxy-protocol.txt 2.2: commands other than LOCAL (0) and PROXY (1) are unassigned, and
    a receiver must drop the connection (before, they were taken as PROXY)."""
    from relaygate.smtp import proxy

    body = bytes([10, 1, 2, 3, 127, 0, 0, 1]) + (40000).to_bytes(2, "big") + (25).to_bytes(2, "big")
    header = proxy.V2_SIGNATURE + b"\x21\x11\x00\x0c" + body
    assert proxy.parse_v2(header) == (("10.1.2.3", 40000), 28)
    with pytest.raises(proxy.ProxyError):
        proxy.parse_v2(proxy.V2_SIGNATURE + b"\x22\x11\x00\x0c" + body)
