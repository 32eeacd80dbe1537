"""A session's STARTTLS and AUTH (PLAIN, LOGIN), and the AUTH mechanisms its EHLO offers.

Separate because both change who the session is: STARTTLS discards every plaintext byte sent with
or after it (CVE-2011-0411) and forgets what was learned before TLS (RFC 3207 §4.2); AUTH counts
each attempt against logon_failure_rate_limit before the password is checked, tarpits a failure,
and gives the session the user's rights.
"""

from __future__ import annotations

import asyncio
import base64
import binascii

from relaygate import replies
from relaygate.policy.rights import session_rights
from relaygate.smtp.session_reload import _ReloadFollowing
from relaygate.smtp.session_state import _Close


class _StarttlsAndAuth(_ReloadFollowing):
    """STARTTLS and AUTH (see the module docstring)."""

    def auth_mechanisms(self) -> list[str]:
        mechanisms = self.connector.auth_mechanism
        if "BasicAuth" not in mechanisms or self.auth_user is not None:
            return []
        if not self.tls_active and (
            "BasicAuthRequireTLS" in mechanisms or self.connector.require_tls
        ):
            return []  # not offered where do_auth would refuse it for want of TLS
        return ["PLAIN", "LOGIN"]

    async def do_starttls(self, arg: str) -> None:
        if arg.strip():
            await self.protocol_error(replies.STARTTLS_SYNTAX)
            return
        if self.tls_active:
            await self.protocol_error(replies.STARTTLS_ALREADY)
            return
        if "Tls" not in self.connector.auth_mechanism:
            await self.protocol_error(replies.UNRECOGNIZED_COMMAND)
            return
        ctx = self.ctx.tls_context(self.connector)
        if ctx is None:
            self.reply(replies.TLS_NOT_AVAILABLE)
            return
        # Stop reading plaintext now: nothing that arrives from here on is read before the TLS layer is
        # in place (the transport feeds it to the handshake, where injected plaintext is garbage).
        self.conn.transport.pause_reading()
        self.reply(replies.STARTTLS_READY)
        await self.flush()
        # Discard every plaintext byte that arrived with or after STARTTLS (CVE-2011-0411): ours and
        # what the connection received and the session has not read yet.
        pending = len(self.buf) + self.conn.discard_unread()
        if pending:
            self.log.info(f"{pending} bytes sent after STARTTLS discarded")
        self.buf.clear()
        limit = min(self.idle, 60)
        try:
            await asyncio.wait_for(self.conn.start_tls(ctx), timeout=limit)
        except TimeoutError:  # before OSError, its base: its text is empty
            self.log.info(
                f"TLS negotiation failed: no TLS handshake within {limit:g} s after STARTTLS"
            )
            raise _Close() from None
        except (OSError, ConnectionError) as exc:
            self.log.info(f"TLS negotiation failed: {exc}")
            raise _Close() from None
        self.tls_active = True
        ssl_object = self.conn.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.log.info(
                f"TLS protocol {ssl_object.version()} negotiation succeeded using cipher {ssl_object.cipher()[0]}"
            )
        # RFC 3207 §4.2: forget everything learned before TLS.
        self.helo = None
        self.esmtp = False
        self.txn = None
        self.auth_user = None
        self.authenticated = False
        self.rights = session_rights(self.connector)

    async def do_auth(self, arg: str) -> None:
        if self.helo is None or not self.esmtp:
            await self.protocol_error(replies.SEND_HELLO_FIRST)
            return
        if self.auth_user is not None:
            await self.protocol_error(replies.AUTH_ALREADY)
            return
        if self.txn is not None:
            await self.protocol_error(replies.BAD_SEQUENCE)
            return
        mechanisms = self.connector.auth_mechanism
        if "BasicAuth" not in mechanisms:
            # Tarpitted, as Exchange's 504 to an anonymous session (a real receive log shows it)
            await self.protocol_error(replies.AUTH_UNKNOWN_MECHANISM, tarpit=True)
            return
        if "BasicAuthRequireTLS" in mechanisms and not self.tls_active:
            await self.protocol_error(replies.BASIC_AUTH_REQUIRES_TLS)
            return
        if self.connector.require_tls and not self.tls_active:
            # RFC 3207 §4: a server that requires TLS answers 530 to all but NOOP, EHLO, STARTTLS
            # and QUIT. MAIL alone was refused: the password crossed in clear before it.
            await self.protocol_error(replies.MUST_STARTTLS)
            return
        if not self.ctx.auth_failures.allowed(self.connector, self.client_ip):
            await self._auth_rate_limited()
            return
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        authzid = ""  # PLAIN's authorization identity (RFC 4616); LOGIN has none
        try:
            if mechanism == "PLAIN":
                blob = initial or await self._challenge("")
                if blob is None:
                    return
                parts = _b64(blob).split(b"\x00")
                if len(parts) != 3:
                    raise ValueError("PLAIN needs authzid\\0user\\0password")
                authzid = parts[0].decode("utf-8")
                user, password = parts[1].decode("utf-8"), parts[2].decode("utf-8")
            elif mechanism == "LOGIN":
                user_blob = initial or await self._challenge("VXNlcm5hbWU6")
                if user_blob is None:
                    return
                user = _b64(user_blob).decode("utf-8")
                pass_blob = await self._challenge("UGFzc3dvcmQ6")
                if pass_blob is None:
                    return
                password = _b64(pass_blob).decode("utf-8")
            else:
                await self.protocol_error(replies.AUTH_UNKNOWN_MECHANISM, tarpit=True)
                return
        except (ValueError, UnicodeDecodeError, binascii.Error):
            await self.protocol_error(replies.UNRECOGNIZED_PARAMETER)
            return
        failures = self.ctx.auth_failures
        if not failures.allowed(self.connector, self.client_ip):  # again: the credentials took time
            await self._auth_rate_limited()
            return
        # Counted as a failure from here, before the password is checked: a client hanging up
        # during the tarpit, or many at once from one address, are counted all the same.
        attempt = failures.begin(self.connector, self.client_ip)
        # RFC 4616 §2: an authorization identity other than the authenticated one is refused (no
        # user may act as another); it fails as a wrong password does, whatever the password.
        if (not authzid or authzid.lower() == user.lower()) and await self.ctx.users.verify(
            user, password
        ):
            failures.succeeded(self.connector, self.client_ip, attempt)
            user = user.lower()  # the canonical name, as `relaygate user list` shows it
            self.auth_user = user
            self.authenticated = True
            self.rights = self._user_rights(self.connector)
            self.log.info(self.rights.log_tokens(), "Set Session Permissions")
            self.reply(replies.AUTH_OK)
            return
        self.logon_failures += 1
        self.log.info(f"Inbound AUTH {mechanism} failed because of LogonDenied")
        if self.auth_tarpit > 0:
            await self.flush()
            await asyncio.sleep(self.auth_tarpit)
        self.reply(replies.AUTH_FAILED)
        if (
            self.connector.max_logon_failures
            and self.logon_failures >= self.connector.max_logon_failures
        ):
            self.reply(replies.TOO_MANY_ERRORS)
            raise _Close()

    async def _auth_rate_limited(self) -> None:
        """logon_failure_rate_limit reached for this address (or its IPv6 network): refused before
        any password is checked (a protocol error: a client repeating it is closed at
        max_protocol_errors)."""
        counted_as = self.ctx.auth_failures.counted_as(self.connector, self.client_ip)
        self.log.info(
            f"Inbound AUTH refused: logon_failure_rate_limit "
            f"{self.connector.logon_failure_rate_limit} per minute reached for {counted_as}"
        )
        await self.protocol_error(replies.auth_rate_limited(counted_as))

    async def _challenge(self, text: str) -> str | None:
        self.out.append(f"334 {text}\r\n".encode("ascii"))
        self.log.sent(f"334 {text}" if text else "334")
        self._in_auth = True
        try:
            line = await self.read_line()
        finally:
            self._in_auth = False
        if line is None:
            raise _Close("Remote")
        self.log.received_auth_blob()
        answer = line.rstrip(b"\r\n").decode("ascii", "replace")
        if answer == "*":
            self.reply(replies.AUTH_CANCELLED)
            return None
        return answer


def _b64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)
