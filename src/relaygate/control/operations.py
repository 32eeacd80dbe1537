"""What changes a message: retry, suspend, resume, remove (with or without an NDR) and ``bulk``.

``MessageOperations`` adds to ``MessageReads`` Exchange's Retry-Message (Resubmit),
Suspend-Message, Resume-Message and Remove-Message [-WithNDR], and ``bulk``: one of them on
every message a Get-Message filter finds (``list_page``), a batch at a time. Each answers with
the message as it is afterwards (``message_view``) or raises ``NotFound`` / ``Conflict``. These
are the calls that write to the store, wake the delivery loop and queue NDRs, hence a module of
their own; Retry-Queue, which finds its messages by their delivery queue, is in ``queues``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from relaygate import replies
from relaygate.control.reads import MAX_LIST_LIMIT, MessageReads
from relaygate.control.views import _FINAL_VIEW, Conflict, NotFound, message_view
from relaygate.queue.bounce import DsnRecipient
from relaygate.queue.model import FINAL_STATUSES
from relaygate.queue.store import AddressPattern, MessageInFlightError

__all__ = ["BULK_ACTIONS", "BULK_FILTERS", "MessageOperations", "bulk_filter_problem"]

#: What ``bulk`` does to every message a filter matches (Get-Message -Filter | Retry-Message,
#: Suspend-Message, Resume-Message, Remove-Message).
BULK_ACTIONS = ("retry", "suspend", "resume", "remove")
#: ``bulk``'s filters, as the API and the CLI name them: at least one is required.
BULK_FILTERS = ("from", "to", "queue", "status")
#: Messages ``bulk`` changes at once (SQLite commits concurrent writes together).
_BULK_BATCH = 64


class MessageOperations(MessageReads):
    """The operations on one message, and ``bulk`` (see the module's docstring)."""

    async def retry(self, identity: str) -> dict[str, Any]:
        """Every unfinished recipient is due now (and routed again, which is Exchange's Resubmit)."""
        msg = await self._get(identity)
        if not msg.pending_recipients:
            raise Conflict(f"message {msg.queue_id} is {msg.status.value}: nothing to retry")
        try:
            await self.store.retry_now(msg.queue_id)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        self._queue_changed()
        if self.manager is not None:
            self.manager.wake(msg.queue_id)
        return await self._after(msg.queue_id)

    async def suspend(self, identity: str) -> dict[str, Any]:
        msg = await self._get(identity)
        if not msg.pending_recipients:
            raise Conflict(f"message {msg.queue_id} is {msg.status.value}: it cannot be suspended")
        try:
            await self.store.set_flags(msg.queue_id, suspended=True)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        self._queue_changed()
        return await self._after(msg.queue_id)

    async def resume(self, identity: str) -> dict[str, Any]:
        msg = await self._get(identity)
        try:
            await self.store.set_flags(msg.queue_id, suspended=False)
        except KeyError:
            raise NotFound(f"message {identity} not found") from None
        self._queue_changed()
        if self.manager is not None:
            self.manager.wake(msg.queue_id)
        return await self._after(msg.queue_id)

    async def remove(self, identity: str, *, with_ndr: bool = False) -> dict[str, Any]:
        """Delete the message. With ``with_ndr`` its unfinished recipients get an NDR
        (``550 4.3.2 QUEUE.Admin``), sent to the sender (never to ``<>``) and the admin address."""
        msg = await self._get(identity)
        data = b""
        if with_ndr:
            # The NDR and the tracking log read the header only: the body (a 30 MB scan) is
            # neither read nor kept while the removal and the NDR wait for the store (a bulk
            # runs 64 at once).
            try:
                data = await self._read_header(msg)
            except Exception:
                data = b""
        try:
            # Not while an attempt is under way: it could still deliver the message after the
            # sender was told it was deleted. Exchange marks it PendingRemove; here the admin is
            # told to wait, or to suspend it, which takes effect when the attempt ends.
            removed = await self.store.remove(msg.queue_id, unless_in_flight_at=self.clock())
        except MessageInFlightError:
            raise Conflict(
                f"message {msg.queue_id} is being delivered now (Active): remove it when this "
                "attempt has ended, or suspend it first (it stays suspended after the attempt)"
            ) from None
        if removed is None:
            raise NotFound(f"message {identity} not found")
        self._queue_changed()
        view = message_view(removed, self.config, now=self.clock())
        pending = [r for r in removed.recipients if r.status not in FINAL_STATUSES]
        ndr_id = None
        reply = replies.ADMIN_DELETED
        manager = self.manager
        if pending and manager is not None:
            addresses = [r.address for r in pending]
            if with_ndr:
                manager.track(
                    "FAIL",
                    "ADMIN",
                    removed,
                    recipients=addresses,
                    recipient_status=[reply.line()] * len(pending),
                    data=data,
                )
                ndr_id = await manager.send_dsn(
                    removed,
                    data,
                    [
                        DsnRecipient(
                            r.address, reply, last_attempt=r.last_attempt, last_error=r.last_error
                        )
                        for r in pending
                    ],
                    action="failed",
                )
            else:
                manager.track(
                    "DROP",
                    "ADMIN",
                    removed,
                    recipients=addresses,
                    recipient_status=[reply.line()] * len(pending),
                )
        view["Status"] = "Removed"
        return {"Removed": view, "WithNdr": with_ndr, "NdrQueueId": ndr_id}

    async def bulk(
        self,
        action: str,
        *,
        sender: str | None = None,
        recipient: str | None = None,
        queue: str | None = None,
        status: str | None = None,
        after: str | None = None,
        with_ndr: bool = False,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        """``action`` (BULK_ACTIONS) on every message ``list_page`` finds with these filters, at
        most MAX_LIST_LIMIT of them per call, as Exchange admins pipe ``Get-Message -Filter``
        into Suspend-Message, Resume-Message, Remove-Message [-WithNDR] or Retry-Message.

        A filter (``sender``, ``recipient``, ``queue`` or ``status``) is required: ``ValueError``
        naming them without one (``after`` alone is no filter, nor an address pattern that
        matches every address: ``*``, ``*@*``, as ``--from "*$DOMAIN"`` with DOMAIN unset gives,
        nor a filter given empty, as ``--from "$SENDER"`` gives), so that nobody empties the queue
        by accident; ``ValueError`` naming the parameter for a bad value, as ``list_page``.
        ``dry_run``: change nothing, say what would be acted on.

        Returns ``{"server", "action", "dry_run", "with_ndr", "matched", "done", "would_do", "skipped":
        [{"identity", "reason"}], "identities": [...], "ndrs", "limit_reached",
        "next_after"}``: ``identities`` are those acted on (in a dry run: those it would act on, ``would_do``
        their number, and ``done`` 0); ``skipped``, what the action did not apply to (in a dry
        run: would not, as far as the messages' state now tells) and why: a message being delivered
        (Active) is not removed (the single remove says 409), an already suspended one is not
        suspended again, a suspended one is not retried (resume it), one not suspended is not
        resumed, a finished one is neither retried nor suspended, one removed meanwhile is
        gone. ``limit_reached``: MAX_LIST_LIMIT messages were looked at or matched and more may
        match past ``next_after``: call again with ``after=next_after``."""
        if action not in BULK_ACTIONS:
            raise ValueError(f"unknown action {action!r}; use one of {', '.join(BULK_ACTIONS)}")
        problem = bulk_filter_problem(
            action, sender=sender, recipient=recipient, queue=queue, status=status
        )
        if problem is not None:
            raise ValueError(problem)
        if with_ndr and action != "remove":
            raise ValueError("with_ndr applies to remove only")

        def clean(value: str | None) -> str | None:
            return value.strip() if value is not None and value.strip() else None

        page = await self.list_page(
            limit=MAX_LIST_LIMIT,
            after=after,
            sender=clean(sender),
            recipient=clean(recipient),
            queue=clean(queue),
            status=clean(status),
        )
        server = str(self.config.server.name)
        views = page.messages
        done: list[str] = []
        would: list[str] = []  # a dry run's
        skipped: list[dict[str, str]] = []
        ndrs = 0
        if dry_run:  # what the real call would skip, as far as the messages' state now tells
            for v in views:
                reason = _skip_reason(action, v)
                if reason is None:
                    would.append(v["Identity"])
                else:
                    skipped.append({"identity": v["Identity"], "reason": reason})
        else:
            outcomes: list[tuple[str, str | None, bool]] = []
            for start in range(0, len(views), _BULK_BATCH):
                batch = views[start : start + _BULK_BATCH]
                outcomes += await asyncio.gather(
                    *(self._bulk_one(action, v, with_ndr) for v in batch)
                )
            for identity, reason, ndr in outcomes:
                if reason is None:
                    done.append(identity)
                    ndrs += ndr
                else:
                    skipped.append({"identity": identity, "reason": reason})
            if done and action in ("retry", "resume") and self.manager is not None:
                self.manager.wake()
        return {
            "server": server,
            "action": action,
            "dry_run": dry_run,
            "with_ndr": with_ndr,
            "matched": len(views),
            "done": len(done),
            "skipped": skipped,
            "would_do": len(would),
            "identities": would if dry_run else done,
            "ndrs": ndrs,
            "limit_reached": page.next_after is not None,
            "next_after": page.next_after,
        }

    async def _bulk_one(
        self, action: str, view: dict[str, Any], with_ndr: bool
    ) -> tuple[str, str | None, bool]:
        """(identity, why it was skipped or None when done, whether an NDR was queued)."""
        identity, qid = view["Identity"], view["QueueId"]
        if action != "remove" and (reason := _skip_reason(action, view)) is not None:
            return identity, reason, False
        try:
            if action == "remove":
                body = await self.remove(qid, with_ndr=with_ndr)
                return identity, None, bool(body["NdrQueueId"])
            if action == "suspend":
                await self.store.set_flags(qid, suspended=True)
            elif action == "resume":
                await self.store.set_flags(qid, suspended=False)
            else:  # retry
                await self.store.retry_now(qid)
        except Conflict as exc:
            return identity, str(exc), False
        except (NotFound, KeyError):
            return identity, "not found: removed meanwhile", False
        self._queue_changed()
        return identity, None, False


def bulk_filter_problem(
    action: str,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    queue: str | None = None,
    status: str | None = None,
) -> str | None:
    """Why these filters cannot select a bulk ``action``, or None: at least one filter is
    required, an address pattern that matches every address (``*``, ``*@*``, as
    ``--from "*$DOMAIN"`` with DOMAIN unset gives) does not count as one, and a filter given
    empty (None is not given) is refused. The admin centre asks before it shows its bulk
    buttons (with its empty form fields as None)."""
    filters = {"from": sender, "to": recipient, "queue": queue, "status": status}
    given = [v for v in filters.values() if v is not None and v.strip()]
    # Given but empty (``--from "$SENDER"`` with SENDER unset): dropping it would widen the
    # action to what the other filters match (``status=Retry&from=`` was every Retry message).
    empty = [name for name, v in filters.items() if v is not None and not v.strip()]
    match_all = _match_all(from_=sender, to=recipient)
    if given and not empty and len(match_all) < len(given):
        return None
    why = "".join(
        f"; {name} {value!r} matches every message, which is no filter (to act on every "
        "message of a status, give status)"
        for name, value in match_all
    )
    why += "".join(f"; {name} is empty, which is no filter" for name in empty)
    return (
        f"a bulk {action} needs at least one filter: "
        f"{', '.join(BULK_FILTERS)} (to act on one message, give its identity){why}"
    )


def _skip_reason(action: str, view: dict[str, Any]) -> str | None:
    """Why ``action`` does not apply to the message ``view`` shows, or None. A remove is only
    refused for a message being delivered (the store says so at the time; this is the dry
    run's reading of it)."""
    status = view["Status"]
    finished = status in _FINAL_VIEW
    if action == "remove":
        if status == "Active":
            return "being delivered now (Active): remove it when this attempt has ended"
        return None
    if action == "suspend":
        if finished:
            return f"message is {status}: it cannot be suspended"
        if view["Suspended"]:
            return "already suspended"
    elif action == "resume":
        if not view["Suspended"]:
            return "not suspended"
    else:  # retry
        if finished:
            return f"message is {status}: nothing to retry"
        if view["Suspended"] or status == "Suspended":
            return "suspended: resume it first (Resume-Message)"
    return None


def _match_all(**patterns: str | None) -> list[tuple[str, str]]:
    """(parameter, value) of the address patterns given that match every address (``*``,
    ``*@*``): ``bulk`` does not count them as a filter. A bad pattern is left to ``list_page``,
    which names it."""
    out: list[tuple[str, str]] = []
    for name, value in patterns.items():
        if value is None or not value.strip():
            continue
        name = name.rstrip("_")
        try:
            if AddressPattern.parse(value, name=name).matches_all:
                out.append((name, value.strip()))
        except ValueError:
            continue
    return out
