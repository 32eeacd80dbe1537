"""Security-bar §1B end to end: an address that hides another domain is delivered to the domain it
names, with its local part untouched, and never to the hidden one (items 5-7, 9-11, 29).

tests/policy/test_verdicts.py shows the RCPT replies for every vector; this shows where the accepted
ones go. The relay connector here may relay (Accept-Any-Recipient), the case where a "re-route to
EXT" would not even be refused at RCPT: corp.test goes to one sink, everything else to another, and
the other sink must see no connection at all.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.queue_manager.helpers import ScriptedHandler, send, start_relay, start_sink, wait_for

LOCAL, EXT = "corp.test", "ext.test"

# (RCPT argument without <>, the mailbox the LOCAL server must be given)
HIDDEN_ROUTES = [
    (f"victim%{EXT}@{LOCAL}", f"victim%{EXT}@{LOCAL}"),  # 5 percent hack
    (f"a%b%{EXT}@{LOCAL}", f"a%b%{EXT}@{LOCAL}"),  # 6 chained percent
    (f"{EXT}!victim@{LOCAL}", f"{EXT}!victim@{LOCAL}"),  # 7 bang path
    (f"@{EXT}:user@{LOCAL}", f"user@{LOCAL}"),  # 9 source route: ignored (RFC 5321 App. C)
    (f"@{EXT},@hop2.{EXT}:user2@{LOCAL}", f"user2@{LOCAL}"),  # 8's form, to LOCAL
    (f'"victim@{EXT}"@{LOCAL}', f'"victim@{EXT}"@{LOCAL}'),  # 10 quoted @
    # 11 quoted %: the same mailbox, sent in the canonical unquoted form (RFC 5321 §4.1.2)
    (f'"victim%{EXT}"@{LOCAL}', f"victim%{EXT}@{LOCAL}"),
    (f'"victim@{EXT} x"@{LOCAL}', f'"victim@{EXT} x"@{LOCAL}'),  # 29 quoted @ and space
]


async def test_hidden_routes_are_delivered_to_the_named_domain_only(tmp_path: Path) -> None:
    local, external = await start_sink(ScriptedHandler()), await start_sink(ScriptedHandler())
    relay = await start_relay(tmp_path / "data", {LOCAL: local.port, "*": external.port})
    try:
        data = b"Subject: hidden routes\r\n\r\nbody\r\n"
        code, _ = await send(relay, "app@corp.test", [arg for arg, _ in HIDDEN_ROUTES], data)
        assert code == 250
        expected = sorted(mailbox for _, mailbox in HIDDEN_ROUTES)
        assert await wait_for(lambda: len(local.handler.messages) == 1, timeout=10)
        (delivered,) = local.handler.messages
        # each local part reached the LOCAL server as it was written (quotes included)
        assert sorted(delivered["rcpt_tos"]) == expected
        await asyncio.sleep(0.5)  # several queue scans: nothing goes anywhere else
        assert external.handler.connections == 0
        assert external.handler.messages == [] and external.handler.rcpts == []
    finally:
        await relay.stop()
        await local.close()
        await external.close()


async def test_an_encoded_newline_in_a_subject_never_becomes_a_header_on_the_way_out(
    tmp_path: Path,
) -> None:
    """Item 83 (CPython CVE-2024-6923): an RFC 2047 encoded word that decodes to a newline and a
    Bcc field stays one encoded Subject on the wire; the header is never regenerated, the next
    hop gets the message byte for byte after the Received field, and no Bcc recipient is added."""
    sink = await start_sink(ScriptedHandler())
    relay = await start_relay(tmp_path / "data", {"*": sink.port})
    try:
        data = (
            b"From: app@corp.test\r\n"
            b"Subject: =?UTF-8?Q?invoice=0ABcc:_victim@ext.test?=\r\n"
            b"Subject-Alt: =?UTF-8?B?eAoNQmNjOiB2aWN0aW1AZXh0LnRlc3Q=?=\r\n"
            b"\r\nbody\r\n"
        )
        code, _ = await send(relay, "app@corp.test", [f"user@{LOCAL}"], data)
        assert code == 250
        assert await wait_for(lambda: sink.handler.messages, timeout=10)
        (delivered,) = sink.handler.messages
        assert delivered["rcpt_tos"] == [f"user@{LOCAL}"]
        content = delivered["content"]
        assert content.endswith(data) and content.count(b"\r\nBcc:") == 0
    finally:
        await relay.stop()
        await sink.close()
