"""The service log on stderr: `server.log_format` ("text" / "json"), `server.log_level`, and the
`relaygate serve --log-format/--log-level` flags (relaygate.logs.service).

A real `relaygate serve` (one process, or a supervisor and two workers) on 127.0.0.1, mail sent with
smtplib through to an aiosmtpd sink on loopback; every line of the relay's stderr is parsed.
"""

from __future__ import annotations

import http.server
import io
import json
import logging
import os
import re
import select
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller

from relaygate.config import ConfigError
from relaygate.config.loader import Problem
from relaygate.logs.service import JsonFormatter, TextFormatter
from tests.smtp.helpers import free_port
from tests.support.serve_process import wait_for_ready_line

ROOT = Path(__file__).resolve().parents[2]

CONFIG = """\
[server]
name = "RELAY01"
fqdn = "relay.corp.example"
data_dir = "{data}"
workers = {workers}
log_address_privacy = "mask"
{server_extra}

[admin]
enabled = true
listen = "127.0.0.1:{admin_port}"

[[accepted_domains]]
domain = "corp.example"

[[receive_connectors]]
name = "Relay"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
tarpit_interval = "00:00:00"
connection_inactivity_timeout = "00:00:30"
banner = "{banner}"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "Sink"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1"]
port = {sink_port}
"""

TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class Sink:
    """The smart host: refuses recipients whose local part starts with "nobody" (a delivery
    error, so an NDR), takes the rest; every delivered envelope's recipients."""

    def __init__(self) -> None:
        self.delivered: list[list[str]] = []
        self.lock = threading.Lock()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if address.startswith("nobody"):
            return "550 5.1.1 User unknown"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.lock:
            self.delivered.append(list(envelope.rcpt_tos))
        return "250 2.0.0 OK"

    def count(self) -> int:
        with self.lock:
            return len(self.delivered)


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


class Served:
    """`relaygate serve` in a subprocess; its stderr in a file."""

    def __init__(
        self, tmp: Path, sink_port: int, *, workers: int = 1, server_extra: str = ""
    ) -> None:
        self.tmp = tmp
        self.port = free_port()
        self.admin_port = free_port()
        self.sink_port = sink_port
        self.workers = workers
        self.data = tmp / "data"
        self.config = tmp / "relaygate.toml"
        self.stderr = tmp / "serve.stderr"
        self.write_config(server_extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def write_config(self, server_extra: str = "", banner: str = "220 RelayGate") -> None:
        self.config.write_text(
            CONFIG.format(
                data=self.data,
                workers=self.workers,
                server_extra=server_extra,
                admin_port=self.admin_port,
                port=self.port,
                banner=banner,
                sink_port=self.sink_port,
            )
        )

    def start(self, *flags: str, expect_ready: bool = True) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        env.pop("RELAYGATE_CONFIG", None)
        with open(self.stderr, "ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relaygate", "serve", "--config", str(self.config), *flags],
                stdout=subprocess.PIPE,
                stderr=err,
                stdin=subprocess.DEVNULL,
                cwd=self.tmp,
                env=env,
            )
        if not expect_ready:
            return
        found = wait_for_ready_line(self.proc)
        if found is None:
            self.stop()
            raise AssertionError(f"relaygate serve did not start:\n{self.text()}")

    def text(self) -> str:
        return self.stderr.read_text(errors="replace") if self.stderr.exists() else ""

    def lines(self) -> list[str]:
        return self.stderr.read_bytes().decode("ascii").splitlines()

    def records(self) -> list[dict[str, Any]]:
        """Every stderr line as a JSON object (json.loads fails on any line that is not one)."""
        out = []
        for line in self.lines():
            record = json.loads(line)
            assert isinstance(record, dict), line
            out.append(record)
        return out

    def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.2)
        raise AssertionError(f"timed out; stderr:\n{self.text()}")

    def messages(self) -> list[str]:
        """The messages logged so far (lines that are not JSON yet count as their text)."""
        out = []
        for line in self.text().splitlines():
            try:
                out.append(str(json.loads(line)["message"]))
            except (ValueError, KeyError, TypeError):
                out.append(line)
        return out

    def reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


@pytest.fixture
def served(tmp_path: Path, sink: tuple[Sink, int]) -> Iterator[Any]:
    started: list[Served] = []

    def make(**kwargs: Any) -> Served:
        s = Served(tmp_path, sink[1], **kwargs)
        started.append(s)
        return s

    try:
        yield make
    finally:
        for s in started:
            s.stop()


def send(port: int, rcpts: list[str], sender: str = "alice@corp.example") -> None:
    body = f"From: {sender}\r\nTo: {', '.join(rcpts)}\r\nSubject: log test\r\n\r\nhello\r\n"
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(sender, rcpts, body)


def hostile_client(port: int) -> list[bytes]:
    """Commands with control characters, a non-UTF-8 byte and CR/LF injection attempts; the
    relay's replies (raw)."""
    attempts = [
        b"EHLO evil\x1b[2J\x00\xff.example\r\n",
        b"EHLO evil.example\r\nINJECTED 2026-01-01 ERROR relaygate: forged\r\n",
        b'{"level": "ERROR", "message": "forged"}\r\n',
        b"EHLO client.example\r\n",
        b"MAIL FROM:<ev\ril@corp.example>\r\n",
        b"MAIL FROM:<ev\nil@corp.example>\r\n",
        b'MAIL FROM:<"e\x1bv\x7fil"@corp.example>\r\n',
        b"MAIL FROM:<e\xffv@corp.example>\r\n",
        b"QUIT\r\n",
    ]
    replies = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        replies.append(sock.recv(4096))
        for data in attempts:
            try:
                sock.sendall(data)
                replies.append(sock.recv(4096))
            except OSError:  # the relay closed after too many errors: what it read is enough
                break
    return replies


DEEP_TOML = "x = " + "[" * 50_000 + "]" * 50_000 + "\n"  # tomllib: RecursionError, not ConfigError


def check_record(record: dict[str, Any], supervisor_pid: int, workers: int) -> None:
    assert TIME.match(record["time"]), record
    assert record["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), record
    assert isinstance(record["logger"], str) and record["logger"], record
    assert isinstance(record["message"], str), record
    assert isinstance(record["pid"], int), record
    if workers == 1 or record["pid"] == supervisor_pid:
        assert "worker" not in record, record
    else:
        assert record["worker"] in range(workers), record


def expected_loggers(workers: int) -> set[Any]:
    """Who logs a reload refused for a file that cannot be loaded: the one process, or the
    supervisor (which offers its workers no such file)."""
    return {"supervisor"}


def logged_by(s: Any, text: str) -> set[Any]:
    """The workers (by index; "supervisor" for a line without one) that logged `text` so far."""
    try:
        records = s.records()
    except ValueError:  # a line being written: not complete yet
        return set()
    return {r.get("worker", "supervisor") for r in records if text in r["message"]}


@pytest.mark.parametrize("workers", [1, 2])
def test_json_service_log_every_line_is_json(
    served: Any, sink: tuple[Sink, int], workers: int
) -> None:
    """Mail through to the sink, a delivery error (550: an NDR, its address masked), a client
    sending control characters and CR/LF, a reload whose loading raises (a traceback), a reload
    that succeeds, a stop: every line of stderr is one JSON object with the fields."""
    handler, _port = sink
    s = served(workers=workers, server_extra='log_format = "json"')
    s.start()
    assert s.proc is not None
    send(s.port, ["bob@corp.example"])
    send(s.port, ["nobody@corp.example"])  # refused by the sink: an NDR to alice
    s.wait_for(lambda: handler.count() >= 2)
    s.wait_for(lambda: any("non-delivery report" in m for m in s.messages()))
    replies = hostile_client(s.port)
    assert replies[0].startswith(b"220"), replies
    with socket.create_connection(("127.0.0.1", s.admin_port), timeout=10) as web:
        web.sendall(b"NOT HTTP\x00\r\n\r\n")  # uvicorn logs a warning
        web.settimeout(10)
        web.recv(4096)
    # uvicorn's warning, as the admin listener words it (at most one a minute)
    s.wait_for(lambda: any("invalid HTTP request" in m for m in s.messages()))

    # An edit may be seen twice when the file watcher notices it before the SIGHUP arrives (the
    # watcher reloads, then the signal does): what counts is who logged, not how often.
    s.config.write_text(DEEP_TOML)
    s.reload()
    s.wait_for(lambda: logged_by(s, "reload refused") >= expected_loggers(workers))
    s.write_config('log_format = "json"', banner="220 RelayGate reloaded")
    s.reload()
    # the one process, or each worker (the supervisor applies the file without this line)
    reloading = {"supervisor"} if workers == 1 else set(range(workers))
    s.wait_for(lambda: logged_by(s, "configuration reloaded") >= reloading)
    assert s.stop() == 0

    records = s.records()
    assert len(records) == len(s.lines()) > 5
    for record in records:
        check_record(record, s.proc.pid, workers)
    messages = [r["message"] for r in records]
    assert not any("forged" in m or "INJECTED" in m for m in messages), messages
    ndr = [m for m in messages if "non-delivery report" in m]
    assert ndr and all("a***@corp.example" in m and "alice" not in m for m in ndr), ndr
    uvicorn = [r for r in records if "invalid HTTP request" in r["message"]]
    assert uvicorn and uvicorn[0]["logger"].startswith("uvicorn"), uvicorn
    assert uvicorn[0]["level"] == "WARNING" and uvicorn[0].get("worker") == (
        0 if workers > 1 else None
    )
    refused = [r for r in records if "reload refused" in r["message"]]
    # each worker, and the supervisor
    assert {r.get("worker", "supervisor") for r in refused} == expected_loggers(workers)
    for record in refused:
        assert record["level"] == "ERROR"
        assert record["exception"].startswith("Traceback (most recent call last):")
        assert "RecursionError" in record["exception"]
    reloaded = [r for r in records if "configuration reloaded" in r["message"]]
    if workers > 1:
        assert {r["worker"] for r in reloaded} == set(range(workers))
        # the supervisor's own lines, without a worker index
        assert any(r["pid"] == s.proc.pid and "workers listening" in r["message"] for r in records)


def test_log_level_warning_hides_info_lines_and_a_reload_changes_it(served: Any) -> None:
    s = served(server_extra='log_format = "json"\nlog_level = "WARNING"')
    s.start()
    send(s.port, ["bob@corp.example"])
    s.write_config('log_format = "json"\nlog_level = "INFO"', banner="220 again")
    s.reload()
    s.wait_for(lambda: any("configuration reloaded" in m for m in s.messages()))
    s.stop()
    records = s.records()
    before = records[: next(i for i, r in enumerate(records) if "service log" in r["message"])]
    assert not [r for r in before if r["level"] in ("DEBUG", "INFO")], before
    # the start-up lines that INFO shows ("listening on") were not written
    assert not any("listening on" in r["message"] for r in before)
    assert any(
        r["message"] == "service log: format json, level INFO (server.log_format, server.log_level)"
        for r in records
    )
    assert any(r["level"] == "INFO" for r in records)


def test_a_reload_switches_the_format_from_text_to_json(served: Any) -> None:
    s = served()
    s.start()
    first = s.lines()
    assert first and all(not line.startswith("{") for line in first)
    assert any(" INFO relaygate: RelayGate RELAY01 listening on " in line for line in first)
    s.write_config('log_format = "json"', banner="220 json now")
    s.reload()
    s.wait_for(lambda: any("configuration reloaded" in m for m in s.messages()))
    s.stop()
    later = s.lines()[len(first) :]
    assert later
    for line in later:
        assert json.loads(line)["time"]
    assert json.loads(later[0])["message"].startswith("service log: format json, level INFO")


#: A text line's process: "" (the supervisor) or "[w0]", "[w1]"...
TEXT_SOURCE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ relaygate(\[w\d+\])?: ")


def test_an_edit_of_the_file_switches_the_supervisor_and_the_workers_to_json(served: Any) -> None:
    """No SIGHUP: the workers' file watchers reload it, the supervisor looks at the file too."""
    s = served(workers=2)
    s.start()
    first = s.lines()
    assert any("[w1]: RelayGate RELAY01 listening on" in line for line in first)
    s.write_config('log_format = "json"', banner="220 json now")
    s.wait_for(lambda: sum(m.startswith("service log: format json") for m in s.messages()) >= 3)
    assert s.stop() == 0
    # Each process's lines are JSON from its switch on; one may log a text line (something
    # that happened at start-up, late) before its watcher saw the edit.
    later = []
    switched_sources: set[str] = set()
    for line in s.lines()[len(first) :]:
        text = TEXT_SOURCE.search(line)
        if text is not None:
            assert text.group(1) not in switched_sources, line
            continue
        record = json.loads(line)
        if record["message"].startswith("service log: format json"):
            switched_sources.add(f"[w{record['worker']}]" if "worker" in record else "")
        later.append(record)
    assert s.proc is not None
    switched = [r for r in later if r["message"].startswith("service log: format json")]
    assert sorted(r.get("worker", -1) for r in switched) == [-1, 0, 1]
    assert any(r["message"] == "stopping 2 workers" and "worker" not in r for r in later)


def test_the_flags_win_over_the_file_in_the_supervisor_and_the_workers(
    served: Any, sink: tuple[Sink, int]
) -> None:
    """--log-format json with a file that says text (twice: a reload keeps the flag), two
    workers: every line JSON; --log-level DEBUG shows debug lines."""
    s = served(workers=2, server_extra='log_format = "text"\nlog_level = "ERROR"')
    s.start("--log-format", "JSON", "--log-level", "debug")
    send(s.port, ["bob@corp.example"])
    s.wait_for(lambda: sink[0].count() >= 1)
    s.write_config('log_format = "text"\nlog_level = "ERROR"', banner="220 still json")
    s.reload()
    s.wait_for(lambda: sum("configuration reloaded" in m for m in s.messages()) >= 2)
    assert s.stop() == 0
    records = s.records()
    assert s.proc is not None
    for record in records:
        check_record(record, s.proc.pid, 2)
    assert {r["worker"] for r in records if "worker" in r} == {0, 1}
    assert any(r["level"] == "DEBUG" for r in records)
    assert not any("service log:" in r["message"] for r in records)  # nothing to switch


def test_a_config_error_at_start_is_json_with_the_flag(served: Any) -> None:
    s = served(server_extra='log_level = "LOUD"\nworker_balance = "random"')
    s.start("--log-format", "json", expect_ready=False)
    assert s.proc is not None
    assert s.proc.wait(60) == 1
    records = s.records()
    by_key = {r.get("key"): r for r in records}
    assert by_key["server.log_level"]["level"] == "ERROR"
    assert (
        "'LOUD' is not one of DEBUG, INFO, WARNING, ERROR" in by_key["server.log_level"]["message"]
    )
    assert "server.worker_balance" in by_key
    assert records[-1]["message"] == "cannot start: 2 configuration error(s)"
    assert all(TIME.match(r["time"]) and r["pid"] == s.proc.pid for r in records)


def test_a_bad_flag_value_is_refused_naming_the_flag() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--log-format", "xml"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2
    assert "--log-format" in out.stderr and "'xml' is not one of text, json" in out.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--help"],
        capture_output=True,
        text=True,
        env=dict(env, COLUMNS="200"),
        timeout=60,
    )
    assert "--log-format" in helped.stdout and "--log-level" in helped.stdout


# -- the formatters on a real logger ----------------------------------------------------------------


def _logged(formatter: logging.Formatter, *args: Any, exc: bool = False, extra: Any = None) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    # outside the logger tree: nothing reaches pytest's own log capture (its xdist reports
    # cannot carry the lone surrogate of a non-UTF-8 byte)
    logger = logging.Logger("relaygate.test-service-log")
    logger.addHandler(handler)
    try:
        if exc:
            try:
                raise ValueError("bad\nvalue")
            except ValueError:
                logger.exception(*args)
        else:
            logger.warning(*args, extra=extra)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_text_format_escapes_control_characters_of_the_values_it_interpolates() -> None:
    """A value from outside (an address, a remote server's reply, an exception text) cannot start
    a line of its own, or move the cursor, in the text service log."""
    text = _logged(
        TextFormatter(),
        "message %s: report to %s: %s",
        "Q1",
        "a\r\n2026-12-07 03:00:00,000 ERROR relaygate: forged@x",
        OSError("550 no\nsuch\x1b[2Kuser \udcff"),
    )
    assert text.count("\n") == 1, text
    assert "a\\r\\n2026-12-07 03:00:00,000 ERROR relaygate: forged@x" in text
    assert "550 no\\nsuch\\x1b[2Kuser \\xff" in text
    worker = _logged(TextFormatter(3), "plain %d", 5)
    assert re.match(
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING relaygate\.test-service-log"
        r"\[w3\]: plain 5\n$",
        worker,
    ), worker


def test_text_format_keeps_the_lines_of_a_config_error() -> None:
    error = ConfigError([Problem("f.toml", "server.workers", "bad"), Problem("f.toml", "x", "y")])
    text = _logged(TextFormatter(), "reload refused, configuration invalid:\n%s", error)
    assert text.endswith(
        ": reload refused, configuration invalid:\nf.toml: server.workers: bad\nf.toml: x: y\n"
    )


def test_json_format_one_ascii_line_whatever_the_message_holds() -> None:
    line = _logged(JsonFormatter(1), "from %s: %s", "ev\r\nil\x00\u2028", "b\udcffd", exc=True)
    assert line.count("\n") == 1 and line.isascii()
    record = json.loads(line)
    assert record["message"] == "from ev\r\nil\x00\u2028: b\\xffd"
    assert record["worker"] == 1 and record["level"] == "ERROR"
    assert record["exception"].startswith("Traceback (most recent call last):\n")
    assert record["exception"].endswith("ValueError: bad\nvalue")


def test_text_format_a_line_without_control_characters_is_as_before() -> None:
    """Text-format users see the same lines as before (logging.basicConfig's format) whenever
    the values put no raw control character in the line: %r of a string, a dict argument, a
    mapping argument already print their control characters as Python escapes, and escaping
    them again wrote `\\\\n` (`'a\\\\nb'`) where the line had `\\n`."""
    old = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    calls: list[tuple[Any, ...]] = [
        ("reply %r", "550 no\nsuch\x1b[2K user\udcff"),
        ("reply %r from %s", "a\r\nb", "host.example"),
        ("answer %s", {"reply": "a\nb\x1b", "code": 550}),
        ("answer %(reply)r (%(code)d)", {"reply": "a\nb\x1b", "code": 550}),
        ("recipients %s", ["a\nb@corp.example", "c@corp.example"]),
        ("failed: %r", OSError("550 no\nsuch user")),
        ("plain %s %d %.1f %r", "text", 5, 2.5, b"by\x00tes"),
    ]
    for call in calls:
        new_line = _logged(TextFormatter(), *call)
        old_line = _logged(old, *call)
        # the same but for the time stamp
        assert new_line.split(" ", 2)[2] == old_line.split(" ", 2)[2], call
        assert new_line.count("\n") == 1, call


def _strict_json(line: str) -> dict[str, Any]:
    """json.loads as a strict reader (jq, Go, JavaScript): NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    record = json.loads(line, parse_constant=refuse)
    assert isinstance(record, dict)
    return record


def test_json_format_exotic_extra_values_still_make_one_strict_json_line() -> None:
    """`extra` values of any type: one line a strict JSON reader parses, and the log call never
    raises (a self-referencing list recursed until RecursionError, which logging lets through to
    the caller; NaN was written as `NaN`; an object whose str() fails lost the line to a
    '--- Logging error ---' traceback in free text)."""
    from datetime import UTC, datetime

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

        __repr__ = __str__

    loop: list[Any] = [1]
    loop.append(loop)
    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    extra = {
        "nan": float("nan"),
        "inf": float("inf"),
        "ninf": [float("-inf")],
        "loop": loop,
        "cycle": cycle,
        "deep": deep,
        "odd": Unprintable(),
        "keys": {1: "one", None: "none", ("a", 2): b"\x00\xff", Unprintable(): 1},
        "path": Path("/var/lib/relaygate"),
        "when": datetime(2026, 12, 7, 3, 0, tzinfo=UTC),
        "error": OSError("550 no\nsuch user"),
    }
    line = _logged(JsonFormatter(), "exotic %s", "values", extra=extra)
    assert line.count("\n") == 1 and line.isascii(), line[:500]
    record = _strict_json(line)
    assert record["message"] == "exotic values"
    assert record["nan"] == "nan" and record["inf"] == "inf" and record["ninf"] == ["-inf"]
    assert record["loop"][0] == 1 and isinstance(record["deep"], list)
    assert record["odd"] == "<unprintable Unprintable>"
    assert record["keys"]["1"] == "one" and record["keys"]["None"] == "none"
    assert record["path"] == "/var/lib/relaygate" and record["error"] == "550 no\nsuch user"
    assert record["when"].startswith("2026-12-07 03:00:00")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_reload_to_a_higher_level_still_says_what_is_in_force(served: Any, workers: int) -> None:
    """A reload that raises log_level (INFO to ERROR) wrote its 'service log: ...' line at INFO,
    after the new level was set: the line was filtered out, and nothing in the log said the
    level had changed (nor from which process)."""
    s = served(workers=workers, server_extra='log_format = "json"')
    s.start()
    s.write_config('log_format = "json"\nlog_level = "ERROR"', banner="220 quiet now")
    s.reload()
    expected = workers + 1 if workers > 1 else 1  # the supervisor and each worker, or the one
    s.wait_for(
        lambda: (
            sum(m.startswith("service log: format json, level ERROR") for m in s.messages())
            >= expected
        )
    )
    assert s.stop() == 0
    switched = [r for r in s.records() if r["message"].startswith("service log:")]
    assert [r["level"] for r in switched] == ["INFO"] * expected, switched
    # and nothing else below ERROR after it
    records = s.records()
    first = records.index(switched[0])
    assert not [
        r
        for r in records[first:]
        if r["level"] in ("DEBUG", "INFO", "WARNING") and r not in switched
    ]


def test_a_worker_restarted_on_an_invalid_file_logs_its_refusal_as_json(served: Any) -> None:
    """log_format = "json" in the file, two workers; the file is then edited into an invalid
    one and a worker dies. The one the supervisor started in its place read the invalid file,
    refused to start (its problems once printed as free text into the JSON stream) and did so
    again at every restart. Now the supervisor refuses the reload once, in JSON, and the new
    worker starts with the configuration the node runs."""
    s = served(workers=2, server_extra='log_format = "json"')
    s.start()
    s.write_config('log_format = "json"\nlog_level = "LOUD"', banner="220 broken")
    s.wait_for(lambda: any("reload refused" in m for m in s.messages()))
    pids = {
        json.loads(line)["pid"]
        for line in s.lines()
        if line.startswith("{") and json.loads(line).get("worker") == 1
    }
    os.kill(pids.pop(), signal.SIGKILL)

    def listening(worker: int) -> int:
        try:
            records = s.records()
        except ValueError:  # a line being written: not complete yet
            return 0
        return sum(
            1
            for r in records
            if r.get("worker") == worker and r["message"].startswith("RelayGate RELAY01 listening")
        )

    s.wait_for(lambda: listening(1) == 2, timeout=40)
    assert s.stop() == 0
    records = s.records()  # every line is JSON
    refused = [r for r in records if "'LOUD' is not one of" in r["message"]]
    assert len(refused) == 1 and "worker" not in refused[0], refused
    assert not any("cannot start" in r["message"] for r in records)


def test_json_format_an_argument_that_cannot_be_printed_still_makes_a_json_line() -> None:
    """An argument whose str() and repr() raise: JsonFormatter's fallback for a message it cannot
    build used repr(), which raised too, and the line became a free-text '--- Logging error ---'
    traceback in the JSON stream."""

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

        __repr__ = __str__

    errors = io.StringIO()
    saved, sys.stderr = sys.stderr, errors  # where logging reports an error while logging
    try:
        line = _logged(JsonFormatter(), "value %s from %s", Unprintable(), "host.example")
    finally:
        sys.stderr = saved
    assert errors.getvalue() == ""
    record = _strict_json(line)
    assert record["message"] == "'value %s from %s' % (<unprintable Unprintable>, 'host.example')"
    assert line.count("\n") == 1


def test_json_an_exception_python_ignores_is_a_json_line_too() -> None:
    """An exception raised in a __del__ (or a finalizer, a weakref callback) is one Python can
    only report: 'Exception ignored in: ...' and a traceback, in free text on stderr, among the
    JSON lines (sys.unraisablehook was not routed to the log as sys.excepthook and
    threading.excepthook were). A real process, its stderr parsed line by line."""
    code = (
        "from relaygate.logs import service\n"
        "service.configure('json', 'INFO')\n"
        "class Leaky:\n"
        "    def __del__(self):\n"
        "        raise ValueError('in __del__')\n"
        "Leaky()\n"
        "import threading\n"
        "t = threading.Thread(target=lambda: 1 / 0)\n"
        "t.start(); t.join()\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    records = [_strict_json(line) for line in out.stderr.splitlines()]
    ignored = [r for r in records if "Leaky.__del__" in r["message"]]
    assert ignored and ignored[0]["level"] == "ERROR", records
    assert ignored[0]["message"].startswith("Exception ignored in: <function Leaky.__del__")
    assert ignored[0]["exception"].endswith("ValueError: in __del__")
    assert any("uncaught exception in thread" in r["message"] for r in records)


def test_text_format_warnings_and_ignored_exceptions_go_through_the_stderr_buffer() -> None:
    """In the text format a `warnings.warn` and an exception Python ignores (in a __del__) were
    written by Python straight to stderr, past the StderrBuffer: with a stderr nobody reads (a
    stalled log shipper, the pipe full) the thread that warned (the event loop) waited for
    ever. Now they are service-log lines in the buffer, after the lines logged before them. A
    real process whose stderr pipe the test does not read until it says it got past both."""
    code = (
        "import sys, warnings\n"
        "from relaygate.logs import service\n"
        "service.buffer_stderr()\n"
        "service.configure('text', 'INFO')\n"
        "import logging\n"
        "for i in range(2000):\n"
        "    logging.getLogger('relaygate').info('filler %04d %s', i, 'x' * 60)\n"
        "warnings.warn('a deprecated thing')\n"
        "class Leaky:\n"
        "    def __del__(self):\n"
        "        raise ValueError('in __del__')\n"
        "Leaky()\n"
        "print('past both', flush=True)\n"
        "sys.stdin.read()\n"  # stay until the test has read stdout
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    try:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready, "the process waited for its stderr"
        assert proc.stdout.readline() == b"past both\n"
        proc.stdin.close()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = err.splitlines()
    filler = [i for i, line in enumerate(lines) if "filler " in line]
    assert len(filler) == 2000
    warned = [i for i, line in enumerate(lines) if "a deprecated thing" in line]
    assert warned and warned[0] > filler[-1]
    assert "WARNING" in lines[warned[0]] and "py.warnings" in lines[warned[0]]
    ignored = [i for i, line in enumerate(lines) if "Leaky.__del__" in line]
    assert ignored and ignored[0] > warned[0]
    assert "ValueError: in __del__" in err


def test_an_exception_python_ignores_at_exit_still_reaches_stderr() -> None:
    """An exception ignored in a __del__ while the interpreter shuts down (a module global, a
    cycle collected last), after the StderrBuffer's last flush at exit: put in the buffer, it
    was never written, where Python used to write it to stderr (reproduced: nothing at all).
    Then it goes to stderr as Python writes it."""
    code = (
        "from relaygate.logs import service\n"
        "service.buffer_stderr()\n"
        "service.configure('text', 'INFO')\n"
        "class Leaky:\n"
        "    def __del__(self):\n"
        "        raise ValueError('in __del__ at exit')\n"
        "keep = Leaky()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
    )
    assert done.returncode == 0
    err = done.stderr.decode()
    assert "Exception ignored in: <function Leaky.__del__" in err, err
    assert "ValueError: in __del__ at exit" in err, err


# -- httpx and httpcore held back (relaygate.logs.service.QUIET_LOGGERS) ----------------------------

HTTPX_USER = """\
import sys
import httpx
from relaygate.logs.service import configure

configure(sys.argv[1], sys.argv[2])
# any httpx user (a token endpoint, an ACME CA), in a process that never imported the Graph code
assert "relaygate.delivery.graph" not in sys.modules
reply = httpx.get(f"http://127.0.0.1:{sys.argv[3]}/upload?authtoken=SECRET-TOKEN-123", timeout=10)
assert reply.status_code == 204, reply
"""


class _NoContent(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(204)
        self.send_header("Location", "/next?authtoken=SECRET-TOKEN-123")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:  # not on the test's stderr
        pass


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_configure_keeps_httpx_request_lines_out_whatever_the_level(
    log_format: str, level: str
) -> None:
    """The service log's setup itself holds httpx and httpcore at WARNING (it was a side effect
    of importing the Graph code): a URL or a header with a token is never logged."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoContent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        out = subprocess.run(
            [sys.executable, "-c", HTTPX_USER, log_format, level, str(server.server_address[1])],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert out.returncode == 0, out.stderr
    assert "HTTP Request:" not in out.stderr
    assert "SECRET-TOKEN" not in out.stderr
    assert "httpcore" not in out.stderr and "httpx" not in out.stderr


def test_importing_the_graph_code_changes_no_logger() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import logging, relaygate.delivery.graph as g; "
            "print(logging.getLogger('httpx').level, logging.getLogger('httpcore').level)",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(ROOT / "src")),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"]  # NOTSET: the service log's setup decides


def test_two_tracebacks_at_once_leave_stderr_as_it_was() -> None:
    """Python's hooks write a traceback to sys.stderr, which `_through_buffer` points at a
    StringIO meanwhile (contextlib.redirect_stderr: for the whole process). Two threads' uncaught
    exceptions at once each saved and restored sys.stderr, the second restoring the first's
    StringIO: every later traceback and warning went nowhere. They now take turns."""
    from relaygate.logs import service

    class Collected:
        def __init__(self) -> None:
            self.pieces: list[bytes] = []

        def put(self, data: bytes) -> None:
            self.pieces.append(data)

    collected = Collected()
    original = sys.stderr

    def slow_hook(name: str) -> None:
        print(f"traceback of {name}", file=sys.stderr)
        time.sleep(0.2)  # the other thread's hook starts meanwhile

    threads = [
        threading.Thread(target=service._through_buffer, args=(collected, lambda n=n: slow_hook(n)))
        for n in ("a", "b")
    ]
    threads[0].start()
    time.sleep(0.05)
    threads[1].start()
    for t in threads:
        t.join(5)
    left, sys.stderr = sys.stderr, original  # restored for the tests after this one, whatever
    assert left is original
    assert sorted(collected.pieces) == [b"traceback of a\n", b"traceback of b\n"]


def test_each_workers_start_up_lines_are_on_stderr_before_the_ready_line(served: Any) -> None:
    """As in one process: whoever reads the ready line on stdout finds every worker's start-up
    lines on stderr already, the last one (the collector's tuning, logged just before the worker
    says it is ready) included. A worker's lines pass through its own buffer, its pipe and the
    supervisor's buffer: the supervisor waited for its own buffer only."""
    for attempt in range(1, 4):
        s = served(workers=2)
        s.start()
        last_lines = [line for line in s.lines() if "garbage collector:" in line]
        assert len(last_lines) == 2 * attempt, s.text()
        assert s.stop() == 0
