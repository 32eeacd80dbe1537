"""A stale extra reply that arrives after a pooled session was taken and the next message's
MAIL/RCPT/DATA group written is read as MAIL's reply; every reply shifts by one, and when the
last recipient is refused, DATA "gets" its 550: a recipient the hop accepted must not bounce."""

from __future__ import annotations

from pathlib import Path

from relaygate.queue.model import RecipientStatus
from tests.delivery.test_chaos import BODY, SENDER, Case, chaos_relay, send, wait_for
from tests.support.chaos_sink import Reply


async def test_a_late_extra_reply_after_reuse_does_not_bounce_an_accepted_recipient(
    tmp_path: Path,
) -> None:
    late = Reply(b"250 2.6.0 Queued\r\n250 2.0.0 stale\r\n", chunk=18, delay=0.35)
    case = Case(
        "late",
        lambda p, c, n: late if p == "dot" and c == 1 and n == 1 else None,
        sink={"rcpt_replies": {"no@example.com": b"550 5.1.1 no such user\r\n"}},
    )
    async with chaos_relay(tmp_path, case) as (relay, chaos, _ndr):
        await send(relay, SENDER, ["first@example.com"], BODY)

        async def one() -> bool:
            msgs = [m for m in await relay.store.list_messages() if m.sender == SENDER]
            return len(msgs) == 1 and all(r.status.is_final for r in msgs[0].recipients)

        await wait_for(one, timeout=10)
        await send(relay, SENDER, ["ok@example.com", "no@example.com"], BODY)

        async def two() -> bool:
            msgs = [m for m in await relay.store.list_messages() if m.sender == SENDER]
            return len(msgs) == 2 and all(r.status.is_final for m in msgs for r in m.recipients)

        await wait_for(two, timeout=10)
        msgs = [m for m in await relay.store.list_messages() if m.sender == SENDER]
        got = {r.address: (r.status, r.last_error) for m in msgs for r in m.recipients}
        # the second message went first on the pooled session
        assert sum(c.startswith(b"MAIL") for c in chaos.commands[0]) == 2, chaos.commands
        assert got["ok@example.com"][0] == RecipientStatus.DELIVERED, got
        assert got["no@example.com"][0] == RecipientStatus.FAILED, got
