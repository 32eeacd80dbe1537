"""`relaygate explain`: which connector takes a client, its rights, and the reply per recipient."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import typer
from rich.markup import escape

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, console, die, emit_json, load_or_exit
from relaygate.config.model import Config
from relaygate.config.relative_paths import as_the_relay_reads
from relaygate.config.values import parse_binding
from relaygate.policy.address_rules import SendAsList
from relaygate.policy.explain import endpoints_for, explain
from relaygate.smtp.auth import UserStore, users_path


def _user_in_file(config: Config, user: str | None) -> tuple[SendAsList | None, str | None]:
    """`user`'s send-as list in the users file the server reads (None: no user, or no list), and
    the file's path when it does not hold `user` (the server's AUTH then fails)."""
    if user is None:
        return None, None
    # a relative users_file as the running relay reads it (from its working directory)
    config, _ = as_the_relay_reads(config)
    path = users_path(Path(config.server.data_dir), config.server.users_file)
    try:
        store = UserStore(path)
    except (OSError, ValueError) as exc:
        die(f"cannot read the users file {path}: {exc}")
    return store.send_as(user), (None if user.lower() in store else str(path))


def register(app: typer.Typer) -> None:
    @app.command(name="explain")
    def explain_cmd(
        client_ip: str = typer.Option(..., "--client-ip", help="The client's address."),
        local: str | None = typer.Option(
            None, "--local", help="Local endpoint IP:PORT the client connects to."
        ),
        sender: str | None = typer.Option(
            None, "--from", help="Envelope sender (use '<>' for the null sender)."
        ),
        to: list[str] = typer.Option([], "--to", help="Recipient (repeatable)."),
        auth_user: str | None = typer.Option(
            None, "--auth-user", help="Explain as a session authenticated as USER."
        ),
        header_from: str | None = typer.Option(
            None,
            "--header-from",
            help="The message's From header value, checked at end of DATA against allowed_senders.",
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Show the connector chosen for a client and why, its rights, and the reply for each recipient."""
        cfg = load_or_exit(config)
        try:
            ipaddress.ip_address(client_ip.partition("%")[0])
        except ValueError:
            die(f"--client-ip: {client_ip!r} is not an IP address")
        if local:
            try:
                b = parse_binding(local)
            except ValueError as exc:
                die(f"--local: {exc}")
            endpoints = [(b.address, b.port)]
        else:
            endpoints = endpoints_for(cfg, client_ip)
            if not endpoints:
                die("the configuration has no receive connector bindings")
        send_as, unknown_in = _user_in_file(cfg, auth_user)
        results = [
            explain(
                cfg,
                client_ip=client_ip,
                local=ep,
                sender=sender,
                recipients=list(to),
                authenticated_user=auth_user,
                header_from=header_from,
                send_as=send_as,
                unknown_in=unknown_in,
            )
            for ep in endpoints
        ]
        if json_out:
            data = [r.to_dict() for r in results]
            emit_json(data[0] if local else {"endpoints": data})
            return
        for r in results:
            d = r.to_dict()
            heading = f"Client {client_ip} → {d['local']}"
            console.print(f"[bold]{escape(heading)}[/]")
            if d["connector"] is None:
                console.print(
                    "  Connector: [red]none[/] — the connection is closed without a banner."
                )
                for c in d["not_candidates"]:
                    console.print(f"    {c['connector']}: {c['why']}", markup=False)
                console.print()
                continue
            console.print(f"  Connector: [bold]{escape(d['connector'])}[/]")
            console.print(f"    why: {d['reason']}", markup=False)
            for c in d["beaten"]:
                console.print(f"    beat {c['connector']}: {c['why']}", markup=False)
            for c in d["not_candidates"]:
                console.print(f"    not a candidate: {c['connector']}: {c['why']}", markup=False)
            if d["tls"]:
                t = d["tls"]
                console.print(
                    f"  TLS required: MAIL before STARTTLS → {t['reply_before_starttls']}",
                    markup=False,
                )
                console.print(f"    because {t['reason']}", markup=False)
            if d["auth"]:
                a = d["auth"]
                console.print(f"  AUTH as {a['user']} → {a['reply']}", markup=False)
                console.print(f"    because {a['reason']}", markup=False)
            if d["send_as"]:
                console.print(
                    f"  send-as list of user {d['auth']['user'].lower()}: {', '.join(d['send_as'])}",
                    markup=False,
                )
            console.print(f"  Runs as: {', '.join(d['principals'])}", markup=False)
            console.print("  Rights:")
            if not d["rights"]:
                console.print("    (none)")
            for right in d["rights"]:
                console.print(f"    {right['right']}  ← {right['granted_by']}", markup=False)
            for key in ("allowed_senders", "allowed_recipients"):
                if d[key]:
                    console.print(f"  {key}: {', '.join(d[key])}", markup=False)
            if d["mail"]:
                m = d["mail"]
                console.print(f"  MAIL FROM:<{m['address'] or ''}> → {m['reply']}", markup=False)
                console.print(f"    because {m['reason']}", markup=False)
            for rc in d["recipients"]:
                console.print(f"  RCPT TO:<{rc['address']}> → {rc['reply']}", markup=False)
                console.print(f"    because {rc['reason']}", markup=False)
                if "tarpit" in rc:
                    console.print(f"    (reply delayed by the {rc['tarpit']} tarpit)", markup=False)
                if "route" in rc:
                    route = rc["route"]
                    text = (
                        f"{route.get('connector') or '(none)'} → {route.get('next_hop')}: {route.get('reason')}"
                        if isinstance(route, dict) and "next_hop" in route
                        else str(route)
                    )
                    console.print(f"    route: {text}", markup=False)
                    limits = route.get("pacing") if isinstance(route, dict) else None
                    if limits and limits != "unlimited":
                        console.print(f"    paced: {limits}", markup=False)
                    auth = route.get("auth") if isinstance(route, dict) else None
                    if auth:
                        console.print(f"    auth: {auth}", markup=False)
                    send_as = route.get("send_as") if isinstance(route, dict) else None
                    if send_as:
                        console.print(f"    sent as: {send_as} (send_as)", markup=False)
            if d["header_from"]:
                h = d["header_from"]
                outcome = h["reply"] or "passes (the message is queued)"
                console.print(f"  From: {h['value']} → {outcome}", markup=False)
                console.print(f"    because {h['reason']}", markup=False)
            console.print()
