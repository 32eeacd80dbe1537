"""The delivery client's AUTH to a smart host (``smart_host_auth_mechanism``): PLAIN or LOGIN
with the connector's credentials, or XOAUTH2 with a token from its provider (a 535 to a token
that had been accepted asks a new one, once). Failures are the hop's (`_HopFailed`), and the
message stays in Retry, as Exchange keeps it; no secret is ever logged or put in a reply.

Kept apart from the session's opening (connection.py): the mechanisms, the tokens and what is
safe to say about their failures are a subject of their own.
"""

from __future__ import annotations

import logging
import weakref
from collections import deque
from typing import Any

import aiosmtplib
from aiosmtplib import SMTPAuthenticationError, SMTPResponseException

from relaygate.delivery.client.remote_replies import _HopFailed, remote_reply
from relaygate.delivery.client.tls import _AUTH_TLS_ONLY
from relaygate.delivery.credentials import Credentials
from relaygate.delivery.oauth import TokenError
from relaygate.replies import (
    AUTH_NEEDS_TLS,
    AUTH_NOT_OFFERED,
    CREDENTIALS_MISSING,
    TOKEN_UNAVAILABLE,
    Reply,
)

log = logging.getLogger("relaygate.delivery")


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
                await invalidate(token)
                if not _was_accepted(provider, token):
                    raise
                log.info("the smart host refused the OAuth token (%s); asking a new one", exc.code)
                token = await _token(provider)
                await smtp.auth_xoauth2(credentials.username, token, timeout=timeout)
            _note_accepted(provider, token)
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


#: token provider → the last tokens a smart host accepted from it (see _authenticate). A few, not
#: the last one only: a connection that authenticated with the older token after another had
#: a newer one accepted was refused its (accepted, now revoked) token and not retried.
_accepted_tokens: weakref.WeakKeyDictionary[Any, deque[str]] = weakref.WeakKeyDictionary()
_ACCEPTED_KEPT = 4


def _was_accepted(provider: Any, token: str) -> bool:
    try:
        return token in _accepted_tokens.get(provider, ())
    except TypeError:  # not weakly referenceable: no retry after a 535
        return False


def _note_accepted(provider: Any, token: str) -> None:
    try:
        kept = _accepted_tokens.setdefault(provider, deque(maxlen=_ACCEPTED_KEPT))
    except TypeError:
        return
    if token not in kept:
        kept.append(token)


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
            ),
            final=True,
        ) from None
    except Exception as exc:  # another provider's message may carry secrets: type only
        log.warning("OAuth token provider failed: %s", type(exc).__name__)
        raise _HopFailed(TOKEN_UNAVAILABLE, final=True) from None
