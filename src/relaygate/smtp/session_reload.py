"""A session following a reload, or a users file changed, while it is open.

Separate because it is one rule with several entry points (before every command but QUIT, at the
end of DATA, at once for a session waiting for a command, and the users file at MAIL): the session
goes on with the connector that now takes its client when it is the one it started on, taking its
new rights, address rules, limits, tarpits and timeouts; otherwise, or when an authenticated
session could not authenticate now, it ends with 421 so that the client reconnects to what the
configuration says.
"""

from __future__ import annotations

import asyncio
from typing import NoReturn

from relaygate import replies
from relaygate.config.model import ReceiveConnector
from relaygate.policy.rights import SessionRights, session_rights
from relaygate.smtp.session_io import _SessionIO
from relaygate.smtp.session_state import _Close, _span


class _ReloadFollowing(_SessionIO):
    """Reloads and users-file changes applied to an open session (see the module docstring)."""

    def reload_applied(self) -> None:
        """A reload has just been applied (SmtpServer tells every open session). A session waiting
        for its next command follows it now, as its next command would (`_follow_reload`): its
        watchdog is re-armed with the new timeouts, so an idle client meets a shortened
        connection_inactivity_timeout within the new value, and a session that must end (its
        client taken off its connector, its authentication lost, its new connection_timeout
        already over) gets its 421 at once. A session in the middle of a command (DATA, a
        STARTTLS handshake, an AUTH exchange, a tarpit, a reply its client does not read) is left
        alone: it follows at the end of DATA or at its next command, as before, so a message
        being received is never cut by a reload."""
        if not self._waiting_for_command():
            return
        try:
            self._follow_reload()
        except _Close as close:  # its reply is queued: end the pending read with it
            assert self._task is not None  # (_waiting_for_command)
            self._timed_out = close
            self._task.cancel()

    def _waiting_for_command(self) -> bool:
        """Reading the client's next command line, between two commands."""
        return (
            self._reading_since is not None
            and not self._in_data
            and not self._in_auth
            and self._timed_out is None
            and self._task is not None
        )

    def _follow_reload(self) -> None:
        """After a reload, go on with the connector that now takes this client when it is the one
        the session started on (by name): its new rights, address rules, limits, tarpits and
        timeouts apply from here (`_take_connector_values`). Called before every command but
        QUIT, and again at the end of DATA, and by `reload_applied` while waiting for one. When
        another connector, or none, takes the client now, or an authenticated session could not
        authenticate now (`_authentication_lost`), end with 421 so that the client reconnects to
        what the configuration says: a client taken off a relaying connector stops relaying at
        once, not when its session ends (connection_timeout, 10 minutes by default)."""
        config = self.ctx.config
        if config is self._config_seen:
            return
        self._config_seen = config
        now = self.ctx.select(self.local[0], self.local[1], self.client_ip).connector
        if now is None or now.name.lower() != self.connector.name.lower():
            taken_by = f"receive connector {now.name}" if now is not None else "no connector"
            self._end_after_reload(
                f"{taken_by} takes {self.client_ip}, not receive connector {self.connector.name}"
            )
        lost_auth = self._authentication_lost(now)
        if lost_auth:
            self._end_after_reload(lost_auth)
        if now is self.connector:
            return
        self.connector = now
        self.address_rules = self.ctx.address_rules(now)
        self.rights = self.ctx.rights(now) if self.auth_user is None else self._user_rights(now)
        self.log.info(self.rights.log_tokens(), "Set Session Permissions")
        self._take_connector_values(now)

    def _take_connector_values(self, connector: ReceiveConnector) -> None:
        """The values the session copied from its connector at its start, taken again from the
        reloaded one (an admin shortening a tarpit or a timeout means the printers that keep
        their connections open too). The timeouts count from when they always did: the absolute
        one from the connection's start (one already over under the new value ends the session
        with the usual 421 4.4.1, as when it runs out between two commands), the inactivity one
        from the start of the read pending (`reload_applied`: an idle session) or the next one. What the client was told at EHLO (PIPELINING, SIZE, the greeting's
        name) and the protocol log's level stay as they were until the next EHLO or session."""
        self.fqdn = connector.fqdn or self.ctx.config.server.fqdn
        self.tarpit = connector.tarpit_interval.total_seconds()
        self.auth_tarpit = connector.auth_tarpit_interval.total_seconds()
        self.bare_lf_rejection = connector.bare_linefeed_rejection_enabled
        self.idle = connector.connection_inactivity_timeout.total_seconds()
        self.deadline = self.started + connector.connection_timeout.total_seconds()
        now = self.loop.time()
        if now >= self.deadline:
            self.log.info(
                f"after a reload connection_timeout {_span(self.deadline - self.started)} of "
                f"receive connector {connector.name} has passed; disconnecting"
            )
            self.reply(replies.CONNECTION_TIMEOUT)
            raise _Close()
        if self._watchdog is not None:  # due at the old values' time: at the new ones' now
            self._watchdog.cancel()
            self._watchdog = self.loop.call_at(self._next_check(now), self._watch)

    def _user_rights(self, connector: ReceiveConnector) -> SessionRights:
        """The rights of the authenticated user on `connector`, with its send-as list as the users
        file was last read."""
        assert self.auth_user is not None
        return session_rights(
            connector,
            authenticated_user=self.auth_user,
            send_as=self.ctx.users.send_as(self.auth_user),
        )

    async def _follow_users_file(self) -> None:
        """At MAIL, an authenticated session follows the users file as it is now (`relaygate user
        send-as` or `remove` while the session is open): a changed send-as list applies from this
        MAIL on; a user no longer in the file is disconnected with 421, as a reload removing it
        does (`_authentication_lost`). One stat per MAIL here; the file is re-read, when it changed,
        in a thread (not queued behind argon2 verifications for every MAIL)."""
        user = self.auth_user
        if user is None:
            return
        if self.ctx.users.changed():
            await asyncio.to_thread(self.ctx.users.refresh)
        users = self.ctx.users
        if user not in users:
            self.log.info(f"user {user} is no longer in the users file {users.path}; disconnecting")
            self.reply(replies.SERVICE_NOT_AVAILABLE)
            raise _Close()
        if users.send_as(user) is not self.rights.send_as:
            self.rights = self._user_rights(self.connector)
            listed = self.rights.send_as
            self.log.info(
                f"send-as list of user {user} is now {', '.join(listed.texts) if listed else 'none'}"
            )

    def _authentication_lost(self, connector: ReceiveConnector) -> str:
        """Why an authenticated session could not authenticate now on `connector` (as reloaded),
        or "": its user is gone from the users file the reload read (an account removed, its
        password perhaps leaked), or the connector offers no AUTH, or only over TLS, which this
        session did not use. Its rights are the user's: it must not keep them."""
        user = self.auth_user
        if user is None:
            return ""
        mechanisms = connector.auth_mechanism
        if "BasicAuth" not in mechanisms:
            return f"receive connector {connector.name} offers no AUTH (BasicAuth) now"
        if "BasicAuthRequireTLS" in mechanisms and not self.tls_active:
            return (
                f"receive connector {connector.name} offers AUTH only after STARTTLS now "
                "(BasicAuthRequireTLS)"
            )
        if user not in self.ctx.users:
            return f"user {user} is no longer in the users file"
        return ""

    def _end_after_reload(self, why: str) -> NoReturn:
        """421 4.3.2 and close: the client reconnects to what the configuration now says."""
        self.log.info(f"after a reload {why}; disconnecting")
        self.reply(replies.SERVICE_NOT_AVAILABLE)
        raise _Close()
