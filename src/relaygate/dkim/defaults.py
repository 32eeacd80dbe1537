"""The header fields a DKIM signature covers by default: one list for the config's
``[[dkim]] headers`` default and the signer. Apart from the signer so that loading the config
does not import dkimpy."""

from __future__ import annotations

__all__ = ["ALWAYS_SIGNED", "SIGNED_HEADERS", "SINGLE_FIELDS"]

#: RFC 6376 §5.4.1's list (as OpenDKIM's and MIMEDefang's defaults) with List-Unsubscribe-Post,
#: which RFC 8058 §4 requires in h= beside List-Unsubscribe for one-click unsubscribe (Gmail and
#: Yahoo require it of bulk senders). Only the fields a message has are signed (but those of
#: ALWAYS_SIGNED): a field added in transit to a message without it (Exchange Online adds a
#: missing Message-ID) must not break the signature.
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

#: Fields a message has at most once (RFC 5322 §3.6, RFC 2045, RFC 8058): signed once more than
#: present, so that one added above the signed one (the instance a reader shows; a verifier
#: checks the last, RFC 6376 §8.15) breaks the signature. Lowercase.
SINGLE_FIELDS = frozenset(
    (
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "subject",
        "date",
        "message-id",
        "in-reply-to",
        "references",
        "mime-version",
        "content-type",
        "content-transfer-encoding",
        "content-id",
        "content-description",
        "list-id",
        "list-unsubscribe",
        "list-unsubscribe-post",
    )
)
#: Of those, the ones signed even when the message has none (as Gmail does): nothing in transit
#: adds them, while a Reply-To added to a message without one sends the replies elsewhere. Not
#: Date or Message-ID, which a next hop adds when missing (Exchange Online adds a Message-ID).
ALWAYS_SIGNED = frozenset(("from", "reply-to", "subject"))
