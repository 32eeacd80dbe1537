"""The next hop's replies: parsed into a `Reply` (`remote_reply`: the enhanced code of the
reply's class split off, controls dropped), checked against what the command allows (a reply out
of sequence or out of range is no answer; a 552 to RCPT is a 452, RFC 5321 §4.5.3.1.10), and
`_HopFailed`, the failure of a whole transaction on one hop that sends the message to the next.

Kept apart from the transaction that reads them: the same checks serve the command-by-command
and the pipelined paths (transaction.py), and the queue stores what `remote_reply` makes.
"""

from __future__ import annotations

import re

from relaygate import replies
from relaygate.delivery.client.pool import _Session
from relaygate.replies import Reply

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


class _HopFailed(Exception):
    """The whole transaction failed on this hop; try the next one.

    retry_plain: opportunistic TLS failed, a clear-text retry of the same hop is allowed.
    connection_lost: the session died (a pooled session may simply have gone stale).
    final: no other hop would do better (no OAuth token: each would ask for the same one); the
    attempt ends with this reply.
    """

    def __init__(
        self,
        reply: Reply,
        *,
        retry_plain: bool = False,
        connection_lost: bool = False,
        final: bool = False,
    ) -> None:
        super().__init__(reply.line())
        self.reply = reply
        self.retry_plain = retry_plain
        self.connection_lost = connection_lost
        self.final = final


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
