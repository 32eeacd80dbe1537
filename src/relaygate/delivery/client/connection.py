"""A session opened to one next hop: the socket (from the connector's ``source_ip_address``),
the greeting, EHLO (HELO when it is refused, or always with ``force_helo``) and its extensions,
STARTTLS (opportunistic or required, with the reasons a handshake failed), then AUTH
(auth.py). Every failure is a `_HopFailed` saying whether a clear-text retry is allowed.

Kept apart from the transaction (transaction.py): what happens before MAIL decides whether the
hop can be used at all, and no byte of MAIL or credentials is written unless it can.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from datetime import timedelta
from typing import Any

import aiosmtplib
from aiosmtplib import (
    SMTPConnectError,
    SMTPConnectResponseError,
    SMTPConnectTimeoutError,
    SMTPHeloError,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relaygate import replies
from relaygate.delivery.client.auth import _authenticate
from relaygate.delivery.client.pool import _Session
from relaygate.delivery.client.remote_replies import _HopFailed, remote_reply
from relaygate.delivery.client.tls import (
    _client_cert,
    _find_ssl_error,
    _server_name,
    _tls_reason,
    _tls_required,
    _TlsFileError,
    tls_context_for,
)
from relaygate.delivery.credentials import Credentials
from relaygate.delivery.nexthop import NextHop
from relaygate.replies import CONNECTION_DROPPED_SEND as CONNECTION_DROPPED
from relaygate.replies import TLS_NOT_OFFERED, UNABLE_TO_CONNECT, Reply, tls_failed


def helo_name_for(connector: Any, server_fqdn: str) -> str:
    """The EHLO name: the send connector's ``fqdn`` when set, else the server's (Exchange's Fqdn)."""
    return (getattr(connector, "fqdn", None) or "").strip() or server_fqdn


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


def _bounded(connector: Any, key: str, timeout: float) -> float:
    """The connector's `key` (connect_timeout, greeting_timeout) in seconds, never longer than
    `timeout` (its connection_inactivity_timeout): a next hop that is down or silent costs this,
    not the inactivity timeout (10 min by default), for each hop of an attempt."""
    value = getattr(connector, key, None)
    if value is None:
        return timeout
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    return min(seconds, timeout)


async def _connect_socket(hop: NextHop, timeout: float, source: str | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in hop.ip else socket.AF_INET
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        # No such family here (IPv6 disabled: EAFNOSUPPORT), or no descriptor left: this hop
        # cannot be connected to, the next (another family, later) may.
        raise _HopFailed(UNABLE_TO_CONNECT) from None
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
    sock = await _connect_socket(
        hop, _bounded(connector, "connect_timeout", timeout), _source_address(connector, hop)
    )
    # The greeting (with implicit TLS, the handshake too) and the reply to EHLO/HELO, as
    # Postfix's smtp_helo_timeout; the commands after it wait for `timeout`.
    greeting = _bounded(connector, "greeting_timeout", timeout)
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
            await smtp.connect(timeout=greeting)
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
            await _helo(smtp, helo_name, greeting)
        else:
            await _ehlo(smtp, helo_name, greeting)
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
