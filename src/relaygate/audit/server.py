"""The server-wide findings: accepted domains, worker balance, trusted proxies, ACME, secret files'
permissions and the queue.

Apart from the connector rules: each reads `config.server` (or the files it names), not a connector."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from relaygate.audit.findings import Finding
from relaygate.audit.ranges import _families_covered
from relaygate.audit.relay_grants import relay_grant
from relaygate.config.model import Config
from relaygate.config.relative_paths import RelativeFiles
from relaygate.file_modes import mode_granting
from relaygate.policy.rights import session_rights
from relaygate.public_suffix import is_public_suffix


def _covers_public_suffix(wildcard: str) -> bool:
    """`*.com`, `*.co.uk`: a wildcard accepted domain whose base is a public suffix."""
    base = wildcard.removeprefix("*.")
    # A single label needs no list; else the list is read once (about 20 ms) and cached.
    return "." not in base or is_public_suffix(base)


def _accepted_domain_findings(config: Config) -> Iterator[Finding]:
    """Every client that may submit may send to an accepted domain, relay right or not (check_rcpt):
    one that covers a public suffix makes the relay open to every address under it."""
    for i, d in enumerate(config.accepted_domains):
        if not d.is_wildcard or not _covers_public_suffix(d.domain):
            continue
        suffix = d.domain.removeprefix("*.")
        anonymous = [
            c.name
            for c in config.receive_connectors
            if c.enabled and session_rights(c).may_submit and not session_rights(c).may_relay
        ]
        who = (
            f"anonymous clients of {', '.join(anonymous)} (no relay right)"
            if anonymous
            else "every client that may submit mail, with or without the relay right"
        )
        yield Finding(
            "high",
            "accepted-domain-public-suffix",
            "",
            f"accepted_domains[{i}].domain",
            f"accepted domain {d.domain} ({d.domain_type}) covers the whole public suffix "
            f".{suffix}: {who} may send to any address under .{suffix}, as if it were the "
            f"organisation's own (an open relay for .{suffix})",
            f'remove it (`relaygate domain remove "{d.domain}"`) and list the organisation\'s '
            "own domains (`*.corp.example` covers a domain and its subdomains)",
        )


def _proxy_findings(config: Config, max_prefix_v4: int, max_prefix_v6: int) -> Iterator[Finding]:
    """server.trusted_proxies wider than a few load balancers: every host in it may send a PROXY
    header naming any client address, and so choose the connector (and the relay rights) its
    connection gets. High when every address may, or when some connector relays for its clients
    (any host of the range relays by naming one of them: as wide an open relay as a relay range
    of that width, which is high); else medium (a connector chosen, no relay)."""
    broad = [
        p
        for p in config.server.trusted_proxies
        if p.prefix_length() < (max_prefix_v4 if p.version == 4 else max_prefix_v6)
    ]
    if not broad:
        return
    everyone = bool(_families_covered(broad))
    relaying = _relay_connector_names(config)
    if everyone:
        effect = " (every client can: an open relay for anyone who knows a relay client's address)"
    elif relaying:
        effect = (
            f": any of them relays through {', '.join(relaying)} by naming an address of its "
            "remote_ip_ranges (an open relay for every host in those ranges)"
        )
    else:
        effect = ""
    yield Finding(
        "high" if everyone or relaying else "medium",
        "trusted-proxies-broad",
        "",
        "server.trusted_proxies",
        f"server.trusted_proxies includes {', '.join(p.text for p in broad)}: any host there may "
        "send a PROXY header naming any client address, and get the connector and relay rights "
        "of that address" + effect,
        "list only the load balancers' or proxies' own addresses",
    )


def _relay_connector_names(config: Config) -> list[str]:
    """The enabled receive connectors whose anonymous sessions relay (quoted, for a message)."""
    return [
        f'"{c.name}"'
        for c in config.receive_connectors
        if c.enabled and relay_grant(c).anonymous and c.remote_ip_ranges
    ]


def _acme_findings(config: Config) -> Iterator[Finding]:
    """ACME on: the last certificate the CA returned was refused (<data_dir>/acme/refused.json,
    written by the ACME client); no certificate obtained yet (whether
    <data_dir>/acme/certificate.pem exists): STARTTLS is not offered."""
    s = config.server
    if not s.acme_directory_url:
        return
    from relaygate.acme import acme_domains, acme_files
    from relaygate.acme.files import read_refused

    cert, key = acme_files(Path(s.data_dir))
    have = cert.exists() and key.exists()
    refused = read_refused(Path(s.data_dir))
    if refused is not None:
        names = ", ".join(str(d) for d in refused.get("domains") or acme_domains(s))
        yield Finding(
            "medium",
            "acme-certificate-refused",
            "",
            "server.acme_directory_url",
            f"the certificate {refused.get('directory_url') or s.acme_directory_url} returned "
            f"for {names} at {refused.get('at', '?')} was not installed "
            f"({refused.get('check', '?')} check): {refused.get('detail', '')}; "
            + (
                "the listeners keep the current certificate"
                if have
                else "there is no certificate yet"
            ),
            "the ACME client retries with back-off (see the relay's log, relaygate.acme); if the "
            "CA keeps returning such a certificate, ask its operator, or point "
            "server.acme_directory_url at another CA",
        )
    if have:
        return
    withheld = [
        c.name
        for c in config.receive_connectors
        if c.enabled and "Tls" in c.auth_mechanism and c.tls_certificate_file is None
    ]
    yield Finding(
        "medium",
        "acme-certificate-missing",
        "",
        "server.acme_directory_url",
        f"no ACME certificate for {', '.join(acme_domains(s))} has been obtained yet from "
        f"{s.acme_directory_url} ({cert} does not exist): STARTTLS is not offered"
        + (f" on {', '.join(withheld)}" if withheld else "")
        + " and implicit-TLS listeners present the self-signed certificate",
        "see the relay's log for the CA's error (relaygate.acme); the CA must reach "
        f"server.acme_http_listen ({s.acme_http_listen}) as port 80 of each name",
    )


#: What a reader of each secret file can do (the finding's message).
_SECRET_EFFECT = {
    "tls_key_file": "read the private key and pose as the relay to its clients",
    "auth_password_file": "read the smart host's password and send as the relay's account",
    "oauth_client_secret_file": "read the app's client secret and get tokens for the mailbox",
    "oauth_client_key_file": "read the app's private key and get tokens for the mailbox",
    "oauth_client_certificate_file": "read the app's private key and get tokens for the mailbox",
    "oauth_service_account_file": "read the service account's key and act as the mailbox",
    "key_file": "read the DKIM private key and sign mail as the domain",
    "users_file": "read the AUTH users' password hashes and guess them offline",
    "api_token_file": "read the admin API token and manage the queue",
    # (by its whole key: a receive connector's tls_key_file is another effect)
    "admin.tls_key_file": "read the admin listener's private key, pose as it and read the API "
    "token and the session cookies the admins send it",
}


def _secret_files(config: Config) -> Iterator[tuple[str, str, Path]]:
    """(connector, key, path) of every configured file that holds a secret."""
    s = config.server
    for key in ("tls_key_file", "users_file"):
        if (path := getattr(s, key)) is not None:
            yield "", f"server.{key}", path
    for c in config.receive_connectors:
        if c.tls_key_file is not None:
            yield c.name, "tls_key_file", c.tls_key_file
    for i, sc in enumerate(config.send_connectors):
        keys = ["auth_password_file", "oauth_client_secret_file", "oauth_service_account_file"]
        keys += ["tls_key_file", "oauth_client_key_file"]
        if sc.oauth_client_key_file is None:  # the key is in the certificate file
            keys.append("oauth_client_certificate_file")
        for key in keys:
            if (path := getattr(sc, key)) is not None:
                yield f'send connector "{sc.name}"', f"send_connectors[{i}].{key}", path
    for i, k in enumerate(config.dkim):
        if k.key_file is not None:
            yield "", f"dkim[{i}].key_file", k.key_file
    if config.admin.api_token_file is not None:
        yield "", "admin.api_token_file", config.admin.api_token_file
    if config.admin.tls_key_file is not None:
        yield "", "admin.tls_key_file", config.admin.tls_key_file


def _secret_file_findings(config: Config) -> Iterator[Finding]:
    """A secret file readable or writable by every local user (`cp` keeps 0644). Group access
    is left alone (0640 root:relaygate, the packaged layout). One stat per file, like
    `_acme_findings`' existence check; a file that cannot be examined is `check`'s to report."""
    for connector, key, path in _secret_files(config):
        mode = mode_granting(path, 0o007)
        if mode is None:
            continue
        effect = _SECRET_EFFECT.get(key) or _SECRET_EFFECT[key.rpartition(".")[2]]
        yield Finding(
            "medium",
            "secret-file-readable",
            connector,
            key,
            f"{path} has mode {mode:04o}: every local user can {effect}",
            f"chmod o-rwx {path}",
        )


def _config_file_findings(config: Config) -> Iterator[Finding]:
    """The config file writable by every local user: any of them can give a connector relay
    rights for every address, and the relay applies the file at its next reload (an edit is
    noticed on its own). One stat, like `_secret_file_findings`; the embedded default has no
    file."""
    path = Path(config.source)
    if not path.is_absolute() and not path.exists():
        return  # "<embedded default>", or a text parsed without a file
    mode = mode_granting(path, 0o002)
    if mode is None:
        return
    yield Finding(
        "medium",
        "config-file-writable",
        "",
        "(file)",
        f"{path} has mode {mode:04o}: every local user can rewrite the configuration (a relay "
        "connector for every address, the admin listener without a token), and the relay "
        "applies it at its next reload",
        f"chmod o-w {path}",
    )


def _queue_findings(config: Config) -> Iterator[Finding]:
    q = config.queue
    if q.store != "postgresql" or not q.database_url:
        return
    from psycopg.conninfo import conninfo_to_dict

    try:
        has_password = bool(conninfo_to_dict(q.database_url).get("password"))
    except Exception:  # `check` reports a malformed URL
        return
    if has_password:
        yield Finding(
            "low",
            "database-password-in-config",
            "",
            "queue.database_url",
            "queue.database_url holds the database password in the configuration file, where "
            "whoever reads the file (a backup, a support bundle) reads the password",
            "take it out of the URL: libpq reads it from a password file "
            '(database_url = "postgresql://relaygate@db/relaygate?passfile=/etc/relaygate/pgpass", '
            "mode 0600) or from the PGPASSWORD environment variable of relaygate serve",
        )


def _relative_path_findings(relative: RelativeFiles | None, data_dir: Path) -> Iterator[Finding]:
    """Relative file paths: `relaygate serve` reads them from its working directory, so the
    findings about those files hold for the directory they were read from; say which (the
    running relay's, or this command's when none was found)."""
    if relative is None or not relative.keys:
        return
    keys = ", ".join(f"{key} = {path}" for key, path in relative.keys)
    if relative.pid is not None:
        where = (
            f"the files were read from the working directory of the running relay "
            f"(pid {relative.pid}), {relative.base}"
        )
    else:
        where = (
            f"no running relay was found for data_dir {data_dir}, so the files were read from "
            f"this command's working directory, {relative.base}, as a relay started there would"
        )
    yield Finding(
        "info",
        "relative-file-paths",
        "",
        relative.keys[0][0],
        f"relative file paths ({keys}) are taken from the working directory of relaygate serve, "
        f"not from the config file's folder: {where}",
        "write absolute paths, so that the relay, check and audit read the same files whichever "
        "directory they run in (the packaged unit runs in /var/lib/relaygate)",
    )
