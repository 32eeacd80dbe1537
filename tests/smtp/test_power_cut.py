"""A 250 survives a power cut (security-bar §4B item 167): the queue's data directory on a file
system that forgets what was not fsync'd (tests/support/lazy_fs.py), SIGKILL the relay, cut the
power, restart, and every acknowledged message is delivered, byte for byte.

The SIGKILL tests (test_durability.py) cannot catch a missing fsync: the kernel keeps the page cache
of a killed process's writes. Here the cut also throws away every write, file creation, rename and
unlink that no fsync of the file (content) or of its directory (entries) made durable. The first
tests show that the file system does forget all of those, SQLite commits made without an fsync
included, so that the relay's test would catch a missing fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import smtplib
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomlkit
from aiosmtpd.controller import Controller

from relaygate.config.loader import load_config
from relaygate.durable_dirs import fsync_dir
from tests.smtp.conftest import RelayHandle, relay_connector
from tests.smtp.helpers import free_port
from tests.support.lazy_fs import LazyMount, lazy_mount

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[LazyMount]:
    with lazy_mount(tmp_path / "lazy") as mount:
        yield mount


def write_file(path: Path, data: bytes, *, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- the model bites


def test_a_file_never_fsyncd_is_gone_or_empty_after_a_cut(lazy: LazyMount):
    root = lazy.mountpoint
    (root / "entry-synced").mkdir()
    write_file(root / "entry-synced" / "file", b"content never synced", fsync=False)
    fsync_dir(root)
    fsync_dir(root / "entry-synced")
    write_file(root / "nothing-synced", b"lost", fsync=False)
    assert (root / "nothing-synced").read_bytes() == b"lost"  # before the cut: all there
    discarded = lazy.cut()
    assert not (root / "nothing-synced").exists()
    assert (root / "entry-synced" / "file").read_bytes() == b""  # its entry was made durable
    assert discarded["bytes"] >= len(b"lost") + len(b"content never synced")
    assert discarded["entries"] >= 1


def test_a_file_fsyncd_without_its_directory_loses_its_entry(lazy: LazyMount):
    root = lazy.mountpoint
    (root / "sub").mkdir()
    fsync_dir(root)  # "sub" is durable, its entries are not
    write_file(root / "sub" / "file", b"synced content", fsync=True)
    discarded = lazy.cut()
    assert (root / "sub").is_dir()
    assert os.listdir(root / "sub") == []
    assert discarded == {"bytes": 0, "entries": 1}


def test_a_file_and_its_directory_fsyncd_survive(lazy: LazyMount):
    root = lazy.mountpoint
    write_file(root / "file", b"first version", fsync=True)
    fsync_dir(root)
    with open(root / "file", "r+b") as f:  # a later change, not fsync'd, is lost
        f.seek(6)
        f.write(b"VERSION, then more")
    assert lazy.cut() == {"bytes": len(b"VERSION, then more"), "entries": 0}
    assert (root / "file").read_bytes() == b"first version"
    with open(root / "file", "r+b") as f:  # the same change with an fsync stays
        f.seek(6)
        f.write(b"VERSION, then more")
        f.truncate(20)
        os.fsync(f.fileno())
    assert lazy.cut() == {"bytes": 0, "entries": 0}
    assert (root / "file").read_bytes() == b"first VERSION, then "


def test_a_rename_without_a_directory_fsync_is_undone(lazy: LazyMount):
    root = lazy.mountpoint
    write_file(root / "old", b"content", fsync=True)
    fsync_dir(root)
    os.rename(root / "old", root / "new")
    os.unlink(root / "new")  # and unlinking it as well: neither reaches the durable tree
    write_file(root / "other", b"synced, entry not", fsync=True)
    os.rename(root / "other", root / "renamed")
    discarded = lazy.cut()
    assert sorted(os.listdir(root)) == ["old"]
    assert (root / "old").read_bytes() == b"content"
    assert discarded["entries"] == 2  # "old" removed, "renamed" added


SQLITE_WRITER = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
assert db.execute("PRAGMA journal_mode = WAL").fetchone()[0] == "wal"
db.execute("PRAGMA synchronous = FULL")
db.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v BLOB)")
db.execute("INSERT INTO t VALUES ('full', randomblob(100000))")
db.execute("PRAGMA synchronous = OFF")
db.execute("INSERT INTO t VALUES ('off', randomblob(100000))")
reader = sqlite3.connect(sys.argv[1])  # a second connection sees both: the -shm index is shared
print(reader.execute("SELECT count(*) FROM t").fetchone()[0], flush=True)
time.sleep(60)  # SIGKILLed here: no close, no checkpoint
"""


def test_sqlite_wal_keeps_what_synchronous_full_committed_and_not_more(lazy: LazyMount):
    """SQLite in WAL mode works on the mount (mmap'd -shm, fcntl locks, a directory fsync after
    creating the WAL); a commit with synchronous=FULL survives a cut, one with OFF does not. The
    writer is a process SIGKILLed before the cut, as the relay is."""
    path = lazy.mountpoint / "q.db"
    writer = subprocess.Popen(
        [sys.executable, "-c", SQLITE_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline() == "2\n"
    finally:
        writer.kill()
        writer.wait(10)
    discarded = lazy.cut()
    assert discarded["bytes"] >= 100000, discarded
    after = sqlite3.connect(path)
    try:
        assert after.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = [k for (k,) in after.execute("SELECT k FROM t")]
    finally:
        after.close()
    assert rows == ["full"]


# ---------------------------------------------------------------------- the relay

MESSAGES = 30
SESSIONS = 3
BIG_EVERY = 5  # every fifth message is over SPOOL_THRESHOLD: a spool file, not a database row
MESSAGE_ID = re.compile(rb"^Message-ID: <([^>]+)>\r\n", re.MULTILINE)


def power_message(n: int) -> tuple[str, bytes]:
    """Message n: its Message-ID and its bytes (CRLF lines, as they travel)."""
    message_id = f"power-{n}.{os.getpid()}@corp.example"
    lines = 2000 if n % BIG_EVERY == 0 else 1 + n % 17
    body = b"".join(b"line %d of message %d, power cut test\r\n" % (i, n) for i in range(lines))
    content = b"Message-ID: <%s>\r\nSubject: power %d\r\n\r\n%s" % (
        message_id.encode(),
        n,
        body,
    )
    return message_id, content


def power_off(r: RelayHandle) -> None:
    """SIGKILL `relaygate serve` and its workers together, as a power cut stops them (a worker
    that outlived its supervisor would stop gracefully, flushing what it holds)."""
    assert r.proc is not None
    pid = r.proc.pid
    tasks = Path(f"/proc/{pid}/task")
    workers = [
        int(child) for task in tasks.iterdir() for child in (task / "children").read_text().split()
    ]
    for victim in [*workers, pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)
    r.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(_running(w) for w in workers), workers


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class _Sink:
    """The smart host on loopback: answers 451 while `busy` (messages stay queued), or only to
    every other message when `mixed` (the rest is delivered before the cuts), then takes
    everything, keeping the SHA-256 of each message from its Message-ID line on (the relay puts
    its Received header above it)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.busy = True
        self.mixed = False
        self.deferred = 0
        self.received: dict[str, set[str]] = {}  # Message-ID -> hashes of the copies received

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        if self.busy:
            with self.lock:
                self.deferred += 1
                turned_away = not self.mixed or self.deferred % 2
            if turned_away:
                return "451 4.3.0 Busy, try again later"
        data = bytes(envelope.original_content or envelope.content)
        found = MESSAGE_ID.search(data)
        if found:
            digest = hashlib.sha256(data[found.start() :]).hexdigest()
            with self.lock:
                self.received.setdefault(found.group(1).decode(), set()).add(digest)
        await asyncio.sleep(0)
        return "250 2.0.0 Ok: queued"


class _Sender:
    """Sends messages in sessions from a thread, recording each one the relay answered 250."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # Message-ID -> SHA-256 of the bytes sent
        self.errors: list[str] = []

    def session(self, numbers: range) -> None:
        try:
            with smtplib.SMTP(
                "127.0.0.1", self.port, timeout=15, source_address=("127.0.0.5", 0)
            ) as s:
                s.ehlo("power.corp.example")
                for n in numbers:
                    message_id, content = power_message(n)
                    s.mail("app@corp.example")
                    s.rcpt(f"user{n}@external.example")
                    code, _ = s.data(content)
                    if code == 250:
                        with self.lock:
                            self.acked[message_id] = hashlib.sha256(content).hexdigest()
        except (OSError, smtplib.SMTPException) as exc:
            with self.lock:
                self.errors.append(repr(exc))  # the relay was killed under this session

    def sessions(self, first: int, count: int, per_session: int) -> None:
        for start in range(first, first + count * per_session, per_session):
            self.session(range(start, start + per_session))

    def count(self) -> int:
        with self.lock:
            return len(self.acked)


@pytest.mark.parametrize(
    ("workers", "mixed"),
    [(1, False), (2, False), (1, True)],
    ids=["one-process", "two-workers", "some-delivered-before"],
)
def test_acknowledged_messages_are_delivered_after_a_power_cut(
    relay, lazy: LazyMount, workers: int, mixed: bool
):
    """The relay's data directory (queue database, its WAL, spool files) on the lazy mount. The
    smart host answers 451, so the messages stay queued. A background sender runs three sessions
    of ten messages; once two thirds are acknowledged the relay is SIGKILLed mid-session and the
    power cut; the relay comes back, the rest is sent, and a second cut follows right after the
    last 250. Then the smart host takes mail, and every message that got a 250 must arrive with
    its bytes intact. With two workers the supervisor starts first (and creates data_dir) and
    each worker has its own store on the shared database. With `mixed`, the smart host takes
    every other message before the cuts: the deliveries' bookkeeping (not fsync'd: a lost one
    means a second copy) is cut too."""
    sink = _Sink()
    sink.mixed = mixed
    controller = Controller(sink, hostname="127.0.0.1", port=free_port())
    controller.start()
    r = relay(
        [relay_connector(["127.0.0.0/24"], protocol_logging_level="None")],
        mode="process",
        start=False,
        # data_dir does not exist yet: a first start creates it (and must do so durably)
        server={"data_dir": str(lazy.mountpoint / "relaygate"), "workers": workers},
        queue={
            "transient_failure_retry_interval": "00:00:01",
            "message_retry_interval": "00:00:01",
        },
    )
    try:
        r.doc["send_connectors"][0]["port"] = controller.port
        r.config_path.write_text(tomlkit.dumps(r.doc), encoding="utf-8")
        r.config = load_config(r.config_path)
        r.start()
        sender = _Sender(r.port)
        per_session = MESSAGES // SESSIONS
        background = threading.Thread(target=sender.sessions, args=(1, SESSIONS, per_session))
        background.start()
        deadline = time.monotonic() + 30
        while sender.count() < 2 * per_session and time.monotonic() < deadline:
            time.sleep(0.002)  # the kill must fall inside the third session
        power_off(r)  # mid-session: the third one is under way
        first_cut = lazy.cut()
        background.join(30)
        assert not background.is_alive()
        acked_before = sender.count()
        assert acked_before >= 2 * per_session, (acked_before, sender.errors)
        assert sender.errors, "the kill fell after the last message: nothing was in flight"
        r.start()
        sender.session(range(MESSAGES + 1, MESSAGES + per_session + 1))  # after the restart
        assert sender.count() == acked_before + per_session, sender.errors
        power_off(r)  # right after the last 250
        second_cut = lazy.cut()
        # The cuts did throw writes away (the leases and the -shm index are not fsync'd), so a
        # write the relay forgot to fsync would have gone too.
        assert first_cut["bytes"] > 0 and second_cut["bytes"] > 0, (first_cut, second_cut)
        assert sink.deferred, "no delivery was tried before the cuts"
        with sink.lock:
            delivered_before = len(sink.received)
        assert bool(delivered_before) == mixed, delivered_before
        r.start()
        sink.busy = False
        wanted = dict(sender.acked)

        def not_delivered() -> dict[str, str]:
            with sink.lock:
                return {
                    mid: "never arrived" if mid not in sink.received else "bytes differ"
                    for mid, digest in wanted.items()
                    if digest not in sink.received.get(mid, set())
                }

        deadline = time.monotonic() + 30
        missing = not_delivered()
        while missing and time.monotonic() < deadline:
            time.sleep(0.2)
            missing = not_delivered()
        assert not missing, (
            f"{len(missing)} of {len(wanted)} acknowledged messages lost to a power cut "
            f"(cuts discarded {first_cut}, {second_cut}): {sorted(missing.items())[:10]}; the "
            f"smart host got {sorted(sink.received)}"
        )
    finally:
        r.stop()  # before the mount goes (the `lazy` fixture's finalizer)
        controller.stop()


def test_a_dkim_key_written_by_dkim_new_survives_a_cut(lazy: LazyMount):
    """`relaygate dkim new` prints the DNS record to publish: the key must still be there after
    a power cut, or the published record names a key the relay no longer has (every message it
    signs fails). The key file and its folder were synced, but the folders it created
    (<data_dir>/dkim/<domain>) were not: after a cut on a new data_dir the key was gone."""
    data = lazy.mountpoint / "data"
    data.mkdir()
    fsync_dir(lazy.mountpoint)  # the data_dir itself exists durably (an installed relay's)
    proc = subprocess.run(
        [sys.executable, "-m", "relaygate", "dkim", "new", "--domain", "corp.example",
         "--selector", "s1", "--data-dir", str(data), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    key = data / "dkim" / "corp.example" / "s1.key"
    written = key.read_bytes()
    discarded = lazy.cut()
    assert key.exists(), f"the key is gone after the cut (discarded: {discarded})"
    assert key.read_bytes() == written


def test_a_user_added_by_the_cli_survives_a_cut(lazy: LazyMount, tmp_path: Path):
    """`relaygate user add` says the user is added: after a power cut the users file must still
    hold it (the file was synced before its rename, but the rename itself, an entry of the
    folder, was not: the cut brought back the file without the user, or no file at all)."""
    data = lazy.mountpoint / "data"
    data.mkdir()
    fsync_dir(lazy.mountpoint)
    config = tmp_path / "relaygate.toml"
    config.write_text(f'[server]\ndata_dir = "{data}"\n', encoding="utf-8")
    for name in ("scanner01", "scanner02"):
        proc = subprocess.run(
            [sys.executable, "-m", "relaygate", "user", "add", name, "--password-stdin",
             "--config", str(config)],
            input="a long enough password\n", capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
    users = data / "users.json"
    written = users.read_bytes()
    assert b"scanner02" in written
    lazy.cut()
    assert users.exists(), "the users file is gone after the cut"
    assert users.read_bytes() == written
