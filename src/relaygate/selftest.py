"""The open-relay self-test behind `relaygate test relay`: a fixed battery of relay attempts against a
running relay, from chosen source addresses, that never sends DATA.

Each attempt ("vector") is one MAIL FROM + RCPT TO whose recipient would be relayed to the external
domain if the relay accepted it: the plain form, Nmap smtp-open-relay's sixteen forms (null sender,
forged senders, percent hack, quoted local parts hiding an @ or %, user@ext@host, source routes, bang
paths) and security-bar §1B's (chained percent, the accepted domain as the routing host, an external
address literal, HELO spoofing, case and trailing-dot spellings, an SMTPUTF8 recipient, syntax
variants, user@local@ext, local!ext!user, a bare numeric domain, a comment, an external recipient
after a local one in one transaction). After the RCPT answer the transaction is reset with RSET (a
fresh connection when the server closed it, as RelayGate and Exchange do after
max_protocol_errors), and QUIT ends the session: no message is ever transferred, so nothing can be
relayed whatever the server answers. A reply no command here may get (354, 1xx, no code) or one
nobody asked for leaves the server out of step: nothing more is sent on that connection.

Verdicts: `refused` (5xx at MAIL or RCPT, or at the banner / EHLO), `accepted` (2xx to RCPT: the
relay would relay — the failure this test looks for), `deferred` (4xx: not decided, the relay may
answer otherwise later), `error` (connection or protocol problem, or the time budget ran out),
`skipped` (the vector needs the local domain or the server's name, unknown). Deferred and error
attempts leave the test incomplete (exit 2).
A recipient in the local domain (postmaster@LOCAL) is sent first as a control: accepted shows the
relay is up and accepts local mail; it never counts as a relay.

Bounded: every connect and reply waits at most `timeout` seconds, the battery is fixed, and each
source address has a total budget of `max_time` seconds (a tarpitting server delays every refusal);
vectors not tried within it are `error`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from relaygate.config.values import IPRange
from relaygate.smtp_transcript import (
    Reply,
    SMTPClosed,
    SMTPConnection,
    SMTPReplyError,
    Transcript,
    client_tls_context,
    split_server,
)

__all__ = [
    "BATTERY",
    "DEFAULT_EXTERNAL_DOMAIN",
    "DEFAULT_EXTERNAL_IP",
    "Attempt",
    "RelayTestOptions",
    "SourceResult",
    "Vector",
    "battery",
    "default_helo",
    "default_sender",
    "exit_code",
    "is_reserved_domain",
    "run_relay_test",
]

#: Nmap smtp-open-relay's default: a real domain of the Nmap project, meant for relay probes. Not a
#: reserved name (.example/.test/.invalid, example.com/net/org), which relays that check recipient
#: domains (Exchange RejectReserved*RecipientDomains, Postfix reject_unknown_recipient_domain)
#: refuse for the name, not for the missing relay right. Nothing reaches it: DATA is never sent.
DEFAULT_EXTERNAL_DOMAIN = "nmap.scanme.org"
#: The "external address literal" vector's address (TEST-NET-3, RFC 5737): never contacted.
DEFAULT_EXTERNAL_IP = "203.0.113.25"
#: The local part of every probe recipient.
PROBE_USER = "relaytest"

_RESERVED_TLDS = frozenset({"test", "example", "invalid", "localhost"})
_RESERVED_SLDS = frozenset({"example.com", "example.net", "example.org"})


def default_sender(external_domain: str) -> str:
    """The envelope sender when --from is not given: an address in the external domain, as a
    spammer's would be."""
    return f"{PROBE_USER}@{external_domain}"


def default_helo() -> str:
    """This host's name for EHLO as the system has it (gethostname: no DNS lookup, unlike
    socket.getfqdn, which has no timeout: a broken resolver hung `relaygate test relay` before
    any of its bounds applied), unless it is `localhost` or has no dot (then a name of our own,
    so that the HELO-spoofing attempts differ from the normal greeting)."""
    name = socket.gethostname()
    if "." not in name or name.lower().startswith("localhost"):
        return "relaygate-selftest.invalid"
    return name


def is_reserved_domain(domain: str) -> bool:
    """RFC 2606 names, which some relays refuse as recipient domains whatever the client's rights."""
    labels = domain.lower().rstrip(".").split(".")
    return labels[-1] in _RESERVED_TLDS or ".".join(labels[-2:]) in _RESERVED_SLDS


@dataclass(frozen=True, slots=True)
class Vector:
    """One relay attempt.

    id: a short stable name (`plain`, `percent-local`, ...); title: what it tries, in words;
    mail: the whole MAIL command; rcpt: the whole RCPT command; helo: the EHLO name to use (None:
    the default one); before: RCPT commands sent first in the same transaction (not deciding).
    """

    id: str
    title: str
    mail: str
    rcpt: str
    helo: str | None = None
    before: tuple[str, ...] = ()


@dataclass
class Attempt:
    """A vector's outcome: the commands sent, the deciding command and its reply, the verdict."""

    vector: str
    title: str
    verdict: str  # refused | accepted | deferred | error | skipped
    helo: str = ""
    commands: list[str] = field(default_factory=list)
    command: str = ""
    stage: str = ""  # banner | EHLO | MAIL | RCPT | connect | ""
    code: int | None = None
    reply: str = ""
    note: str = ""

    @property
    def temporary(self) -> bool:
        return self.verdict == "deferred"

    def to_dict(self) -> dict[str, Any]:
        return {
            "vector": self.vector,
            "title": self.title,
            "verdict": self.verdict,
            "helo": self.helo,
            "commands": self.commands,
            "command": self.command,
            "stage": self.stage,
            "code": self.code,
            "reply": self.reply,
            "temporary": self.temporary,
            "note": self.note,
        }


@dataclass
class RelayTestOptions:
    server: str
    source_ips: list[str | None]
    external_domain: str = DEFAULT_EXTERNAL_DOMAIN
    external_ip: str = DEFAULT_EXTERNAL_IP
    local_domain: str | None = None
    sender: str | None = None
    helo: str = field(default_factory=lambda: default_helo())
    tls: bool = False
    starttls: bool = False
    insecure: bool = False
    timeout: float = 10.0
    max_time: float = 300.0
    #: server.trusted_proxies of the relay's config (--config), and that file: a source address
    #: they cover gets no greeting (the relay waits for a PROXY header), which the error says
    trusted_proxies: tuple[IPRange, ...] = ()
    config_source: str = ""


@dataclass
class SourceResult:
    """Everything tried from one source address."""

    source_ip: str | None  # as asked (None: the OS picked)
    local: str = ""  # the address actually used
    peer: str = ""
    server_name: str = ""
    error: str = ""  # the first connection failed: nothing could be tried
    notes: list[str] = field(default_factory=list)  # what limits the result (TLS required, ...)
    #: MAIL was refused in clear for want of STARTTLS: nothing was decided for a TLS client
    needs_starttls: bool = False
    #: every MAIL FROM was refused for its sender (5xx, not 530): no RCPT was decided, and a
    #: client that sends as an address the server allows (allowed_senders) may still relay
    senders_refused: bool = False
    control: Attempt | None = None
    attempts: list[Attempt] = field(default_factory=list)
    transcript: Transcript = field(default_factory=Transcript)

    def counted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.verdict != "skipped"]

    @property
    def accepted(self) -> list[Attempt]:
        return [a for a in self.attempts if a.verdict == "accepted"]

    @property
    def errors(self) -> list[Attempt]:
        return [a for a in self.attempts if a.verdict == "error"]

    @property
    def deferred(self) -> list[Attempt]:
        return [a for a in self.attempts if a.verdict == "deferred"]

    @property
    def label(self) -> str:
        return self.local or self.source_ip or "(OS-chosen address)"

    def summary(self) -> str:
        if self.error:
            return f"error: {self.error}"
        tried = len(self.counted())
        if self.accepted:
            return (
                f"open relay: {len(self.accepted)} of {tried} attempts accepted from {self.label}"
            )
        if self.needs_starttls:
            return (
                f"no relay decision from {self.label}: the server wants STARTTLS before MAIL "
                "(run again with --starttls): the test is incomplete"
            )
        if self.senders_refused:
            return (
                f"no relay decision from {self.label}: every MAIL FROM was refused for its sender "
                "(run again with --from an address the clients send as): the test is incomplete"
            )
        if self.errors or self.deferred:
            why = [
                *([f"{len(self.deferred)} deferred with 4xx"] if self.deferred else []),
                *([f"{len(self.errors)} could not be completed"] if self.errors else []),
            ]
            undecided = len(self.deferred) + len(self.errors)
            return (
                f"no relay accepted from {self.label}, but {undecided} of {tried} attempts were "
                f"not decided ({', '.join(why)}): the test is incomplete"
            )
        return f"no relay accepted from {self.label} ({tried} attempts refused)"

    def to_dict(self) -> dict[str, Any]:
        return {
            "source_ip": self.source_ip,
            "local": self.local,
            "peer": self.peer,
            "server_name": self.server_name,
            "error": self.error or None,
            "notes": self.notes,
            "open_relay": bool(self.accepted),
            "senders_refused": self.senders_refused,
            "attempted": len(self.counted()),
            "accepted": len(self.accepted),
            "deferred": len(self.deferred),
            "errors": len(self.errors),
            "summary": self.summary(),
            "control": self.control.to_dict() if self.control else None,
            "attempts": [a.to_dict() for a in self.attempts],
            "transcript": self.transcript.to_list(),
        }


# -- the battery --------------------------------------------------------------------------------------


def _literal(ip: str) -> str:
    parsed = ipaddress.ip_address(ip.partition("%")[0])
    if isinstance(parsed, ipaddress.IPv6Address):
        mapped = parsed.ipv4_mapped
        return f"[{mapped}]" if mapped is not None else f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


_MAIL = "MAIL FROM:<{sender}>"
_MAIL_LITERAL = "MAIL FROM:<{user}@{literal}>"  # Nmap's sender for its routing tricks
_RCPT = "RCPT TO:<{user}@{ext}>"

#: The battery: (id, title, MAIL command, RCPT command, EHLO name or None for the usual one).
#: {sender} {user} {ext} {local} {name} (the server's host name) {literal} (the server's IP
#: literal) {ext_literal} {ext_mixed} are filled in; a vector whose {local} or {name} is unknown is
#: skipped. Nmap smtp-open-relay's sixteen are: plain (its 1st and 2nd), null-sender,
#: server-name-sender, server-literal-sender, percent-literal, percent-server-name, quoted-at,
#: quoted-percent, double-at-literal, quoted-at-literal, double-at-server-name,
#: source-route-literal, source-route-server-name, bang, bang-literal, bang-server-name.
BATTERY: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("plain", "plain recipient in the external domain", _MAIL, _RCPT, None),
    ("null-sender", "null sender <>", "MAIL FROM:<>", _RCPT, None),
    ("forged-local-sender", "forged sender in the local domain",
     "MAIL FROM:<postmaster@{local}>", _RCPT, None),
    ("server-name-sender", "sender at the server's own name", "MAIL FROM:<{user}@{name}>", _RCPT,
     None),
    ("server-literal-sender", "sender at the server's IP literal", _MAIL_LITERAL, _RCPT, None),
    ("percent-local", "percent hack via the local domain", _MAIL,
     "RCPT TO:<{user}%{ext}@{local}>", None),
    ("percent-chained", "chained percent hack", _MAIL,
     "RCPT TO:<{user}%{ext}%{local}@{local}>", None),
    ("percent-literal", "percent hack via the server's IP literal", _MAIL_LITERAL,
     "RCPT TO:<{user}%{ext}@{literal}>", None),
    ("percent-server-name", "percent hack via the server's name", _MAIL_LITERAL,
     "RCPT TO:<{user}%{ext}@{name}>", None),
    ("quoted-at", "quoted local part hiding an @", _MAIL_LITERAL, 'RCPT TO:<"{user}@{ext}">',
     None),
    ("quoted-percent", "quoted local part hiding a %", _MAIL_LITERAL,
     'RCPT TO:<"{user}%{ext}">', None),
    ("quoted-at-literal", "quoted @ at the server's IP literal", _MAIL_LITERAL,
     'RCPT TO:<"{user}@{ext}"@{literal}>', None),
    ("quoted-at-local", "quoted @ in the local domain", _MAIL, 'RCPT TO:<"{user}@{ext}"@{local}>',
     None),
    ("quoted-percent-local", "quoted % in the local domain", _MAIL,
     'RCPT TO:<"{user}%{ext}"@{local}>', None),
    ("double-at-literal", "user@ext@[server IP]", _MAIL_LITERAL,
     "RCPT TO:<{user}@{ext}@{literal}>", None),
    ("double-at-server-name", "user@ext@server-name", _MAIL_LITERAL,
     "RCPT TO:<{user}@{ext}@{name}>", None),
    ("double-at-local", "user@ext@local-domain", _MAIL, "RCPT TO:<{user}@{ext}@{local}>", None),
    ("source-route-literal", "source route via the server's IP literal", _MAIL_LITERAL,
     "RCPT TO:<@{literal}:{user}@{ext}>", None),
    ("source-route-server-name", "source route via the server's name", _MAIL_LITERAL,
     "RCPT TO:<@{name}:{user}@{ext}>", None),
    ("source-route-local", "multi-hop source route via the local domain", _MAIL,
     "RCPT TO:<@{local},@{ext}:{user}@{ext}>", None),
    ("bang", "bang path ext!user", _MAIL_LITERAL, "RCPT TO:<{ext}!{user}>", None),
    ("bang-literal", "bang path at the server's IP literal", _MAIL_LITERAL,
     "RCPT TO:<{ext}!{user}@{literal}>", None),
    ("bang-server-name", "bang path at the server's name", _MAIL_LITERAL,
     "RCPT TO:<{ext}!{user}@{name}>", None),
    ("bang-local", "bang path in the local domain", _MAIL, "RCPT TO:<{ext}!{user}@{local}>", None),
    ("external-literal", "external address literal", _MAIL, "RCPT TO:<{user}@{ext_literal}>",
     None),
    ("case", "external domain in mixed case", _MAIL, "RCPT TO:<{user}@{ext_mixed}>", None),
    ("trailing-dot", "external domain with a trailing dot", _MAIL, "RCPT TO:<{user}@{ext}.>",
     None),
    ("smtputf8", "SMTPUTF8 recipient (UTF-8 local part)", _MAIL + " SMTPUTF8",
     "RCPT TO:<{user}-\u00e9\u00e8@{ext}>", None),
    ("syntax-space", "a blank before the path", _MAIL, "RCPT TO: <{user}@{ext}>", None),
    ("syntax-no-brackets", "no angle brackets", _MAIL, "RCPT TO:{user}@{ext}", None),
    ("syntax-lowercase", "lower-case verbs", "mail from:<{sender}>", "rcpt to:<{user}@{ext}>",
     None),
    ("helo-server-name", "HELO spoofing: the server's own name", _MAIL, _RCPT, "{name}"),
    ("helo-localhost", "HELO spoofing: localhost", _MAIL, _RCPT, "localhost"),
    ("helo-literal", "HELO spoofing: the server's IP literal", _MAIL, _RCPT, "{literal}"),
    ("double-at-local-first", "user@local-domain@ext", _MAIL, "RCPT TO:<{user}@{local}@{ext}>",
     None),
    ("bang-chain-local", "bang path local!ext!user", _MAIL, "RCPT TO:<{local}!{ext}!{user}>", None),
    ("numeric-domain", "external IP without brackets", _MAIL, "RCPT TO:<{user}@{ext_ip}>", None),
    ("quoted-at-space-local", "quoted @ and blank in the local domain", _MAIL,
     'RCPT TO:<"{user}@{ext} x"@{local}>', None),
    ("comment-local", "a comment holding a local address", _MAIL,
     "RCPT TO:<{user}@{ext}(<postmaster@{local}>)>", None),
    ("syntax-nested-brackets", "doubled angle brackets", _MAIL, "RCPT TO:<<{user}@{ext}>>", None),
    ("syntax-display-name", "a display name before the path", _MAIL,
     "RCPT TO:<Name <{user}@{ext}>>", None),
    ("syntax-trailing-blank", "a blank after the path", _MAIL, _RCPT + " ", None),
    # two RCPTs in one transaction: a local recipient first (a relay that decided "allowed" once
    # must decide again for the next); only the last RCPT's answer decides
    ("mixed-transaction", "an external recipient after a local one", _MAIL,
     "RCPT TO:<postmaster@{local}>\n" + _RCPT, None),
)  # fmt: skip


def battery(
    *,
    external: str,
    sender: str,
    local: str | None,
    server_name: str | None,
    server_ip: str,
    external_ip: str,
) -> tuple[list[Vector], list[tuple[str, str, str]]]:
    """The vectors to try, in BATTERY's order, and those skipped as (id, title, why)."""
    values = {
        "sender": sender,
        "user": PROBE_USER,
        "ext": external,
        "local": local or "",
        "name": server_name or "",
        "literal": _literal(server_ip),
        "ext_literal": _literal(external_ip),
        "ext_ip": external_ip,
        "ext_mixed": _mixed_case(external),
    }
    vectors: list[Vector] = []
    skipped: list[tuple[str, str, str]] = []
    for vid, title, mail, rcpt, helo in BATTERY:
        text = f"{mail} {rcpt} {helo or ''}"
        if "{local}" in text and not local:
            skipped.append((vid, title, _NO_LOCAL))
        elif "{name}" in text and not server_name:
            skipped.append((vid, title, _NO_NAME))
        else:
            *before, deciding = rcpt.format(**values).split("\n")
            vectors.append(
                Vector(
                    vid,
                    title,
                    mail.format(**values),
                    deciding,
                    helo.format(**values) if helo else None,
                    tuple(before),
                )
            )
    return vectors, skipped


_NO_LOCAL = "no local domain (give --local-domain, or --config with an Authoritative domain)"
_NO_NAME = "the server announced no host name in its banner or EHLO reply"


def _mixed_case(domain: str) -> str:
    return "".join(c.upper() if i % 2 == 0 else c.lower() for i, c in enumerate(domain))


# -- running it ---------------------------------------------------------------------------------------


#: The server went away mid-session (it closes after max_protocol_errors, sometimes before our next
#: command is even written): the next attempt takes a fresh connection.
_LOST = (SMTPClosed, ConnectionResetError, ConnectionAbortedError, BrokenPipeError)


class _OutOfTime(Exception):
    """The source address's --max-time budget ran out."""


class _Probe:
    """The SMTP connection(s) of one source address: (re)connects on demand, EHLOs with the name
    the vector asks for, and enforces the per-reply timeout within the total budget."""

    def __init__(self, opts: RelayTestOptions, source_ip: str | None, result: SourceResult) -> None:
        self.opts = opts
        self.source_ip = source_ip
        self.result = result
        self.host, self.port = split_server(opts.server, 465 if opts.tls else 25)
        self.deadline = time.monotonic() + opts.max_time
        self.conn: SMTPConnection | None = None
        self.helo: str | None = None
        #: The server answered with a code no SMTP command here may get (1xx, 3xx such as 354, or no
        #: code): its state is unknown (in DATA mode whatever we send is message content), so
        #: nothing more is sent on this connection, not even RSET or QUIT.
        self.out_of_step = False
        self.context = client_tls_context(opts.insecure) if (opts.tls or opts.starttls) else None

    def _budget(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime()
        return min(self.opts.timeout, left)

    async def command(self, line: str) -> Reply:
        assert self.conn is not None
        self.conn.timeout = self._budget()
        await asyncio.sleep(0)  # let bytes already on the socket reach the reader
        if self.conn.unread():  # e.g. two replies to MAIL: RCPT would read the second one
            self.out_of_step = True
            try:
                unasked = await self.conn.read_reply()
            finally:
                await self.close()
            if unasked.code == 421:  # RFC 5321 §3.8: closing (timeout, shutdown, too many errors)
                raise SMTPClosed("421 before the next command")
            self.result.transcript.note("the server sent a reply nobody asked for")
            raise SMTPReplyError("a reply nobody asked for: the server is out of step")
        try:
            return self._check(await self.conn.command(line))
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise _OutOfTime() from None
            raise

    def _check(self, reply: Reply) -> Reply:
        if not 200 <= reply.code < 300 and not 400 <= reply.code < 600:
            self.out_of_step = True
        return reply

    async def close(self) -> None:
        if self.conn is not None:
            if self.conn.writer is not None and not self.conn.closed and not self.out_of_step:
                try:
                    self.conn.timeout = min(self.opts.timeout, 2.0)
                    await self.conn.command("QUIT")
                except (SMTPClosed, TimeoutError, OSError, ssl.SSLError):
                    pass
            await self.conn.close()
        self.conn, self.helo, self.out_of_step = None, None, False

    async def open(self, helo: str) -> tuple[str, str, Reply] | None:
        """Connect and greet with `helo`. Returns None when ready, else (stage, command, reply) of
        the refusal (banner, EHLO/HELO or STARTTLS). Raises OSError, TimeoutError, SMTPClosed or
        ssl.SSLError when it cannot connect, _OutOfTime when the budget ran out."""
        try:
            return await self._open(helo)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise _OutOfTime() from None
            raise

    async def _open(self, helo: str) -> tuple[str, str, Reply] | None:
        await self.close()
        conn = SMTPConnection(self.result.transcript, timeout=self._budget())
        self.conn = conn
        await conn.open(
            self.host,
            self.port,
            source_ip=self.source_ip,
            tls_context=self.context if self.opts.tls else None,
            server_hostname=self.host,
        )
        local, peer = conn.local_address, conn.peer_address
        self.result.local, self.result.peer = local[0], peer[0]
        conn.timeout = self._budget()
        banner = self._check(await conn.read_reply())
        if banner.code != 220:
            return "banner", "(connect)", banner
        if not self.result.server_name:
            self.result.server_name = _first_name(banner)
        ehlo = await self.command(f"EHLO {helo}")
        if ehlo.code != 250:
            if not 500 <= ehlo.code < 600:  # only "EHLO unknown" calls for HELO
                return "EHLO", f"EHLO {helo}", ehlo
            ehlo = await self.command(f"HELO {helo}")
            if ehlo.code != 250:
                return "EHLO", f"HELO {helo}", ehlo
        if self.opts.starttls:
            reply = await self.command("STARTTLS")
            if reply.code != 220:
                return "STARTTLS", "STARTTLS", reply
            assert self.context is not None
            await conn.starttls(self.context, self.host)
            ehlo = await self.command(f"EHLO {helo}")
            if ehlo.code != 250:
                return "EHLO", f"EHLO {helo}", ehlo
        name = _first_name(ehlo)
        if name:
            self.result.server_name = name
        self.helo = helo
        return None

    async def try_vector(self, vector: Vector, attempt: Attempt) -> None:
        """MAIL + RCPT (never DATA), then RSET; one retry on a fresh connection if the server
        closed the connection without answering."""
        helo = vector.helo or self.opts.helo
        attempt.helo = helo
        for retry in (False, True):
            try:
                if self.conn is None or self.conn.closed or self.helo != helo:
                    refusal = await self.open(helo)
                    if refusal is not None:
                        _decide(attempt, *refusal)
                        await self.close()
                        return
                attempt.commands = [vector.mail]
                attempt.command = vector.mail
                reply = await self.command(vector.mail)
                if not 200 <= reply.code < 300:
                    _decide(attempt, "MAIL", vector.mail, reply)
                else:  # the RCPTs `before` do not decide; the last one does
                    for line in (*vector.before, vector.rcpt):
                        attempt.commands.append(line)
                        attempt.command = line
                        reply = await self.command(line)
                        if self.out_of_step:
                            break
                    _decide(attempt, "RCPT", attempt.command, reply)
                await self._reset()
                return
            except SMTPReplyError as exc:  # unreadable: out of step, the connection was dropped
                await self.close()
                attempt.verdict, attempt.stage = "error", attempt.stage or "connect"
                attempt.note = f"unreadable reply ({exc})"
                return
            except _LOST:
                await self.close()
                if retry:
                    attempt.verdict, attempt.stage = "error", attempt.stage or "connect"
                    attempt.note = "the server closed the connection without answering (twice)"
                    return
            except TimeoutError:
                await self.close()
                attempt.verdict = "error"
                attempt.note = f"no answer within {self.opts.timeout:g}s"
                return

    async def _reset(self) -> None:
        if self.conn is None or self.conn.closed:
            return
        if self.out_of_step:
            await self.close()
            return
        try:
            reply = await self.command("RSET")
        except (*_LOST, TimeoutError, ssl.SSLError, _OutOfTime):  # the attempt is decided
            await self.close()
            return
        if reply.code != 250:
            await self.close()


def _decide(attempt: Attempt, stage: str, command: str, reply: Reply) -> None:
    attempt.stage, attempt.command, attempt.code, attempt.reply = (
        stage,
        command,
        reply.code,
        reply.line(),
    )
    if stage == "RCPT" and 200 <= reply.code < 300:
        attempt.verdict = "accepted"
    elif 400 <= reply.code < 500:
        attempt.verdict = "deferred"
    elif 500 <= reply.code < 600:
        attempt.verdict = "refused"
    else:
        attempt.verdict = "error"
        attempt.note = f"unexpected reply at {stage}"


_LOCAL_TARGET = (
    "a local recipient as RFC 5321 reads it: a relay only if the server routes its local part "
    "onward (percent hack, quoted @, bang path)"
)


def _local_target(rcpt: str, local: set[str | None]) -> bool:
    """Whether RCPT's path, read as RFC 5321 reads it (source route ignored, quotes kept), has no
    domain or one of `local` (the local domain, the server's name or IP literal)."""
    path = rcpt.partition(":")[2].strip().removeprefix("<").removesuffix(">")
    if path.startswith("@"):
        path = path.partition(":")[2]
    quoted, at = False, -1
    for i, c in enumerate(path):
        if c == '"':
            quoted = not quoted
        elif c == "@" and not quoted:
            at = i
    if at < 0:
        return True
    domain = path[at + 1 :].lower().rstrip(".")
    return domain in {name.lower() for name in local if name}


def _first_name(reply: Reply) -> str:
    """The host name a 220 banner or a 250 EHLO reply starts with (`relay.corp.example ...`)."""
    first = reply.lines[0].split() if reply.lines else []
    word = first[0] if first else ""
    if (
        "." not in word
        or word.startswith(("[", "<"))
        or not word.replace(".", "").replace("-", "").isalnum()
    ):
        return ""
    try:
        ipaddress.ip_address(word)
    except ValueError:
        return word.lower().rstrip(".")
    return ""


def _connect_error(exc: BaseException, opts: RelayTestOptions, source_ip: str | None) -> str:
    source = f"from {source_ip}" if source_ip else "from the OS-chosen address"
    where = f"{opts.server} {source}"
    if isinstance(exc, _OutOfTime):
        return (
            f"cannot test {where}: --max-time {opts.max_time:g}s ran out before the first greeting"
        )
    if isinstance(exc, TimeoutError):
        return f"cannot connect to {where}: no answer within {opts.timeout:g}s"
    if isinstance(exc, SMTPReplyError):
        return f"cannot test {where}: unreadable reply ({exc})"
    if isinstance(exc, SMTPClosed):
        return (
            f"{opts.server} closed the connection {source} before greeting: no receive connector "
            f"takes {source_ip or 'this address'} there? (`relaygate explain --client-ip ...`)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"TLS with {where} failed: {exc.reason or exc}" + (
            " (use --insecure to test anyway)"
            if isinstance(exc, ssl.SSLCertVerificationError)
            else ""
        )
    if isinstance(exc, OSError) and source_ip and exc.errno in (99, 49, 10049):  # EADDRNOTAVAIL
        return f"cannot connect to {opts.server}: --source-ip {source_ip} is not an address of this machine"
    if isinstance(exc, OSError) and source_ip and "no matching local address" in str(exc):
        version = ipaddress.ip_address(source_ip.partition("%")[0]).version
        return (
            f"cannot connect to {opts.server} from {source_ip}: the server has no IPv{version} "
            "address (an IPv4 --source-ip reaches IPv4 servers, an IPv6 one IPv6 servers)"
        )
    if isinstance(exc, OSError):
        return f"cannot connect to {where}: {os.strerror(exc.errno) if exc.errno else exc}"
    return f"cannot test {where}: {exc}"


def _proxy_wait_error(exc: BaseException, opts: RelayTestOptions, local: str | None) -> str:
    """The relay closed, or did not greet, a source address its server.trusted_proxies cover: it
    waited for a PROXY header (a load balancer's) that the tester does not send. "" otherwise."""
    if not local or not isinstance(exc, SMTPClosed | TimeoutError):
        return ""
    try:
        address = ipaddress.ip_address(local.partition("%")[0])
    except ValueError:
        return ""
    entry = next((r for r in opts.trusted_proxies if r.contains(address)), None)
    if entry is None:
        return ""
    return (
        f"{opts.server} did not greet {local}: {local} is in server.trusted_proxies ({entry.text}) "
        f"of {opts.config_source}: the relay waits for a PROXY header from it (as from a load "
        "balancer) and greets nobody without one; test from an address outside trusted_proxies "
        "(--source-ip), or through the load balancer"
    )


async def _run_source(opts: RelayTestOptions, source_ip: str | None) -> SourceResult:
    result = SourceResult(source_ip=source_ip)
    probe = _Probe(opts, source_ip, result)
    try:
        try:
            refusal = await probe.open(opts.helo)
        except (OSError, SMTPClosed, ssl.SSLError, _OutOfTime) as exc:
            result.error = _proxy_wait_error(exc, opts, result.local or source_ip) or (
                _connect_error(exc, opts, source_ip)
            )
            return result
        server_ip = result.peer
        sender = opts.sender or default_sender(opts.external_domain)
        vectors, skipped = battery(
            external=opts.external_domain,
            sender=sender,
            local=opts.local_domain,
            server_name=result.server_name or None,
            server_ip=server_ip,
            external_ip=opts.external_ip,
        )
        if refusal is not None:  # the banner or EHLO refuses this client: nothing can relay
            for vector in vectors:
                attempt = Attempt(vector.id, vector.title, "error", helo=opts.helo)
                _decide(attempt, *refusal)
                result.attempts.append(attempt)
            return result
        if opts.local_domain:
            rcpt = f"postmaster@{opts.local_domain}"
            control = Attempt("control", f"local recipient {rcpt}", "error")
            check = Vector("control", control.title, f"MAIL FROM:<{sender}>", f"RCPT TO:<{rcpt}>")
            await _attempt(probe, check, control)
            result.control = control
        for vector in vectors:
            attempt = Attempt(vector.id, vector.title, "error")
            result.attempts.append(attempt)
            await _attempt(probe, vector, attempt)
            if attempt.verdict == "accepted" and _local_target(
                vector.rcpt, {opts.local_domain, result.server_name, _literal(server_ip)}
            ):
                attempt.note = _LOCAL_TARGET
        for vid, title, why in skipped:
            result.attempts.append(Attempt(vid, title, "skipped", note=why))
        _add_notes(result, opts)
        return result
    finally:
        await probe.close()


def _add_notes(result: SourceResult, opts: RelayTestOptions) -> None:
    """What limits the result: refusals at MAIL are not relay decisions."""
    decided = [
        a for a in [result.control, *result.attempts] if a is not None and a.verdict != "skipped"
    ]
    at_mail = [a for a in decided if a.stage == "MAIL" and a.verdict == "refused"]
    if not (opts.tls or opts.starttls) and any(
        a.code == 530 and "TLS" in a.reply.upper() for a in at_mail
    ):  # "530 5.7.0 Must issue a STARTTLS command first" (530 5.7.1 is: not authenticated)
        result.needs_starttls = True
        result.notes.append(
            "the server wants STARTTLS before MAIL (530): these refusals are not relay decisions; "
            "run again with --starttls (--insecure for a self-signed certificate) to test what a "
            "TLS client may relay"
        )
    elif decided and len(at_mail) == len(decided) and not any(a.code == 530 for a in at_mail):
        # 550 5.7.1 "... permissions to send as this sender": the sender is what is refused, not
        # the client; a device's own sender would reach RCPT, where the relay is decided
        result.senders_refused = True
        result.notes.append(
            "every MAIL FROM was refused with a 5xx that is not an authentication requirement "
            "(530): the server refuses these senders (allowed_senders?), so no RCPT, and no relay "
            "decision, was reached; run again with --from an address the clients send as"
        )
    elif decided and len(at_mail) == len(decided):
        result.notes.append(
            "every MAIL FROM was refused: this address may not submit at all (AUTH required?), "
            "so no relay decision was reached"
        )


async def _attempt(probe: _Probe, vector: Vector, attempt: Attempt) -> None:
    try:
        await probe.try_vector(vector, attempt)
    except _OutOfTime:
        await probe.close()
        attempt.verdict = "error"
        attempt.note = f"not completed: --max-time {probe.opts.max_time:g}s ran out (tarpit?)"
    except (OSError, ssl.SSLError) as exc:
        await probe.close()
        attempt.verdict = "error"
        attempt.note = _connect_error(exc, probe.opts, probe.source_ip)


async def run_relay_test(
    opts: RelayTestOptions, *, on_source: Callable[[SourceResult], None] | None = None
) -> list[SourceResult]:
    """Run the battery from each source address in turn; `on_source` sees each result when done."""
    results: list[SourceResult] = []
    for source_ip in opts.source_ips:
        result = await _run_source(opts, source_ip)
        results.append(result)
        if on_source is not None:
            on_source(result)
    return results


def exit_code(results: list[SourceResult]) -> int:
    """1: some vector was accepted (an open relay); 2: a source could not be tested, or some vector
    was deferred (4xx) or could not be completed, or MAIL needs STARTTLS that was not used, or
    every sender was refused at MAIL (not for want of AUTH); 0: every vector refused from every
    source."""
    if any(r.accepted for r in results):
        return 1
    if any(
        r.error or r.errors or r.deferred or r.needs_starttls or r.senders_refused for r in results
    ):
        return 2
    return 0
