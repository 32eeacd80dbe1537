"""Protocol log: lines written by SessionLog parsed back field by field with the csv module."""

from __future__ import annotations

import csv
import re
import threading
from pathlib import Path

import pytest

from relaygate.logs.protocol import (
    AUTH_MASK,
    NULL_SESSION_LOG,
    PROTOCOL_LOG_FIELDS,
    PROTOCOL_LOG_RECEIVE_DIR,
    NullSessionLog,
    ProtocolLog,
    SessionLog,
    format_endpoint,
    new_session_id,
    receiving_message_info,
)

DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def read_log(directory: Path) -> tuple[list[str], list[list[str]], list[Path]]:
    files = sorted(directory.glob("RECV*.LOG"))
    headers: list[str] = []
    rows: list[list[str]] = []
    for f in files:
        with open(f, encoding="utf-8", newline="") as fh:
            text = fh.read()
        lines = text.split("\r\n")
        headers += [line for line in lines if line.startswith("#")]
        rows += list(csv.reader([line + "\r\n" for line in lines if line and line[0] != "#"]))
    return headers, rows, files


@pytest.fixture
def plog(tmp_path: Path):
    log = ProtocolLog(tmp_path / "recv", server_name="RELAY01")
    yield log
    log.close()


def test_session_round_trip(plog: ProtocolLog, tmp_path: Path) -> None:
    s = plog.session("SMTP Relay Internal", ("10.0.0.5", 25), ("10.0.0.77", 50123))
    s.connect()
    s.sent(
        "220 relay.corp.example Microsoft ESMTP MAIL Service ready at Wed, 11 Jan 2023 16:59:51 +0100"
    )
    s.received("EHLO [10.0.0.77]")
    s.log_ehlo_reply(
        [
            "250-relay.corp.example Hello [10.0.0.77]",
            "250-SIZE 37748736",
            "250-PIPELINING",
            "250 STARTTLS",
        ]
    )
    s.info("SMTPSubmit SMTPAcceptAnySender", "Set Session Permissions")
    s.received('MAIL FROM:<"odd,name"@corp.example>')
    s.received("AUTH LOGIN")
    s.sent_auth_challenge()
    s.received_auth_blob()
    s.received("AUTH PLAIN AHVzZXIAc2VjcmV0")
    s.sent("550 5.7.1 Unable to relay")
    s.disconnect("Remote")
    plog.close()

    headers, rows, files = read_log(tmp_path / "recv")
    assert len(files) == 1
    assert re.fullmatch(r"RECV\d{10}-1\.LOG", files[0].name)
    assert headers[0] == "#Software: Microsoft Exchange Server"
    assert headers[1] == "#Version: 15.0.0.0"
    assert headers[2] == "#Log-type: SMTP Receive Protocol Log"
    assert DATE_RE.match(headers[3].removeprefix("#Date: "))
    assert headers[4] == "#Fields: " + ",".join(PROTOCOL_LOG_FIELDS)
    assert len(headers) == 5

    assert all(len(r) == 9 for r in rows)
    assert [int(r[3]) for r in rows] == list(range(len(rows)))
    for r in rows:
        assert DATE_RE.match(r[0])
        assert r[1] == "RELAY01\\SMTP Relay Internal"
        assert r[2] == s.session_id
        assert r[4] == "10.0.0.5:25"
        assert r[5] == "10.0.0.77:50123"
    events = [(r[6], r[7], r[8]) for r in rows]
    assert events == [
        ("+", "", ""),
        (
            ">",
            "220 relay.corp.example Microsoft ESMTP MAIL Service ready at Wed, 11 Jan 2023 16:59:51 +0100",
            "",
        ),
        ("<", "EHLO [10.0.0.77]", ""),
        (">", "250  relay.corp.example Hello [10.0.0.77] SIZE 37748736 PIPELINING STARTTLS", ""),
        ("*", "SMTPSubmit SMTPAcceptAnySender", "Set Session Permissions"),
        ("<", 'MAIL FROM:<"odd,name"@corp.example>', ""),
        ("<", "AUTH LOGIN", ""),
        (">", "334 <authentication response>", ""),
        ("<", AUTH_MASK, ""),
        ("<", "AUTH PLAIN <authentication response>", ""),
        (">", "550 5.7.1 Unable to relay", ""),
        ("-", "", "Remote"),
    ]
    raw = files[0].read_bytes().decode("utf-8")
    assert "AHVzZXIAc2VjcmV0" not in raw
    # Commas and quotes are quoted the csv way; plain fields are not quoted.
    assert ',"MAIL FROM:<""odd,name""@corp.example>",' in raw
    assert ",<,EHLO [10.0.0.77],\r\n" in raw
    assert ",+,,\r\n" in raw
    assert ",-,,Remote\r\n" in raw


def test_ehlo_reply_without_codes(plog: ProtocolLog, tmp_path: Path) -> None:
    s = plog.session("C", ("10.0.0.5", 25), ("10.0.0.7", 1))
    s.log_ehlo_reply(["relay Hello [10.0.0.7]", "SIZE 1024", "8BITMIME"])
    plog.close()
    _, rows, _ = read_log(tmp_path / "recv")
    assert rows[0][7] == "250  relay Hello [10.0.0.7] SIZE 1024 8BITMIME"


def test_quotes_are_quoted_and_newlines_escaped(plog: ProtocolLog, tmp_path: Path) -> None:
    s = plog.session('Conn "A", B', ("10.0.0.5", 25), ("10.0.0.7", 1))
    s.received('bad\nline with "quotes", commas\rand CR')
    s.info("x", 'ctx, "q"')
    plog.close()
    _, rows, _ = read_log(tmp_path / "recv")
    assert rows[0][1] == 'RELAY01\\Conn "A", B'
    assert rows[0][7] == 'bad\\x0aline with "quotes", commas\\x0dand CR'
    assert rows[1][8] == 'ctx, "q"'
    assert rows[1][3] == "1"


def test_control_characters_from_the_client_are_escaped(plog: ProtocolLog, tmp_path: Path) -> None:
    """Security-bar 152: C0 (CR and LF too), DEL and C1 are written as \\xNN, never raw: no forged
    log line, no terminal escape for whoever reads the log. Other characters stay as they are."""
    s = plog.session("C", ("10.0.0.5", 25), ("10.0.0.7", 1))
    s.received("EHLO x\nFAKE LOG LINE")
    s.received("MAIL FROM:<\x1b[31mred@ext.example> \x00\x07\x7f\x85\x9f")
    s.info("RCPT refused: \x1b]0;title\x07", "ctx\x1b")
    s.sent("250 2.1.5 Recipient OK für 用户")
    plog.close()
    raw = b"".join(f.read_bytes() for f in sorted((tmp_path / "recv").glob("RECV*.LOG")))
    body = raw.decode("utf-8").replace("\r\n", "")
    assert not any(ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in body)
    _, rows, _ = read_log(tmp_path / "recv")
    assert [r[7] for r in rows] == [
        "EHLO x\\x0aFAKE LOG LINE",
        "MAIL FROM:<\\x1b[31mred@ext.example> \\x00\\x07\\x7f\\x85\\x9f",
        "RCPT refused: \\x1b]0;title\\x07",
        "250 2.1.5 Recipient OK für 用户",
    ]
    assert rows[2][8] == "ctx\\x1b"


def test_sessions_have_unique_ids_and_own_sequences(plog: ProtocolLog, tmp_path: Path) -> None:
    a = plog.session("C", ("10.0.0.5", 25), ("10.0.0.7", 1))
    b = plog.session("C", ("10.0.0.5", 25), ("10.0.0.8", 2))
    assert a.session_id != b.session_id
    for sid in (a.session_id, b.session_id):
        assert re.fullmatch(r"[0-9A-F]{16}", sid)
    a.connect()
    b.connect()
    a.received("HELO a")
    b.received("HELO b")
    a.disconnect()
    plog.close()
    _, rows, _ = read_log(tmp_path / "recv")
    seqs: dict[str, list[int]] = {}
    for r in rows:
        seqs.setdefault(r[2], []).append(int(r[3]))
    assert seqs == {a.session_id: [0, 1, 2], b.session_id: [0, 1]}
    assert rows[-1][8] == "Local"


def test_ids_unique_across_threads() -> None:
    ids: list[str] = []

    def work() -> None:
        ids.extend(new_session_id() for _ in range(2000))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 8000


def test_endpoint_formatting() -> None:
    assert format_endpoint(("10.1.2.3", 25)) == "10.1.2.3:25"
    assert format_endpoint(("2001:db8::1", 25, 0, 0)) == "2001:db8::1:25"
    assert format_endpoint(("[2001:db8::1]", 587)) == "2001:db8::1:587"
    assert format_endpoint(("::ffff:192.168.12.5", 40000)) == "192.168.12.5:40000"
    assert format_endpoint(None) == ""


def test_ipv6_endpoints_in_file(plog: ProtocolLog, tmp_path: Path) -> None:
    s = plog.session("C", ("2001:db8::25", 25), ("2001:db8::77", 50000))
    s.connect()
    plog.close()
    _, rows, _ = read_log(tmp_path / "recv")
    assert rows[0][4:6] == ["2001:db8::25:25", "2001:db8::77:50000"]


def test_background_flush_without_close(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, server_name="R", flush_interval=0.02)
    try:
        s = log.session("C", ("10.0.0.5", 25), ("10.0.0.7", 1))
        s.connect()
        deadline = threading.Event()
        for _ in range(100):
            if any(
                f.stat().st_size > 0 and b",+,," in f.read_bytes()
                for f in tmp_path.glob("RECV*.LOG")
            ):
                break
            deadline.wait(0.05)
        else:
            pytest.fail("the background thread did not flush")
    finally:
        log.close()


def test_appends_after_close_are_dropped(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, server_name="R")
    s = log.session("C", ("10.0.0.5", 25), ("10.0.0.7", 1))
    s.connect()
    log.close()
    s.received("QUIT")  # must not raise; never written
    log.close()  # idempotent
    _, rows, _ = read_log(tmp_path)
    assert len(rows) == 1


def test_send_log_variant(tmp_path: Path) -> None:
    log = ProtocolLog(tmp_path, server_name="RELAY01", send=True)
    s = log.session("Outbound to Office 365", ("10.0.0.5", 40000), ("52.96.0.1", 25))
    s.connect()
    log.close()
    (f,) = tmp_path.glob("SEND*.LOG")
    text = f.read_bytes().decode("utf-8")
    assert "#Log-type: SMTP Send Protocol Log" in text
    assert ",Outbound to Office 365," in text


def test_null_session_log_is_a_drop_in(tmp_path: Path) -> None:
    real = [n for n in dir(SessionLog) if not n.startswith("_")]
    for name in real:
        assert hasattr(NullSessionLog, name), name
    n = NullSessionLog()
    n.connect()
    n.sent("220 x")
    n.received("EHLO x")
    n.received_auth_blob()
    n.sent_auth_challenge()
    n.info("x", "y")
    n.log_ehlo_reply(["a", "b"])
    n.disconnect("Remote")
    assert re.fullmatch(r"[0-9A-F]{16}", n.session_id)
    assert n.session_id == n.session_id
    NULL_SESSION_LOG.connect()
    assert list(tmp_path.iterdir()) == []


def test_receiving_message_info_format() -> None:
    data = receiving_message_info("08D892B7A9441226", 1)
    assert re.fullmatch(r"08D892B7A9441226;\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z;1", data)


def test_directory_constant() -> None:
    assert Path("logs/ProtocolLog/SmtpReceive") == PROTOCOL_LOG_RECEIVE_DIR
