"""The state of a `Session`, declared once for the parts it is made of, and what they all raise.

A session is one class put together from mixins, one seam each: session_io.py (reads, replies, the
read timeouts), session_reload.py (following a reload or a changed users file),
session_transaction.py (MAIL and RCPT), session_data.py (DATA: reception and the queue commit),
session_auth.py (STARTTLS and AUTH). `Session.__init__` (session.py) sets what is declared here, so
that each mixin is type-checked against the same attributes without importing the class that
combines them. `_Close` and `_Transaction` are here because every part raises the one and most
read the other.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from relaygate.addresses import Address
from relaygate.config.model import Config, ReceiveConnector
from relaygate.policy.address_rules import ConnectorAddressRules
from relaygate.policy.rights import SessionRights
from relaygate.replies import Reply

if TYPE_CHECKING:
    from relaygate.smtp.connection import Connection
    from relaygate.smtp.server import ServerContext


class _Close(Exception):
    """End the session after the queued replies are written."""

    def __init__(self, context: str = "Local") -> None:
        self.context = context


@dataclass
class _Transaction:
    sender: Address | None = None
    sender_text: str = ""
    recipients: list[str] = field(default_factory=list)
    # Each recipient as parsed (beside its queued form above), to check it again after a reload
    rcpt_addresses: list[Address] = field(default_factory=list)
    # The configuration MAIL was checked under: another one at DATA is a reload to check against
    checked_under: Config | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    # RFC 3461 parameters, kept for the relay's own reports (by recipient address)
    envid: str = ""
    notify: dict[str, str] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)


class _SessionState:
    """The attributes `Session.__init__` sets (see there for what each one is)."""

    ctx: ServerContext
    connector: ReceiveConnector
    conn: Connection
    client_ip: str
    client_port: int
    local: tuple[str, int]
    tls_active: bool
    buf: bytearray
    out: list[bytes]
    fqdn: str
    log: Any
    helo: str | None
    esmtp: bool
    auth_user: str | None
    rights: SessionRights
    address_rules: ConnectorAddressRules
    _config_seen: Config | None
    txn: _Transaction | None
    errors: int
    logon_failures: int
    messages: int
    loop: asyncio.AbstractEventLoop
    started: float
    deadline: float
    idle: float
    _reading_since: float | None
    _timed_out: Reply | _Close | None
    _stopping: bool
    _in_data: bool
    _in_auth: bool
    _held: int
    _watchdog: asyncio.TimerHandle | None
    _task: asyncio.Task[object] | None
    pipelining: bool
    tarpit: float
    auth_tarpit: float
    bare_lf_rejection: bool
    authenticated: bool


def _span(seconds: float) -> str:
    whole = int(seconds)
    return f"0.{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
