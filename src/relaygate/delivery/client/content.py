"""The message as the delivery client sends it: the envelope in wire form with the content
prepared and dot-stuffed once for every hop (`_Envelope`), and DATA with its content written in
pieces that wait for the transport to drain (`_data`, `_write_content`), so that the timeout
bounds each wait for the next hop and not the whole transfer.

Kept apart from the commands around it (transaction.py): this is about octets and flow control
on the transport, bypassing aiosmtplib's own passes over the content.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import aiosmtplib
from aiosmtplib import SMTPDataError, SMTPTimeoutError


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
