"""The header fields a DKIM signature covers by default: one list for the config's
``[[dkim]] headers`` default and the signer. Apart from the signer so that loading the config
does not import dkimpy."""

from __future__ import annotations

__all__ = ["SIGNED_HEADERS"]

#: RFC 6376 §5.4.1's list (as OpenDKIM's and MIMEDefang's defaults) with List-Unsubscribe-Post,
#: which RFC 8058 §4 requires in h= beside List-Unsubscribe for one-click unsubscribe (Gmail and
#: Yahoo require it of bulk senders). Only the fields a message has are signed (From always): a
#: field added in transit to a message without it (Exchange Online adds a missing Message-ID)
#: must not break the signature.
SIGNED_HEADERS: tuple[str, ...] = (
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "Sender",
    "Content-ID",
    "Content-Description",
    "Resent-Date",
    "Resent-From",
    "Resent-Sender",
    "Resent-To",
    "Resent-Cc",
    "Resent-Message-ID",
    "List-Id",
    "List-Help",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "List-Subscribe",
    "List-Post",
    "List-Owner",
    "List-Archive",
)
