"""The transport: the HTTP clients of the Graph send connectors, kept between messages, and one
delivery attempt (`GraphTransport.deliver`) from the message's octets to a reply per recipient.

The entry point the queue manager uses; it picks the path (plain sendMail, draft, large message),
gets the token (asking a new one once on a 401) and turns the outcome into `GraphOutcome`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from relaygate.delivery.graph.calls import _Caller, _user_url
from relaygate.delivery.graph.connector import DEFAULT_ENDPOINT, graph_host
from relaygate.delivery.graph.drafts import _CONFIRMED, DraftRecord, _DraftJob
from relaygate.delivery.graph.errors import NO_MAILBOX, _clean, _GraphError
from relaygate.delivery.graph.large_messages import _off_loop, large_plan
from relaygate.delivery.graph.limits import DECODED_ATTACHMENTS
from relaygate.delivery.graph.recipients import message_id, recipient_plan
from relaygate.delivery.oauth import TokenError
from relaygate.logs.privacy import AddressPrivacy
from relaygate.replies import Reply

#: The package's one logger (its records named as before the split into modules).
log = logging.getLogger("relaygate.delivery.graph")

# httpx's request lines (an upload URL carries its own authorization) are held back by the
# service log's setup, in every process: relaygate.logs.service.QUIET_LOGGERS.


@dataclass
class GraphOutcome:
    """One attempt's result: a reply per recipient, as `DeliveryOutcome` has.

    retry_after: Graph's Retry-After in seconds (a lower bound on the next attempt), when given.
    host: the Graph host (the tracking log's server-hostname).
    """

    per_recipient: dict[str, Reply]
    host: str = ""
    retry_after: float | None = None
    errors: list[str] = field(default_factory=list)


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca_file:
        ctx.load_verify_locations(cafile=ca_file)
    return ctx


class GraphTransport:
    """The HTTP clients of the Graph send connectors (one per endpoint and CA file, kept alive
    between messages). ``aclose`` when the manager stops or the connectors change."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], Any] = {}
        self._lock = asyncio.Lock()
        self._busy = 0  # deliveries in flight
        self._idle = asyncio.Event()
        self._idle.set()
        #: DECODED_ATTACHMENTS: taken while a decoded attachment is held (decode and upload)
        self._decoded = asyncio.Semaphore(DECODED_ATTACHMENTS)
        #: when each mailbox's Sent Items was last found unreadable, as warned about (monotonic)
        self._unreadable: dict[str, float] = {}

    async def _client(self, connector: Any) -> Any:
        import httpx  # imported on first use: only Graph connectors need it

        ca = getattr(connector, "tls_ca_file", None)
        key = (graph_host(connector), str(ca) if ca else "")
        async with self._lock:
            client = self._clients.get(key)
            if client is None:
                # Loading the trust store takes ~20 ms: not on the event loop.
                ctx = await asyncio.to_thread(_tls_context, key[1] or None)
                # trust_env: HTTPS_PROXY / NO_PROXY as msal's token requests honour them (a
                # network whose only way out is a proxy); the trust store stays ctx.
                client = self._clients[key] = httpx.AsyncClient(
                    verify=ctx, follow_redirects=False, trust_env=True
                )
            return client

    async def retire(self) -> None:
        """Close the clients once the deliveries in flight are over (a reload: cutting a request
        Graph may already have acted on would send the message again at the retry)."""
        try:
            await self._idle.wait()
        finally:  # cancelled (a stop past its grace): closed all the same
            await self.aclose()

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            try:
                await client.aclose()
            except Exception:  # pragma: no cover - closing must never raise
                pass

    async def deliver(
        self,
        connector: Any,
        *,
        token_provider: Callable[[], Awaitable[str]] | None,
        mailbox: str,
        recipients: Iterable[str],
        data: bytes,
        timeout: float,
        log_privacy: AddressPrivacy | None = None,
        drafts: DraftRecord | None = None,
    ) -> GraphOutcome:
        """One attempt for `recipients` through Graph (see the package docstring).
        ``log_privacy``: ``server.log_address_privacy`` for the service log's lines, which name the
        mailbox (the envelope sender when no graph_mailbox or send_as is set). ``drafts``: where
        the draft of this route is remembered between attempts (None: not at all)."""
        self._busy += 1
        self._idle.clear()
        try:
            return await self._deliver(
                connector,
                token_provider=token_provider,
                mailbox=mailbox,
                recipients=recipients,
                data=data,
                timeout=timeout,
                log_privacy=log_privacy,
                drafts=drafts,
            )
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _deliver(
        self,
        connector: Any,
        *,
        token_provider: Callable[[], Awaitable[str]] | None,
        mailbox: str,
        recipients: Iterable[str],
        data: bytes,
        timeout: float,
        log_privacy: AddressPrivacy | None = None,
        drafts: DraftRecord | None = None,
    ) -> GraphOutcome:
        rcpts = list(dict.fromkeys(recipients))
        host = graph_host(connector)
        outcome = GraphOutcome(per_recipient={}, host=host)
        if not rcpts:
            return outcome

        def every(reply: Reply) -> GraphOutcome:
            outcome.per_recipient = {r: reply for r in rcpts}
            return outcome

        if not mailbox:
            return every(NO_MAILBOX)
        large = await _off_loop(large_plan, data, octets=len(data))
        if isinstance(large, Reply):
            return every(large)
        if token_provider is None:  # pragma: no cover - the manager builds one per connector
            return every(Reply(451, "4.7.0", "Microsoft Graph: no token provider"))
        if large is None:
            plan = recipient_plan(data, rcpts)
            body = base64.b64encode(data)
        else:  # the draft path always, its recipients set from the envelope
            plan = recipient_plan(data, rcpts, always=True)
            body = base64.b64encode(large.rest)
        client = await self._client(connector)
        base = str(getattr(connector, "graph_endpoint", "") or DEFAULT_ENDPOINT).rstrip("/")
        user = _user_url(base, mailbox)
        logged = mailbox if log_privacy is None else log_privacy.text(mailbox)
        msg_id = message_id(data)
        refreshed = False
        while True:
            try:
                token = await token_provider()
            except TokenError as exc:
                log.error("%s", exc)
                outcome.errors.append(str(exc))
                return every(
                    Reply(451, "4.7.0", f"SMTPSEND.Auth.TokenUnavailable; {_clean(str(exc))}")
                )
            call = _Caller(client, token, mailbox, timeout)
            job = _DraftJob(call, base, drafts, self._decoded, logged, msg_id, rcpts)
            job.unreadable = self._unreadable
            try:
                if large is not None and plan is not None:
                    how = await job.run(user, body, plan, data, large.parts)
                elif plan is None:
                    how = await job.send_mail(user, body)
                else:
                    how = await job.run(user, body, plan)
            except _GraphError as failure:
                if failure.status == 401 and not refreshed:
                    refreshed = True
                    log.info("Microsoft Graph refused the token for %s; asking a new one", logged)
                    await _invalidate(token_provider, token)
                    continue
                line = failure.reply.line()
                if log_privacy is not None:
                    line = log_privacy.text(line)
                log.info("Microsoft Graph delivery as %s failed: %s", logged, line)
                outcome.errors.append(f"{host}: {failure.reply.line()}")
                outcome.retry_after = failure.retry_after
                return every(failure.reply)
            if how == _CONFIRMED:
                return every(
                    Reply(
                        250,
                        "2.6.0",
                        f"Microsoft Graph had sent the {job.what} of an earlier attempt whose "
                        f"answer was lost (confirmed by lookup: {job.confirmed}; as {job.mailbox})",
                    )
                )
            return every(
                Reply(250, "2.6.0", f"202 Accepted by Microsoft Graph ({how} as {mailbox})")
            )


async def _invalidate(token_provider: Any, token: str) -> None:
    """Drop the refused `token` from the provider's cache (if it is still the cached one)."""
    invalidate = getattr(token_provider, "invalidate", None)
    if invalidate is not None:
        await invalidate(token)
