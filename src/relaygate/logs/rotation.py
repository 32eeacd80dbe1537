"""Rotating, circular CSV log directory shared by the protocol log and the message tracking log.

The layout follows Exchange (reference/exchange-semantics.md §6.1):

* files named ``<PREFIX><yyyymmddHH>-<n>.LOG`` (UTC hour; ``n`` starts at 1 and increments when a file
  is full or when another writer already holds that number), a new file at least every hour;
* every file starts with the ``#Software``/``#Version``/``#Log-type``/``#Date``/``#Fields`` header;
* circular logging: the oldest files are deleted when the directory grows past its maximum size or when
  files are older than the maximum age (a zero age means "never delete by age").

Writers never block on disk I/O. ``append()`` stores an *unformatted* record in an in-memory list under a
lock (a few hundred nanoseconds); a daemon thread wakes every ``flush_interval`` seconds, formats the
batch, writes it with a single ``write()`` per file and does the rotation and cleanup work. ``flush()``
and ``close()`` drain synchronously (they do block: call them from a worker thread, at shutdown or in
tests, not per command on the event loop).

A record is a tuple whose first element is the event time as a POSIX timestamp (``time.time()``);
the ``formatter`` turns the whole tuple into one line without its terminator. Lines end with CRLF as
in Exchange's files.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

__all__ = [
    "DEFAULT_FLUSH_INTERVAL",
    "HEADER_DATE_PLACEHOLDER",
    "LINE_END",
    "LogDirectory",
    "LogFileName",
    "csv_field",
    "format_timestamp",
    "log_file_name",
    "parse_log_file_name",
]

_log = logging.getLogger(__name__)

DEFAULT_FLUSH_INTERVAL = 0.2
LINE_END = "\r\n"
#: A header line containing this placeholder gets the file's creation time (ISO, ms, Z) in its place.
HEADER_DATE_PLACEHOLDER = "{date}"
#: How often the background thread re-runs the age-based cleanup even when nothing rotates.
CLEANUP_INTERVAL = 60.0
#: Records a directory keeps queued while its writes do not complete (a hung disk or NFS mount):
#: the oldest beyond it are dropped. Normally a queue holds one flush interval's records.
DEFAULT_MAX_PENDING = 50_000
#: How often the watchdog looks at the queues' lengths.
WATCHDOG_INTERVAL = 0.5

Record = tuple[Any, ...]


def csv_field(value: str) -> str:
    """Quote ``value`` the way the csv module's QUOTE_MINIMAL does: only when it holds a comma, a
    double quote, CR or LF; embedded double quotes are doubled."""
    if '"' in value:
        return '"' + value.replace('"', '""') + '"'
    if "," in value or "\n" in value or "\r" in value:
        return '"' + value + '"'
    return value


# A one-entry cache of the formatted second: log lines arrive in bursts within the same second, so the
# strftime runs about once per second per thread and the rest is a small f-string.
_ts_cache: tuple[int, str] = (-1, "")


def format_timestamp(ts: float) -> str:
    """``2023-01-11T15:59:51.433Z`` for a POSIX timestamp (UTC, milliseconds, truncated)."""
    global _ts_cache
    sec = int(ts)
    cached_sec, prefix = _ts_cache
    if sec != cached_sec:
        prefix = time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        _ts_cache = (sec, prefix)
    ms = int((ts - sec) * 1000)
    if ms > 999:  # float rounding guard
        ms = 999
    return f"{prefix}{ms:03d}Z"


def log_file_name(prefix: str, hour_key: int, number: int) -> str:
    """``RECV2023011116-1.LOG`` for ``hour_key`` = POSIX seconds // 3600."""
    stamp = time.strftime("%Y%m%d%H", time.gmtime(hour_key * 3600))
    return f"{prefix}{stamp}-{number}.LOG"


_NAME_RE = re.compile(
    r"^(?P<prefix>[A-Za-z]+?)(?P<stamp>\d{10}|\d{8})-(?P<n>\d+)\.log$", re.IGNORECASE
)


class LogFileName(NamedTuple):
    prefix: str
    start: datetime  # UTC start of the period the file covers
    number: int
    period: timedelta  # one hour (2013+ names) or one day (2010 names)


def parse_log_file_name(name: str) -> LogFileName | None:
    """Parse ``RECV2023011116-1.LOG`` (2013+, hourly) or ``RECV20190221-2.LOG`` (2010, daily) so
    Exchange's own files can be read too; None for foreign names."""
    m = _NAME_RE.match(name)
    if m is None:
        return None
    stamp = m.group("stamp")
    hourly = len(stamp) == 10
    try:
        start = datetime.strptime(stamp, "%Y%m%d%H" if hourly else "%Y%m%d").replace(tzinfo=UTC)
    except ValueError:
        return None
    period = timedelta(hours=1) if hourly else timedelta(days=1)
    return LogFileName(m.group("prefix"), start, int(m.group("n")), period)


def _default_formatter(record: Record) -> str:
    return str(record[1])


class LogDirectory:
    """One circular directory of ``<prefix><yyyymmddHH>-<n>.LOG`` CSV files."""

    def __init__(
        self,
        path: Path,
        prefix: str,
        header_lines: list[str],
        max_file_size: int,
        max_directory_size: int,
        max_age: timedelta,
        *,
        formatter: Callable[[Record], str] | None = None,
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        start_thread: bool = True,
    ) -> None:
        if max_file_size <= 0 or max_directory_size <= 0:
            raise ValueError("log sizes must be positive")
        self.path = Path(path)
        self.prefix = prefix
        self.header_lines = list(header_lines)
        self.max_file_size = int(max_file_size)
        self.max_directory_size = int(max_directory_size)
        self.max_age = max_age
        self.flush_interval = flush_interval
        self._format = formatter or _default_formatter
        self._name_re = re.compile(rf"^{re.escape(prefix)}(\d{{10}})-(\d+)\.LOG$")

        self._pending: list[Record] = []
        self.append = self._pending.append
        self._pending_lock = threading.Lock()  # guards _closed only
        #: the most records kept queued (see DEFAULT_MAX_PENDING); the watchdog enforces it
        self.max_pending = DEFAULT_MAX_PENDING
        # Held by the two that remove records from the queue, the flush (_take_pending) and the
        # watchdog (_trim_pending): between the flush's slice and its del, a trim would make the
        # del remove records never written. Producers do not take it.
        self._take_lock = threading.Lock()
        self._trimmed = (
            0  # records the watchdog dropped since the flush last completed (_take_lock)
        )
        # Serialises flushes (background thread vs flush()/close()).
        self._io_lock = threading.Lock()
        self._closed = False
        self._dirty = False  # bytes written since the last file flush
        self.dropped = 0  # records lost to I/O errors
        # Why writing fails (None while it works) and the records lost since: a full disk or an
        # unwritable folder is said once when it starts and once when it ends, not per batch.
        self._failure: str | None = None
        self._dropped_in_failure = 0

        self._file: BinaryIO | None = None
        self._file_path: Path | None = None
        self._file_hour = -1
        self._file_number = 0
        self._file_size = 0
        self._header_size = 0
        self._dir_size = 0  # bytes in our files as of the last scan plus what we wrote since
        self._cleanup_at = self.max_directory_size  # rescan when _dir_size passes this
        self._last_cleanup = 0.0

        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        if start_thread:
            self._thread = threading.Thread(
                target=self._run, name=f"relaygate-log-{prefix}", daemon=True
            )
            self._thread.start()
        _watch(self)

    # ----------------------------------------------------------------- producer side (any thread)
    # ``append(record)`` is the pending list's own C-level append, bound in __init__: no Python frame,
    # no lock (list.append is atomic; the flusher takes a prefix with an atomic slice + del). It queues
    # a record ``(timestamp, ...)``; formatting and I/O happen on the flush thread. Records appended
    # after close() are never written.
    append: Callable[[Record], None]

    def append_line(self, line: str, timestamp: float | None = None) -> None:
        """Queue a preformatted line (no terminator) when no ``formatter`` was given."""
        self.append((time.time() if timestamp is None else timestamp, line))

    def set_limits(self, max_file_size: int, max_directory_size: int, max_age: timedelta) -> None:
        """New rotation limits (a reload): the next write rotates by them, the flush thread's next
        pass cleans up by them. Cheap, no I/O: callable from the event loop."""
        if max_file_size <= 0 or max_directory_size <= 0:
            raise ValueError("log sizes must be positive")
        self.max_file_size = int(max_file_size)
        self.max_directory_size = int(max_directory_size)
        self.max_age = max_age
        self._cleanup_at = min(self._cleanup_at, self.max_directory_size)
        self._last_cleanup = 0.0  # the background thread cleans up at its next pass

    def set_formatter(self, formatter: Callable[[Record], str] | None) -> None:
        """A new formatter (a reload): every record appended from now on is written with it (a
        batch reads the formatter after it is taken, so records queued a moment before may be too).
        Cheap, no I/O: callable from the event loop."""
        self._format = formatter or _default_formatter

    @property
    def current_file(self) -> Path | None:
        return self._file_path

    # ----------------------------------------------------------------- flushing
    def flush(self) -> None:
        """Write everything queued so far. Blocks on disk I/O."""
        with self._io_lock:
            batch = self._take_pending()
            if batch:
                self._write_batch(batch)
            self._say_trimmed()
            if self._file is None or not self._dirty:
                return
            self._dirty = False
            try:
                self._file.flush()
            except OSError as exc:
                # The lines stay in the file's buffer: a later flush writes them if it can.
                self._write_failed(exc, 0)
            else:
                self._write_succeeded()

    def close(self) -> None:
        """Stop the flush thread, write what is queued and close the file. Idempotent."""
        with self._pending_lock:
            if self._closed:
                return
            self._closed = True
        _watched.discard(self)
        self._stop = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        # Drain even if the thread did it already: records appended between its last pass and close.
        with self._io_lock:
            batch = self._take_pending()
            if batch:
                self._write_batch(batch)
            self._close_file()

    def __enter__(self) -> LogDirectory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take_pending(self) -> list[Record]:
        pending = self._pending
        with self._take_lock:
            n = len(pending)
            batch = pending[:n]
            del pending[:n]  # producers may have appended after the slice: those stay queued
        return batch

    def _trim_pending(self) -> None:
        """Drop the oldest queued records beyond ``max_pending`` (the watchdog's thread): while a
        write hangs, the flush thread takes nothing and the queue would grow without bound."""
        pending = self._pending
        if len(pending) <= self.max_pending:  # the usual case: no lock
            return
        with self._take_lock:
            excess = len(pending) - self.max_pending
            if excess <= 0:
                return
            del pending[:excess]
            first = self._trimmed == 0
            self._trimmed += excess
            self.dropped += excess
        if first:
            _log.warning(
                "log %s: its writes are stalled (a hung disk or network mount?): the oldest "
                "queued lines beyond %d are dropped until they complete, which will be said",
                self.path,
                self.max_pending,
            )

    def _say_trimmed(self) -> None:
        """After a flush completed: the lines the watchdog dropped while it was stalled, said once."""
        if not self._trimmed:  # the usual case: no lock
            return
        with self._take_lock:
            trimmed, self._trimmed = self._trimmed, 0
        _log.warning(
            "log %s: its writes are no longer stalled; %d lines were dropped meanwhile",
            self.path,
            trimmed,
        )

    def _run(self) -> None:
        while not self._stop:
            self._wake.wait(self.flush_interval)
            if self._stop:
                break
            try:
                self.flush()
                now = time.time()
                if now - self._last_cleanup >= CLEANUP_INTERVAL:
                    with self._io_lock:
                        self._cleanup(now)
            except Exception:  # never let the logger thread die
                _log.exception("log %s: background flush failed", self.path)

    # ----------------------------------------------------------------- writing (under _io_lock)
    def _write_batch(self, batch: list[Record]) -> None:
        fmt = self._format
        if self._file is not None and self._unlinked():
            # Another writer on this folder (a worker process) deleted our file in its cleanup:
            # what we wrote there is gone with it, what follows goes to a new file.
            self._close_file()
        try:
            chunk: list[str] = []
            for record in batch:
                hour = int(record[0]) // 3600
                # Only roll forward: a record a few ms older than the current file's hour (another
                # thread's) stays in the current file instead of reopening the previous hour.
                if self._file is None or hour > self._file_hour:
                    self._write_chunk(chunk)
                    chunk = []
                    self._open_new(max(hour, self._file_hour))
                chunk.append(fmt(record))
                chunk.append(LINE_END)
            self._write_chunk(chunk)
        except OSError as exc:
            self._write_failed(exc, len(batch))
            self._abandon_file()  # reopen (new number) on the next batch

    def _write_chunk(self, chunk: list[str]) -> None:
        if not chunk:
            return
        data = "".join(chunk).encode("utf-8", "backslashreplace")
        if self._file_size + len(data) <= self.max_file_size:
            self._raw_write(data)
            return
        # Near the size limit: go line by line so every file stays under max_file_size.
        for i in range(0, len(chunk), 2):
            line = (chunk[i] + LINE_END).encode("utf-8", "backslashreplace")
            if (
                self._file_size + len(line) > self.max_file_size
                and self._file_size > self._header_size
            ):
                self._open_new(self._file_hour)
            self._raw_write(line)

    def _raw_write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._dirty = True
        self._file_size += len(data)
        self._dir_size += len(data)
        if self._dir_size > self._cleanup_at:
            self._file.flush()
            self._cleanup(time.time())

    def _open_new(self, hour: int) -> None:
        self._close_file()
        self.path.mkdir(parents=True, exist_ok=True)
        number = self._file_number + 1 if hour == self._file_hour else 1
        # Continue after the highest number on disk for this hour (restart, or another writer).
        stamp = time.strftime("%Y%m%d%H", time.gmtime(hour * 3600))
        for entry in os.scandir(self.path):
            m = self._name_re.match(entry.name)
            if m and m.group(1) == stamp:
                number = max(number, int(m.group(2)) + 1)
        header = self._header_bytes()
        while True:
            path = self.path / log_file_name(self.prefix, hour, number)
            try:
                f = open(path, "xb")  # noqa: SIM115 - kept open across batches
            except FileExistsError:
                number += 1
                continue
            # Held while the file is open: another writer's cleanup (server.workers > 1) leaves
            # a file alone whose lock it cannot take (see _unlink).
            fcntl.flock(f.fileno(), fcntl.LOCK_SH)
            if os.fstat(f.fileno()).st_nlink == 0:  # deleted between its creation and the lock
                f.close()
                number += 1
                continue
            break
        self._file, self._file_path = f, path
        self._file_hour, self._file_number = hour, number
        self._header_size = len(header)
        self._file_size = 0
        self._raw_write(header)
        self._cleanup(time.time())

    def _header_bytes(self) -> bytes:
        now = format_timestamp(time.time())
        lines = [h.replace(HEADER_DATE_PLACEHOLDER, now) for h in self.header_lines]
        return "".join(line + LINE_END for line in lines).encode("utf-8")

    def _unlinked(self) -> bool:
        """The open file has no name left (one fstat per batch, not per line)."""
        assert self._file is not None
        try:
            return os.fstat(self._file.fileno()).st_nlink == 0
        except OSError:
            return True

    def _close_file(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError as exc:
                self._write_failed(exc, 0)

    def _abandon_file(self) -> None:
        """Close the file a write failed on; remove it if no line of it reached the disk (a full
        disk: the next batch opens another file, which must not leave one file per attempt)."""
        path = self._file_path if self._file is not None else None
        self._close_file()
        if path is None:
            return
        try:
            if path.stat().st_size <= self._header_size:
                path.unlink()
        except OSError:
            pass  # gone already, or the folder cannot be changed: the file stays

    def _write_failed(self, exc: OSError, lost: int) -> None:
        self.dropped += lost
        self._dropped_in_failure += lost
        if self._failure is not None:
            return
        self._failure = exc.strerror or str(exc)
        _log.warning(
            "log %s: cannot write: %s (mail is relayed as usual; the log's lines are dropped "
            "until it can be written again, which will be said)",
            self.path,
            exc,
        )

    def _write_succeeded(self) -> None:
        if self._failure is None:
            return
        _log.warning(
            "log %s: written again; %d lines were dropped while it could not be (%s)",
            self.path,
            self._dropped_in_failure,
            self._failure,
        )
        self._failure = None
        self._dropped_in_failure = 0

    def _cleanup(self, now: float) -> None:
        """Circular logging: delete files past max_age, then the oldest until under the size cap."""
        self._last_cleanup = now
        try:
            entries = [e for e in os.scandir(self.path) if self._name_re.match(e.name)]
        except FileNotFoundError:
            self._dir_size = 0
            return
        except OSError as exc:
            # Not a directory, no permission: the writes fail too (a folder that can be written
            # but not listed is not a set-up anyone makes). One failure, said once, whichever of
            # the cleanup (its first pass runs at start) and a write meets it first.
            self._write_failed(exc, 0)
            return
        files: list[tuple[float, int, int, str, int]] = []
        for e in entries:
            try:
                st = e.stat()
            except FileNotFoundError:
                continue
            m = self._name_re.match(e.name)
            assert m is not None
            # Oldest first: by mtime, then by name order (hour, number) for equal mtimes.
            files.append((st.st_mtime, int(m.group(1)), int(m.group(2)), e.name, st.st_size))
        files.sort()
        current = self._file_path.name if self._file is not None and self._file_path else None
        if current is not None:  # its buffered bytes are not on disk yet
            files = [f if f[3] != current else (*f[:4], self._file_size) for f in files]
        total = sum(f[4] for f in files)
        max_age = self.max_age.total_seconds()
        kept: list[tuple[float, int, int, str, int]] = []
        for f in files:
            expired = f[3] != current and max_age > 0 and now - f[0] > max_age
            if expired and self._unlink(f[3]):
                total -= f[4]
                continue
            kept.append(f)
        for f in kept:
            if total <= self.max_directory_size:
                break
            if f[3] == current:
                continue
            if self._unlink(f[3]):
                total -= f[4]
        self._dir_size = total
        # If only the open file keeps us over the cap, do not rescan on every write.
        slack = max(self.max_file_size // 8, 4096)
        self._cleanup_at = (
            self.max_directory_size if total <= self.max_directory_size else total + slack
        )

    def _unlink(self, name: str) -> bool:
        """Delete one of our files, unless another writer has it open (its shared lock): with
        several workers on one folder, deleting a file another worker writes to would lose the
        lines it writes before it notices. False if the file was kept."""
        path = self.path / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return True
        except OSError as exc:
            _log.warning("log %s: cannot delete %s: %s", self.path, name, exc)
            return False
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # another writer's open file
            path.unlink()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            _log.warning("log %s: cannot delete %s: %s", self.path, name, exc)
            return False
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- watchdog
# One thread for every LogDirectory of the process: it bounds their queues without a cost per
# record (append is the list's own append) and without the flush thread, which is the one a hung
# write holds.
_watched: weakref.WeakSet[LogDirectory] = weakref.WeakSet()
_watchdog_lock = threading.Lock()
_watchdog_pid: int | None = None  # the process the watchdog runs in (a fork has none)


def _watch(directory: LogDirectory) -> None:
    global _watchdog_pid
    with _watchdog_lock:
        _watched.add(directory)
        if _watchdog_pid == os.getpid():
            return
        _watchdog_pid = os.getpid()
    threading.Thread(target=_run_watchdog, name="relaygate-log-watchdog", daemon=True).start()


def _run_watchdog() -> None:
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        with _watchdog_lock:
            directories = list(_watched)
        for directory in directories:
            try:
                directory._trim_pending()
            except Exception:  # never let the watchdog die
                _log.exception("log %s: trimming its queue failed", directory.path)
