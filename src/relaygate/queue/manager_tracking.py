"""The queue manager's writes to the message tracking log (exchange-semantics.md §6.3): one
event about a message (`track`), any event (`_write`), and the signing decision (AGENTINFO).

Kept apart because every other part writes events (the results SEND / DEFER / FAIL, the reports
DSN, the signing AGENTINFO) and a failing log must never stop mail: that rule is here, once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from relaygate.queue.bounce import header_value
from relaygate.queue.manager_state import _ManagerState
from relaygate.queue.model import RecipientState, StoredMessage

log = logging.getLogger("relaygate.queue")

#: How many (message, signing decision) pairs `_track_signing` remembers as logged: more than the
#: messages a queue retries at once, a few MB at most.
SIGNING_LOGGED_LIMIT = 50_000


class _Tracking(_ManagerState):
    """A mixin of `QueueManager`: its tracking-log events."""

    def _write(self, event_id: str, source: str, **fields: Any) -> None:
        if self.tracking is None:
            return
        try:
            self.tracking.write(event_id, source, **fields)
        except Exception:  # the log must never stop mail
            log.exception("message tracking log write failed")

    def track(
        self,
        event_id: str,
        source: str,
        msg: StoredMessage,
        *,
        recipients: Iterable[str],
        recipient_status: Iterable[str],
        data: bytes = b"",
        **fields: Any,
    ) -> None:
        """Write one tracking event about ``msg``."""
        self._write(
            event_id,
            source,
            internal_message_id=msg.queue_id,
            message_id=msg.message_id,
            recipients=list(recipients),
            recipient_status=list(recipient_status),
            sender=msg.sender,
            return_path=msg.sender,
            total_bytes=msg.size,
            message_subject=header_value(data, "Subject") if data else "",
            **fields,
        )

    def _track_signing(self, msg: StoredMessage, data: bytes, info: str) -> None:
        """Every signing decision goes to the tracking log (AGENTINFO, as Exchange's agents do),
        so `relaygate trace` answers "why did this arrive unsigned?". Once per message and
        decision: signing runs on every delivery attempt, and Exchange's agents write theirs once
        as the message passes them (a message retried 50 times had 50 copies of the same note)."""
        key = (msg.queue_id, info)
        logged = self._signing_logged
        if key in logged:
            return
        logged[key] = None
        if len(logged) > SIGNING_LOGGED_LIMIT:
            # Bounded memory: a message this far back writes its note again (harmless).
            del logged[next(iter(logged))]
        self.track(
            "AGENTINFO",
            "AGENT",
            msg,
            recipients=[r.address for r in msg.recipients],
            recipient_status=[],
            data=data,
            custom_data=info,
        )

    def _track_poison(
        self, msg: StoredMessage, pending: Iterable[RecipientState], reason: str
    ) -> None:
        """A message whose stored bytes are damaged was suspended (Exchange's poison queue):
        POISONMESSAGE, with the reason for each recipient still pending, so `relaygate trace`
        answers "why was this never delivered?". Written where it is suspended: once."""
        addresses = [r.address for r in pending]
        self.track(
            "POISONMESSAGE",
            "QUEUE",
            msg,
            recipients=addresses,
            recipient_status=[f"Message suspended: {reason}"] * len(addresses),
        )
