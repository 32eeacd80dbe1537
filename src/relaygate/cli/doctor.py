"""`relaygate doctor DOMAIN`: MX, SPF, DKIM and DMARC, worded with the errors admins actually see."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
from pathlib import Path
from typing import Any

import typer

from relaygate.cli.common import JSON_OPTION, emit_json, fail, json_requested, problems_json

__all__ = ["register"]

_STYLE = {"ok": "green", "info": "cyan", "warning": "yellow", "error": "bold red"}


def _resolver(servers: list[str], timeout: float) -> Any:
    import dns.asyncresolver
    import dns.nameserver

    from relaygate.delivery.dns import parse_dns_server

    if servers:
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [
            dns.nameserver.Do53Nameserver(ip, port)
            for ip, port in (parse_dns_server(s) for s in servers)
        ]
    else:
        resolver = _system_resolver()
    resolver.timeout = timeout
    resolver.lifetime = timeout
    return resolver


def _system_resolver() -> Any:
    """The system resolver; without a server in resolv.conf, an exit that says so (it was
    dnspython's NoResolverConfiguration traceback)."""
    import dns.asyncresolver
    import dns.resolver

    from relaygate.delivery import dns as delivery_dns

    path = delivery_dns.SYSTEM_RESOLV_CONF
    try:
        return dns.asyncresolver.Resolver(filename=path)
    except dns.resolver.NoResolverConfiguration as exc:
        reason = delivery_dns.no_system_server(path, exc)
        raise fail(f"{reason}: give --dns-server IP or set server.dns_servers", 2) from None


def _local_keys(
    cfg: Any,
    data_dir: Path | None,
    domain: str,
    selector: str | None,
    *,
    subdomains_only: bool = False,
) -> list[tuple[str, str | None]]:
    """(selector, public record or None) of each key the relay signs ``domain``'s mail with:
    every one signs (a rotation, RSA beside Ed25519), so the doctor checks each. ``selector``
    (--selector) narrows them to that one (checked even when the relay has no key for it).

    With a config, only its enabled [[dkim]] entries: the relay signs with nothing else, so a key
    file left in data_dir without an entry must not count as signing. Without one (--data-dir
    only), the keys found under data_dir/dkim/DOMAIN/. ``subdomains_only``: ``domain`` signs a
    subdomain's mail, which only its entries with ``subdomains = true`` do.
    """
    from relaygate.dkim.keys import key_path

    candidates: list[tuple[str, Path | None, str | None]] = []
    for key in getattr(cfg, "dkim", None) or ():
        if subdomains_only and not key.subdomains:
            continue
        if _same_domain(str(key.domain), domain) and key.enabled:
            path = Path(key.key_file) if key.key_file else None
            if path is None and data_dir is not None:
                path = key_path(data_dir, domain, str(key.selector))
            candidates.append((str(key.selector).lower(), path, key.algorithm))
    if cfg is None and data_dir is not None:
        folder = data_dir / "dkim" / domain
        if folder.is_dir():
            candidates.extend((p.stem.lower(), p, None) for p in sorted(folder.glob("*.key")))
    if selector is not None:
        candidates = [c for c in candidates if c[0] == selector.lower()][:1]
        if not candidates:
            return [(selector.lower(), None)]
    return [(sel, _public_record(path, algorithm)) for sel, path, algorithm in candidates]


def _public_record(path: Path | None, algorithm: str | None) -> str | None:
    """The TXT record value of the key at ``path`` (None, with a warning, if it cannot be read)."""
    from relaygate.dkim.keys import DkimKeyError, load_any_key, load_private_key

    if path is None:
        return None
    try:
        loaded = load_private_key(path, algorithm) if algorithm else load_any_key(path)
    except DkimKeyError as exc:
        sys.stderr.write(f"warning: {exc}\n")
        return None
    return loaded.record


def _same_domain(configured: str, domain: str) -> bool:
    """A [[dkim]] entry's domain as the signer normalises it (A-labels) against ``domain``."""
    from relaygate.doctor import ascii_domain

    try:
        return ascii_domain(configured) == domain
    except ValueError:
        return False


def _chosen_domain(cfg: Any, domain: str, envelope_domain: str | None) -> str:
    """The domain the relay picks a key by: the From domain, or the MAIL FROM domain when
    ``server.dkim_domain_source = "envelope_sender"``."""
    source = getattr(getattr(cfg, "server", None), "dkim_domain_source", "header_from")
    if source == "envelope_sender" and envelope_domain:
        return envelope_domain
    return domain


def _signing_domain(cfg: Any, chosen: str) -> str:
    """The d= domain of the relay's signatures for mail whose key is picked by ``chosen`` (the
    key that must be published is its): ``chosen`` itself, or the parent whose entry says
    ``subdomains = true`` (relaygate.dkim.domains, the signer's rule)."""
    from relaygate.dkim.domains import signing_domain_for
    from relaygate.doctor import ascii_domain

    configured: set[str] = set()
    parents: set[str] = set()
    for key in getattr(cfg, "dkim", None) or ():
        try:
            name = ascii_domain(str(key.domain))
        except ValueError:
            continue  # (refused by `relaygate check`)
        configured.add(name)
        if key.enabled and key.subdomains:
            parents.add(name)
    return signing_domain_for(chosen, configured, parents) or chosen


def _configured_sender(cfg: Any, envelope_domain: str) -> str | None:
    """The MAIL FROM the relay itself puts on mail from ``envelope_domain``: the ``send_as`` of
    the enabled send connectors in that domain, when they agree on one (else None: mail leaves
    with its writers' own addresses, which the doctor cannot know)."""
    from relaygate.doctor import envelope_address

    senders: set[str] = set()
    for connector in getattr(cfg, "send_connectors", None) or ():
        if not connector.enabled or not connector.send_as:
            continue
        try:
            sender = envelope_address(str(connector.send_as))
        except ValueError:
            continue  # (refused by `relaygate check`)
        if sender.rpartition("@")[2] == envelope_domain:
            senders.add(sender)
    return senders.pop() if len(senders) == 1 else None


def _helo_names(cfg: Any) -> dict[str, list[str]]:
    """Each name the relay says in EHLO (a send connector's fqdn, else server.fqdn, as the
    delivery client does), with the enabled SMTP send connectors that say it."""
    from relaygate.delivery.client import helo_name_for

    server_fqdn = str(getattr(getattr(cfg, "server", None), "fqdn", "") or "")
    names: dict[str, list[str]] = {}
    for connector in getattr(cfg, "send_connectors", None) or ():
        if connector.enabled and connector.delivery_method == "SMTP":
            names.setdefault(helo_name_for(connector, server_fqdn), []).append(connector.name)
    return names


def _helo_source_ips(cfg: Any) -> dict[str, str]:
    """The enabled SMTP send connectors that leave from their own public address
    (source_ip_address), by name: receivers see that address, so the HELO name's SPF is judged
    by it. A private address is behind NAT: receivers see --relay-ip, which judges it."""
    from relaygate.doctor import relay_address

    own: dict[str, str] = {}
    for connector in getattr(cfg, "send_connectors", None) or ():
        if not (connector.enabled and connector.delivery_method == "SMTP"):
            continue
        try:
            address = relay_address(connector.source_ip_address or "")
        except ValueError:
            continue  # unset (`check` refuses a malformed one)
        if not _behind_nat(ipaddress.ip_address(address)):
            own[connector.name] = address
    return own


#: Addresses receivers never see as a client: a connector leaving from one is translated (NAT)
#: to the relay's public address. Not `is_private`, which also holds the documentation ranges.
_NAT_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)


def _behind_nat(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return (
        address.is_loopback
        or address.is_link_local
        or any(address in network for network in _NAT_NETWORKS)
    )


def _print_report(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=False)
    table = Table(title=_escape(f"DNS doctor: {report.domain}"), show_lines=True, expand=True)
    table.add_column("Check", no_wrap=True)
    table.add_column("Severity", no_wrap=True)
    table.add_column("Finding", ratio=3)
    table.add_column("Fix", ratio=2)
    for f in report.findings:
        finding = _escape(f.summary) + (f"\n[dim]{_escape(f.detail)}[/dim]" if f.detail else "")
        table.add_row(
            _escape(f.check), f"[{_STYLE[f.severity]}]{f.severity}[/]", finding, _escape(f.fix)
        )
    console.print(table)
    fixes = [f for f in report.findings if f.fix and f.severity in ("error", "warning")]
    if fixes:  # unwrapped, so records can be copied into a zone or a DNS console
        plain = Console(highlight=False, soft_wrap=True)
        plain.print("\nFixes:", markup=False)
        for f in fixes:
            plain.print(f"  [{f.check}] {f.fix}", markup=False)
    counts = report.to_dict()["counts"]
    console.print(
        f"{counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info, "
        f"{counts['ok']} ok",
        markup=False,
    )


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


def register(app: typer.Typer) -> None:
    @app.command("doctor")
    def doctor(
        domain: str = typer.Argument(
            ..., help="The sending domain (the From domain of relayed mail)."
        ),
        relay_ip: str | None = typer.Option(
            None, "--relay-ip", help="The relay's public IP as receivers see it (SPF evaluation)."
        ),
        selector: str | None = typer.Option(
            None, "--selector", help="DKIM selector (default: every configured key for DOMAIN)."
        ),
        envelope_domain: str | None = typer.Option(
            None,
            "--envelope-domain",
            help="MAIL FROM domain of relayed mail if it differs from DOMAIN: receivers check "
            "its SPF (and, with dkim_domain_source = envelope_sender, the relay signs with it).",
        ),
        sender: str | None = typer.Option(
            None,
            "--sender",
            help="MAIL FROM address of relayed mail (SPF's %{l} and %{s} macros expand from it; "
            "default: a send connector's send_as in the envelope domain, else postmaster@).",
        ),
        dns_server: list[str] | None = typer.Option(
            None,
            "--dns-server",
            help="DNS server HOST[:PORT] to ask (repeatable; default: server.dns_servers, then the system's).",
        ),
        timeout: float = typer.Option(5.0, "--timeout", help="Seconds per DNS query."),
        config: Path | None = typer.Option(
            None,
            "--config",
            "-c",
            help="Config file (default: $RELAYGATE_CONFIG, then ./relaygate.toml).",
        ),
        data_dir: Path | None = typer.Option(
            None, "--data-dir", help="Data directory with dkim/ keys (default: server.data_dir)."
        ),
        json_out: bool = JSON_OPTION,
    ) -> None:
        """MX, SPF (does it authorise the relay's IP; and the send connectors' HELO names), DKIM
        and DMARC for DOMAIN; exit 1 on errors."""
        from relaygate.doctor import ascii_domain, diagnose, envelope_address, relay_address

        try:
            domain_n = ascii_domain(domain)
            envelope_domain = ascii_domain(envelope_domain) if envelope_domain else None
            sender = envelope_address(sender) if sender is not None else None
        except ValueError as exc:
            raise fail(str(exc), 2) from None
        if sender is not None:
            sender_domain = sender.rpartition("@")[2]
            if envelope_domain not in (None, sender_domain):
                raise fail(
                    f"--sender {sender} is not in --envelope-domain {envelope_domain}", 2
                ) from None
            envelope_domain = sender_domain
        if relay_ip is not None:
            try:
                relay_ip = relay_address(relay_ip)
            except ValueError:
                raise fail(f"--relay-ip {relay_ip!r} is not an IP address", 2) from None
        cfg = None
        if config is not None or data_dir is None:
            from relaygate.config import ConfigError, load_config

            try:
                cfg = load_config(config)
            except ConfigError as exc:
                if config is not None:
                    if json_requested():
                        emit_json(
                            {
                                "ok": False,
                                "source": str(config),
                                "errors": problems_json(exc.problems),
                            }
                        )
                    else:
                        for problem in exc.problems:
                            sys.stderr.write(f"{problem}\n")
                    raise typer.Exit(2) from None
                sys.stderr.write("warning: the config file has errors; ignoring it\n")
        if cfg is not None:
            from relaygate.config.relative_paths import as_the_relay_reads

            # relative key_file paths as the running relay reads them (its working directory)
            cfg, _ = as_the_relay_reads(cfg)
        if data_dir is None and cfg is not None:
            data_dir = Path(cfg.server.data_dir)
        servers = list(dns_server or ()) or list(
            getattr(getattr(cfg, "server", None), "dns_servers", ()) or ()
        )
        try:
            resolver = _resolver(servers, timeout)
        except (ValueError, OSError) as exc:
            raise fail(f"bad --dns-server: {exc}", 2) from None
        if sender is None:
            sender = _configured_sender(cfg, envelope_domain or domain_n)
        chosen = _chosen_domain(cfg, domain_n, envelope_domain)
        signing_domain = _signing_domain(cfg, chosen)
        keys = _local_keys(
            cfg, data_dir, signing_domain, selector, subdomains_only=signing_domain != chosen
        )
        report = asyncio.run(
            diagnose(
                domain_n,
                resolver=resolver,
                relay_ip=relay_ip,
                dkim_keys=keys,
                envelope_domain=envelope_domain,
                signing_domain=signing_domain,
                envelope_sender=sender,
                helo_names=_helo_names(cfg),
                helo_source_ips=_helo_source_ips(cfg),
            )
        )
        if json_out:
            sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
        else:
            _print_report(report)
        if report.has_errors:
            raise typer.Exit(1)
