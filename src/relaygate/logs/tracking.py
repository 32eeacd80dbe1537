"""Message tracking log in the Exchange format (reference/exchange-semantics.md §6.3), and its reader.

Files ``MSGTRK<yyyymmddHH>-<n>.LOG`` under ``<data_dir>/logs/MessageTracking``; the writer queues
records and a background thread writes them (see ``relaygate.logs.rotation``). ``search()`` reads the
files back (ours or Exchange's own: columns are mapped through each file's ``#Fields`` line) for
``relaygate trace``, the admin centre and tests.
"""

from __future__ import annotations

import csv
import heapq
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from relaygate.logs.privacy import AddressPrivacy
from relaygate.logs.protocol import escape_controls
from relaygate.logs.rotation import (
    HEADER_DATE_PLACEHOLDER,
    LogDirectory,
    csv_field,
    format_timestamp,
    parse_log_file_name,
)

__all__ = [
    "DEFAULT_MAX_AGE",
    "DEFAULT_MAX_DIRECTORY_SIZE",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_SEARCH_LIMIT",
    "EVENT_IDS",
    "MESSAGE_TRACKING_DIR",
    "TRACKING_FIELDS",
    "TrackingLog",
    "parse_datetime",
    "search",
]

#: Relative to ``server.data_dir``.
MESSAGE_TRACKING_DIR = Path("logs") / "MessageTracking"

DEFAULT_MAX_FILE_SIZE = 10 * 1024 * 1024
DEFAULT_MAX_DIRECTORY_SIZE = 1000 * 1024 * 1024
DEFAULT_MAX_AGE = timedelta(days=30)
#: Get-MessageTrackingLog's default -ResultSize.
DEFAULT_SEARCH_LIMIT = 1000

TRACKING_FIELDS = (
    "date-time",
    "client-ip",
    "client-hostname",
    "server-ip",
    "server-hostname",
    "source-context",
    "connector-id",
    "source",
    "event-id",
    "internal-message-id",
    "message-id",
    "network-message-id",
    "recipient-address",
    "recipient-status",
    "total-bytes",
    "recipient-count",
    "related-recipient-address",
    "reference",
    "message-subject",
    "sender-address",
    "return-path",
    "message-info",
    "directionality",
    "tenant-id",
    "original-client-ip",
    "original-server-ip",
    "custom-data",
    "transport-traffic-type",
    "log-id",
    "schema-version",
)
#: The event ids `relaygate trace --event-id` takes (Exchange's for a relay; AGENTINFO: DKIM;
#: POISONMESSAGE: a message suspended because its stored bytes are damaged).
EVENT_IDS = (
    "RECEIVE",
    "SEND",
    "DEFER",
    "FAIL",
    "DSN",
    "AGENTINFO",
    "EXPAND",
    "SUBMIT",
    "DROP",
    "POISONMESSAGE",
)
SOFTWARE = "Microsoft Exchange Server"
VERSION = "15.0.0.0"
SCHEMA_VERSION = "15.0.0.0"

#: Fields returned by ``search()`` as lists (``;``-separated in the file) and as integers.
LIST_FIELDS = ("recipient-address", "recipient-status", "reference")
# A ";" that separates two values: one followed by a blank is part of a value, as in the status
# "550 4.3.2 QUEUE.Admin; message deleted by administrative action" (Exchange's own replies,
# QUEUE.Expired, ROUTING.NoNextHop..., and many a next hop's read so); the writer joins the
# values with a bare ";".
_VALUE_SEPARATOR = re.compile(r";(?!\s)")
# A bare ";" inside a value (a next hop's "550 x;y", a quoted local part "a;b"@x) would read as a
# separator: the writer writes it "%3B" (one a reader of Exchange's files shows as it is, never
# splits on), and a "%" that would read as the start of such an escape ("%3B", "%25") "%25".
_ESCAPED_IN_VALUE = re.compile(r"%(?=25|3[Bb])|;(?!\s)")
_ESCAPE = {"%": "%25", ";": "%3B"}
_ESCAPE_IN_VALUE = re.compile(r"%(25|3[Bb])")
_UNESCAPE = {"25": "%", "3B": ";", "3b": ";"}
INT_FIELDS = ("total-bytes", "recipient-count")


def _format_line(record: tuple) -> str:
    # (ts, values of every field after date-time except log-id and schema-version). Runs on the
    # flush thread. Sender, Message-ID, subject and HELO come from the client: control characters
    # are written as \xNN, as in the protocol log (one isprintable() per field when there is none).
    q, esc = csv_field, escape_controls
    return f"{format_timestamp(record[0])},{','.join([q(esc(v)) for v in record[1]])},{uuid.uuid4()},{SCHEMA_VERSION}"


# Positions in a record's values (TRACKING_FIELDS without date-time, log-id and schema-version).
_SUBJECT = TRACKING_FIELDS.index("message-subject") - 1
#: The fields whose addresses server.log_address_privacy rewrites: every field that holds an
#: envelope or header address, or text that can quote one (the HELO name, replies, the subject,
#: agent notes). Message-IDs (message-id, network-message-id, reference) are not addresses.
PRIVATE_FIELDS = (
    "client-hostname",
    "recipient-address",
    "recipient-status",
    "related-recipient-address",
    "message-subject",
    "sender-address",
    "return-path",
    "message-info",
    "custom-data",
)
_PRIVATE = tuple(TRACKING_FIELDS.index(f) - 1 for f in PRIVATE_FIELDS)


def _formatter(privacy: AddressPrivacy | None, subject_logging: bool) -> Callable[[tuple], str]:
    """The line formatter for the privacy settings: ``_format_line`` itself when there are none."""
    if privacy is None and subject_logging:
        return _format_line
    text = privacy.text if privacy is not None else None
    header_text = privacy.header_text if privacy is not None else None

    def format_line(record: tuple) -> str:
        values = list(record[1])
        if not subject_logging:
            values[_SUBJECT] = ""
        if text is not None and header_text is not None:
            for i in _PRIVATE:
                values[i] = header_text(values[i]) if i == _SUBJECT else text(values[i])
        return _format_line((record[0], values))

    return format_line


def _escape_value(value: str) -> str:
    """One value of a multi-value field, its bare ";" and ambiguous "%" escaped (see above)."""
    if ";" not in value and "%" not in value:  # the usual value: no regex run
        return value
    return _ESCAPED_IN_VALUE.sub(lambda m: _ESCAPE[m.group()], value)


def _unescape_value(value: str) -> str:
    if "%" not in value:
        return value
    return _ESCAPE_IN_VALUE.sub(lambda m: _UNESCAPE[m.group(1)], value)


def _join(values: str | Iterable[str]) -> str:
    """A multi-value field: a str is taken as already joined; each value of a list is escaped."""
    if isinstance(values, str):
        return values
    return ";".join([_escape_value(v) for v in values])


def split_values(field: str) -> list[str]:
    """The values of a multi-value field as ``_join`` wrote them (empty ones left out)."""
    if not field:
        return []
    return [_unescape_value(v) for v in _VALUE_SEPARATOR.split(field) if v]


class TrackingLog:
    """Writer of ``MSGTRK`` files. ``write()`` is cheap and safe from any thread or the event loop."""

    def __init__(
        self,
        directory: Path,
        *,
        server_name: str,
        server_ip: str = "",
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
        max_directory_size: int = DEFAULT_MAX_DIRECTORY_SIZE,
        max_age: timedelta = DEFAULT_MAX_AGE,
        flush_interval: float = 0.2,
        privacy: AddressPrivacy | None = None,
        subject_logging: bool = True,
    ) -> None:
        self.server_name = server_name
        self.server_ip = server_ip
        #: whether events carry the subject: a caller that has to parse it for an event can skip
        #: the work when they do not
        self.subject_logging = subject_logging
        headers = [
            f"#Software: {SOFTWARE}",
            f"#Version: {VERSION}",
            "#Log-type: Message Tracking Log",
            f"#Date: {HEADER_DATE_PLACEHOLDER}",
            "#Fields: " + ",".join(TRACKING_FIELDS),
        ]
        self.directory = LogDirectory(
            Path(directory),
            "MSGTRK",
            headers,
            max_file_size,
            max_directory_size,
            max_age,
            formatter=_formatter(privacy, subject_logging),
            flush_interval=flush_interval,
        )

    @property
    def path(self) -> Path:
        return self.directory.path

    def set_privacy(self, privacy: AddressPrivacy | None, subject_logging: bool) -> None:
        """``server.log_address_privacy`` / ``message_tracking_log_subject_logging_enabled``
        changed (a reload): events logged from now on follow them."""
        self.subject_logging = subject_logging
        self.directory.set_formatter(_formatter(privacy, subject_logging))

    def write(
        self,
        event_id: str,
        source: str,
        *,
        internal_message_id: str | int = "",
        message_id: str = "",
        network_message_id: str = "",
        recipients: Sequence[str] = (),
        recipient_status: Sequence[str] = (),
        sender: str = "",
        total_bytes: int = 0,
        client_ip: str = "",
        client_hostname: str = "",
        server_ip: str | None = None,
        server_hostname: str | None = None,
        connector_id: str = "",
        source_context: str = "",
        reference: str | Sequence[str] = "",
        message_subject: str = "",
        return_path: str = "",
        message_info: str = "",
        related_recipient_address: str = "",
        directionality: str = "Originating",
        custom_data: str = "",
        original_client_ip: str = "",
        original_server_ip: str = "",
        timestamp: datetime | float | None = None,
    ) -> None:
        """Queue one tracking event. ``server_ip``/``server_hostname`` default to this server's
        (pass the remote host's for SEND). ``timestamp`` defaults to now."""
        if timestamp is None:
            ts = time.time()
        elif isinstance(timestamp, datetime):
            ts = timestamp.timestamp()
        else:
            ts = float(timestamp)
        values = (
            client_ip,
            client_hostname,
            self.server_ip if server_ip is None else server_ip,
            self.server_name if server_hostname is None else server_hostname,
            source_context,
            connector_id,
            source,
            event_id,
            str(internal_message_id),
            message_id,
            network_message_id,
            _join(recipients),
            _join(recipient_status),
            str(total_bytes),
            str(len(recipients) if not isinstance(recipients, str) else int(bool(recipients))),
            related_recipient_address,
            _join(reference),
            message_subject,
            sender,
            return_path,
            message_info,
            directionality,
            "",  # tenant-id
            original_client_ip,
            original_server_ip,
            custom_data,
            "",  # transport-traffic-type
            # log-id and schema-version are added by _format_line on the flush thread
        )
        self.directory.append((ts, values))

    def flush(self) -> None:
        self.directory.flush()

    def close(self) -> None:
        self.directory.close()

    def __enter__(self) -> TrackingLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------- reader
def parse_datetime(value: str) -> datetime | None:
    """Parse a log ``date-time`` (``2023-01-11T15:59:51.433Z``) into an aware UTC datetime."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _norm_msgid(value: str) -> str:
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        value = value[1:-1]
    return value.lower()


def _tracking_files(directory: Path) -> list[tuple[datetime | None, timedelta, int, Path]]:
    files: list[tuple[datetime | None, timedelta, int, Path]] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for e in entries:
        upper = e.name.upper()
        if not upper.startswith("MSGTRK") or not upper.endswith(".LOG"):
            continue
        parsed = parse_log_file_name(e.name)
        if parsed is None:
            files.append((None, timedelta(0), 0, Path(e.path)))
        else:
            files.append((parsed.start, parsed.period, parsed.number, Path(e.path)))
    oldest = datetime.min.replace(tzinfo=UTC)
    files.sort(key=lambda f: (f[0] or oldest, f[2], f[3].name))
    return files


# The csv module refuses a field over 128 KiB by default; a sender's Subject can be longer (a
# folded header has no length limit), and its row must be read like any other.
_FIELD_SIZE_LIMIT = 2**31 - 1


def _read_rows(path: Path) -> Iterable[dict[str, str]]:
    if csv.field_size_limit() < _FIELD_SIZE_LIMIT:
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
    fields: list[str] = list(TRACKING_FIELDS)
    try:
        fh = open(path, encoding="utf-8", errors="replace", newline="")  # noqa: SIM115
    except OSError:
        return
    with fh:
        body: list[str] = []
        for line in fh:
            if line.startswith("#"):
                if line.startswith("#Fields:"):
                    fields = [f.strip() for f in line[len("#Fields:") :].strip().split(",")]
                continue
            body.append(line)
    reader = csv.reader(body)
    n = len(fields)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            # Damage on this line (our lines hold no raw line break: one row a line): the rows
            # after it are still read, as a bad row must not hide the events that follow it.
            continue
        if len(row) != n:  # partial last line of the file being written
            continue
        yield dict(zip(fields, row, strict=True))


def _to_result(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = dict(row)
    for key in LIST_FIELDS:
        if key in out:
            out[key] = split_values(out[key])
    for key in INT_FIELDS:
        if key in out:
            try:
                out[key] = int(out[key]) if out[key] else 0
            except ValueError:
                pass
    return out


def _wanted(address: str | None, privacy: AddressPrivacy | None) -> frozenset[str] | None:
    """The forms of a searched ``address`` that a row may hold, lower-cased. It may be given as a
    MAIL FROM writes it, in angle brackets; ``<>`` or "" is the null sender (reports), which the
    log writes as an empty field."""
    if address is None:
        return None
    address = address.strip()
    if address[:1] == "<" and address[-1:] == ">":
        address = address[1:-1].strip()
    forms = {address.lower()}
    if privacy is not None and address:
        forms.add(privacy.text(address).lower())
    return frozenset(forms)


def search(
    directory: Path,
    *,
    sender: str | None = None,
    recipient: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    message_id: str | None = None,
    event_id: str | None = None,
    limit: int | None = DEFAULT_SEARCH_LIMIT,
    privacy: AddressPrivacy | None = None,
) -> list[dict[str, Any]]:
    """Tracking events matching every given filter, oldest first.

    Addresses and message ids (either with or without ``<>``; a ``sender`` of ``<>`` or "" is the
    null sender) and event ids compare case-insensitively;
    ``recipient`` matches any address of a multi-recipient event. Naive datetimes are UTC.
    With more than ``limit`` matches the most recent ``limit`` are returned.
    Keys are the field names of the file (``date-time``, ``sender-address`` ...);
    ``recipient-address``, ``recipient-status`` and ``reference`` are lists, ``total-bytes`` and
    ``recipient-count`` integers.
    ``privacy``: the logs' ``server.log_address_privacy``; ``sender`` and ``recipient`` then also
    match their masked or pseudonymized form (and still their own, for lines written before).
    """
    since = _aware(since)
    until = _aware(until)
    sender_l = _wanted(sender, privacy)
    recipient_l = _wanted(recipient, privacy)
    msgid_l = _norm_msgid(message_id) if message_id else None
    event_u = event_id.upper() if event_id else None

    matches = _MostRecent(limit)
    for start, period, _n, path in _tracking_files(Path(directory)):
        # A file covers one hour (one day for 2010-style names); skip it when outside the window.
        # Files only roll forward, so a file can start with lines a few ms older than its hour:
        # a minute of slack on both sides.
        if start is not None:
            if until is not None and start - timedelta(minutes=1) > until:
                continue
            if since is not None and start + period + timedelta(minutes=1) < since:
                continue
        for row in _read_rows(path):
            if event_u is not None and row.get("event-id", "").upper() != event_u:
                continue
            if sender_l is not None and row.get("sender-address", "").lower() not in sender_l:
                continue
            if recipient_l is not None and recipient_l.isdisjoint(
                r.lower() for r in split_values(row.get("recipient-address", ""))
            ):
                continue
            if msgid_l is not None and _norm_msgid(row.get("message-id", "")) != msgid_l:
                continue
            when = parse_datetime(row.get("date-time", ""))
            if when is None:
                continue
            if since is not None and when < since:
                continue
            if until is not None and when > until:
                continue
            matches.add(when, row)
    return [_to_result(row) for row in matches.oldest_first()]


class _MostRecent:
    """The ``limit`` most recent of the rows added (all with None), kept as they come: a search
    of a full directory (1000 MB, millions of events) held every match in memory before it cut
    them to the few it returns (gigabytes for an unfiltered `relaygate trace`)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit if limit is not None and limit >= 0 else None
        # (when, order, row); the order (unique) breaks ties, in reading order, and keeps two
        # rows from ever being compared. A heap (oldest first) while a limit applies.
        self.rows: list[tuple[datetime, int, dict[str, str]]] = []
        self.count = 0

    def add(self, when: datetime, row: dict[str, str]) -> None:
        entry = (when, self.count, row)
        self.count += 1
        if self.limit is None:
            self.rows.append(entry)
        elif len(self.rows) < self.limit:
            heapq.heappush(self.rows, entry)
        elif self.limit and entry[:2] > self.rows[0][:2]:
            heapq.heapreplace(self.rows, entry)

    def oldest_first(self) -> list[dict[str, str]]:
        return [entry[2] for entry in sorted(self.rows, key=lambda e: (e[0], e[1]))]
