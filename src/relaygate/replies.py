"""The one catalogue of every SMTP reply RelayGate sends.

Texts follow Exchange 2019 (shared/reference/exchange-semantics.md §5) so that administrators and their
monitoring scripts see what they saw before. Nothing else in the project spells a reply: sessions, policy,
`explain` and the queue all take their `Reply` from here.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Reply"]


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply.

    code: the three-digit basic code.
    enhanced: the RFC 3463 enhanced code ("5.7.54"), or "" when Exchange sends none.
    text: the human-readable part.
    """

    code: int
    enhanced: str
    text: str

    @property
    def is_positive(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def line(self) -> str:
        """The reply as sent on the wire, without CRLF."""
        if self.enhanced:
            return f"{self.code} {self.enhanced} {self.text}"
        return f"{self.code} {self.text}"

    def __str__(self) -> str:
        return self.line()

    def with_text(self, text: str) -> Reply:
        return Reply(self.code, self.enhanced, text)


# --- greeting and session (§5.1, §5.2) -------------------------------------------------------------
STARTTLS_READY = Reply(220, "2.0.0", "SMTP server ready")
CLOSING = Reply(221, "2.0.0", "Service closing transmission channel")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
OK = Reply(250, "2.0.0", "OK")
RESETTING = Reply(250, "2.0.0", "Resetting")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")
CANNOT_VRFY = Reply(252, "2.1.5", "Cannot VRFY user")
START_MAIL_INPUT = Reply(354, "", "Start mail input; end with <CRLF>.<CRLF>")

# --- relay, permission, sequence (§5.3) ------------------------------------------------------------
RELAY_DENIED = Reply(550, "5.7.54", "SMTP; Unable to relay recipient in non-accepted domain")
NOT_AUTHENTICATED = Reply(530, "5.7.1", "Client was not authenticated")
NOT_AUTHENTICATED_GENERIC = Reply(530, "5.7.1", "Not authenticated")
SEND_AS_DENIED = Reply(550, "5.7.1", "Client does not have permissions to send as this sender")
ANONYMOUS_SEND_AS_DENIED = Reply(
    550, "5.7.1", "Anonymous client does not have permissions to send as this sender"
)
SUBMIT_DENIED = Reply(550, "5.7.1", "Client does not have permissions to submit to this server")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
BASIC_AUTH_REQUIRES_TLS = Reply(451, "5.7.3", "Require STARTTLS to do basic authentication")
SEND_HELLO_FIRST = Reply(503, "5.5.2", "Send hello first")
NEED_MAIL = Reply(503, "5.5.2", "Need mail command")
NEED_RCPT = Reply(503, "5.5.2", "Need rcpt command")
SENDER_ALREADY_SPECIFIED = Reply(503, "5.5.2", "Sender already specified")
UNRECOGNIZED_COMMAND = Reply(500, "5.3.3", "Unrecognized command")
UNRECOGNIZED_PARAMETER = Reply(501, "5.5.4", "Unrecognized parameter")
COMMAND_TOO_LONG = Reply(500, "5.5.2", "Command too long")
INVALID_SENDER = Reply(501, "5.1.7", "Invalid address")
INVALID_RECIPIENT = Reply(501, "5.1.3", "Invalid address")
INVALID_DOMAIN = Reply(501, "5.5.4", "Invalid domain name")
EHLO_REQUIRES_DOMAIN = Reply(501, "5.0.0", "EHLO requires domain address")
RESERVED_TLD = Reply(550, "5.1.4", "Recipient address reserved by RFC 2606")
RESERVED_SLD = Reply(550, "5.1.5", "Recipient address reserved by RFC 2606")
SINGLE_LABEL_DOMAIN = Reply(
    550, "5.1.6", "Recipient addresses in single label domains not accepted"
)
SMTPUTF8_REQUIRED = Reply(553, "5.6.7", "Must declare SMTPUTF8 to send unicode address")
LOCAL_LITERAL_UNKNOWN = Reply(550, "5.1.1", "User unknown")
LITERAL_REFUSED = Reply(550, "5.7.1", "Recipient address literal not accepted")
STARTTLS_ALREADY = Reply(503, "5.5.2", "Only one STARTTLS command can be issued per session")
AUTH_ALREADY = Reply(503, "5.5.2", "Auth command already specified")
AUTH_FAILED = Reply(535, "5.7.3", "Authentication unsuccessful")
AUTH_UNKNOWN_MECHANISM = Reply(504, "5.7.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.7.0", "Authentication cancelled")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Command not implemented")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
# A browser's, HTTP proxy client's or other protocol's line: the session is closed (security-bar 98).
NON_SMTP_COMMAND = Reply(
    554, "5.7.0", "Non-SMTP command (cross-protocol input), closing transmission channel"
)

# --- limits and throttling (§5.4) -------------------------------------------------------------------
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
HEADER_TOO_BIG = Reply(552, "5.3.4", "Header size exceeds fixed maximum size")
HOP_COUNT_EXCEEDED = Reply(554, "5.4.6", "Hop count exceeded - possible mail loop")
TOO_MANY_ERRORS = Reply(
    421, "4.7.0", "Too many errors on this connection, closing transmission channel"
)
SERVER_CONNECTIONS_EXCEEDED = Reply(
    421,
    "4.3.2",
    "The maximum number of concurrent server connections has exceeded a limit, closing transmission channel",
)
SOURCE_CONNECTIONS_EXCEEDED = Reply(
    421,
    "4.3.2",
    "The maximum number of concurrent connections has exceeded a limit, closing transmission channel",
)
RATE_LIMITED = Reply(
    421, "4.4.2", "Message submission rate for this client has exceeded the configured limit"
)
AUTH_RATE_LIMITED = Reply(450, "4.7.1", "Too many AUTH commands from this client")
INACTIVITY_TIMEOUT = Reply(451, "4.7.0", "Timeout waiting for client input")
CONNECTION_TIMEOUT = Reply(421, "4.4.1", "Connection timed out")
INSUFFICIENT_RESOURCES = Reply(452, "4.3.1", "Insufficient system resources")
# A reload took some of a transaction's recipients away (not all): sent again, RCPT says which.
RECIPIENTS_CHANGED = Reply(
    451, "4.7.0", "Some recipients are no longer accepted; send the message again"
)
SERVICE_NOT_AVAILABLE = Reply(421, "4.3.2", "Service not available")
BARE_LINEFEED = Reply(554, "5.6.0", "Invalid message content, contains bare linefeeds")
# The content's first line starts with a blank: it would continue the Received field the relay adds.
FOLDED_FIRST_LINE = Reply(
    554, "5.6.0", "Invalid message content, the header starts with a folded line"
)
QUEUE_FAILED = Reply(451, "4.3.0", "Temporary failure storing the message; try again later")

# --- outbound / queue (§5.6) ------------------------------------------------------------------------
QUEUE_EXPIRED = Reply(550, "4.4.7", "QUEUE.Expired; message expired")
DNS_NONEXISTENT_DOMAIN = Reply(550, "5.4.4", "SMTPSEND.DNS.NonExistentDomain; nonexistent domain")
NO_NEXT_HOP = Reply(550, "5.4.4", "ROUTING.NoNextHop; unable to route")
NULL_MX = Reply(550, "5.1.10", "SMTPSEND.DNS.NullMx; domain does not accept mail (null MX)")
ROUTE_SIZE_LIMIT = Reply(
    550, "5.3.4", "ROUTING.SizeLimit; message size exceeds fixed maximum size for route"
)
ADMIN_DELETED = Reply(550, "4.3.2", "QUEUE.Admin; message deleted by administrative action")
LOOP_DETECTED = Reply(554, "5.4.6", "ROUTING.Loop; the next hop is this relay")


def dns_query_failed(reason: str) -> Reply:
    """`451 4.4.0 DNS query failed. The error was: <reason>` (transient)."""
    return Reply(451, "4.4.0", f"DNS query failed. The error was: {reason}")


def primary_relay_not_found(domain: str) -> Reply:
    """This relay is an MX of `domain` and no better-preference MX is usable now (transient, as
    Postfix's 4.4.4 "unable to find primary relay": the better MX is expected back)."""
    return Reply(
        451,
        "4.4.4",
        f"ROUTING.NoPrimaryRelay; this relay is a backup MX of {domain} and no better MX "
        "has a usable address",
    )


def failover_failed(remote: str) -> Reply:
    """The LastError Exchange shows when every smart host / MX of a route failed transiently."""
    return Reply(
        451,
        "4.4.0",
        f'Primary target IP address responded with: "{remote}." Attempted failover to alternate host, '
        "but that did not succeed. Either there are no alternate hosts, or delivery failed to all "
        "alternate hosts.",
    )


def message_queued(
    queue_id: str, message_id: str, hostname: str, size: int, seconds: float
) -> Reply:
    """The end-of-DATA acceptance in Exchange 2016/2019 form, carrying our queue id."""
    rate = (size / 1024.0) / seconds if seconds > 0 else 0.0
    return Reply(
        250,
        "2.6.0",
        f"{message_id} [InternalId={queue_id}, Hostname={hostname}] {size} bytes in {seconds:.3f}, "
        f"{rate:.3f} KB/sec Queued mail for delivery",
    )


def chunk_received(n: int) -> Reply:
    return Reply(250, "2.6.0", f"CHUNK received OK, {n} octets")


# --- RelayGate's own (no Exchange equivalent) ----------------------------------------------------
SYNC_ERROR = Reply(554, "5.5.0", "Error: SMTP protocol synchronization")
BARE_LF_IN_COMMAND = Reply(500, "5.5.2", "Invalid command: contains a bare CR or LF")
BAD_UTF8 = Reply(500, "5.5.2", "Error: bad UTF-8 syntax")  # Postfix smtpd
STARTTLS_SYNTAX = Reply(501, "5.5.4", "Syntax: STARTTLS")
TLS_ALREADY_ACTIVE = Reply(554, "5.5.1", "TLS already active")
TLS_NOT_AVAILABLE = Reply(454, "4.7.0", "TLS not available due to temporary reason")
SEND_HELLO_AFTER_TLS = Reply(503, "5.5.1", "Send hello first")
DATA_SYNTAX = Reply(501, "5.5.4", "Syntax: DATA")
BDAT_SYNTAX = Reply(501, "5.5.4", "Syntax: BDAT <size> [LAST]")
CONNECTION_DROPPED = Reply(421, "4.4.2", "Connection dropped")
#: A recipient outside the receive connector's allowed_recipients (RelayGate's own key; worded as
#: Exchange's permission replies). Given only to a recipient the connector's rights would accept.
RECIPIENT_NOT_ALLOWED = Reply(
    550, "5.7.1", "Client does not have permissions to send to this recipient on this connector"
)
#: End of DATA on a connector with allowed_senders: the From header cannot be read as a list of
#: addresses (a group, a defect, no address, not UTF-8), so it cannot be checked.
INVALID_FROM_HEADER = Reply(
    554, "5.6.0", "Invalid message content, the From header cannot be parsed"
)


# --- outbound session (delivery/client/, nexthop.py) and queue (queue/manager*.py) ----------------
UNABLE_TO_CONNECT = Reply(421, "4.2.1", "Unable to connect")
CONNECTION_DROPPED_SEND = Reply(421, "4.4.2", "Connection dropped due to SocketError")


def out_of_sequence(command: str, remote: str) -> Reply:
    """A next hop's reply that cannot answer `command` (a 250 where DATA needs 354: replies and
    commands are out of step). Transient: the session is dropped and the message tried again."""
    return Reply(451, "4.5.0", f"SMTPSEND.ProtocolError; unexpected reply to {command}: {remote}")


TLS_NOT_OFFERED = Reply(
    451,
    "4.7.10",
    "SMTPSEND.TLS.NotOffered; TLS is required by the send connector but the remote host did not "
    "offer STARTTLS",
)
AUTH_NOT_OFFERED = Reply(
    451, "4.7.0", "SMTPSEND.Auth.NotOffered; the remote host does not offer a usable AUTH mechanism"
)
AUTH_NEEDS_TLS = Reply(
    451,
    "4.7.0",
    "SMTPSEND.Auth.RequireTLS; credentials are only sent over TLS and the session is not encrypted",
)
CREDENTIALS_MISSING = Reply(
    451, "4.7.0", "SMTPSEND.Auth.NoCredentials; the send connector's credentials are not available"
)
TOKEN_UNAVAILABLE = Reply(
    451, "4.7.0", "SMTPSEND.Auth.TokenUnavailable; no OAuth access token could be obtained"
)
SMTPUTF8_NOT_SUPPORTED = Reply(
    550, "5.6.7", "SMTPSEND.SmtpUtf8NotSupported; the remote host does not support SMTPUTF8"
)
#: RFC 6152: 8-bit content may go only to a next hop that offers 8BITMIME; this relay does not
#: convert it to 7-bit (which would also break a DKIM signature), so it is returned to the sender.
EIGHTBITMIME_NOT_SUPPORTED = Reply(
    550,
    "5.6.3",
    "SMTPSEND.8BitMimeNotSupported; the message has 8-bit content and the remote host does not "
    "support 8BITMIME",
)


def tls_failed(reason: str) -> Reply:
    """A TLS negotiation or certificate failure (transient)."""
    return Reply(451, "4.7.5", f"SMTPSEND.TLS.NegotiationFailed; {reason}")


# Not in the Exchange catalogue: Exchange has no such policy. Transient, so that a DNS fix on the
# remote side is picked up before the message expires.
MX_SPECIAL_ADDRESS = Reply(
    451,
    "4.4.4",
    "SMTPSEND.DNS.SpecialAddress; the mail exchangers resolve only to loopback, link-local or "
    "reserved addresses",
)

#: A delivery attempt that failed inside the relay (a bug, a resource problem): retried, like
#: Exchange's queue glitch retries. Not in Exchange's catalogue.
DELIVERY_FAILED_INTERNAL = Reply(
    451, "4.3.0", "QUEUE.Internal; delivery attempt failed inside the relay"
)

#: A pending recipient named in a delay notice before any attempt answered.
DELIVERY_PENDING = Reply(400, "4.0.0", "QUEUE.Pending; delivery has not completed yet")


#: The LastError prefix of a recipient held back by a send connector's pacing limit.
PACED_PREFIX = "QUEUE.Paced;"


def send_connector_paced(connector: str, key: str, limit: int) -> Reply:
    """A recipient not sent because its send connector's budget (max_messages_per_minute,
    max_recipients_per_day) is spent: it waits in the queue (Retry) until the rolling window frees,
    not counted as a failed attempt. RelayGate's own: Exchange has no such pacing; 4.4.2 as
    Exchange's own rate limit replies."""
    return Reply(
        451,
        "4.4.2",
        f'{PACED_PREFIX} send connector "{connector}" reached {key} ({limit}); '
        "the message waits in the queue until the rolling window frees",
    )


def auth_rate_limited(client_ip: str) -> Reply:
    """logon_failure_rate_limit reached: Exchange has no per-address AUTH limit, so the reply is
    Postfix's (smtpd_client_auth_rate_limit, security-bar item 140), transient."""
    return AUTH_RATE_LIMITED.with_text(f"Too many AUTH commands from {client_ip}")
