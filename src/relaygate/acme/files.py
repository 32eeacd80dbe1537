"""The files under ``<data_dir>/acme/``: their names, the lock that keeps the pair in step, and
the atomic writes.

Kept apart because the listeners (smtp/tls.py), the audit and the certificates command read
these files without running any ACME: they need only the names and the lock, not the client.
``account.key`` is the ACME account's key; ``certificate.key`` and ``certificate.pem`` are
replaced together under ``.lock``, with ``certificate.names`` and ``certificate.directory``;
``refused.json`` says why the last certificate the CA returned was not installed. Every file is
written atomically, mode 0600.

The pair is replaced by roll-forward (:func:`replace_pair`): both new files are written in full
beside the old ones first (``certificate.key.new``, ``certificate.pem.new``), then renamed over
them, the key first. A process that dies between the two renames leaves the new key beside the
old chain and ``certificate.pem.new``: whoever takes the lock next (a listener loading the pair,
the manager) completes the replacement before reading (:func:`_complete_replacement`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ACME_DIR = "acme"
CERTIFICATE_FILE = "certificate.pem"
KEY_FILE = "certificate.key"
ACCOUNT_KEY_FILE = "account.key"
LOCK_FILE = ".lock"
#: The names the installed certificate was ordered for, one a line (a CA may add names: the
#: certificate's own SANs are not the order's).
NAMES_FILE = "certificate.names"
#: The ACME directory URL the installed certificate came from (another CA configured: due).
DIRECTORY_FILE = "certificate.directory"
#: The last certificate the CA returned that was not installed (acme/verify.py): why, for whom,
#: when (JSON); removed when a certificate is installed. `relaygate audit` reports it.
REFUSED_FILE = "refused.json"
#: The new pair while it replaces the old one (`replace_pair`); left only by a crash.
PENDING_SUFFIX = ".new"


def acme_files(data_dir: Path) -> tuple[Path, Path]:
    """(certificate chain, key) of the ACME certificate under ``data_dir``."""
    folder = Path(data_dir) / ACME_DIR
    return folder / CERTIFICATE_FILE, folder / KEY_FILE


@contextlib.contextmanager
def files_lock(data_dir: Path, *, exclusive: bool) -> Iterator[None]:
    """The lock that keeps certificate.pem and certificate.key a pair: the writer holds it
    exclusive while it replaces both, a reader shared while it loads them."""
    folder = Path(data_dir) / ACME_DIR
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except FileNotFoundError:  # nothing obtained yet: nothing to keep in step
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        _complete_replacement(folder)
        yield
    finally:
        os.close(fd)


def complete_replacement(data_dir: Path) -> None:
    """A replacement of the pair cut short by a crash completed (`files_lock` does it), before
    the files are read without the lock (the manager's renewal check)."""
    with files_lock(data_dir, exclusive=False):
        pass


def _pending(path: Path) -> Path:
    return path.with_name(path.name + PENDING_SUFFIX)


def replace_pair(data_dir: Path, key: bytes, chain: bytes) -> None:
    """certificate.key and certificate.pem replaced by `key` and `chain`; the caller holds
    `files_lock` exclusive. Both new files are complete on disk before either is renamed into
    place, so a crash at any point leaves the old pair, the new one, or the new key beside a
    certificate.pem.new that the next `files_lock` renames into place."""
    cert_path, key_path = acme_files(data_dir)
    write_private(_pending(key_path), key)
    write_private(_pending(cert_path), chain)
    os.replace(_pending(key_path), key_path)
    os.replace(_pending(cert_path), cert_path)
    _fsync_dir(cert_path.parent)


def _complete_replacement(folder: Path) -> None:
    """A `replace_pair` cut short (the process died) completed, under the lock (any mode:
    readers holding it shared may each try; a rename already done is not done again). Only a
    certificate.pem.new means the key may already be the new one: roll forward. A lone
    certificate.key.new (the crash came before the chain was written) is dropped: the pair in
    place is still the old one."""
    cert_path, key_path = folder / CERTIFICATE_FILE, folder / KEY_FILE
    pending_cert, pending_key = _pending(cert_path), _pending(key_path)
    # (not possible, e.g. `relaygate audit` run as another user: the next writer completes it)
    with contextlib.suppress(OSError):
        if pending_cert.exists():
            with contextlib.suppress(FileNotFoundError):
                os.replace(pending_key, key_path)
            with contextlib.suppress(FileNotFoundError):
                os.replace(pending_cert, cert_path)
            _fsync_dir(folder)
        elif pending_key.exists():
            pending_key.unlink()


def read_refused(data_dir: Path) -> dict[str, Any] | None:
    """What ``refused.json`` says (check, detail, domains, at), if there is one to say."""
    try:
        doc = json.loads((Path(data_dir) / ACME_DIR / REFUSED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def read_names(data_dir: Path) -> set[str] | None:
    """The names the installed certificate was ordered for (None: not recorded, an older run)."""
    try:
        text = (Path(data_dir) / ACME_DIR / NAMES_FILE).read_text()
    except OSError:
        return None
    return {line.strip() for line in text.splitlines() if line.strip()}


def read_directory(data_dir: Path) -> str | None:
    """The directory URL the installed certificate came from (None: not recorded, an older run)."""
    try:
        return (Path(data_dir) / ACME_DIR / DIRECTORY_FILE).read_text().strip() or None
    except OSError:
        return None


def write_private(path: Path, data: bytes) -> None:
    """`data` into `path`, mode 0600, atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(folder: Path) -> None:
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
