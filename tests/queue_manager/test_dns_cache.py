"""Delivery's DNS answers are kept for their TTL (delivery/dns.py, dnspython's LRU cache): a relay
in-process whose server.dns_servers is the loopback DNS server (tests/support/dns_server.py, which
records every query it answers), delivering by MX to aiosmtpd sinks on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from relaygate import replies
from relaygate.app import Relay
from relaygate.queue.model import RecipientStatus
from tests.queue_manager.helpers import (
    ScriptedHandler,
    Sink,
    send,
    start_relay,
    start_sink,
    wait_for,
)
from tests.support.dns_server import LoopbackDNS

SENDER = "scanner@senders.test"
MESSAGE = b"From: scanner@senders.test\r\nTo: bob@dest.test\r\nSubject: DNS\r\n\r\nbody\r\n"


def lab_mx_connector(port: int) -> str:
    """A send connector routing every domain by MX, to `port`, loopback MX hosts allowed."""
    return (
        '\n[[send_connectors]]\nname = "Lab MX"\naddress_spaces = ["*"]\n'
        f"dns_routing_enabled = true\nport = {port}\nallow_loopback_mx = true\n"
    )


@contextlib.asynccontextmanager
async def mx_relay(
    tmp_path: Path, dns_server: LoopbackDNS, port: int, **kw: Any
) -> AsyncIterator[Relay]:
    relay = await start_relay(
        tmp_path / "data",
        {},
        extra=lab_mx_connector(port),
        server_extra=f'dns_servers = ["{dns_server.address}"]',
        **kw,
    )
    try:
        yield relay
    finally:
        await relay.stop()


@contextlib.asynccontextmanager
async def sink_at(host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Sink]:
    sink = await start_sink(ScriptedHandler(), host=host, port=port)
    try:
        yield sink
    finally:
        await sink.close()


#: What a delivery to bob@dest.test asks, its MX host being mx.dest.test.
QUESTIONS = [("dest.test", "MX"), ("mx.dest.test", "A"), ("mx.dest.test", "AAAA")]


def asked(dns_server: LoopbackDNS, name: str, rtype: str) -> int:
    """How many times the server was asked for `rtype` at `name` (UDP and TCP)."""
    return sum(1 for n, t, _ in list(dns_server.queries) if (n, t) == (name, rtype))


async def deliver(relay: Relay, sink: Sink) -> None:
    """One message to bob@dest.test, returned once `sink` has it."""
    before = len(sink.handler.messages)
    code, _ = await send(relay, SENDER, ["bob@dest.test"], MESSAGE)
    assert code == 250
    await wait_for(lambda: len(sink.handler.messages) > before, timeout=30)


async def test_two_deliveries_to_one_domain_ask_the_dns_server_once_within_the_ttl(
    tmp_path: Path,
) -> None:
    """Every delivery asked the DNS server again: an MX query and A + AAAA per host, round trips
    to a remote server (a domain controller) for each message to a domain. Within the answers'
    TTL the second delivery asks nothing."""
    with LoopbackDNS(ttl=60) as dns_server:
        dns_server.add("dest.test", "MX", (10, "mx.dest.test"))
        dns_server.add("mx.dest.test", "A", "127.0.0.1")  # no AAAA: a NODATA, kept too
        async with sink_at() as mx, mx_relay(tmp_path, dns_server, mx.port) as relay:
            await deliver(relay, mx)
            await deliver(relay, mx)
        assert [asked(dns_server, *q) for q in QUESTIONS] == [1, 1, 1], dns_server.queries


async def test_an_answer_is_asked_for_again_once_its_ttl_has_passed(tmp_path: Path) -> None:
    with LoopbackDNS(ttl=1) as dns_server:
        dns_server.add("dest.test", "MX", (10, "mx.dest.test"))
        dns_server.add("mx.dest.test", "A", "127.0.0.1")
        async with sink_at() as mx, mx_relay(tmp_path, dns_server, mx.port) as relay:
            await deliver(relay, mx)
            assert [asked(dns_server, *q) for q in QUESTIONS] == [1, 1, 1]
            await asyncio.sleep(1.2)  # the TTL itself running out, not a wait for a condition
            await deliver(relay, mx)
        # the NODATA for AAAA too: its negative TTL is the SOA's (RFC 2308), 1 s here
        assert [asked(dns_server, *q) for q in QUESTIONS] == [2, 2, 2], dns_server.queries


async def test_a_servfail_is_not_kept_the_next_attempt_asks_again(tmp_path: Path) -> None:
    """A SERVFAIL (or a timeout) defers the mail; the retry asks the server again and delivers,
    and that answer is then kept."""
    with LoopbackDNS(ttl=60) as dns_server:
        dns_server.add("dest.test", "MX", (10, "mx.dest.test"))
        dns_server.add("mx.dest.test", "A", "127.0.0.1")
        dns_server.set_servfail("dest.test")
        async with sink_at() as mx, mx_relay(tmp_path, dns_server, mx.port) as relay:
            assert (await send(relay, SENDER, ["bob@dest.test"], MESSAGE))[0] == 250

            async def deferred() -> Any:
                msgs = await relay.store.list_messages()
                rcpt = msgs[0].recipients[0] if msgs else None
                return rcpt if rcpt and rcpt.status == RecipientStatus.DEFERRED else None

            rcpt = await wait_for(deferred, timeout=30)
            assert rcpt.last_error == replies.dns_query_failed("ServerFailure").line()
            failed = asked(dns_server, "dest.test", "MX")
            dns_server.clear_overrides("dest.test")
            await wait_for(lambda: mx.handler.messages, timeout=30)  # a retry, 1 s later
            answered = asked(dns_server, "dest.test", "MX")
            assert answered > failed  # asked again, the SERVFAIL not kept
            await deliver(relay, mx)
        assert asked(dns_server, "dest.test", "MX") == answered, dns_server.queries


async def test_a_reload_forgets_the_answers_an_mx_changed_since_is_used_at_once(
    tmp_path: Path,
) -> None:
    """An operator who changed an MX record reloads the relay (SIGHUP): the answers kept until
    then are dropped, and the next delivery asks again and goes to the new host. Without the
    reload the kept answer is used for its TTL."""
    config_file = tmp_path / "relaygate.toml"
    with LoopbackDNS(ttl=3600) as dns_server:
        dns_server.add("dest.test", "MX", (10, "old.dest.test"))
        dns_server.add("old.dest.test", "A", "127.0.0.1")
        dns_server.add("new.dest.test", "A", "127.0.0.2")
        async with (
            sink_at("127.0.0.1") as old,
            sink_at("127.0.0.2", old.port) as new,
            mx_relay(tmp_path, dns_server, old.port, config_file=config_file) as relay,
        ):
            await deliver(relay, old)
            dns_server.remove("dest.test", "MX")
            dns_server.add("dest.test", "MX", (10, "new.dest.test"))
            await deliver(relay, old)  # the answer kept, within its TTL
            assert asked(dns_server, "dest.test", "MX") == 1
            await relay.reload()
            await deliver(relay, new)
            assert asked(dns_server, "dest.test", "MX") == 2
            assert asked(dns_server, "new.dest.test", "A") == 1
            assert len(old.handler.messages) == 2
