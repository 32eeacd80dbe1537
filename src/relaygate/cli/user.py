"""`relaygate user add/remove/send-as/list`: SMTP AUTH users (argon2 hashes in the configured users
file) and the addresses each may send as.

The file is `server.users_file`, or `<data_dir>/users.json`. The running server notices changes on the
next AUTH (and an authenticated session at its next MAIL); no restart or reload is needed.
"""

from __future__ import annotations

import getpass
import sys
from collections.abc import Sequence
from pathlib import Path

import typer

from relaygate.address_patterns import RULE_FORMS, AddressRule
from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, console, die, emit_json, load_or_exit
from relaygate.config.relative_paths import as_the_relay_reads
from relaygate.policy.address_rules import parse_send_as
from relaygate.smtp.auth import UserStore, users_path

__all__ = ["register"]

_SEND_AS_HELP = (
    f"An address the user may send as (MAIL FROM and From header): {RULE_FORMS}. Repeatable."
)


def _store(config: Path | None) -> UserStore:
    # a relative users_file as the running relay reads it (from its working directory)
    cfg, _ = as_the_relay_reads(load_or_exit(config))
    path = users_path(Path(cfg.server.data_dir), cfg.server.users_file)
    try:
        return UserStore(path)
    except (OSError, ValueError) as exc:
        die(f"cannot read the users file {path}: {exc}")


def _send_as_rules(patterns: Sequence[str]) -> tuple[AddressRule, ...]:
    """The patterns as a send-as list, or exit naming the first bad one."""
    try:
        return parse_send_as(patterns)
    except ValueError as exc:
        die(str(exc))


def _read_password(password_stdin: bool) -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            die("no terminal to prompt for the password: use --password-stdin")
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            die("the passwords do not match")
    if not password:
        die("the password must not be empty")
    return password


def _send_as_json(store: UserStore, name: str) -> list[str] | None:
    """The user's send-as list for --json (None: no list, any sender the connector allows)."""
    listed = store.send_as(name)
    return None if listed is None else list(listed.texts)


def _describe(store: UserStore, name: str) -> str:
    listed = store.send_as(name)
    if listed is None:
        return "any sender the connector allows (no send-as list)"
    return ", ".join(listed.texts)


def register(app: typer.Typer) -> None:
    user_app = typer.Typer(help="SMTP AUTH users (BasicAuth connectors).", no_args_is_help=True)
    app.add_typer(user_app, name="user")

    @user_app.command("add")
    def add(
        name: str = typer.Argument(
            ..., help="User name (as sent in AUTH PLAIN/LOGIN; case-insensitive)."
        ),
        password_stdin: bool = typer.Option(
            False, "--password-stdin", help="Read the password from stdin."
        ),
        send_as: list[str] = typer.Option([], "--send-as", help=_SEND_AS_HELP),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Add a user, or set the password of an existing one (and, with --send-as, its send-as
        list; without it an existing user keeps its list)."""
        if not name or any(ord(ch) < 33 or ord(ch) == 127 for ch in name):
            die(f"invalid user name {name!r}: no spaces or control characters")
        rules = _send_as_rules(send_as) if send_as else None  # before the password prompt
        store = _store(config)
        existed = name.lower() in store.names()
        store.set_password(name, _read_password(password_stdin), rules)
        if json_out:
            emit_json(
                {
                    "user": name.lower(),
                    "users_file": str(store.path),
                    "added": not existed,
                    "send_as": _send_as_json(store, name),
                }
            )
            return
        console.print(
            f"{'Updated' if existed else 'Added'} user {name.lower()} in {store.path}", markup=False
        )
        if rules:
            console.print(f"  send as: {_describe(store, name)}", markup=False)

    @user_app.command("send-as")
    def set_send_as(
        name: str = typer.Argument(..., help="User name."),
        patterns: list[str] = typer.Argument(
            None, help=f"The addresses the user may send as (replace its list): {RULE_FORMS}."
        ),
        clear: bool = typer.Option(
            False, "--clear", help="Remove the list: any sender the connector allows."
        ),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Set the addresses a user may send as (MAIL FROM and From header), keeping its password."""
        patterns = patterns or []
        if clear == bool(patterns):
            die("give the user's send-as patterns, or --clear to remove its list")
        rules = _send_as_rules(patterns)
        store = _store(config)
        if not store.set_send_as(name, rules):
            die(f"no user {name!r} in {store.path}")
        if json_out:
            emit_json(
                {
                    "user": name.lower(),
                    "users_file": str(store.path),
                    "send_as": _send_as_json(store, name),
                }
            )
            return
        console.print(
            f"User {name.lower()} in {store.path} may send as: {_describe(store, name)}",
            markup=False,
        )

    @user_app.command("remove")
    def remove(
        name: str = typer.Argument(...),
        config: Path | None = CONFIG_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Remove a user."""
        store = _store(config)
        if not store.remove(name):
            die(f"no user {name!r} in {store.path}")
        if json_out:
            emit_json({"user": name.lower(), "users_file": str(store.path), "removed": True})
            return
        console.print(f"Removed user {name.lower()} from {store.path}", markup=False)

    @user_app.command("list")
    def list_users(config: Path | None = CONFIG_OPTION, as_json: bool = JSON_OPTION) -> None:
        """List the users and the addresses each may send as (hashes are never printed)."""
        store = _store(config)
        names = store.names()
        if as_json:
            lists = {n: (lst.texts if (lst := store.send_as(n)) else None) for n in names}
            emit_json({"users_file": str(store.path), "users": names, "send_as": lists})
            return
        if not names:
            console.print(f"No users in {store.path}", markup=False)
            return
        for n in names:
            console.print(f"{n}  send as: {_describe(store, n)}", markup=False)
