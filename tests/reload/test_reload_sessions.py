"""A reload reaches the sessions already open: the values a session took from its connector when
it started (tarpits, timeouts, bare-LF rejection) follow the reloaded connector from the next
command on (at once for a session waiting for a command: its timeouts, or its 421), and a
transaction whose rights a reload took away between RCPT and the end of DATA is refused there,
never queued."""

from __future__ import annotations

import base64
import time

from tests.smtp.conftest import default_frontend, relay, relay_connector  # noqa: F401
from tests.smtp.helpers import RawClient

RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
SERVICE_NOT_AVAILABLE = "421 4.3.2 Service not available"


def _frontend() -> dict:
    return default_frontend(tarpit_interval="00:00:00")


def _printer(**overrides: object) -> dict:
    """The relaying connector of 127.0.0.5 (and .6): anonymous, Accept-Any-Recipient."""
    return relay_connector(["127.0.0.5", "127.0.0.6"], **overrides)


def _in_transaction(port: int, *recipients: str) -> RawClient:
    c = RawClient(port, source="127.0.0.5")
    c.greet()
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    for rcpt in recipients:
        c.cmd(f"RCPT TO:<{rcpt}>", 250)
    return c


# -- the values a session copies at its start ------------------------------------------------------


def test_a_reload_shortening_the_tarpit_applies_to_an_open_session(relay):  # noqa: F811
    """A session opened under a 60 s tarpit: after a reload that sets it to 0 its next refused
    RCPT is answered at once (it waited the old 60 s: the client's 5 s read timed out)."""
    r = relay([_frontend(), _printer(tarpit_interval="00:01:00", permissions=[])])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    r.reconfigure([_frontend(), _printer(tarpit_interval="00:00:00", permissions=[])])
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    started = time.monotonic()
    assert c.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
    assert time.monotonic() - started < 2
    c.close()


def test_a_reload_shortening_the_inactivity_timeout_applies_from_the_next_command(relay):  # noqa: F811
    """connection_inactivity_timeout 20 s → 1 s: after the next command the session is idle for
    the new second, not the old 20 (the client's 5 s read timed out before)."""
    r = relay([_frontend(), _printer(connection_inactivity_timeout="00:00:20")])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    r.reconfigure([_frontend(), _printer(connection_inactivity_timeout="00:00:01")])
    c.cmd("NOOP", 250)
    started = time.monotonic()
    timed_out = c.reply()
    assert timed_out is not None and timed_out.text == "451 4.7.0 Timeout waiting for client input"
    assert time.monotonic() - started < 4
    assert c.is_closed()
    c.close()


def test_a_reload_enabling_bare_linefeed_rejection_applies_to_an_open_session(relay):  # noqa: F811
    r = relay([_frontend(), _printer(bare_linefeed_rejection_enabled=False)])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    c.send(b"NOOP\n")
    assert c.expect(250).text == "250 2.0.0 OK"
    r.reconfigure([_frontend(), _printer(bare_linefeed_rejection_enabled=True)])
    c.send(b"NOOP\n")
    refused = c.reply()
    assert refused is not None and refused.code == 500, refused
    c.close()


def test_a_reload_shortening_the_auth_tarpit_applies_to_an_open_session(relay, monkeypatch):  # noqa: F811
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth
    from tests.smtp.test_auth import add_user, auth_connector

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    r = relay([auth_connector(auth_tarpit_interval="00:01:00")])
    add_user(r, "scanner")
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    r.reconfigure([auth_connector(auth_tarpit_interval="00:00:00")])
    wrong = base64.b64encode(b"\0scanner\0wrong password").decode()
    started = time.monotonic()
    assert c.cmd(f"AUTH PLAIN {wrong}").code == 535
    assert time.monotonic() - started < 2
    c.close()


# -- DATA after a reload ---------------------------------------------------------------------------


def test_a_reload_between_rcpt_and_data_taking_the_client_off_its_connector_refuses_data(relay):  # noqa: F811
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    r.reconfigure([_frontend(), relay_connector(["127.0.0.6"])])
    c.send(b"DATA\r\n")
    assert [reply.text for reply in c.replies_until_close()] == [SERVICE_NOT_AVAILABLE]
    assert r.messages() == []
    c.close()


def test_a_reload_between_rcpt_and_data_removing_the_relay_right_refuses_data(relay):  # noqa: F811
    """The connector still takes the client, without its relay right now: DATA gets the reply
    the RCPT would get now, and the transaction is over (nothing stored, no 354)."""
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example", "other@external.example")
    r.reconfigure([_frontend(), _printer(permissions=[])])
    assert c.cmd("DATA").text == RELAY_DENIED
    assert c.cmd("DATA").code == 503  # no transaction any more
    assert r.messages() == []
    c.close()


def test_a_reload_during_data_taking_the_client_off_its_connector_stores_nothing(relay):  # noqa: F811
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    c.cmd("DATA", 354)
    c.send(b"Subject: scan\r\n\r\nfirst half\r\n")
    r.reconfigure([_frontend(), relay_connector(["127.0.0.6"])])
    # Not cut in the middle of its message: the reload is applied to it at the end of DATA.
    assert c.nothing_within(0.5)
    c.send(b"second half\r\n.\r\n")
    assert [reply.text for reply in c.replies_until_close()] == [SERVICE_NOT_AVAILABLE]
    assert r.messages() == []
    c.close()


def test_a_reload_during_data_removing_the_relay_right_refuses_the_message(relay):  # noqa: F811
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    c.cmd("DATA", 354)
    c.send(b"Subject: scan\r\n\r\nfirst half\r\n")
    r.reconfigure([_frontend(), _printer(permissions=[])])
    c.send(b"second half\r\n.\r\n")
    assert c.reply().text == RELAY_DENIED  # type: ignore[union-attr]
    c.cmd("RSET", 250)  # the session goes on: it may still send to the accepted domains
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    c.cmd("RCPT TO:<someone@corp.example>", 250)
    c.cmd("DATA", 354)
    assert c.cmd("Subject: internal\r\n\r\nbody\r\n.").code == 250
    stored = r.messages()
    assert [[x.address for x in m.recipients] for m in stored] == [["someone@corp.example"]]
    c.close()


def test_a_reload_that_takes_some_recipients_away_defers_the_whole_message(relay):  # noqa: F811
    """One recipient still allowed, one not: the message is refused with a 4xx, so the client
    sends it again and learns at RCPT which recipient is refused. Queueing it for the one left
    and answering 250 would drop the other without anyone knowing; queueing it for both would
    relay where the new configuration says no."""
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "someone@corp.example", "victim@external.example")
    c.cmd("DATA", 354)
    c.send(b"Subject: scan\r\n\r\nbody\r\n")
    r.reconfigure([_frontend(), _printer(permissions=[])])
    c.send(b".\r\n")
    deferred = c.reply()
    assert deferred is not None and deferred.code == 451, deferred
    assert r.messages() == []
    # sent again: RCPT says which recipient the configuration now refuses
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    c.cmd("RCPT TO:<someone@corp.example>", 250)
    assert c.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
    c.close()


def test_a_reload_lowering_max_message_size_during_data_refuses_a_message_over_it(relay):  # noqa: F811
    r = relay([_frontend(), _printer(max_message_size=1_000_000)])
    c = _in_transaction(r.port, "victim@external.example")
    c.cmd("DATA", 354)
    c.send(b"Subject: scan\r\n\r\n" + (b"x" * 998 + b"\r\n") * 100)
    r.reconfigure([_frontend(), _printer(max_message_size=65536)])
    c.send(b".\r\n")
    assert c.reply().text == "552 5.3.4 Message size exceeds fixed maximum message size"  # type: ignore[union-attr]
    assert r.messages() == []
    c.close()


def test_a_reload_between_rcpt_and_data_removing_the_authenticated_user_refuses_data(
    relay,  # noqa: F811
    monkeypatch,
):
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth
    from tests.smtp.test_auth import PASSWORD, add_user, auth_connector, cli

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    r = relay([auth_connector()])
    add_user(r, "scanner")
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    plain = base64.b64encode(f"\0scanner\0{PASSWORD}".encode()).decode()
    c.cmd(f"AUTH PLAIN {plain}", 235)
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    c.cmd("RCPT TO:<victim@external.example>", 250)
    assert cli(r, "user", "remove", "scanner").exit_code == 0
    r.reconfigure([auth_connector()])
    c.send(b"DATA\r\n")
    assert [reply.text for reply in c.replies_until_close()] == [SERVICE_NOT_AVAILABLE]
    assert r.messages() == []
    c.close()


def test_a_reload_that_changes_nothing_for_the_transaction_lets_data_through(relay):  # noqa: F811
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example", "someone@corp.example")
    r.reconfigure([_frontend(), _printer(max_message_size=20_000_000)])
    c.cmd("DATA", 354)
    c.send(b"Subject: scan\r\n\r\nbody\r\n")
    r.reconfigure([_frontend(), _printer(max_message_size=30_000_000)])
    assert c.cmd(".").code == 250
    (stored,) = r.messages()
    assert [x.address for x in stored.recipients] == [
        "victim@external.example",
        "someone@corp.example",
    ]
    c.close()


def test_a_reload_between_rcpt_and_data_restricting_the_senders_refuses_data(relay):  # noqa: F811
    """allowed_senders set by a reload, the transaction's sender not in it: DATA gets the reply
    MAIL would get now."""
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    r.reconfigure([_frontend(), _printer(allowed_senders=["scan@corp.example"])])
    refused = c.cmd("DATA")
    assert refused.code == 550 and refused.text.startswith("550 5.7."), refused
    c.cmd("MAIL FROM:<scan@corp.example>", 250)  # the session goes on with the new list
    c.cmd("RCPT TO:<victim@external.example>", 250)
    c.cmd("DATA", 354)
    assert c.cmd("From: scan@corp.example\r\nSubject: scan\r\n\r\nbody\r\n.").code == 250
    assert len(r.messages()) == 1
    c.close()


def test_a_reload_lowering_max_recipients_defers_a_message_over_the_new_limit(relay):  # noqa: F811
    """max_recipients_per_message 10 → 1 with two recipients accepted: RCPT would now say 452
    for the second, so the message is deferred (451) and sent again in two transactions."""
    r = relay([_frontend(), _printer(max_recipients_per_message=10)])
    c = _in_transaction(r.port, "a@external.example", "b@external.example")
    r.reconfigure([_frontend(), _printer(max_recipients_per_message=1)])
    assert c.cmd("DATA").text == (
        "451 4.7.0 Some recipients are no longer accepted; send the message again"
    )
    c.cmd("MAIL FROM:<scanner@corp.example>", 250)
    c.cmd("RCPT TO:<a@external.example>", 250)
    assert c.cmd("RCPT TO:<b@external.example>").code == 452
    assert r.messages() == []
    c.close()


# -- sessions idle when the reload lands -----------------------------------------------------------


def test_a_reload_shortening_the_inactivity_timeout_reaches_an_idle_session(relay):  # noqa: F811
    """connection_inactivity_timeout 20 s → 1 s while the client waits without a command: it gets
    the usual 451 within the new second (it waited out the old 20 s: the client's 5 s read timed
    out)."""
    r = relay([_frontend(), _printer(connection_inactivity_timeout="00:00:20")])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    started = time.monotonic()
    r.reconfigure([_frontend(), _printer(connection_inactivity_timeout="00:00:01")])
    timed_out = c.reply()
    assert timed_out is not None and timed_out.text == "451 4.7.0 Timeout waiting for client input"
    assert time.monotonic() - started < 3
    assert c.is_closed()
    c.close()


def test_a_reload_whose_connection_timeout_has_passed_ends_an_idle_session_at_once(relay):  # noqa: F811
    """connection_timeout 60 s → 2 s on an idle session already open for longer: 421 4.4.1 as the
    reload lands, not at the next command (nor after the old inactivity timeout)."""
    r = relay([_frontend(), _printer(connection_timeout="00:01:00")])
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    opened = time.monotonic()
    time.sleep(max(0.0, opened + 2.2 - time.monotonic()))  # the new timeout itself must pass
    started = time.monotonic()
    shorter = {"connection_timeout": "00:00:02", "connection_inactivity_timeout": "00:00:01"}
    r.reconfigure([_frontend(), _printer(**shorter)])
    assert c.reply().text == "421 4.4.1 Connection timed out"  # type: ignore[union-attr]
    assert time.monotonic() - started < 2
    assert c.is_closed()
    c.close()


def test_a_reload_taking_the_client_off_its_connector_ends_an_idle_session_at_once(relay):  # noqa: F811
    """The client's range removed from the relaying connector while its session waits for a
    command: 421 4.3.2 and the connection closed as the reload lands (before: only at its next
    command, which a printer holding its connection open may not send for minutes)."""
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    started = time.monotonic()
    r.reconfigure([_frontend(), relay_connector(["127.0.0.6"])])
    assert [reply.text for reply in c.replies_until_close()] == [SERVICE_NOT_AVAILABLE]
    assert time.monotonic() - started < 2
    assert r.messages() == []
    c.close()


def test_a_reload_keeps_an_idle_session_its_connector_still_takes(relay):  # noqa: F811
    """A reload that leaves the client on its connector ends nothing: the idle session goes on
    with the new values (here a larger max_message_size) and its transaction."""
    r = relay([_frontend(), _printer()])
    c = _in_transaction(r.port, "victim@external.example")
    r.reconfigure([_frontend(), _printer(max_message_size=20_000_000)])
    c.cmd("DATA", 354)
    assert c.cmd("Subject: scan\r\n\r\nbody\r\n.").code == 250
    assert len(r.messages()) == 1
    c.close()


def test_a_reload_waits_for_an_auth_exchange_to_end(relay, monkeypatch):  # noqa: F811
    """A reload taking the client off its connector during AUTH LOGIN's exchange does not cut
    it (the client is answering a 334, not idle): the exchange ends as it would, and the next
    command gets the 421."""
    from argon2 import PasswordHasher

    import relaygate.smtp.auth as auth
    from tests.smtp.test_auth import PASSWORD, add_user, auth_connector, b64

    monkeypatch.setattr(
        auth, "_HASHER", PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
    )
    r = relay([auth_connector()])
    add_user(r, "scanner")
    c = RawClient(r.port, source="127.0.0.5")
    c.greet()
    c.cmd("AUTH LOGIN", 334)
    r.reconfigure([auth_connector(remote_ip_ranges=["127.0.0.6"])])
    assert c.nothing_within(0.5)
    c.cmd(b64("scanner"), 334)
    c.cmd(b64(PASSWORD), 235)
    c.send(b"NOOP\r\n")
    assert [reply.text for reply in c.replies_until_close()] == [SERVICE_NOT_AVAILABLE]
    c.close()
