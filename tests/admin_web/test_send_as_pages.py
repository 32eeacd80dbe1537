"""The admin centre and users' send-as lists: its explain page gives the SMTP service's reply for a
user with a list (as `relaygate explain --auth-user` does), and its audit findings name the users
without one (as `relaygate audit` does). A real relay with its admin listener, fetched over HTTP."""

from __future__ import annotations

import base64
import smtplib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from argon2 import PasswordHasher

import relaygate.smtp.auth as auth
from relaygate.policy.address_rules import parse_send_as
from tests.admin_web.test_web import RelayThread
from tests.queue_manager.helpers import free_port

PASSWORD = "correct horse battery staple"
USER_SEND_AS = "550 5.7.1 Client does not have permissions to send as this sender"

SUBMISSION = """
[[receive_connectors]]
name = "Submission"
usage = "Custom"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["Tls", "BasicAuth"]
permission_groups = ["ExchangeUsers"]
"""


@pytest.fixture(scope="module")
def node() -> Iterator[RelayThread]:
    with tempfile.TemporaryDirectory(prefix="relaygate-send-as-") as tmp:
        data = Path(tmp) / "data"
        users = auth.UserStore(data / "users.json")
        cheap = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(auth, "_HASHER", cheap)
            users.set_password("alice", PASSWORD, parse_send_as(["alice@corp.test"]))
            users.set_password("bob", PASSWORD)
        port = free_port()
        relay = RelayThread(data, extra=SUBMISSION.format(port=port))
        relay.submission_port = port  # type: ignore[attr-defined]
        try:
            yield relay
        finally:
            relay.stop()


def explain_page(node: RelayThread, sender: str, user: str = "Alice") -> str:
    query = {
        "client_ip": "127.0.0.9",
        "local": f"127.0.0.1:{node.submission_port}",  # type: ignore[attr-defined]
        "from": sender,
        "auth_user": user,
        "to": "it@corp.test",
    }
    page = node.api("GET", "/explain?" + urlencode(query))
    assert page.status_code == 200
    return page.text


def server_reply(node: RelayThread, sender: str) -> str:
    port = node.submission_port  # type: ignore[attr-defined]
    with smtplib.SMTP("127.0.0.1", port, timeout=10, source_address=("127.0.0.9", 0)) as c:
        c.ehlo("laptop.corp.test")
        blob = base64.b64encode(f"\0alice\0{PASSWORD}".encode()).decode()
        assert c.docmd("AUTH", f"PLAIN {blob}")[0] == 235
        code, text = c.mail(sender)
    return f"{code} {text.decode()}"


def test_the_explain_page_gives_the_server_reply_for_a_user_with_a_list(node: RelayThread) -> None:
    assert server_reply(node, "ceo@corp.test") == USER_SEND_AS
    page = explain_page(node, "ceo@corp.test")
    assert USER_SEND_AS in page
    assert "is not in the send-as list of user alice" in page
    assert "Send-as list of user alice: alice@corp.test" in page
    assert server_reply(node, "alice@corp.test") == "250 2.1.0 Sender OK"
    page = explain_page(node, "alice@corp.test")
    assert "250 2.1.0 Sender OK" in page and USER_SEND_AS not in page


def test_the_audit_findings_name_the_users_without_a_list(node: RelayThread) -> None:
    view = node.api("GET", "/api/connectors/receive/Submission").json()
    found = [f for f in view["findings"] if f["code"] == "auth-users-without-send-as"]
    assert len(found) == 1 and "user(s) bob have no send-as list" in found[0]["message"]
    assert "have no send-as list" in node.api("GET", "/").text  # the dashboard's findings


def test_the_explain_page_for_a_user_not_in_the_users_file_shows_auth_failing(
    node: RelayThread,
) -> None:
    page = explain_page(node, "nobody@corp.test", "nobody")
    assert "535 5.7.3 Authentication unsuccessful" in page
    assert "user nobody is not in the users file" in page
    assert "530 5.7.1 Client was not authenticated" in page  # MAIL, as the server answers it
