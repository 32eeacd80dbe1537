"""One SMTP session on one receive connector: commands, replies, DATA, STARTTLS, AUTH.

The session owns its read buffer (`self.buf`) instead of reading lines from the StreamReader, so that:
- only CRLF ends a command line; a bare CR or LF inside one is refused, never silently split;
- DATA is scanned with `bytes.find` for CRLF.CRLF over whole chunks (no per-line Python work), and past
  `max_message_size` the bytes are dropped while the scan continues, so the session stays in sync;
- after STARTTLS everything buffered in plain text is discarded (CVE-2011-0411);
- pipelining is checked against what the client really sent: bytes waiting behind a command that must
  end a group (EHLO, HELO, DATA, STARTTLS, AUTH but AUTH PLAIN with its initial response, or any
  command when PIPELINING was not offered) are a protocol-synchronisation error and close the session,
  so content sent after a refused DATA is never executed as commands (security-bar §2C).
Replies are queued and written when the client's pipeline is drained, never ahead of it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

from relaygate import replies
from relaygate.addresses import Address, AddressError, parse_domain, parse_mail_from, parse_rcpt_to
from relaygate.config.model import Config, ReceiveConnector
from relaygate.logs.protocol import receiving_message_info
from relaygate.policy.rights import (
    ACCEPT_AUTHORITATIVE_DOMAIN_SENDER,
    SessionRights,
    session_rights,
)
from relaygate.policy.verdicts import (
    Verdict,
    check_header_from,
    check_mail,
    check_rcpt,
    relay_local_ips,
)
from relaygate.queue.bounce import parse_notify
from relaygate.queue.model import (
    DSN_ENVID,
    DSN_NOTIFY,
    DSN_ORCPT,
    LINE_BREAKS,
    LINE_BREAKS_CRLF,
    NO_REPORTS_TO_SENDER,
    NOT_SIGNED,
    SMTPUTF8,
    Envelope,
    StoredMessage,
)
from relaygate.queue.store import StoreError, StoreFullError, StoreOutcomeUnknownError
from relaygate.replies import Reply
from relaygate.smtp.message import (
    DataReader,
    from_fields,
    has_bare_cr_or_lf,
    received_header,
    scan_headers,
)

if TYPE_CHECKING:
    from relaygate.smtp.connection import Connection
    from relaygate.smtp.server import ServerContext

__all__ = ["Session"]

MAX_COMMAND_LINE = (
    2048  # Exchange accepts 571-char addresses plus parameters; RFC 5321 minimum is 512
)
READ_CHUNK = 262144
# Commands answered in a row before the event loop gets a turn. A read that finds bytes waiting
# returns without one, so a client pipelining RSETs or RCPTs past the limit (neither is an error)
# would otherwise have its session run everything received, up to the 2 MB at which the
# connection stops reading: ~1 s during which no other session of the process is served.
_COMMANDS_PER_TURN = 64
_GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "DATA", "STARTTLS", "AUTH", "QUIT", "NOOP", "VRFY", "EXPN"}
)

# The request lines a browser or an HTTP proxy client starts with (Postfix's smtpd_forbidden_commands
# default: CONNECT GET POST).
_HTTP_VERBS = frozenset({"GET", "POST", "CONNECT"})
# A header field's name and colon ("Host: x", "User-Agent: ..."): printable ASCII without ":", blanks
# allowed before the colon, as message.py reads a header line. "MAIL FROM:" is not one: the space
# after MAIL comes before any colon.
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")
# A TLS record's first two octets when it is a handshake (a ClientHello): content type 22, major
# version 3 (SSL 3.0 up to TLS 1.3's legacy version field).
_TLS_HANDSHAKE = b"\x16\x03"


class _Close(Exception):
    """End the session after the queued replies are written."""

    def __init__(self, context: str = "Local") -> None:
        self.context = context


@dataclass
class _Transaction:
    sender: Address | None = None
    sender_text: str = ""
    recipients: list[str] = field(default_factory=list)
    # Each recipient as parsed (beside its queued form above), to check it again after a reload
    rcpt_addresses: list[Address] = field(default_factory=list)
    # The configuration MAIL was checked under: another one at DATA is a reload to check against
    checked_under: Config | None = None
    body: str = "7BIT"
    smtputf8: bool = False
    # RFC 3461 parameters, kept for the relay's own reports (by recipient address)
    envid: str = ""
    notify: dict[str, str] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)


def _keep_dsn_params(txn: _Transaction, address: str, params: dict[str, str | None]) -> None:
    """A recipient's NOTIFY and ORCPT, honoured in the relay's own reports (a malformed NOTIFY
    is ignored, as every NOTIFY was before)."""
    notify = parse_notify(params.get("NOTIFY"))
    if notify is not None:
        txn.notify[address] = notify
    orcpt = params.get("ORCPT")
    if orcpt:
        txn.orcpt[address] = orcpt


class Session:
    def __init__(
        self,
        ctx: ServerContext,
        connector: ReceiveConnector,
        conn: Connection,
        *,
        client: tuple[str, int],
        local: tuple[str, int],
        tls_active: bool,
        initial: bytes = b"",
    ) -> None:
        self.ctx = ctx
        self.connector = connector
        self.conn = conn
        self.client_ip, self.client_port = client
        self.local = local
        self.tls_active = tls_active
        self.buf = bytearray(initial)
        self.out: list[bytes] = []
        self.fqdn = connector.fqdn or ctx.config.server.fqdn
        self.log = ctx.session_log(connector, local, client)
        self.helo: str | None = None
        self.esmtp = False
        self.auth_user: str | None = None
        self.rights: SessionRights = ctx.rights(connector)
        # allowed_senders / allowed_recipients, compiled once per connector of a config load
        self.address_rules = ctx.address_rules(connector)
        # The configuration the session's connector was last checked against (see _follow_reload);
        # None: not yet (a reload may come between the selection and the session, as during an
        # implicit-TLS handshake).
        self._config_seen: Config | None = None
        self.txn: _Transaction | None = None
        self.errors = 0
        self.logon_failures = 0
        self.messages = 0
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()
        self.deadline = self.started + connector.connection_timeout.total_seconds()
        self.idle = connector.connection_inactivity_timeout.total_seconds()
        # The read timeouts: one watchdog timer per session (see _watch), not one per read.
        self._reading_since: float | None = None  # loop time the pending read started
        # The reply to give when a read is cancelled: set by the watchdog, or by shutdown(); or
        # the _Close of a reload that ended the session while it waited (replies queued already).
        self._timed_out: Reply | _Close | None = None
        self._stopping = False  # the relay is stopping: 421 at the next command (see shutdown)
        self._in_data = False  # receiving or committing a message: a stop lets it finish
        self._in_auth = False  # reading an AUTH exchange's answer: a reload waits for its end
        self._held = 0  # bytes taken from ctx.data_memory for this message; -1: refused for it
        self._watchdog: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[object] | None = None
        self.pipelining = False
        self.tarpit = connector.tarpit_interval.total_seconds()
        self.auth_tarpit = connector.auth_tarpit_interval.total_seconds()
        self.bare_lf_rejection = connector.bare_linefeed_rejection_enabled
        self.authenticated = False

    # -- I/O ------------------------------------------------------------------------------------------
    def reply(self, reply: Reply) -> None:
        line = (
            reply.line()
            if self.connector.enhanced_status_codes_enabled
            else f"{reply.code} {reply.text}"
        )
        self.out.append(line.encode("utf-8", "replace") + b"\r\n")
        self.log.sent(line)
        if reply.code >= 400:
            self.ctx.counters.refusals[(self.connector.name, reply.code, reply.enhanced)] += 1

    def reply_lines(self, code: int, lines: list[str]) -> None:
        for i, text in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            self.out.append(f"{code}{sep}{text}\r\n".encode("utf-8", "replace"))

    async def flush(self) -> None:
        if self.out:
            self.conn.write(b"".join(self.out))
            self.out.clear()
            if not self.conn.transport.get_write_buffer_size():
                return  # the kernel took it all: nothing to wait for (the usual case)
            try:
                # asyncio.timeout, not wait_for: no extra task per reply on the hot path.
                async with asyncio.timeout(self.idle):
                    await self.conn.drain()
            except TimeoutError:
                raise ConnectionError("client does not read its replies") from None

    async def _fill(self) -> bool:
        """Read more bytes into the buffer; False at EOF. Enforces both timeouts."""
        await self.flush()
        chunk = await self._read_more()
        if not chunk:
            return False
        self.buf += chunk
        return True

    async def read_line(self) -> bytes | None:
        """The next command line without its ending; None at EOF. A line ended by a bare LF, or holding
        a bare CR, is returned with a marker the caller refuses."""
        while True:
            nl = self.buf.find(b"\n", 0, MAX_COMMAND_LINE)
            if nl >= 0:
                line = bytes(self.buf[: nl + 1])
                del self.buf[: nl + 1]
                return line
            if len(self.buf) >= MAX_COMMAND_LINE:
                # Too long: discard through the next LF so the session stays in sync.
                nl = self.buf.find(b"\n")
                if nl >= 0:
                    del self.buf[: nl + 1]
                    return b"\x00TOOLONG"
                self.buf.clear()
                while True:
                    if not await self._fill():
                        return None
                    nl = self.buf.find(b"\n")
                    if nl >= 0:
                        del self.buf[: nl + 1]
                        return b"\x00TOOLONG"
                    self.buf.clear()
            if self.buf.startswith(_TLS_HANDSHAKE):
                # A ClientHello need not hold an LF: it is not going to end as a line, and its
                # client waits for an answer. Hand it over now (the caller hangs up).
                line = bytes(self.buf)
                self.buf.clear()
                return line
            if not await self._fill():
                return None

    # -- session --------------------------------------------------------------------------------------
    def banner(self) -> str:
        if self.connector.banner:
            return self.connector.banner
        return f"220 {self.fqdn} Microsoft ESMTP MAIL Service ready at {self.ctx.banner_stamp()}"

    async def run(self) -> None:
        self.log.connect()
        banner = self.banner()
        self.out.append(banner.encode("utf-8", "replace") + b"\r\n")
        self.log.sent(banner)
        self.log.info(self.rights.log_tokens(), "Set Session Permissions")
        context = "Remote"
        self._task = asyncio.current_task()
        self._watchdog = self.loop.call_at(self._next_check(self.started), self._watch)
        answered = 0
        try:
            while True:
                line = await self.read_line()
                if line is None:
                    break
                await self.handle_line(line)
                answered += 1
                if answered == _COMMANDS_PER_TURN:  # let the other sessions run (see there)
                    answered = 0
                    await asyncio.sleep(0)
        except _Close as close:
            context = close.context
        except (OSError, asyncio.IncompleteReadError):  # resets, TLS record errors
            context = "Remote"
        finally:
            if self._watchdog is not None:
                self._watchdog.cancel()
                self._watchdog = None
            try:
                await self.flush()
            except (OSError, RuntimeError):
                pass
            self.log.disconnect(context)

    def _next_check(self, now: float) -> float:
        """When the watchdog must look next: when the pending read (or one starting now) would be
        idle too long, or the connection's absolute deadline, whichever is first."""
        since = self._reading_since
        due = (since if since is not None else now) + self.idle
        if self.deadline > now or since is not None:
            due = min(due, self.deadline)
        return due

    def _watch(self) -> None:
        """The session's read timeouts, checked by one timer that re-arms itself: a per-read
        asyncio.timeout cost a timer scheduled and cancelled on every read (~5 % of the event
        loop's time under load). A read that has waited too long is cancelled, and _read_more turns
        the cancellation into the timeout reply."""
        if self._timed_out is not None:  # the read is cancelled already (a stop, a reload)
            self._watchdog = None
            return
        now = self.loop.time()
        due = self._next_check(now)
        if self._reading_since is not None and now + 0.001 >= due:
            self._timed_out = (
                replies.CONNECTION_TIMEOUT
                if now + 0.001 >= self.deadline
                else replies.INACTIVITY_TIMEOUT
            )
            self._watchdog = None
            if self._task is not None:
                self._task.cancel()
            return
        self._watchdog = self.loop.call_at(due, self._watch)

    def shutdown(self) -> None:
        """The relay is stopping. A client waiting to send a command gets 421 4.3.2 now (RFC 5321
        §3.8); a message being received or committed finishes first, and its client gets the 421
        when it sends its next command."""
        self._stopping = True
        if (
            self._reading_since is not None
            and not self._in_data
            and self._timed_out is None
            and self._task is not None
        ):
            self._timed_out = replies.SERVICE_NOT_AVAILABLE
            self._task.cancel()

    def reload_applied(self) -> None:
        """A reload has just been applied (SmtpServer tells every open session). A session waiting
        for its next command follows it now, as its next command would (`_follow_reload`): its
        watchdog is re-armed with the new timeouts, so an idle client meets a shortened
        connection_inactivity_timeout within the new value, and a session that must end (its
        client taken off its connector, its authentication lost, its new connection_timeout
        already over) gets its 421 at once. A session in the middle of a command (DATA, a
        STARTTLS handshake, an AUTH exchange, a tarpit, a reply its client does not read) is left
        alone: it follows at the end of DATA or at its next command, as before, so a message
        being received is never cut by a reload."""
        if not self._waiting_for_command():
            return
        try:
            self._follow_reload()
        except _Close as close:  # its reply is queued: end the pending read with it
            assert self._task is not None  # (_waiting_for_command)
            self._timed_out = close
            self._task.cancel()

    def _waiting_for_command(self) -> bool:
        """Reading the client's next command line, between two commands."""
        return (
            self._reading_since is not None
            and not self._in_data
            and not self._in_auth
            and self._timed_out is None
            and self._task is not None
        )

    async def protocol_error(self, reply: Reply, *, tarpit: bool = False) -> None:
        """A client error: counted toward max_protocol_errors, delayed by the tarpit if anonymous."""
        self.errors += 1
        if tarpit and not self.authenticated and self.tarpit > 0:
            self.log.info(f"Tarpit for '{_span(self.tarpit)}'")
            await self.flush()
            await asyncio.sleep(self.tarpit)
        self.reply(reply)
        limit = self.connector.max_protocol_errors
        if limit is not None and self.errors >= limit:
            self.reply(replies.TOO_MANY_ERRORS)
            raise _Close()

    def check_sync(self, verb: str, arg: str = "") -> None:
        """Bytes waiting behind a command that must end a pipeline group → close (security-bar §2C).

        Waiting means in the session's buffer or received by the connection and not read yet:
        bytes that came while the session was not reading (a tarpit, a store commit, a password
        check) were sent before their command's reply all the same (as Postfix peeks the socket)."""
        if not self.buf and not self.conn.unread:
            return
        if verb in _GROUP_ENDERS or not self.pipelining:
            if verb in ("QUIT", "STARTTLS"):
                return  # STARTTLS discards what follows it itself (RFC 3207 §4.2 / CVE-2011-0411)
            if verb == "AUTH" and self.pipelining and _plain_with_initial_response(arg):
                return  # RFC 4954 §4: done in one round trip, so it need not end the group
            pending = len(self.buf) + self.conn.discard_unread()
            self.log.info(f"Unauthorized pipelining after {verb}; {pending} bytes pending")
            self.buf.clear()
            self.reply(replies.SYNC_ERROR)
            raise _Close()

    async def handle_line(self, raw: bytes) -> None:
        if raw == b"\x00TOOLONG":
            self.log.received("(command too long)")
            await self.protocol_error(replies.COMMAND_TOO_LONG)
            return
        if raw.endswith(b"\r\n"):
            body = raw[:-2]
            bare = b"\r" in body or b"\n" in body
        else:
            body = raw.rstrip(b"\r\n")
            bare = True
        try:
            text = body.decode("utf-8")  # strict: no overlong forms, no surrogates
            bad_utf8 = False
        except UnicodeDecodeError:
            text = body.decode("utf-8", "replace")  # for the protocol log only
            bad_utf8 = True
        verb, _, arg = text.partition(" ")
        # ASCII only: str.upper() folds "ı" to "I", "ſ" to "S" and "ﬅ" to "ST" (security-bar item 99).
        verb = verb.upper() if verb.isascii() else ""
        if verb == "AUTH":
            self.log.received(_mask_auth(text))
        else:
            self.log.received(text)
        if verb != "QUIT":  # a client saying goodbye gets its 221 whatever a reload said
            self._follow_reload()  # before anything the reloaded connector may decide otherwise
        why = _non_smtp(body, verb)
        if why:
            # Another protocol talking (security-bar 98): answering each of its lines as an SMTP
            # error, up to max_protocol_errors, only feeds a cross-protocol attack; hang up now.
            self.log.info(f"Non-SMTP command ({why}); disconnecting")
            self.reply(replies.NON_SMTP_COMMAND)
            raise _Close()
        if bare and self.bare_lf_rejection:
            await self.protocol_error(replies.BARE_LF_IN_COMMAND)
            return
        if b"\x00" in body:
            await self.protocol_error(replies.UNRECOGNIZED_COMMAND)
            return
        if bad_utf8:  # never replaced by U+FFFD and read as an address (security-bar 145)
            await self.protocol_error(replies.BAD_UTF8)
            return
        handler = _HANDLERS.get(verb)
        if handler is None:
            await self.protocol_error(replies.UNRECOGNIZED_COMMAND)
            return
        self.check_sync(verb, arg)
        await handler(self, arg)

    # -- verbs ----------------------------------------------------------------------------------------
    async def do_ehlo(self, arg: str) -> None:
        await self._hello(arg, esmtp=True)

    async def do_helo(self, arg: str) -> None:
        await self._hello(arg, esmtp=False)

    async def _hello(self, arg: str, *, esmtp: bool) -> None:
        domain = arg.strip()
        if not domain:
            if self.connector.require_ehlo_domain:
                self.reply(replies.EHLO_REQUIRES_DOMAIN)
                raise _Close()
            await self.protocol_error(replies.EHLO_REQUIRES_DOMAIN)
            return
        if not _valid_helo(domain):
            await self.protocol_error(replies.INVALID_DOMAIN)
            return
        self.helo = domain
        self.esmtp = esmtp
        self.txn = None
        greeting = f"{self.fqdn} Hello [{self.client_ip}]"
        if not esmtp:
            self.pipelining = False
            self.reply(Reply(250, "", greeting))
            return
        c = self.connector
        lines = [greeting]
        if c.size_enabled == "Enabled":
            lines.append(f"SIZE {c.max_message_size}")
        elif c.size_enabled == "EnabledWithoutValue":
            lines.append("SIZE")
        if c.pipelining_enabled:
            lines.append("PIPELINING")
        # DSN (RFC 3461) is not advertised: no success or relayed reports are made and the
        # parameters are not passed on to the next hop. A client that gives them anyway has
        # NOTIFY (failure, delay), ORCPT and ENVID honoured in the relay's own reports.
        if c.enhanced_status_codes_enabled:
            lines.append("ENHANCEDSTATUSCODES")
        if (
            "Tls" in c.auth_mechanism
            and not self.tls_active
            and c.name not in self.ctx.starttls_withheld
            and not self.ctx.tls_unavailable(c)
        ):
            lines.append("STARTTLS")
        mechanisms = self.auth_mechanisms()
        if mechanisms:
            lines.append("AUTH " + " ".join(mechanisms))
        if c.eight_bit_mime_enabled:
            lines.append("8BITMIME")
        lines.append("SMTPUTF8")
        self.pipelining = c.pipelining_enabled
        self.reply_lines(250, lines)
        self.log.log_ehlo_reply(lines)

    def auth_mechanisms(self) -> list[str]:
        mechanisms = self.connector.auth_mechanism
        if "BasicAuth" not in mechanisms or self.auth_user is not None:
            return []
        if not self.tls_active and (
            "BasicAuthRequireTLS" in mechanisms or self.connector.require_tls
        ):
            return []  # not offered where do_auth would refuse it for want of TLS
        return ["PLAIN", "LOGIN"]

    def _follow_reload(self) -> None:
        """After a reload, go on with the connector that now takes this client when it is the one
        the session started on (by name): its new rights, address rules, limits, tarpits and
        timeouts apply from here (`_take_connector_values`). Called before every command but
        QUIT, and again at the end of DATA, and by `reload_applied` while waiting for one. When
        another connector, or none, takes the client now, or an authenticated session could not
        authenticate now (`_authentication_lost`), end with 421 so that the client reconnects to
        what the configuration says: a client taken off a relaying connector stops relaying at
        once, not when its session ends (connection_timeout, 10 minutes by default)."""
        config = self.ctx.config
        if config is self._config_seen:
            return
        self._config_seen = config
        now = self.ctx.select(self.local[0], self.local[1], self.client_ip).connector
        if now is None or now.name.lower() != self.connector.name.lower():
            taken_by = f"receive connector {now.name}" if now is not None else "no connector"
            self._end_after_reload(
                f"{taken_by} takes {self.client_ip}, not receive connector {self.connector.name}"
            )
        lost_auth = self._authentication_lost(now)
        if lost_auth:
            self._end_after_reload(lost_auth)
        if now is self.connector:
            return
        self.connector = now
        self.address_rules = self.ctx.address_rules(now)
        self.rights = self.ctx.rights(now) if self.auth_user is None else self._user_rights(now)
        self.log.info(self.rights.log_tokens(), "Set Session Permissions")
        self._take_connector_values(now)

    def _take_connector_values(self, connector: ReceiveConnector) -> None:
        """The values the session copied from its connector at its start, taken again from the
        reloaded one (an admin shortening a tarpit or a timeout means the printers that keep
        their connections open too). The timeouts count from when they always did: the absolute
        one from the connection's start (one already over under the new value ends the session
        with the usual 421 4.4.1, as when it runs out between two commands), the inactivity one
        from the start of the read pending (`reload_applied`: an idle session) or the next one. What the client was told at EHLO (PIPELINING, SIZE, the greeting's
        name) and the protocol log's level stay as they were until the next EHLO or session."""
        self.fqdn = connector.fqdn or self.ctx.config.server.fqdn
        self.tarpit = connector.tarpit_interval.total_seconds()
        self.auth_tarpit = connector.auth_tarpit_interval.total_seconds()
        self.bare_lf_rejection = connector.bare_linefeed_rejection_enabled
        self.idle = connector.connection_inactivity_timeout.total_seconds()
        self.deadline = self.started + connector.connection_timeout.total_seconds()
        now = self.loop.time()
        if now >= self.deadline:
            self.log.info(
                f"after a reload connection_timeout {_span(self.deadline - self.started)} of "
                f"receive connector {connector.name} has passed; disconnecting"
            )
            self.reply(replies.CONNECTION_TIMEOUT)
            raise _Close()
        if self._watchdog is not None:  # due at the old values' time: at the new ones' now
            self._watchdog.cancel()
            self._watchdog = self.loop.call_at(self._next_check(now), self._watch)

    def _user_rights(self, connector: ReceiveConnector) -> SessionRights:
        """The rights of the authenticated user on `connector`, with its send-as list as the users
        file was last read."""
        assert self.auth_user is not None
        return session_rights(
            connector,
            authenticated_user=self.auth_user,
            send_as=self.ctx.users.send_as(self.auth_user),
        )

    async def _follow_users_file(self) -> None:
        """At MAIL, an authenticated session follows the users file as it is now (`relaygate user
        send-as` or `remove` while the session is open): a changed send-as list applies from this
        MAIL on; a user no longer in the file is disconnected with 421, as a reload removing it
        does (`_authentication_lost`). One stat per MAIL here; the file is re-read, when it changed,
        in a thread (not queued behind argon2 verifications for every MAIL)."""
        user = self.auth_user
        if user is None:
            return
        if self.ctx.users.changed():
            await asyncio.to_thread(self.ctx.users.refresh)
        users = self.ctx.users
        if user not in users:
            self.log.info(f"user {user} is no longer in the users file {users.path}; disconnecting")
            self.reply(replies.SERVICE_NOT_AVAILABLE)
            raise _Close()
        if users.send_as(user) is not self.rights.send_as:
            self.rights = self._user_rights(self.connector)
            listed = self.rights.send_as
            self.log.info(
                f"send-as list of user {user} is now {', '.join(listed.texts) if listed else 'none'}"
            )

    def _authentication_lost(self, connector: ReceiveConnector) -> str:
        """Why an authenticated session could not authenticate now on `connector` (as reloaded),
        or "": its user is gone from the users file the reload read (an account removed, its
        password perhaps leaked), or the connector offers no AUTH, or only over TLS, which this
        session did not use. Its rights are the user's: it must not keep them."""
        user = self.auth_user
        if user is None:
            return ""
        mechanisms = connector.auth_mechanism
        if "BasicAuth" not in mechanisms:
            return f"receive connector {connector.name} offers no AUTH (BasicAuth) now"
        if "BasicAuthRequireTLS" in mechanisms and not self.tls_active:
            return (
                f"receive connector {connector.name} offers AUTH only after STARTTLS now "
                "(BasicAuthRequireTLS)"
            )
        if user not in self.ctx.users:
            return f"user {user} is no longer in the users file"
        return ""

    def _end_after_reload(self, why: str) -> NoReturn:
        """421 4.3.2 and close: the client reconnects to what the configuration now says."""
        self.log.info(f"after a reload {why}; disconnecting")
        self.reply(replies.SERVICE_NOT_AVAILABLE)
        raise _Close()

    async def do_mail(self, arg: str) -> None:
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.connector.require_tls and not self.tls_active:
            await self.protocol_error(replies.MUST_STARTTLS)
            return
        if self.txn is not None:
            await self.protocol_error(replies.SENDER_ALREADY_SPECIFIED)
            return
        try:
            sender, params = parse_mail_from(arg)
        except AddressError as exc:
            await self.protocol_error(exc.reply)
            return
        declared: int | None = None
        txn = _Transaction(
            sender=sender, sender_text=str(sender) if sender else "", checked_under=self.ctx.config
        )
        for key, value in params.items():
            if key == "SIZE" and self.connector.size_enabled != "Disabled":
                if value is None or not value.isdigit():
                    await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                    return
                declared = int(value)
            elif key == "BODY" and value is not None and value.upper() in ("7BIT", "8BITMIME"):
                txn.body = value.upper()
            elif key == "SMTPUTF8" and value is None:
                txn.smtputf8 = True
            elif key in ("RET", "ENVID") and self.connector.delivery_status_notification_enabled:
                if key == "ENVID" and value:
                    txn.envid = value
            elif key == "AUTH":
                pass  # RFC 4954 §5: informational; never trusted
            else:
                await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                return
        await self._follow_users_file()
        if not self.ctx.rates.allowed(self.connector, self.client_ip, user=self.auth_user):
            self.reply(replies.RATE_LIMITED)
            raise _Close()
        verdict = check_mail(
            sender,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            authenticated=self.authenticated,
            declared_size=declared,
            address_rules=self.address_rules,
        )
        if not verdict.accepted:
            self.log.info(f"MAIL refused: {verdict.reason}")
            await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
            return
        pressure = self.ctx.pressure
        if pressure is not None and pressure.refuses(declared):
            # Back pressure: the queue's disk is (or with this SIZE= would be) below its minimum
            # free space. Not a protocol error: the client is right to try again later.
            self.log.info("MAIL refused: back pressure, too little free space on the queue's disk")
            self.reply(replies.INSUFFICIENT_RESOURCES)
            return
        self.txn = txn
        self.reply(verdict.reply)

    async def do_rcpt(self, arg: str) -> None:
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.txn is None:
            await self.protocol_error(replies.NEED_MAIL)
            return
        try:
            rcpt, params = parse_rcpt_to(arg, smtputf8=self.txn.smtputf8)
        except AddressError as exc:
            await self.protocol_error(exc.reply)
            return
        for key in params:
            if (
                key not in ("NOTIFY", "ORCPT")
                or not self.connector.delivery_status_notification_enabled
            ):
                await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
                return
        verdict = self._rcpt_verdict(rcpt, len(self.txn.recipients))
        if not verdict.accepted:
            self.log.info(f"RCPT {rcpt} refused: {verdict.reason}")
            if verdict.reply.code == 452:  # too many recipients: not a protocol error
                self.reply(verdict.reply)
                return
            await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
            return
        address = str(rcpt) if rcpt.domain else self.ctx.postmaster_address()
        self.txn.recipients.append(address)
        self.txn.rcpt_addresses.append(rcpt)
        _keep_dsn_params(self.txn, address, params)
        self.reply(verdict.reply)

    def _rcpt_verdict(self, rcpt: Address, accepted_count: int) -> Verdict:
        """RCPT's decision for `rcpt` with the session's connector and rights as they are now."""
        return check_rcpt(
            rcpt,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            accepted_count=accepted_count,
            authenticated=self.authenticated,
            local_ips=(
                relay_local_ips(self.ctx.config, self.ctx.host_ips, self.local[0])
                if rcpt.is_literal
                else ()
            ),
            address_rules=self.address_rules,
        )

    def _transaction_stands(self, txn: _Transaction) -> bool:
        """False (the refusal replied, the transaction over) when a reload since MAIL took away
        what the transaction needs: its sender or any of its recipients would be refused now.
        Checked at DATA before the 354 and at the end of DATA before the message is stored, after
        `_follow_reload` (which ends the session when the connector no longer takes the client):
        a recipient the new configuration refuses is never queued."""
        config = self.ctx.config
        if txn.checked_under is config:
            return True
        refusal = self._refusal_after_reload(txn)
        if refusal is None:
            txn.checked_under = config
            return True
        self.txn = None
        self.reply(refusal)
        return False

    def _refusal_after_reload(self, txn: _Transaction) -> Reply | None:
        """The reply to give the transaction under the configuration reloaded since MAIL, or
        None: MAIL's refusal when its sender is refused now; else, RCPT's when all of its
        recipients are (the client bounces the message as it would have at RCPT);
        RECIPIENTS_CHANGED (4xx) when only some are, so the client sends it again and RCPT tells
        it which: with a 250 it would take the others as accepted, and no one would learn they
        were dropped."""
        mail = check_mail(
            txn.sender,
            rights=self.rights,
            connector=self.connector,
            accepted_domains=self.ctx.config.accepted_domains,
            authenticated=self.authenticated,
            address_rules=self.address_rules,
        )
        if not mail.accepted:
            self.log.info(f"after a reload MAIL refused: {mail.reason}")
            return mail.reply
        refused: list[Reply] = []
        kept = 0
        for rcpt in txn.rcpt_addresses:
            verdict = self._rcpt_verdict(rcpt, kept)
            if verdict.accepted:
                kept += 1
                continue
            self.log.info(f"after a reload RCPT {rcpt} refused: {verdict.reason}")
            refused.append(verdict.reply)
        if not refused:
            return None
        return refused[0] if kept == 0 else replies.RECIPIENTS_CHANGED

    def _size_limit(self) -> int:
        """The largest message the session may send: its connector's max_message_size, or 2 GiB
        for a session whose rights bypass it."""
        limit = self.connector.max_message_size
        if self.rights.bypasses_size_limit:
            limit = max(limit, 2 * 1024**3)
        return limit

    def _delivery_metadata(self, txn: _Transaction) -> dict[str, str]:
        """What delivery must know of this session: the RFC 3461 parameters for the reports,
        whether the sender may get them, and why the message must not be DKIM-signed."""
        metadata: dict[str, str] = {}
        if txn.notify:
            metadata[DSN_NOTIFY] = json.dumps(txn.notify)
        if txn.orcpt:
            metadata[DSN_ORCPT] = json.dumps(txn.orcpt)
        if txn.envid:
            metadata[DSN_ENVID] = txn.envid
        if not self._may_report_to_sender(txn.sender):
            metadata[NO_REPORTS_TO_SENDER] = "1"
        if not self.authenticated and not self.rights.has(ACCEPT_AUTHORITATIVE_DOMAIN_SENDER):
            # The admin said these clients may not send as the organisation (Exchange's
            # anti-spoofing setting): its key must not vouch for the From they wrote either.
            metadata[NOT_SIGNED] = (
                f"the session on receive connector {self.connector.name} may not send as the "
                f"organisation ({ACCEPT_AUTHORITATIVE_DOMAIN_SENDER} not granted)"
            )
        return metadata

    def _may_report_to_sender(self, sender: Address | None) -> bool:
        """False when the connector has allowed_recipients, no allowed_senders, and the sender
        matches none of them: a report to it would reach, with what the client wrote, an
        address the client could not send to (a sender chosen at will, then a recipient that
        bounces)."""
        c = self.connector
        if not c.allowed_recipients or c.allowed_senders or sender is None or not sender.domain:
            return True
        return self.address_rules.recipients.match(sender) is not None

    async def do_data(self, arg: str) -> None:
        if arg.strip():
            await self.protocol_error(replies.DATA_SYNTAX)
            return
        if self.helo is None:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.txn is None:
            await self.protocol_error(replies.NEED_MAIL)
            return
        if not self.txn.recipients:
            await self.protocol_error(replies.NEED_RCPT)
            return
        if not self._transaction_stands(self.txn):
            return
        self.reply(replies.START_MAIL_INPUT)
        started = time.monotonic()
        self._in_data = True
        self._held = 0
        try:
            self.conn.reading_message(True)  # it streams while read: may run ahead (connection.py)
            try:
                content, too_big = await self.read_data()
            finally:
                self.conn.reading_message(False)
            txn, self.txn = self.txn, None
            if content is None:
                raise _Close("Remote")
            if self._held < 0:
                self.log.info("message refused: the memory for messages in transit is spent")
                self.reply(replies.INSUFFICIENT_RESOURCES)
                return
            self._follow_reload()  # a reload while the message came: checked as at DATA
            if not self._transaction_stands(txn):
                return
            await self.accept_message(txn, content, too_big, started)
        finally:
            self._in_data = False
            if self._held > 0:
                self.ctx.data_memory.give_back(self._held)
            self._held = 0

    async def read_data(self) -> tuple[bytes | None, bool]:
        """Read through CRLF.CRLF. Returns (unstuffed content or None at EOF, exceeded-size flag)."""
        reader = DataReader(self._size_limit())
        memory = self.ctx.data_memory
        more = bytes(self.buf)
        self.buf.clear()
        while True:
            done = reader.feed(more)
            # What the reader keeps is taken from the process's budget (self._held, given back by
            # do_data); once it is spent the rest is read and dropped (self._held = -1).
            if reader.dropping:  # over max_message_size (or the budget): nothing is kept
                if self._held > 0:
                    memory.give_back(self._held)
                    self._held = 0
            else:
                grow = reader.kept + (len(more) if done else 0) - self._held
                if grow > 0:
                    if memory.take(grow):
                        self._held += grow
                    else:
                        memory.give_back(self._held)
                        self._held = -1
                        reader.stop_keeping()
            if done:
                break
            await self.flush()
            self.conn.ack_now()  # a client's last short segment must not wait 40 ms (see there)
            more = await self._read_more()
            if not more:
                return None, False
        content, too_big, rest = reader.result()
        self.buf += rest
        return content, too_big

    async def _read_more(self) -> bytes:
        """One read from the client, bounded by the inactivity and absolute timeouts."""
        if self._stopping and not self._in_data:
            self.reply(replies.SERVICE_NOT_AVAILABLE)
            raise _Close()
        now = self.loop.time()
        if now >= self.deadline:
            self.reply(replies.CONNECTION_TIMEOUT)
            raise _Close()
        self._reading_since = now
        try:
            return await self.conn.read(READ_CHUNK)
        except asyncio.CancelledError:
            timed_out, self._timed_out = self._timed_out, None
            if timed_out is None or self._task is None:
                raise  # a real cancellation (the server is stopping)
            self._task.uncancel()
            if isinstance(timed_out, _Close):  # a reload ended the session (reload_applied)
                raise timed_out from None
            self.reply(timed_out)
            raise _Close() from None
        finally:
            self._reading_since = None

    async def accept_message(
        self, txn: _Transaction, content: bytes, too_big: bool, started: float
    ) -> None:
        c = self.connector
        if too_big or len(content) > self._size_limit():  # the limit may be a reload's, lower
            self.log.info(f"message refused: larger than max_message_size {c.max_message_size}")
            self.reply(replies.MESSAGE_TOO_BIG)
            return
        if self.bare_lf_rejection and has_bare_cr_or_lf(content):
            self.log.info("message refused: bare CR or LF in content")
            await self.protocol_error(replies.BARE_LINEFEED)
            return
        scan = scan_headers(content)
        if scan.header_size > c.max_header_size:
            self.reply(replies.HEADER_TOO_BIG)
            raise _Close()
        if scan.hops >= c.max_hop_count:
            self.log.info(
                f"message refused: {scan.hops} Received headers, max_hop_count {c.max_hop_count}"
            )
            self.reply(replies.HOP_COUNT_EXCEEDED)
            return
        send_as = self.rights.send_as  # the user's list as MAIL (or a reload since) found it
        if c.allowed_senders or send_as is not None:  # P2: the From header, as MAIL FROM
            verdict = check_header_from(
                from_fields(content),
                connector=c,
                authenticated=self.authenticated,
                address_rules=self.address_rules,
                send_as=send_as,
            )
            if not verdict.accepted:
                self.log.info(f"message refused: {verdict.reason}")
                await self.protocol_error(verdict.reply, tarpit=verdict.tarpit)
                return
        self.messages += 1
        local_id = f"{self.log.session_id};{self.messages}"
        protocol = "ESMTP" if self.esmtp else "SMTP"
        if self.tls_active:
            protocol += "S"
        if self.authenticated:
            protocol += "A"
        header = received_header(
            helo=self.helo or "",
            client_ip=self.client_ip,
            fqdn=self.fqdn,
            connector=c.name,
            protocol=protocol,
            queue_id=local_id.replace(
                ";", "-"
            ),  # an RFC 5321 Atom: a ";" would end the tokens early
            recipient=txn.recipients[0] if len(txn.recipients) == 1 else None,
        )
        self.log.info(
            receiving_message_info(self.log.session_id, self.messages), "receiving message"
        )
        envelope = Envelope(
            sender=txn.sender_text,
            recipients=list(txn.recipients),
            client_ip=self.client_ip,
            connector=c.name,
            helo=self.helo or "",
            auth_user=self.auth_user or "",
            message_id=scan.message_id,
            metadata={"session": local_id, "protocol": protocol},
        )
        if self.bare_lf_rejection:  # checked above; the Received header is CRLF too
            envelope.metadata[LINE_BREAKS] = LINE_BREAKS_CRLF
        if txn.smtputf8:
            envelope.metadata[SMTPUTF8] = "1"
        envelope.metadata.update(self._delivery_metadata(txn))
        data = header + content
        handoff = self.ctx.handoff
        lease = handoff.lease_for_new() if handoff is not None else None
        received_at = time.time()
        try:
            queue_id = await self.ctx.store.submit(
                envelope, data, lease=lease, received_at=received_at
            )
        except StoreOutcomeUnknownError as exc:
            # The message may be stored after all: neither a 250 nor a 4xx would be true. No
            # reply, the connection closed: RFC 5321 §6.1 has the client send it again (a
            # duplicate at worst, never a loss or a refusal that was not one).
            self.ctx.logger.error(
                "queue store commit failed with its outcome unknown, message from %s: "
                "connection closed without a reply: %s",
                self.client_ip,
                exc,
            )
            raise _Close() from exc
        except StoreFullError as exc:  # the disk or database is full: the Store contract's 452
            # A warning: the store logs its failed commit itself; here the client is told to retry.
            self.ctx.logger.warning(
                "queue store full, message from %s refused with 452 4.3.1: %s", self.client_ip, exc
            )
            self.reply(replies.INSUFFICIENT_RESOURCES)
            return
        except StoreError as exc:  # database down, I/O error: the reason is in the message
            self.ctx.logger.error("queue store failed for %s: %s", self.client_ip, exc)
            self.reply(replies.QUEUE_FAILED)
            return
        except Exception as exc:  # any store failure: the client must retry, nothing was promised
            self.ctx.logger.exception("queue store failed for %s: %s", self.client_ip, exc)
            self.reply(replies.QUEUE_FAILED)
            return
        self.ctx.rates.record(c, self.client_ip, user=self.auth_user)
        elapsed = time.monotonic() - started
        size = len(header) + len(content)
        self.reply(
            replies.message_queued(
                queue_id, scan.message_id or f"<{queue_id}@{self.fqdn}>", self.fqdn, size, elapsed
            )
        )
        self.ctx.message_received(queue_id, envelope, data, self)
        if handoff is not None and lease is not None:
            handoff.take_new(
                StoredMessage.new(
                    queue_id, envelope, size=len(data), received_at=received_at, lease=lease
                ),
                data,
            )
        elif self.ctx.on_message is not None:
            self.ctx.on_message(queue_id)

    async def do_rset(self, arg: str) -> None:
        self.txn = None
        self.reply(replies.RESETTING)

    async def do_noop(self, arg: str) -> None:
        self.reply(replies.OK)

    async def do_quit(self, arg: str) -> None:
        self.reply(replies.CLOSING)
        raise _Close("Local")

    async def do_vrfy(self, arg: str) -> None:
        self.reply(replies.CANNOT_VRFY)

    async def do_help(self, arg: str) -> None:
        self.out.append(
            b"214-This server supports the following commands:\r\n"
            b"214 HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH\r\n"
        )

    async def do_not_implemented(self, arg: str) -> None:
        await self.protocol_error(replies.NOT_IMPLEMENTED)

    async def do_bdat(self, arg: str) -> None:
        """CHUNKING is not advertised: the bytes after a BDAT line would be raw content, so never read
        them as commands (security-bar item 153): refuse and hang up."""
        self.buf.clear()
        self.reply(replies.NOT_IMPLEMENTED)
        raise _Close()

    async def do_starttls(self, arg: str) -> None:
        if arg.strip():
            await self.protocol_error(replies.STARTTLS_SYNTAX)
            return
        if self.tls_active:
            await self.protocol_error(replies.STARTTLS_ALREADY)
            return
        if "Tls" not in self.connector.auth_mechanism:
            await self.protocol_error(replies.UNRECOGNIZED_COMMAND)
            return
        ctx = self.ctx.tls_context(self.connector)
        if ctx is None:
            self.reply(replies.TLS_NOT_AVAILABLE)
            return
        # Stop reading plaintext now: nothing that arrives from here on is read before the TLS layer is
        # in place (the transport feeds it to the handshake, where injected plaintext is garbage).
        self.conn.transport.pause_reading()
        self.reply(replies.STARTTLS_READY)
        await self.flush()
        # Discard every plaintext byte that arrived with or after STARTTLS (CVE-2011-0411): ours and
        # what the connection received and the session has not read yet.
        pending = len(self.buf) + self.conn.discard_unread()
        if pending:
            self.log.info(f"{pending} bytes sent after STARTTLS discarded")
        self.buf.clear()
        limit = min(self.idle, 60)
        try:
            await asyncio.wait_for(self.conn.start_tls(ctx), timeout=limit)
        except TimeoutError:  # before OSError, its base: its text is empty
            self.log.info(
                f"TLS negotiation failed: no TLS handshake within {limit:g} s after STARTTLS"
            )
            raise _Close() from None
        except (OSError, ConnectionError) as exc:
            self.log.info(f"TLS negotiation failed: {exc}")
            raise _Close() from None
        self.tls_active = True
        ssl_object = self.conn.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.log.info(
                f"TLS protocol {ssl_object.version()} negotiation succeeded using cipher {ssl_object.cipher()[0]}"
            )
        # RFC 3207 §4.2: forget everything learned before TLS.
        self.helo = None
        self.esmtp = False
        self.txn = None
        self.auth_user = None
        self.authenticated = False
        self.rights = session_rights(self.connector)

    async def do_auth(self, arg: str) -> None:
        if self.helo is None or not self.esmtp:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.auth_user is not None:
            await self.protocol_error(replies.AUTH_ALREADY)
            return
        if self.txn is not None:
            await self.protocol_error(replies.BAD_SEQUENCE)
            return
        mechanisms = self.connector.auth_mechanism
        if "BasicAuth" not in mechanisms:
            await self.protocol_error(replies.AUTH_UNKNOWN_MECHANISM)
            return
        if "BasicAuthRequireTLS" in mechanisms and not self.tls_active:
            await self.protocol_error(replies.BASIC_AUTH_REQUIRES_TLS)
            return
        if self.connector.require_tls and not self.tls_active:
            # RFC 3207 §4: a server that requires TLS answers 530 to all but NOOP, EHLO, STARTTLS
            # and QUIT. MAIL alone was refused: the password crossed in clear before it.
            await self.protocol_error(replies.MUST_STARTTLS)
            return
        if not self.ctx.auth_failures.allowed(self.connector, self.client_ip):
            await self._auth_rate_limited()
            return
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        authzid = ""  # PLAIN's authorization identity (RFC 4616); LOGIN has none
        try:
            if mechanism == "PLAIN":
                blob = initial or await self._challenge("")
                if blob is None:
                    return
                parts = _b64(blob).split(b"\x00")
                if len(parts) != 3:
                    raise ValueError("PLAIN needs authzid\\0user\\0password")
                authzid = parts[0].decode("utf-8")
                user, password = parts[1].decode("utf-8"), parts[2].decode("utf-8")
            elif mechanism == "LOGIN":
                user_blob = initial or await self._challenge("VXNlcm5hbWU6")
                if user_blob is None:
                    return
                user = _b64(user_blob).decode("utf-8")
                pass_blob = await self._challenge("UGFzc3dvcmQ6")
                if pass_blob is None:
                    return
                password = _b64(pass_blob).decode("utf-8")
            else:
                await self.protocol_error(replies.AUTH_UNKNOWN_MECHANISM)
                return
        except (ValueError, UnicodeDecodeError, binascii.Error):
            await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
            return
        failures = self.ctx.auth_failures
        if not failures.allowed(self.connector, self.client_ip):  # again: the credentials took time
            await self._auth_rate_limited()
            return
        # Counted as a failure from here, before the password is checked: a client hanging up
        # during the tarpit, or many at once from one address, are counted all the same.
        attempt = failures.begin(self.connector, self.client_ip)
        # RFC 4616 §2: an authorization identity other than the authenticated one is refused (no
        # user may act as another); it fails as a wrong password does, whatever the password.
        if (not authzid or authzid.lower() == user.lower()) and await self.ctx.users.verify(
            user, password
        ):
            failures.succeeded(self.connector, self.client_ip, attempt)
            user = user.lower()  # the canonical name, as `relaygate user list` shows it
            self.auth_user = user
            self.authenticated = True
            self.rights = self._user_rights(self.connector)
            self.log.info(self.rights.log_tokens(), "Set Session Permissions")
            self.reply(replies.AUTH_OK)
            return
        self.logon_failures += 1
        self.log.info(f"Inbound AUTH {mechanism} failed because of LogonDenied")
        if self.auth_tarpit > 0:
            await self.flush()
            await asyncio.sleep(self.auth_tarpit)
        self.reply(replies.AUTH_FAILED)
        if (
            self.connector.max_logon_failures
            and self.logon_failures >= self.connector.max_logon_failures
        ):
            self.reply(replies.TOO_MANY_ERRORS)
            raise _Close()

    async def _auth_rate_limited(self) -> None:
        """logon_failure_rate_limit reached for this address (or its IPv6 network): refused before
        any password is checked (a protocol error: a client repeating it is closed at
        max_protocol_errors)."""
        counted_as = self.ctx.auth_failures.counted_as(self.connector, self.client_ip)
        self.log.info(
            f"Inbound AUTH refused: logon_failure_rate_limit "
            f"{self.connector.logon_failure_rate_limit} per minute reached for {counted_as}"
        )
        await self.protocol_error(replies.auth_rate_limited(counted_as))

    async def _challenge(self, text: str) -> str | None:
        self.out.append(f"334 {text}\r\n".encode("ascii"))
        self.log.sent(f"334 {text}" if text else "334")
        self._in_auth = True
        try:
            line = await self.read_line()
        finally:
            self._in_auth = False
        if line is None:
            raise _Close("Remote")
        self.log.received_auth_blob()
        answer = line.rstrip(b"\r\n").decode("ascii", "replace")
        if answer == "*":
            self.reply(replies.AUTH_CANCELLED)
            return None
        return answer


def _non_smtp(line: bytes, verb: str) -> str:
    """Why a command line is another protocol's, or "" when it may be SMTP: an HTTP request line, a
    header field, or a first octet that is ASCII but not a letter (a space, a digit, a control
    octet such as a TLS hello's 0x16). Verbs are case-insensitive (item 99: "mail from:" is
    SMTP); a non-ASCII first octet is left to the unknown-command reply (item 99: 500). An empty
    line is not cross-protocol either: some clients send a stray CRLF after the data."""
    if verb in _HTTP_VERBS:
        return "an HTTP request"
    if line.startswith(_TLS_HANDSHAKE):
        return "a TLS handshake: the client expects TLS at connect (implicit TLS, as on port 465)"
    first = line[:1]
    if first and first < b"\x80" and not first.isalpha():
        return "not starting with a letter"
    if _HEADER_FIELD.match(line):
        return "a header field"
    return ""


def _plain_with_initial_response(arg: str) -> bool:
    """`AUTH PLAIN <initial response>`: a mechanism done in one round trip, no security layer."""
    mechanism, _, initial = arg.strip().partition(" ")
    return mechanism.upper() == "PLAIN" and bool(initial.strip())


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _mask_auth(text: str) -> str:
    parts = text.split(" ")
    return " ".join(parts[:2]) + (" <authentication response>" if len(parts) > 2 else "")


def _span(seconds: float) -> str:
    whole = int(seconds)
    return f"0.{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def _valid_helo(domain: str) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        return _printable_ascii(domain)  # an address literal, not checked further (never trusted)
    try:
        parse_domain(domain, error=replies.INVALID_DOMAIN)
    except AddressError:
        # Devices send bare host names, underscores, and other near-domains; accept printable ASCII.
        return _printable_ascii(domain)
    return True


def _printable_ascii(text: str) -> bool:
    """At most 255 characters, each printable ASCII other than space (33-126)."""
    return len(text) <= 255 and text.isascii() and text.isprintable() and " " not in text


_HANDLERS = {
    "EHLO": Session.do_ehlo,
    "HELO": Session.do_helo,
    "MAIL": Session.do_mail,
    "RCPT": Session.do_rcpt,
    "DATA": Session.do_data,
    "RSET": Session.do_rset,
    "NOOP": Session.do_noop,
    "QUIT": Session.do_quit,
    "VRFY": Session.do_vrfy,
    "HELP": Session.do_help,
    "STARTTLS": Session.do_starttls,
    "AUTH": Session.do_auth,
    "BDAT": Session.do_bdat,
    "EXPN": Session.do_not_implemented,
    "ETRN": Session.do_not_implemented,
    "TURN": Session.do_not_implemented,
    "ATRN": Session.do_not_implemented,
}
