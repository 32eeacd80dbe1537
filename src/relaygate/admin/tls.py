"""The admin listener's TLS: its context from admin.tls_certificate_file / tls_key_file, the
warning for a key every local user can read, the files' stamp that tells a renewal, and the
context a running listener swaps for a renewed certificate.

Separate from server.py so that the certificate handling (blocking file reads, run in a
thread) reads on its own. `AdminStartError` lives here because `load_admin_tls` raises it;
server.py re-exports it, where the rest of the code imports it from.
"""

from __future__ import annotations

import ssl
from typing import Any

from relaygate.file_modes import mode_granting


class AdminStartError(RuntimeError):
    """The admin listener cannot start: its token file cannot be read or is empty, or its
    address cannot be bound. `relaygate serve` reports it in one line and exits 1."""


def load_admin_tls(config: Any) -> ssl.SSLContext | None:
    """The admin listener's TLS context from ``admin.tls_certificate_file`` / ``tls_key_file``
    (None: neither is set, plain HTTP). TLS 1.2 and later only. Blocking (file reads): run it in
    a thread. AdminStartError naming the key and the file when one cannot be read, or both when
    they do not load together (not PEM, a key that is not the certificate's)."""
    admin = config.admin
    cert, key = admin.tls_certificate_file, admin.tls_key_file
    if cert is None or key is None:
        return None
    for name, path in (("tls_certificate_file", cert), ("tls_key_file", key)):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise AdminStartError(
                f"cannot read admin.{name} {str(path)!r}: {exc.strerror or exc}"
            ) from exc
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise AdminStartError(
            f"admin.tls_certificate_file {str(cert)!r} and admin.tls_key_file {str(key)!r} "
            f"cannot be loaded together: {reason}"
        ) from exc
    return context


def tls_key_mode_warning(config: Any) -> str | None:
    """A warning when ``admin.tls_key_file`` is readable or writable by every local user (a copy
    keeps `cp`'s 0644): any of them can pose as the admin listener and read the token and the
    session cookies the admins send it. Group access is left alone. None otherwise, or when it
    cannot be examined."""
    key = config.admin.tls_key_file
    mode = None if key is None else mode_granting(key, 0o007)
    if mode is None:
        return None
    return (
        f"admin.tls_key_file {str(key)!r} has mode {mode:04o}: every local user can read the "
        f"admin listener's private key, pose as it and read the API token the admins send it; "
        f"chmod o-rwx {key}"
    )


#: (mtime, ctime, inode, size) of the admin certificate file then its key file (None: absent)
_TlsStamp = tuple[tuple[int, int, int, int] | None, ...]


def _tls_stamp(config: Any) -> _TlsStamp:
    """What tells that the admin certificate or key file changed: replaced, rewritten, or its
    mode or owner changed (a fix of an unreadable key). Empty without TLS."""
    admin = config.admin
    if admin.tls_certificate_file is None or admin.tls_key_file is None:
        return ()
    stamps: list[tuple[int, int, int, int] | None] = []
    for path in (admin.tls_certificate_file, admin.tls_key_file):
        try:
            st = path.stat()
        except OSError:
            stamps.append(None)
            continue
        stamps.append((st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_size))
    return tuple(stamps)


class _SwappableTls:
    """The listener's TLS context, replaceable while it runs: every handshake is begun with one
    context (``front``, `_Handshake`); its SNI callback, which OpenSSL calls for every handshake,
    with or without a server name, hands the handshake the current context. A renewed
    certificate is then served from the next connection on without reopening the listener;
    open connections keep theirs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.front = self.current = context
        context.sni_callback = self._choose

    def _choose(self, connection: Any, _server_name: str | None, _context: Any) -> None:
        if connection.context is not self.current:
            connection.context = self.current

    def swap(self, context: ssl.SSLContext) -> None:
        self.current = context
