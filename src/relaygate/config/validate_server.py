"""The rules of the server's own listeners: ACME (`_acme_rules`) and admin.listen on a receive
connector's endpoint (`_admin_endpoint_rules`), with `_listeners_sharing`.

Apart from the connector rules: they read [server] and [admin]."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from relaygate.config.loader import Problem
from relaygate.config.model import Config
from relaygate.config.validate_values import _given

_ACME_NAME = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$"
)


def _acme_rules(config: Config, raw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """[server] acme_*: the directory URL turns ACME on; the other keys need it; the ACME
    certificate stands for the server-wide tls_certificate_file / tls_key_file."""
    s = config.server
    if not s.acme_directory_url:
        for key in ("acme_email", "acme_domains", "acme_ca_file"):
            if _given(raw, key):
                yield key, "has no effect without server.acme_directory_url; set it or remove this"
        return
    for key in ("tls_certificate_file", "tls_key_file"):
        if getattr(s, key) is not None:
            yield (
                "acme_directory_url",
                f"set either server.acme_directory_url (the relay obtains the certificate) or "
                f"server.{key} (you supply it), not both",
            )
            break
    if not s.acme_directory_url.lower().startswith("https://"):
        yield (
            "acme_directory_url",
            f"{s.acme_directory_url!r} is not an https:// URL (RFC 8555 §6.1)",
        )
    names = s.acme_domains or (s.fqdn,)
    for i, name in enumerate(names):
        where = f"acme_domains[{i}]" if s.acme_domains else "fqdn"
        if name.startswith("*."):
            yield (
                where,
                f"{name!r}: a wildcard name needs the DNS-01 challenge; HTTP-01 cannot prove it",
            )
        elif not _ACME_NAME.match(name.lower().rstrip(".")):
            yield where, f"{name!r} is not a fully qualified host name a public CA can validate"
    if s.acme_email and not re.match(r"^[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+$", s.acme_email):
        yield "acme_email", f"{s.acme_email!r} is not an email address"
    try:
        from relaygate.config.values import parse_binding

        responder = parse_binding(s.acme_http_listen)
    except ValueError as exc:
        yield "acme_http_listen", str(exc)
    else:
        for other in _listeners_sharing(config, responder):
            yield (
                "acme_http_listen",
                f"{responder} is where {other} listens: the HTTP-01 responder cannot listen "
                "there too (every order would fail); give one of them another port, or forward "
                "port 80 to a free one",
            )
    if s.acme_ca_file is not None and not s.acme_ca_file.is_file():
        yield "acme_ca_file", f"{s.acme_ca_file} is not a file"
    if s.acme_renew_before <= timedelta(0):
        yield "acme_renew_before", "must be greater than 0"
    if s.acme_check_interval < timedelta(seconds=1):
        yield "acme_check_interval", "must be at least 00:00:01"


def _listeners_sharing(config: Config, binding: Any) -> Iterator[str]:
    """The relay's other listeners (enabled receive connectors' bindings, admin.listen) on the
    endpoint of `binding`, named as a problem names them."""
    from relaygate.config.values import parse_binding

    for c in config.receive_connectors:
        if c.enabled:
            for j, other in enumerate(c.bindings):
                if other.shares_endpoint(binding):
                    yield f'receive connector "{c.name}" (bindings[{j}], {other})'
    if config.admin.enabled:
        try:
            admin = parse_binding(config.admin.listen)
        except ValueError:  # reported as admin.listen's own problem
            return
        if admin.shares_endpoint(binding):
            yield f"admin.listen ({admin})"


def _admin_endpoint_rules(config: Config, position: Callable[[int], int]) -> list[Problem]:
    """An enabled receive connector's binding on admin.listen's endpoint: `serve` cannot open both
    (it stopped with 'Address already in use' after `check` had said OK). `position(i)`: the file
    index of the i-th receive connector."""
    from relaygate.config.values import parse_binding

    if not config.admin.enabled:
        return []
    try:
        admin = parse_binding(config.admin.listen)
    except ValueError:  # reported as admin.listen's own problem
        return []
    problems: list[Problem] = []
    for i, c in enumerate(config.receive_connectors):
        if not c.enabled:
            continue
        for j, binding in enumerate(c.bindings):
            if binding.shares_endpoint(admin):
                problems.append(
                    Problem(
                        config.source,
                        f"receive_connectors[{position(i)}].bindings[{j}]",
                        f"{binding} is where admin.listen ({admin}) has the admin centre listen: "
                        "the two cannot share it; give the connector or admin.listen another port",
                        c.name,
                    )
                )
    return problems
