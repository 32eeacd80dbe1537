"""DKIM key pairs: generation, safe storage under data_dir, and the DNS TXT record to publish.

Layout: ``<data_dir>/dkim/<domain>/<selector>.key`` (file 0600, directories 0700), PEM encoded:
RSA keys as PKCS#1 (``BEGIN RSA PRIVATE KEY``, what OpenDKIM and dkimpy read), Ed25519 keys as
PKCS#8 (``BEGIN PRIVATE KEY``). :func:`load_private_key` also reads the raw base64 Ed25519 seed
that dkimpy's ``dknewkey`` and rspamd write, so keys made by those tools can be reused.
"""

from __future__ import annotations

import base64
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from relaygate.durable_dirs import make_dirs_durably
from relaygate.file_modes import mode_granting

__all__ = [
    "ALGORITHMS",
    "RSA_BITS",
    "DkimKeyError",
    "LoadedKey",
    "dns_record",
    "generate_key",
    "key_file_mode_warning",
    "key_path",
    "key_size_warning",
    "load_any_key",
    "load_private_key",
    "public_key_b64",
    "record_name",
    "rsa_key_sizes",
    "split_txt",
    "write_key",
]

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
RSA_BITS = 2048
MIN_RSA_BITS_ADVISED = 2048  # RFC 8301 §3.2: signers SHOULD use at least 2048 bits ...
MAX_RSA_BITS_VERIFIED = 4096  # ... and verifiers MUST validate 1024 to 4096 bits
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class DkimKeyError(ValueError):
    """A key that cannot be generated, stored or loaded; the message is for the admin."""


@dataclass(frozen=True)
class LoadedKey:
    """A private key ready for dkimpy: ``dkimpy_key`` is what ``dkim.sign(privkey=...)`` takes."""

    algorithm: str
    dkimpy_key: bytes
    public_b64: str
    bits: int = 0  # an RSA key's size (0 for Ed25519)

    @property
    def record(self) -> str:
        return _record(self.algorithm, self.public_b64)


def _check_algorithm(algorithm: str) -> str:
    algorithm = algorithm.strip().lower()
    if algorithm not in ALGORITHMS:
        raise DkimKeyError(
            f"unknown DKIM algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}"
        )
    return algorithm


def _check_name(kind: str, value: str) -> str:
    value = value.strip().lower().rstrip(".")
    labels = value.split(".")
    if not value or not all(_LABEL.match(label) for label in labels):
        raise DkimKeyError(f"invalid DKIM {kind} {value!r}")
    if kind == "domain" and len(labels) < 2:
        raise DkimKeyError(f"invalid DKIM domain {value!r}: needs at least two labels")
    return value


def _record(algorithm: str, public_b64: str) -> str:
    k = "rsa" if algorithm == "rsa-sha256" else "ed25519"
    return f"v=DKIM1; k={k}; p={public_b64}"


def generate_key(algorithm: str = "rsa-sha256") -> tuple[bytes, str]:
    """A new key pair: ``(private_pem, public_record_value)`` (RSA 2048 or Ed25519)."""
    algorithm = _check_algorithm(algorithm)
    if algorithm == "rsa-sha256":
        key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey = rsa.generate_private_key(
            public_exponent=65537, key_size=RSA_BITS
        )
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    else:
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    return pem, dns_record(pem, algorithm)


def _parse_private(data: bytes, algorithm: str) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    algorithm = _check_algorithm(algorithm)
    stripped = data.strip()
    if algorithm == "ed25519-sha256" and not stripped.startswith(b"-----"):
        try:  # dkimpy/rspamd form: base64 of the 32-byte seed
            seed = base64.b64decode(stripped, validate=True)
            return ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        except ValueError as exc:
            raise DkimKeyError(f"not an Ed25519 private key: {exc}") from exc
    try:
        key = serialization.load_pem_private_key(stripped, password=None)
    except (ValueError, TypeError) as exc:
        raise DkimKeyError(f"not a PEM private key (or it is encrypted): {exc}") from exc
    if algorithm == "rsa-sha256":
        if not isinstance(key, rsa.RSAPrivateKey):
            raise DkimKeyError(
                f"algorithm rsa-sha256 needs an RSA key, the file holds {_kind(key)}"
            )
        if key.key_size < 1024:
            raise DkimKeyError(
                f"RSA key of {key.key_size} bits: receivers ignore DKIM keys under 1024 bits"
            )
        return key
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(
            f"algorithm ed25519-sha256 needs an Ed25519 key, the file holds {_kind(key)}"
        )
    return key


def _kind(key: object) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "an RSA key"
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "an Ed25519 key"
    return f"a {type(key).__name__}"


def public_key_b64(private_pem: bytes, algorithm: str) -> str:
    """The ``p=`` value: base64 SubjectPublicKeyInfo (RSA) or the raw 32-byte key (Ed25519)."""
    key = _parse_private(private_pem, algorithm)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        der = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    return base64.b64encode(der).decode("ascii")


def dns_record(private_pem: bytes, algorithm: str) -> str:
    """The TXT value to publish: ``v=DKIM1; k=rsa; p=...`` or ``v=DKIM1; k=ed25519; p=...``."""
    algorithm = _check_algorithm(algorithm)
    return _record(algorithm, public_key_b64(private_pem, algorithm))


def record_name(selector: str, domain: str) -> str:
    """``<selector>._domainkey.<domain>``."""
    return f"{_check_name('selector', selector)}._domainkey.{_check_name('domain', domain)}"


def split_txt(value: str, size: int = 255) -> list[str]:
    """The value as DNS character-strings of at most ``size`` bytes (BIND / zone-file form)."""
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]


def key_path(data_dir: Path, domain: str, selector: str) -> Path:
    """Where ``write_key`` puts the key for (domain, selector)."""
    domain = _check_name("domain", domain)
    selector = _check_name("selector", selector)
    return Path(data_dir) / "dkim" / domain / f"{selector}.key"


def write_key(
    data_dir: Path,
    domain: str,
    selector: str,
    algorithm: str = "rsa-sha256",
    *,
    force: bool = False,
) -> Path:
    """Generate a key and store it at ``<data_dir>/dkim/<domain>/<selector>.key`` (mode 0600).

    Refuses to replace an existing key unless ``force`` (a replaced key breaks every message in
    flight until DNS is updated). The file is created with 0600 from the start (never briefly
    world-readable) and written atomically with a rename. Written by root into a data_dir that
    another user owns (the relay's, as the systemd unit makes it), the key and its directories
    are given to that user: root's 0600 key there is one the relay cannot read.
    """
    algorithm = _check_algorithm(algorithm)
    path = key_path(data_dir, domain, selector)
    if path.exists() and not force:
        raise DkimKeyError(f"{path} already exists; use --force to replace it")
    owner = _relay_owner(Path(data_dir))
    # Their entries synced too: `dkim new` prints a record to publish for this key, which must
    # not vanish in a power cut with a new folder (the file and its own folder are synced below).
    make_dirs_durably(path.parent)
    for directory in (path.parent.parent, path.parent):
        os.chmod(directory, 0o700)  # empty so far: nothing was readable meanwhile
        if owner is not None:
            os.chown(directory, *owner)
    pem, _ = generate_key(algorithm)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        if owner is not None:
            os.fchown(fd, *owner)
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def _relay_owner(data_dir: Path) -> tuple[int, int] | None:
    """``(uid, gid)`` of ``data_dir`` when root writes into a data_dir another user owns, else
    None (a user writes keys as their own; root into its own or a new directory)."""
    if os.geteuid() != 0:
        return None
    try:
        st = data_dir.stat()
    except OSError:
        return None
    return None if st.st_uid == 0 else (st.st_uid, st.st_gid)


def load_private_key(path: Path, algorithm: str) -> LoadedKey:
    """Read a key file and convert it to what dkimpy signs with.

    Raises :class:`DkimKeyError` naming the file for a missing, unreadable or wrong-type key.
    """
    algorithm = _check_algorithm(algorithm)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DkimKeyError(f"cannot read DKIM key {path}: {exc.strerror or exc}") from exc
    try:
        key = _parse_private(data, algorithm)
    except DkimKeyError as exc:
        raise DkimKeyError(f"DKIM key {path}: {exc}") from exc
    if isinstance(key, rsa.RSAPrivateKey):
        dkimpy_key = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        seed = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        dkimpy_key = base64.b64encode(seed)
        der = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
    bits = key.key_size if isinstance(key, rsa.RSAPrivateKey) else 0
    return LoadedKey(algorithm, dkimpy_key, base64.b64encode(der).decode("ascii"), bits)


def key_size_warning(path: Path, loaded: LoadedKey) -> str | None:
    """A warning for an RSA key of a size RFC 8301 §3.2 advises against (it is used): under 2048
    bits (signers SHOULD use 2048 or more), or over 4096 (verifiers need only validate 1024 to
    4096 bits: a receiver may fail the signature). None otherwise."""
    if not loaded.bits or MIN_RSA_BITS_ADVISED <= loaded.bits <= MAX_RSA_BITS_VERIFIED:
        return None
    if loaded.bits < MIN_RSA_BITS_ADVISED:
        why = f"under the {MIN_RSA_BITS_ADVISED} bits RFC 8301 asks signers for"
    else:
        why = (
            f"over the {MAX_RSA_BITS_VERIFIED} bits every verifier must handle (RFC 8301): "
            "some receivers fail such a signature"
        )
    return (
        f"DKIM key {path} is an RSA key of {loaded.bits} bits, {why}; make a {RSA_BITS}-bit key "
        "with `relaygate dkim new` under a new selector"
    )


def rsa_key_sizes(config: Any) -> dict[int, int]:
    """The size in bits of each enabled rsa-sha256 ``[[dkim]]`` entry's key that can be read, by
    the entry's index: for the audit's key-size findings (a key that cannot be read is `check`'s
    and the service log's error, not repeated there). Blocking: file reads."""
    data_dir = Path(config.server.data_dir)
    sizes: dict[int, int] = {}
    for i, entry in enumerate(config.dkim):
        if not entry.enabled or entry.algorithm != "rsa-sha256":
            continue
        path = entry.key_file or key_path(data_dir, entry.domain, entry.selector)
        try:
            sizes[i] = load_private_key(Path(path), entry.algorithm).bits
        except (DkimKeyError, ValueError):
            continue
    return sizes


def key_file_mode_warning(path: Path, domain: str) -> str | None:
    """A warning when the key file is readable or writable by every local user (a copy keeps
    `cp`'s 0644): any of them can then sign mail as ``domain``. Group access is left alone (0640
    root:relaygate, the packaged layout). None otherwise, or when it cannot be examined."""
    mode = mode_granting(path, 0o007)
    if mode is None:
        return None
    return (
        f"DKIM key {path} has mode {mode:04o}: every local user can read the private key and "
        f"sign mail as {domain}; chmod o-rwx {path}"
    )


def load_any_key(path: Path) -> LoadedKey:
    """Load a key file whose algorithm is not known (keys found under data_dir)."""
    errors = []
    for algorithm in ALGORITHMS:
        try:
            return load_private_key(path, algorithm)
        except DkimKeyError as exc:
            errors.append(str(exc))
    raise DkimKeyError(
        errors[0]
        if "cannot read" in errors[0]
        else f"DKIM key {path}: not an RSA or Ed25519 private key"
    )
