"""A delivery run that meets a store failure which is not the message's fault: the message is
tried again, never suspended as damaged."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from tests.queue_manager.helpers import send, wait_for
from tests.queue_manager.test_tracking_events import SENDER, defer_first, events, relay_and_sink
from tests.support.descriptors import descriptors_spent

BIG = (
    b"From: Scanner <scanner@senders.test>\r\n"
    b"Subject: Scan 7\r\n"
    b"\r\n" + b"scan data line\r\n" * 8000  # 128 KB: a spool file of its own
)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_a_big_message_read_while_descriptors_are_spent_is_delivered_after(
    tmp_path: Path,
) -> None:
    """Out of descriptors (a connection flood) when a retry reads a spooled message: before, its
    spool file's EMFILE read as a damaged message, suspended (poison) until an administrator
    resumed it. Now the run ends with a warning, and the message is
    delivered once descriptors are free again."""
    records = _Records()
    queue_log = logging.getLogger("relaygate.queue")
    queue_log.addHandler(records)
    try:
        async with relay_and_sink(tmp_path, defer_first(1)) as (relay, sink):
            await send(relay, SENDER, ["bob@example.com"], BIG)
            (defer,) = await wait_for(lambda: events(relay, "DEFER"))
            queue_id = defer["internal-message-id"]
            assert relay.manager is not None
            store = relay.manager.store
            # Every reader thread has its database connection: the spool file is what is opened.
            await asyncio.gather(*(store.get(queue_id) for _ in range(8)))

            def said() -> list[logging.LogRecord]:
                return [r for r in records.records if queue_id in r.getMessage()]

            with descriptors_spent():
                (record,) = await wait_for(said, timeout=20)
            assert "Too many open files" in record.getMessage(), record.getMessage()
            assert record.levelno == logging.WARNING and record.exc_info is None
            (got,) = await wait_for(lambda: sink.handler.messages, timeout=20)
            assert got["content"].endswith(BIG)
            msg = await store.get(queue_id)
            assert msg is not None and not msg.suspended
    finally:
        queue_log.removeHandler(records)
