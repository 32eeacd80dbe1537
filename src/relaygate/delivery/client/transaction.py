"""One SMTP transaction on an open session: MAIL (with SIZE, BODY=8BITMIME, SMTPUTF8 as the
next hop offers them), the RCPTs and DATA, command by command (`_transaction`) or in one write
with PIPELINING (`_pipelined`, RFC 2920), with the same outcomes: per-recipient replies, and a
`_HopFailed` when the whole transaction failed transiently.

Kept apart from the session's opening (connection.py) and from the hops' order (hops.py): this
is the conversation once a hop is usable, and its two paths must agree.
"""

from __future__ import annotations

import asyncio
from typing import cast

import aiosmtplib
from aiosmtplib import (
    SMTPDataError,
    SMTPException,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from relaygate import replies
from relaygate.delivery.client.content import _data, _Envelope, _write_content
from relaygate.delivery.client.pool import _Session
from relaygate.delivery.client.remote_replies import (
    _after_data,
    _check_completion,
    _check_data_start,
    _HopFailed,
    _raise_if_all_transient,
    _raise_if_closing,
    _rcpt_reply,
    remote_reply,
)
from relaygate.delivery.pipeline import ReplyReader
from relaygate.replies import CONNECTION_DROPPED_SEND as CONNECTION_DROPPED
from relaygate.replies import SMTPUTF8_NOT_SUPPORTED, Reply


async def _command(smtp: aiosmtplib.SMTP, *args: bytes, timeout: float) -> Reply:
    response = await smtp.execute_command(*args, timeout=timeout)
    return remote_reply(response.code, response.message)


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
