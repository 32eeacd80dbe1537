"""`relaygate test send` (Send-MailMessage with the transcript shown) and `relaygate test smtp` (telnet).

`test send` speaks SMTP itself (relaygate.smtp_transcript) so every line both ways is printed, then
says in plain words what happened and why. Exit codes: 0 accepted for every recipient, 2 accepted for
some, 1 refused or failed.
"""

from __future__ import annotations

import asyncio
import email.utils
import getpass
import ipaddress
import os
import socket
import ssl
import sys
from dataclasses import dataclass, field
from email.header import Header
from pathlib import Path
from typing import Any

import typer
from rich.text import Text

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, console, die, emit_json
from relaygate.smtp_transcript import (
    Reply,
    SMTPClosed,
    SMTPConnection,
    Transcript,
    TranscriptLine,
    client_tls_context,
    is_loopback,
    is_own_address,
    mask_auth_line,
    split_server,
)

__all__ = ["SendOptions", "SendResult", "register", "run_send"]


@dataclass
class SendOptions:
    server: str
    sender: str
    recipients: list[str]
    source_ip: str | None = None
    subject: str | None = None
    body: str | None = None
    starttls: bool = False
    tls: bool = False
    insecure: bool = False
    auth_user: str | None = None
    password: str | None = None
    helo: str | None = None
    timeout: float = 30.0


@dataclass
class SendResult:
    server: str
    transcript: Transcript
    outcome: str = "error"  # accepted | partial | refused | error
    verdict: str = ""
    local: tuple[str, int] | None = None
    peer: tuple[str, int] | None = None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    queue_id: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return {"accepted": 0, "partial": 2}.get(self.outcome, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "server": self.server,
            "source": _fmt(self.local) if self.local else None,
            "peer": _fmt(self.peer) if self.peer else None,
            "outcome": self.outcome,
            "verdict": self.verdict,
            "queue_id": self.queue_id,
            "recipients": self.recipients,
            "warnings": self.warnings,
            "transcript": self.transcript.to_list(),
            "exit_code": self.exit_code,
        }


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _self_test_warning(local: tuple[str, int], peer: tuple[str, int]) -> str | None:
    """The loopback false positive: testing from the relay itself proves nothing about the printers."""
    source, server = local[0], peer[0]
    if is_loopback(source):
        why = f"from a loopback address ({source})"
    elif is_own_address(source, server):
        why = f"from the relay's own address ({source})"
    else:
        return None
    return (
        f"You are testing {why}: the relay matches this connection against the connector whose "
        f"RemoteIPRanges contain {source} (typically a loopback connector), not the connector of your "
        "printers and applications. A success here does not prove that a device elsewhere can relay. "
        "Test from the device's network (or with --source-ip set to an address the device's connector "
        "covers), or ask `relaygate explain --client-ip <device IP>`."
    )


def _connector_note(
    config: Path | None, local: tuple[str, int], peer: tuple[str, int]
) -> str | None:
    """When the relay's config is at hand: which connector takes this test connection."""
    from relaygate.audit import relay_grant
    from relaygate.config import ConfigError, default_config_path, load_config
    from relaygate.policy.selection import select_connector

    path = default_config_path(config)
    if path is None or not path.exists():
        return None
    try:
        cfg = load_config(path)
        selection = select_connector(
            cfg.receive_connectors, local_ip=peer[0], local_port=peer[1], client_ip=local[0]
        )
    except (ConfigError, ValueError):
        return None
    if selection.connector is None:
        return f"({path} has no connector for {local[0]} on {_fmt(peer)}.)"
    relays = "grants" if relay_grant(selection.connector).anonymous else "does not grant"
    return (
        f'In {path}, this connection is taken by connector "{selection.connector.name}" '
        f"(range {selection.matched_range}), which {relays} relay."
    )


def _queue_id(reply: Reply) -> str | None:
    import re

    text = reply.lines[-1] if reply.lines else ""
    for pattern in (
        r"queued as\s+([^\s;,]+)",
        r"InternalId=([^,\]\s]+)",
        r"^2\.\d+\.\d+\s+(<[^>]+>)",
        r"^2\.\d+\.\d+\s+(?:Ok:?\s+)?id=?([^\s]+)",
    ):
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            return m.group(1)
    return None


def _explain_refusal(reply: Reply, stage: str, client_ip: str) -> str:
    """Plain words for a refusal, with the next step."""
    enh, code, text = reply.enhanced, reply.code, reply.text.lower()
    explain = f"`relaygate explain --client-ip {client_ip}`"
    if enh == "5.7.54" or "unable to relay" in text or "relay access denied" in text:
        return (
            f"this client's IP ({client_ip}) is not on a connector that grants "
            f"ms-Exch-SMTP-Accept-Any-Recipient, and the recipient is outside the accepted domains; run {explain}"
        )
    if code == 530 and enh == "5.7.0":
        return "the connector requires STARTTLS first (require_tls); retry with --starttls"
    if stage == "MAIL" and "send as this sender" in text:
        # the sender is refused, not the client: the connector may submit (Exchange's 5.7.1 text)
        return (
            "this sender is refused, not the client: it is not in the connector's allowed_senders, "
            "or it is in an authoritative accepted domain and the session lacks "
            "ms-Exch-SMTP-Accept-Authoritative-Domain-Sender; retry with --from an address the "
            f"device sends as; `relaygate explain --client-ip {client_ip} --from ADDRESS` "
            "shows the sender rules"
        )
    if code == 530 or (enh == "5.7.1" and stage == "MAIL"):
        return (
            f"the connector that took {client_ip} does not let anonymous clients submit "
            f"(no ms-Exch-SMTP-Submit: add AnonymousUsers to its permission_groups), or authentication is "
            f"required (--auth); run {explain}"
        )
    if enh in ("5.7.3", "5.7.8") or code == 535:
        return "authentication failed: wrong user name or password, or the account may not send"
    if code == 552 or enh.startswith("5.3.4") or enh == "5.2.3":
        return "the message is larger than the connector allows (max_message_size)"
    if enh == "4.5.3" or code == 452:
        return "too many recipients for one message (max_recipients_per_message); send in smaller batches"
    if enh == "5.4.6":
        return "too many Received headers (max_hop_count): a mail loop?"
    if 400 <= code < 500:
        return "a temporary refusal: the client should retry later (limits, tarpit or the server shutting down)"
    return f"the server refused at {stage}; run {explain} to see the connector and the reply it would give"


def _build_message(opts: SendOptions, helo: str, local_ip: str) -> list[str]:
    now = email.utils.formatdate(localtime=True)
    subject = (
        opts.subject if opts.subject is not None else f"RelayGate test message from {local_ip}"
    )
    body = (
        opts.body
        if opts.body is not None
        else (
            f"This is a test message sent by `relaygate test send` from {local_ip} through {opts.server} "
            f"at {now}.\nIf you can read it, this path relays."
        )
    )
    subject_header = subject if subject.isascii() else Header(subject, "utf-8").encode()
    domain = helo if "." in helo else "relaygate.test"
    headers = [
        f"From: <{opts.sender}>" if opts.sender else "From: <>",
        "To: " + ", ".join(f"<{r}>" for r in opts.recipients),
        f"Subject: {subject_header}",
        f"Date: {now}",
        f"Message-ID: {email.utils.make_msgid('relaygate-test', domain=domain)}",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "X-Mailer: relaygate test send",
    ]
    lines = [*headers, ""]
    for line in body.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        lines.append("." + line if line.startswith(".") else line)  # dot-stuffing (RFC 5321 4.5.2)
    return lines


async def run_send(opts: SendOptions, transcript: Transcript) -> SendResult:
    result = SendResult(server=opts.server, transcript=transcript)
    try:
        host, port = split_server(opts.server, 465 if opts.tls else 25)
    except ValueError as exc:
        result.verdict = f"Error: {exc}"
        return result
    conn = SMTPConnection(transcript, timeout=opts.timeout)
    context = client_tls_context(opts.insecure) if (opts.tls or opts.starttls) else None
    try:
        try:
            await conn.open(
                host,
                port,
                source_ip=opts.source_ip,
                tls_context=context if opts.tls else None,
                server_hostname=host,
            )
        except ssl.SSLError as exc:
            result.verdict = f"TLS failed: {exc.reason or exc}" + (
                "; the certificate is not trusted (use --insecure to test anyway)"
                if isinstance(exc, ssl.SSLCertVerificationError)
                else ""
            )
            return result
        except TimeoutError:
            result.verdict = (
                f"Could not connect: no answer from {host}:{port} within {opts.timeout:g}s"
            )
            return result
        except OSError as exc:
            if opts.source_ip and exc.errno in (
                99,
                49,
                10049,
            ):  # EADDRNOTAVAIL (Linux, BSD, Windows)
                result.verdict = f"Could not connect: --source-ip {opts.source_ip} is not an address of this machine"
            else:
                result.verdict = f"Could not connect to {host}:{port}: {exc.strerror or exc}"
            return result
        result.local, result.peer = conn.local_address, conn.peer_address
        client_ip = result.local[0]
        warning = _self_test_warning(result.local, result.peer)
        if warning:
            result.warnings.append(warning)
        return await _converse(conn, opts, result, host, context, client_ip)
    except SMTPClosed:
        if not result.verdict:
            result.verdict = "Failed: the server closed the connection" + (
                " before sending a banner: no receive connector's RemoteIPRanges contain "
                f"{result.local[0]} on this port (RelayGate and Exchange drop such clients silently); "
                f"run `relaygate explain --client-ip {result.local[0]}`"
                if result.local and not any(line.direction == "S" for line in transcript.lines)
                else ""
            )
        result.outcome = (
            "error" if result.outcome not in ("accepted", "partial") else result.outcome
        )
        return result
    except TimeoutError:
        result.verdict = f"Failed: the server did not answer within {opts.timeout:g}s (tarpit or a stalled server?)"
        return result
    except ssl.SSLError as exc:
        result.verdict = f"TLS failed: {exc.reason or exc}" + (
            "; the certificate is not trusted (use --insecure to test anyway)"
            if isinstance(exc, ssl.SSLCertVerificationError)
            else ""
        )
        return result
    finally:
        await conn.close()


async def _converse(
    conn: SMTPConnection,
    opts: SendOptions,
    result: SendResult,
    host: str,
    context: ssl.SSLContext | None,
    client_ip: str,
) -> SendResult:
    def refuse(reply: Reply, stage: str) -> SendResult:
        result.outcome = "refused"
        result.verdict = f"Refused: {reply.line()} — {_explain_refusal(reply, stage, client_ip)}"
        return result

    banner = await conn.read_reply()
    if banner.code != 220:
        await _quit(conn)
        return refuse(banner, "the banner")
    helo = opts.helo or socket.getfqdn() or "relaygate-test"
    ehlo = await conn.command(f"EHLO {helo}")
    if ehlo.code != 250:
        ehlo = await conn.command(f"HELO {helo}")
        if ehlo.code != 250:
            await _quit(conn)
            return refuse(ehlo, "HELO")
    if opts.starttls:
        if "STARTTLS" not in ehlo.keywords():
            await _quit(conn)
            result.verdict = (
                "Failed: the server does not offer STARTTLS to this client (the connector's auth_mechanism "
                "lacks Tls, or no certificate is configured)"
            )
            return result
        reply = await conn.command("STARTTLS")
        if reply.code != 220:
            await _quit(conn)
            return refuse(reply, "STARTTLS")
        assert context is not None
        await conn.starttls(context, host)
        ehlo = await conn.command(f"EHLO {helo}")
        if ehlo.code != 250:
            await _quit(conn)
            return refuse(ehlo, "EHLO after STARTTLS")
    if opts.auth_user:
        mechanisms = ehlo.keywords().get("AUTH", "").split()
        if not mechanisms:
            await _quit(conn)
            result.verdict = "Failed: the server offers no AUTH here" + (
                ""
                if conn.tls
                else " (try --starttls: BasicAuthRequireTLS and require_tls offer AUTH only "
                "after TLS)"
            )
            return result
        try:
            reply = await conn.auth(mechanisms, opts.auth_user, opts.password or "")
        except ValueError as exc:
            await _quit(conn)
            result.verdict = f"Failed: {exc}"
            return result
        if reply.code != 235:
            await _quit(conn)
            return refuse(reply, "AUTH")
    reply = await conn.command(f"MAIL FROM:<{opts.sender}>")
    if not reply.positive:
        await _quit(conn)
        return refuse(reply, "MAIL")
    refused: list[tuple[str, Reply]] = []
    for rcpt in opts.recipients:
        reply = await conn.command(f"RCPT TO:<{rcpt}>")
        result.recipients.append(
            {"address": rcpt, "reply": reply.line(), "accepted": reply.positive}
        )
        if not reply.positive:
            refused.append((rcpt, reply))
    if len(refused) == len(opts.recipients):
        await _quit(conn)
        first = refused[0][1]
        result.outcome = "refused"
        result.verdict = (
            f"Refused: {first.line()} — {_explain_refusal(first, 'RCPT', client_ip)}"
            + (f" ({len(refused)} recipients refused)" if len(refused) > 1 else "")
        )
        return result
    reply = await conn.command("DATA")
    if reply.code != 354:
        await _quit(conn)
        return refuse(reply, "DATA")
    await conn.send_lines([*_build_message(opts, helo, client_ip), "."])
    reply = await conn.read_reply()
    if not reply.positive:
        await _quit(conn)
        for entry in result.recipients:
            entry["accepted"] = False
        return refuse(reply, "end of DATA")
    result.queue_id = _queue_id(reply)
    await _quit(conn)
    queued = f"queue id {result.queue_id}" if result.queue_id else f"server reply: {reply.line()}"
    accepted = len(opts.recipients) - len(refused)
    if not refused:
        result.outcome = "accepted"
        result.verdict = (
            f"Relayed: the server accepted the message for all {accepted} recipient(s) ({queued}). "
            "It now owns delivery: follow it with `relaygate trace` or the queue."
        )
    else:
        result.outcome = "partial"
        names = "; ".join(f"{r} ({reply.line()})" for r, reply in refused)
        result.verdict = (
            f"Partly accepted: the server accepted the message for {accepted} of {len(opts.recipients)} "
            f"recipients ({queued}) and refused {names} — "
            f"{_explain_refusal(refused[0][1], 'RCPT', client_ip)}"
        )
    return result


async def _quit(conn: SMTPConnection) -> None:
    if conn.closed:
        return
    try:
        await conn.command("QUIT")
    except (SMTPClosed, TimeoutError, OSError):
        pass


# -- interactive -------------------------------------------------------------------------------------


async def run_interactive(
    server: str,
    *,
    source_ip: str | None,
    starttls: bool,
    tls: bool,
    insecure: bool,
    timeout: float,
    echo: bool,
    out: Any,
) -> int:
    def show(line: TranscriptLine) -> None:
        if line.direction == "C" and not echo:
            return
        out(line)

    transcript = Transcript(on_line=show)
    host, port = split_server(server, 465 if tls else 25)
    conn = SMTPConnection(transcript, timeout=timeout)
    context = client_tls_context(insecure) if (tls or starttls) else None
    loop = asyncio.get_running_loop()
    try:
        await conn.open(
            host,
            port,
            source_ip=source_ip,
            tls_context=context if tls else None,
            server_hostname=host,
        )
        local, peer = conn.local_address, conn.peer_address
        warning = _self_test_warning(local, peer)
        if warning:
            transcript.note("warning: " + warning)
        await conn.read_reply()
        if starttls:
            helo = socket.getfqdn() or "relaygate-test"
            await conn.command(f"EHLO {helo}")
            reply = await conn.command("STARTTLS")
            if reply.code == 220:
                assert context is not None
                await conn.starttls(context, host)
                transcript.note("now send EHLO again")
        in_data = False
        masking = False
        while not conn.closed:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if line == "":
                if not in_data:
                    await _quit(conn)
                break
            line = line.rstrip("\r\n")
            if in_data:
                await conn.send_line(line)
                if line == ".":
                    in_data = False
                    await conn.read_reply()
                continue
            shown = "******** (AUTH response)" if masking else mask_auth_line(line)
            reply = await conn.command(line, shown=shown)
            verb = line.strip().split(" ", 1)[0].upper()
            masking = reply.code == 334
            if verb == "DATA" and reply.code == 354:
                in_data = True
            elif verb == "STARTTLS" and reply.code == 220:
                if context is None:
                    context = client_tls_context(insecure)
                await conn.starttls(context, host)
            elif verb == "QUIT":
                break
        return 0
    except SMTPClosed:
        return 0
    except TimeoutError:
        transcript.note(f"no answer within {timeout:g}s")
        return 1
    except (OSError, ssl.SSLError) as exc:
        transcript.note(f"error: {exc}")
        return 1
    finally:
        await conn.close()


# -- CLI ---------------------------------------------------------------------------------------------


def _check_source_ip(source_ip: str | None) -> None:
    """--source-ip must be an IP address: a name would be looked up, and its failure read as the
    server's ("Could not connect to SERVER: Name or service not known")."""
    if source_ip is None:
        return
    try:
        ipaddress.ip_address(source_ip)
    except ValueError:
        die(f"--source-ip {source_ip!r}: not an IP address", 2)


def _print_line(line: TranscriptLine) -> None:
    style = {"C": "cyan", "S": "green", "*": "dim"}[line.direction]
    console.print(Text(str(line), style=style))


def register(app: typer.Typer) -> None:
    test = typer.Typer(
        help="Test a relay from the outside: send a message, talk SMTP by hand, or check it is no open relay.",
        no_args_is_help=True,
    )
    app.add_typer(test, name="test")
    from relaygate.cli.relaytest import register_relay

    register_relay(test)

    @test.command("send")
    def send(
        server: str = typer.Option(
            ..., "--server", help="H[:P] of the relay (port 25, or 465 with --tls)."
        ),
        sender: str = typer.Option(..., "--from", help="Envelope and header sender."),
        to: list[str] = typer.Option(..., "--to", help="Recipient (repeatable)."),
        source_ip: str | None = typer.Option(
            None, "--source-ip", help="Local address to send from."
        ),
        subject: str | None = typer.Option(
            None, "--subject", help="Subject (default: a test subject)."
        ),
        body: str | None = typer.Option(None, "--body", help="Body text (default: a test text)."),
        starttls: bool = typer.Option(
            False, "--starttls", help="Upgrade with STARTTLS after EHLO."
        ),
        tls: bool = typer.Option(
            False, "--tls", help="Implicit TLS from the first byte (port 465 style)."
        ),
        insecure: bool = typer.Option(
            False, "--insecure", help="Do not verify the server's certificate."
        ),
        auth: str | None = typer.Option(None, "--auth", help="AUTH as this user (PLAIN or LOGIN)."),
        password_env: str | None = typer.Option(
            None,
            "--password-env",
            help="Environment variable holding the password (else prompted).",
        ),
        helo: str | None = typer.Option(
            None, "--helo", help="EHLO name (default: this host's FQDN)."
        ),
        timeout: float = typer.Option(
            30.0, "--timeout", min=0.1, help="Seconds to wait for each reply."
        ),
        json_out: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Send a test message and print the whole SMTP transcript and a verdict (Send-MailMessage).

        Exit 0: accepted for every recipient; 2: for some; 1: refused or failed."""
        if starttls and tls:
            die("use --starttls or --tls, not both", 2)
        _check_source_ip(source_ip)
        password: str | None = None
        if auth:
            if password_env:
                password = os.environ.get(password_env)
                if password is None:
                    die(f"--password-env {password_env}: the variable is not set", 2)
            elif sys.stdin.isatty():
                password = getpass.getpass(f"Password for {auth}: ")
            else:
                die(
                    "--auth needs the password: set --password-env VAR (stdin is not a terminal)", 2
                )
        opts = SendOptions(
            server=server,
            sender=sender,
            recipients=list(to),
            source_ip=source_ip,
            subject=subject,
            body=body,
            starttls=starttls,
            tls=tls,
            insecure=insecure,
            auth_user=auth,
            password=password,
            helo=helo,
            timeout=timeout,
        )
        transcript = Transcript(on_line=None if json_out else _print_line)
        result = asyncio.run(run_send(opts, transcript))
        if result.warnings and result.local and result.peer:
            note = _connector_note(config, result.local, result.peer)
            if note:
                result.warnings[0] += " " + note
        if json_out:
            emit_json(result.to_dict())
        else:
            for warning in result.warnings:
                console.print(Text("warning: " + warning, style="yellow"))
            style = {"accepted": "bold green", "partial": "bold yellow"}.get(
                result.outcome, "bold red"
            )
            console.print(Text(result.verdict, style=style))
        raise typer.Exit(result.exit_code)

    @test.command("smtp")
    def smtp(
        server: str = typer.Option(..., "--server", help="H[:P] of the relay."),
        source_ip: str | None = typer.Option(
            None, "--source-ip", help="Local address to connect from."
        ),
        starttls: bool = typer.Option(
            False, "--starttls", help="EHLO + STARTTLS first, then hand over."
        ),
        tls: bool = typer.Option(False, "--tls", help="Implicit TLS from the first byte."),
        insecure: bool = typer.Option(
            False, "--insecure", help="Do not verify the server's certificate."
        ),
        timeout: float = typer.Option(
            30.0, "--timeout", min=0.1, help="Seconds to wait for each reply."
        ),
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Talk SMTP by hand (the telnet test): lines from stdin are sent with CRLF, replies printed.

        Works with piped input; ends on QUIT or end of input. STARTTLS typed by hand upgrades the
        connection. --json: the whole transcript at the end (for piped input)."""
        if starttls and tls:
            die("use --starttls or --tls, not both", 2)
        _check_source_ip(source_ip)
        echo = not sys.stdin.isatty()
        try:
            split_server(server)
        except ValueError as exc:
            die(str(exc), 2)
        collected = Transcript()  # --json: every line, the client's too, printed at the end
        code = asyncio.run(
            run_interactive(
                server,
                source_ip=source_ip,
                starttls=starttls,
                tls=tls,
                insecure=insecure,
                timeout=timeout,
                echo=echo or json_out,
                out=(lambda line: collected.add(line.direction, line.text))
                if json_out
                else _print_line,
            )
        )
        if json_out:
            emit_json({"server": server, "transcript": collected.to_list(), "exit_code": code})
        raise typer.Exit(code)
