"""The floor with RelayGate's own parts on its hot path (`bench/floor_server.py --parts ...`).

bench/floor.py showed that the floor, the least a durable Python relay does, runs at 2.2× Postfix
at 1 session and 4.2× at 10, and RelayGate at 0.33–0.55× of the floor. This module answers the
next question: if the receive, queue and delivery orchestration were rebuilt as lean as the floor's,
could it carry the work RelayGate must keep per message and still meet the targets? Each part is
RelayGate's real code, called the way RelayGate calls it:

- ``policy``: the command lines decoded and split as the session does; MAIL and RCPT parsed by
  `relaygate.addresses` and decided by `relaygate.policy.verdicts` against the benchmark's real
  receive connector and its session rights; the content checked for bare CR/LF, its header block
  scanned (`relaygate.smtp.message`), a Received header put first, an `Envelope` built, the
  Exchange replies of `relaygate.replies` (EHLO lines, the 250 with the queue id);
- ``logs``: the SMTP receive protocol log (`relaygate.logs.protocol`, every command and reply, as
  with ``protocol_logging_level = "Verbose"``) and the message tracking log
  (`relaygate.logs.tracking`: RECEIVE and SEND, with the fields RelayGate writes);
- ``store``: RelayGate's queue store (`relaygate.queue.sqlite_store.SqliteStore`, shared by the
  processes as the workers share it) instead of the journal: the message submitted leased before
  the 250, the recipient's result recorded and the lease dropped after delivery, in the store's
  own group-committed transactions.

What it does not have: RelayGate's session, queue manager and delivery client (the orchestration
that bench/floor.py measured as the gap), retries, failover, TLS, AUTH, limits and timeouts. The
delivery stays the floor's: one pooled connection per process, MAIL, RCPT and DATA pipelined.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from floor_server import Connected

from relaygate import replies
from relaygate.addresses import AddressError, parse_mail_from, parse_rcpt_to
from relaygate.config import load_config
from relaygate.delivery.wire import dot_stuff
from relaygate.logs.protocol import NULL_SESSION_LOG, ProtocolLog, receiving_message_info
from relaygate.logs.tracking import TrackingLog
from relaygate.policy.rights import session_rights
from relaygate.policy.verdicts import check_mail, check_rcpt
from relaygate.queue.bounce import header_value
from relaygate.queue.model import Envelope, RecipientState, RecipientStatus
from relaygate.queue.sqlite_store import SqliteStore
from relaygate.replies import Reply
from relaygate.smtp.counters import SmtpCounters
from relaygate.smtp.message import has_bare_cr_or_lf, received_header, scan_headers
from relaygate.smtp.server import ServerContext

PARTS = ("policy", "logs", "store")
LEASE_SECONDS = 1800.0


def parse_parts(text: str) -> frozenset[str]:
    """``all``, or a comma-separated subset of PARTS that holds ``policy``: the parts' session
    always does the policy part's work, and ``logs`` and ``store`` add to it."""
    wanted = set(PARTS) if text.strip() == "all" else {p.strip() for p in text.split(",") if p}
    unknown = wanted - set(PARTS)
    if unknown:
        raise ValueError(f"unknown part(s) {sorted(unknown)}; known: {', '.join(PARTS)}, all")
    if "policy" not in wanted:
        raise ValueError("the parts always include policy (logs and store add to it)")
    return frozenset(wanted)


def store_path(directory: Path) -> Path:
    return directory / "queue" / "queue.db"


def prepare_store(directory: Path) -> None:
    """Create the queue database once, before the processes fork: two first opens at the same
    time race on its schema ("database is locked"), as RelayGate's supervisor avoids too."""

    async def create() -> None:
        async with SqliteStore(store_path(directory)):
            pass

    asyncio.run(create())


class Parts:
    """What the sessions and the deliverer of one floor process share."""

    def __init__(self, names: frozenset[str], config_path: Path, directory: Path) -> None:
        self.names = names
        self.config = load_config(config_path)
        self.connector = self.config.receive_connectors[0]
        self.rights = session_rights(self.connector)
        self.fqdn = self.connector.fqdn or self.config.server.fqdn
        self.owner = f"floor-{id(self)}"
        self.protocol_log: ProtocolLog | None = None
        self.tracking: TrackingLog | None = None
        self.store: SqliteStore | None = None
        self.counters = SmtpCounters()  # what ServerContext.message_received counts for /metrics
        if "logs" in names:
            self.protocol_log = ProtocolLog(
                directory / "ProtocolLog", server_name=self.config.server.name
            )
            self.tracking = TrackingLog(
                directory / "MessageTracking", server_name=self.config.server.name
            )
        if "store" in names:
            self.store = SqliteStore(store_path(directory), shared_writers=True)
        c = self.connector
        # The EHLO lines after the greeting, as the session builds them for this connector.
        self.ehlo_tail = [f"SIZE {c.max_message_size}", "PIPELINING", "ENHANCEDSTATUSCODES"]
        self.ehlo_tail += ["8BITMIME", "SMTPUTF8"]

    async def open(self) -> None:
        if self.store is not None:
            await self.store.open()

    def session_log(self, local: tuple[str, int], client: tuple[str, int]) -> Any:
        if self.protocol_log is None:
            return NULL_SESSION_LOG
        return self.protocol_log.session(self.connector.name, local, client)

    def banner(self) -> str:
        return f"220 {self.fqdn} Microsoft ESMTP MAIL Service ready"


class PartsSession(asyncio.Protocol):
    """The floor's session with the parts' work on each command and message."""

    def __init__(self, parts: Parts, journal: Any, deliverer: Any) -> None:
        self.parts = parts
        self.journal = journal
        self.deliverer = deliverer
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.data: bytearray | None = None
        self.committing = False
        self.log: Any = NULL_SESSION_LOG
        self.client_ip = ""
        self.local: tuple[str, int] = ("", 0)  # read by message_received (tracking server-ip)
        self.helo = ""
        self.fqdn = parts.fqdn
        self.sender: Any = None
        self.recipients: list[str] = []
        self.messages = 0
        self.data_started = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.client_ip = peer[0]
        self.local = (local[0], local[1])
        self.log = self.parts.session_log((local[0], local[1]), (peer[0], peer[1]))
        banner = self.parts.banner()
        self.log.connect()
        self.log.sent(banner)
        self.log.info(self.parts.rights.log_tokens(), "Set Session Permissions")
        self.transport.write(banner.encode() + b"\r\n")

    def connection_lost(self, exc: Exception | None) -> None:
        self.log.disconnect("Remote")

    def reply(self, reply: Reply) -> None:
        assert self.transport is not None
        line = reply.line()
        self.transport.write(line.encode("utf-8", "replace") + b"\r\n")
        self.log.sent(line)

    def data_received(self, chunk: bytes) -> None:
        if self.data is None:
            self.buf += chunk
            self._commands()
            return
        start = max(0, len(self.data) - 5)
        self.data += chunk
        end = self.data.find(b"\r\n.\r\n", start)
        if end < 0:
            return
        content = bytes(self.data[2 : end + 2])  # without the CRLF put first, with the last CRLF
        self.buf += self.data[end + 5 :]
        self.data = None
        self.committing = True
        self._message(content)

    def _commands(self) -> None:
        while self.data is None and not self.committing and b"\r\n" in self.buf:
            raw, self.buf = self.buf.split(b"\r\n", 1)
            text = raw.decode("utf-8", "replace")
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            self.log.received(text)
            if verb == "EHLO":
                self._ehlo(arg.strip())
            elif verb == "HELO":
                self.helo = arg.strip()
                self.reply(Reply(250, "", f"{self.parts.fqdn} Hello [{self.client_ip}]"))
            elif verb == "MAIL":
                self._mail(arg)
            elif verb == "RCPT":
                self._rcpt(arg)
            elif verb == "DATA":
                self.reply(replies.START_MAIL_INPUT)
                self.data_started = time.monotonic()
                self.data = bytearray(b"\r\n")
                if self.buf:
                    body, self.buf = self.buf, b""
                    self.data_received(body)
            elif verb == "QUIT":
                self.reply(replies.CLOSING)
                assert self.transport is not None
                self.transport.close()
                return
            elif verb in ("RSET", "NOOP"):
                self.sender, self.recipients = None, []
                self.reply(replies.OK)
            else:
                self.reply(replies.UNRECOGNIZED_COMMAND)

    def _ehlo(self, domain: str) -> None:
        assert self.transport is not None
        self.helo = domain
        lines = [f"{self.parts.fqdn} Hello [{self.client_ip}]", *self.parts.ehlo_tail]
        out = [f"250-{line}\r\n" for line in lines[:-1]] + [f"250 {lines[-1]}\r\n"]
        self.transport.write("".join(out).encode())
        self.log.log_ehlo_reply(lines)

    def _mail(self, arg: str) -> None:
        p = self.parts
        try:
            sender, _params = parse_mail_from(arg)
        except AddressError as exc:
            self.reply(exc.reply)
            return
        verdict = check_mail(
            sender,
            rights=p.rights,
            connector=p.connector,
            accepted_domains=p.config.accepted_domains,
            authenticated=False,
        )
        if verdict.accepted:
            self.sender = sender
        self.reply(verdict.reply)

    def _rcpt(self, arg: str) -> None:
        p = self.parts
        try:
            rcpt, _params = parse_rcpt_to(arg)
        except AddressError as exc:
            self.reply(exc.reply)
            return
        verdict = check_rcpt(
            rcpt,
            rights=p.rights,
            connector=p.connector,
            accepted_domains=p.config.accepted_domains,
            accepted_count=len(self.recipients),
            authenticated=False,
        )
        if verdict.accepted:
            self.recipients.append(str(rcpt))
        self.reply(verdict.reply)

    def _message(self, content: bytes) -> None:
        p = self.parts
        if has_bare_cr_or_lf(content):
            self.reply(replies.BARE_LINEFEED)
            self._next()
            return
        scan = scan_headers(content)
        self.messages += 1
        local_id = f"{self.log.session_id};{self.messages}"
        header = received_header(
            helo=self.helo,
            client_ip=self.client_ip,
            fqdn=p.fqdn,
            connector=p.connector.name,
            protocol="ESMTP",
            queue_id=local_id.replace(";", "-"),
            recipient=self.recipients[0] if len(self.recipients) == 1 else None,
        )
        self.log.info(
            receiving_message_info(self.log.session_id, self.messages), "receiving message"
        )
        envelope = Envelope(
            sender=str(self.sender) if self.sender else "",
            recipients=self.recipients,
            client_ip=self.client_ip,
            connector=p.connector.name,
            helo=self.helo,
            message_id=scan.message_id,
            metadata={"session": local_id, "protocol": "ESMTP"},
        )
        self.sender, self.recipients = None, []
        data = header + content
        if p.store is not None:
            lease = (p.owner, time.time() + LEASE_SECONDS)
            submit = asyncio.ensure_future(p.store.submit(envelope, data, lease=lease))
            submit.add_done_callback(lambda f: self._accepted(f.result(), envelope, data, scan))
        else:
            queue_id = f"{id(envelope):016X}"
            self.journal.commit(data).add_done_callback(
                lambda _: self._accepted(queue_id, envelope, data, scan)
            )

    def _accepted(self, queue_id: str, envelope: Envelope, data: bytes, scan: Any) -> None:
        self.committing = False
        if self.transport is None or self.transport.is_closing():
            return
        p = self.parts
        elapsed = time.monotonic() - self.data_started
        message_id = scan.message_id or f"<{queue_id}@{p.fqdn}>"
        self.reply(replies.message_queued(queue_id, message_id, p.fqdn, len(data), elapsed))
        # RelayGate's own RECEIVE event: ServerContext.message_received reads only .tracking,
        # .config and .counters of its context (Parts has them) and .client_ip, .helo, .fqdn of
        # the session.
        ServerContext.message_received(p, queue_id, envelope, data, self)  # type: ignore[arg-type]
        if self.deliverer is not None:
            self.deliverer.todo.put_nowait((queue_id, envelope, data))
        self._commands()

    def _next(self) -> None:
        self.committing = False
        self._commands()


class PartsDeliverer(Connected):
    """The floor's deliverer (one pooled, pipelined connection) with the parts' bookkeeping."""

    def __init__(self, host: str, port: int, journal: Any, parts: Parts) -> None:
        super().__init__(host, port, helo=parts.fqdn)
        self.journal = journal
        self.parts = parts
        self.todo: asyncio.Queue[tuple[str, Envelope, bytes]] = asyncio.Queue()

    async def run(self) -> None:
        p = self.parts
        while True:
            queue_id, envelope, data = await self.todo.get()
            try:
                if self.writer is None:
                    await self._connect()
                assert self.writer is not None
                group = [f"MAIL FROM:<{envelope.sender}>"]
                group += [f"RCPT TO:<{r}>" for r in envelope.recipients]
                group.append("DATA")
                self.writer.write(("\r\n".join(group) + "\r\n").encode())
                answers = [await self._reply() for _ in group]
                if not answers[-1].startswith(b"354"):
                    raise ConnectionError(f"smart host refused: {answers!r}")
                self.writer.write(dot_stuff(data) + b".\r\n")
                final = await self._reply()
                if not final.startswith(b"250"):
                    raise ConnectionError("smart host refused the message")
            except (OSError, ConnectionError):
                self.writer = None  # no retry: the benchmark counts at the sink
                continue
            line = final.decode("utf-8", "replace").rstrip("\r\n")
            now = time.time()
            if p.store is not None:
                results = [
                    RecipientState(r, RecipientStatus.DELIVERED, 1, line, now, None)
                    for r in envelope.recipients
                ]
                await p.store.record_results(queue_id, p.owner, results, release=True)
            else:
                await self.journal.commit(b"delivered\n")
            if p.tracking is not None:
                p.tracking.write(
                    "SEND",
                    "SMTP",
                    internal_message_id=queue_id,
                    message_id=envelope.message_id,
                    recipients=envelope.recipients,
                    recipient_status=[line] * len(envelope.recipients),
                    sender=envelope.sender,
                    return_path=envelope.sender,
                    total_bytes=len(data),
                    message_subject=header_value(data, "Subject"),
                    connector_id=p.config.send_connectors[0].name,
                    server_hostname=self.host,
                    server_ip=self.host,
                    client_hostname=p.fqdn,
                )
