"""`relaygate dkim new/show`: DKIM key pairs per domain and selector, and the DNS record to publish."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from relaygate.cli.common import JSON_OPTION, fail
from relaygate.config.relative_paths import as_the_relay_reads
from relaygate.dkim.keys import (
    ALGORITHMS,
    DkimKeyError,
    key_path,
    load_any_key,
    load_private_key,
    record_name,
    split_txt,
    write_key,
)

__all__ = ["register"]

_CONFIG = typer.Option(
    None, "--config", "-c", help="Config file (default: $RELAYGATE_CONFIG, then ./relaygate.toml)."
)
_DATA_DIR = typer.Option(
    None,
    "--data-dir",
    help="Data directory holding dkim/ (default: server.data_dir of the config).",
)
_JSON = JSON_OPTION  # with --json, errors are JSON too (common.fail)
_fail = fail


def _load_config(config: Path | None) -> Any:
    from relaygate.cli.common import load_or_exit  # lazily: keeps `--data-dir` usable on its own

    return load_or_exit(config)


def _data_dir(config: Path | None, data_dir: Path | None) -> tuple[Path, Any]:
    """The data directory and the loaded config (None when --data-dir alone was given)."""
    if data_dir is not None and config is None:
        return data_dir, None
    # relative key_file paths as the running relay reads them (from its working directory)
    cfg, _ = as_the_relay_reads(_load_config(config))
    return (data_dir or Path(cfg.server.data_dir)), cfg


def _record_info(name: str, value: str) -> dict[str, Any]:
    strings = split_txt(value)
    if len(strings) == 1:
        zone = f'{name}. 3600 IN TXT "{value}"'
    else:
        body = "\n    ".join(f'"{s}"' for s in strings)
        zone = f"{name}. 3600 IN TXT (\n    {body} )"
    return {"name": name, "type": "TXT", "value": value, "strings": strings, "zone": zone}


def _print_record(rec: dict[str, Any]) -> None:
    typer.echo(f"  Name:  {rec['name']}")
    typer.echo(f"  Type:  {rec['type']}")
    typer.echo(f"  Value: {rec['value']}")
    typer.echo("  Zone file (BIND) form:")
    for line in rec["zone"].splitlines():
        typer.echo(f"    {line}")


def register(app: typer.Typer) -> None:
    dkim_app = typer.Typer(
        name="dkim",
        help="DKIM signing keys: create a key pair per domain and selector, show the DNS records.",
        no_args_is_help=True,
    )

    @dkim_app.command("new")
    def new(
        domain: str = typer.Option(
            ..., "--domain", help="Domain the key signs for (the From domain)."
        ),
        selector: str = typer.Option(..., "--selector", help="Selector, e.g. s2026 or relay1."),
        algorithm: str = typer.Option(
            "rsa-sha256", "--algorithm", help=f"One of: {', '.join(ALGORITHMS)}."
        ),
        force: bool = typer.Option(False, "--force", help="Replace an existing key."),
        config: Path | None = _CONFIG,
        data_dir: Path | None = _DATA_DIR,
        json_out: bool = _JSON,
    ) -> None:
        """Create a key under <data_dir>/dkim/<domain>/<selector>.key and print its TXT record."""
        base, _ = _data_dir(config, data_dir)
        try:
            # Absolute: the relay reads a relative key_file from its own working directory, not
            # from this command's (nor from the config file's folder, as data_dir is).
            path = Path(os.path.abspath(write_key(base, domain, selector, algorithm, force=force)))
            loaded = load_private_key(path, algorithm.strip().lower())
            name = record_name(selector, domain)
        except DkimKeyError as exc:
            raise _fail(str(exc)) from None
        domain_n, selector_n = domain.strip().lower().rstrip("."), selector.strip().lower()
        rec = _record_info(name, loaded.record)
        snippet = (
            "[[dkim]]\n"
            f'domain = "{domain_n}"\n'
            f'selector = "{selector_n}"\n'
            f"key_file = {json.dumps(str(path))}\n"
            f'algorithm = "{loaded.algorithm}"\n'
        )
        warnings = []
        if loaded.algorithm == "ed25519-sha256":
            warnings.append(
                "Gmail, Microsoft 365 and Yahoo do not verify Ed25519 signatures: keep an "
                f"rsa-sha256 key for {domain_n} beside this one (both sign)."
            )
        if json_out:
            data = {
                "domain": domain_n,
                "selector": selector_n,
                "algorithm": loaded.algorithm,
                "key_file": str(path),
                "record": rec,
                "config": snippet,
                "warnings": warnings,
            }
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
            return
        typer.echo(f"Key written to {path} (mode 0600).")
        typer.echo("Publish this DNS record before enabling signing:")
        _print_record(rec)
        typer.echo("Then add to the config file:")
        for line in snippet.splitlines():
            typer.echo(f"  {line}")
        typer.echo(f"Check it with: relaygate doctor {domain_n} --selector {selector_n}")
        for warning in warnings:
            typer.echo(f"Note: {warning}")

    @dkim_app.command("show")
    def show(
        config: Path | None = _CONFIG,
        data_dir: Path | None = _DATA_DIR,
        json_out: bool = _JSON,
    ) -> None:
        """List configured keys and keys found under <data_dir>/dkim, with their DNS records."""
        base, cfg = _data_dir(config, data_dir)
        entries: dict[tuple[str, str], dict[str, Any]] = {}
        for key in getattr(cfg, "dkim", None) or ():
            domain_n = str(key.domain).lower().rstrip(".")
            selector_n = str(key.selector).lower()
            path = Path(key.key_file) if key.key_file else key_path(base, domain_n, selector_n)
            entries[(domain_n, selector_n)] = {
                "domain": domain_n,
                "selector": selector_n,
                "algorithm": key.algorithm,
                "key_file": str(path),
                "configured": True,
                "enabled": bool(key.enabled),
                "subdomains": bool(key.subdomains),
            }
        root = base / "dkim"
        if root.is_dir():
            for path in sorted(root.glob("*/*.key")):
                ident = (path.parent.name.lower(), path.stem.lower())
                if ident in entries:
                    continue
                entries[ident] = {
                    "domain": ident[0],
                    "selector": ident[1],
                    "algorithm": None,
                    "key_file": str(path),
                    "configured": False,
                    "enabled": False,
                    "subdomains": False,
                }
        for entry in entries.values():
            path = Path(entry["key_file"])
            try:
                loaded = (
                    load_private_key(path, entry["algorithm"])
                    if entry["algorithm"]
                    else load_any_key(path)
                )
                entry["algorithm"] = loaded.algorithm
                entry["record"] = _record_info(
                    record_name(entry["selector"], entry["domain"]), loaded.record
                )
                entry["error"] = None
            except DkimKeyError as exc:
                entry["record"] = None
                entry["error"] = str(exc)
        items = sorted(entries.values(), key=lambda e: (e["domain"], e["selector"]))
        if json_out:
            sys.stdout.write(json.dumps({"data_dir": str(base), "keys": items}, indent=2) + "\n")
            return
        if not items:
            typer.echo(f"No DKIM keys configured or found under {root}.")
            typer.echo("Create one: relaygate dkim new --domain DOMAIN --selector SELECTOR")
            return
        for entry in items:
            state = (
                ("enabled" if entry["enabled"] else "disabled")
                if entry["configured"]
                else "not in the config"
            )
            if entry["subdomains"]:
                state += f", signs its subdomains too (d={entry['domain']})"

            typer.echo(
                f"{entry['domain']}  selector {entry['selector']}  {entry['algorithm'] or '?'}  "
                f"({state})  {entry['key_file']}"
            )
            if entry["error"]:
                typer.echo(f"  error: {entry['error']}")
            else:
                _print_record(entry["record"])
            typer.echo("")

    app.add_typer(dkim_app, name="dkim")
