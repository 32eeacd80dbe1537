"""A RelayGate node in-process (``Relay`` from app.py) with smart hosts pointing at aiosmtpd sinks.

Everything listens on 127.0.0.1. The relay's SMTP and admin ports are picked free beforehand
(the config parser refuses port 0); the sinks use port 0.
"""

from __future__ import annotations

import asyncio
import binascii
import email
import email.policy
import time
from collections.abc import Awaitable, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib

from relaygate.app import Relay
from relaygate.config import load_config, parse_text
from tests.delivery.helpers import Handler, Sink, start_sink
from tests.support.ports import free_port

__all__ = [
    "Handler",
    "Sink",
    "free_port",
    "make_config_text",
    "parse_mail",
    "send",
    "start_relay",
    "start_sink",
    "wait_for",
]


def send_connector_text(name: str, space: str, port: int, *extra_lines: str) -> str:
    """One smart-host send connector to 127.0.0.1:`port` for `space`, as TOML."""
    lines = [
        "",
        "[[send_connectors]]",
        f'name = "{name}"',
        f'address_spaces = ["{space}"]',
        "dns_routing_enabled = false",
        f'smart_hosts = ["[127.0.0.1]:{port}"]',
        *extra_lines,
    ]
    return "\n".join(lines) + "\n"


def make_config_text(
    data_dir: Path,
    *,
    smtp_port: int,
    admin_port: int,
    routes: dict[str, int],
    queue: dict[str, Any] | None = None,
    extra: str = "",
    admin_extra: str = "",
    receive_extra: str = "",
    server_extra: str = "",
) -> str:
    """routes: address space → sink port (one smart-host send connector each); receive_extra,
    server_extra: more keys of the receive connector, of [server]."""
    q = {
        "transient_failure_retry_interval": "00:00:01",
        "transient_failure_retry_count": 2,
        "message_retry_interval": "00:00:02",
        "delay_notification_timeout": "04:00:00",
        "message_expiration_timeout": "2.00:00:00",
        **(queue or {}),
    }
    qlines = "\n".join(
        f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in q.items()
    ).replace("'", '"')
    connectors = "\n".join(
        send_connector_text(
            f"To {space}", space, port, 'connection_inactivity_timeout = "00:00:10"'
        )
        for space, port in routes.items()
    )
    return f"""
[server]
name = "RELAYTEST"
fqdn = "relay.test"
data_dir = "{data_dir}"
{server_extra}

[admin]
listen = "127.0.0.1:{admin_port}"
{admin_extra}

[queue]
{qlines}

[[accepted_domains]]
domain = "corp.test"
domain_type = "Authoritative"

[[receive_connectors]]
name = "Test Relay"
usage = "Custom"
bindings = ["127.0.0.1:{smtp_port}"]
remote_ip_ranges = ["127.0.0.1"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
protocol_logging_level = "Verbose"
{receive_extra}

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]
{connectors}
{extra}
"""


async def start_relay(
    data_dir: Path,
    routes: dict[str, int],
    *,
    queue: dict[str, Any] | None = None,
    scan_interval: float = 0.2,
    extra: str = "",
    smtp_port: int | None = None,
    config_file: Path | None = None,
    admin_extra: str = "",
    receive_extra: str = "",
    server_extra: str = "",
) -> Relay:
    """Start a relay; with ``config_file`` the config is written there and loaded from it."""
    smtp_port = smtp_port or free_port()
    admin_port = free_port()
    text = make_config_text(
        data_dir,
        smtp_port=smtp_port,
        admin_port=admin_port,
        routes=routes,
        queue=queue,
        extra=extra,
        admin_extra=admin_extra,
        receive_extra=receive_extra,
        server_extra=server_extra,
    )
    if config_file is not None:
        config_file.write_text(text, encoding="utf-8")
        config = load_config(config_file)
    else:
        config = parse_text(text, "<test>")
    relay = Relay(config, config_path=config_file)
    await relay.start()
    if relay.manager is not None:
        relay.manager.scan_interval = scan_interval
        relay.manager.stop_grace = 2.0
    return relay


def smtp_port(relay: Relay) -> int:
    assert relay.server is not None
    return relay.server.endpoints[0][1]


async def send(
    relay: Relay,
    sender: str,
    recipients: list[str],
    data: bytes,
    *,
    mail_params: bytes = b"",
    rcpt_params: dict[str, bytes] | dict[str, list[bytes]] | None = None,
) -> tuple[int, str]:
    """Submit through the relay's own SMTP listener; returns the end-of-DATA reply.
    rcpt_params: what follows ``RCPT TO:<address>`` by address (`` NOTIFY=NEVER``); a list for
    an address given more than once in ``recipients``, one item per RCPT in order."""
    given: dict[str, list[bytes]] = {
        a: list(p) if isinstance(p, list) else [p] * recipients.count(a)
        for a, p in (rcpt_params or {}).items()
    }
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(relay), timeout=10)
    await client.connect()
    try:
        await client.ehlo(hostname="client.test")
        resp = await client.execute_command(
            b"MAIL", b"FROM:<" + sender.encode() + b">" + mail_params
        )
        assert resp.code == 250, resp
        for r in recipients:
            params = given[r].pop(0) if given.get(r) else b""
            resp = await client.execute_command(b"RCPT", b"TO:<" + r.encode() + b">" + params)
            assert resp.code == 250, resp
        resp = await client.data(data)
        return resp.code, resp.message
    finally:
        await client.quit()


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    interval: float = 0.05,
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


def parse_mail(content: bytes) -> EmailMessage:
    msg = email.message_from_bytes(content, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def report_part(report: bytes, index: int) -> bytes:
    """Part `index` (0: the text, 1: the status, 2: the header) of a delivery report, its transfer
    encoding undone: RFC 6533's global types are quoted-printable, and Python's parser reads a
    message/* part as a message, never decoding it."""
    boundary = parse_mail(report).get_boundary()
    assert boundary
    part = report.split(b"\r\n--" + boundary.encode() + b"\r\n")[index + 1]
    head, _, content = part.partition(b"\r\n\r\n")
    content = content.split(b"\r\n\r\n--" + boundary.encode())[0] + b"\r\n"
    if b"Content-Transfer-Encoding: quoted-printable" in head:
        return binascii.a2b_qp(content)
    return content


def split_received(content: bytes) -> tuple[bytes, bytes]:
    """(the relay's Received header field, the rest) of what a sink received."""
    assert content.startswith(b"Received: "), content[:80]
    idx = 0
    while True:
        nl = content.index(b"\r\n", idx)
        idx = nl + 2
        if content[idx : idx + 1] not in (b" ", b"\t"):
            return content[:idx], content[idx:]


class ScriptedHandler(Handler):
    """A sink whose RCPT answer comes from ``policy(address, attempt)`` (attempt counts from 1 per
    address; None = accept), and whose DATA can be held until ``release`` is set."""

    def __init__(
        self,
        policy: Callable[[str, int], str | None] | None = None,
        *,
        hold: asyncio.Event | None = None,
    ) -> None:
        super().__init__()
        self.policy = policy or (lambda _a, _n: None)
        self.hold = hold
        self.attempts: dict[str, list[float]] = {}
        self.data_started = asyncio.Event()

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        times = self.attempts.setdefault(address, [])
        times.append(time.monotonic())
        reply = self.policy(address, len(times))
        self.rcpts.append(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):
        self.data_started.set()
        if self.hold is not None:
            await self.hold.wait()
        return await super().handle_DATA(server, session, envelope)
