"""A send connector's credentials for the smart host: BasicAuth's password (from a file or an
environment variable) or XOAUTH2's token provider. Never logged, never in a repr or a reply."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Credentials", "CredentialsError"]


class CredentialsError(Exception):
    """The connector's credentials cannot be loaded (the message names the source, never a value)."""


@dataclass(frozen=True)
class Credentials:
    """What the relay authenticates with. The secret fields are left out of repr and comparison."""

    username: str
    password: str | None = field(default=None, repr=False, compare=False)
    token_provider: Callable[[], Awaitable[str]] | None = field(
        default=None, repr=False, compare=False
    )

    @classmethod
    def from_connector(
        cls,
        connector: Any,
        *,
        token_provider: Callable[[], Awaitable[str]] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Credentials | None:
        """Load from ``auth_password_file`` (one trailing newline stripped) or ``auth_password_env``;
        XOAUTH2 takes `token_provider`. None when the connector does not authenticate."""
        mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
        username = getattr(connector, "auth_username", "") or ""
        name = getattr(connector, "name", "?")
        if mech in ("BasicAuth", "BasicAuthRequireTLS"):
            env = os.environ if environ is None else environ
            pw_file = getattr(connector, "auth_password_file", None)
            pw_env = getattr(connector, "auth_password_env", "") or ""
            password: str | None = None
            if pw_file:
                try:
                    raw = Path(pw_file).read_bytes()
                except OSError as exc:
                    raise CredentialsError(
                        f"send connector {name!r}: cannot read auth_password_file {str(pw_file)!r}: "
                        f"{exc.strerror}"
                    ) from None
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError:
                    # Never chained nor repr'd: a UnicodeDecodeError holds the file's bytes, and
                    # the caller's log line would show the password.
                    raise CredentialsError(
                        f"send connector {name!r}: auth_password_file {str(pw_file)!r} is not "
                        "UTF-8 text (save the password as UTF-8)"
                    ) from None
                password = text.removesuffix("\n").removesuffix("\r")
            elif pw_env:
                password = env.get(pw_env)
                if password is None:
                    raise CredentialsError(
                        f"send connector {name!r}: environment variable {pw_env!r} is not set"
                    )
            else:
                raise CredentialsError(
                    f"send connector {name!r}: {mech} needs auth_password_file or auth_password_env"
                )
            return cls(username, password=password)
        if mech == "XOAUTH2":
            if token_provider is None:
                raise CredentialsError(f"send connector {name!r}: XOAUTH2 needs a token provider")
            return cls(username, token_provider=token_provider)
        return None
