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

This module holds the session's life (start, run loop, stop) and its command dispatch, with
HELO/EHLO and the small verbs; the other parts are mixins beside it: session_io.py (the buffer,
replies and read timeouts), session_reload.py, session_transaction.py (MAIL, RCPT),
session_data.py (DATA) and session_auth.py (STARTTLS, AUTH), their shared state declared in
session_state.py.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING

from relaygate import replies
from relaygate.addresses import AddressError, parse_domain
from relaygate.config.model import Config, ReceiveConnector
from relaygate.policy.rights import SessionRights
from relaygate.replies import Reply
from relaygate.smtp.session_auth import _StarttlsAndAuth
from relaygate.smtp.session_data import _DataReception
from relaygate.smtp.session_io import _TLS_HANDSHAKE
from relaygate.smtp.session_io import MAX_COMMAND_LINE as MAX_COMMAND_LINE
from relaygate.smtp.session_io import READ_CHUNK as READ_CHUNK
from relaygate.smtp.session_state import _Close, _Transaction

if TYPE_CHECKING:
    from relaygate.smtp.connection import Connection
    from relaygate.smtp.server import ServerContext

__all__ = ["Session"]

# Commands answered in a row before the event loop gets a turn. A read that finds bytes waiting
# returns without one, so a client pipelining RSETs or RCPTs past the limit (neither is an error)
# would otherwise have its session run everything received, up to the 2 MB at which the
# connection stops reading: ~1 s during which no other session of the process is served.
_COMMANDS_PER_TURN = 64
_GROUP_ENDERS = frozenset(
    {"EHLO", "HELO", "DATA", "STARTTLS", "AUTH", "QUIT", "NOOP", "VRFY", "EXPN"}
)

# Exchange's HELP reply (exchange-semantics.md §5.2) without BDAT: CHUNKING is not offered.
_HELP_LINES = [
    "This server supports the following commands:",
    "HELO EHLO STARTTLS RCPT DATA RSET MAIL QUIT HELP AUTH",
]
_HELP_LOGGED = [f"214-{_HELP_LINES[0]}", f"214 {_HELP_LINES[1]}"]

# The request lines a browser or an HTTP proxy client starts with (Postfix's smtpd_forbidden_commands
# default: CONNECT GET POST).
_HTTP_VERBS = frozenset({"GET", "POST", "CONNECT"})

# A header field's name and colon ("Host: x", "User-Agent: ..."): printable ASCII without ":", blanks
# allowed before the colon, as message.py reads a header line. "MAIL FROM:" is not one: the space
# after MAIL comes before any colon.
_HEADER_FIELD = re.compile(rb"[!-9;-~]+[ \t]*:")


class Session(_DataReception, _StarttlsAndAuth):
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

    # -- session --------------------------------------------------------------------------------------
    def banner(self) -> str:
        if self.connector.banner:
            return self.connector.banner
        return f"220 {self.fqdn} Microsoft ESMTP MAIL Service ready at {self.ctx.banner_stamp()}"

    async def run(self) -> None:
        self.log.connect()
        # Exchange's order: "+", the session's permissions, then the banner (sequence 0, 1, 2).
        self.log.info(self.rights.log_tokens(), "Set Session Permissions")
        banner = self.banner()
        self.out.append(banner.encode("utf-8", "replace") + b"\r\n")
        self.log.sent(banner)
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
        if not domain and self.connector.require_ehlo_domain:
            self.reply(replies.EHLO_REQUIRES_DOMAIN)
            raise _Close()
        # Without RequireEHLODomain "the client isn't required to provide a domain name"
        # (Exchange): a device whose host name is empty says a bare EHLO, and is served.
        if domain and not _valid_helo(domain):
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
            lines.append("SMTPUTF8")  # only with 8BITMIME (RFC 6531 §3.1)
        self.pipelining = c.pipelining_enabled
        self.reply_lines(250, lines)
        self.log.log_ehlo_reply(lines)

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
        self.reply_lines(214, _HELP_LINES)
        self.log.log_ehlo_reply(_HELP_LOGGED)  # one line, as a multi-line EHLO reply is

    async def do_not_implemented(self, arg: str) -> None:
        await self.protocol_error(replies.NOT_IMPLEMENTED)

    async def do_bdat(self, arg: str) -> None:
        """CHUNKING is not advertised: the bytes after a BDAT line would be raw content, so never read
        them as commands (security-bar item 153): refuse and hang up."""
        self.buf.clear()
        self.reply(replies.NOT_IMPLEMENTED)
        raise _Close()


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


def _mask_auth(text: str) -> str:
    parts = text.split(" ")
    return " ".join(parts[:2]) + (" <authentication response>" if len(parts) > 2 else "")


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
