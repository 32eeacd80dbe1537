"""Queue operations on a running node: the admin API in-process, and `relaygate queue` as a
subprocess talking to it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import socket
import sqlite3
import sys
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest

from relaygate.admin.api import create_app
from relaygate.admin.server import AdminStartError
from relaygate.app import Relay
from relaygate.config import parse_text
from tests.queue_manager.helpers import (
    ScriptedHandler,
    free_port,
    make_config_text,
    parse_mail,
    send,
    smtp_port,
    start_relay,
    start_sink,
    wait_for,
)
from tests.support.proc_io import bytes_read

SENDER = "scanner@senders.test"
MESSAGE = (
    b"From: scanner@senders.test\r\nTo: bob@example.com\r\nSubject: Queue ops\r\n"
    b"Message-ID: <ops-1@senders.test>\r\n\r\nbody\r\n"
)


def admin_url(relay: Relay) -> str:
    assert relay.admin is not None and relay.admin.url
    return str(relay.admin.url)


async def cli(
    *args: str, config: Path | None = None, env_extra: dict[str, str] | None = None
) -> tuple[int, str, str]:
    argv = [sys.executable, "-m", "relaygate", "queue", *args]
    if config is not None:
        argv += ["--config", str(config)]
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("RELAYGATE_CONFIG", None)
    env.pop("RELAYGATE_ADMIN_URL", None)
    env.update(env_extra or {})
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_api_health_metrics_errors_and_guards(tmp_path: Path) -> None:
    sink = await start_sink(ScriptedHandler(lambda _a, _n: "451 4.2.0 later"))
    relay = await start_relay(
        tmp_path / "data", {"*": sink.port}, queue={"transient_failure_retry_interval": "00:01:00"}
    )
    try:
        await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:
            health = (await client.get("/api/health")).json()  # no token: the whole report
            assert health["status"] == "ok"
            assert health["queue_manager"]["running"] is True
            assert health["queue"]["messages"] == 1

            async def retried() -> Any:
                items = (await client.get("/api/queue", params={"status": "Retry"})).json()
                return items["messages"]

            (item,) = await wait_for(retried)
            assert item["Identity"].startswith("RELAYTEST\\")
            assert item["FromAddress"] == SENDER
            assert item["NextHopDomain"] == f"[127.0.0.1]:{sink.port}"
            assert "451 4.2.0 later" in item["LastError"]
            assert item["NextRetryTime"] and item["Size"] > len(MESSAGE)
            assert item["Recipients"][0]["Status"] == "Retry"
            assert item["Recipients"][0]["RetryCount"] == 1

            shown = (await client.get(f"/api/queue/{item['QueueId']}")).json()
            assert shown["Subject"] == "Queue ops"
            assert shown["MessageId"] == "<ops-1@senders.test>"

            # the queue's counts are shared by /healthz, /metrics and the dashboard, and reused
            # for up to 1 s (each request counted every message): the Retry shows within it
            async def metrics_text() -> str | None:
                text = (await client.get("/metrics")).text
                return text if 'relaygate_queue_messages{status="Retry"} 1.0' in text else None

            metrics = await wait_for(metrics_text, timeout=5.0)
            assert 'relaygate_delivery_recipients_total{outcome="deferred"} 1.0' in metrics

            missing = await client.get("/api/queue/RELAYTEST%5C0000000000000000")
            assert missing.status_code == 404 and "not found" in missing.json()["error"]
            assert (await client.get("/api/queue/nonsense")).status_code == 404
            bad = await client.get("/api/queue", params={"status": "Sleeping"})
            assert bad.status_code == 400
            # a browser page elsewhere cannot change the queue, nor can a rebound DNS name read it
            forged = await client.post(
                f"/api/queue/{item['QueueId']}/suspend", headers={"Origin": "http://evil.test"}
            )
            assert forged.status_code == 403
            rebound = await client.get("/api/queue", headers={"Host": "evil.test"})
            assert rebound.status_code == 403
            done = await client.post(f"/api/queue/{item['QueueId']}/suspend")
            assert done.json()["Status"] == "Suspended"

        # with admin.api_token_file the API needs the bearer token (health stays open)
        app = create_app(relay, token="s3cret")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            assert (await c.get("/api/queue")).status_code == 401
            wrong = await c.get("/api/queue", headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401
            ok = await c.get("/api/queue", headers={"Authorization": "Bearer s3cret"})
            assert ok.status_code == 200
            assert (await c.get("/api/health")).status_code == 200
    finally:
        await relay.stop()
        await sink.close()


async def test_metrics_show_open_sessions_and_file_descriptors(tmp_path: Path) -> None:
    sink = await start_sink(ScriptedHandler())
    relay = await start_relay(tmp_path / "data", {"*": sink.port})
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):  # three clients that got their banner and wait
            reader, writer = await asyncio.open_connection("127.0.0.1", smtp_port(relay))
            held.append(writer)
            assert (await reader.readline()).startswith(b"220 ")
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def metrics() -> str:
                return (await client.get("/metrics")).text

            text = await metrics()
            assert 'relaygate_smtp_sessions{connector="Test Relay"} 3.0' in text
            assert 'relaygate_smtp_session_limit{connector="Test Relay"} 5000.0' in text
            assert "relaygate_data_in_memory_bytes 0.0" in text
            limit = relay.ctx.data_memory.limit if relay.ctx is not None else 0
            assert limit >= 64 * 1024**2  # a quarter of the machine's memory, at least 64 MB
            shown = re.search(r"^relaygate_data_in_memory_limit_bytes (\S+)$", text, re.M)
            assert shown and float(shown.group(1)) == limit
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # the relay runs in this process
            assert f"process_max_fds {float(soft)}" in text
            match = re.search(r"^process_open_fds (\S+)$", text, re.M)
            assert match and float(match.group(1)) >= 3 + 3  # the sessions and the listeners

            for writer in held:
                writer.close()

            async def closed() -> bool:
                return 'relaygate_smtp_sessions{connector="Test Relay"} 0.0' in await metrics()

            await wait_for(closed)
    finally:
        for writer in held:
            writer.close()
        await relay.stop()
        await sink.close()


async def test_back_pressure_shows_on_health_metrics_and_mail_from(tmp_path: Path) -> None:
    sink = await start_sink(ScriptedHandler())
    st = os.statvfs(tmp_path)
    more_than_free = st.f_bavail * st.f_frsize + 50 * 1024**3
    relay = await start_relay(
        tmp_path / "data", {"*": sink.port}, queue={"min_free_disk_space": more_than_free}
    )
    try:
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:
            health = await client.get("/api/health")
            assert health.status_code == 200
            body = health.json()
            assert body["status"] == "degraded"
            assert (await client.get("/healthz")).json() == {"status": "degraded"}
            assert body["back_pressure"]["active"] is True
            assert body["back_pressure"]["min_free_disk_space"] == more_than_free
            assert body["back_pressure"]["disk_free_bytes"] < more_than_free
            metrics = (await client.get("/metrics")).text
            assert "relaygate_back_pressure 1.0" in metrics
            assert re.search(r"^relaygate_queue_disk_free_bytes \d", metrics, re.M)
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=smtp_port(relay), timeout=10)
        await smtp.connect()
        try:
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
                await smtp.sendmail("scanner@senders.test", ["bob@example.com"], MESSAGE)
            assert refused.value.code == 452
            assert refused.value.message == "4.3.1 Insufficient system resources"
        finally:
            smtp.close()
        assert (await relay.store.counts())["messages"] == 0
    finally:
        await relay.stop()
        await sink.close()


async def test_queue_cli_against_the_running_server(tmp_path: Path) -> None:
    accept = {"bob@example.com": False}

    def policy(address: str, _attempt: int) -> str | None:
        return None if accept.get(address) else "451 4.2.0 Mailbox busy"

    internet, senders = ScriptedHandler(policy), ScriptedHandler()
    a, b = await start_sink(internet), await start_sink(senders)
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": a.port, "senders.test": b.port},
        queue={"transient_failure_retry_interval": "00:01:00"},
        config_file=config,
    )
    try:
        await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        await send(relay, SENDER, ["dave@example.com"], MESSAGE)
        await wait_for(lambda: {"bob@example.com", "dave@example.com"} <= set(internet.rcpts))
        await asyncio.sleep(0.3)  # both attempts are recorded
        # (CLI start-up is slow on a loaded machine: independent invocations run concurrently)

        (rc, out, err), (rc_down, _o, err_down), (rc_404, _o2, err_404) = await asyncio.gather(
            cli("list", "--status", "retry", "--json", config=config),
            cli("list", "--url", f"http://127.0.0.1:{free_port()}"),
            cli("show", "RELAYTEST\\0000000000000000", config=config),
        )
        assert rc == 0, err
        items = {i["Recipients"][0]["Address"]: i for i in json.loads(out)}
        bob, dave = items["bob@example.com"]["Identity"], items["dave@example.com"]["Identity"]
        assert items["bob@example.com"]["Status"] == "Retry"
        assert rc_down == 3 and "not running" in err_down
        assert rc_404 == 1 and "not found" in err_404

        listed, shown, suspended, removed = await asyncio.gather(
            cli("list", config=config),
            cli("show", bob, config=config),
            cli("suspend", bob, "--json", config=config),
            cli("remove", dave, "--with-ndr", "--json", config=config),
        )
        for rc, _out, err in (listed, shown, suspended, removed):
            assert rc == 0, err
        assert bob in listed[1] and SENDER in listed[1]
        assert "Retry" in listed[1] or "Suspended" in listed[1]
        assert "bob@example.com" in shown[1] and "451 4.2.0 Mailbox busy" in shown[1]
        assert "Queue ops" in shown[1]
        assert json.loads(suspended[1])["Status"] == "Suspended"
        body = json.loads(removed[1])
        assert body["NdrQueueId"] and body["Removed"]["Identity"] == dave

        # remove --with-ndr: the sender hears 550 4.3.2 QUEUE.Admin
        ndr = await wait_for(lambda: senders.messages)
        per_rcpt = parse_mail(ndr[0]["content"]).get_payload()[1].get_payload()[1]
        assert per_rcpt["Final-Recipient"] == "rfc822; dave@example.com"
        assert per_rcpt["Status"] == "4.3.2"
        assert per_rcpt["Diagnostic-Code"] == (
            "smtp; 550 4.3.2 QUEUE.Admin; message deleted by administrative action"
        )
        assert not internet.messages  # bob is still suspended

        # resume + retry (in either order): delivered at once, not a minute later
        accept["bob@example.com"] = True
        resumed, retried = await asyncio.gather(
            cli("resume", bob, config=config), cli("retry", bob, config=config)
        )
        assert resumed[0] == 0 and "resumed" in resumed[1], resumed[2]
        assert retried[0] == 0 and "retry" in retried[1], retried[2]
        await wait_for(lambda: internet.messages)
        assert internet.messages[0]["rcpt_tos"] == ["bob@example.com"]
    finally:
        await relay.stop()
        await a.close()
        await b.close()


async def test_a_message_being_delivered_is_not_removed_but_can_be_suspended(
    tmp_path: Path,
) -> None:
    """Remove-Message on an Active message: before, it was deleted (and its sender sent an NDR
    "deleted by the administrator") while the attempt went on and delivered it. Now the API says
    409 and why; suspending works, and holds the message once the attempt has ended."""
    hold = asyncio.Event()
    internet = ScriptedHandler(lambda a, _n: "451 4.2.0 Mailbox busy" if a[:4] == "bob@" else None)
    internet.hold = hold
    senders = ScriptedHandler()
    a, b = await start_sink(internet), await start_sink(senders)
    relay = await start_relay(tmp_path / "data", {"*": a.port, "senders.test": b.port})
    try:
        # bob's RCPT gets 451, carol's DATA is held: the message stays Active meanwhile.
        await send(relay, SENDER, ["bob@example.com", "carol@example.com"], MESSAGE)
        await asyncio.wait_for(internet.data_started.wait(), 10)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as http:
            (item,) = (await http.get("/api/queue")).json()["messages"]
            assert item["Status"] == "Active"
            qid = item["Identity"].rsplit("\\", 1)[-1]
            refused = await http.delete(f"/api/queue/{qid}", params={"with_ndr": "true"})
            assert refused.status_code == 409
            assert "being delivered now (Active)" in refused.json()["error"]
            assert (await http.post(f"/api/queue/{qid}/suspend")).status_code == 200
            hold.set()
            await wait_for(lambda: internet.messages)

            async def after_attempt() -> dict[str, Any] | None:
                view = (await http.get(f"/api/queue/{qid}")).json()
                return view if view["Status"] != "Active" else None

            view = await wait_for(after_attempt)
            assert view["Status"] == "Suspended"  # bob (451) waits: not retried while suspended
            await asyncio.sleep(1.5)  # past transient_failure_retry_interval (1 s)
            assert internet.attempts["bob@example.com"] == internet.attempts["bob@example.com"][:1]
            removed = await http.delete(f"/api/queue/{qid}", params={"with_ndr": "true"})
            assert removed.status_code == 200, removed.text
        (ndr,) = await wait_for(lambda: senders.messages)
        assert b"bob@example.com" in ndr["content"] and b"carol@example.com" not in ndr["content"]
        assert [m["rcpt_tos"] for m in internet.messages] == [["carol@example.com"]]
    finally:
        await relay.stop()
        await a.close()
        await b.close()


async def test_queue_list_and_show_print_device_and_server_text_verbatim(tmp_path: Path) -> None:
    # A Subject from a device and a reply from a remote server that look like rich markup.
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 [/busy] [daily] try later")
    sink = await start_sink(internet)
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": sink.port},
        queue={"transient_failure_retry_interval": "00:01:00"},
        config_file=config,
    )
    try:
        message = MESSAGE.replace(b"Subject: Queue ops", b"Subject: [/urgent] [daily] invoice")
        await send(relay, SENDER, ["bob@example.com"], message)
        await wait_for(lambda: internet.rcpts)
        await asyncio.sleep(0.3)  # the attempt is recorded
        rc, out, err = await cli("list", "--json", config=config)
        assert rc == 0, err
        identity = json.loads(out)[0]["Identity"]
        (rc_list, listed, err_list), (rc_show, shown, err_show) = await asyncio.gather(
            cli("list", config=config), cli("show", identity, config=config)
        )
        assert rc_list == 0, err_list
        assert "[/busy] [daily] try later" in listed
        assert rc_show == 0, err_show
        assert "[/urgent] [daily] invoice" in shown
        assert "[/busy] [daily] try later" in shown
    finally:
        await relay.stop()
        await sink.close()


async def test_an_empty_identity_is_an_error_not_a_traceback(tmp_path: Path) -> None:
    """`relaygate queue show ""` (say ``show "$ID"`` with ID unset) called ``/api/queue/``,
    whose answer is a redirect (307): the CLI took it for the message and died with a
    KeyError traceback, exit 1, as `remove ""` did. Now it says what is wrong (exit 2), and any
    answer that is not a success is an error naming its status."""
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(tmp_path / "data", {"*": free_port()}, config_file=config)
    try:
        for verb in ("show", "remove", "suspend", "resume", "retry"):
            rc, _out, err = await cli(verb, " ", config=config)
            assert rc == 2 and "Traceback" not in err, (verb, rc, err)
            assert "a message identity cannot be empty" in err, (verb, err)
    finally:
        await relay.stop()

    async def redirect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere.test/\r\n")
        writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    proxy = await asyncio.start_server(redirect, "127.0.0.1", 0)  # say, a proxy in the way
    try:
        url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
        rc, _out, err = await cli("list", "--url", url, config=config)
        assert rc == 1 and "Traceback" not in err, (rc, err)
        assert "Found (HTTP 302)" in err, err
    finally:
        proxy.close()
        await proxy.wait_closed()


async def test_queue_list_and_show_print_no_terminal_control_from_a_remote_server(
    tmp_path: Path,
) -> None:
    """C1 controls (U+009B is CSI: "erase the screen", "move the cursor up") reached the admin's
    terminal through `queue list` / `queue show`, which can act on them and hide or fake lines:
    from a remote server's reply (now dropped where the reply is read, as C0 controls are) and
    from a Subject a client wrote (UTF-8 under SMTPUTF8 can carry any character). Every control the
    CLI prints is shown as U+FFFD now; the rest of the text as it was."""
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 busy \u009b2J\u009b1A\u0085 later")
    sink = await start_sink(internet, enable_SMTPUTF8=True)
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": sink.port},
        queue={"transient_failure_retry_interval": "00:01:00"},
        config_file=config,
    )
    try:
        subject = "Subject: Scan \u009b2J\u009b1A done".encode()  # UTF-8, declared SMTPUTF8
        message = MESSAGE.replace(b"Subject: Queue ops", subject)
        await send(relay, SENDER, ["bob@example.com"], message, mail_params=b" SMTPUTF8")

        async def attempted() -> str | None:
            rc, out, err = await cli("list", "--json", config=config)
            assert rc == 0, err
            [message] = json.loads(out)
            return str(message["Identity"]) if "busy" in message["LastError"] else None

        identity = await wait_for(attempted)
        (rc_list, listed, err_list), (rc_show, shown, err_show) = await asyncio.gather(
            cli("list", config=config), cli("show", identity, config=config)
        )
        assert rc_list == 0 and rc_show == 0, (err_list, err_show)
        for out in (listed, shown):
            assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", out), ascii(out)
        assert "busy 2J1A later" in shown, ascii(shown)  # dropped from the reply itself
        assert "busy 2J1A" in listed, ascii(listed)
        assert "Scan 2J1A done" in shown, ascii(shown)  # the Subject's dropped where it is read
    finally:
        await relay.stop()
        await sink.close()
    # What a queue written by an earlier release may still hold is masked where it is printed.
    from relaygate.cli.queue import _text

    assert _text("busy \u009b2J later\x1b[2K").plain == "busy \ufffd2J later\ufffd[2K"


async def test_showing_a_big_message_reads_its_header_not_its_body(tmp_path: Path) -> None:
    """Before, showing one message (GET /api/queue/{id}: Get-Message, the admin page, `relaygate
    queue show`) read it whole, 20 MB from its spool file, for its Subject. Now as far as its
    receive connector's max_header_size (256 KB) and the Received field's room (8 KB)."""
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 later")
    sink = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": sink.port}, queue={"transient_failure_retry_interval": "00:10:00"}
    )
    body = (b"x" * 998 + b"\r\n") * (20 * 1024 * 1024 // 1000)
    message = MESSAGE.replace(b"Subject: Queue ops", b"Subject: Scan of 20 MB").replace(
        b"\r\n\r\nbody\r\n", b"\r\n\r\n" + body
    )
    try:
        code, _ = await send(relay, SENDER, ["bob@example.com"], message)
        assert code == 250
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def retried() -> Any:
                items = (await client.get("/api/queue", params={"status": "Retry"})).json()
                return items["messages"]  # its attempt (which reads it) is over

            (item,) = await wait_for(retried)
            assert item["Size"] > 20_000_000
            before = bytes_read()
            shown = (await client.get(f"/api/queue/{item['QueueId']}")).json()
            read = bytes_read() - before
        assert shown["Subject"] == "Scan of 20 MB"
        # the head read, and a little for the database's pages and the HTTP exchange
        assert read <= (256 + 8 + 64) * 1024, f"{read} bytes read to show one message"
    finally:
        await relay.stop()
        await sink.close()


async def test_a_spool_file_shorter_than_its_message_shows_no_field_cut_short(
    tmp_path: Path,
) -> None:
    """A spooled message whose file was cut short (a damaged disk, a restore) in the middle of
    its Subject: the view read fewer bytes than asked for and took them for the whole message,
    so half the Subject was shown as the Subject. A field the short read may cut is left out,
    as for a header longer than the read (``header_of_head``)."""
    internet = ScriptedHandler(lambda _a, _n: "451 4.2.0 later")
    sink = await start_sink(internet)
    relay = await start_relay(
        tmp_path / "data", {"*": sink.port}, queue={"transient_failure_retry_interval": "00:10:00"}
    )
    message = MESSAGE.replace(b"Subject: Queue ops", b"Subject: Quarterly results").replace(
        b"\r\n\r\nbody\r\n", b"\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100
    )
    try:
        assert (await send(relay, SENDER, ["bob@example.com"], message))[0] == 250
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def retried() -> Any:
                items = (await client.get("/api/queue", params={"status": "Retry"})).json()
                return items["messages"]  # its attempt (which reads it) is over

            (item,) = await wait_for(retried)
            spool = (tmp_path / "data" / "queue" / "spool").iterdir()
            (spooled,) = [f for f in spool if f.stat().st_size]  # not the files created ahead
            data = spooled.read_bytes()
            spooled.write_bytes(data[: data.index(b"Subject: Quarterly") + len(b"Subject: Quar")])
            shown = (await client.get(f"/api/queue/{item['QueueId']}")).json()
        assert shown["Subject"] == "", shown  # before: 'Quar'
        assert shown["FromAddress"] == SENDER
    finally:
        await relay.stop()
        await sink.close()


async def test_an_empty_token_file_does_not_open_the_api(tmp_path: Path) -> None:
    """admin.api_token_file naming an empty file (emptied by mistake, or written by a failed
    deployment step): before, the token was taken as "none" and the API and every page of the
    admin centre answered without one, with no warning. Now the admin listener does not start,
    and the CLI says why instead of calling the API without a token."""
    token_file = tmp_path / "token"
    token_file.write_text("\n   \n", encoding="utf-8")
    admin_port = free_port()
    config_file = tmp_path / "relaygate.toml"
    config_file.write_text(
        make_config_text(
            tmp_path / "data",
            smtp_port=free_port(),
            admin_port=admin_port,
            routes={"*": free_port()},
            admin_extra=f'api_token_file = "{token_file}"',
        ),
        encoding="utf-8",
    )
    relay = Relay(parse_text(config_file.read_text(encoding="utf-8"), str(config_file)))
    try:
        with pytest.raises(AdminStartError, match="is empty"):
            await relay.start()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{admin_port}") as client:
            for path in ("/api/queue", "/queue"):
                with pytest.raises(httpx.ConnectError):
                    await client.get(path)
    finally:
        await relay.stop()
    rc, _out, err = await cli("list", config=config_file)
    assert rc == 1 and "is empty" in err, err


async def test_serve_reports_an_admin_listener_that_cannot_start(tmp_path: Path) -> None:
    """The admin port taken by another program, or admin.api_token_file missing: before,
    `relaygate serve` ended with a Python traceback, and in-process the SMTP listener and the
    queue manager that had started stayed up. Now it says what is wrong in one line, exits 1,
    and stops what it had started."""
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    try:
        cases = {
            "port": (taken.getsockname()[1], "", "cannot listen on admin.listen 127.0.0.1:"),
            "token": (
                free_port(),
                f'api_token_file = "{tmp_path / "missing.token"}"',
                "cannot read admin.api_token_file",
            ),
        }
        for name, (admin_port, admin_extra, expected) in cases.items():
            smtp = free_port()
            text = make_config_text(
                tmp_path / name,
                smtp_port=smtp,
                admin_port=admin_port,
                routes={"*": free_port()},
                admin_extra=admin_extra,
            )
            relay = Relay(parse_text(text, "<test>"))
            with pytest.raises(AdminStartError, match=expected):
                await relay.start()
            with pytest.raises(OSError):  # the SMTP listener was closed again
                socket.create_connection(("127.0.0.1", smtp), timeout=2).close()
            await relay.stop()

            config = tmp_path / f"{name}.toml"
            config.write_text(text.replace(str(smtp), str(free_port())), encoding="utf-8")
            env = {**os.environ, "NO_COLOR": "1"}
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "relaygate", "serve", "--config", str(config),
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 1, (name, out, err)
            assert b"Traceback" not in err, err.decode()
            assert f"cannot start: {expected}".encode() in err, err.decode()
    finally:
        taken.close()


async def test_queue_list_limit_is_bounded_and_checked(tmp_path: Path) -> None:
    """`limit` past what the database takes (10**20) gave a 500 with a plain-text body (an
    OverflowError in the store); 10**9 asked for the whole queue whatever its size, "1_0" was
    read as 10. Now the limit is digits from 0 to 100000, else 400 with the JSON error."""
    sink = await start_sink(ScriptedHandler(lambda _a, _n: "451 4.2.0 later"))
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": sink.port},
        queue={"transient_failure_retry_interval": "00:10:00"},
        config_file=config,
    )
    try:
        for _ in range(2):
            await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:
            for limit in (str(10**20), str(10**9), "100001", "-1", "1_0", "1e3", "", "٣"):
                r = await client.get("/api/queue", params={"limit": limit})
                assert r.status_code == 400, (limit, r.status_code, r.text)
                assert r.json() == {
                    "error": "limit must be a whole number from 0 to 100000",
                    "status": 400,
                }
            for limit, count in (("1", 1), ("0", 0), ("100000", 2), (" 2 ", 2)):
                r = await client.get("/api/queue", params={"limit": limit})
                assert r.status_code == 200 and len(r.json()["messages"]) == count, limit
        (rc, out, err), (rc_big, _o, err_big) = await asyncio.gather(
            cli("list", "--limit", "1", "--json", config=config),
            cli("list", "--limit", str(10**20), config=config),
        )
        assert rc == 0 and len(json.loads(out)) == 1, err
        assert rc_big == 2 and "--limit" in err_big and "Internal Server Error" not in err_big
    finally:
        await relay.stop()
        await sink.close()


async def test_a_failing_queue_store_is_a_json_503_not_a_plain_500(tmp_path: Path) -> None:
    """The queue database failing under the API (here SQLite loses its recipients table; in a
    cluster, PostgreSQL going down): the API answered Starlette's plain-text "Internal Server
    Error" 500 and the CLI could only say that. The API's errors are JSON, and a store failure
    is 503 (as /healthz says); the admin centre shows a page saying so."""
    sink = await start_sink(ScriptedHandler(lambda _a, _n: "451 4.2.0 later"))
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": sink.port},
        queue={"transient_failure_retry_interval": "00:10:00"},
        config_file=config,
    )
    db = sqlite3.connect(tmp_path / "data" / "queue" / "queue.db")
    try:
        await send(relay, SENDER, ["bob@example.com"], MESSAGE)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def status_becomes(wanted: str) -> str:
                """Its first delivery attempt (451) ends, and its result is stored, a moment
                after the 250: until then the message is Active."""
                status = ""
                for _ in range(100):
                    (item,) = (await client.get("/api/queue")).json()["messages"]
                    status = item["Status"]
                    if status == wanted:
                        break
                    await asyncio.sleep(0.1)
                return status

            assert await status_becomes("Retry") == "Retry"
            (item,) = (await client.get("/api/queue")).json()["messages"]
            qid = item["QueueId"]
            db.execute("ALTER TABLE recipients RENAME TO recipients_away")
            db.commit()
            for method, path in (
                ("GET", "/api/queue"),
                ("GET", f"/api/queue/{qid}"),
                ("POST", f"/api/queue/{qid}/suspend"),
                ("DELETE", f"/api/queue/{qid}"),
            ):
                r = await client.request(method, path)
                assert r.status_code == 503, (method, path, r.status_code, r.text)
                body = r.json()
                assert body["status"] == 503, body
                assert body["error"].startswith("queue store unavailable: "), body
            # the counts fail too: a probe learns the store is down, and nothing of its error
            db.execute("ALTER TABLE messages RENAME TO messages_away")
            db.commit()
            probe = await client.get("/healthz")
            assert probe.status_code == 503 and probe.json() == {"status": "error"}
            detail = await client.get("/api/health")  # no token configured: the API is open
            assert detail.status_code == 503
            assert detail.json()["error"].startswith("queue store: "), detail.text
            db.execute("ALTER TABLE messages_away RENAME TO messages")
            db.commit()
            page = await client.get("/queue")
            assert page.status_code == 503 and "Queue store unavailable" in page.text
            assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
            rc, _out, err = await cli("list", config=config)
            assert rc == 1 and "queue store unavailable" in err and "HTTP 503" in err, err
            db.execute("ALTER TABLE recipients_away RENAME TO recipients")
            db.commit()
            assert await status_becomes("Retry") == "Retry"
    finally:
        db.close()
        await relay.stop()
        await sink.close()


async def test_queue_cli_with_url_sends_the_token_of_the_config(tmp_path: Path) -> None:
    """`relaygate queue --url ...` (or $RELAYGATE_ADMIN_URL) with the config found as usual
    ($RELAYGATE_CONFIG here): the URL replaced the config altogether, so the token of
    admin.api_token_file was not sent and a server that wants it answered 401 ("missing or
    wrong API token"), with no way to pass it. Now the token comes from that config."""
    token_file = tmp_path / "token"
    token_file.write_text("cli-token-4b1d\n", encoding="utf-8")
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": free_port()},
        config_file=config,
        admin_extra=f'api_token_file = "{token_file}"',
    )
    try:
        url = admin_url(relay)
        env = {"RELAYGATE_CONFIG": str(config)}
        (
            (rc, out, err),
            (rc_env, out_env, err_env),
            (rc_none, out_none, err_none),
        ) = await asyncio.gather(
            cli("list", "--json", "--url", url, env_extra=env),
            cli("list", "--json", env_extra={**env, "RELAYGATE_ADMIN_URL": url}),
            cli("list", "--json", "--url", url),  # no config anywhere: no token, 401
        )
        assert rc == 0 and json.loads(out) == [], err
        assert rc_env == 0 and json.loads(out_env) == [], err_env
        # with --json the error is JSON on stdout
        assert rc_none == 1 and "HTTP 401" in json.loads(out_none)["error"], out_none + err_none
    finally:
        await relay.stop()


async def test_a_token_file_written_on_windows_works(tmp_path: Path) -> None:
    """A token file with a UTF-8 BOM (Notepad, PowerShell 5.1's Set-Content -Encoding UTF8) and
    CRLF: the BOM became part of the token, so the token as typed got 401 from the API and
    "wrong token" from /login, and `relaygate queue` died with a UnicodeEncodeError traceback.
    Now the BOM is dropped; a token that cannot travel in an HTTP header (UTF-16 file, spaces,
    non-ASCII) is refused at start-up with the reason."""
    token_file = tmp_path / "token"
    token_file.write_bytes(b"\xef\xbb\xbfbom-token-7f3a\r\n")
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": free_port()},
        config_file=config,
        admin_extra=f'api_token_file = "{token_file}"',
    )
    try:
        url = admin_url(relay)
        async with httpx.AsyncClient(base_url=url) as client:
            ok = await client.get("/api/queue", headers={"Authorization": "Bearer bom-token-7f3a"})
            assert ok.status_code == 200, ok.text
            login = await client.post(
                "/login", data={"token": "bom-token-7f3a"}, headers={"Origin": url}
            )
            assert login.status_code == 303, login.text
        rc, out, err = await cli("list", "--json", config=config)
        assert rc == 0 and json.loads(out) == [], err
    finally:
        await relay.stop()
    for name, content, reason in (
        ("utf16", "tok-en\r\n".encode("utf-16"), "is not UTF-8 text"),
        ("space", b"two words\n", "must be printable ASCII"),
        ("latin", "pässwort\n".encode(), "must be printable ASCII"),
    ):
        bad = tmp_path / f"{name}.token"
        bad.write_bytes(content)
        text = make_config_text(
            tmp_path / name,
            smtp_port=free_port(),
            admin_port=free_port(),
            routes={"*": free_port()},
            admin_extra=f'api_token_file = "{bad}"',
        )
        refused = Relay(parse_text(text, "<test>"))
        try:
            with pytest.raises(AdminStartError, match=reason):
                await refused.start()
        finally:
            await refused.stop()


async def test_queue_list_and_summary_fit_a_narrow_terminal(tmp_path: Path) -> None:
    """At 80 columns (a terminal, or output piped) each message and queue is one line, long
    values cut with an ellipsis and columns empty in every row left out; a wide one shows all."""
    long_error = "451 4.2.0 " + "Mailbox busy, try again later please " * 3
    sink = await start_sink(ScriptedHandler(lambda _a, _n: long_error.strip()))
    config = tmp_path / "relaygate.toml"
    relay = await start_relay(
        tmp_path / "data",
        {"*": sink.port},
        queue={"transient_failure_retry_interval": "00:01:00"},
        config_file=config,
    )
    try:
        for n in range(2):
            await send(relay, SENDER, [f"user{n}@example.com"], MESSAGE)
        async with httpx.AsyncClient(base_url=admin_url(relay)) as client:

            async def retried() -> Any:
                items = (await client.get("/api/queue", params={"status": "Retry"})).json()
                return len(items["messages"]) == 2 and items["messages"]

            items = await wait_for(retried)
        narrow = {"COLUMNS": "80"}
        (rc, out, err), (rc_q, out_q, err_q), (rc_w, wide, err_w) = await asyncio.gather(
            cli("list", config=config, env_extra=narrow),
            cli("summary", config=config, env_extra=narrow),
            cli("list", config=config),
        )
        assert rc == 0 and rc_q == 0 and rc_w == 0, err + err_q + err_w
        lines = out.splitlines()
        assert all(len(line) <= 80 for line in lines), out
        for item in items:  # the whole identity, on the line of its status and cut error
            (row,) = [line for line in lines if item["Identity"] in line]
            assert "Retry" in row and "451 4." in row and "…" in row
        assert "NextRetryTime" in out and "NextHopDomain" not in out  # left out when narrow
        assert "narrow terminal" in out and "--json" in out
        queue_lines = out_q.splitlines()
        assert all(len(line) <= 80 for line in queue_lines)
        (queue_row,) = [line for line in queue_lines if f"127.0.0.1]:{sink.port}" in line]
        assert "Retry" in queue_row and "2" in queue_row
        # wide (250 columns): every column, the error whole (folded at 50)
        assert "NextHopDomain" in wide and "narrow terminal" not in wide and "…" not in wide
        assert wide.count("please") == 2 * 3
    finally:
        await relay.stop()
        await sink.close()
