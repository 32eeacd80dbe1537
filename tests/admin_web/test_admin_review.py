"""Adversarial checks of the admin listener over real sockets (httpx against an in-process relay
on 127.0.0.1): what a reload does to the API token, and what the guard lets through."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.admin_web.test_web import RelayThread


def _rewrite_admin(config_file: Path, admin_extra: str) -> None:
    """The same config with ``admin_extra`` in place of the [admin] keys after ``listen``."""
    text = config_file.read_text(encoding="utf-8")
    head, _, tail = text.partition("[admin]\n")
    listen, _, rest = tail.partition("\n")
    rest = "\n".join(line for line in rest.split("\n") if not line.startswith("api_token_file"))
    config_file.write_text(f"{head}[admin]\n{listen}\n{admin_extra}\n{rest}", encoding="utf-8")


def test_a_reload_applies_a_new_api_token(tmp_path: Path) -> None:
    """Setting admin.api_token_file (the dashboard's "admin-exposed-without-token" fix) and
    reloading left the API and the pages open without a token, while the finding, computed from
    the new config, went away; a changed token (a leaked one rotated) kept the old one valid."""
    config_file = tmp_path / "relaygate.toml"
    node = RelayThread(tmp_path / "data", config_file=config_file)
    token_file = tmp_path / "token"
    try:
        assert node.api("GET", "/api/queue").status_code == 200
        token_file.write_text("first-token-after-reload\n", encoding="utf-8")
        _rewrite_admin(config_file, f'api_token_file = "{token_file}"')
        node.call(node.relay.reload())
        assert node.relay.config.admin.api_token_file == token_file
        assert node.api("GET", "/api/queue").status_code == 401
        assert node.api("GET", "/").status_code == 303  # to /login
        first = {"Authorization": "Bearer first-token-after-reload"}
        assert node.api("GET", "/api/queue", headers=first).status_code == 200
        # the token rotated in place: the old one stops working at the reload
        token_file.write_text("second-token-after-reload\n", encoding="utf-8")
        node.call(node.relay.reload())
        assert node.api("GET", "/api/queue", headers=first).status_code == 401
        second = {"Authorization": "Bearer second-token-after-reload"}
        assert node.api("GET", "/api/queue", headers=second).status_code == 200
    finally:
        node.stop()


def test_a_reload_with_an_empty_token_file_keeps_the_running_token(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A token file emptied by mistake must not open the API at a reload either (as at start)."""
    config_file = tmp_path / "relaygate.toml"
    token_file = tmp_path / "token"
    token_file.write_text("kept-token\n", encoding="utf-8")
    node = RelayThread(
        tmp_path / "data",
        config_file=config_file,
        admin_extra=f'api_token_file = "{token_file}"',
    )
    try:
        token_file.write_text("", encoding="utf-8")
        with caplog.at_level(logging.ERROR, logger="relaygate"):
            node.call(node.relay.reload())
        assert "api_token_file" in caplog.text
        assert httpx.get(node.url + "/api/queue", timeout=10).status_code == 401
        kept = {"Authorization": "Bearer kept-token"}
        assert node.api("GET", "/api/queue", headers=kept).status_code == 200
    finally:
        node.stop()


def test_a_reload_that_moves_the_admin_listener_says_it_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """admin.listen is bound at start only: a reload that changed it was silent, and the running
    config then named an address the listener was not on (the audit's finding followed it)."""
    config_file = tmp_path / "relaygate.toml"
    node = RelayThread(tmp_path / "data", config_file=config_file)
    try:
        listen = node.relay.config.admin.listen
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(text.replace(f'listen = "{listen}"', 'listen = "0.0.0.0:1"'))
        with caplog.at_level(logging.WARNING, logger="relaygate"):
            node.call(node.relay.reload())
        assert "admin.listen changed: takes effect when relaygate serve restarts" in caplog.text
        assert node.relay.config.admin.listen == listen
        page = node.api("GET", "/")
        assert page.status_code == 200 and "admin-exposed-without-token" not in page.text
    finally:
        node.stop()


def test_idle_and_surplus_admin_connections_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The admin listener runs in the SMTP listener's process (worker 0) and kept a connection
    that never completed a request open for ever (uvicorn times out only between requests): idle
    or half-sent connections, as many as anyone who reaches the port opens, used up the file
    descriptors the relay needs for SMTP, deliveries and the queue. Now a request must arrive
    within REQUEST_TIMEOUT, and past MAX_CONNECTIONS a new connection takes the place of the
    one that has waited longest (test_one_client_holding_every_connection_locks_out_no_one)."""
    import socket
    import time

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "REQUEST_TIMEOUT", 1.0)
    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 20)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint
    held: list[socket.socket] = []
    try:
        idle = socket.create_connection((host, port), timeout=10)
        half = socket.create_connection((host, port), timeout=10)
        half.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the head never ends
        body = socket.create_connection((host, port), timeout=10)
        body.sendall(
            b"POST /login HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nto"
        )  # the body never ends
        held += [idle, half, body]
        started = time.monotonic()
        for s in (idle, half, body):
            s.settimeout(10)
            while s.recv(4096):  # closed by the server (a 4xx first is fine)
                pass
        assert time.monotonic() - started < 8
        assert node.api("GET", "/api/queue").status_code == 200
    finally:
        for s in held:
            s.close()
        node.stop()


def test_one_client_holding_every_connection_locks_out_no_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_CONNECTIONS a new connection was closed at once: one client that kept that many
    open (a request trickled in under REQUEST_TIMEOUT, again and again) shut the admins, the
    CLI and the load balancer's /healthz probe out. Now the connection that has waited longest
    for a request makes room for the new one."""
    import socket

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 20)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    held: list[socket.socket] = []
    try:
        for _ in range(20):  # one after the other: the first has waited longest
            s = socket.create_connection((host, port), timeout=10)
            held.append(s)
            s.sendall(request)
            assert _response(s).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /healthz HTTP/1.1\r\n")  # the next request, never finished
        probe = httpx.get(node.url + "/healthz", timeout=10)
        assert probe.status_code == 200 and probe.json() == {"status": "ok"}
        assert held[0].recv(4096) == b""  # the longest waiting made room
        held[1].sendall(b"Host: 127.0.0.1\r\n\r\n")  # the others are still served
        assert _response(held[1]).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()
        node.stop()


def test_upgrade_requests_are_served_as_http_without_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request with an Upgrade header (WebSocket, curl --http2's h2c) wrote two warnings to
    the service log, "Unsupported upgrade request." and advice to install a WebSocket library:
    a log anyone who reaches the listener could fill, with advice that would have let WebSocket
    requests past the guard. They are answered as HTTP/1.1, and nothing is logged."""
    token = "upgr4de-token"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    (tmp_path / "token").chmod(0o600)
    node = RelayThread(
        tmp_path / "data", token=token, admin_extra=f'api_token_file = "{tmp_path / "token"}"'
    )
    websocket = {
        "Connection": "Upgrade",
        "Upgrade": "websocket",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
    }
    h2c = {"Connection": "Upgrade, HTTP2-Settings", "Upgrade": "h2c", "HTTP2-Settings": "AAMAAABk"}
    try:
        with caplog.at_level(logging.DEBUG):
            for headers in (websocket, h2c):
                health = httpx.get(node.url + "/healthz", headers=headers, timeout=10)
                assert health.status_code == 200 and health.json() == {"status": "ok"}
                guarded = httpx.get(node.url + "/api/queue", headers=headers, timeout=10)
                assert guarded.status_code == 401, guarded.text
        said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert not [m for m in said if "upgrade" in m.lower() or "websocket" in m.lower()], said
    finally:
        node.stop()


def test_malformed_requests_are_logged_once_a_minute_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn wrote "Invalid HTTP request received." to the service log for each malformed
    request: whoever reached the port (a scanner, TLS spoken to it) wrote a warning per
    request. One line a minute now, then how many were left out; each still gets its 400."""
    import socket
    import time

    from relaygate.admin import server as admin_server

    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint

    def malformed() -> None:
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(b"\x16\x03\x01\x02\x00 not HTTP\r\n\r\n")
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400"), answer

    try:
        with caplog.at_level(logging.WARNING):
            for _ in range(30):
                malformed()
        flood = [r for r in caplog.records if r.getMessage() == "Invalid HTTP request received."]
        assert not flood, f"{len(flood)} lines for 30 requests"
        lines = [r.getMessage() for r in caplog.records if "invalid HTTP request" in r.getMessage()]
        assert lines == [
            "admin listener: invalid HTTP request (answered 400); more in the next 60 s are "
            "counted, not logged"
        ], lines
        monkeypatch.setattr(admin_server, "INVALID_REQUEST_LOG_INTERVAL", 0.2)
        time.sleep(0.3)  # the interval passes: time itself is what is waited for
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            malformed()
        lines = [r.getMessage() for r in caplog.records if "invalid HTTP request" in r.getMessage()]
        assert lines == [
            "admin listener: invalid HTTP request (answered 400); 29 more since the last such line"
        ], lines
    finally:
        node.stop()


def _response(s: Any) -> bytes:
    """One whole response of /healthz (its head and its JSON body) read from socket ``s``."""
    data = b""
    while not data.endswith(b"}"):
        chunk = s.recv(4096)
        assert chunk, data
        data += chunk
    return data


def test_a_token_file_every_local_user_can_read_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The log privacy key is checked for its mode; the API token was not, though on the default
    loopback listener every local user reaches the API and the token is all that guards it."""
    token_file = tmp_path / "token"
    token_file.write_text("world-readable-token\n", encoding="utf-8")
    token_file.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        node = RelayThread(tmp_path / "data", admin_extra=f'api_token_file = "{token_file}"')
        node.stop()
    assert f"admin.api_token_file '{token_file}' has mode 0644" in caplog.text
    assert "world-readable-token" not in caplog.text
    caplog.clear()
    token_file.chmod(0o640)  # the admins' group may read it (relaygate queue does)
    with caplog.at_level(logging.WARNING, logger="relaygate"):
        node = RelayThread(tmp_path / "data2", admin_extra=f'api_token_file = "{token_file}"')
        node.stop()
    assert "api_token_file" not in caplog.text


def test_a_long_queue_listing_does_not_stall_the_smtp_loop(tmp_path: Path) -> None:
    """GET /api/queue?limit=100000 without a filter built every message's view in one go on the
    loop that serves SMTP (worker 0), then rendered the JSON there too: with 20,000 messages the
    loop stood still for about 2 s (10 s at the 100,000 the API allows). Get-Queue already hands
    the loop back between chunks; the listing now does as well."""
    import asyncio
    import time

    from relaygate.queue.model import Envelope

    node = RelayThread(tmp_path / "data")
    count = 20_000
    try:
        store = node.relay.store

        async def fill() -> None:
            for start in range(0, count, 250):
                await asyncio.gather(
                    *(
                        store.submit(Envelope("app@corp.test", [f"u{i}@example.org"]), b"\r\nx\r\n")
                        for i in range(start, start + 250)
                    )
                )

        node.call(fill(), timeout=120)
        gaps: list[float] = []

        async def tick(stop: asyncio.Event) -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        async def start_ticking() -> tuple[asyncio.Event, asyncio.Task[None]]:
            stop = asyncio.Event()
            return stop, asyncio.ensure_future(tick(stop))

        stop, task = node.call(start_ticking())
        try:
            for params in ({"limit": "100000"}, {"limit": "100000", "status": "Ready"}):
                gaps.clear()
                r = httpx.get(node.url + "/api/queue", params=params, timeout=120)
                assert r.status_code == 200 and len(r.json()["messages"]) > count // 2
                assert max(gaps) < 1.0, (params, max(gaps))
        finally:
            node.loop.call_soon_threadsafe(stop.set)
            node.call(asyncio.wait_for(task, 5))
    finally:
        node.stop()


async def test_a_reload_that_enables_the_admin_listener_says_it_needs_a_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The same for admin.enabled switched on: nothing listens until a restart, and the running
    config must not claim a listener (nor the audit report one) before then."""
    from tests.queue_manager.helpers import start_relay

    config_file = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data", {"*": 9}, config_file=config_file, admin_extra="enabled = false"
    )
    try:
        assert relay.admin is None
        text = config_file.read_text(encoding="utf-8")
        config_file.write_text(text.replace("\nenabled = false\n", "\nenabled = true\n"))
        with caplog.at_level(logging.WARNING, logger="relaygate"):
            await relay.reload()
        assert "admin.enabled changed: takes effect when relaygate serve restarts" in caplog.text
        assert relay.config.admin.enabled is False and relay.admin is None
    finally:
        await relay.stop()


def test_a_reload_warns_of_a_token_file_every_local_user_can_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reload reads the token file again (a token rotated with `cp` is 0644): it warns of a
    world-readable file as the start does, and applies the token all the same."""
    config_file = tmp_path / "relaygate.toml"
    token_file = tmp_path / "token"
    token_file.write_text("private-token\n", encoding="utf-8")
    token_file.chmod(0o600)
    node = RelayThread(
        tmp_path / "data",
        config_file=config_file,
        admin_extra=f'api_token_file = "{token_file}"',
    )
    try:
        token_file.write_text("rotated-readable-token\n", encoding="utf-8")
        token_file.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="relaygate"):
            node.call(node.relay.reload())
        assert f"admin.api_token_file '{token_file}' has mode 0644" in caplog.text
        assert "rotated-readable-token" not in caplog.text
        rotated = {"Authorization": "Bearer rotated-readable-token"}
        assert node.api("GET", "/api/queue", headers=rotated).status_code == 200
    finally:
        node.stop()


async def _admin_clients(node: RelayThread) -> list[tuple[str, int]]:
    """The peer addresses of the admin listener's open (not closing) connections, read in the
    relay's loop."""
    assert node.relay.admin is not None and node.relay.admin._server is not None
    return [
        p.client
        for p in node.relay.admin._server.server_state.connections
        if getattr(p, "client", None) and not p.transport.is_closing()
    ]


def _wait_accepted(node: RelayThread, s: Any) -> None:
    """Until the listener has taken socket ``s`` (its connection_made has run)."""
    import time

    mine = s.getsockname()[:2]
    deadline = time.monotonic() + 10
    while tuple(mine) not in {tuple(c) for c in node.call(_admin_clients(node))}:
        assert time.monotonic() < deadline, f"{mine} never accepted"
        time.sleep(0.01)


def test_a_flood_from_one_address_does_not_evict_another_clients_request(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past MAX_CONNECTIONS the connection that had waited longest made room, whoever held it:
    a client opening connections fast (127.0.0.2 here) evicted an admin's connection whose
    request had not been read yet (the listener reads it a turn of the loop after accepting it),
    so under a flood the admins, `relaygate queue` and the /healthz probe still failed. Now the
    room is made among the connections of the client holding the most."""
    import socket

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 20)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint
    held: list[socket.socket] = []

    def attacker() -> socket.socket:
        s = socket.create_connection((host, port), timeout=10, source_address=("127.0.0.2", 0))
        held.append(s)
        _wait_accepted(node, s)
        return s

    try:
        for _ in range(20):
            attacker()
        admin = socket.create_connection((host, port), timeout=10)
        held.append(admin)
        _wait_accepted(node, admin)  # accepted; its request comes now, after the flood's next 20
        for _ in range(20):
            attacker()
        admin.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _response(admin).startswith(b"HTTP/1.1 200")
        # the flood made room among its own connections: its first ones are gone
        assert held[0].recv(4096) == b""
    finally:
        for s in held:
            s.close()
        node.stop()


#: What a client that reads nothing asks for, again and again: /metrics is some 4 KB.
_METRICS = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _write_states(node: RelayThread) -> dict[tuple[str, int], tuple[bool, int, bool]]:
    """Each admin connection's peer → (writing paused, bytes waiting in the listener's buffer,
    closing), read in the relay's loop."""
    assert node.relay.admin is not None and node.relay.admin._server is not None
    return {
        tuple(p.client): (p.flow.write_paused, p.transport.get_write_buffer_size(),
                          p.transport.is_closing())
        for p in node.relay.admin._server.server_state.connections
        if getattr(p, "client", None)
    }  # fmt: skip


def _small_window_socket(source: str = "127.0.0.1") -> Any:
    """A TCP socket whose receive buffer is fixed small before it connects: the kernel here lets
    buffers grow to 32 MB, and a client that reads nothing must fill them to block the
    listener's writes."""
    import socket

    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.bind((source, 0))
    return s


def _state_of(node: RelayThread, s: Any) -> tuple[bool, int, bool] | None:
    return node.call(_write_states(node)).get(tuple(s.getsockname()[:2]))


def _block_writes(node: RelayThread, s: Any) -> None:
    """Pipelines /metrics requests on ``s`` (never reading an answer) until the listener's
    writes to it are paused: its buffer past asyncio's high-water mark."""
    import time

    s.setblocking(False)
    stream = _METRICS * 2000
    sent = 0
    deadline = time.monotonic() + 15
    while (state := _state_of(node, s)) is None or not state[0]:
        if time.monotonic() >= deadline:
            # what the listener held and what the client saw: this failed once in a suite run
            # with the connection never in the listener's list (not reproduced since)
            import socket

            held = node.call(_write_states(node))
            error = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            try:
                peer = s.getpeername()
            except OSError as exc:
                peer = exc
            raise AssertionError(
                f"writes to {s.getsockname()} (peer {peer}) never blocked: {state}; "
                f"sent {sent} bytes, SO_ERROR {error}, the listener holds {held}"
            )
        try:
            sent += s.send(stream[sent:])
        except BlockingIOError:
            pass
        time.sleep(0.02)


def _wait_dropped(node: RelayThread, s: Any, within: float) -> float:
    """Seconds until the listener no longer holds ``s``'s connection (asserted within ``within``)."""
    import time

    started = time.monotonic()
    while _state_of(node, s) is not None:
        assert time.monotonic() - started < within, (
            f"{s.getsockname()} still held after {within} s: {_state_of(node, s)}"
        )
        time.sleep(0.05)
    return time.monotonic() - started


def test_a_connection_whose_answers_are_never_read_is_closed_after_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that pipelines requests and reads none of the answers held its connection for
    ever: once the listener's buffer passed its high-water mark the next answer waited for a
    drain that never came, and neither REQUEST_TIMEOUT (armed only while a request is awaited)
    nor uvicorn's keep-alive timeout applied. Now an answer that cannot be written further for
    WRITE_TIMEOUT closes the connection (aborted: a close would wait for the buffer to drain)."""
    import contextlib

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "WRITE_TIMEOUT", 1.0)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint
    stuck = _small_window_socket()
    try:
        stuck.connect((host, port))
        _block_writes(node, stuck)
        took = _wait_dropped(node, stuck, within=10)
        assert took < 5, took
        stuck.setblocking(True)
        stuck.settimeout(10)  # what was sent before the abort, then the end (or a reset)
        with contextlib.suppress(ConnectionResetError):
            while stuck.recv(65536):
                pass
        assert node.api("GET", "/api/queue").status_code == 200
    finally:
        stuck.close()
        node.stop()


def _shrink_send_buffer(node: RelayThread, s: Any) -> None:
    """Fixes the listener's send buffer for ``s``'s connection small (4 KB), once it is
    accepted: the kernel here lets it grow to 32 MB, and what it holds the listener no longer
    does (an answer aborted there is still sent from the kernel to the client)."""
    import socket

    async def shrink(peer: tuple[str, int]) -> None:
        assert node.relay.admin is not None and node.relay.admin._server is not None
        for p in node.relay.admin._server.server_state.connections:
            if tuple(p.client) == peer:
                sock = p.transport.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)

    _wait_accepted(node, s)
    node.call(shrink(tuple(s.getsockname()[:2])))


def _closing_with_unsent_answer(node: RelayThread) -> Any:
    """A connection (from 127.0.0.2) that asked for a close after some 40 KB of answers and
    reads none of them: the last answer's end is still in the listener's buffer, under its
    high-water mark, and the transport is closing. The listener's send buffer is fixed small here
    as the client's receive buffer is, so both kernel buffers hold less than those 40 KB."""

    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint

    stuck = _small_window_socket("127.0.0.2")
    stuck.connect((host, port))
    _shrink_send_buffer(node, stuck)
    closing = _METRICS.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    stuck.sendall(_METRICS * 8 + closing)
    state = _wait_state(node, stuck, lambda state: state[2])  # the close answered
    assert state is not None and state[2] and state[1] > 0 and not state[0], state
    return stuck


def test_a_closing_connection_with_an_answer_never_read_is_closed_after_write_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last answer before a close (``Connection: close``) still in the listener's buffer:
    asyncio closes the socket only once the buffer has drained, so a client reading nothing
    kept the file descriptor for ever. Now it is aborted after WRITE_TIMEOUT."""
    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "WRITE_TIMEOUT", 1.0)
    node = RelayThread(tmp_path / "data")
    stuck = None
    try:
        stuck = _closing_with_unsent_answer(node)
        took = _wait_dropped(node, stuck, within=10)
        assert took < 5, took
    finally:
        if stuck is not None:
            stuck.close()
        node.stop()


def test_a_closing_connection_with_an_unsent_answer_counts_towards_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A closing connection was left out of MAX_CONNECTIONS, though its socket stays open while
    an answer to it is unsent: a client reading nothing could hold any number of file
    descriptors past the cap. It counts now, and makes room for a new client at the cap."""
    import socket

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 1)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    stuck = None
    try:
        stuck = _closing_with_unsent_answer(node)
        with socket.create_connection(node.relay.admin.endpoint, timeout=10) as admin:
            _wait_dropped(node, stuck, within=5)  # made room (WRITE_TIMEOUT is 30 s)
            admin.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _response(admin).startswith(b"HTTP/1.1 200")
    finally:
        if stuck is not None:
            stuck.close()
        node.stop()


def _wait_state(
    node: RelayThread, s: Any, condition: Callable[[tuple[bool, int, bool]], bool]
) -> tuple[bool, int, bool] | None:
    """``s``'s connection state (`_write_states`) once ``condition`` holds for it (10 s at most:
    then the last state seen, for the caller's assertion)."""
    import time

    deadline = time.monotonic() + 10
    while (state := _state_of(node, s)) is None or not condition(state):
        if time.monotonic() > deadline:
            break
        time.sleep(0.01)
    return state


def test_write_blocked_connections_make_room_at_the_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One client holding MAX_CONNECTIONS connections, each with pipelined requests whose answers
    it never reads, locked everyone else out: none of them waited for a request, so none could
    make room, and each new connection was closed at once. A write-blocked connection now makes
    room as an idle one does (the heaviest client's first)."""
    import socket

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "MAX_CONNECTIONS", 6)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    host, port = node.relay.admin.endpoint
    held: list[Any] = []
    try:
        for _ in range(6):
            s = _small_window_socket("127.0.0.2")
            held.append(s)
            s.connect((host, port))
            _block_writes(node, s)
        with socket.create_connection((host, port), timeout=10) as admin:
            admin.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert _response(admin).startswith(b"HTTP/1.1 200")
        assert _state_of(node, held[0]) is None  # the first blocked made room
        assert node.api("GET", "/api/queue").status_code == 200
    finally:
        for s in held:
            s.close()
        node.stop()


def test_a_write_blocked_connection_does_not_hold_up_the_relays_stop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop (or restart) of the relay waited uvicorn's whole 5 s grace for an answer a client
    was not reading, then cancelled it and wrote "Exception in ASGI application" with a
    traceback to the service log. A write-blocked connection is aborted at the stop."""
    import time

    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    stuck = _small_window_socket()
    try:
        stuck.connect(node.relay.admin.endpoint)
        _block_writes(node, stuck)
        started = time.monotonic()
        with caplog.at_level(logging.ERROR):
            node.call(node.relay.stop())
        assert time.monotonic() - started < 3
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert not errors, errors
    finally:
        stuck.close()
        node.loop.call_soon_threadsafe(node.loop.stop)
        node.thread.join(10)
        node.loop.close()


def test_a_slow_reader_that_keeps_reading_is_not_cut_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE_TIMEOUT bounds a stall, not an answer: a client that reads slowly but steadily
    (a long listing over a slow link) gets every answer even when the whole takes many times
    WRITE_TIMEOUT."""
    import time

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "WRITE_TIMEOUT", 0.5)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    reader = _small_window_socket()
    try:
        reader.connect(node.relay.admin.endpoint)
        count = 60  # some 270 KB of answers, read 8 KB at a time every 20 ms: over 0.5 s
        reader.sendall(_METRICS * count)
        reader.settimeout(10)
        received = b""
        started = time.monotonic()
        while received.count(b"HTTP/1.1 200") < count or not received.endswith(b"\n"):
            chunk = reader.recv(8192)
            assert chunk, f"closed after {received.count(b'HTTP/1.1 200')} answers"
            received += chunk
            time.sleep(0.02)  # the pace of a slow link: what is waited for is time itself
        assert time.monotonic() - started > 0.5
    finally:
        reader.close()
        node.stop()


def _read_slowly(node: RelayThread, reader: Any, seconds: float) -> tuple[int, float | None]:
    """Reads ``reader`` 8 KB at a time every 20 ms, for ``seconds`` at most: the answers
    received whole, and when (seconds from the start) the listener no longer held the
    connection (None: it still did at the end)."""
    import time

    reader.settimeout(10)
    received = b""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if _state_of(node, reader) is None:
            return received.count(b"HTTP/1.1 200"), time.monotonic() - started
        received += reader.recv(8192)
        time.sleep(0.02)  # the pace of the reader: what is waited for is time itself
    return received.count(b"HTTP/1.1 200"), None


def test_a_trickle_reader_does_not_keep_its_connection_past_the_answer_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """WRITE_TIMEOUT is per stall: a client reading just enough to bring the listener's buffer
    under its low-water mark within WRITE_TIMEOUT, again and again (some 2 KB a second at the
    real 30 s), kept its connection, and its pipelined answers' task, for as long as it liked.
    Answers now have ANSWER_TIMEOUT, plus a second for each ANSWER_MIN_RATE bytes the client
    takes: a client slower than that loses the connection. Here the reader takes at most some
    400 KB/s (8 KB every 20 ms), enough for WRITE_TIMEOUT (0.5 s), and the minimum is 10 MB/s:
    its connection must end soon after ANSWER_TIMEOUT (1 s)."""
    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "WRITE_TIMEOUT", 0.5)
    monkeypatch.setattr(slow_clients, "ANSWER_TIMEOUT", 1.0)
    monkeypatch.setattr(slow_clients, "ANSWER_MIN_RATE", 10 * 1024 * 1024)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    reader = _small_window_socket()
    try:
        reader.connect(node.relay.admin.endpoint)
        _shrink_send_buffer(node, reader)
        reader.sendall(_METRICS * 2000)  # some 9 MB of answers: 20 s and more at that pace
        answers, dropped = _read_slowly(node, reader, seconds=6)
        assert dropped is not None, f"still held after 6 s and {answers} answers"
        assert 1.0 <= dropped < 4, (dropped, answers)  # not at a stall: at the deadline
        assert node.api("GET", "/api/queue").status_code == 200
    finally:
        reader.close()
        node.stop()


def test_a_reader_keeping_the_minimum_rate_gets_answers_longer_than_the_answer_deadline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer deadline grows with what the client takes: a long listing over a slow link
    (slower than the listener can write, above ANSWER_MIN_RATE) is read to its end even when it
    takes many times ANSWER_TIMEOUT."""
    import time

    from relaygate.admin import slow_clients

    monkeypatch.setattr(slow_clients, "WRITE_TIMEOUT", 0.5)
    monkeypatch.setattr(slow_clients, "ANSWER_TIMEOUT", 0.3)
    monkeypatch.setattr(slow_clients, "ANSWER_MIN_RATE", 16 * 1024)
    node = RelayThread(tmp_path / "data")
    assert node.relay.admin is not None and node.relay.admin.endpoint is not None
    reader = _small_window_socket()
    try:
        reader.connect(node.relay.admin.endpoint)
        _shrink_send_buffer(node, reader)
        count = 200  # some 900 KB of answers, 8 KB every 20 ms at most: 2 s and more
        reader.sendall(_METRICS * count)
        reader.settimeout(10)
        received = b""
        started = time.monotonic()
        while received.count(b"HTTP/1.1 200") < count or not received.endswith(b"\n"):
            chunk = reader.recv(8192)
            assert chunk, f"closed after {received.count(b'HTTP/1.1 200')} answers"
            received += chunk
            time.sleep(0.02)
        assert time.monotonic() - started > 1.0  # over three times ANSWER_TIMEOUT
    finally:
        reader.close()
        node.stop()
