"""Composition root: Config → store, logs, SMTP listeners, queue manager, admin centre; signals; shutdown.

Start order: store → logs → queue manager → listeners → admin. Shutdown runs in reverse: listeners stop
accepting first, sessions get a grace period, then deliveries, then the store closes.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

from relaygate.admin.server import AdminServer
from relaygate.config import Config, ConfigError, load_config
from relaygate.logs.tracking import MESSAGE_TRACKING_DIR, TrackingLog
from relaygate.queue.manager import QueueManager
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.queue.store import Store
from relaygate.smtp.server import ServerContext, SmtpServer, protocol_log_for

__all__ = ["Relay", "open_store", "run"]

logger = logging.getLogger("relaygate")


def open_store(config: Config) -> Store:
    if config.queue.store == "postgresql":
        from relaygate.queue.postgres_store import PostgresStore

        return PostgresStore(config.queue.database_url)
    return SqliteStore(Path(config.server.data_dir) / "queue" / "queue.db")


class Relay:
    """One running RelayGate node."""

    def __init__(self, config: Config, *, config_path: Path | None = None) -> None:
        self.config = config
        self.config_path = config_path
        self.store = open_store(config)
        self.tracking: TrackingLog | None = None
        self.protocol_log: Any = None
        self.ctx: ServerContext | None = None
        self.server: SmtpServer | None = None
        self.manager: Any = None
        self.admin: Any = None
        self._stopped = asyncio.Event()

    async def start(self) -> None:
        cfg = self.config
        Path(cfg.server.data_dir).mkdir(parents=True, exist_ok=True)
        await self.store.open()
        self.protocol_log = protocol_log_for(cfg)
        s = cfg.server
        if s.message_tracking_log_enabled:
            self.tracking = TrackingLog(
                Path(s.data_dir) / MESSAGE_TRACKING_DIR,
                server_name=s.name,
                max_file_size=s.message_tracking_log_max_file_size,
                max_directory_size=s.message_tracking_log_max_directory_size,
                max_age=s.message_tracking_log_max_age,
            )
        self.manager = QueueManager(cfg, self.store, tracking=self.tracking)
        wake = self.manager.wake
        self.ctx = ServerContext(
            cfg, self.store, protocol_log=self.protocol_log, tracking=self.tracking, on_message=wake
        )
        self.server = SmtpServer(self.ctx)
        if self.manager is not None:
            self.manager.local_endpoints = set()
            await self.manager.start()
        await self.server.start()
        if self.manager is not None:
            self.manager.local_endpoints = set(self.server.endpoints)
        if cfg.admin.enabled:
            self.admin = AdminServer(self)
            await self.admin.start()
        logger.info(
            "RelayGate %s listening on %s (config %s)",
            s.name,
            ", ".join(f"{h}:{p}" for h, p in self.server.endpoints),
            cfg.source,
        )

    async def reload(self) -> None:
        """Re-read the config file; keep running on the old one if the new one is invalid."""
        if self.config_path is None:
            return
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            logger.error("reload refused, configuration invalid:\n%s", exc)
            return
        self.config = new
        assert self.ctx is not None and self.server is not None
        self.ctx.apply(new)
        await self.server.sync_listeners()
        if self.manager is not None:
            self.manager.apply(new)
        logger.info("configuration reloaded from %s", self.config_path)

    async def stop(self) -> None:
        if self.admin is not None:
            await self.admin.stop()
        if self.server is not None:
            await self.server.stop()
        if self.manager is not None:
            await self.manager.stop()
        await self.store.close()
        for log in (self.protocol_log, self.tracking):
            if log is not None:
                await asyncio.to_thread(log.close)
        self._stopped.set()

    async def watch_config(self, interval: float = 2.0) -> None:
        """Reload when the config file changes (edits by `relaygate connector ...` are atomic renames)."""
        if self.config_path is None:
            return
        last = _stamp(self.config_path)
        while True:
            await asyncio.sleep(interval)
            now = _stamp(self.config_path)
            if now != last:
                last = now
                await self.reload()


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_ino)


async def _main(config: Config, config_path: Path | None) -> None:
    relay = Relay(config, config_path=config_path)
    await relay.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(relay.reload()))
    watcher = asyncio.ensure_future(relay.watch_config())
    assert relay.server is not None
    endpoints = ", ".join(f"{h}:{p}" for h, p in relay.server.endpoints)
    admin = f"; admin http://{relay.config.admin.listen}" if relay.admin is not None else ""
    print(f"RelayGate ready: SMTP {endpoints}{admin}", flush=True)
    await stop.wait()
    watcher.cancel()
    await relay.stop()


def run(config_path: Path | None = None) -> None:
    config = load_config(config_path)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    from relaygate.config import default_config_path

    asyncio.run(_main(config, default_config_path(config_path)))
