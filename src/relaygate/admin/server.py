"""The admin listener: uvicorn serving `relaygate.admin.api` inside the relay's own event loop.

The socket is bound in `start()` (so "address in use" is an error at start-up, not a log line
later) and handed to uvicorn. uvicorn's own signal handling is switched off: SIGTERM/SIGINT/SIGHUP
belong to the relay (`relaygate.app`), which stops this server in its shutdown sequence.

This module holds `AdminServer` (start, the token and certificate it serves and their fallbacks
for a restarted worker, stop) and the filter on uvicorn's invalid-request lines. Beside it: the
connections' caps and deadlines against clients that are slow or hold many connections, and
the HTTPS handshakes (slow_clients.py), the TLS context and its files (tls.py). The names other
modules import from here are re-exported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import uvicorn
from starlette.routing import BaseRoute

from relaygate.admin.api import TokenFileError, create_app, read_token, token_mode_warning
from relaygate.admin.closed_note import clear_closed, note_closed
from relaygate.admin.slow_clients import _Handshakes, _Protocol
from relaygate.admin.tls import AdminStartError as AdminStartError
from relaygate.admin.tls import (
    _SwappableTls,
    _tls_stamp,
    _TlsStamp,
    load_admin_tls,
    tls_key_mode_warning,
)
from relaygate.admin.token_file import applied_token, applied_token_path
from relaygate.audit import admin_exposed
from relaygate.config.values import parse_binding

__all__ = ["AdminServer", "AdminStartError", "load_admin_tls"]

log = logging.getLogger("relaygate.admin")


#: uvicorn logs "Invalid HTTP request received." for every malformed request (a port scanner, TLS
#: spoken to the HTTP port): it is let through once in this many seconds, with a count.
INVALID_REQUEST_LOG_INTERVAL = 60.0
_INVALID_REQUEST = "Invalid HTTP request received."


class _InvalidRequestLines(logging.Filter):
    """A filter on uvicorn's logger: its line for a malformed request, once per
    INVALID_REQUEST_LOG_INTERVAL with how many were left out since. Anyone who reached the
    listener could write a warning to the service log with each malformed request."""

    def __init__(self) -> None:
        super().__init__()
        self._last: float | None = None
        self._left_out = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != _INVALID_REQUEST:
            return True
        now = time.monotonic()
        if self._last is not None and now - self._last < INVALID_REQUEST_LOG_INTERVAL:
            self._left_out += 1
            return False
        self._last = now
        if self._left_out:
            record.msg = "admin listener: invalid HTTP request (answered 400); %d more since the last such line"
            record.args = (self._left_out,)
        else:
            record.msg = "admin listener: invalid HTTP request (answered 400); more in the next %d s are counted, not logged"
            record.args = (int(INVALID_REQUEST_LOG_INTERVAL),)
        self._left_out = 0
        return True


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the relay owns the signals
        yield


class AdminServer:
    """Serves the admin application on ``config.admin.listen``.

    relay: an object with ``config``, ``store`` and ``manager`` (and ``server`` for /healthz).
    extra_routes: further Starlette routes (the web admin centre's pages).
    """

    def __init__(self, relay: Any, *, extra_routes: Sequence[BaseRoute] = ()) -> None:
        self.relay = relay
        self.extra_routes = list(extra_routes)
        self.app: Any = None
        self._server: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.endpoint: tuple[str, int] | None = None
        self._invalid_lines = _InvalidRequestLines()
        self._tls: _SwappableTls | None = None
        self._handshakes: _Handshakes | None = None
        #: The certificate files as last loaded, or as they were when they last failed to load
        #: (logged once: `watch_certificate` tries again when they change again).
        self._tls_stamp: _TlsStamp = ()
        #: A worker 0 started again whose admin pair cannot be loaded: the listener is not open
        #: yet, and `watch_certificate` opens it once the files load (`_open_when_loaded`).
        self._closed_for_tls = False

    @property
    def url(self) -> str | None:
        if self.endpoint is None:
            return None
        host, port = self.endpoint
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"

    @property
    def serves_tls(self) -> bool:
        """Whether the listener speaks HTTPS (fixed at start: turning TLS on or off waits for a
        restart, like admin.listen), or will once its pair loads (`_closed_for_tls`)."""
        return self._tls is not None or self._closed_for_tls

    @staticmethod
    def load_tls(config: Any, *, warn: bool = True) -> tuple[ssl.SSLContext | None, _TlsStamp]:
        """`load_admin_tls` of ``config`` with the files' stamp taken before they were read.
        Blocking: run it in a thread. A key file every local user may read is used, with a
        warning unless ``warn`` is false (a worker that only checks the files)."""
        stamp = _tls_stamp(config)
        context = load_admin_tls(config)
        if warn and (warning := tls_key_mode_warning(config)) is not None:
            log.warning("%s", warning)  # warned, not refused: the admins would lose HTTPS
        return context, stamp

    def apply_tls(self, loaded: tuple[ssl.SSLContext | None, _TlsStamp]) -> None:
        """A reload's certificate (from `load_tls`): served from the next connection on."""
        context, stamp = loaded
        if self._tls is not None and context is not None:
            self._tls.swap(context)
            self._tls_stamp = stamp

    async def watch_certificate(self) -> bool:
        """Load the certificate and key again when their files changed since they were last
        loaded (a renewal copied in place, as the SMTP listener's are taken on a reload): the
        next connections get the new certificate. Files that do not load are logged once,
        naming the keys, and the running certificate stays. True when a certificate was taken
        (its expiry date is then read again)."""
        if self._closed_for_tls:
            return await self._open_when_loaded()
        if self._tls is None:
            return False
        config = self.relay.config
        loaded = await self._load_if_changed(config)
        if isinstance(loaded, AdminStartError):
            log.error("admin listener keeps the certificate it serves: %s", loaded)
            return False
        if loaded is None:
            return False
        context, stamp = loaded
        if context is not None and self.relay.config is config:
            self.apply_tls((context, stamp))
            log.info("admin listener: certificate %s reloaded", config.admin.tls_certificate_file)
            return True
        return False

    async def _load_if_changed(
        self, config: Any
    ) -> tuple[ssl.SSLContext | None, _TlsStamp] | AdminStartError | None:
        """`load_tls` in a thread when the certificate files changed since they were last
        loaded or last failed (None: unchanged); a failure is returned, its files' stamp kept so
        that it is said again only when they change again."""
        if _tls_stamp(config) == self._tls_stamp:
            return None
        try:
            return await asyncio.to_thread(self.load_tls, config)
        except AdminStartError as exc:
            self._tls_stamp = _tls_stamp(config)
            return exc

    async def _open_when_loaded(self) -> bool:
        """The listener left closed at start (`_closed_for_tls`): opened once the certificate
        files changed and load; still failing, said again only when they change again."""
        config = self.relay.config
        loaded = await self._load_if_changed(config)
        if isinstance(loaded, AdminStartError):
            log.error("admin listener still closed: %s", loaded)
            await asyncio.to_thread(note_closed, config.server.data_dir, str(loaded))
            return False
        if loaded is None:
            return False
        context, stamp = loaded
        if context is None or self.relay.config is not config:
            return False  # a reload meanwhile: the next turn looks at its files
        self._closed_for_tls = False
        self._tls_stamp = stamp
        try:
            await self._listen(config, context)
        except AdminStartError as exc:  # its port taken meanwhile: tried again at a change
            self._closed_for_tls = True
            log.error("admin listener still closed: %s", exc)
            await asyncio.to_thread(note_closed, config.server.data_dir, str(exc))
            return False
        await asyncio.to_thread(clear_closed, config.server.data_dir)
        return True

    def _worker_0(self) -> bool:
        """Whether this is worker 0 of several (the admin centre's), not a single process."""
        return getattr(self.relay, "worker_index", None) == 0

    def _bind(self) -> socket.socket:
        binding = parse_binding(self.relay.config.admin.listen)
        family = socket.AF_INET6 if binding.version == 6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((binding.address, binding.port))
            sock.listen(128)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def read_token(config: Any, *, warn: bool = True) -> str | None:
        """The API token ``config`` names (None: no token file). AdminStartError when the file
        cannot be read or holds no token: at start the relay does not start, at a reload the
        reload is refused (the running token stays; a file emptied by mistake never opens the
        API). A file every local user may read or write is used, with a warning (at a reload
        too: a rotated token copied with `cp` is 0644) unless ``warn`` is false (a worker that
        only checks the file, so that it refuses the reload the admin centre's worker does)."""
        token_file = getattr(config.admin, "api_token_file", None)
        try:
            token = read_token(token_file)
        except OSError as exc:
            raise AdminStartError(
                f"cannot read admin.api_token_file {str(token_file)!r}: {exc.strerror or exc}"
            ) from exc
        except TokenFileError as exc:
            raise AdminStartError(str(exc)) from exc
        if warn and (warning := token_mode_warning(token_file)) is not None:
            log.warning("%s", warning)  # warned, not refused: the relay starts, the reload goes on
        return token

    def _start_token(self, config: Any) -> str | None:
        """`read_token` at start. Worker 0 of several, started again by its supervisor, whose
        token file cannot be used now keeps the token the node applied (kept by the worker 0
        before it: token_file.keep_applied_token), and says so once, naming the file: a reload
        refusing that file left the other workers on it, and this worker used to exit and be
        restarted, over and over. At the node's start there is no such token (the supervisor
        forgets it): a file that cannot be used stops the start, as with one process."""
        try:
            return self.read_token(config)
        except AdminStartError as exc:
            if getattr(self.relay, "worker_index", None) != 0:
                raise
            data_dir = config.server.data_dir
            kept = applied_token(data_dir, config.admin.api_token_file)
            if kept is None:
                raise
            log.warning(
                "%s; this worker started again with the API token the node runs (%s) until a "
                "reload reads a usable file",
                exc,
                applied_token_path(data_dir),
            )
            return kept

    def apply_token(self, token: str | None, *, metrics_require_token: bool) -> None:
        """A reload's token (from `read_token`) and ``admin.metrics_require_token``: the API, the
        pages, /api/health's whole report and /metrics (when it asks for the token) require it
        from the next request on (the guard reads both from the app's state per request); a
        changed token ends every session of the admin centre (their HMAC was made with the old
        one)."""
        if self.app is not None:
            self.app.state.token = token
            self.app.state.metrics_require_token = metrics_require_token

    async def start(self) -> None:
        if self._task is not None:
            return
        config = self.relay.config
        token = self._start_token(config)
        self.app = create_app(self.relay, token=token, extra_routes=self.extra_routes)
        context = await self._start_tls(config)
        if not self._closed_for_tls:
            await self._listen(config, context)
            if self._worker_0():  # a note a worker 0 before this one left (closed_note.py)
                await asyncio.to_thread(clear_closed, config.server.data_dir)

    async def _start_tls(self, config: Any) -> ssl.SSLContext | None:
        """`load_tls` at start. Worker 0 of several, started again by its supervisor, whose
        pair cannot be loaded now (a key emptied or replaced: a reload refused it, the running
        worker 0 kept the certificate it served) leaves the listener closed until the files
        load (`watch_certificate`), and says so once, naming the keys and files: it used to
        exit and be restarted, over and over, its SMTP listeners opened and closed at each try.
        No copy of the private key is kept for it. At the node's start a pair that cannot be
        loaded stops the start, as with one process."""
        stamp = _tls_stamp(config)
        try:
            context, self._tls_stamp = await asyncio.to_thread(self.load_tls, config)
        except AdminStartError as exc:
            if not self._worker_0() or not getattr(self.relay, "started_again", False):
                raise
            self._closed_for_tls, self._tls_stamp = True, stamp
            log.error(
                "%s; this worker started again: the admin listener stays closed until the files "
                "load (SMTP is served meanwhile)",
                exc,
            )
            await asyncio.to_thread(note_closed, config.server.data_dir, str(exc))
            return None
        return context

    async def _listen(self, config: Any, context: ssl.SSLContext | None) -> None:
        """Open the listener on admin.listen, HTTPS with `context` (None: plain HTTP)."""
        self._tls = _SwappableTls(context) if context is not None else None
        self._handshakes = _Handshakes(self._tls) if self._tls is not None else None
        try:
            sock = self._bind()
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise AdminStartError(
                f"cannot listen on admin.listen {config.admin.listen}: {reason}"
            ) from exc
        name = sock.getsockname()
        self.endpoint = (name[0], name[1])
        server = _Server(
            uvicorn.Config(
                self.app,
                # HTTPS: the handshake is done here (`_Handshakes`), not by uvicorn's ssl option
                # (uvicorn calls ``http`` as it would the class: a factory does as well)
                http=cast(Any, self._handshakes.factory) if self._handshakes else _Protocol,
                log_level="warning",
                # its lines go through the service log (relaygate.logs.service), in its format
                log_config=None,
                access_log=False,
                lifespan="off",
                proxy_headers=False,
                server_header=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._server = server
        logging.getLogger("uvicorn.error").addFilter(self._invalid_lines)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name="relaygate-admin")
        while not server.started:
            if self._task.done():
                failure = self._task.exception()
                self._task = None
                logging.getLogger("uvicorn.error").removeFilter(self._invalid_lines)
                sock.close()
                raise AdminStartError(
                    f"admin listener on {config.admin.listen} failed: {failure!r}"
                )
            await asyncio.sleep(0.01)
        log.info("admin centre and API listening on %s", self.url)
        if admin_exposed(config):
            log.warning(
                "the admin listener on %s is reachable from the network and admin.api_token_file "
                "is not set: anyone who reaches it can read and remove queued mail",
                config.admin.listen,
            )

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if self._closed_for_tls:  # the node stops: its listener is not "closed" any more
            self._closed_for_tls = False
            await asyncio.to_thread(clear_closed, self.relay.config.server.data_dir)
        if server is None or task is None:
            return
        logging.getLogger("uvicorn.error").removeFilter(self._invalid_lines)
        server.should_exit = True
        if self._handshakes is not None:
            self._handshakes.abort_all()
        try:
            await asyncio.wait_for(asyncio.shield(task), 8.0)
        except TimeoutError:
            server.force_exit = True
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        except Exception:
            log.exception("admin listener stopped with an error")
