"""How the queue manager sends a route's recipients over SMTP, and the bytes it sends: signed
with DKIM as they go on the wire (`_sign`), rewritten for a send connector's ``send_as``
(`_sent_as`), then one SMTP transaction through the route's next hops (`_send`, the client of
relaygate.delivery.client).

Kept apart from the routing that decides which route a recipient takes (manager_routes.py) and
from the pacing that decides when (manager_pacing.py): both send through these.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from relaygate.delivery.client import deliver
from relaygate.delivery.routing import RouteKey
from relaygate.delivery.send_as import rewrite_headers
from relaygate.delivery.wire import prepare_data
from relaygate.queue.manager_outcomes import RouteResult, classify, size_for_limits
from relaygate.queue.manager_tracking import _Tracking
from relaygate.queue.model import NOT_SIGNED, SMTPUTF8, StoredMessage
from relaygate.replies import DELIVERY_FAILED_INTERNAL

log = logging.getLogger("relaygate.queue")


class _Sending(_Tracking):
    """A mixin of `QueueManager`: signing, send_as, and the SMTP transaction of a route."""

    async def _sent_as(
        self, msg: StoredMessage, data: bytes, crlf_only: bool, groups: Any
    ) -> dict[str, bytes]:
        """The bytes for the routes whose send connector has ``send_as``, by that address: From
        and Sender rewritten (relaygate.delivery.send_as), then signed as that sender."""
        out: dict[str, bytes] = {}
        for key in groups:
            send_as = _send_as(key)
            if send_as and send_as not in out:
                rewritten = rewrite_headers(prepare_data(data, crlf_only=crlf_only), send_as)
                if self.signer is not None:
                    rewritten = await self._sign(msg, rewritten, envelope_sender=send_as)
                out[send_as] = rewritten
        return out

    async def _sign(
        self, msg: StoredMessage, data: bytes, *, envelope_sender: str | None = None
    ) -> bytes:
        refused = msg.metadata.get(NOT_SIGNED)
        if refused:  # received from a client that may not send as the organisation
            self._track_signing(msg, data, f"DKIM unsigned: not signed: {refused}")
            return data
        sender = msg.sender if envelope_sender is None else envelope_sender
        try:
            result = await asyncio.to_thread(self.signer.sign, data, envelope_sender=sender)
        except Exception:
            log.exception("message %s: DKIM signing failed; sent unsigned", msg.queue_id)
            return data
        if result.signed:
            info = f"DKIM signed d={result.domain} s={result.selector}"
            if result.subdomain:
                info += f" for {result.subdomain} (subdomains = true)"
        else:
            info = f"DKIM unsigned: {result.reason}"
            # DEBUG, not INFO: at INFO every message from a domain without a key wrote a service
            # log line (thousands an hour from a busy printer domain); the tracking log has it.
            log.debug("message %s: %s", msg.queue_id, result.reason)
        self._track_signing(msg, data, info)
        return bytes(result.data)

    async def _send(
        self,
        msg: StoredMessage,
        connector: Any,
        hops: Any,
        credentials: Any,
        addrs: list[str],
        data: bytes,
        crlf_only: bool,
    ) -> list[RouteResult]:
        """One SMTP transaction for ``addrs`` through the route's next hops."""
        name = str(connector.name)
        helo = getattr(connector, "fqdn", None) or self.config.server.fqdn
        outcome_ = await deliver(
            hops,
            connector=connector,
            helo_name=helo,
            sender=getattr(connector, "send_as", "") or msg.sender,
            recipients=addrs,
            data=data,
            credentials=credentials,
            timeout=self.delivery_timeout,
            pool=self.pool,
            crlf_only=crlf_only,
            size=size_for_limits(msg),
            smtputf8=msg.metadata.get(SMTPUTF8) == "1",
            log_privacy=self.log_privacy,
        )
        host, ip = _split_hop(outcome_.hop_used)
        if not host and outcome_.transcript_errors:
            host, ip = _split_hop(outcome_.transcript_errors[0].partition(": ")[0])
        out = []
        for a in addrs:
            reply = outcome_.per_recipient.get(a, DELIVERY_FAILED_INTERNAL)
            out.append(RouteResult(a, reply, classify(reply), name, host, ip))
        return out


def _split_hop(label: str | None) -> tuple[str, str]:
    """``host[ip]:port`` / ``[ip]:port`` → (host, ip)."""
    if not label:
        return "", ""
    host, _, rest = label.partition("[")
    ip = rest.partition("]")[0]
    return host or ip, ip


def _send_as(key: RouteKey) -> str:
    """The ``send_as`` of a route's send connector ("" for none, and for the Unreachable queue)."""
    return "" if key.is_unreachable else str(getattr(key.connector, "send_as", "") or "")
