"""The STARTTLS contexts of a configuration: built ahead, and remembered when they fail to load.

Separate because building them is blocking (certificate files read, an ACME pair read under its
lock while the ACME client may hold it for a renewal): `load_starttls_contexts` runs in a thread
and hands its `StarttlsContexts` to the `ServerContext` (server_context.py), which offers
STARTTLS again once the files that failed change (`_files_stamp`). Implicit-TLS listeners build
theirs in listener_sync.py.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import NamedTuple

from relaygate.config.model import Config, ReceiveConnector
from relaygate.smtp.tls import ACME, CONNECTOR, SELF_SIGNED, SERVER, listener_files, server_context

logger = logging.getLogger("relaygate.smtp")

#: (mtime, ctime, inode, size) of a listener's certificate file then its key file (None: absent)
_FilesStamp = tuple[tuple[int, int, int, int] | None, ...]


class StarttlsContexts(NamedTuple):
    """The STARTTLS contexts of a configuration, built ahead by `load_starttls_contexts`."""

    contexts: dict[str, ssl.SSLContext]  # by connector name, those that loaded
    failed: dict[str, _FilesStamp]  # those that did not (logged): their files when they failed
    withheld: frozenset[str]  # connectors not offering STARTTLS (ACME has no certificate yet)


def load_starttls_contexts(config: Config) -> StarttlsContexts:
    """Every STARTTLS context of `config`. Blocking (file reads, and an ACME pair is read under
    its lock, which the ACME client holds while it writes and fsyncs a renewal): run it in a
    thread, then hand the result to `ServerContext.refresh_tls` / `apply`."""
    withheld = _starttls_withheld(config)
    contexts: dict[str, ssl.SSLContext] = {}
    failed: dict[str, _FilesStamp] = {}
    for c in config.receive_connectors:
        if (
            c.enabled
            and "Tls" in c.auth_mechanism
            and c.tls_mode != "implicit"
            and c.name not in withheld
        ):
            context, stamp = _starttls_context(config, c)
            if context is not None:
                contexts[c.name] = context
            elif stamp is not None:
                failed[c.name] = stamp
    return StarttlsContexts(contexts, failed, withheld)


def _starttls_withheld(config: Config) -> frozenset[str]:
    """Connectors whose Tls cannot be offered yet: ACME is on and has no certificate."""
    if not config.server.acme_directory_url:
        return frozenset()
    return frozenset(
        c.name
        for c in config.receive_connectors
        if "Tls" in c.auth_mechanism and listener_files(config, c) is None
    )


def _starttls_context(
    config: Config, connector: ReceiveConnector
) -> tuple[ssl.SSLContext | None, _FilesStamp | None]:
    """(`connector`'s STARTTLS context, None) or, if its certificate cannot be loaded (logged,
    naming the files and their keys), (None, the files' stamp when they failed)."""
    files = listener_files(config, connector)
    stamp = _files_stamp(files)
    try:
        return server_context(config, connector), None
    except (OSError, ssl.SSLError) as exc:
        logger.error(
            "TLS unavailable on receive connector %s: %s; STARTTLS not offered until the files load",
            connector.name,
            _load_failure(files, exc),
        )
        return None, stamp


def _files_stamp(files: tuple[Path, Path, str] | None) -> _FilesStamp:
    """What tells that a certificate or key file changed: replaced, rewritten, or its mode or
    owner changed (ctime), as a fix of an unreadable key does."""
    if files is None:
        return ()
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in files[:2]:
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(stamps)


#: `listener_files`' source → the keys that name the files
_FILE_KEYS = {
    CONNECTOR: "tls_certificate_file / tls_key_file",
    SERVER: "server.tls_certificate_file / server.tls_key_file",
    ACME: "the certificate of server.acme_directory_url",
    SELF_SIGNED: "the self-signed certificate",
}


def _load_failure(files: tuple[Path, Path, str] | None, exc: BaseException) -> str:
    """Why the files did not load, naming them and their keys: ssl's own error names neither
    ("[Errno 2] No such file or directory")."""
    if files is None:
        return str(exc)  # AcmePending says it all
    cert, key, source = files
    return f"cannot load certificate {cert} and key {key} ({_FILE_KEYS.get(source, source)}): {exc}"
