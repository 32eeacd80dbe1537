"""`relaygate check`: validate the configuration, listing every error at once."""

from __future__ import annotations

from pathlib import Path

import typer

from relaygate.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    config_source,
    console,
    emit_json,
    print_problems,
    problems_json,
)
from relaygate.config import Config, ConfigError, load_config
from relaygate.config.loader import Problem
from relaygate.config.relative_paths import as_the_relay_reads


def register(app: typer.Typer) -> None:
    @app.command()
    def check(config: Path | None = CONFIG_OPTION, json_out: bool = JSON_OPTION) -> None:
        """Validate the config file; exit 1 with every error listed."""
        source = config_source(config)
        try:
            # Relative file paths as the running relay reads them (from its working directory)
            cfg, _ = as_the_relay_reads(load_config(config))
            problems = (
                tls_file_problems(cfg)
                + dkim_key_problems(cfg)
                + token_file_problems(cfg)
                + service_account_problems(cfg)
                + certificate_credential_problems(cfg)
                + users_file_problems(cfg)
                + secret_file_problems(cfg)
            )
        except ConfigError as exc:
            problems = exc.problems
        if problems:
            if json_out:
                emit_json({"valid": False, "source": source, "errors": problems_json(problems)})
            else:
                print_problems(problems, console)
                console.print(f"{source}: {len(problems)} error(s)", markup=False)
            raise typer.Exit(1) from None
        summary = {
            "valid": True,
            "source": source,
            "receive_connectors": len(cfg.receive_connectors),
            "send_connectors": len(cfg.send_connectors),
            "accepted_domains": len(cfg.accepted_domains),
        }
        if json_out:
            emit_json(summary)
        else:
            console.print(
                f"{source}: OK ({summary['receive_connectors']} receive connector(s), "
                f"{summary['send_connectors']} send connector(s), {summary['accepted_domains']} accepted domain(s))",
                markup=False,
            )


def _unusable(cert: Path | None, key: Path | None) -> tuple[str, str] | None:
    """(key name, why) when the certificate or key file cannot be read or loaded; else None."""
    for name, path in (("tls_certificate_file", cert), ("tls_key_file", key)):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            return name, f"{path}: cannot read: {exc.strerror or exc}"
    if cert is not None and key is not None:
        import ssl

        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError, ValueError) as exc:
            return "tls_certificate_file", f"{cert} with {key}: cannot be loaded: {exc}"
    return None


def tls_file_problems(cfg: Config) -> list[Problem]:
    """The certificate/key files `serve` would load: an implicit-TLS listener does not open
    without them (and STARTTLS is not offered), and a send connector's client certificate that
    cannot be loaded fails every TLS session through it, so `check` reads them, naming connector
    and key."""
    problems = []
    found = _unusable(cfg.server.tls_certificate_file, cfg.server.tls_key_file)
    if found is not None:
        problems.append(Problem(cfg.source, f"server.{found[0]}", found[1]))
    if cfg.admin.enabled:  # the admin listener does not start without them
        found = _unusable(cfg.admin.tls_certificate_file, cfg.admin.tls_key_file)
        if found is not None:
            problems.append(Problem(cfg.source, f"admin.{found[0]}", found[1]))
    for i, c in enumerate(cfg.receive_connectors):
        found = _unusable(c.tls_certificate_file, c.tls_key_file)
        if found is not None:
            problems.append(
                Problem(cfg.source, f"receive_connectors[{i}].{found[0]}", found[1], c.name)
            )
    # A send connector's client certificate: unloadable, every STARTTLS through it would fail.
    for i, s in enumerate(cfg.send_connectors):
        found = _unusable(s.tls_certificate_file, s.tls_key_file)
        if found is not None:
            problems.append(
                Problem(cfg.source, f"send_connectors[{i}].{found[0]}", found[1], s.name)
            )
    return problems


def dkim_key_problems(cfg: Config) -> list[Problem]:
    """The DKIM keys `serve` would sign with: one that cannot be loaded (missing or unreadable
    file, wrong key type, a header that must not be signed...) is left out and its domain's mail
    goes unsigned, so `check` loads each enabled key and names the entry."""
    from relaygate.dkim.signer import DkimConfigError, DkimSigner

    problems = []
    data_dir = Path(cfg.server.data_dir)
    seen: dict[tuple[str, str], int] = {}
    for i, key in enumerate(cfg.dkim):
        if not key.enabled:
            continue
        ident = (key.domain.lower().rstrip("."), key.selector.strip().lower())
        if ident in seen:
            problems.append(Problem(cfg.source, f"dkim[{i}]", f"duplicates dkim[{seen[ident]}]"))
            continue
        seen[ident] = i
        try:
            DkimSigner([key], data_dir=data_dir)
        except DkimConfigError as exc:
            name = f"{key.domain} selector {key.selector}"
            for why in exc.problems:
                why = why.partition(": ")[2] if why.startswith("[[dkim]] ") else why
                problems.append(Problem(cfg.source, f"dkim[{i}]", why, name))
    return problems


def service_account_problems(cfg: Config) -> list[Problem]:
    """The Google service account key files XOAUTH2 connectors sign their token requests with:
    missing, unreadable, not JSON, lacking a field or without a usable RSA private key, the
    connector's mail waits in the queue (TokenUnavailable), so `check` loads each one. The
    messages name the file and the problem, never the key."""
    from relaygate.delivery.google_oauth import ServiceAccountError, load_service_account

    problems = []
    for i, s in enumerate(cfg.send_connectors):
        if (
            s.oauth_provider != "google"
            or s.smart_host_auth_mechanism != "XOAUTH2"
            or s.oauth_service_account_file is None
        ):
            continue
        try:
            load_service_account(s.oauth_service_account_file)
        except ServiceAccountError as exc:
            problems.append(
                Problem(
                    cfg.source, f"send_connectors[{i}].oauth_service_account_file", str(exc), s.name
                )
            )
    return problems


def certificate_credential_problems(cfg: Config) -> list[Problem]:
    """The Entra ID certificate credentials (oauth_client_certificate_file / oauth_client_key_file)
    of XOAUTH2 and Graph send connectors: one that cannot be loaded (unreadable, no certificate,
    no key, an encrypted or non-RSA key, a key of another certificate) keeps the connector's mail
    in the queue, so `check` loads each one. The messages name the file, never the key."""
    from relaygate.delivery.entra_certificate import (
        CertificateCredentialError,
        load_certificate_credential,
    )

    problems = []
    for i, s in enumerate(cfg.send_connectors):
        entra = s.delivery_method == "Graph" or (
            s.smart_host_auth_mechanism == "XOAUTH2" and s.oauth_provider == "entra"
        )
        if not entra or s.oauth_client_certificate_file is None:
            continue
        try:
            load_certificate_credential(s.oauth_client_certificate_file, s.oauth_client_key_file)
        except CertificateCredentialError as exc:
            key = (
                "oauth_client_key_file"
                if str(exc).startswith("oauth_client_key_file")
                else ("oauth_client_certificate_file")
            )
            why = str(exc).removeprefix(f"{key} ")
            problems.append(Problem(cfg.source, f"send_connectors[{i}].{key}", why, s.name))
    return problems


def token_file_problems(cfg: Config) -> list[Problem]:
    """The admin listener's API token file: missing, unreadable, empty or holding a token that
    cannot travel in an HTTP header stops `serve` at start, so `check` reads it the same way."""
    from relaygate.admin.api import TokenFileError, read_token

    admin = cfg.admin
    if not admin.enabled or admin.api_token_file is None:
        return []
    try:
        read_token(admin.api_token_file)
    except TokenFileError as exc:
        why = str(exc).removeprefix("admin.api_token_file ")
        return [Problem(cfg.source, "admin.api_token_file", why)]
    except OSError as exc:
        return [Problem(cfg.source, "admin.api_token_file", f"cannot read it: {exc.strerror}")]
    return []


def users_file_problems(cfg: Config) -> list[Problem]:
    """The SMTP AUTH users file (`server.users_file`, default `<data_dir>/users.json`): one that is
    not JSON, or holds a send-as pattern written by hand that the parser refuses, stops `serve` at
    start, so `check` reads it the same way. A file that does not exist is no users (not an error)."""
    from relaygate.smtp.auth import UserStore, users_path

    path = users_path(Path(cfg.server.data_dir), cfg.server.users_file)
    key = "server.users_file"
    try:
        UserStore(path)
    except ValueError as exc:
        return [Problem(cfg.source, key, f"{path}: {exc}")]
    except OSError as exc:
        return [Problem(cfg.source, key, f"{path}: cannot read it: {exc.strerror}")]
    return []


def _secret_file_unusable(path: Path, encoding: str) -> str | None:
    """Why a password or client secret file cannot be used, as the delivery reads it (one
    trailing newline stripped); None when it can. Never the file's bytes: they are the secret."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return f"{path}: cannot read it: {exc.strerror}"
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        return f"{path}: is not UTF-8 text (save it as UTF-8)"
    if not text.removesuffix("\n").removesuffix("\r"):
        return f"{path}: is empty"
    return None


def secret_file_problems(cfg: Config) -> list[Problem]:
    """A send connector's auth_password_file (BasicAuth) and oauth_client_secret_file (Entra ID
    XOAUTH2 or Graph) are read at each delivery, not when `serve` starts: missing, unreadable,
    empty or not UTF-8, every message of the connector is deferred (and expires), so `check`
    reads them the same way (utf-8-sig for the secret, as the token provider does)."""
    problems = []
    for i, s in enumerate(cfg.send_connectors):
        basic = s.smart_host_auth_mechanism in ("BasicAuth", "BasicAuthRequireTLS")
        entra = s.delivery_method == "Graph" or (
            s.smart_host_auth_mechanism == "XOAUTH2" and s.oauth_provider == "entra"
        )
        for key, path, encoding in (
            ("auth_password_file", s.auth_password_file if basic else None, "utf-8"),
            (
                "oauth_client_secret_file",
                s.oauth_client_secret_file if entra else None,
                "utf-8-sig",
            ),
        ):
            why = None if path is None else _secret_file_unusable(Path(path), encoding)
            if why is not None:
                problems.append(Problem(cfg.source, f"send_connectors[{i}].{key}", why, s.name))
    return problems
