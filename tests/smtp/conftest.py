"""Fixtures for the receive-service tests: a running RelayGate on 127.0.0.1 and a free port.

`relay(connectors, mode="thread" | "process", ...)` writes a TOML config into tmp_path and starts
either `Relay` in a background thread's event loop (plain asyncio) or `relaygate serve --config` as a
subprocess (uvloop, SIGKILL-able). Connector dicts are TOML tables; `{port}`, `{port2}` and `{port3}`
in `bindings` are replaced by the relay's free ports. Every connector gets short timeouts, no tarpit
and Verbose protocol logging unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from relaygate.app import open_store
from relaygate.config import load_config
from relaygate.queue.model import StoredMessage
from tests.smtp.helpers import RawClient, free_port

ROOT = Path(__file__).resolve().parents[2]
FQDN = "relay.corp.example"
SERVER_NAME = "RELAY01"
ANONYMOUS = "NT AUTHORITY\\ANONYMOUS LOGON"
ACCEPT_ANY_RECIPIENT = "ms-Exch-SMTP-Accept-Any-Recipient"

CONNECTOR_DEFAULTS: dict[str, Any] = {
    "tarpit_interval": "00:00:00",
    "auth_tarpit_interval": "00:00:00",
    "protocol_logging_level": "Verbose",
    "connection_inactivity_timeout": "00:00:20",
    "connection_timeout": "00:01:00",
}


def default_frontend(**overrides: Any) -> dict[str, Any]:
    """A 'Default Frontend'-like catch-all: every IPv4 client, anonymous, no relay right."""
    c: dict[str, Any] = {
        "name": "Default Frontend",
        "bindings": ["127.0.0.1:{port}"],
        "remote_ip_ranges": ["0.0.0.0-255.255.255.255"],
        "auth_mechanism": ["Tls"],
        "permission_groups": ["AnonymousUsers"],
    }
    c.update(overrides)
    return c


def relay_connector(
    ranges: tuple[str, ...] | list[str] = ("127.0.0.5",), **overrides: Any
) -> dict[str, Any]:
    """The seed's dedicated anonymous relay connector (method A: AnonymousUsers + Accept-Any-Recipient)."""
    c: dict[str, Any] = {
        "name": "SMTP Relay Internal",
        "usage": "Custom",
        "bindings": ["127.0.0.1:{port}"],
        "remote_ip_ranges": list(ranges),
        "auth_mechanism": ["Tls"],
        "permission_groups": ["AnonymousUsers"],
        "permissions": [{"user": ANONYMOUS, "extended_rights": [ACCEPT_ANY_RECIPIENT]}],
    }
    c.update(overrides)
    return c


class RelayHandle:
    """A running relay: its ports, config file, store and protocol log, and how to stop it."""

    def __init__(self, tmp: Path, doc: dict[str, Any], ports: list[int], mode: str) -> None:
        self.tmp = tmp
        self.doc = doc
        self.ports = ports
        self.port = ports[0]
        self.mode = mode
        self.data_dir = Path(doc["server"]["data_dir"])
        self.config_path = tmp / "relaygate.toml"
        self.config_path.write_text(tomlkit.dumps(doc), encoding="utf-8")
        self.config = load_config(self.config_path)
        self.proc: subprocess.Popen[bytes] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.relay: Any = None
        self.stderr_path = tmp / "serve.stderr"
        #: (soft, hard) RLIMIT_NOFILE for `relaygate serve` (process mode), None: inherited
        self.nofile: tuple[int, int] | None = None

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> RelayHandle:
        if self.mode == "thread":
            self._start_thread()
        else:
            self._start_process()
        return self

    def _start_thread(self) -> None:
        from relaygate.app import Relay

        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self.thread = threading.Thread(target=run, name="relay-loop", daemon=True)
        self.thread.start()
        ready.wait(5)

        async def make() -> Any:
            relay = Relay(self.config, config_path=self.config_path)
            await relay.start()
            return relay

        self.relay = asyncio.run_coroutine_threadsafe(make(), loop).result(20)

    def _start_process(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT / "src")
        stderr = open(self.stderr_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        nofile = self.nofile

        def limit_descriptors() -> None:  # in the child, before exec
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "relaygate", "serve", "--config", str(self.config_path)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            cwd=self.tmp,
            env=env,
            preexec_fn=limit_descriptors if nofile is not None else None,
        )
        stderr.close()
        assert self.proc.stdout is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            if line.startswith(b"RelayGate ready"):
                return
        self.proc.kill()
        raise RuntimeError(f"relaygate serve did not start:\n{self.stderr_path.read_text()}")

    def stop(self) -> None:
        if self.mode == "thread":
            if self.loop is not None and not self.loop.is_closed():
                try:
                    if self.relay is not None:  # None: its start failed
                        asyncio.run_coroutine_threadsafe(self.relay.stop(), self.loop).result(20)
                finally:
                    self.loop.call_soon_threadsafe(self.loop.stop)
                    assert self.thread is not None
                    self.thread.join(10)
                    self.loop.close()
                self.relay = None
        elif self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def reconfigure(
        self, connectors: list[dict[str, Any]], *, queue: dict[str, Any] | None = None
    ) -> None:
        """Rewrite the config file with new connectors (and `[queue]` keys) and reload (thread
        mode)."""
        self.doc = build_doc(
            self.tmp, connectors, self.ports, data_dir=self.data_dir, server=self.doc["server"],
            queue=queue,
        )  # fmt: skip
        self.config_path.write_text(tomlkit.dumps(self.doc), encoding="utf-8")
        self.config = load_config(self.config_path)
        assert self.loop is not None and self.relay is not None
        asyncio.run_coroutine_threadsafe(self.relay.reload(), self.loop).result(20)

    def kill(self) -> None:
        """SIGKILL the subprocess (process mode only)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    # -- clients ----------------------------------------------------------------------------------
    def raw(self, source: str = "127.0.0.5", port: int | None = None, **kw: Any) -> RawClient:
        return RawClient(port or self.port, source=source, **kw)

    def smtp(
        self, source: str = "127.0.0.5", port: int | None = None, timeout: float = 10
    ) -> smtplib.SMTP:
        return smtplib.SMTP(
            "127.0.0.1", port or self.port, local_hostname="client.corp.example",
            timeout=timeout, source_address=(source, 0),
        )  # fmt: skip

    # -- store and logs ---------------------------------------------------------------------------
    def _store_call(self, fn: Callable[[Any], Any]) -> Any:
        if self.mode == "thread" and self.relay is not None:
            assert self.loop is not None
            return asyncio.run_coroutine_threadsafe(fn(self.relay.store), self.loop).result(20)

        async def run() -> Any:
            store = open_store(self.config)  # the configured engine: SQLite or PostgreSQL
            await store.open()
            try:
                return await fn(store)
            finally:
                await store.close()

        return asyncio.run(run())

    def messages(self) -> list[StoredMessage]:
        return self._store_call(lambda s: s.list_messages(limit=100000))  # type: ignore[no-any-return]

    def message(self, queue_id: str) -> StoredMessage | None:
        return self._store_call(lambda s: s.get(queue_id))  # type: ignore[no-any-return]

    def data(self, queue_id: str) -> bytes:
        return self._store_call(lambda s: s.read_data(queue_id))  # type: ignore[no-any-return]

    def all_data(self) -> dict[str, bytes]:
        async def run(store: Any) -> dict[str, bytes]:
            out = {}
            for m in await store.list_messages(limit=100000):
                out[m.queue_id] = await store.read_data(m.queue_id)
            return out

        return self._store_call(run)  # type: ignore[no-any-return]

    def protocol_log_text(self) -> str:
        if self.mode == "thread" and self.relay is not None and self.relay.protocol_log is not None:
            self.relay.protocol_log.flush()
        else:
            time.sleep(0.5)  # the subprocess flushes every 0.2 s
        folder = self.data_dir / "logs" / "ProtocolLog" / "SmtpReceive"
        return "".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("RECV*")))


def build_doc(
    tmp: Path,
    connectors: list[dict[str, Any]],
    ports: list[int],
    *,
    server: dict[str, Any] | None = None,
    domains: list[dict[str, Any]] | None = None,
    data_dir: Path | None = None,
    queue: dict[str, Any] | None = None,
) -> dict[str, Any]:
    fmt = {"port": ports[0], "port2": ports[1], "port3": ports[2]}
    rcs = []
    for spec in connectors:
        c = dict(CONNECTOR_DEFAULTS)
        c.update(spec)
        c["bindings"] = [b.format(**fmt) for b in c.get("bindings", ["127.0.0.1:{port}"])]
        rcs.append(c)
    srv: dict[str, Any] = {
        "name": SERVER_NAME,
        "fqdn": FQDN,
        "data_dir": str(data_dir or tmp / "data"),
        "message_tracking_log_enabled": False,
    }
    srv.update(server or {})
    return {
        "server": srv,
        "admin": {"enabled": False, "listen": f"127.0.0.1:{free_port()}"},
        "queue": {
            # The queue manager (if present) may try deliveries: they fail and stay queued.
            "transient_failure_retry_interval": "00:10:00",
            "message_retry_interval": "00:30:00",
            **(queue or {}),
        },
        "accepted_domains": domains
        if domains is not None
        else [{"domain": "corp.example", "domain_type": "Authoritative", "default": True}],
        "receive_connectors": rcs,
        "send_connectors": [
            {
                "name": "Outbound (unreachable)",
                "address_spaces": ["*"],
                "dns_routing_enabled": False,
                "smart_hosts": ["127.0.0.1"],
                "port": free_port(),  # nothing listens there: messages stay queued
            }
        ],
    }


class _Errors(logging.Handler):
    """Collects ERROR records (a session that crashed is logged as 'session from ... failed')."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[Callable[..., RelayHandle]]:
    errors = _Errors()
    smtp_logger = logging.getLogger("relaygate.smtp")
    smtp_logger.addHandler(errors)
    handles: list[RelayHandle] = []
    counter = iter(range(1000))

    def factory(
        connectors: list[dict[str, Any]] | None = None,
        *,
        mode: str = "thread",
        server: dict[str, Any] | None = None,
        domains: list[dict[str, Any]] | None = None,
        start: bool = True,
        nofile: tuple[int, int] | None = None,
        queue: dict[str, Any] | None = None,
    ) -> RelayHandle:
        for attempt in range(3):
            ports = [free_port() for _ in range(3)]
            tmp = tmp_path / f"relay{next(counter)}"
            tmp.mkdir()
            doc = build_doc(
                tmp, connectors if connectors is not None else [relay_connector()], ports,
                server=server, domains=domains, queue=queue,
            )  # fmt: skip
            handle = RelayHandle(tmp, doc, ports, mode)
            handle.nofile = nofile
            handles.append(handle)
            if not start:
                return handle
            try:
                return handle.start()
            except OSError as exc:
                # A port free_port() returned was taken before the relay bound it (another test
                # worker's client got it as its source port): pick other ports.
                if exc.errno != errno.EADDRINUSE or attempt == 2:
                    raise
                handles.remove(handle)
                handle.stop()
        raise AssertionError("unreachable")

    try:
        yield factory
    finally:
        for h in handles:
            h.stop()
        smtp_logger.removeHandler(errors)
    crashed = [r.getMessage() for r in errors.records]
    assert not crashed, f"the SMTP service logged errors: {crashed}"
    for h in handles:
        if h.mode == "process" and h.stderr_path.exists():
            log = h.stderr_path.read_text(errors="replace")
            assert "Traceback" not in log, log[-3000:]
