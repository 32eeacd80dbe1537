"""The read-only connector pages of the admin centre (``/connectors/receive/{name}``,
``/connectors/send/{name}``) in real headless Chromium, and their JSON (``/api/connectors/...``).

One relay with an API token for the whole module (the browser carries a session cookie): its
"M365 Paced" send connector signs in with a password file whose content must never show, is paced
and overflows to a disabled "Overflow ESP" (an audit finding); nothing listens on its smart host,
so a message to paced.example stays in that connector's delivery queue.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from playwright.sync_api import BrowserContext, Locator, Page, expect, sync_playwright

from relaygate.admin.web import session_value
from tests.admin_web.test_web import CHROMIUM, CHROMIUM_ARGS, RelayThread
from tests.queue_manager.helpers import free_port

pytestmark = pytest.mark.browser

TOKEN = "s3cret-token-for-connector-pages"
SECRET = "Pa55word-that-must-never-show-7f3a9c"
CLIENT_SECRET = "Entra-client-secret-never-shown-41d8"

EXTRA = """
[[receive_connectors]]
name = "Scanners Floor 2"
usage = "Custom"
bindings = ["127.0.0.1:{scan_port}"]
remote_ip_ranges = ["127.0.0.2", "127.0.0.3"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
allowed_senders = ["scan@corp.test", "*@floor2.corp.test"]

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[receive_connectors.permissions]]
user = "CORP\\\\scan-admin"
extended_rights = ["ms-Exch-SMTP-Submit", "ms-Exch-SMTP-Accept-Any-Sender"]

[[receive_connectors.permissions]]
user = "corp\\\\SCAN-ADMIN"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "M365 Paced"
address_spaces = ["paced.example"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:{paced_port}"]
smart_host_auth_mechanism = "BasicAuth"
auth_username = "relay@corp.test"
auth_password_file = "{secret_file}"
max_messages_per_minute = 30
overflow_connector = "overflow esp"
connection_inactivity_timeout = "00:00:10"

[[send_connectors]]
name = "Overflow ESP"
address_spaces = ["overflow.invalid"]
dns_routing_enabled = false
smart_hosts = ["[127.0.0.1]:{paced_port}"]
enabled = false

[[send_connectors]]
name = "Graph Mail"
address_spaces = ["graph.invalid"]
delivery_method = "Graph"
oauth_tenant_id = "00000000-0000-0000-0000-000000000001"
oauth_client_id = "00000000-0000-0000-0000-000000000002"
oauth_client_secret_file = "{graph_secret_file}"
graph_mailbox = "relay@corp.test"
"""


class Node(RelayThread):
    secret_file: Path
    paced_port: int


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    with tempfile.TemporaryDirectory(prefix="relaygate-connectors-") as tmp:
        base = Path(tmp)
        (base / "token").write_text(TOKEN + "\n", encoding="utf-8")
        secret_file = base / "m365-password.txt"
        secret_file.write_text(SECRET + "\n", encoding="utf-8")
        graph_secret_file = base / "entra-client-secret.txt"
        graph_secret_file.write_text(CLIENT_SECRET + "\n", encoding="utf-8")
        for secret in (secret_file, graph_secret_file):
            secret.chmod(0o600)  # else audit's secret-file-readable
        paced_port = free_port()  # nothing listens: the message stays queued
        extra = EXTRA.format(
            scan_port=free_port(),
            paced_port=paced_port,
            secret_file=secret_file,
            graph_secret_file=graph_secret_file,
        )
        relay = Node(
            base / "data",
            token=TOKEN,
            admin_extra=f'api_token_file = "{base / "token"}"',
            extra=extra,
        )
        relay.secret_file = secret_file
        relay.paced_port = paced_port
        try:
            yield relay
        finally:
            relay.stop()


@pytest.fixture(scope="module")
def signed_in(node: Node) -> Iterator[BrowserContext]:
    """Chromium with a session of the admin centre (what /login sets)."""
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
        context.add_cookies(
            [{"name": node.session_cookie, "value": session_value(TOKEN), "url": node.url}]
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def tab(signed_in: BrowserContext) -> Iterator[Page]:
    tab = signed_in.new_page()
    tab.set_default_timeout(10_000)
    try:
        yield tab
    finally:
        tab.close()


def _key(tab: Page, key: str) -> Locator:
    return tab.locator(f'#keys tr[data-key="{key}"] td')


def test_dashboard_links_to_the_receive_connector_page(node: Node, tab: Page) -> None:
    tab.goto(node.url + "/")
    tab.locator("#connectors").get_by_role("link", name="Test Relay", exact=True).click()
    assert tab.url == node.url + "/connectors/receive/Test%20Relay"
    expect(tab.locator("#identity")).to_have_text("RELAYTEST\\Test Relay")
    # every key with the value `relaygate connector show` prints
    expect(_key(tab, "bindings")).to_have_text(f"127.0.0.1:{node.smtp_port}")
    expect(_key(tab, "remote_ip_ranges")).to_have_text("127.0.0.1")
    expect(_key(tab, "auth_mechanism")).to_have_text("None")
    expect(_key(tab, "allowed_senders")).to_have_text("(none)")
    expect(_key(tab, "max_message_size")).to_contain_text("bytes)")
    expect(tab.locator("#relay-method")).to_have_text("A")
    expect(tab.locator("#relay")).to_contain_text("method A: permission for NT AUTHORITY")
    anonymous = tab.locator("#rights-anonymous")
    expect(anonymous).to_contain_text("NT AUTHORITY\\ANONYMOUS LOGON")
    expect(anonymous).to_contain_text("permission for NT AUTHORITY\\ANONYMOUS LOGON")
    expect(anonymous).to_contain_text("ms-Exch-SMTP-Accept-Any-Recipient")
    expect(anonymous).to_contain_text("PermissionGroups AnonymousUsers")
    expect(tab.locator("#rights-authenticated")).to_contain_text(
        "NT AUTHORITY\\Authenticated Users"
    )
    expect(tab.locator("#rights-authenticated")).to_contain_text("no rights")
    finding = tab.locator("#findings tbody tr").filter(has_text="does not offer STARTTLS")
    expect(finding.locator(".sev")).to_have_text("medium")
    expect(finding).to_contain_text("add Tls to auth_mechanism")
    # only this connector's findings (the frontend's shadowed range is another connector's)
    expect(tab.locator("#findings")).not_to_contain_text("Scanners Floor 2")
    assert "<script" not in tab.content()

    tab.goto(node.url + "/")
    tab.locator("#connectors").get_by_role("link", name="Scanners Floor 2").click()
    expect(tab.locator("#identity")).to_have_text("RELAYTEST\\Scanners Floor 2")
    expect(tab.locator("#allowed")).to_contain_text("scan@corp.test")
    expect(tab.locator("#allowed")).to_contain_text("*@floor2.corp.test")
    expect(_key(tab, "remote_ip_ranges")).to_have_text("127.0.0.2, 127.0.0.3")
    # a user named by a permission gets a card of its own (one, though named twice in two cases)
    expect(tab.locator("#rights .card")).to_have_count(3)
    user = tab.locator("#rights-user-1")
    expect(user.locator("h2")).to_have_text("Signed in as CORP\\scan-admin")
    expect(user).to_contain_text("permission for CORP\\scan-admin")
    expect(user).to_contain_text("permission for corp\\SCAN-ADMIN")
    expect(user).to_contain_text("ms-Exch-SMTP-Accept-Any-Sender")
    expect(user).to_contain_text("submit: yes · relay: yes")
    expect(user.locator(".warn-text")).to_contain_text("this connector offers no AUTH")
    # the grant is the user's own: neither the anonymous nor the any-user card has it
    expect(tab.locator("#rights-authenticated")).not_to_contain_text("Accept-Any-Sender")
    expect(tab.locator("#rights-anonymous")).not_to_contain_text("scan-admin")


def test_send_connector_page_shows_route_pacing_queue_and_overflow(node: Node, tab: Page) -> None:
    qid = node.send("Paced", to="someone@paced.example")
    tab.goto(node.url + "/")
    tab.locator("#send-connectors").get_by_role("link", name="M365 Paced").click()
    assert tab.url == node.url + "/connectors/send/M365%20Paced"
    expect(tab.locator("#identity")).to_have_text("M365 Paced")
    expect(tab.locator("#route")).to_have_text(f"smart hosts [127.0.0.1]:{node.paced_port}")
    expect(tab.locator("#pacing")).to_have_text(
        '30 messages/minute, then via "overflow esp" (overflow_connector)'
    )
    expect(_key(tab, "auth_password_file")).to_have_text(str(node.secret_file))
    finding = tab.locator("#findings tbody tr").filter(has_text="is disabled")
    expect(finding.locator(".sev")).to_have_text("low")
    expect(finding).to_contain_text("Overflow ESP")
    # its delivery queue with the message count, linking to the queue's messages
    queue = tab.locator("#queues tbody tr")
    expect(queue).to_have_count(1)
    expect(queue).to_contain_text(f"RELAYTEST\\[127.0.0.1]:{node.paced_port}")
    expect(queue.locator("td.num")).to_have_text("1")
    queue.get_by_role("link").click()
    assert tab.url.startswith(node.url + "/queue?queue=")
    expect(tab.locator(f'tr[data-queue-id="{qid}"]')).to_have_count(1)

    tab.go_back()
    tab.locator("#overflow").get_by_role("link", name="Overflow ESP").click()
    assert tab.url == node.url + "/connectors/send/Overflow%20ESP"
    expect(tab.locator("h1")).to_contain_text("(disabled)")
    expect(tab.locator("#pacing")).to_have_text("unlimited")
    expect(tab.locator("#queues")).to_contain_text("No message waits for this connector.")
    node.api("DELETE", f"/api/queue/{qid}")


def test_names_are_matched_in_any_case_and_unknown_names_are_404(node: Node, tab: Page) -> None:
    response = tab.goto(node.url + "/connectors/receive/" + quote("test RELAY"))
    assert response is not None and response.status == 200
    expect(tab.locator("#identity")).to_have_text("RELAYTEST\\Test Relay")
    response = tab.goto(node.url + "/connectors/send/m365%20paced")
    assert response is not None and response.status == 200
    expect(tab.locator("#identity")).to_have_text("M365 Paced")
    response = tab.goto(node.url + "/connectors/receive/No%20Such%20Connector")
    assert response is not None and response.status == 404
    expect(tab.locator("p.error")).to_have_text("No receive connector named 'No Such Connector'.")
    # a receive connector is not a send connector
    response = tab.goto(node.url + "/connectors/send/Test%20Relay")
    assert response is not None and response.status == 404
    expect(tab.locator("p.error")).to_contain_text("No send connector named 'Test Relay'")
    # the explain page links the connector it picked and the route's send connector
    tab.goto(node.url + "/explain?client_ip=127.0.0.1&to=someone%40paced.example")
    tab.locator(".explain-result").first.get_by_role("link", name="M365 Paced").first.click()
    expect(tab.locator("#identity")).to_have_text("M365 Paced")


def test_connector_pages_need_a_session_and_pass_the_host_guard(node: Node) -> None:
    for path in ("/connectors/receive/Test%20Relay", "/connectors/send/M365%20Paced"):
        r = node.api("GET", path)  # no session cookie
        assert r.status_code == 303 and r.headers["location"] == "/login", path
        assert TOKEN not in r.text
        unknown = node.api("GET", path + "x")  # not even the 404 names it before sign-in
        assert unknown.status_code == 303
        rebound = node.api("GET", path, headers={"Host": "relay.evil.example"})
        assert rebound.status_code == 403
        # read-only: no POST route
        post = node.api("POST", path, headers={"Origin": node.url})
        assert post.status_code == 405
    for path in ("/api/connectors/receive/Test%20Relay", "/api/connectors/send/M365%20Paced"):
        r = httpx.get(node.url + path, timeout=10)  # no bearer token
        assert r.status_code == 401 and r.json()["status"] == 401


def test_connector_json_and_no_secret_anywhere(node: Node) -> None:
    r = node.api("GET", "/api/connectors/receive/test%20relay")
    assert r.status_code == 200
    body = r.json()
    assert body["identity"] == "RELAYTEST\\Test Relay"
    keys = {k["key"]: k for k in body["keys"]}
    assert keys["bindings"]["value"] == [f"127.0.0.1:{node.smtp_port}"]
    assert keys["remote_ip_ranges"]["text"] == "127.0.0.1"
    assert body["relay"]["method"] == "A" and body["relay"]["anonymous"] is True
    assert body["rights"]["anonymous"]["may_relay"] is True
    assert body["rights"]["authenticated"]["may_submit"] is False
    assert body["rights"]["users"] == []  # Test Relay's permissions name no user
    assert body["rights"]["offers_auth"] is False
    assert any(f["code"] == "tls-not-offered" for f in body["findings"])
    scanners = node.api("GET", "/api/connectors/receive/Scanners%20Floor%202").json()
    assert scanners["allowed_senders"] == ["scan@corp.test", "*@floor2.corp.test"]
    (user,) = scanners["rights"]["users"]
    assert user["user"] == "CORP\\scan-admin"
    assert "ms-Exch-SMTP-Accept-Any-Sender" in user["rights"]
    assert user["may_submit"] is True and user["may_relay"] is True
    assert "ms-Exch-SMTP-Accept-Any-Sender" not in scanners["rights"]["authenticated"]["rights"]

    r = node.api("GET", "/api/connectors/send/M365%20PACED")
    assert r.status_code == 200
    send = r.json()
    assert send["route"] == f"smart hosts [127.0.0.1]:{node.paced_port}"
    assert send["pacing"].startswith("30 messages/minute")
    assert send["overflow_connector"] == {"name": "Overflow ESP", "exists": True, "enabled": False}
    # BasicAuth to a smart host that need not offer STARTTLS: the password may cross in clear
    assert [f["code"] for f in send["findings"]] == [
        "smart-host-auth-cleartext",
        "overflow-disabled",
    ]
    keys = {k["key"]: k["value"] for k in send["keys"]}
    assert keys["auth_password_file"] == str(node.secret_file)  # the file's name, never its text

    for kind, name in (("receive", "Nope"), ("send", "Test Relay")):
        missing = node.api("GET", f"/api/connectors/{kind}/{quote(name)}")
        assert missing.status_code == 404
        assert missing.json() == {"error": f"no {kind} connector named {name!r}", "status": 404}

    graph = node.api("GET", "/api/connectors/send/graph%20mail").json()
    assert graph["route"] == (
        "Microsoft Graph (mailbox relay@corp.test) via https://graph.microsoft.com/v1.0"
    )
    assert graph["auth"].startswith("OAuth")
    assert {k["key"]: k["value"] for k in graph["keys"]}["oauth_client_secret_file"].endswith(
        "entra-client-secret.txt"
    )

    # the password and client secret files' contents appear in no page and no JSON
    session = {node.session_cookie: session_value(TOKEN)}
    with httpx.Client(base_url=node.url, cookies=session, timeout=10) as client:
        for path in (
            "/",
            "/connectors/send/M365%20Paced",
            "/connectors/send/Overflow%20ESP",
            "/connectors/send/Graph%20Mail",
            "/connectors/receive/Test%20Relay",
            "/api/connectors/send/M365%20Paced",
            "/api/connectors/send/Graph%20Mail",
        ):
            page = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
            assert page.status_code == 200, path
            assert SECRET not in page.text and CLIENT_SECRET not in page.text, path
            assert "Pa55word" not in page.text and "Entra-client-secret" not in page.text, path
