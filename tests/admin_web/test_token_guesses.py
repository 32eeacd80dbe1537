"""The wrong-token limit (``TokenGuesses``: ten a minute, then 429) counts an IPv6 client by its
/64, not by its address: whoever has a /64 (any subscriber, any SLAAC host) has 2^64 addresses,
each of which had its own ten guesses a minute. An IPv4-mapped address (an IPv4 client of a
dual-stack listener) counts as the IPv4 address. The API's bearer token and the admin centre's
sign-in count together, by the same key.

Only ::1 can be bound here, so the addresses of one /64 are the ASGI app's client addresses (what
uvicorn puts in the scope). Every loopback address (127.0.0.0/8, ::1) is one client: the real
listener on [::1] is shown to count ::1 with 127.0.0.0/8."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import httpx
import pytest

from relaygate.admin.api import TOKEN_GUESS_LIMIT, create_app, guess_key
from relaygate.app import Relay
from relaygate.config import parse_text
from tests.queue_manager.helpers import free_port, make_config_text, start_relay

TOKEN = "gu3ss-me-if-you-can"
RIGHT = {"Authorization": f"Bearer {TOKEN}"}


def test_an_ipv6_client_is_counted_by_its_64_and_an_ipv4_one_by_its_address() -> None:
    assert guess_key("2001:db8:1:2::a") == "2001:db8:1:2::/64"
    assert guess_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    assert guess_key("2001:DB8:1:2:0:0:0:B") == "2001:db8:1:2::/64"  # any spelling
    assert guess_key("2001:db8:1:3::a") == "2001:db8:1:3::/64"
    assert guess_key("fe80::1%eth0") == "fe80::/64"  # a zone does not make another client
    assert guess_key("::1") == "loopback"  # with 127.0.0.0/8: any local user picks either
    assert guess_key("192.0.2.7") == "192.0.2.7"
    assert guess_key("192.0.2.8") == "192.0.2.8"
    assert guess_key("::ffff:192.0.2.7") == "192.0.2.7"  # as if it had come over IPv4
    assert guess_key("") == ""  # no client address (a Unix socket): its own key


def _client(app: object, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))  # type: ignore[arg-type]
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")


async def test_wrong_tokens_from_one_ipv6_64_are_counted_together(tmp_path: Path) -> None:
    """Before, each address of the /64 had ten guesses a minute of its own: the eleventh
    address still got 401 (a guess), and the right token from it got in."""
    relay = await start_relay(tmp_path / "data", {"*": free_port()})
    app = create_app(relay, token=TOKEN)
    origin = {"Origin": "http://127.0.0.1"}
    guessers = [_client(app, f"2001:db8:1:2::{n:x}") for n in range(1, TOKEN_GUESS_LIMIT + 1)]
    neighbour = _client(app, "2001:db8:1:2:8000::1")  # same /64, not one of the guessers
    login_neighbour = _client(app, "2001:db8:1:2:9000::1")
    other = _client(app, "2001:db8:1:3::1")  # the next /64
    mapped = _client(app, "::ffff:192.0.2.7")
    ipv4 = _client(app, "192.0.2.7")
    try:
        for n, guesser in enumerate(guessers):  # one guess each, half of them on the sign-in page
            if n % 2:
                wrong = await guesser.post("/login", data={"token": f"guess{n}"}, headers=origin)
            else:
                wrong = await guesser.get("/api/queue", headers={"Authorization": f"Bearer g{n}"})
            assert wrong.status_code == 401, (n, wrong.text)
        # blocked: a wrong token is a 429, not a 401, and then even the right one must wait
        # for the next check (LOCKED_CHECK_INTERVAL)
        blocked = await neighbour.get("/api/queue", headers={"Authorization": "Bearer n"})
        assert blocked.status_code == 429, blocked.text
        assert "IPv6 /64" in blocked.json()["error"]
        page = await login_neighbour.post("/login", data={"token": TOKEN}, headers=origin)
        assert page.status_code == 429 and "too many wrong tokens" in page.text
        assert (await other.get("/api/queue", headers=RIGHT)).status_code == 200

        # ::ffff:192.0.2.7 and 192.0.2.7 are one client, whichever way it comes
        for n in range(TOKEN_GUESS_LIMIT):
            wrong = await mapped.get("/api/queue", headers={"Authorization": f"Bearer m{n}"})
            assert wrong.status_code == 401
        assert (
            await ipv4.get("/api/queue", headers={"Authorization": "Bearer 4"})
        ).status_code == 429
    finally:
        for client in (*guessers, neighbour, login_neighbour, other, mapped, ipv4):
            await client.aclose()
        await relay.stop()


async def _relay_on_ipv6_loopback(tmp_path: Path) -> Relay:
    """A relay whose admin listener is [::1] (start_relay's is 127.0.0.1), with a token file."""
    token_file = tmp_path / "api-token"
    token_file.write_text(TOKEN + "\n", encoding="utf-8")
    admin_port = free_port()
    text = make_config_text(
        tmp_path / "data",
        smtp_port=free_port(),
        admin_port=admin_port,
        routes={"*": free_port()},
        admin_extra=f'api_token_file = "{token_file}"',
    )
    listen = f'listen = "127.0.0.1:{admin_port}"'
    assert listen in text
    relay = Relay(parse_text(text.replace(listen, f'listen = "[::1]:{admin_port}"'), "<test>"))
    await relay.start()
    return relay


async def test_the_ipv6_listener_counts_its_loopback_client_with_ipv4_loopback(
    tmp_path: Path,
) -> None:
    """Over a real connection to [::1]: nine wrong tokens from 127.0.0.5 (another loopback
    address: counted as an IPv4 listener would report it) and one from ::1 itself are ten, and
    ::1 is blocked: a wrong token is a 429, and the right one right after it too (checked once
    in LOCKED_CHECK_INTERVAL). Before, ::1 had guessed once and got in."""
    relay = await _relay_on_ipv6_loopback(tmp_path)
    try:
        assert relay.admin is not None and relay.admin.app is not None
        url = str(relay.admin.url)
        assert url.startswith("http://[::1]:"), url
        guesses = relay.admin.app.state.token_guesses
        for _ in range(TOKEN_GUESS_LIMIT - 1):
            guesses.wrong("127.0.0.5")
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            assert (await client.get("/api/queue", headers=RIGHT)).status_code == 200
            wrong = await client.get("/api/queue", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            blocked = await client.get("/api/queue", headers={"Authorization": "Bearer nope"})
            assert blocked.status_code == 429, blocked.text
            assert blocked.headers["retry-after"] == "6"
            assert (await client.get("/api/queue", headers=RIGHT)).status_code == 429
    finally:
        await relay.stop()


async def test_a_client_blocked_for_wrong_tokens_is_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Guessing the token left no trace in the service log: the client reaching the limit (and
    so blocked) is one warning naming it; its blocked attempts add none."""
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    relay = await start_relay(
        tmp_path / "data", {"*": free_port()}, admin_extra=f'api_token_file = "{token}"'
    )
    assert relay.admin is not None and relay.admin.url
    try:
        transport = httpx.AsyncHTTPTransport(local_address="127.0.0.9")
        async with httpx.AsyncClient(base_url=relay.admin.url, transport=transport) as guesser:
            with caplog.at_level(logging.WARNING, logger="relaygate.admin"):
                for n in range(TOKEN_GUESS_LIMIT + 5):
                    r = await guesser.get("/api/queue", headers={"Authorization": f"Bearer g{n}"})
                    assert r.status_code == (401 if n < TOKEN_GUESS_LIMIT else 429)
        lines = [r.getMessage() for r in caplog.records if "wrong API tokens" in r.getMessage()]
        assert lines == [
            f"admin listener: {TOKEN_GUESS_LIMIT} wrong API tokens in a minute from 127.0.0.9 "
            "(loopback): "
            "its tokens are checked once in 6 s (the others get 429) until fewer fall in a minute"
        ], lines
    finally:
        await relay.stop()


async def test_another_clients_wrong_tokens_leave_the_right_token_checked_at_a_low_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every local user reaches the loopback listener from 127.0.0.1: one who failed ten sign-ins
    locked the admin's own `relaygate queue` and browser out, the right token refused with 429
    for as long as the failures went on. Now a blocked client's token is still checked, once in
    LOCKED_CHECK_INTERVAL (guessing stays at the limit's rate, ten a minute): the right one gets
    in, a wrong one gets 429, and one sent before the next check is due gets 429 with the
    seconds until then, unchecked."""
    from relaygate.admin import guard, token_guesses

    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    relay = await start_relay(
        tmp_path / "data", {"*": free_port()}, admin_extra=f'api_token_file = "{token}"'
    )
    assert relay.admin is not None and relay.admin.url
    url = relay.admin.url
    origin = {"Origin": url}
    try:
        async with (
            httpx.AsyncClient(base_url=url, timeout=10) as attacker,
            httpx.AsyncClient(base_url=url, timeout=10) as admin,
        ):
            for n in range(TOKEN_GUESS_LIMIT):  # ten failed sign-ins from the same 127.0.0.1
                wrong = await attacker.post("/login", data={"token": f"g{n}"}, headers=origin)
                assert wrong.status_code == 401, (n, wrong.text)
            # requests offering no token take no check (a page's /metrics scrape, a curl
            # without -H): they are no guess, and would use up the admin's chance
            for path in ("/api/queue", "/api/queue/summary"):
                assert (await attacker.get(path)).status_code == 429
            signed_out = await attacker.post("/login", data={"token": ""}, headers=origin)
            assert signed_out.status_code == 429
            assert (await admin.get("/api/queue", headers=RIGHT)).status_code == 200
            blocked = await attacker.get("/api/queue", headers={"Authorization": "Bearer g"})
            assert blocked.status_code == 429, blocked.text  # not checked: one just was
            assert 1 <= int(blocked.headers["retry-after"]) <= 6, blocked.headers
            early = await admin.get("/api/queue", headers=RIGHT)
            assert early.status_code == 429  # the right one too, before the next check is due
            # where TokenGuesses reads it, and where the guard's 429 to a wrong token does
            monkeypatch.setattr(token_guesses, "LOCKED_CHECK_INTERVAL", 0.2)
            monkeypatch.setattr(guard, "LOCKED_CHECK_INTERVAL", 0.2)
            await asyncio.sleep(0.25)  # the interval passes: time itself is what is waited for
            wrong = await attacker.get("/api/queue", headers={"Authorization": "Bearer g2"})
            assert wrong.status_code == 429  # checked, wrong: still blocked
            await asyncio.sleep(0.25)
            signed_in = await admin.post("/login", data={"token": TOKEN}, headers=origin)
            assert signed_in.status_code == 303, signed_in.text
            assert (await admin.get("/")).status_code == 200  # the session cookie works
    finally:
        await relay.stop()


def test_every_loopback_address_is_one_client() -> None:
    """A local user may connect from any address of 127.0.0.0/8 (and ::1): counted each by its
    own address, they had sixteen million times ten guesses a minute."""
    assert guess_key("127.0.0.1") == guess_key("127.0.0.2") == guess_key("127.255.0.9")
    assert guess_key("::1") == guess_key("::ffff:127.0.0.3") == guess_key("127.0.0.1")
    assert guess_key("::2") == "::/64"  # not loopback: the unspecified /64 as before
    assert guess_key("128.0.0.1") == "128.0.0.1"


async def test_wrong_tokens_from_many_loopback_addresses_are_counted_together(
    tmp_path: Path,
) -> None:
    """Over real connections to 127.0.0.1: ten wrong tokens, each from another address of
    127.0.0.0/8, block the next loopback address too (its wrong token a 429, not a 401)."""
    token = tmp_path / "api-token"
    token.write_text(TOKEN + "\n", encoding="utf-8")
    relay = await start_relay(
        tmp_path / "data", {"*": free_port()}, admin_extra=f'api_token_file = "{token}"'
    )
    assert relay.admin is not None and relay.admin.url
    try:
        for n in range(TOKEN_GUESS_LIMIT + 1):
            transport = httpx.AsyncHTTPTransport(local_address=f"127.0.0.{20 + n}")
            async with httpx.AsyncClient(base_url=relay.admin.url, transport=transport) as c:
                r = await c.get("/api/queue", headers={"Authorization": f"Bearer g{n}"})
                assert r.status_code == (401 if n < TOKEN_GUESS_LIMIT else 429), (n, r.text)
    finally:
        await relay.stop()
