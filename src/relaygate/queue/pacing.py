"""Pacing to an upstream's quota: a send connector's ``max_messages_per_minute`` and
``max_recipients_per_day`` as :class:`SendLimit` budgets for ``Store.reserve_send``.

The budget is counted in the queue store, so every worker process of a node and every node of a
cluster (``queue.store = "postgresql"``) share it, as the quota belongs to the upstream mailbox.
The queue manager reserves a slot before each SMTP transaction through a limited connector; a
transaction that does not fit is not attempted: its recipients stay queued (Retry) until the
window frees, without using up a retry. One that fits only in part (fewer recipients left in the
day's budget than it has) takes what is left: its first recipients go now, the rest wait (so a
message to many recipients is not starved by small ones taking each freed slot). With an
``overflow_connector``, what the budget holds back goes through that send connector instead
(and on through its own). A connector without limits costs nothing: no store call.

Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Any

from relaygate import replies
from relaygate.queue.model import SendLimit
from relaygate.replies import Reply

__all__ = [
    "MESSAGE_WINDOW",
    "RECIPIENT_WINDOW",
    "batches",
    "budget_key",
    "describe",
    "is_paced",
    "limits_for",
    "paced_reply",
]

#: max_messages_per_minute's rolling window, in seconds (module constants so that tests can
#: shorten them; not configuration keys).
MESSAGE_WINDOW = 60.0
#: max_recipients_per_day's rolling window, in seconds.
RECIPIENT_WINDOW = 86400.0


def limits_for(connector: Any) -> tuple[SendLimit, ...]:
    """The connector's budgets; empty when it has no limit (the usual case)."""
    per_minute = getattr(connector, "max_messages_per_minute", None)
    per_day = getattr(connector, "max_recipients_per_day", None)
    out: list[SendLimit] = []
    if per_minute is not None:
        out.append(SendLimit(MESSAGE_WINDOW, max_messages=int(per_minute)))
    if per_day is not None:
        out.append(SendLimit(RECIPIENT_WINDOW, max_recipients=int(per_day)))
    return tuple(out)


def budget_key(connector: Any) -> str:
    """The store's name for the connector's budget (connector names are unique, any case)."""
    return "send_connector:" + str(connector.name).lower()


def batches(addresses: list[str], connector: Any) -> list[list[str]]:
    """The transactions a route's recipients go in: one, unless they are more than
    ``max_recipients_per_day`` (they could never fit one day's budget): then batches of at most
    that many, each reserved and sent on its own, the later ones when the window allows (a batch
    that fits only in part sends its first recipients, ``Store.reserve_send(partial=True)``)."""
    per_day = getattr(connector, "max_recipients_per_day", None)
    if per_day is None or len(addresses) <= per_day:
        return [addresses]
    return [addresses[i : i + per_day] for i in range(0, len(addresses), per_day)]


def paced_reply(connector: Any, limit: SendLimit) -> Reply:
    """The LastError of a recipient held back by ``limit``."""
    if limit.max_messages is not None:
        return replies.send_connector_paced(
            str(connector.name), "max_messages_per_minute", limit.max_messages
        )
    return replies.send_connector_paced(
        str(connector.name), "max_recipients_per_day", int(limit.max_recipients or 0)
    )


def is_paced(last_error: str) -> bool:
    """A LastError written by pacing (see :func:`paced_reply`)."""
    return last_error.partition(" ")[2].partition(" ")[2].startswith(replies.PACED_PREFIX)


def describe(connector: Any) -> str:
    """The connector's limits for people (admin centre, ``explain``, ``send-connector list``):
    ``"30 messages/minute, 10000 recipients/day"``, or ``"unlimited"``; with an
    ``overflow_connector``: ``"..., then via "ESP" (overflow_connector)"``."""
    parts = []
    per_minute = getattr(connector, "max_messages_per_minute", None)
    per_day = getattr(connector, "max_recipients_per_day", None)
    if per_minute is not None:
        parts.append(f"{per_minute} messages/minute")
    if per_day is not None:
        parts.append(f"{per_day} recipients/day")
    overflow = getattr(connector, "overflow_connector", "") or ""
    if parts and overflow:  # (without limits nothing is ever held back: no overflow)
        parts.append(f'then via "{overflow}" (overflow_connector)')
    return ", ".join(parts) or "unlimited"
