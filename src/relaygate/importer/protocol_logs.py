"""Exchange SMTP receive protocol logs (RECV*.LOG) → who really uses each connector.

Reads the CSV files of reference/exchange-semantics.md §6 (the `#Fields:` header decides the column
order) and counts, per connector (`SERVER\\Name`) and client IP: sessions, messages accepted
(`250 2.6.0 ... Queued mail for delivery`), accepted recipients per domain (so relaying, i.e. accepted
RCPTs outside the accepted domains, shows), refused relay attempts and first/last seen. Replies are paired
with the commands they answer in order, which is how the log records a pipelined session too.

`propose_ranges` turns the senders into the narrowest RemoteIPRanges that cover exactly them. RelayGate
writes the same log format, so its own logs can be analysed the same way.
"""

from __future__ import annotations

import csv
import io
import ipaddress
import os
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relaygate.logs.protocol import PROTOCOL_LOG_FIELDS

__all__ = [
    "ClientUsage",
    "ConnectorUsage",
    "UsageReport",
    "analyze_protocol_logs",
    "expand_log_paths",
    "is_receive_protocol_log",
    "propose_ranges",
]

# The same columns RelayGate writes: Exchange's receive protocol log (§6.2).
DEFAULT_FIELDS = PROTOCOL_LOG_FIELDS
_RCPT = re.compile(r"^RCPT\s+TO:\s*<([^>]*)>", re.IGNORECASE)
_RELAY_DENIED = re.compile(r"^5\d\d[ -]5\.7\.(1|54)\b.*relay", re.IGNORECASE)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass
class ClientUsage:
    """One client IP on one connector."""

    ip: str
    sessions: int = 0
    messages: int = 0
    recipient_domains: dict[str, int] = field(default_factory=dict)  # accepted RCPTs per domain
    relay_denied: int = 0
    first_seen: str = ""
    last_seen: str = ""

    @property
    def recipients(self) -> int:
        return sum(self.recipient_domains.values())

    def relayed(self, accepted_domains: list[str]) -> int | None:
        """Accepted RCPTs to domains outside `accepted_domains`; None when no domain list is known."""
        if not accepted_domains:
            return None
        return sum(
            n for d, n in self.recipient_domains.items() if not domain_accepted(d, accepted_domains)
        )

    def to_dict(self, accepted_domains: list[str]) -> dict[str, Any]:
        relayed = self.relayed(accepted_domains)
        return {
            "ip": self.ip,
            "sessions": self.sessions,
            "messages": self.messages,
            "recipients": self.recipients,
            "recipient_domains": dict(sorted(self.recipient_domains.items())),
            "relayed_recipients": relayed,
            "relayed": None if relayed is None else relayed > 0,
            "relay_denied": self.relay_denied,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }


@dataclass
class ConnectorUsage:
    """One receive connector as the logs name it (`SERVER\\Name`)."""

    connector_id: str
    clients: dict[str, ClientUsage] = field(default_factory=dict)
    local_endpoints: set[str] = field(default_factory=set)

    @property
    def server(self) -> str:
        return self.connector_id.partition("\\")[0] if "\\" in self.connector_id else ""

    @property
    def name(self) -> str:
        return (
            self.connector_id.partition("\\")[2] if "\\" in self.connector_id else self.connector_id
        )

    def senders(self) -> list[str]:
        """Client IPs that had at least one message accepted."""
        return [ip for ip, c in self.clients.items() if c.messages > 0]

    def proposed_ranges(self) -> list[str]:
        return propose_ranges(self.senders())

    def to_dict(self, accepted_domains: list[str]) -> dict[str, Any]:
        clients = sorted(self.clients.values(), key=lambda c: _ip_sort_key(c.ip))
        return {
            "connector_id": self.connector_id,
            "server": self.server,
            "name": self.name,
            "local_endpoints": sorted(self.local_endpoints),
            "clients": [c.to_dict(accepted_domains) for c in clients],
            "proposed_remote_ip_ranges": self.proposed_ranges(),
        }


@dataclass
class UsageReport:
    """The result of `analyze_protocol_logs`; `connectors` is keyed by connector-id."""

    connectors: dict[str, ConnectorUsage] = field(default_factory=dict)
    accepted_domains: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    lines: int = 0  # log lines read (comments and blank lines not counted)
    bytes: int = 0  # size of the files read

    def for_name(self, name: str) -> list[ConnectorUsage]:
        """Every server's copy of the connector called `name` (case-insensitive)."""
        return [u for u in self.connectors.values() if u.name.lower() == name.lower()]

    def proposed_ranges(self, name: str) -> list[str]:
        """Narrowest ranges covering the senders of `name` across all servers' logs."""
        return propose_ranges([ip for u in self.for_name(name) for ip in u.senders()])

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "lines": self.lines,
            "bytes": self.bytes,
            "accepted_domains": self.accepted_domains,
            "connectors": [
                self.connectors[k].to_dict(self.accepted_domains)
                for k in sorted(self.connectors, key=str.lower)
            ],
            "warnings": self.warnings,
        }


def domain_accepted(domain: str, accepted_domains: list[str]) -> bool:
    """`corp.example` matches itself; `*.corp.example` matches it and every subdomain (as Exchange)."""
    domain = domain.lower().rstrip(".")
    for accepted in accepted_domains:
        accepted = accepted.lower().rstrip(".")
        if accepted.startswith("*."):
            base = accepted[2:]
            if domain == base or domain.endswith("." + base):
                return True
        elif domain == accepted:
            return True
    return False


def _parse_ip(text: str) -> IPAddress:
    address = ipaddress.ip_address(text.strip().strip("[]").partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _endpoint_ip(endpoint: str) -> str | None:
    """`10.1.2.3:52344`, `[2001:db8::5]:52344` or `2001:db8::5:52344` → the IP (IPv4-mapped → IPv4)."""
    text = endpoint.strip()
    if not text:
        return None
    if text.startswith("["):
        host = text[1:].partition("]")[0]
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit():
            host = text
    try:
        return str(_parse_ip(host))
    except ValueError:
        return None


def _ip_sort_key(ip: str) -> tuple[int, int]:
    address = _parse_ip(ip)
    return (address.version, int(address))


def propose_ranges(ips: Iterable[str]) -> list[str]:
    """The narrowest RemoteIPRanges entries covering exactly `ips`, never an address not in it.

    Single addresses stay single; a run of consecutive addresses becomes `first-last`, or a CIDR block
    when the run is exactly one aligned block of at least 4 addresses. IPv4 first, then IPv6, sorted.
    IPv4-mapped IPv6 addresses count as IPv4. Raises ValueError on an invalid address.
    """
    by_version: dict[int, set[int]] = {4: set(), 6: set()}
    for ip in ips:
        address = _parse_ip(ip)
        by_version[address.version].add(int(address))
    out: list[str] = []
    for version, numbers in by_version.items():
        make = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        bits = 32 if version == 4 else 128
        ordered = sorted(numbers)
        runs: list[tuple[int, int]] = []
        for n in ordered:
            if runs and n == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], n)
            else:
                runs.append((n, n))
        for first, last in runs:
            size = last - first + 1
            if size == 1:
                out.append(str(make(first)))
            elif size >= 4 and size & (size - 1) == 0 and first % size == 0:
                out.append(f"{make(first)}/{bits - size.bit_length() + 1}")
            else:
                out.append(f"{make(first)}-{make(last)}")
    return out


_HEAD_BYTES = 4096


def _log_encoding(head: bytes) -> str:
    """The encoding of a log from its first bytes: Exchange writes UTF-8 (with or without BOM); a
    copy saved by Windows PowerShell may be UTF-16. Undecodable bytes become U+FFFD (they can only be
    in a data field: an EHLO name, an address)."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if len(head) >= 4 and head[1::2].count(0) > len(head) // 4 and head[0::2].count(0) == 0:
        return "utf-16-le"
    return "utf-8-sig"


def is_receive_protocol_log(text: str) -> bool:
    head = text[:4000]
    return "#Log-type: SMTP Receive Protocol Log" in head or (
        "#Fields: date-time,connector-id,session-id" in head and "SMTP Send" not in head
    )


def expand_log_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories → their RECV*.LOG files (any case, recursively), in name order."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = [
                p
                for p in path.rglob("*")
                if p.is_file() and re.fullmatch(r"recv.*\.log", p.name, re.I)
            ]
            out.extend(sorted(found, key=lambda p: (p.name.upper(), str(p))))
        else:
            out.append(path)
    return out


@dataclass
class _Session:
    connector_id: str
    ip: str
    pending: deque[str] = field(default_factory=deque)


#: What the analyser reads of a line: connector-id, session-id, remote-endpoint, event, date-time,
#: local-endpoint (stripped) and data (as written).
_Record = tuple[str, str, str, str, str, str, str]
_WANTED = (
    "connector-id",
    "session-id",
    "remote-endpoint",
    "event",
    "date-time",
    "local-endpoint",
    "data",
)


class _Columns:
    """Where each field the analyser reads sits in a line, from the file's `#Fields:` header."""

    def __init__(self, fields: Iterable[str]) -> None:
        names = list(fields)
        self.index = [names.index(f) if f in names else -1 for f in _WANTED]

    def record(self, row: list[str]) -> _Record:
        n = len(row)
        values = [row[i] if 0 <= i < n else "" for i in self.index]
        data = values.pop()  # kept as written: a reply's text may end in blanks
        return (*(v.strip() for v in values), data)  # type: ignore[return-value]


class _Analyzer:
    def __init__(self, accepted_domains: list[str]) -> None:
        self.report = UsageReport(accepted_domains=list(accepted_domains))
        self.sessions: dict[tuple[str, str], _Session] = {}

    def client(self, session: _Session) -> ClientUsage:
        usage = self.report.connectors.setdefault(
            session.connector_id, ConnectorUsage(session.connector_id)
        )
        return usage.clients.setdefault(session.ip, ClientUsage(session.ip))

    def feed_file(self, path: Path) -> None:
        """Read one log line by line: a server writes up to 250 MB a day, and months of them are
        read in one call, so a file is never held in memory whole."""
        try:
            with path.open("rb") as raw:
                head = raw.read(_HEAD_BYTES)
                encoding = _log_encoding(head)
                if not self._is_receive_log(path, head.decode(encoding, errors="replace")):
                    return
                raw.seek(0)
                self.report.files.append(str(path))
                self.report.bytes += os.fstat(raw.fileno()).st_size
                text = io.TextIOWrapper(raw, encoding=encoding, errors="replace", newline="")
                self._feed_lines(path, text)
        except OSError as exc:
            self.report.warnings.append(f"{path}: cannot read ({exc.strerror})")

    def _is_receive_log(self, path: Path, head: str) -> bool:
        if "#Log-type:" in head[:2000] and not is_receive_protocol_log(head):
            self.report.warnings.append(f"{path}: not an SMTP receive protocol log; skipped")
            return False
        return True

    def _feed_lines(self, path: Path, text: Iterable[str]) -> None:
        columns = _Columns(DEFAULT_FIELDS)
        malformed = 0

        def data_lines() -> Iterable[str]:  # a `#Fields:` line changes the columns that follow
            nonlocal columns
            for line in text:
                line = line.lstrip("\ufeff")
                if line.startswith("#"):
                    if line.startswith("#Fields:"):
                        columns = _Columns(
                            f.strip() for f in line[len("#Fields:") :].strip().split(",")
                        )
                elif line.strip():
                    yield line

        lines = 0
        for row in csv.reader(data_lines()):
            lines += 1
            if len(row) < 7 or not self.feed(columns.record(row)):
                malformed += 1
        self.report.lines += lines
        if malformed:
            self.report.warnings.append(
                f"{path}: {malformed} line(s) could not be read and were ignored"
            )

    def feed(self, record: _Record) -> bool:
        connector_id, session_id, endpoint, event, when, local, data = record
        if not connector_id or not session_id or event not in ("+", "-", ">", "<", "*"):
            return False
        key = (connector_id, session_id)
        session = self.sessions.get(key)
        if session is None or event == "+":
            # The address is read once per session (a session's lines all carry it): parsing
            # it on every line took half of the time on a large log.
            ip = _endpoint_ip(endpoint)
            if ip is None:
                return False
            session = _Session(connector_id, ip)
            self.sessions[key] = session
            self.client(session).sessions += 1
        client = self.client(session)
        usage = self.report.connectors[connector_id]
        if local:
            usage.local_endpoints.add(local)
        if when:
            client.first_seen = min(client.first_seen, when) if client.first_seen else when
            client.last_seen = max(client.last_seen, when)
        if event == "<":
            session.pending.append(data.strip())
        elif event == ">":
            self.reply(session, client, data.strip())
        elif event == "-":
            self.sessions.pop(key, None)
        return True

    def reply(self, session: _Session, client: ClientUsage, reply: str) -> None:
        command = session.pending.popleft() if session.pending else ""
        if reply.startswith("250") and (
            "2.6.0" in reply[:12] or "queued mail for delivery" in reply.lower()
        ):
            client.messages += 1
            return
        match = _RCPT.match(command)
        if not match:
            return
        if reply.startswith("250"):
            address = match.group(1)
            domain = address.rpartition("@")[2].lower().rstrip(".") if "@" in address else ""
            client.recipient_domains[domain] = client.recipient_domains.get(domain, 0) + 1
        elif _RELAY_DENIED.match(reply):
            client.relay_denied += 1


def analyze_protocol_logs(
    paths: list[Path],
    accepted_domains: list[str],
    progress: Callable[[int, int, Path], None] | None = None,
) -> UsageReport:
    """Read receive protocol logs (files, or directories of RECV*.LOG) in name order: per connector
    and client IP, sessions, messages, accepted recipients per domain, relay attempts, first/last seen.
    ``progress(i, n, path)`` is called before the i-th of n files is read (for a progress bar:
    a server's logs are up to 250 MB a day, and months of them take minutes)."""
    analyzer = _Analyzer(accepted_domains)
    files = expand_log_paths(paths)
    for i, path in enumerate(files):
        if progress is not None:
            progress(i, len(files), path)
        analyzer.feed_file(path)
    return analyzer.report
