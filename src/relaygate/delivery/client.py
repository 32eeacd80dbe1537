"""The SMTP client: one message, one route, hops tried in order.

Built on aiosmtplib for the connection, TLS, EHLO parsing and the SASL exchanges. Two parts are our
own, on purpose:

* MAIL FROM / RCPT TO are written with ``SMTP.execute_command`` rather than ``SMTP.mail``/``rcpt``,
  because those run addresses through ``email.utils.parseaddr`` (the project has one strict address
  parser, and a relay must send the envelope it accepted, byte for byte);
* the message body is normalised (`relaygate.delivery.wire`: `prepare_data`, `normalise_for_wire`)
  before aiosmtplib sees it. aiosmtplib's own DATA step (bare CR/LF → CRLF, ``^.`` → ``..``, then
  ``.\\r\\n``) is then exactly the identity plus dot-stuffing on our CRLF-only input, so what
  reaches the wire is ``normalise_for_wire(data)``; a raw-socket test pins this byte for byte.

Rules (issue 4, security-bar §2D and §3J):

* EHLO with the connector fqdn / server fqdn; opportunistic STARTTLS whenever offered; TLS is
  *required* when the connector says ``require_tls``, uses ``implicit_tls``, a ``tls_auth_level`` other
  than EncryptionOnly (Exchange only allows those with RequireTLS), or an AUTH mechanism that must not
  run in clear (BasicAuthRequireTLS, XOAUTH2). Required TLS that is not offered, refused or fails →
  the hop fails transiently and not a byte of MAIL or credentials is written.
* EncryptionOnly: no certificate check. CertificateValidation: chain against the system CAs plus
  ``tls_ca_file``. DomainValidation: chain and name == ``tls_domain`` (or the hop's host name).
  Certificate failures are transient (deferred), like Exchange. When TLS is only opportunistic and
  the handshake fails, the hop is retried once in clear (as Postfix does).
* Failover to the next hop only when the whole transaction failed transiently (connect error or
  timeout, 4xx/5xx greeting, EHLO/TLS/AUTH failure, 4xx to MAIL, every RCPT 4xx, 4xx or a dropped
  connection at DATA). Once a host has answered 250 to the end of DATA we stop: never a copy to each.
* RCPT replies are per recipient; a 4xx/5xx to DATA applies to every accepted recipient.
* Credentials come from a file (trailing newline stripped) or an environment variable, or an OAuth
  token provider for XOAUTH2; they are never logged, never put in a reply, never in a repr.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import logging
import re
import socket
import ssl
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, cast

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relaygate import replies
from relaygate.delivery.credentials import Credentials
from relaygate.delivery.nexthop import NextHop
from relaygate.delivery.oauth import TokenError
from relaygate.delivery.pipeline import ReplyReader
from relaygate.delivery.wire import dot_stuff, header_is_ascii, prepare_data
from relaygate.logs.privacy import AddressPrivacy
from relaygate.replies import (
    AUTH_NEEDS_TLS,
    AUTH_NOT_OFFERED,
    CREDENTIALS_MISSING,
    SMTPUTF8_NOT_SUPPORTED,
    TLS_NOT_OFFERED,
    TOKEN_UNAVAILABLE,
    UNABLE_TO_CONNECT,
    Reply,
    tls_failed,
)
from relaygate.replies import CONNECTION_DROPPED_SEND as CONNECTION_DROPPED

__all__ = [
    "AUTH_NOT_OFFERED",
    "CONNECTION_DROPPED",
    "CREDENTIALS_MISSING",
    "SMTPUTF8_NOT_SUPPORTED",
    "TLS_NOT_OFFERED",
    "TOKEN_UNAVAILABLE",
    "UNABLE_TO_CONNECT",
    "ConnectionPool",
    "DeliveryOutcome",
    "deliver",
    "helo_name_for",
    "load_tls_context",
    "remote_reply",
    "tls_context_for",
    "tls_failed",
]

log = logging.getLogger("relaygate.delivery")

_TLS_LEVELS = ("EncryptionOnly", "CertificateValidation", "DomainValidation")
_AUTH_TLS_ONLY = ("BasicAuthRequireTLS", "XOAUTH2")


# ==================================================================================================
# outcome


@dataclass
class DeliveryOutcome:
    """The result of one delivery attempt over one route.

    per_recipient: the reply for every recipient (2xx delivered, 4xx retry, 5xx failed).
    hop_used: the hop that took the transaction (``host[ip]:port``), None if no hop did.
    transcript_errors: one line per failed hop (``hop: reply``), for the queue's LastError and logs.
    data_reply: the remote's answer to the end of DATA, when it got that far.
    """

    per_recipient: dict[str, Reply]
    hop_used: str | None = None
    transcript_errors: list[str] = field(default_factory=list)
    data_reply: Reply | None = None

    @property
    def delivered(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_positive]

    @property
    def deferred(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_transient]

    @property
    def failed(self) -> list[str]:
        return [r for r, reply in self.per_recipient.items() if reply.is_permanent]


# ==================================================================================================
# helpers

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})(?:\s+|$)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # C0, DEL and C1


def remote_reply(code: int, message: str) -> Reply:
    """A remote host's reply as a `Reply` (enhanced code of the reply's class split off, lines
    joined, controls dropped).
    Bytes that are not UTF-8 (aiosmtplib reads them as lone surrogates) become U+FFFD: the queue
    store, the logs and the NDR all need text that encodes."""
    if message and not message.isascii():
        message = message.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    enhanced = ""
    klass = str(code)[:1]
    parts: list[str] = []
    for raw_line in (message or "").splitlines() or [""]:
        line = _CONTROL.sub("", raw_line).strip()
        m = _ENHANCED.match(line)
        # An enhanced code of another class than the reply's (a "250-2.6.0" line ahead of
        # "554 5.6.0") is text: a 554 must not be reported with Status 2.6.0.
        if m and m.group(1)[0] == klass:
            if not enhanced:
                enhanced = m.group(1)
            if m.group(1) == enhanced:
                line = line[m.end() :]
        if line:
            parts.append(line)
    text = " ".join(parts)
    if len(text) > 512:
        text = text[:509] + "..."
    return Reply(int(code), enhanced, text)


def _seconds(value: Any, default: float) -> float:
    if value is None:
        return default
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


def _wire_address(address: str) -> str | None:
    """The address as it goes between <>, or None if it cannot be put on a command line safely."""
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if _CONTROL.search(a) or "<" in a or ">" in a:
        return None
    # spaces only inside a quoted local part
    if " " in a:
        local, at, _dom = a.rpartition("@")
        if not (at and local.startswith('"') and local.endswith('"') and " " not in _dom):
            return None
    return a


def helo_name_for(connector: Any, server_fqdn: str) -> str:
    """The EHLO name: the send connector's ``fqdn`` when set, else the server's (Exchange's Fqdn)."""
    return (getattr(connector, "fqdn", None) or "").strip() or server_fqdn


def _tls_level(connector: Any) -> str:
    level = getattr(connector, "tls_auth_level", "EncryptionOnly") or "EncryptionOnly"
    return level if level in _TLS_LEVELS else "DomainValidation"  # unknown → strictest


def _tls_required(connector: Any) -> bool:
    mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
    return bool(
        getattr(connector, "require_tls", False)
        or getattr(connector, "implicit_tls", False)
        or _tls_level(connector) != "EncryptionOnly"
        or mech in _AUTH_TLS_ONLY
    )


@functools.lru_cache(maxsize=32)
def _cached_context(
    level: str,
    ca_file: tuple[str, str] | None,
    client_cert: tuple[str, str, str] | None = None,
) -> ssl.SSLContext:
    """ca_file: (CA file, digest of it); client_cert: (certificate file, key file, digest of
    both). The digests are in the cache key only so that a CA file replaced or a certificate
    renewed under the same file names gets a new context."""
    if level == "EncryptionOnly":
        # create_default_context's settings without its trust store, which this level never
        # consults: loading the system's CAs took 21 ms, on the event loop, at the first delivery.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            try:
                ctx.load_verify_locations(cafile=ca_file[0])
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise _TlsFileError("the CA file (tls_ca_file)", exc) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = level == "DomainValidation"
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert[0], client_cert[1])
        except (OSError, ValueError) as exc:
            raise _TlsFileError("the client certificate (tls_certificate_file)", exc) from None
    return ctx


class _TlsFileError(ValueError):
    """A send connector's TLS file cannot be loaded; the message names which key it is."""

    def __init__(self, what: str, exc: BaseException) -> None:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        super().__init__(f"{what} cannot be loaded: {detail}")


#: file names (the CA file; the certificate and key files) → digest of their bytes when last
#: loaded (load_tls_context): which cached context `tls_context_for` takes, without reading the
#: files at every session.
_file_digests: dict[tuple[str, ...], str] = {}


def _client_cert(connector: Any) -> tuple[str, str] | None:
    cert = getattr(connector, "tls_certificate_file", None)
    key = getattr(connector, "tls_key_file", None)
    return (str(cert), str(key)) if cert and key else None


def _ca_file(connector: Any) -> tuple[str] | None:
    ca = getattr(connector, "tls_ca_file", None)
    return (str(ca),) if ca else None


def _known_digest(files: tuple[str, ...]) -> str:
    digest = _file_digests.get(files)
    if digest is None:  # not loaded yet (a caller that did not go through load_tls_context)
        digest = _file_digest(files)
        _file_digests[files] = digest
    return digest


def _context_for(connector: Any, digest: Callable[[tuple[str, ...]], str]) -> ssl.SSLContext:
    ca = _ca_file(connector)
    files = _client_cert(connector)
    return _cached_context(
        _tls_level(connector),
        None if ca is None else (ca[0], digest(ca)),
        None if files is None else (*files, digest(files)),
    )


def tls_context_for(connector: Any) -> ssl.SSLContext:
    """The client TLS context for the connector's tls_auth_level (cached per level, CA file and
    client certificate; the files as `load_tls_context` last read them)."""
    return _context_for(connector, _known_digest)


def _file_digest(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(f"unreadable: {exc}".encode())
        h.update(b"\0")
    return h.hexdigest()


def load_tls_context(connector: Any) -> ssl.SSLContext:
    """`tls_context_for`, after reading the CA file and the client certificate files again
    (blocking: the queue manager calls it in a thread at start and at every reload). A CA file
    replaced or a certificate renewed under the same file names is taken up by new sessions from
    then on, as a reload reopens an implicit-TLS listener whose certificate changed. Raises
    OSError/ssl.SSLError when they cannot be loaded."""
    fresh: dict[tuple[str, ...], str] = {}

    def reread(files: tuple[str, ...]) -> str:
        fresh[files] = _file_digest(files)
        return fresh[files]

    # built before it is published: the event loop never loads it itself
    ctx = _context_for(connector, reread)
    _file_digests.update(fresh)
    return ctx


def _server_name(connector: Any, hop: NextHop) -> str:
    """SNI and, with DomainValidation, the name the certificate must carry."""
    tls_domain = (getattr(connector, "tls_domain", "") or "").strip()
    return tls_domain or hop.tls_name or hop.host


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate validation failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    return f"TLS handshake failed: {type(exc).__name__}"


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None


class _HopFailed(Exception):
    """The whole transaction failed on this hop; try the next one.

    retry_plain: opportunistic TLS failed, a clear-text retry of the same hop is allowed.
    connection_lost: the session died (a pooled session may simply have gone stale).
    """

    def __init__(
        self, reply: Reply, *, retry_plain: bool = False, connection_lost: bool = False
    ) -> None:
        super().__init__(reply.line())
        self.reply = reply
        self.retry_plain = retry_plain
        self.connection_lost = connection_lost


# ==================================================================================================
# sessions and the pool


@dataclass(eq=False)
class _Session:
    smtp: aiosmtplib.SMTP
    key: tuple[Any, ...]
    tls: bool
    messages: int = 0
    #: The connector's smtp_max_messages_per_connection (Exchange's SmtpMaxMessagesPerConnection).
    max_messages: int = 20
    idle_since: float = 0.0
    #: No transaction in progress on the server (the last one ended with its final reply, or
    #: RSET): a reused session can start with MAIL, without an RSET round trip.
    clean: bool = True

    @property
    def alive(self) -> bool:
        return bool(self.smtp.is_connected)

    def close(self) -> None:
        try:
            self.smtp.close()
        except Exception:  # pragma: no cover - closing must never raise
            pass

    async def quit(self, timeout: float | None = None) -> None:
        """QUIT, waiting at most 2 s and never longer than the connector's timeout (the
        session's own: a next hop that never answers QUIT must not hold a pool's close)."""
        if timeout is None:
            own = self.smtp.timeout
            timeout = 2.0 if own is None else min(float(own), 2.0)
        try:
            if self.smtp.is_connected:
                await self.smtp.quit(timeout=timeout)
        except Exception:  # QUIT is a courtesy; the session is being dropped either way
            pass
        finally:
            self.close()


class ConnectionPool:
    """Open, authenticated sessions kept for `idle_seconds` so the next message to the same hop
    through the same connector reuses them (RSET first only when the last transaction did not end cleanly). At most `max_size` idle sessions
    and, per session, its connector's smtp_max_messages_per_connection messages (Exchange's
    SmtpMaxMessagesPerConnection, 20 by default); `max_messages_per_connection` lowers that cap
    for every connector (None: the connectors' own)."""

    def __init__(
        self,
        *,
        idle_seconds: float = 5.0,
        max_size: int = 16,
        max_messages_per_connection: int | None = None,
    ) -> None:
        self.idle_seconds = idle_seconds
        self.max_size = max_size
        self.max_messages_per_connection = max_messages_per_connection
        self._idle: dict[tuple[Any, ...], list[_Session]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.TimerHandle | None = None
        self._closed = False

    @staticmethod
    def key_for(hop: NextHop, connector: Any, helo_name: str) -> tuple[Any, ...]:
        return (
            hop.ip,
            hop.port,
            _server_name(connector, hop),
            getattr(connector, "name", ""),
            getattr(connector, "auth_username", ""),
            helo_name.lower(),
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self._idle.values())

    def _discard(self, session: _Session) -> None:
        task = asyncio.get_running_loop().create_task(session.quit())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def take(self, key: tuple[Any, ...]) -> _Session | None:
        """An idle session for `key`, or None. The caller must RSET it first unless it is `clean`."""
        sessions = self._idle.get(key)
        now = time.monotonic()
        while sessions:
            s = sessions.pop()
            if not sessions:
                self._idle.pop(key, None)
            if s.alive and now - s.idle_since <= self.idle_seconds:
                return s
            self._discard(s)
        return None

    def put(self, session: _Session) -> bool:
        """Keep `session` for reuse; False (and the session is closed) when it cannot be kept."""
        if (
            self._closed
            or not session.alive
            or session.messages >= session.max_messages
            or (
                self.max_messages_per_connection is not None
                and session.messages >= self.max_messages_per_connection
            )
            or self.idle_seconds <= 0
        ):
            self._discard(session)
            return False
        if len(self) >= self.max_size:
            oldest_key, oldest = min(
                ((k, s) for k, v in self._idle.items() for s in v), key=lambda ks: ks[1].idle_since
            )
            self._idle[oldest_key].remove(oldest)
            if not self._idle[oldest_key]:
                del self._idle[oldest_key]
            self._discard(oldest)
        session.idle_since = time.monotonic()
        self._idle.setdefault(session.key, []).append(session)
        self._schedule_reap()
        return True

    def _schedule_reap(self) -> None:
        if self._reaper is None:
            loop = asyncio.get_running_loop()
            self._reaper = loop.call_later(self.idle_seconds + 0.05, self._reap)

    def _reap(self) -> None:
        self._reaper = None
        now = time.monotonic()
        for key in list(self._idle):
            keep = []
            for s in self._idle[key]:
                if s.alive and now - s.idle_since <= self.idle_seconds:
                    keep.append(s)
                else:
                    self._discard(s)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._schedule_reap()

    async def aclose(self) -> None:
        """QUIT every idle session."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        sessions = [s for v in self._idle.values() for s in v]
        self._idle.clear()
        await asyncio.gather(*(s.quit() for s in sessions), return_exceptions=True)
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


# ==================================================================================================
# one hop


def _source_address(connector: Any, hop: NextHop) -> str | None:
    """The connector's source_ip_address for this hop (Exchange's SourceIPAddress); None: any.
    An address of the other family than the hop's cannot reach it: the hop fails."""
    source = (getattr(connector, "source_ip_address", None) or "").strip()
    if not source:
        return None
    ip = ipaddress.ip_address(source)  # validated at load
    if (ip.version == 6) != (":" in hop.ip):
        if ip.version == 6 and ip.ipv4_mapped is not None and ":" not in hop.ip:
            return str(ip.ipv4_mapped)
        raise _HopFailed(
            Reply(
                451,
                "4.4.0",
                f"Failed to connect. source_ip_address {source} is IPv{ip.version} and "
                f"the next hop {hop.ip} is not",
            )
        )
    return str(ip)


async def _connect_socket(hop: NextHop, timeout: float, source: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in hop.ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    if source is not None:
        try:
            sock.bind((source, 0))
        except OSError as exc:
            sock.close()
            raise _HopFailed(
                Reply(
                    451,
                    "4.4.0",
                    f"Failed to connect. Cannot bind source_ip_address {source}: "
                    f"{exc.strerror or exc}",
                )
            ) from None
    try:
        await asyncio.wait_for(loop.sock_connect(sock, (hop.ip, hop.port)), timeout)
    except TimeoutError:
        sock.close()
        raise _HopFailed(replies.CONNECTION_TIMEOUT) from None
    except OSError:
        sock.close()
        raise _HopFailed(UNABLE_TO_CONNECT) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def _helo(smtp: aiosmtplib.SMTP, helo_name: str, timeout: float) -> None:
    """force_helo (Exchange's ForceHELO): HELO, never EHLO, hence no extension at all."""
    try:
        await smtp.helo(hostname=helo_name, timeout=timeout)
    except SMTPHeloError as exc:
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None


async def _ehlo(smtp: aiosmtplib.SMTP, helo_name: str, timeout: float) -> None:
    try:
        await smtp.ehlo(hostname=helo_name, timeout=timeout)
    except SMTPHeloError as exc:
        if exc.code >= 500 and smtp.is_connected:
            try:
                await smtp.helo(hostname=helo_name, timeout=timeout)
                return
            except SMTPHeloError as exc2:
                raise _HopFailed(remote_reply(exc2.code, exc2.message)) from None
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None


async def _open_session(
    hop: NextHop,
    connector: Any,
    helo_name: str,
    credentials: Credentials | None,
    timeout: float,
    key: tuple[Any, ...],
    *,
    allow_starttls: bool,
) -> _Session:
    tls_required = _tls_required(connector)
    implicit = bool(getattr(connector, "implicit_tls", False))
    try:
        ctx = tls_context_for(connector)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        # A CA file or client certificate that cannot be loaded (_TlsFileError says which):
        # deferred with the reason, never sent without the trust store the connector asks for
        # or the certificate the next hop may recognise the relay by.
        unusable = exc if isinstance(exc, _TlsFileError) else _TlsFileError("its TLS files", exc)
        raise _HopFailed(tls_failed(str(unusable))) from None
    server_name = _server_name(connector, hop)
    force_helo = bool(getattr(connector, "force_helo", False))
    if force_helo or getattr(connector, "ignore_starttls", False):
        allow_starttls = False
    sock = await _connect_socket(hop, timeout, _source_address(connector, hop))
    smtp = aiosmtplib.SMTP(
        hostname=server_name if implicit else hop.ip,
        sock=sock,
        local_hostname=helo_name,
        timeout=timeout,
        use_tls=implicit,
        start_tls=False,
        tls_context=ctx,
    )
    try:
        try:
            await smtp.connect()
        except SMTPConnectResponseError as exc:  # 4xx/5xx greeting
            raise _HopFailed(remote_reply(exc.code, exc.message)) from None
        except SMTPConnectTimeoutError:
            raise _HopFailed(replies.CONNECTION_TIMEOUT) from None
        except (SMTPConnectError, SMTPServerDisconnected, OSError) as exc:
            ssl_exc = _find_ssl_error(exc)
            if ssl_exc is not None:
                raise _HopFailed(tls_failed(_tls_reason(ssl_exc))) from None
            raise _HopFailed(CONNECTION_DROPPED, connection_lost=True) from None

        if force_helo:
            await _helo(smtp, helo_name, timeout)
        else:
            await _ehlo(smtp, helo_name, timeout)
        tls = implicit
        if not tls and allow_starttls and smtp.supports_extension("starttls"):
            try:
                await smtp.starttls(server_hostname=server_name, tls_context=ctx, timeout=timeout)
            except SMTPResponseException as exc:  # the server refused STARTTLS
                if tls_required:
                    raise _HopFailed(remote_reply(exc.code, exc.message)) from None
            except (ssl.SSLError, ssl.CertificateError) as exc:
                raise _HopFailed(
                    tls_failed(_tls_reason(exc)), retry_plain=not tls_required
                ) from None
            except (TimeoutError, SMTPTimeoutError):
                raise _HopFailed(
                    tls_failed("timed out during the TLS handshake"),
                    retry_plain=not tls_required,
                ) from None
            except (SMTPServerDisconnected, OSError) as exc:
                ssl_exc = _find_ssl_error(exc)
                reason = _tls_reason(ssl_exc) if ssl_exc else "connection lost during handshake"
                raise _HopFailed(tls_failed(reason), retry_plain=not tls_required) from None
            else:
                tls = True
                try:
                    await _ehlo(smtp, helo_name, timeout)
                except (SMTPServerDisconnected, OSError) as exc:
                    # TLS 1.3: the server checks our certificate (or its absence) after our
                    # side of the handshake is done; its alert, if it sends one before closing,
                    # arrives instead of the EHLO reply.
                    if isinstance(exc, SMTPTimeoutError | TimeoutError):
                        raise
                    ssl_exc = _find_ssl_error(exc)
                    reason = (
                        _tls_reason(ssl_exc)
                        if ssl_exc is not None
                        else "TLS handshake failed: the server closed the connection at once "
                        + (
                            "(does it accept the client certificate, tls_certificate_file?)"
                            if _client_cert(connector)
                            else "(does it require a client certificate? see tls_certificate_file)"
                        )
                    )
                    raise _HopFailed(tls_failed(reason), retry_plain=not tls_required) from None
        if tls_required and not tls:
            raise _HopFailed(TLS_NOT_OFFERED)

        await _authenticate(smtp, connector, credentials, tls, timeout)
        limit = getattr(connector, "smtp_max_messages_per_connection", 20)
        return _Session(smtp, key, tls, max_messages=limit if isinstance(limit, int) else 20)
    except _HopFailed:
        await _Session(smtp, key, False).quit(timeout=min(timeout, 2.0))
        raise
    except SMTPResponseException as exc:
        # A greeting or EHLO/AUTH reply that is not SMTP (garbled, over-long): this hop failed,
        # like one that refused us; the next hop may take the message. Left to the caller, it
        # ended the whole attempt without trying the other hops.
        smtp.close()
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None
    except (SMTPServerDisconnected, SMTPTimeoutError, OSError) as exc:
        smtp.close()
        reply = (
            replies.CONNECTION_TIMEOUT
            if isinstance(exc, SMTPTimeoutError | TimeoutError)
            else CONNECTION_DROPPED
        )
        raise _HopFailed(reply, connection_lost=True) from None
    except BaseException:
        smtp.close()
        raise


async def _authenticate(
    smtp: aiosmtplib.SMTP,
    connector: Any,
    credentials: Credentials | None,
    tls: bool,
    timeout: float,
) -> None:
    mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
    if mech not in ("BasicAuth", "BasicAuthRequireTLS", "XOAUTH2"):
        return
    if credentials is None:
        raise _HopFailed(CREDENTIALS_MISSING)
    if mech in _AUTH_TLS_ONLY and not tls:
        raise _HopFailed(AUTH_NEEDS_TLS)
    if not smtp.supports_extension("auth"):
        raise _HopFailed(AUTH_NOT_OFFERED)
    offered = {m.lower() for m in smtp.server_auth_methods}
    try:
        if mech == "XOAUTH2":
            if "xoauth2" not in offered or credentials.token_provider is None:
                raise _HopFailed(AUTH_NOT_OFFERED)
            provider = credentials.token_provider
            token = await _token(provider)
            try:
                await smtp.auth_xoauth2(credentials.username, token, timeout=timeout)
            except SMTPAuthenticationError as exc:
                # 535: the token was refused (revoked, or the delegation changed while it was
                # cached). A provider that caches drops it, so the next connection asks a new one.
                # The AUTH is tried once more at once only with a token that had been accepted:
                # one never accepted would be refused again (a mailbox without SMTP AUTH, a
                # missing scope), and each failed AUTH counts towards the account's lock-out.
                invalidate = getattr(provider, "invalidate", None)
                if exc.code != 535 or invalidate is None:
                    raise
                await invalidate()
                if _accepted_tokens.get(provider) != token:
                    raise
                log.info("the smart host refused the OAuth token (%s); asking a new one", exc.code)
                token = await _token(provider)
                await smtp.auth_xoauth2(credentials.username, token, timeout=timeout)
            try:
                _accepted_tokens[provider] = token
            except TypeError:  # not weakly referenceable: no retry after a 535
                pass
        elif "plain" in offered and credentials.password is not None:
            await smtp.auth_plain(credentials.username, credentials.password, timeout=timeout)
        elif "login" in offered and credentials.password is not None:
            await smtp.auth_login(credentials.username, credentials.password, timeout=timeout)
        else:
            raise _HopFailed(AUTH_NOT_OFFERED)
    except SMTPAuthenticationError as exc:
        # Exchange keeps the message in Retry on an authentication failure: an administrator fixes
        # the credentials, the queue drains. The remote text is kept; our credentials are not in it.
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None
    except SMTPResponseException as exc:
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None


#: token provider → the last token a smart host accepted from it (see _authenticate).
_accepted_tokens: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()


async def _token(provider: Any) -> str:
    try:
        return str(await provider())
    except TokenError as exc:  # worded without the secret (see oauth.py, google_oauth.py)
        log.warning("OAuth token unavailable: %s", exc)
        # The provider's error (Entra ID's or Google's code and description) in the reply, so
        # the queue's LastError says why; the TokenError's text never holds a secret.
        text = " ".join(str(exc).split())
        text = text if len(text) <= 300 else text[:297] + "..."
        raise _HopFailed(
            Reply(
                TOKEN_UNAVAILABLE.code,
                TOKEN_UNAVAILABLE.enhanced,
                f"{TOKEN_UNAVAILABLE.text}: {text}",
            )
        ) from None
    except Exception as exc:  # another provider's message may carry secrets: type only
        log.warning("OAuth token provider failed: %s", type(exc).__name__)
        raise _HopFailed(TOKEN_UNAVAILABLE) from None


@dataclass
class _Envelope:
    sender: str  # wire form (between <>)
    recipients: dict[str, str]  # original → wire form
    prepared: bytes
    eight_bit: bool
    utf8_required: bool  # a UTF-8 envelope sender, or SMTPUTF8 declared and UTF-8 headers
    #: `prepared` dot-stuffed (the octets before ".CRLF"), shared by every hop.
    stuffed: bytes

    @property
    def wire_size(self) -> int:
        """The octets sent after the 354 (SIZE=): the stuffed content and ".CRLF"."""
        return len(self.stuffed) + 3


#: Content of this size or more goes to the transport in pieces of this size (see `_write_content`).
_CONTENT_PIECE = 64 * 1024


async def _write_content(
    write: Callable[[bytes], None],
    flow: Any,
    transport: asyncio.BaseTransport | None,
    body: bytes,
    timeout: float,
) -> None:
    """The stuffed content and ``.CRLF``. A small message (the usual case) is one write. A
    bigger one goes in pieces, and whenever the transport's buffer is full (`flow`: the
    aiosmtplib protocol, whose pause_writing/resume_writing track it) the next piece waits for
    it to drain, at most `timeout`: the timeout bounds each wait for the next hop, as the reply
    timeout that follows does. Handed over at once, the whole transfer counted against the wait
    for the final reply, and a message slower to send than the timeout could never be
    delivered. A connection lost meanwhile ends the writing: the reply read next says what
    happened (a refusal the next hop sent before closing, or the lost connection); `transport`
    closing is the first sign of it (asyncio logs a warning for every write after that)."""
    if len(body) < _CONTENT_PIECE:
        write(body + b".\r\n")
        return
    _bound_write_buffer(transport)
    # Pieces are copies, 64 KiB at a time: the transport copies what the socket does not take
    # at once anyway, and a bytes piece is what every transport (TLS, uvloop) accepts.
    for start in range(0, len(body), _CONTENT_PIECE):
        if transport is None or transport.is_closing():
            return
        write(body[start : start + _CONTENT_PIECE])
        if getattr(flow, "_paused", False) or getattr(flow, "_connection_lost", False):
            try:
                await asyncio.wait_for(flow._drain_helper(), timeout)
            except TimeoutError:
                raise SMTPTimeoutError("Timed out sending the message content") from None
            except ConnectionError:
                return
    if transport is not None and not transport.is_closing():
        write(b".\r\n")


def _bound_write_buffer(transport: asyncio.BaseTransport | None) -> None:
    """Make `transport` ask for a pause once a piece of content waits in it. A TCP transport
    does so at 64 KiB already; a TLS one (asyncio's and uvloop's) only at 512 KiB, so up to
    that much content was still to go when the wait for the final reply began, and a link too
    slow to move it within the timeout cut off every attempt. Kept for the rest of the
    connection (a pooled one's next content is paced alike; commands are far smaller)."""
    try:
        _low, high = cast(asyncio.WriteTransport, transport).get_write_buffer_limits()
        if high > _CONTENT_PIECE:
            cast(asyncio.WriteTransport, transport).set_write_buffer_limits(high=_CONTENT_PIECE)
    except (AttributeError, NotImplementedError):  # a transport without flow control limits
        return


class _DataRefused(SMTPDataError):
    """DATA refused, saying whether it was the DATA command or the end of the content."""

    def __init__(self, code: int, message: str, *, after_content: bool) -> None:
        super().__init__(code, message)
        self.after_content = after_content


async def _data(smtp: aiosmtplib.SMTP, env: _Envelope, timeout: float) -> aiosmtplib.SMTPResponse:
    """DATA, then the octets of `normalise_for_wire`.

    `SMTP.data()` would run aiosmtplib's own line-ending regex and dot-stuffing regex over a message
    that `prepare_data` has already made CRLF-only (two more full passes and copies per message,
    ~14 ms per MB). This sends the same octets through the same protocol object and lock.
    """
    protocol = smtp.protocol
    lock = getattr(protocol, "_command_lock", None)
    if protocol is None or lock is None or not hasattr(protocol, "_response_pending"):
        # Not the aiosmtplib this was written against: let it do the work itself.
        return await smtp.data(env.prepared, timeout=timeout)
    body = env.stuffed
    async with lock:
        protocol._response_pending = True  # a reply is expected: not unsolicited data
        protocol.write(b"DATA\r\n")
        start = await protocol.read_response(timeout=timeout)
        if start.code != 354:
            raise _DataRefused(start.code, start.message, after_content=False)
        protocol._response_pending = True
        await _write_content(protocol.write, protocol, protocol.transport, body, timeout)
        response = await protocol.read_response(timeout=timeout)
    if response.code != 250:
        raise _DataRefused(response.code, response.message, after_content=True)
    return response


async def _command(smtp: aiosmtplib.SMTP, *args: bytes, timeout: float) -> Reply:
    response = await smtp.execute_command(*args, timeout=timeout)
    return remote_reply(response.code, response.message)


def _raise_if_all_transient(rcpt_replies: dict[str, Reply]) -> None:
    """No recipient was taken: when every refusal is temporary, the whole attempt is retried."""
    if all(reply.is_transient for reply in rcpt_replies.values()):
        raise _HopFailed(next(iter(rcpt_replies.values())))


def _after_data(
    results: dict[str, Reply],
    rcpt_replies: dict[str, Reply],
    accepted: list[str],
    data_reply: Reply,
) -> tuple[dict[str, Reply], Reply]:
    """The transaction's outcome: each RCPT's own reply, and the DATA reply for those it took."""
    results.update(rcpt_replies)
    results.update({r: data_reply for r in accepted})
    return results, data_reply


def _raise_if_closing(session: _Session, reply: Reply) -> None:
    """A 421 to RCPT: the server is closing the channel (RFC 5321 §3.8); the transaction is over
    and its reply, not the dropped connection that follows, is what the queue's LastError says."""
    if reply.code == 421:
        session.close()
        raise _HopFailed(reply)


def _out_of_range(reply: Reply) -> bool:
    """A reply code whose first digit is not 2 to 5 (RFC 5321 §4.2: "fatal errors" of the
    session). `Reply.is_permanent` is ``code >= 500``, so a 6xx-9xx would be taken for a
    refusal and bounce a message the next hop may have taken: it answers nothing."""
    return reply.code >= 600


def _check_data_start(session: _Session, reply: Reply) -> None:
    """A positive reply to DATA that is not 354 (a next hop that sent more replies than commands,
    or answers DATA with 250): the replies are out of step with the commands, and taking it as the
    reply to the content would record a delivery whose content was never sent. An out-of-range
    code is no answer either."""
    if reply.code != 354 and (reply.is_positive or _out_of_range(reply)):
        session.close()
        raise _HopFailed(replies.out_of_sequence("DATA", reply.line()))


def _check_completion(session: _Session, reply: Reply, command: str) -> None:
    """A 1xx or 3xx where a completion reply is due (to MAIL, or to the end of the content: a 354
    read out of step) is no answer: taken as acceptance of MAIL, the client went on and ended an
    empty content or sent its content as commands; taken as the final reply, a message the next
    hop never said it took was recorded delivered. An out-of-range code (6xx-9xx) is no answer
    either: taken as a refusal, it bounced. Transient, the session dropped."""
    if (reply.is_positive and not 200 <= reply.code < 300) or _out_of_range(reply):
        session.close()
        raise _HopFailed(replies.out_of_sequence(command, reply.line()))


def _rcpt_reply(reply: Reply) -> Reply:
    """RFC 5321 §4.5.3.1.10: a 552 to RCPT (RFC 821's "too many recipients") is taken as 452,
    temporary: the recipient is tried again, not bounced. A positive reply other than 250/251
    (a 354 or 220 read out of step) is no answer to RCPT: transient, never "delivered"; nor is
    an out-of-range code (6xx-9xx): transient, never a bounce."""
    if reply.code != 552:
        if (reply.is_positive and reply.code not in (250, 251)) or _out_of_range(reply):
            return replies.out_of_sequence("RCPT", reply.line())
        return reply
    enhanced = "4" + reply.enhanced[1:] if reply.enhanced.startswith("5.") else reply.enhanced
    return Reply(452, enhanced, reply.text)


async def _transaction(
    session: _Session, env: _Envelope, pending: list[str], timeout: float, *, reused: bool = False
) -> tuple[dict[str, Reply], Reply | None]:
    """MAIL, RCPT..., DATA on an open session. Returns per-recipient replies for `pending` and the
    DATA reply; raises _HopFailed for a whole-transaction transient failure."""
    smtp = session.smtp
    results: dict[str, Reply] = {}
    stage = "mail"
    utf8_ok = smtp.supports_extension("smtputf8")
    send_utf8 = False
    rcpts: list[str] = []
    for r in pending:
        if not env.recipients[r].isascii() and not utf8_ok:
            results[r] = SMTPUTF8_NOT_SUPPORTED
        else:
            rcpts.append(r)
            send_utf8 = send_utf8 or not env.recipients[r].isascii()
    if env.utf8_required:
        if not utf8_ok:
            return {r: SMTPUTF8_NOT_SUPPORTED for r in pending}, None
        send_utf8 = True
    if not rcpts:
        return results, None
    if env.eight_bit and not smtp.supports_extension("8bitmime"):
        results.update({r: replies.EIGHTBITMIME_NOT_SUPPORTED for r in rcpts})
        return results, None

    params: list[bytes] = []
    if smtp.supports_extension("size"):
        limit_text = smtp.esmtp_extensions.get("size", "").strip()
        # ASCII digits only: str.isdigit() also passes "²", which int() refuses.
        limit = int(limit_text) if limit_text.isascii() and limit_text.isdigit() else 0
        if limit and env.wire_size > limit:
            results.update({r: replies.MESSAGE_TOO_BIG for r in rcpts})
            return results, None
        params.append(b"SIZE=%d" % env.wire_size)
    if env.eight_bit and smtp.supports_extension("8bitmime"):
        params.append(b"BODY=8BITMIME")
    if send_utf8:
        params.append(b"SMTPUTF8")

    try:
        # `reused`: the session came from the pool (a 421 there is its idle timeout, worth one
        # fresh connection), whether or not it has delivered a message yet.
        transport = getattr(smtp.protocol, "transport", None)
        # Duck-typed: uvloop's TCPTransport is not an asyncio.Transport subclass.
        if smtp.supports_extension("pipelining") and hasattr(transport, "set_protocol"):
            tr = cast(asyncio.Transport, transport)  # it has the methods ReplyReader uses
            return await _pipelined(session, tr, env, rcpts, params, results, timeout, reused)
        mail = await _command(
            smtp, b"MAIL", b"FROM:<" + env.sender.encode("utf-8") + b">", *params, timeout=timeout
        )
        if mail.code == 421 and reused:
            # The server closed a pooled session (its idle timeout): like a dropped connection,
            # one fresh connection to the same hop may take the message.
            session.close()
            raise _HopFailed(mail, connection_lost=True)
        _check_completion(session, mail, "MAIL")
        if mail.is_transient or mail.code < 200:
            raise _HopFailed(mail)
        session.clean = False  # a transaction is open until its final reply or RSET
        if mail.is_permanent:
            results.update({r: mail for r in rcpts})
            return results, None
        stage = "rcpt"

        accepted: list[str] = []
        rcpt_replies: dict[str, Reply] = {}
        for r in rcpts:
            reply = await _command(
                smtp, b"RCPT", b"TO:<" + env.recipients[r].encode("utf-8") + b">", timeout=timeout
            )
            rcpt_replies[r] = reply = _rcpt_reply(reply)
            _raise_if_closing(session, reply)
            if reply.code in (250, 251):
                accepted.append(r)
        if not accepted:
            _raise_if_all_transient(rcpt_replies)
            results.update(rcpt_replies)
            try:  # the replies are final; RSET only readies the session for reuse
                session.clean = (await _command(smtp, b"RSET", timeout=timeout)).code == 250
            except (SMTPException, OSError):
                session.close()
            return results, None

        try:
            response = await _data(smtp, env, timeout)
        except SMTPDataError as exc:
            # Refused at the end of DATA the transaction is over; refused at DATA itself, RSET first.
            session.clean = getattr(exc, "after_content", False)
            data_reply = remote_reply(exc.code, exc.message)
            if not session.clean:
                _check_data_start(session, data_reply)
            else:
                _check_completion(session, data_reply, "the end of DATA")
            if data_reply.is_transient:
                raise _HopFailed(data_reply) from None
            return _after_data(results, rcpt_replies, accepted, data_reply)
        data_reply = remote_reply(response.code, response.message)
        session.clean = True
        session.messages += 1
        return _after_data(results, rcpt_replies, accepted, data_reply)
    except _HopFailed:
        raise
    except SMTPTimeoutError:
        session.close()
        raise _HopFailed(replies.CONNECTION_TIMEOUT) from None
    except (SMTPServerDisconnected, ConnectionError, OSError):
        session.close()
        # Only a session that died before it took MAIL may be retried on a fresh connection to the
        # same hop (a pooled session gone stale); later, the next hop is the only retry.
        raise _HopFailed(CONNECTION_DROPPED, connection_lost=stage == "mail") from None
    except SMTPResponseException as exc:
        raise _HopFailed(remote_reply(exc.code, exc.message)) from None


async def _pipelined(
    session: _Session,
    transport: asyncio.Transport,
    env: _Envelope,
    rcpts: list[str],
    params: list[bytes],
    results: dict[str, Reply],
    timeout: float,
    reused: bool,
) -> tuple[dict[str, Reply], Reply | None]:
    """`_transaction` with PIPELINING (RFC 2920): MAIL, the RCPTs and DATA in one write, the
    replies read in order, then the content. Same outcomes as the command-by-command path."""
    reader = ReplyReader.install(transport)
    got_mail = False
    try:
        group = [b" ".join([b"MAIL FROM:<" + env.sender.encode("utf-8") + b">", *params])]
        group += [b"RCPT TO:<" + env.recipients[r].encode("utf-8") + b">" for r in rcpts]
        group.append(b"DATA")
        session.clean = False  # a transaction is open until its final reply or RSET
        reader.write(b"\r\n".join(group) + b"\r\n")
        mail = remote_reply(*await reader.reply(timeout))
        got_mail = True
        if mail.code == 421:
            # The server is closing (a pooled session past its idle timeout, or shutting down):
            # like a dropped connection, one fresh connection to the same hop may take the message.
            session.close()
            raise _HopFailed(mail, connection_lost=reused)
        _check_completion(session, mail, "MAIL")
        rcpt_replies: dict[str, Reply] = {}
        for r in rcpts:
            rcpt_replies[r] = reply = _rcpt_reply(remote_reply(*await reader.reply(timeout)))
            _raise_if_closing(session, reply)
        data_start = remote_reply(*await reader.reply(timeout))
        _check_data_start(session, data_start)
        accepted = [r for r in rcpts if rcpt_replies[r].code in (250, 251)]
        if data_start.code == 354 and (not accepted or not 200 <= mail.code < 300):
            # DATA should have been refused (no valid recipient): end the empty content at once.
            reader.write(b".\r\n")
            await reader.reply(timeout)
        if mail.is_transient or mail.code < 200:
            raise _HopFailed(mail)
        if mail.is_permanent:
            results.update({r: mail for r in rcpts})
            return results, None
        if not accepted:
            _raise_if_all_transient(rcpt_replies)
            results.update(rcpt_replies)
            reader.write(b"RSET\r\n")  # the replies are final; RSET only readies the session
            session.clean = (await reader.reply(timeout))[0] == 250
            return results, None
        if data_start.code != 354:  # DATA itself refused: the transaction is still open
            if data_start.is_transient:
                raise _HopFailed(data_start)
            # A refusal at DATA is also what a stale extra reply read as MAIL's leaves (every
            # reply shifted by one, the last RCPT's 550 read as DATA's): the RSET the session
            # needs anyway must then read 250, or the refusal was not DATA's and bounces no one.
            reader.write(b"RSET\r\n")
            rset = remote_reply(*await reader.reply(timeout))
            if rset.code != 250:
                session.close()
                raise _HopFailed(replies.out_of_sequence("RSET", rset.line()))
            session.clean = True
            return _after_data(results, rcpt_replies, accepted, data_start)
        await _write_content(reader.write, reader.inner, transport, env.stuffed, timeout)
        data_reply = remote_reply(*await reader.reply(timeout))
        _check_completion(session, data_reply, "the end of DATA")
        session.clean = True  # the final reply ends the transaction, whatever it says
        if data_reply.code == 250:
            session.messages += 1
        elif data_reply.is_transient:
            raise _HopFailed(data_reply)
        return _after_data(results, rcpt_replies, accepted, data_reply)
    except SMTPTimeoutError:  # a TimeoutError, hence an OSError: _transaction reports it
        raise
    except (SMTPServerDisconnected, ConnectionError, OSError):
        session.close()
        # As in _transaction: only a session that died before MAIL was answered may be retried
        # on a fresh connection to the same hop.
        raise _HopFailed(CONNECTION_DROPPED, connection_lost=not got_mail) from None
    finally:
        reader.restore()


# ==================================================================================================
# deliver


async def deliver(
    hops: Sequence[NextHop],
    *,
    connector: Any,
    helo_name: str,
    sender: str,
    recipients: Iterable[str],
    data: bytes,
    credentials: Credentials | None = None,
    timeout: float | None = None,
    pool: ConnectionPool | None = None,
    crlf_only: bool = False,
    size: int | None = None,
    smtputf8: bool = False,
    log_privacy: AddressPrivacy | None = None,
) -> DeliveryOutcome:
    """Deliver one message to the first hop that takes it.

    sender: the envelope sender ("" or "<>" for the null sender). recipients: envelope recipients
    (their replies are keyed by these strings). timeout: seconds per connect and per command
    (default: the connector's connection_inactivity_timeout). pool: reuse sessions across calls.
    crlf_only: every line break in `data` is known to be CRLF (see `prepare_data`).
    size: the message's size for the connector's `max_message_size` (default: ``len(data)``); the
    queue passes the size as received, which routing checked, so that a DKIM signature this relay
    added cannot push a message over the limit that routing chose the connector by.
    smtputf8: the client declared SMTPUTF8; the message then needs a next hop that offers it if
    its header has UTF-8 in it (else it goes as usual, as Postfix does; RFC 6531 §3.2).
    log_privacy: ``server.log_address_privacy`` for the service log's line about a failed hop (a
    next hop's reply often quotes the address: "450 4.2.0 <bob@...>: ... Greylisted").
    """
    rcpt_list = list(dict.fromkeys(recipients))
    outcome = DeliveryOutcome(per_recipient={})
    t = _seconds(
        timeout
        if timeout is not None
        else getattr(connector, "connection_inactivity_timeout", None),
        600.0,
    )

    wire_sender = _wire_address(sender) if sender not in ("", "<>") else ""
    if wire_sender is None:
        outcome.per_recipient = {r: replies.INVALID_SENDER for r in rcpt_list}
        return outcome
    wire_rcpts: dict[str, str] = {}
    for r in rcpt_list:
        w = _wire_address(r)
        if w is None or not w:
            outcome.per_recipient[r] = replies.INVALID_RECIPIENT
        else:
            wire_rcpts[r] = w
    pending = list(wire_rcpts)
    if not pending:
        return outcome

    limit = getattr(connector, "max_message_size", None)
    if limit is not None and (len(data) if size is None else size) > limit:
        outcome.per_recipient.update({r: replies.ROUTE_SIZE_LIMIT for r in pending})
        return outcome
    if not hops:
        outcome.per_recipient.update({r: replies.NO_NEXT_HOP for r in pending})
        return outcome

    mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
    if mech in ("BasicAuth", "BasicAuthRequireTLS", "XOAUTH2") and credentials is None:
        outcome.transcript_errors.append(f"(no hop tried): {CREDENTIALS_MISSING.line()}")
        outcome.per_recipient.update({r: CREDENTIALS_MISSING for r in pending})
        return outcome

    prepared = prepare_data(data, crlf_only=crlf_only)
    # Stuffed once, before MAIL (SIZE= is the octets after the 354): `prepared` itself when no line
    # starts with "." (one C-level scan, no copy; counting the dots first was a second scan).
    env = _Envelope(
        sender=wire_sender,
        recipients=wire_rcpts,
        prepared=prepared,
        stuffed=dot_stuff(prepared),
        eight_bit=not prepared.isascii(),
        utf8_required=not wire_sender.isascii() or (smtputf8 and not header_is_ascii(prepared)),
    )

    primary: Reply | None = None
    for hop in hops:
        try:
            results, data_reply = await _attempt_hop(
                hop, connector, helo_name, credentials, t, env, pending, pool
            )
        except _HopFailed as failure:
            line = failure.reply.line()
            log.info(
                "delivery via %s failed: %s",
                hop.label,
                line if log_privacy is None else log_privacy.text(line),
            )
            outcome.transcript_errors.append(f"{hop.label}: {failure.reply.line()}")
            if primary is None:
                primary = failure.reply
            continue
        outcome.hop_used = hop.label
        outcome.data_reply = data_reply
        outcome.per_recipient.update(results)
        return outcome

    assert primary is not None
    final = replies.failover_failed(primary.line())
    outcome.per_recipient.update({r: final for r in pending})
    return outcome


async def _attempt_hop(
    hop: NextHop,
    connector: Any,
    helo_name: str,
    credentials: Credentials | None,
    timeout: float,
    env: _Envelope,
    pending: list[str],
    pool: ConnectionPool | None,
) -> tuple[dict[str, Reply], Reply | None]:
    key = ConnectionPool.key_for(hop, connector, helo_name)
    session: _Session | None = None
    if pool is not None:
        session = pool.take(key)
        if session is not None and not session.clean:
            try:
                rset = await _command(session.smtp, b"RSET", timeout=timeout)
                if rset.code != 250:
                    raise _HopFailed(rset)
            except (SMTPException, OSError, _HopFailed):
                session.close()
                session = None

    fresh = session is None
    allow_starttls = True
    while True:
        if session is None:
            try:
                session = await _open_session(
                    hop,
                    connector,
                    helo_name,
                    credentials,
                    timeout,
                    key,
                    allow_starttls=allow_starttls,
                )
            except _HopFailed as failure:
                if failure.retry_plain and allow_starttls:
                    log.info(
                        "opportunistic TLS to %s failed (%s); retrying in clear",
                        hop.label,
                        failure.reply.line(),
                    )
                    allow_starttls = False
                    continue
                raise
        try:
            results, data_reply = await _transaction(
                session, env, pending, timeout, reused=not fresh
            )
        except _HopFailed as failure:
            if failure.connection_lost and not fresh:
                # a pooled session that went stale: one fresh connection to the same hop
                session.close()
                session = None
                fresh = True
                continue
            await session.quit(timeout=min(timeout, 2.0))
            raise
        data_reply = await _more_transactions(session, env, pending, results, data_reply, timeout)
        if pool is not None and session.alive:
            pool.put(session)
        else:
            await session.quit(timeout=min(timeout, 2.0))
        return results, data_reply


async def _more_transactions(
    session: _Session,
    env: _Envelope,
    sent: list[str],
    results: dict[str, Reply],
    data_reply: Reply | None,
    timeout: float,
) -> Reply | None:
    """Recipients refused with 452 while others of the same transaction were taken (a server's
    limit of recipients per message, RFC 5321 §4.5.3.1.10) go in another transaction on the same
    session, as long as each takes some. A failure there leaves them deferred: what was delivered
    stays delivered (the next hop is never tried with it again)."""
    while session.alive and session.clean:
        codes = {r: reply.code for r in sent if (reply := results.get(r)) is not None}
        again = [r for r, code in codes.items() if code == 452]
        if not again or not any(code < 300 for code in codes.values()):
            return data_reply
        try:
            more, more_reply = await _transaction(session, env, again, timeout, reused=True)
        except _HopFailed:
            session.close()
            return data_reply
        results.update(more)
        data_reply = more_reply or data_reply
        sent = again
    return data_reply
