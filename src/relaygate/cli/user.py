"""`relaygate user add/remove/list`: SMTP AUTH users (argon2 hashes in the configured users file).

The file is `server.users_file`, or `<data_dir>/users.json`. The running server notices changes on the
next AUTH; no restart or reload is needed.
"""

from __future__ import annotations

import getpass
import sys
from pathlib import Path

import typer

from relaygate.cli.common import CONFIG_OPTION, JSON_OPTION, console, die, emit_json, load_or_exit
from relaygate.smtp.auth import UserStore, users_path

__all__ = ["register"]


def _store(config: Path | None) -> UserStore:
    cfg = load_or_exit(config)
    return UserStore(users_path(Path(cfg.server.data_dir), cfg.server.users_file))


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
        config: Path | None = CONFIG_OPTION,
    ) -> None:
        """Add a user, or set the password of an existing one."""
        if not name or any(ord(ch) < 33 or ord(ch) == 127 for ch in name):
            die(f"invalid user name {name!r}: no spaces or control characters")
        store = _store(config)
        existed = name.lower() in store.names()
        store.set_password(name, _read_password(password_stdin))
        console.print(
            f"{'Updated' if existed else 'Added'} user {name.lower()} in {store.path}", markup=False
        )

    @user_app.command("remove")
    def remove(name: str = typer.Argument(...), config: Path | None = CONFIG_OPTION) -> None:
        """Remove a user."""
        store = _store(config)
        if not store.remove(name):
            die(f"no user {name!r} in {store.path}")
        console.print(f"Removed user {name.lower()} from {store.path}", markup=False)

    @user_app.command("list")
    def list_users(config: Path | None = CONFIG_OPTION, as_json: bool = JSON_OPTION) -> None:
        """List the users (names only; hashes are never printed)."""
        store = _store(config)
        names = store.names()
        if as_json:
            emit_json({"users_file": str(store.path), "users": names})
            return
        if not names:
            console.print(f"No users in {store.path}", markup=False)
            return
        for n in names:
            console.print(n, markup=False)
