"""Exchange's retry and expiry timeline as a pure schedule (exchange-semantics.md §7.3).

After a failed attempt (a 4xx, a DNS failure, no route...) the recipient is retried
``transient_failure_retry_count`` times, ``transient_failure_retry_interval`` apart; after that every
``message_retry_interval``. A delay notification (DSN ``Action: delayed``) is sent once when a
recipient is still pending ``delay_notification_timeout`` after the message arrived, and the message
expires ``message_expiration_timeout`` after its arrival (NDR ``550 4.4.7 QUEUE.Expired``).

Everything here is a function of numbers (unix times, seconds): no clock, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

__all__ = ["RetrySchedule"]


def _seconds(value: Any) -> float:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """The ``[queue]`` timings, in seconds."""

    transient_interval: float = 300.0
    transient_count: int = 6
    message_interval: float = 600.0
    delay_notification: float = 4 * 3600.0
    expiration: float = 2 * 86400.0

    @classmethod
    def from_config(cls, queue: Any) -> RetrySchedule:
        """From a ``QueueConfig`` (``config.queue``)."""
        return cls(
            transient_interval=_seconds(queue.transient_failure_retry_interval),
            transient_count=int(queue.transient_failure_retry_count),
            message_interval=_seconds(queue.message_retry_interval),
            delay_notification=_seconds(queue.delay_notification_timeout),
            expiration=_seconds(queue.message_expiration_timeout),
        )

    def interval_after(self, attempts: int) -> float:
        """The wait after the ``attempts``-th failed attempt (1 = the first attempt failed)."""
        if attempts <= self.transient_count:
            return self.transient_interval
        return self.message_interval

    def expires_at(self, received_at: float) -> float:
        return received_at + self.expiration

    def delay_notice_at(self, received_at: float) -> float:
        return received_at + self.delay_notification

    def is_expired(self, received_at: float, now: float) -> bool:
        return now >= self.expires_at(received_at)

    def delay_notice_due(self, received_at: float, now: float, already_sent: bool) -> bool:
        """True once per message: pending past delay_notification_timeout, not yet expired.

        With a delay timeout at or past the expiration nothing is sent (the NDR says it all)."""
        if already_sent or self.delay_notification >= self.expiration:
            return False
        return self.delay_notice_at(received_at) <= now < self.expires_at(received_at)

    def next_attempt(
        self, attempts: int, now: float, received_at: float, *, delay_notified: bool = True
    ) -> float:
        """When to try again after the ``attempts``-th failure at ``now``.

        Never later than the expiry (the message must expire on time) nor, while the delay notice is
        still owed, than the moment it falls due (it is sent after that attempt).
        """
        return self.not_later_than(
            now + self.interval_after(attempts), now, received_at, delay_notified=delay_notified
        )

    def not_later_than(
        self, when: float, now: float, received_at: float, *, delay_notified: bool = True
    ) -> float:
        """``when``, brought forward to the expiry and, while the delay notice is still owed, to
        the moment it falls due (a paced recipient waits for its send connector's window, but
        time's own events still come on time)."""
        when = min(when, self.expires_at(received_at))
        if not delay_notified and self.delay_notification < self.expiration:
            notice = self.delay_notice_at(received_at)
            if notice > now:
                when = min(when, notice)
        return when
