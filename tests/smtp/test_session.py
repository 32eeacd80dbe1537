"""The seed's test end to end, banners, EHLO keywords and Exchange's replies, with real clients."""

from __future__ import annotations

import re
import smtplib

import pytest

from tests.smtp.conftest import FQDN, default_frontend, relay_connector
from tests.smtp.helpers import normalise, swaks

RELAY_DENIED = "550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain"
BANNER = re.compile(
    r"^220 (?P<fqdn>\S+) Microsoft ESMTP MAIL Service ready at "
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [1-9]\d? (Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) \d{4} "
    r"\d\d:\d\d:\d\d [+-]\d{4}$"
)


def transcript(relay, source: str, rcpt: str = "victim@external.example") -> list[str]:
    """A telnet-style session: every reply line the server sent, in order."""
    out = []
    with relay.raw(source) as c:
        out.append(c.expect(220).text)
        out.append(normalise(c.cmd("EHLO scanner01.corp.example", 250).lines[0]))
        out.append(c.cmd("MAIL FROM:<scanner01@corp.example>").text)
        r = c.cmd(f"RCPT TO:<{rcpt}>")
        out.append(r.text)
        if r.code == 250:
            out.append(c.cmd("DATA", 354).text)
            c.send(b"Subject: scan\r\n\r\nscanned document\r\n.\r\n")
            out.append(normalise(c.expect(250).text))
        out.append(c.cmd("QUIT", 221).text)
    return [normalise(x) for x in out]


def test_seed_before_and_after_the_relay_connector(relay):
    # Before: only a Default Frontend-like catch-all connector. External recipients are refused.
    r = relay([default_frontend()])
    before = transcript(r, "127.0.0.5")
    assert before[3] == RELAY_DENIED
    assert len(before) == 5 and before[-1].startswith("221 2.0.0")
    assert transcript(r, "127.0.0.5", "user@corp.example")[3] == "250 2.1.5 Recipient OK"
    assert r.messages() != []  # the internal recipient was accepted and queued
    queued_before = len(r.messages())

    # After: the dedicated relay connector for 127.0.0.5 (the Exchange playbook's New-ReceiveConnector +
    # Add-ADPermission), picked up by a reload.
    r.reconfigure([default_frontend(), relay_connector(["127.0.0.5"])])
    after = transcript(r, "127.0.0.5")
    assert after[3] == "250 2.1.5 Recipient OK"
    assert after[5].startswith(
        "250 2.6.0 <<id>@relay.corp.example> [InternalId=<id>, Hostname=relay.corp.example]"
    )
    assert after[5].endswith("Queued mail for delivery")
    # A client outside the relay connector's range still lands on Default Frontend: refused.
    assert transcript(r, "127.0.0.9")[3] == RELAY_DENIED
    msgs = r.messages()
    assert len(msgs) == queued_before + 1
    assert msgs[-1].recipients[0].address == "victim@external.example"
    assert msgs[-1].connector == "SMTP Relay Internal"
    assert msgs[-1].client_ip == "127.0.0.5"


def test_client_no_connector_accepts_is_closed_without_banner(relay):
    r = relay([relay_connector(["127.0.0.5"])])
    with r.raw("127.0.0.9") as c:
        assert c.is_closed(wait=3)
        assert c.received == b""
    with r.raw("127.0.0.5") as c:
        c.expect(220)


def test_smtplib_relays_and_refuses_by_source_address(relay):
    r = relay([default_frontend(), relay_connector(["127.0.0.5"])])
    with r.smtp("127.0.0.5") as s:
        refused = s.sendmail(
            "app@corp.example",
            ["a@external.example", "b@corp.example"],
            b"Subject: x\r\n\r\nhi\r\n",
        )
        assert refused == {}
    with r.smtp("127.0.0.9") as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as exc:
            s.sendmail("app@corp.example", ["a@external.example"], b"Subject: x\r\n\r\nhi\r\n")
        code, text = exc.value.recipients["a@external.example"]
        assert (code, text) == (
            550,
            b"5.7.54 SMTP; Unable to relay recipient in non-accepted domain",
        )
    msgs = r.messages()
    assert len(msgs) == 1 and {x.address for x in msgs[0].recipients} == {
        "a@external.example",
        "b@corp.example",
    }


def test_swaks_relays_from_allowed_source_and_is_refused_elsewhere(relay):
    r = relay([default_frontend(), relay_connector(["127.0.0.5"])])
    ok = swaks(
        "--server", "127.0.0.1", "--port", str(r.port), "--local-interface", "127.0.0.5",
        "--from", "mfp@corp.example", "--to", "someone@external.example", "--helo", "mfp01.corp.example",
        "--header", "Subject: swaks test", "--body", "from swaks",
    )  # fmt: skip
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "<-  250 2.6.0" in ok.stdout and "Queued mail for delivery" in ok.stdout
    denied = swaks(
        "--server", "127.0.0.1", "--port", str(r.port), "--local-interface", "127.0.0.9",
        "--from", "mfp@corp.example", "--to", "someone@external.example",
    )  # fmt: skip
    assert denied.returncode != 0
    assert "<** 550 5.7.54 SMTP; Unable to relay recipient in non-accepted domain" in denied.stdout
    pipelined = swaks(
        "--server", "127.0.0.1", "--port", str(r.port), "--local-interface", "127.0.0.5", "--pipeline",
        "--from", "mfp@corp.example", "--to", "a@external.example,b@external.example",
    )  # fmt: skip
    assert pipelined.returncode == 0, pipelined.stdout + pipelined.stderr
    msgs = r.messages()
    assert len(msgs) == 2
    assert b"from swaks" in r.data(msgs[0].queue_id)


def test_default_banner_and_custom_banner_and_connector_fqdn(relay):
    r = relay(
        [
            relay_connector(["127.0.0.5"]),
            relay_connector(["127.0.0.6"], name="Custom Banner", banner="220 Printer relay ready"),
            relay_connector(["127.0.0.7"], name="Own Fqdn", fqdn="mx2.corp.example"),
        ]
    )
    with r.raw("127.0.0.5") as c:
        m = BANNER.match(c.expect(220).text)
        assert m and m["fqdn"] == FQDN
        assert c.cmd("HELO printer", 250).text == f"250 {FQDN} Hello [127.0.0.5]"
    with r.raw("127.0.0.6") as c:
        assert c.expect(220).text == "220 Printer relay ready"
    with r.raw("127.0.0.7") as c:
        m = BANNER.match(c.expect(220).text)
        assert m and m["fqdn"] == "mx2.corp.example"
        assert c.cmd("EHLO x", 250).lines[0] == "mx2.corp.example Hello [127.0.0.7]"


def test_queued_reply_names_the_server_not_the_connector_fqdn(relay):
    """exchange-semantics.md §5.2: the `250 2.6.0` after DATA says `Hostname=<server FQDN>`, the
    machine's name, also on a connector whose own Fqdn (banner, EHLO) is another name."""
    r = relay([relay_connector(["127.0.0.7"], name="Own Fqdn", fqdn="mx2.corp.example")])
    with r.raw("127.0.0.7") as c:
        assert BANNER.match(c.expect(220).text)["fqdn"] == "mx2.corp.example"
        c.cmd("EHLO client.corp.example", 250)
        c.cmd("MAIL FROM:<a@corp.example>", 250)
        c.cmd("RCPT TO:<b@external.example>", 250)
        c.cmd("DATA", 354)
        c.send(b"Message-ID: <m2@corp.example>\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
        done = c.expect(250).text
    assert re.match(
        rf"250 2\.6\.0 <m2@corp\.example> \[InternalId=[0-9A-F]{{16}}, Hostname={re.escape(FQDN)}\] ",
        done,
    ), done


def ehlo_keywords(relay, source: str) -> list[str]:
    with relay.raw(source) as c:
        c.expect(220)
        return c.cmd("EHLO client.corp.example", 250).lines[1:]


def test_ehlo_keywords_follow_connector_settings(relay):
    r = relay(
        [
            relay_connector(["127.0.0.5"]),
            relay_connector(
                ["127.0.0.6"], name="Lean", max_message_size="10MB", pipelining_enabled=False,
                eight_bit_mime_enabled=False, enhanced_status_codes_enabled=False, auth_mechanism=["None"],
                delivery_status_notification_enabled=False,
            ),
            relay_connector(["127.0.0.7"], name="Auth Clear", auth_mechanism=["Tls", "BasicAuth"]),
            relay_connector(
                ["127.0.0.8"], name="Auth TLS only", auth_mechanism=["Tls", "BasicAuth", "BasicAuthRequireTLS"],
                size_enabled="EnabledWithoutValue",
            ),
            relay_connector(["127.0.0.9"], name="No size", size_enabled="Disabled"),
        ]
    )  # fmt: skip
    default = ehlo_keywords(r, "127.0.0.5")
    assert default[0] == "SIZE 37748736"  # 36MB, Exchange's advertised value
    for kw in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS"):
        assert kw in default
    assert "DSN" not in default  # NOTIFY/RET are not implemented, so DSN is never advertised
    assert not any(k.startswith("AUTH") for k in default)
    assert "CHUNKING" not in default  # BDAT is not implemented, so never advertised

    lean = ehlo_keywords(r, "127.0.0.6")
    assert lean[0] == "SIZE 10485760"
    for kw in ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "STARTTLS", "DSN"):
        assert kw not in lean
    assert not any(k.startswith("AUTH") for k in lean)

    assert "AUTH PLAIN LOGIN" in ehlo_keywords(r, "127.0.0.7")
    tls_only = ehlo_keywords(r, "127.0.0.8")
    assert "STARTTLS" in tls_only and "SIZE" in tls_only
    assert not any(k.startswith("AUTH") for k in tls_only)  # never offered in clear text
    assert not any(k.startswith("SIZE") for k in ehlo_keywords(r, "127.0.0.9"))

    # Without ENHANCEDSTATUSCODES the replies carry no enhanced code.
    with r.raw("127.0.0.6") as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@corp.example>").text == "250 Sender OK"


def test_mail_parameters_of_an_extension_not_offered_are_refused(relay):
    """RFC 6152 / RFC 1870: BODY=8BITMIME belongs to 8BITMIME and SIZE= to SIZE; a connector that
    does not offer the extension does not take its parameter (`501 5.5.4`, as any parameter it
    does not know). BODY=7BIT declares nothing the connector could not take: accepted."""
    r = relay(
        [
            relay_connector(["127.0.0.5"]),
            relay_connector(
                ["127.0.0.6"], name="No 8BITMIME", eight_bit_mime_enabled=False,
                size_enabled="Disabled",
            ),
        ]
    )  # fmt: skip
    with r.raw("127.0.0.5") as c:
        c.greet()
        assert c.cmd("MAIL FROM:<a@corp.example> BODY=8BITMIME SIZE=100").code == 250
    with r.raw("127.0.0.6") as c:
        c.greet()
        refused = "501 5.5.4 Unrecognized parameter"
        assert c.cmd("MAIL FROM:<a@corp.example> BODY=8BITMIME").text == refused
        assert c.cmd("MAIL FROM:<a@corp.example> body=8bitmime").text == refused
        assert c.cmd("MAIL FROM:<a@corp.example> SIZE=100").text == refused
        assert c.cmd("MAIL FROM:<a@corp.example> BODY=7BIT").text == "250 2.1.0 Sender OK"


def test_smtputf8_is_offered_only_with_8bitmime(relay):
    """RFC 6531 §3.1: a server offering SMTPUTF8 MUST offer 8BITMIME too. A connector with
    eight_bit_mime_enabled = false offers neither and refuses the SMTPUTF8 parameter; a non-ASCII
    address then gets the 553 5.6.7 every undeclared one gets."""
    r = relay(
        [
            relay_connector(["127.0.0.5"]),
            relay_connector(["127.0.0.6"], name="No 8BITMIME", eight_bit_mime_enabled=False),
        ]
    )
    assert {"8BITMIME", "SMTPUTF8"} <= set(ehlo_keywords(r, "127.0.0.5"))
    assert not {"8BITMIME", "SMTPUTF8"} & set(ehlo_keywords(r, "127.0.0.6"))
    with r.raw("127.0.0.6") as c:
        c.greet()
        refused = "501 5.5.4 Unrecognized parameter"
        assert c.cmd("MAIL FROM:<a@corp.example> SMTPUTF8").text == refused
        assert c.cmd("MAIL FROM:<jürgen@corp.example> SMTPUTF8").text == refused
        assert c.cmd("MAIL FROM:<jürgen@corp.example>").code == 553
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250


def test_exchange_replies_for_each_command(relay):
    r = relay([relay_connector(["127.0.0.5"], max_protocol_errors=100)])
    with r.raw("127.0.0.5") as c:
        c.expect(220)
        assert c.cmd("MAIL FROM:<a@corp.example>").text == "503 5.5.2 Send hello first"
        assert c.cmd("EHLO two words").text == "501 5.5.4 Invalid domain name"
        c.cmd("EHLO client.corp.example", 250)
        assert c.cmd("RCPT TO:<b@corp.example>").text == "503 5.5.2 Need mail command"
        assert c.cmd("DATA").text == "503 5.5.2 Need mail command"
        assert c.cmd("MAIL FROM:<not an address>").text == "501 5.1.7 Invalid address"
        assert (
            c.cmd("MAIL FROM:<a@corp.example> FOO=bar").text == "501 5.5.4 Unrecognized parameter"
        )
        assert c.cmd("MAIL FROM:<a@corp.example>").text == "250 2.1.0 Sender OK"
        assert c.cmd("MAIL FROM:<a@corp.example>").text == "503 5.5.2 Sender already specified"
        assert c.cmd("DATA").text == "503 5.5.2 Need rcpt command"
        assert c.cmd("RCPT TO:<bad address>").text == "501 5.1.3 Invalid address"
        assert c.cmd("RCPT TO:<b@corp.example>").text == "250 2.1.5 Recipient OK"
        assert c.cmd("RSET").text == "250 2.0.0 Resetting"
        assert (
            c.cmd("RCPT TO:<b@corp.example>").text == "503 5.5.2 Need mail command"
        )  # RSET forgot it
        assert c.cmd("NOOP").text == "250 2.0.0 OK"
        assert c.cmd("VRFY b@corp.example").text == "252 2.1.5 Cannot VRFY user"
        help_reply = c.cmd("HELP", 214)
        assert help_reply.lines[0] == "This server supports the following commands:"
        assert c.cmd("FOO").text == "500 5.3.3 Unrecognized command"
        assert c.cmd("EXPN staff").code == 502
        assert c.cmd("ETRN corp.example").code == 502
        assert c.cmd("TURN").code == 502
        c.cmd("MAIL FROM:<>", 250)  # the null sender is always accepted (RFC 2505)
        c.cmd("RCPT TO:<b@corp.example>", 250)
        assert c.cmd("DATA").text == "354 Start mail input; end with <CRLF>.<CRLF>"
        c.send(b"Message-ID: <m1@corp.example>\r\nSubject: t\r\n\r\nbody\r\n.\r\n")
        done = c.expect(250).text
        assert re.fullmatch(
            r"250 2\.6\.0 <m1@corp\.example> \[InternalId=[0-9A-F]{16}, Hostname=relay\.corp\.example\] "
            r"\d+ bytes in \d+\.\d{3}, \d+\.\d{3} KB/sec Queued mail for delivery",
            done,
        ), done
        assert c.cmd("QUIT").text == "221 2.0.0 Service closing transmission channel"
        assert c.is_closed()


def test_bdat_without_chunking_hangs_up(relay):
    """CHUNKING is not advertised: what follows BDAT would be raw bytes, never commands."""
    r = relay([relay_connector(["127.0.0.5"])])
    with r.raw("127.0.0.5") as c:
        c.greet()
        c.cmd("MAIL FROM:<a@corp.example>", 250)
        c.cmd("RCPT TO:<b@corp.example>", 250)
        c.send(b"BDAT 40 LAST\r\nMAIL FROM:<x@corp.example>\r\nRCPT TO:<y@ex.example>\r\n")
        replies = c.replies_until_close()
        assert [x.code for x in replies] == [502]
    assert r.messages() == []


@pytest.mark.parametrize(
    "helo", ["EHLO " + FQDN, "EHLO localhost", "EHLO [127.0.0.5]", "HELO [127.0.0.1]"]
)
def test_helo_spoofing_never_grants_relay(relay, helo: str) -> None:
    """security-bar §1B item 26: HELO names the relay itself, localhost or a trusted IP; the
    connector and the rights still come from the TCP peer (127.0.0.9 is outside the relay range)."""
    r = relay([default_frontend(), relay_connector(["127.0.0.5"])])
    with r.raw("127.0.0.9") as c:
        c.expect(220)
        c.cmd(helo, 250)
        assert c.cmd("MAIL FROM:<scanner01@corp.example>").code == 250
        assert c.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
        assert c.cmd("RCPT TO:<user@corp.example>").code == 250  # accepted domain: still fine


def test_rset_re_evaluates_every_recipient(relay) -> None:
    """security-bar §1B item 36: no sticky "relay OK" across RSET or a new transaction."""
    r = relay([default_frontend(), relay_connector(["127.0.0.5"])])
    with r.raw("127.0.0.9") as c:
        c.expect(220)
        c.cmd("EHLO client.corp.example", 250)
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250
        assert c.cmd("RCPT TO:<user@corp.example>").code == 250
        assert c.cmd("RSET").text == "250 2.0.0 Resetting"
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250
        assert c.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
        assert c.cmd("RCPT TO:<user@corp.example>").code == 250
        assert c.cmd("RSET").code == 250
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250
        assert c.cmd("RCPT TO:<victim@external.example>").text == RELAY_DENIED
    # And the allowed client's right does not leak into another session either.
    with r.raw("127.0.0.5") as c:
        c.expect(220)
        c.cmd("EHLO scanner01.corp.example", 250)
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250
        assert c.cmd("RCPT TO:<partner@external.example>").code == 250
    with r.raw("127.0.0.9") as c:
        c.expect(220)
        c.cmd("EHLO scanner01.corp.example", 250)
        assert c.cmd("MAIL FROM:<a@corp.example>").code == 250
        assert c.cmd("RCPT TO:<partner@external.example>").text == RELAY_DENIED


def test_malformed_dsn_parameters_are_refused_with_501(relay):
    """RFC 3461's parameters (DSN is not advertised, but a client giving them has them honoured
    in the relay's own reports) were taken whatever their value: a malformed NOTIFY was ignored,
    so NOTIFY=NEVER,FAILURE still got every report, and an ENVID or ORCPT that is not xtext (§4)
    came back in the report as something the client never sent. Refused with 501, as Postfix
    does; well-formed ones are taken as before."""
    r = relay([relay_connector(["127.0.0.5"], max_protocol_errors=100)])
    bad = "501 5.5.4 Unrecognized parameter"
    with r.raw("127.0.0.5") as c:
        c.greet()
        for params in ("ENVID=a+ZZ", "ENVID=trailing+", "ENVID", "ENVID=", "RET=BODY", "RET"):
            assert c.cmd(f"MAIL FROM:<a@corp.example> {params}").text == bad, params
        for params in ("ENVID=line+0D+0ABreak", "ENVID=caf+C3+A9"):  # decoded: not printable ASCII
            assert c.cmd(f"MAIL FROM:<a@corp.example> {params}").text == bad, params
        c.cmd("MAIL FROM:<a@corp.example> RET=hdrs ENVID=QQ+2B314159", 250)
        for params in (
            "NOTIFY=NEVER,FAILURE",
            "NOTIFY=SOMETIMES",
            "NOTIFY",
            "ORCPT=b@corp.example",
            "ORCPT=;b@corp.example",
            "ORCPT=rfc822;",
            "ORCPT=rfc822;b+G1@corp.example",
            "ORCPT=utf-8;b\\y@corp.example",
        ):
            assert c.cmd(f"RCPT TO:<b@corp.example> {params}").text == bad, params
        for params in (
            "NOTIFY=success,delay ORCPT=rfc822;b+2B1@corp.example",
            "NOTIFY=NEVER ORCPT=utf-8;j\\x{E4}rg@corp.example",
        ):
            c.cmd(f"RCPT TO:<b@corp.example> {params}", 250)


def test_a_hello_without_a_name_is_taken_unless_the_connector_requires_one(relay):
    """Exchange's RequireEHLODomain ($false by default): "the client isn't required to provide a
    domain name in the EHLO handshake"; $true closes the session. A bare EHLO got 501 and counted
    as a protocol error with the default: a printer whose host name is empty could not send after
    the move from Exchange."""
    r = relay(
        [
            relay_connector(["127.0.0.5"]),
            relay_connector(["127.0.0.6"], name="Strict", require_ehlo_domain=True),
        ]
    )
    for verb in ("EHLO", "HELO"):
        with r.raw("127.0.0.5") as c:
            c.expect(220)
            assert c.cmd(verb).code == 250
            assert c.cmd("MAIL FROM:<printer@corp.example>").code == 250
            assert c.cmd("RCPT TO:<someone@corp.example>").code == 250
            assert c.cmd("DATA").code == 354
            assert c.cmd("Subject: scan\r\n\r\npage 1\r\n.").code == 250
    with r.raw("127.0.0.6") as c:
        c.expect(220)
        assert c.cmd("EHLO").text == "501 5.0.0 EHLO requires domain address"
        assert c.is_closed()
