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

The package's modules, each one seam of the above: tls.py (the client TLS contexts and their
files, what a connector requires), connection.py (a session opened to one hop: connect, greeting,
EHLO or HELO, STARTTLS, then AUTH), auth.py (the SASL exchanges and OAuth tokens), pool.py (the
sessions and the pool that keeps them), content.py (the envelope as it goes on the wire and the
content after DATA), transaction.py (MAIL, RCPT, DATA, one by one or pipelined),
remote_replies.py (the next hop's replies parsed and checked, and a hop's failure), hops.py
(`deliver`: the hops tried in order). Every name the rest of RelayGate uses is imported from here.
"""

from __future__ import annotations

import logging

from relaygate.delivery.client.connection import helo_name_for
from relaygate.delivery.client.hops import DeliveryOutcome, deliver
from relaygate.delivery.client.pool import ConnectionPool
from relaygate.delivery.client.remote_replies import remote_reply
from relaygate.delivery.client.tls import load_tls_context, tls_context_for
from relaygate.replies import (
    AUTH_NOT_OFFERED,
    CREDENTIALS_MISSING,
    SMTPUTF8_NOT_SUPPORTED,
    TLS_NOT_OFFERED,
    TOKEN_UNAVAILABLE,
    UNABLE_TO_CONNECT,
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

#: The logger every module of the package logs to (as client.py did before the split).
log = logging.getLogger("relaygate.delivery")
