"""The memory for messages in transit (smtp/limits.py DataMemory, `server.max_data_in_memory`):
what all sessions of a process hold while they receive and commit messages is bounded; a message
that would go past it is read to its end without being kept and refused with 452 4.3.1, and the
session stays usable."""

from __future__ import annotations

import time

from tests.smtp.conftest import RelayHandle, relay, relay_connector  # noqa: F401
from tests.smtp.helpers import RawClient

KB = 1024


def body(size: int) -> bytes:
    line = b"z" * 78 + b"\r\n"
    return b"Subject: memory\r\n\r\n" + line * (size // len(line))


def start_message(client: RawClient, sender: str = "scanner@corp.example") -> None:
    client.cmd(f"MAIL FROM:<{sender}>", 250)
    client.cmd("RCPT TO:<someone@example.com>", 250)
    client.cmd("DATA", 354)


def wait_all_given_back(r: RelayHandle) -> None:
    deadline = time.monotonic() + 5
    while r.relay.ctx.data_memory.used and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.relay.ctx.data_memory.used == 0


def test_a_message_past_the_budget_gets_452_and_the_session_goes_on(relay):  # noqa: F811
    r = relay([relay_connector()], server={"max_data_in_memory": "100KB"})
    c = r.raw()
    c.expect(220)
    c.cmd("EHLO scanner.corp.example", 250)
    start_message(c)
    c.send(body(300 * KB) + b".\r\n")
    assert c.expect(452).text == "452 4.3.1 Insufficient system resources"
    assert r.messages() == []
    # in sync: the next message on the same connection is taken
    start_message(c)
    c.send(body(20 * KB) + b".\r\n")
    c.expect(250)
    c.cmd("QUIT", 221)
    assert len(r.messages()) == 1
    assert "the memory for messages in transit is spent" in r.protocol_log_text()
    wait_all_given_back(r)


def test_the_budget_is_shared_by_the_sessions_of_the_process(relay):  # noqa: F811
    r = relay([relay_connector(["127.0.0.0/8"])], server={"max_data_in_memory": "100KB"})
    first, second = r.raw(source="127.0.0.5"), r.raw(source="127.0.0.6")
    for c in (first, second):
        c.expect(220)
        c.cmd("EHLO scanner.corp.example", 250)
        start_message(c)
    held = body(60 * KB)
    first.send(held)  # 60 KB held, the end not sent yet
    deadline = time.monotonic() + 5
    while r.relay.ctx.data_memory.used < len(held) - 1024 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the relay has read (and holds) it
    assert r.relay.ctx.data_memory.used >= len(held) - 1024
    second.send(body(60 * KB) + b".\r\n")  # together over 100 KB
    second.expect(452)
    first.send(b".\r\n")
    first.expect(250)
    start_message(second)  # the first message is committed: its bytes are given back
    second.send(body(60 * KB) + b".\r\n")
    second.expect(250)
    assert len(r.messages()) == 2
    wait_all_given_back(r)


def test_a_message_over_its_size_limit_does_not_spend_the_budget(relay):  # noqa: F811
    r = relay([relay_connector(max_message_size="64KB")], server={"max_data_in_memory": "100KB"})
    c = r.raw()
    c.expect(220)
    c.cmd("EHLO scanner.corp.example", 250)
    start_message(c)
    c.send(body(400 * KB) + b".\r\n")
    c.expect(552)  # the size limit answers, not the memory budget
    assert r.relay.ctx.data_memory.used == 0
    start_message(c)
    c.send(body(40 * KB) + b".\r\n")
    c.expect(250)
    wait_all_given_back(r)


def test_the_default_budget_follows_the_workers_that_run_not_the_file(relay):  # noqa: F811
    """`server.workers` edited in the file waits for a restart: a reload kept dividing the
    default budget (a quarter of the memory) by the file's figure, 8 times smaller with 16 in the
    file for the 2 processes that run."""
    from relaygate.smtp.limits import default_data_memory

    r = relay([relay_connector()], server={"workers": 2})
    assert r.relay.ctx.data_memory.limit == default_data_memory(2)
    r.doc["server"]["workers"] = 16
    r.reconfigure([relay_connector()])
    assert r.relay.config.server.workers == 16  # the reload took the file
    assert r.relay.ctx.data_memory.limit == default_data_memory(2)
