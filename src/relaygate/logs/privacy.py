"""Address privacy in the protocol and message tracking logs (``server.log_address_privacy``).

``"none"`` (the default) writes addresses as they are. ``"mask"`` keeps the first character of the
local part and the domain: ``alice@corp.example`` → ``a***@corp.example``. ``"pseudonymize"``
replaces the local part by a keyed hash (HMAC-SHA256 of the lower-cased address, 12 hex digits):
``alice@corp.example`` → ``h-3f9a1c2b7d04@corp.example``, the same pseudonym for the same address
in every file, every worker and after restarts, so ``relaygate trace`` can look an address up by
pseudonymizing the query with the same key. The key (32 random bytes, hex) is created once, mode
0600, at ``<data_dir>/keys/log-privacy.key``.

The rewriting runs on the log writers' flush threads (``relaygate.logs.rotation``), never on the
event loop: with ``"none"`` the writers keep their plain formatters and nothing is done at all.
Message-IDs are not addresses and are kept (the tracking log's ``message-id`` and ``reference``
fields, and the ``<message-id> [InternalId=...]`` of the protocol log's ``250 2.6.0`` reply), so
``relaygate trace --message-id`` and log correlation keep working.
"""

from __future__ import annotations

import email.header
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from relaygate.file_modes import mode_granting

__all__ = [
    "KEY_PATH",
    "MODES",
    "AddressPrivacy",
    "PrivacyKeyError",
    "key_mode_warning",
    "load_key",
    "privacy_for",
]

MODES = ("none", "mask", "pseudonymize")
#: Relative to ``server.data_dir``.
KEY_PATH = Path("keys") / "log-privacy.key"
#: Hex digits of the HMAC kept in a pseudonym (48 bits).
PSEUDONYM_DIGITS = 12

# An address in free text: a quoted or unquoted local part, "@", a domain or an address literal.
# Runs of characters that cannot be in a local part (space, <, >, brackets, comma, ";", ":") end it,
# so "MAIL FROM:<alice@corp.example> SIZE=1" and "a@x;b@y" give the addresses alone. A message id
# followed by " [InternalId=" (the 250 2.6.0 reply) is kept as it is.
# A local part is tried only where one can begin (an unquoted one at the start of a run, a quoted one
# at a quote that is not escaped): tried from every character of a long run, each try running to
# its end, the search was quadratic (a 60,000-character word in a Subject held the GIL for 20 s).
_DELIMS = r"\s<>()\[\]\\,;:@\""
_ADDRESS = re.compile(
    rf"(?P<msgid><[^<>\s]*>)(?= \[InternalId=)"
    rf"|(?P<local>(?<!\\)\"(?:[^\"\\\r\n]|\\.)*\"|(?<![^{_DELIMS}])[^{_DELIMS}]+)"
    rf"@(?P<domain>\[[^\]\s]*\]|[^{_DELIMS}]+)"
    # a path without a domain ("RCPT TO:<john.smith>", a device set up without one: a 501)
    rf"|(?:(?<=:<)|(?<=: <))(?P<bare>[^<>@\s]+)(?=>)"
)
# An ESMTP parameter value in xtext (RFC 3461: ORCPT=rfc822;john+40corp.example, AUTH=...) or
# utf-8-addr-xtext (RFC 6533: ORCPT=utf-8;john\x{40}corp.example) whose "@" is encoded: the token
# after "=" or ";" holding the encoded "@". Tried only at a "=" or ";", each try within its token.
_XTEXT = re.compile(r"(?<=[=;])[^\s=;<>]*(?:\+40|\\x\{40\})[^\s=;<>]*")
_XTEXT_CHAR = re.compile(r"\+([0-9A-Fa-f]{2})|\\x\{([0-9A-Fa-f]{1,6})\}")
_KEY_TEXT = re.compile(r"^[0-9a-f]{64}$")
# A run of RFC 2047 encoded words (the white space between two of them is not part of the text).
# Matched here, not by email.header.decode_header on the whole value: its pattern is quadratic on
# a long run of unterminated "=?a?q? " (a 100 KB Subject: 17 s).
_WORD = r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?="
_ENCODED_WORDS = re.compile(rf"{_WORD}(?:\s+{_WORD})*")


def _decoded(m: re.Match[str]) -> str:
    try:
        parts = email.header.decode_header(m.group())
    except Exception:  # bad base64...: as it is
        return m.group()
    out = []
    for part, charset in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        try:
            out.append(part.decode(charset or "ascii", "replace"))
        except LookupError:  # a charset Python does not know: its ASCII is still readable
            out.append(part.decode("utf-8", "replace"))
    return "".join(out)


def _xtext_char(m: re.Match[str]) -> str:
    code = int(m.group(1) or m.group(2), 16)
    return chr(code) if code <= 0x10FFFF else m.group()


class PrivacyKeyError(Exception):
    """The pseudonymization key cannot be created or read (the message names the file and the
    key ``server.log_address_privacy``)."""


class AddressPrivacy:
    """Rewrites the addresses in log text as ``mode`` ("mask" or "pseudonymize") says."""

    __slots__ = ("_key", "_sub", "mode")

    def __init__(self, mode: str, key: bytes | None = None) -> None:
        if mode not in ("mask", "pseudonymize"):
            raise ValueError(f"log_address_privacy: no rewriting for {mode!r}")
        if mode == "pseudonymize" and not key:
            raise ValueError("log_address_privacy = pseudonymize needs a key")
        self.mode = mode
        self._key = key or b""
        self._sub = self._mask if mode == "mask" else self._pseudonym

    def text(self, value: str) -> str:
        """``value`` with every address in it rewritten (the rest unchanged): an address, a path
        after "FROM:" / "TO:", and an xtext-encoded address in an ESMTP parameter
        (``ORCPT=rfc822;john+40corp.example``, decoded to find it, written decoded and rewritten:
        ``ORCPT=rfc822;j***@corp.example``)."""
        if "@" in value or ":<" in value or ": <" in value:
            value = _ADDRESS.sub(self._sub, value)
        if "+40" in value or "\\x{40}" in value:
            value = _XTEXT.sub(self._xtext, value)
        return value

    def command(self, value: str) -> str:
        """``text`` for an SMTP command line (the protocol log's ``<`` lines): also the argument
        of ``VRFY john.smith`` / ``EXPN staff``, which names a person or a list even without a
        domain (only there: a subject that begins with "Vrfy " is no command)."""
        if value[4:5] != " " or value[:4].upper() not in ("VRFY", "EXPN"):
            return self.text(value)
        arg = value[5:].strip()
        if not arg:
            return value
        if "@" in arg or "+40" in arg or "\\x{40}" in arg:
            return value[:5] + self.text(arg)
        inner = arg[1:-1] if arg[:1] == "<" and arg[-1:] == ">" and len(arg) > 2 else None
        if inner is not None:
            return f"{value[:5]}<{self._bare(inner)}>"
        return value[:5] + self._bare(arg)

    def _bare(self, name: str) -> str:
        return f"{name[:1]}***" if self.mode == "mask" else self.pseudonym(name)

    def _xtext(self, m: re.Match[str]) -> str:
        token = m.group()
        decoded = _XTEXT_CHAR.sub(_xtext_char, token)
        rewritten = _ADDRESS.sub(self._sub, decoded) if "@" in decoded else decoded
        return rewritten if rewritten != decoded else token

    def header_text(self, value: str) -> str:
        """``text`` for a header's raw value (the tracking log's subject): RFC 2047 encoded words
        (``=?utf-8?b?...?=``, a subject with a non-ASCII character) can hold an address that
        ``text`` cannot see. A value whose decoded text has an address is returned decoded, with
        the addresses rewritten; any other as ``text`` returns it."""
        if "=?" in value:
            decoded = _ENCODED_WORDS.sub(_decoded, value)
            if decoded != value and "@" in decoded:
                rewritten = self.text(decoded)
                if rewritten != decoded:
                    return rewritten
        return self.text(value)

    def pseudonym(self, address: str) -> str:
        """The local part ``address``'s pseudonym has (``h-`` and 12 hex digits)."""
        # surrogateescape: a next hop's reply is read so (aiosmtplib), its bytes that are not
        # UTF-8 as lone surrogates; strict UTF-8 raised on the flush thread and lost the batch
        data = address.lower().encode("utf-8", "surrogateescape")
        digest = hmac.new(self._key, data, hashlib.sha256)
        return "h-" + digest.hexdigest()[:PSEUDONYM_DIGITS]

    @staticmethod
    def _mask(m: re.Match[str]) -> str:
        local = m.group("local")
        if local is None:
            bare = m.group("bare")
            return m.group("msgid") if bare is None else f"{bare[:1]}***"
        first = local[1:2] if local[:1] == '"' else local[:1]
        if first == '"':
            first = ""
        return f"{first}***@{m.group('domain')}"

    def _pseudonym(self, m: re.Match[str]) -> str:
        local = m.group("local")
        if local is None:
            bare = m.group("bare")
            return m.group("msgid") if bare is None else self.pseudonym(bare)
        domain = m.group("domain")
        return f"{self.pseudonym(f'{local}@{domain}')}@{domain}"


def load_key(data_dir: Path, *, create: bool) -> bytes:
    """The pseudonymization key of ``data_dir``; ``create``: make it first if there is none
    (atomically: several workers starting together all end up with the one that won)."""
    path = Path(data_dir) / KEY_PATH
    # os.path.exists: False on any error (Path.exists() raised PermissionError on a keys directory
    # the user cannot search, a traceback instead of the reason); creating then names it.
    if create and not os.path.exists(path):
        _create_key(path)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise PrivacyKeyError(
            f"server.log_address_privacy = pseudonymize: the key {path} does not exist "
            "(relaygate serve creates it when it starts with this setting)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise PrivacyKeyError(
            f"server.log_address_privacy = pseudonymize: cannot read the key {path}: {reason}"
        ) from None
    if not _KEY_TEXT.match(text):
        raise PrivacyKeyError(
            f"server.log_address_privacy = pseudonymize: the key {path} is not 64 "
            "hexadecimal digits"
        )
    return bytes.fromhex(text)


def _create_key(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process created meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        raise PrivacyKeyError(
            f"server.log_address_privacy = pseudonymize: cannot create the key {path}: "
            f"{exc.strerror or exc}"
        ) from None


def key_mode_warning(data_dir: Path) -> str | None:
    """A warning when the key file exists readable or writable by others than its owner (a key
    copied between cluster nodes with cp/scp keeps the copy's 0644): whoever reads it can link
    each pseudonym to its address by trying candidates. None when it is 0600 (or 0400), absent
    or cannot be examined (reading it says why, when it is used)."""
    path = Path(data_dir) / KEY_PATH
    mode = mode_granting(path, 0o177)
    if mode is None:
        return None
    return (
        f"the log privacy key {path} has mode {mode:04o}, broader than 0600: whoever can read it "
        f"can tell which address a pseudonym in the logs stands for; chmod 600 {path}"
    )


def privacy_for(mode: str, data_dir: Path, *, create_key: bool) -> AddressPrivacy | None:
    """The rewriting ``server.log_address_privacy = mode`` asks for (None for "none")."""
    if mode == "none":
        return None
    if mode == "mask":
        return AddressPrivacy("mask")
    return AddressPrivacy("pseudonymize", load_key(data_dir, create=create_key))
