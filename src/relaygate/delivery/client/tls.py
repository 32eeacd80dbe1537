"""The delivery client's TLS: the client contexts per ``tls_auth_level`` (cached per level, CA
file and client certificate, built again when a file changes: `load_tls_context`, off the event
loop), the name the next hop's certificate must carry, and what makes TLS required for a
connector (require_tls, implicit_tls, a validating level, an AUTH that must not run in clear).

Kept apart from the SMTP session: these are decisions about certificates and files, made before
a connection exists, and the queue manager builds the contexts ahead of the first delivery.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from collections.abc import Callable
from typing import Any

from relaygate.delivery.nexthop import NextHop

_TLS_LEVELS = ("EncryptionOnly", "CertificateValidation", "DomainValidation")
_AUTH_TLS_ONLY = ("BasicAuthRequireTLS", "XOAUTH2")


def _tls_level(connector: Any) -> str:
    level = getattr(connector, "tls_auth_level", "EncryptionOnly") or "EncryptionOnly"
    return level if level in _TLS_LEVELS else "DomainValidation"  # unknown → strictest


def _tls_required(connector: Any) -> bool:
    mech = getattr(connector, "smart_host_auth_mechanism", "None") or "None"
    return bool(
        getattr(connector, "require_tls", False)
        or getattr(connector, "implicit_tls", False)
        or _tls_level(connector) != "EncryptionOnly"
        or mech in _AUTH_TLS_ONLY
    )


@functools.lru_cache(maxsize=32)
def _cached_context(
    level: str,
    ca_file: tuple[str, str] | None,
    client_cert: tuple[str, str, str] | None = None,
) -> ssl.SSLContext:
    """ca_file: (CA file, digest of it); client_cert: (certificate file, key file, digest of
    both). The digests are in the cache key only so that a CA file replaced or a certificate
    renewed under the same file names gets a new context."""
    if level == "EncryptionOnly":
        # create_default_context's settings without its trust store, which this level never
        # consults: loading the system's CAs took 21 ms, on the event loop, at the first delivery.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        if ca_file:
            try:
                ctx.load_verify_locations(cafile=ca_file[0])
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                raise _TlsFileError("the CA file (tls_ca_file)", exc) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = level == "DomainValidation"
    if client_cert is not None:
        try:
            ctx.load_cert_chain(client_cert[0], client_cert[1])
        except (OSError, ValueError) as exc:
            raise _TlsFileError("the client certificate (tls_certificate_file)", exc) from None
    return ctx


class _TlsFileError(ValueError):
    """A send connector's TLS file cannot be loaded; the message names which key it is."""

    def __init__(self, what: str, exc: BaseException) -> None:
        detail = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
        super().__init__(f"{what} cannot be loaded: {detail}")


#: file names (the CA file; the certificate and key files) → digest of their bytes when last
#: loaded (load_tls_context): which cached context `tls_context_for` takes, without reading the
#: files at every session.
_file_digests: dict[tuple[str, ...], str] = {}


def _client_cert(connector: Any) -> tuple[str, str] | None:
    cert = getattr(connector, "tls_certificate_file", None)
    key = getattr(connector, "tls_key_file", None)
    return (str(cert), str(key)) if cert and key else None


def _ca_file(connector: Any) -> tuple[str] | None:
    ca = getattr(connector, "tls_ca_file", None)
    return (str(ca),) if ca else None


def _known_digest(files: tuple[str, ...]) -> str:
    digest = _file_digests.get(files)
    if digest is None:  # not loaded yet (a caller that did not go through load_tls_context)
        digest = _file_digest(files)
        _file_digests[files] = digest
    return digest


def _context_for(connector: Any, digest: Callable[[tuple[str, ...]], str]) -> ssl.SSLContext:
    ca = _ca_file(connector)
    files = _client_cert(connector)
    return _cached_context(
        _tls_level(connector),
        None if ca is None else (ca[0], digest(ca)),
        None if files is None else (*files, digest(files)),
    )


def tls_context_for(connector: Any) -> ssl.SSLContext:
    """The client TLS context for the connector's tls_auth_level (cached per level, CA file and
    client certificate; the files as `load_tls_context` last read them)."""
    return _context_for(connector, _known_digest)


def _file_digest(files: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for path in files:
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError as exc:
            h.update(f"unreadable: {exc}".encode())
        h.update(b"\0")
    return h.hexdigest()


def load_tls_context(connector: Any) -> ssl.SSLContext:
    """`tls_context_for`, after reading the CA file and the client certificate files again
    (blocking: the queue manager calls it in a thread at start and at every reload). A CA file
    replaced or a certificate renewed under the same file names is taken up by new sessions from
    then on, as a reload reopens an implicit-TLS listener whose certificate changed. Raises
    OSError/ssl.SSLError when they cannot be loaded."""
    fresh: dict[tuple[str, ...], str] = {}

    def reread(files: tuple[str, ...]) -> str:
        fresh[files] = _file_digest(files)
        return fresh[files]

    # built before it is published: the event loop never loads it itself
    ctx = _context_for(connector, reread)
    _file_digests.update(fresh)
    return ctx


def _server_name(connector: Any, hop: NextHop) -> str:
    """SNI and, with DomainValidation, the name the certificate must carry."""
    tls_domain = (getattr(connector, "tls_domain", "") or "").strip()
    return tls_domain or hop.tls_name or hop.host


def _tls_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate validation failed: {exc.verify_message or exc.reason}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or type(exc).__name__}"
    return f"TLS handshake failed: {type(exc).__name__}"


def _find_ssl_error(exc: BaseException) -> ssl.SSLError | None:
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 5:
        if isinstance(cur, ssl.SSLError):
            return cur
        cur = cur.__cause__ or cur.__context__
        seen += 1
    return None
