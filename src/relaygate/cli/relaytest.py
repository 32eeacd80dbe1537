"""`relaygate test relay`: the open-relay self-test (relaygate.selftest) with its options and output."""

from __future__ import annotations

import asyncio
import ipaddress
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, console, die, emit_json
from relaygate.cli.tables import is_narrow
from relaygate.config.values import IPRange
from relaygate.selftest import (
    DEFAULT_EXTERNAL_DOMAIN,
    DEFAULT_EXTERNAL_IP,
    Attempt,
    RelayTestOptions,
    SourceResult,
    default_helo,
    default_sender,
    exit_code,
    is_reserved_domain,
    run_relay_test,
)
from relaygate.smtp_transcript import is_loopback, is_own_address, split_server

__all__ = ["register_relay", "tested_from_notes"]

_VERDICT_STYLE = {
    "refused": "green",
    "accepted": "bold red",
    "deferred": "yellow",
    "error": "yellow",
    "skipped": "dim",
}


def _domain(value: str, option: str) -> str:
    from relaygate import replies
    from relaygate.addresses import AddressError, parse_domain

    try:
        return parse_domain(value, allow_literal=False, error=replies.INVALID_RECIPIENT)
    except AddressError as exc:
        die(f"{option} {value!r}: not a domain name ({exc.reason})", 2)


def _config_domains(
    config: Path | None,
) -> tuple[list[tuple[str, str]], tuple[IPRange, ...], str]:
    """The accepted domains (domain, type) and server.trusted_proxies of the config file, and
    its path (a note when it is unreadable)."""
    import tomllib

    from relaygate.config import ConfigError, default_config_path
    from relaygate.config.loader import parse_config

    path = default_config_path(config)
    if path is None:
        return [], (), "no config file (--config, $RELAYGATE_CONFIG or ./relaygate.toml)"
    try:
        doc = tomllib.loads(path.read_bytes().decode("utf-8-sig"))
        server = doc.get("server", {})
        if isinstance(server, dict) and "fqdn" not in server:
            # server.fqdn's default is socket.getfqdn(), a DNS lookup without a timeout: a broken
            # resolver would hang the tool here. Only the accepted domains are wanted.
            doc["server"] = {**server, "fqdn": "relay.localdomain"}
        cfg = parse_config(doc, str(path), base_dir=path.parent)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return [], (), f"{path} could not be read ({exc}; `relaygate check`)"
    except ConfigError as exc:
        return (
            [],
            (),
            f"{path} could not be read ({len(exc.problems)} problem(s); `relaygate check`)",
        )
    domains = [(d.domain, d.domain_type) for d in cfg.accepted_domains]
    return domains, cfg.server.trusted_proxies, str(path)


def tested_from_notes(results: list[SourceResult]) -> list[str]:
    """Sources the relay matches to its own connector (loopback, or its own address, as `test
    send` warns): the result holds for that connector, not the devices'."""
    looped = [r.local for r in results if r.local and is_loopback(r.local)]
    own = [r.local for r in results if r.local and r.peer and is_own_address(r.local, r.peer)]
    where = [
        *([f"loopback ({', '.join(looped)})"] if looped else []),
        *([f"the relay's own address ({', '.join(own)})"] if own else []),
    ]
    return [
        f"tested from {w}: the result holds for the connector that takes that address; test "
        "devices' addresses with --source-ip or from their network"
        for w in where
    ]


def _print_source(result: SourceResult, opts: RelayTestOptions) -> None:
    title = f"From {result.label} to {opts.server}" + (
        f" ({result.server_name})" if result.server_name else ""
    )
    console.print(Text(title, style="bold"))
    if result.error:  # printed on stderr at the end
        return
    if result.control is not None:
        c = result.control
        style = "green" if c.verdict == "accepted" else "yellow"
        line = f"control: {c.command} -> {c.reply or c.note} ({c.verdict})"
        if c.verdict != "accepted":
            line += (
                ": the relay does not accept this local recipient, so the refusals below may "
                "not be relay decisions"
            )
        console.print(Text(line, style=style))
    usual_mail = f"MAIL FROM:<{opts.sender or default_sender(opts.external_domain)}>"
    rows: list[tuple[str, str, str, str, Text]] = []
    for index, a in enumerate(result.attempts, 1):
        reply = a.reply or a.note
        if a.reply and a.note:
            reply += f" ({a.note})"
        verdict = Text(a.verdict, style=_VERDICT_STYLE.get(a.verdict, ""))
        rows.append((str(index), a.vector, _command_cell(a, usual_mail, opts.helo), reply, verdict))
    if is_narrow():  # one short record per attempt: the command and reply must stay whole
        for number, vector, command, reply, verdict in rows:
            console.print(Text.assemble(f"{number:>2} {vector} ", verdict))
            for line in (*command.split("\n"), reply):
                console.print(Text("   " + line), overflow="fold")
        _print_footer(result)
        return
    table = Table(header_style="bold")
    for name in ("#", "Vector", "Command", "Reply", "Verdict"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    _print_footer(result)


def _print_footer(result: SourceResult) -> None:
    for note in result.notes:
        console.print(Text("note: " + note, style="yellow"))
    temporary = [a for a in result.attempts if a.temporary]
    if temporary and not result.accepted:
        console.print(
            Text(
                f"note: {len(temporary)} attempt(s) were deferred (4xx): not decided, the relay "
                "may answer otherwise later; run the test again to be sure",
                style="yellow",
            )
        )
    style = (
        "bold red"
        if result.accepted
        else (
            "bold yellow"
            if result.errors or result.deferred or result.needs_starttls or result.senders_refused
            else "bold green"
        )
    )
    console.print(Text(result.summary(), style=style))


def _command_cell(attempt: Attempt, usual_mail: str, usual_helo: str) -> str:
    """The deciding command, with the EHLO and MAIL lines when they are not the usual ones."""
    lines = []
    if attempt.helo and attempt.helo != usual_helo:
        lines.append(f"EHLO {attempt.helo}")
    if (
        attempt.commands
        and attempt.commands[0] != usual_mail
        and attempt.command != attempt.commands[0]
    ):
        lines.append(attempt.commands[0])
    lines.extend(attempt.commands[1:-1])  # RCPTs before the deciding one (mixed-transaction)
    lines.append(attempt.command)
    return "\n".join(lines)


def register_relay(test: typer.Typer) -> None:
    @test.command("relay")
    def relay(
        server: str = typer.Option(
            ..., "--server", help="H[:P] of the relay (port 25, or 465 with --tls)."
        ),
        source_ip: list[str] = typer.Option(
            [],
            "--source-ip",
            help="Local address to test from (repeatable; default: the OS picks).",
        ),
        external_domain: str = typer.Option(
            DEFAULT_EXTERNAL_DOMAIN,
            "--external-domain",
            help="The domain the attempts try to relay to (never contacted: DATA is never sent).",
        ),
        external_ip: str = typer.Option(
            DEFAULT_EXTERNAL_IP,
            "--external-ip",
            help="The address of the external-literal attempt (never contacted).",
        ),
        local_domain: str | None = typer.Option(
            None,
            "--local-domain",
            help="An accepted domain (default: the first Authoritative one of --config).",
        ),
        sender: str | None = typer.Option(
            None, "--from", help="Envelope sender (default: relaytest@<external domain>)."
        ),
        tls: bool = typer.Option(
            False, "--tls", help="Implicit TLS from the first byte (port 465 style)."
        ),
        starttls: bool = typer.Option(False, "--starttls", help="STARTTLS after EHLO."),
        insecure: bool = typer.Option(
            False, "--insecure", help="Do not verify the server's certificate."
        ),
        timeout: float = typer.Option(
            10.0, "--timeout", min=0.1, help="Seconds to wait to connect and for each reply."
        ),
        max_time: float = typer.Option(
            300.0,
            "--max-time",
            min=1.0,
            help="Seconds at most per source address for the whole battery (a tarpit delays each "
            "refusal); attempts not made by then are errors.",
        ),
        json_out: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Prove the relay is not an open relay from a client address: 43 relay attempts (plain,
        Nmap smtp-open-relay's 16, percent hack, bang paths, source routes, quoted local parts,
        literals, HELO spoofing, case, trailing dot, SMTPUTF8, syntax variants, an external
        recipient after a local one), each MAIL FROM + RCPT TO then RSET, and never DATA: nothing
        is ever relayed.

        Bounded: each connect and reply waits at most --timeout seconds and each source address
        takes at most --max-time seconds however slowly the server answers (tarpit_interval).

        Exit 0: every attempt refused; 1: some attempt accepted (an open relay); 2: usage error,
        the server could not be reached, some attempt was deferred (4xx) or could not be
        completed, or MAIL needs STARTTLS and --starttls was not given, or every MAIL FROM was
        refused for its sender (not 530: give --from an address the clients send as)."""
        if tls and starttls:
            die("use --tls or --starttls, not both", 2)
        try:
            split_server(server, 465 if tls else 25)
        except ValueError as exc:
            die(f"--server {exc}", 2)
        for ip in source_ip:
            try:
                ipaddress.ip_address(ip)
            except ValueError:
                die(f"--source-ip {ip!r}: not an IP address", 2)
        try:
            ipaddress.ip_address(external_ip)
        except ValueError:
            die(f"--external-ip {external_ip!r}: not an IP address", 2)
        if sender is not None and (
            not sender or any(c in sender for c in " <>\r\n\t") or "@" not in sender
        ):
            die(f"--from {sender!r}: give a plain address, user@domain", 2)
        external = _domain(external_domain, "--external-domain")
        local = _domain(local_domain, "--local-domain") if local_domain else None
        domains, trusted_proxies, source = _config_domains(config)
        notes: list[str] = []
        if local is None:
            local = next((d for d, kind in domains if kind == "Authoritative"), None)
            if local is None:
                notes.append(
                    "no local domain: the control attempt and the vectors routed through the local "
                    f"domain are skipped (give --local-domain; {source}: no Authoritative domain)"
                    if domains
                    else "no local domain: the control attempt and the vectors routed through the "
                    f"local domain are skipped (give --local-domain; {source})"
                )
        from relaygate.config.model import AcceptedDomain

        for domain, kind in domains:
            if AcceptedDomain(domain, kind).matches(external):
                die(
                    f"--external-domain {external} is accepted domain {domain} ({kind}) in "
                    f"{source}: mail to it is not relaying; choose a domain outside the accepted domains",
                    2,
                )
        if external == local:
            die(f"--external-domain {external} is the local domain: choose a domain outside it", 2)
        if is_reserved_domain(external):
            notes.append(
                f"{external} is a reserved name (RFC 2606): relays with "
                "reject_reserved_*_recipient_domains (Exchange RejectReserved*) refuse it whatever "
                "the client may do, so a refusal proves less; prefer a real domain"
            )
        opts = RelayTestOptions(
            server=server,
            source_ips=list(source_ip) or [None],
            external_domain=external,
            external_ip=external_ip,
            local_domain=local,
            sender=sender,
            helo=default_helo(),
            tls=tls,
            starttls=starttls,
            insecure=insecure,
            timeout=timeout,
            max_time=max_time,
            trusted_proxies=trusted_proxies,
            config_source=source,
        )

        def shown(result: SourceResult) -> None:
            if not json_out:
                _print_source(result, opts)

        if not json_out:
            for note in notes:
                console.print(Text("note: " + note, style="yellow"))
        results = asyncio.run(run_relay_test(opts, on_source=shown))
        code = exit_code(results)
        if json_out:
            emit_json(
                {
                    "server": server,
                    "external_domain": external,
                    "local_domain": local,
                    "notes": notes,
                    "open_relay": code == 1,
                    "sources": [r.to_dict() for r in results],
                    "exit_code": code,
                }
            )
        else:
            for note in tested_from_notes(results):
                console.print(Text("note: " + note, style="dim"))
            if len(results) > 1:
                console.print(
                    Text(
                        "open relay from " + ", ".join(r.label for r in results if r.accepted)
                        if code == 1
                        else "no relay accepted"
                        if code == 0
                        else "no relay accepted, but the test is incomplete (see above)",
                        style={0: "bold green", 1: "bold red"}.get(code, "bold yellow"),
                    )
                )
        if code == 2 and any(r.error for r in results):
            from relaygate.cli.common import err_console

            for r in results:
                if r.error:
                    err_console.print(f"error: {r.error}", markup=False)
        raise typer.Exit(code)
