"""Helpers for the admin CLI tests: run `python -m relaygate` as a subprocess, write configs, and a
real SMTP server (aiosmtpd) on 127.0.0.1 port 0 in a background thread."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

ROOT = Path(__file__).resolve().parents[2]
PYTHON = (
    str(ROOT / ".venv" / "bin" / "python")
    if (ROOT / ".venv" / "bin" / "python").exists()
    else sys.executable
)

RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def run(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str | None = None
) -> Run:
    full_env = {k: v for k, v in os.environ.items() if k != "RELAYGATE_CONFIG"}
    full_env.update({"COLUMNS": "300", "NO_COLOR": "1", "TERM": "dumb"})
    full_env.update(env or {})
    proc = subprocess.run(
        [PYTHON, "-m", "relaygate", *args],
        cwd=cwd,
        env=full_env,
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        timeout=60,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


@dataclass
class Recorder:
    """aiosmtpd handler: records peers and messages; refuses recipients whose domain is in `refuse`."""

    refuse: set[str] = field(default_factory=set)
    peers: list[tuple[str, int]] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    logins: list[tuple[str, str]] = field(default_factory=list)

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.peers.append(session.peer)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Sender OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.rpartition("@")[2].lower() in self.refuse:
            return RELAY_DENIED
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient OK"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(
            {
                "peer": session.peer,
                "from": envelope.mail_from,
                "to": list(envelope.rcpt_tos),
                "data": envelope.content.decode("utf-8", "replace"),
            }
        )
        return "250 2.6.0 <test-1@relay.test> [InternalId=4242, Hostname=relay.test] Queued mail for delivery"

    def authenticator(self, server, session, envelope, mechanism, auth_data):
        if isinstance(auth_data, LoginPassword):
            user, password = auth_data.login.decode(), auth_data.password.decode()
            self.logins.append((user, password))
            ok = (user, password) == ("printer", "s3cret-Pa55")
            return AuthResult(success=ok, handled=False)
        return AuthResult(success=False, handled=False)


class SMTPServer:
    """aiosmtpd on 127.0.0.1:0 in its own thread and loop (aiosmtpd's Controller probes a fixed port)."""

    def __init__(self, handler: Recorder, **smtp_kwargs: Any) -> None:
        self.handler = handler
        self.kwargs = {"hostname": "relay.test", **smtp_kwargs}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    def __enter__(self) -> SMTPServer:
        self.thread.start()

        async def start() -> asyncio.base_events.Server:
            return await self.loop.create_server(
                lambda: SMTP(self.handler, loop=self.loop, **self.kwargs), "127.0.0.1", 0
            )

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self.server is not None
            self.server.close()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()
