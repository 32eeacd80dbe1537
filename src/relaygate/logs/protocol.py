"""SMTP receive (and send) protocol log in the Exchange 2013+ format (reference/exchange-semantics.md §6).

One ``ProtocolLog`` per transport service: every receive connector with
``protocol_logging_level = "Verbose"`` shares one set of ``RECV<yyyymmddHH>-<n>.LOG`` files under
``<data_dir>/logs/ProtocolLog/SmtpReceive``. The server asks for one ``SessionLog`` per connection::

    log = ProtocolLog(data_dir / PROTOCOL_LOG_RECEIVE_DIR, server_name="RELAY01")
    s = log.session("SMTP Relay Internal", ("10.0.0.5", 25), ("10.0.0.77", 50123))
    s.connect()
    s.sent("220 relay.corp.example Microsoft ESMTP MAIL Service ready at ...")
    s.received("EHLO printer")
    s.log_ehlo_reply(["relay.corp.example Hello [10.0.0.77]", "SIZE 37748736", "PIPELINING"])
    s.disconnect("Remote")

Connectors with ``protocol_logging_level = "None"`` get ``NULL_SESSION_LOG`` (or a ``NullSessionLog``)
whose methods do nothing. The ``SessionLog`` methods only take the time and queue a small tuple; the
CSV line is built on the log's flush thread.

Lines::

    date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,event,data,context
    2023-01-11T15:59:51.433Z,RELAY01\\SMTP Relay Internal,08D892B7A9441226,0,10.0.0.5:25,10.0.0.77:50123,+,,

Message bodies are never logged; AUTH payloads are replaced by ``<authentication response>``.
With ``server.log_address_privacy`` set, the addresses in the data and context fields are masked or
pseudonymized on the flush thread (``relaygate.logs.privacy``).
Control characters in the data and context fields (C0 with CR and LF, DEL, C1) are written as
``\\xNN``: a client's command can neither start a forged line nor carry terminal escapes.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from relaygate.logs.privacy import AddressPrivacy
from relaygate.logs.rotation import (
    HEADER_DATE_PLACEHOLDER,
    LogDirectory,
    csv_field,
    format_timestamp,
)

__all__ = [
    "AUTH_MASK",
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_DIRECTORY_SIZE",
    "DEFAULT_MAX_FILE_SIZE",
    "NULL_SESSION_LOG",
    "PROTOCOL_LOG_FIELDS",
    "PROTOCOL_LOG_RECEIVE_DIR",
    "PROTOCOL_LOG_SEND_DIR",
    "NullSessionLog",
    "ProtocolLog",
    "SessionLog",
    "escape_controls",
    "format_endpoint",
    "new_session_id",
]

#: Relative to ``server.data_dir``.
PROTOCOL_LOG_RECEIVE_DIR = Path("logs") / "ProtocolLog" / "SmtpReceive"
PROTOCOL_LOG_SEND_DIR = Path("logs") / "ProtocolLog" / "SmtpSend"

# Set-TransportService / Set-FrontendTransportService defaults (§6.1).
DEFAULT_MAX_FILE_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_DIRECTORY_SIZE = 250 * 1024 * 1024
DEFAULT_MAX_AGE = timedelta(days=30)

PROTOCOL_LOG_FIELDS = (
    "date-time",
    "connector-id",
    "session-id",
    "sequence-number",
    "local-endpoint",
    "remote-endpoint",
    "event",
    "data",
    "context",
)
SOFTWARE = "Microsoft Exchange Server"
VERSION = "15.0.0.0"
AUTH_MASK = "<authentication response>"

# Session ids look like Exchange's: a 64-bit .NET tick count (100 ns since 0001-01-01) taken when the
# process starts, incremented per session. Unique within the process and, since ticks run at 10 MHz,
# across restarts. next() on itertools.count is atomic under the GIL.
_DOTNET_EPOCH_OFFSET = 621_355_968_000_000_000  # ticks between 0001-01-01 and 1970-01-01
_session_counter = itertools.count(_DOTNET_EPOCH_OFFSET + time.time_ns() // 100)


def use_session_id_stride(index: int, count: int) -> None:
    """Worker ``index`` of ``count`` processes: take only the ids ≡ index (mod count) from here on,
    so that workers started in the same tick range never hand out the same session id."""
    global _session_counter
    if count <= 1:
        return
    start = _DOTNET_EPOCH_OFFSET + time.time_ns() // 100
    _session_counter = itertools.count(start - start % count + count + index, count)


def new_session_id() -> str:
    """16 upper-case hex digits, e.g. ``08DB33F1A2C4D5E6``."""
    return f"{next(_session_counter) & 0xFFFF_FFFF_FFFF_FFFF:016X}"


def format_endpoint(endpoint: tuple[str, int] | tuple[str, int, int, int] | None) -> str:
    """``ip:port``; IPv6 without brackets (as Exchange writes it), IPv4-mapped IPv6 as plain IPv4."""
    if not endpoint:
        return ""
    host = str(endpoint[0])
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if host[:7].lower() == "::ffff:" and "." in host:
        host = host[7:]
    return f"{host}:{endpoint[1]}"


# C0 controls (CR and LF too), DEL and C1 controls: what a client could use to forge log lines or
# drive the terminal of whoever reads the log (security-bar 152).
_CONTROL_ESCAPES = {i: f"\\x{i:02x}" for i in (*range(0x20), *range(0x7F, 0xA0))}


def escape_controls(text: str) -> str:
    """`text` with its C0, DEL and C1 control characters written as ``\\xNN``.

    One C-level ``isprintable()`` pass for the usual line (every character printable, as
    ``isprintable`` has it); only a line holding something else is translated."""
    if text.isprintable():
        return text
    return text.translate(_CONTROL_ESCAPES)


def _format_line(record: tuple) -> str:
    # (ts, head, seq, tail, event, data, context); head/tail are precomputed per session. Runs on
    # the flush thread, off the event loop. The data and context can hold the client's bytes.
    return (
        f"{format_timestamp(record[0])}{record[1]}{record[2]}{record[3]}{record[4]},"
        f"{csv_field(escape_controls(record[5]))},{csv_field(escape_controls(record[6]))}"
    )


def _private_formatter(privacy: AddressPrivacy) -> Callable[[tuple], str]:
    """``_format_line`` with the addresses in the data and context fields rewritten
    (``server.log_address_privacy``); on the flush thread too."""
    text = privacy.text
    command = privacy.command

    def format_line(record: tuple) -> str:
        data = command(record[5]) if record[4] == "<" else text(record[5])
        return (
            f"{format_timestamp(record[0])}{record[1]}{record[2]}{record[3]}{record[4]},"
            f"{csv_field(escape_controls(data))},"
            f"{csv_field(escape_controls(text(record[6])))}"
        )

    return format_line


class SessionLog:
    """The protocol log lines of one SMTP session. Cheap to call from the event loop."""

    __slots__ = ("_append", "_head", "_seq", "_tail", "connector_id", "session_id")

    def __init__(
        self,
        directory: LogDirectory,
        connector_id: str,
        local: tuple[str, int] | None,
        remote: tuple[str, int] | None,
        session_id: str | None = None,
    ) -> None:
        self.session_id = session_id or new_session_id()
        self.connector_id = connector_id
        self._append = directory.append
        self._head = f",{csv_field(connector_id)},{self.session_id},"
        self._tail = f",{csv_field(format_endpoint(local))},{csv_field(format_endpoint(remote))},"
        self._seq = 0

    # The hot methods inline the work of _log (one Python call less per protocol line).
    def _log(self, event: str, data: str, context: str) -> None:
        seq = self._seq
        self._seq = seq + 1
        self._append((time.time(), self._head, seq, self._tail, event, data, context))

    def connect(self) -> None:
        """``+`` line (sequence number 0)."""
        self._log("+", "", "")

    def sent(self, text: str) -> None:
        """``>`` line: a reply sent by the server (one line; see ``log_ehlo_reply`` for EHLO)."""
        seq = self._seq
        self._seq = seq + 1
        self._append((time.time(), self._head, seq, self._tail, ">", text, ""))

    def received(self, text: str) -> None:
        """``<`` line: a command from the client. An AUTH initial response is masked, whatever
        blank follows the verb ("AUTH<TAB>PLAIN ..." is refused, but its credentials are real)."""
        if text[:1] in "Aa" and text[:4].upper() == "AUTH" and text[4:5].isspace():
            text = _mask_auth_command(text)
        seq = self._seq
        self._seq = seq + 1
        self._append((time.time(), self._head, seq, self._tail, "<", text, ""))

    def received_auth_blob(self) -> None:
        """``<`` line for a SASL response line from the client, never its content."""
        self._log("<", AUTH_MASK, "")

    def sent_auth_challenge(self) -> None:
        """``>`` line for a ``334`` challenge: ``334 <authentication response>``."""
        self._log(">", "334 " + AUTH_MASK, "")

    def info(self, data: str, context: str = "") -> None:
        """``*`` line, e.g. ``info(perms, "Set Session Permissions")``."""
        seq = self._seq
        self._seq = seq + 1
        self._append((time.time(), self._head, seq, self._tail, "*", data, context))

    def disconnect(self, context: str = "Local") -> None:
        """``-`` line; context ``Local`` (server closed) or ``Remote`` (client closed)."""
        self._log("-", "", context)

    def log_ehlo_reply(self, lines: Iterable[str]) -> None:
        """A multi-line EHLO reply as one ``>`` line: ``250  fqdn Hello [ip] SIZE n PIPELINING ...``.

        ``lines`` may carry their reply codes (``250-SIZE 37748736`` / ``250 STARTTLS``) or not."""
        code = "250"
        parts: list[str] = []
        for line in lines:
            if len(line) >= 4 and line[:3].isdigit() and line[3] in "- ":
                code = line[:3]
                line = line[4:]
            elif len(line) == 3 and line.isdigit():
                code, line = line, ""
            parts.append(line)
        self._log(">", f"{code}  {' '.join(parts)}", "")


def _mask_auth_command(text: str) -> str:
    parts = text.split(None, 2)
    if len(parts) <= 2:  # "AUTH LOGIN": no initial response to hide
        return text
    return f"{parts[0]} {parts[1]} {AUTH_MASK}"


class NullSessionLog:
    """Same interface as ``SessionLog``; every method does nothing (``protocol_logging_level = None``)."""

    __slots__ = ("_session_id", "connector_id")

    def __init__(self, connector_id: str = "", session_id: str | None = None) -> None:
        self.connector_id = connector_id
        self._session_id = session_id

    @property
    def session_id(self) -> str:
        # Generated only if someone asks (e.g. to correlate with message tracking).
        if self._session_id is None:
            self._session_id = new_session_id()
        return self._session_id

    def connect(self) -> None:
        pass

    def sent(self, text: str) -> None:
        pass

    def received(self, text: str) -> None:
        pass

    def received_auth_blob(self) -> None:
        pass

    def sent_auth_challenge(self) -> None:
        pass

    def info(self, data: str, context: str = "") -> None:
        pass

    def disconnect(self, context: str = "Local") -> None:
        pass

    def log_ehlo_reply(self, lines: Iterable[str]) -> None:
        pass


#: A shared do-nothing session log (its ``session_id`` is fixed once generated; make a
#: ``NullSessionLog()`` per session if ids matter).
NULL_SESSION_LOG = NullSessionLog()


class ProtocolLog:
    """The shared protocol log of all receive connectors (or, with ``send=True``, send connectors)."""

    def __init__(
        self,
        directory: Path,
        *,
        server_name: str,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_directory_size: int = DEFAULT_MAX_DIRECTORY_SIZE,
        max_age: timedelta = DEFAULT_MAX_AGE,
        send: bool = False,
        flush_interval: float = 0.2,
        privacy: AddressPrivacy | None = None,
    ) -> None:
        self.server_name = server_name
        self.send = send
        log_type = "SMTP Send Protocol Log" if send else "SMTP Receive Protocol Log"
        headers = [
            f"#Software: {SOFTWARE}",
            f"#Version: {VERSION}",
            f"#Log-type: {log_type}",
            f"#Date: {HEADER_DATE_PLACEHOLDER}",
            "#Fields: " + ",".join(PROTOCOL_LOG_FIELDS),
        ]
        self.directory = LogDirectory(
            Path(directory),
            "SEND" if send else "RECV",
            headers,
            max_file_size,
            max_directory_size,
            max_age,
            formatter=_format_line if privacy is None else _private_formatter(privacy),
            flush_interval=flush_interval,
        )

    @property
    def path(self) -> Path:
        return self.directory.path

    def set_privacy(self, privacy: AddressPrivacy | None) -> None:
        """``server.log_address_privacy`` changed (a reload): lines logged from now on follow it."""
        self.directory.set_formatter(
            _format_line if privacy is None else _private_formatter(privacy)
        )

    def connector_id(self, connector_name: str) -> str:
        """``SERVER\\Connector`` for receive logs; the bare connector name for send logs."""
        if self.send or not self.server_name:
            return connector_name
        return f"{self.server_name}\\{connector_name}"

    def session(
        self,
        connector_name: str,
        local: tuple[str, int] | None,
        remote: tuple[str, int] | None,
        session_id: str | None = None,
    ) -> SessionLog:
        return SessionLog(
            self.directory, self.connector_id(connector_name), local, remote, session_id
        )

    def flush(self) -> None:
        """Write what is queued (blocking; not for the event loop's hot path)."""
        self.directory.flush()

    def close(self) -> None:
        self.directory.close()

    def __enter__(self) -> ProtocolLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def receiving_message_info(
    session_id: str, message_number: int, when: datetime | None = None
) -> str:
    """The data of the ``*`` line Exchange writes at DATA: ``<session-id>;<date-time>;<n>``
    (use with context ``receiving message``)."""
    ts = (when or datetime.now(UTC)).timestamp()
    return f"{session_id};{format_timestamp(ts)};{message_number}"
