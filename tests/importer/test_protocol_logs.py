"""Protocol-log usage (RECV*.LOG, quoted CSV fields, sessions across files) and range proposals."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.importer.protocol_logs import analyze_protocol_logs, propose_ranges

LOGS = Path(__file__).parent / "fixtures" / "logs"
ACCEPTED = ["corp.example", "*.corp.example"]


def client(
    ip: str,
    sessions: int,
    messages: int,
    domains: dict[str, int],
    first: str,
    last: str,
    **kw: object,
) -> dict:
    relayed = sum(
        n for d, n in domains.items() if not (d == "corp.example" or d.endswith(".corp.example"))
    )
    return {
        "ip": ip,
        "sessions": sessions,
        "messages": messages,
        "recipients": sum(domains.values()),
        "recipient_domains": domains,
        "relayed_recipients": relayed,
        "relayed": relayed > 0,
        "relay_denied": kw.get("relay_denied", 0),
        "first_seen": first,
        "last_seen": last,
    }


def test_usage_per_connector_and_client() -> None:
    report = analyze_protocol_logs([LOGS], ACCEPTED)
    assert report.to_dict() == {
        "files": [str(LOGS / "RECV2024031409-1.LOG"), str(LOGS / "RECV2024031410-1.LOG")],
        "lines": 123,  # the two files' lines without the # header lines
        "bytes": 18896,
        "accepted_domains": ACCEPTED,
        "connectors": [
            {
                "connector_id": "EX01\\Default Frontend EX01",
                "server": "EX01",
                "name": "Default Frontend EX01",
                "local_endpoints": ["10.0.0.5:25"],
                "clients": [
                    client("198.51.100.23", 1, 0, {}, "2024-03-14T10:52:19.100Z", "2024-03-14T10:52:19.500Z"),
                    client(
                        "203.0.113.50", 1, 1, {"corp.example": 1},
                        "2024-03-14T09:20:44.310Z", "2024-03-14T09:20:50.181Z", relay_denied=1,
                    ),
                ],
                "proposed_remote_ip_ranges": ["203.0.113.50"],
            },
            {
                "connector_id": "EX01\\Relay Printers",
                "server": "EX01",
                "name": "Relay Printers",
                "local_endpoints": ["10.0.0.5:25"],
                "clients": [
                    # two sessions, one pipelined, one RCPT to a foreign domain (relayed)
                    client(
                        "10.10.5.11", 2, 2, {"corp.example": 2, "supplier.example": 1},
                        "2024-03-14T09:12:01.101Z", "2024-03-14T10:40:03.621Z",
                    ),
                    # one session across the hourly file rotation: STARTTLS, then BDAT LAST
                    client("10.10.5.12", 1, 1, {"corp.example": 1}, "2024-03-14T09:59:58.900Z", "2024-03-14T10:00:00.400Z"),
                    client(
                        "10.10.5.13", 1, 1, {"accounting.corp.example": 1},
                        "2024-03-14T10:05:10.000Z", "2024-03-14T10:05:10.310Z",
                    ),
                    # EHLO + QUIT only (a monitoring probe): no message, so not in the proposal
                    client("10.10.5.30", 1, 0, {}, "2024-03-14T09:45:00.500Z", "2024-03-14T09:45:00.521Z"),
                    # logged as IPv4-mapped IPv6, counted as IPv4; quoted MAIL FROM with a comma
                    client("192.168.20.7", 1, 1, {"bank.example": 1}, "2024-03-14T10:17:42.700Z", "2024-03-14T10:17:43.010Z"),
                    # IPv6 remote endpoint written without brackets
                    client("2001:db8:10::25", 1, 1, {"corp.example": 1}, "2024-03-14T09:31:15.002Z", "2024-03-14T09:31:15.095Z"),
                ],
                "proposed_remote_ip_ranges": ["10.10.5.11-10.10.5.13", "192.168.20.7", "2001:db8:10::25"],
            },
        ],
        "warnings": [f"{LOGS / 'RECV2024031410-1.LOG'}: 1 line(s) could not be read and were ignored"],
    }  # fmt: skip


def test_relayed_is_unknown_without_accepted_domains() -> None:
    report = analyze_protocol_logs([LOGS / "RECV2024031409-1.LOG"], [])
    relay = report.connectors["EX01\\Relay Printers"]
    assert relay.clients["10.10.5.11"].relayed([]) is None
    assert report.to_dict()["connectors"][1]["clients"][0]["relayed"] is None
    # the session continued in the next file is counted once, with what this file holds
    assert relay.clients["10.10.5.12"].sessions == 1
    assert relay.clients["10.10.5.12"].messages == 0


def test_field_order_from_header_and_send_logs_skipped(tmp_path: Path) -> None:
    (tmp_path / "RECV2024010100-1.LOG").write_text(
        "#Software: Microsoft Exchange Server\n"
        "#Log-type: SMTP Receive Protocol Log\n"
        "#Fields: date-time,session-id,connector-id,event,remote-endpoint,local-endpoint,sequence-number,data,context\n"
        "2024-01-01T00:00:01.000Z,AA01,EX05\\Relay,+,[fe80::1%12]:4000,[fe80::5]:25,0,,\n"
        '2024-01-01T00:00:02.000Z,AA01,EX05\\Relay,>,[fe80::1%12]:4000,[fe80::5]:25,1,"250 2.6.0 <x@y> [InternalId=1, Hostname=EX05] Queued mail for delivery",\n'
    )
    (tmp_path / "SEND2024010100-1.LOG").write_text(
        "#Software: Microsoft Exchange Server\n#Log-type: SMTP Send Protocol Log\n"
    )
    report = analyze_protocol_logs(
        [tmp_path / "RECV2024010100-1.LOG", tmp_path / "SEND2024010100-1.LOG"], []
    )
    assert report.connectors["EX05\\Relay"].proposed_ranges() == ["fe80::1"]
    assert report.warnings == [
        f"{tmp_path / 'SEND2024010100-1.LOG'}: not an SMTP receive protocol log; skipped"
    ]
    # a directory is searched for RECV*.LOG only
    assert analyze_protocol_logs([tmp_path], []).files == [str(tmp_path / "RECV2024010100-1.LOG")]


def test_proposed_ranges_across_servers() -> None:
    report = analyze_protocol_logs([LOGS], ACCEPTED)
    assert report.proposed_ranges("relay printers") == [
        "10.10.5.11-10.10.5.13",
        "192.168.20.7",
        "2001:db8:10::25",
    ]
    assert report.proposed_ranges("No Such Connector") == []


@pytest.mark.parametrize(
    ("ips", "expected"),
    [
        ([], []),
        (["10.0.0.7"], ["10.0.0.7"]),
        (["10.0.0.7", "10.0.0.7"], ["10.0.0.7"]),
        (["10.0.0.8", "10.0.0.7"], ["10.0.0.7-10.0.0.8"]),
        (["10.0.0.1", "10.0.0.3"], ["10.0.0.1", "10.0.0.3"]),
        # a fully used, aligned block becomes CIDR
        ([f"10.0.0.{i}" for i in range(4, 8)], ["10.0.0.4/30"]),
        ([f"192.168.1.{i}" for i in range(256)], ["192.168.1.0/24"]),
        # fully used but not aligned: a range, never the covering CIDR
        ([f"10.0.0.{i}" for i in range(2, 6)], ["10.0.0.2-10.0.0.5"]),
        # a /24 less one address is not widened to the /24
        ([f"192.168.1.{i}" for i in range(255)], ["192.168.1.0-192.168.1.254"]),
        # runs across an octet boundary
        (["10.0.0.255", "10.0.1.0", "10.0.1.1"], ["10.0.0.255-10.0.1.1"]),
        # IPv6 after IPv4, both sorted; IPv4-mapped counted as IPv4
        (
            ["2001:db8::2", "::ffff:10.0.0.9", "2001:db8::1", "10.0.0.10"],
            ["10.0.0.9-10.0.0.10", "2001:db8::1-2001:db8::2"],
        ),
        ([f"2001:db8::{i:x}" for i in range(16)], ["2001:db8::/124"]),
    ],
)
def test_propose_ranges(ips: list[str], expected: list[str]) -> None:
    assert propose_ranges(ips) == expected


def test_propose_ranges_never_covers_an_unseen_address() -> None:
    import ipaddress
    import random

    rng = random.Random(7)
    for _ in range(200):
        seen = {
            f"10.0.{rng.randrange(2)}.{rng.randrange(256)}" for _ in range(rng.randrange(1, 60))
        }
        covered: set[str] = set()
        for entry in propose_ranges(seen):
            if "/" in entry:
                covered |= {str(a) for a in ipaddress.ip_network(entry)}
            elif "-" in entry:
                low, high = (int(ipaddress.ip_address(x)) for x in entry.split("-"))
                covered |= {str(ipaddress.ip_address(n)) for n in range(low, high + 1)}
            else:
                covered.add(entry)
        assert covered == seen


def test_propose_ranges_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        propose_ranges(["printer.corp.example"])


def test_progress_is_reported_before_each_file() -> None:
    """Months of logs take minutes: the CLI draws a progress bar from these calls."""
    calls: list[tuple[int, int, str]] = []
    report = analyze_protocol_logs(
        [LOGS], ACCEPTED, progress=lambda i, n, path: calls.append((i, n, path.name))
    )
    assert calls == [(0, 2, "RECV2024031409-1.LOG"), (1, 2, "RECV2024031410-1.LOG")]
    assert len(report.files) == 2


def test_columns_follow_each_fields_header() -> None:
    """A `#Fields:` line in the middle of a file (a restarted service) changes the columns of
    the lines after it; each column is looked up once per header, not once per line."""
    from relaygate.importer.protocol_logs import _Columns

    columns = _Columns(["date-time", "remote-endpoint", "event", "session-id", "connector-id"])
    row = ["2024-01-01T00:00:00Z", " 10.0.0.1:25 ", "+", "S1", "EX\\R"]
    assert columns.record(row) == (
        "EX\\R",
        "S1",
        "10.0.0.1:25",
        "+",
        "2024-01-01T00:00:00Z",
        "",
        "",
    )


def test_a_large_log_is_streamed_not_read_whole(tmp_path: Path) -> None:
    import tracemalloc

    header = (
        "\ufeff#Software: Microsoft Exchange Server\r\n#Version: 15.0.0.0\r\n"
        "#Log-type: SMTP Receive Protocol Log\r\n#Date: 2024-03-14T09:00:02.117Z\r\n"
        "#Fields: date-time,connector-id,session-id,sequence-number,local-endpoint,remote-endpoint,"
        "event,data,context\r\n"
    )
    session = (
        "2024-03-14T09:12:01.101Z,EX01\\Relay,S{n},0,10.0.0.5:25,[2001:db8::{h:x}]:49152,+,,\r\n"
        '2024-03-14T09:12:01.102Z,EX01\\Relay,S{n},1,10.0.0.5:25,[2001:db8::{h:x}]:49152,>,"220 EX01 ready, '
        'really",\r\n'
        "2024-03-14T09:12:01.131Z,EX01\\Relay,S{n},2,10.0.0.5:25,[2001:db8::{h:x}]:49152,<,"
        "MAIL FROM:<scan@corp.example>,\r\n"
        "2024-03-14T09:12:01.131Z,EX01\\Relay,S{n},3,10.0.0.5:25,[2001:db8::{h:x}]:49152,<,"
        "RCPT TO:<a@partner.example>,\r\n"
        "2024-03-14T09:12:01.140Z,EX01\\Relay,S{n},4,10.0.0.5:25,[2001:db8::{h:x}]:49152,>,"
        "250 2.1.0 Sender OK,\r\n"
        "2024-03-14T09:12:01.141Z,EX01\\Relay,S{n},5,10.0.0.5:25,[2001:db8::{h:x}]:49152,>,"
        "250 2.1.5 Recipient OK,\r\n"
        "2024-03-14T09:12:01.150Z,EX01\\Relay,S{n},6,10.0.0.5:25,[2001:db8::{h:x}]:49152,>,"
        '"250 2.6.0 <m{n}@corp.example> [InternalId=1, Hostname=EX01] Queued mail for delivery",\r\n'
        "2024-03-14T09:12:01.160Z,EX01\\Relay,S{n},7,10.0.0.5:25,[2001:db8::{h:x}]:49152,-,,Local\r\n"
    )
    path = tmp_path / "RECV2024031409-1.LOG"
    sessions = 15_000
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write(header)
        for n in range(sessions):
            out.write(session.format(n=n, h=n % 7 + 1))
    size = path.stat().st_size
    assert size > 10_000_000

    tracemalloc.start()
    try:
        report = analyze_protocol_logs([path], ACCEPTED)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < size / 10, f"peak {peak:,} bytes for a {size:,}-byte log"
    assert report.bytes == size and report.lines == sessions * 8 and report.warnings == []
    [usage] = report.connectors.values()
    assert usage.proposed_ranges() == ["2001:db8::1-2001:db8::7"]
    assert sum(c.messages for c in usage.clients.values()) == sessions
    assert sum(c.relayed(ACCEPTED) or 0 for c in usage.clients.values()) == sessions
