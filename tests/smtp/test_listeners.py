"""Listeners: one per distinct binding — IPv4, IPv6, wildcard, several ports — and the connector is
chosen per connection from the local endpoint and the client address."""

from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

from tests.smtp.conftest import relay, relay_connector  # noqa: F401


def banner(host: str, port: int, source: str | None = None) -> bytes:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        if source:
            s.bind((source, 0))
        s.connect((host, port))
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data


def test_ipv6_wildcard_and_several_ports(relay):  # noqa: F811
    r = relay(
        [
            relay_connector(
                ["127.0.0.0/8", "::1"],
                name="Loopback v4+v6",
                bindings=["127.0.0.1:{port}", "[::1]:{port}"],
                banner="220 v4v6 ready",
            ),
            relay_connector(
                ["127.0.0.0/8"],
                name="Wildcard second port",
                bindings=["0.0.0.0:{port2}"],
                banner="220 wildcard ready",
            ),
            relay_connector(
                ["127.0.0.9"],
                name="Exact third port",
                bindings=["127.0.0.1:{port3}"],
                banner="220 exact ready",
            ),
        ]
    )
    assert banner("127.0.0.1", r.ports[0]) == b"220 v4v6 ready\r\n"
    assert banner("::1", r.ports[0]) == b"220 v4v6 ready\r\n"  # IPv6 listener, IPv6 client range
    assert banner("127.0.0.1", r.ports[1]) == b"220 wildcard ready\r\n"  # 0.0.0.0 binding
    assert banner("127.0.0.2", r.ports[1]) == b"220 wildcard ready\r\n"  # any local IPv4 address
    # Third port: only 127.0.0.9 is in range; anyone else is closed without a banner.
    assert banner("127.0.0.1", r.ports[2], source="127.0.0.9") == b"220 exact ready\r\n"
    assert banner("127.0.0.1", r.ports[2], source="127.0.0.5") == b""


def test_a_burst_of_connections_waits_in_the_accept_queue(relay):  # noqa: F811
    """While the relay is not accepting (here: stopped), the kernel completes the handshakes of a
    burst up to the listen backlog and the clients wait in the accept queue. Past the backlog a
    client's SYN is dropped and it waits a second or more for its retransmission: with the event
    loop's default backlog (100) most of this burst would."""
    r = relay([relay_connector(["127.0.0.0/8"])], mode="process")
    assert r.proc is not None
    burst = 300
    clients: list[socket.socket] = []
    poller = select.poll()
    os.kill(r.proc.pid, signal.SIGSTOP)
    try:
        for i in range(burst):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            clients.append(s)
            s.setblocking(False)
            s.bind((f"127.0.1.{i // 10 + 1}", 0))  # 10 per address: under the per-source limit
            s.connect_ex(("127.0.0.1", r.port))
            poller.register(s, select.POLLOUT)
        connected: set[int] = set()
        deadline = time.monotonic() + 0.5  # well before a dropped SYN's first retransmission (1 s)
        while len(connected) < burst and time.monotonic() < deadline:
            for fd, _ in poller.poll(50):
                connected.add(fd)
                poller.unregister(fd)
    finally:
        os.kill(r.proc.pid, signal.SIGCONT)
    try:
        assert len(connected) == burst
        for s in clients:  # and once the relay runs again, every one of them gets its banner
            s.setblocking(True)
            s.settimeout(10)
            assert s.recv(512).startswith(b"220 ")
    finally:
        for s in clients:
            s.close()


def test_a_stopping_relay_tells_waiting_clients_421_and_lets_a_message_in_data_finish(relay):  # noqa: F811
    r = relay([relay_connector(["127.0.0.0/8"])])
    idle = r.raw()
    idle.expect(220)
    idle.cmd("EHLO printer.corp.example", 250)
    sending = r.raw(source="127.0.0.6")
    sending.expect(220)
    sending.cmd("EHLO scanner.corp.example", 250)
    sending.cmd("MAIL FROM:<scanner@corp.example>", 250)
    sending.cmd("RCPT TO:<someone@example.com>", 250)
    sending.cmd("DATA", 354)
    sending.send(b"Subject: in flight\r\n\r\nfirst half\r\n")

    started = time.monotonic()
    stopper = threading.Thread(target=r.stop)
    stopper.start()
    try:
        # The client waiting to send a command is told at once, not when the grace period ends.
        reply = idle.reply()
        assert reply is not None and reply.text == "421 4.3.2 Service not available"
        assert idle.is_closed()
        assert time.monotonic() - started < 2
        # The message being sent is received and committed, then the 421 follows.
        time.sleep(0.3)
        sending.send(b"second half\r\n.\r\n")
        assert sending.expect(250).text.startswith("250 2.6.0 ")
        closing = sending.reply()
        assert closing is not None and closing.code == 421
        assert sending.is_closed()
    finally:
        stopper.join(20)
    assert time.monotonic() - started < 4  # before the 5 s grace would have run out
    (data,) = r.all_data().values()
    assert data.endswith(b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")


def test_a_specific_address_next_to_a_wildcard_on_the_same_port(relay):  # noqa: F811
    """Exchange's layout for a binding conflict: one connector on 0.0.0.0:P (or [::]:P), another on
    an exact address and the same port. The wildcard socket receives both; the connector is chosen
    by the real local address, and the exact one wins for its address (selection rule 2)."""
    r = relay(
        [
            relay_connector(
                ["127.0.0.0/8"], name="Wildcard", bindings=["0.0.0.0:{port}"], banner="220 any"
            ),
            relay_connector(
                ["127.0.0.0/8"], name="Exact", bindings=["127.0.0.1:{port}"], banner="220 exact"
            ),
            # [::] is dual-stack (no 0.0.0.0 on this port): it covers IPv4 addresses too
            relay_connector(
                ["127.0.0.0/8", "::1"],
                name="Wildcard v6",
                bindings=["[::]:{port2}"],
                banner="220 any v6",
            ),
            relay_connector(
                ["127.0.0.0/8"],
                name="Exact v4 on v6 wildcard",
                bindings=["127.0.0.1:{port2}"],
                banner="220 exact v4",
            ),
        ]
    )
    assert banner("127.0.0.1", r.ports[0]) == b"220 exact\r\n"
    assert banner("127.0.0.2", r.ports[0]) == b"220 any\r\n"
    assert banner("127.0.0.1", r.ports[1]) == b"220 exact v4\r\n"
    assert banner("127.0.0.2", r.ports[1]) == b"220 any v6\r\n"
    assert banner("::1", r.ports[1]) == b"220 any v6\r\n"


def test_a_binding_written_as_an_ipv4_mapped_address_takes_its_ipv4_clients(relay):  # noqa: F811
    """`[::ffff:127.0.0.1]:PORT` is 127.0.0.1:PORT (DESIGN decision 6, as remote_ip_ranges): the
    connector bound so takes the connections to that address, not none of them."""
    r = relay(
        [
            relay_connector(
                ["127.0.0.5"],
                name="Mapped binding",
                bindings=["[::ffff:127.0.0.1]:{port}"],
                banner="220 mapped ready",
            )
        ]
    )
    assert banner("127.0.0.1", r.port, "127.0.0.5") == b"220 mapped ready\r\n"
    assert [str(b) for b in r.config.receive_connectors[0].bindings] == [f"127.0.0.1:{r.port}"]
