"""The service log: Python logging on stderr (start-up, reloads, delivery errors, worker restarts).

``server.log_format`` (or ``relaygate serve --log-format``) picks the line format:

* ``"text"`` (the default): ``<time> <LEVEL> <logger>[wN]: <message>``, as it always was;
* ``"json"``: one JSON object per line, for containers and log collectors: ``time`` (RFC 3339,
  UTC, milliseconds), ``level``, ``logger``, ``message``, ``worker`` (its index, only in a worker
  process of ``server.workers > 1``), ``pid``, ``exception`` (the formatted traceback, one string)
  and the ``extra`` fields a log call passes.

``server.log_level`` (or ``--log-level``) is the root logger's level. Both apply at start (the
flags before the config is even read), and on a reload (SIGHUP or a file edit) unless a flag set
them. The loggers of QUIET_LOGGERS (httpx, httpcore) stay at WARNING whatever the level: their
INFO and DEBUG lines show request URLs and headers, which can carry a token.

Each line is written with one ``write`` call, under a lock that the process's threads share
(`write_whole`), and is at most MAX_LINE bytes (a longer message, traceback or ``extra`` value is
cut, saying how much; a JSON line stays one JSON object). With ``server.workers > 1`` the
workers' stderr is a pipe that their supervisor reads: it writes their lines to its own stderr
whole, so lines of several processes never interleave (relaygate.logs.worker_output).

The node's main process (``relaygate serve``: the relay itself, or the supervisor of its workers)
writes its stderr from a thread of its own (`StderrBuffer`, `buffer_stderr`): when nobody reads it
(a stalled log shipper: a full pipe), neither its event loop, nor a supervisor's supervision
(restarts, signals) and threads passing its workers' lines on, wait for it. Up to STDERR_BUFFER_LIMIT (4 MiB) waits
meanwhile; the lines on top are dropped, and one line says how many
(``N service-log lines dropped: stderr not read``) where they are missing.

Client-controlled text never splits or forges a line: JSON escapes every control character and
shows a non-UTF-8 byte as ``\\xNN``; in the text format the values interpolated into a message
(``%s`` arguments: addresses, host names, replies, exception texts) have their control characters
escaped (``\\n``, ``\\r``, ``\\x1b``...). Only the message's own format string (written in the code)
and the config errors of the administrator's own file may span lines there.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import math
import os
import re
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from relaygate.config import ConfigError

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MAX_LINE",
    "QUIET_LOGGERS",
    "START_FORMAT_ENV",
    "STDERR_BUFFER_LIMIT",
    "STDERR_FALLBACK_ENV",
    "JsonFormatter",
    "StderrBuffer",
    "TextFormatter",
    "apply_config",
    "buffer_stderr",
    "configure",
    "current",
    "hold_standard_fds",
    "set_overrides",
    "worker_flags",
    "write_whole",
]

LOG_FORMATS = ("text", "json")
#: Set by the supervisor for a worker it starts: the format its own lines are in, which the worker
#: uses until it has read the config file (so that a file it cannot read is logged in that format).
START_FORMAT_ENV = "RELAYGATE_WORKER_LOG_FORMAT"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Held at WARNING by `configure` in every process, whatever server.log_level says (DEBUG too):
#: httpx logs each request's URL at INFO (a Graph upload URL carries its own authorization,
#: ``?authtoken=``; a Graph URL names the mailbox; ACME and token endpoints), httpcore each
#: request's and response's headers at DEBUG (nonces, locations). The relay's own lines say
#: what it needs to.
QUIET_LOGGERS = ("httpx", "httpcore")
#: The longest line the service log writes, in bytes, its newline included (and the longest a
#: supervisor passes on from a worker in one piece: relaygate.logs.worker_output).
MAX_LINE = 64 * 1024
#: Set by the supervisor for a worker: a descriptor of the supervisor's own stderr, which the
#: worker writes to instead of its stderr pipe once that is broken (the supervisor is gone).
STDERR_FALLBACK_ENV = "RELAYGATE_WORKER_STDERR_FD"
#: The most a `StderrBuffer` holds while stderr is not read (bytes); more is dropped, counted.
STDERR_BUFFER_LIMIT = 4 * 1024 * 1024
#: How long a process with a `StderrBuffer` waits at exit for it to be written.
EXIT_FLUSH_TIMEOUT = 2.0
_DROPPED = "%d service-log lines dropped: stderr not read"

# Control characters (C0, DEL, C1), the Unicode line and paragraph separators, lone surrogates
# (a non-UTF-8 byte decoded with surrogateescape): escaped in the text format's arguments.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# The text format's own message text may hold newlines (a list of config problems), no others.
_UNSAFE_IN_MESSAGE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")

# The attributes every LogRecord has: the others were passed as ``extra`` (JSON fields).
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


def _escape_char(match: re.Match[str]) -> str:
    ch = match.group()
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: control characters and undecodable bytes as backslash escapes."""
    return text if _UNSAFE.search(text) is None else _UNSAFE.sub(_escape_char, text)


class _Escaped:
    """An argument whose str() and repr() have their control characters escaped."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))


def _safe_arg(value: Any) -> Any:
    # A string is wrapped like any other value, not escaped in place: %r (and a dict or list
    # argument, which shows its strings by repr) already writes control characters as escapes,
    # and escaping them first doubled the backslashes of lines that were fine before.
    if value is None or isinstance(value, int | float | bytes):  # %d, %.1f; bytes print as repr
        return value
    if isinstance(value, ConfigError):  # the administrator's file: one problem a line
        return value
    return value if _UNSAFE.search(str(value)) is None else _Escaped(value)


def safe_message(record: logging.LogRecord) -> str:
    """``record.getMessage()`` with the control characters of its arguments escaped."""
    msg = str(record.msg)
    args = record.args
    if args:
        if isinstance(args, Mapping):
            msg = msg % {k: _safe_arg(v) for k, v in args.items()}
        else:
            msg = msg % tuple(_safe_arg(a) for a in args)
    if _UNSAFE_IN_MESSAGE.search(msg) is not None:
        msg = _UNSAFE_IN_MESSAGE.sub(_escape_char, msg)
    return msg


class TextFormatter(logging.Formatter):
    """``<time> <LEVEL> <logger>[wN]: <message>`` (the format of logging.basicConfig before)."""

    def __init__(self, worker: int | None = None) -> None:
        tag = "" if worker is None else f"[w{worker}]"
        super().__init__(f"%(asctime)s %(levelname)s %(name)s{tag}: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = safe_message(record)
        record.asctime = self.formatTime(record, self.datefmt)
        line = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line = f"{line}\n{record.exc_text}"
        if record.stack_info:
            line = f"{line}\n{self.formatStack(record.stack_info)}"
        if len(line) > _TEXT_CHECK_ABOVE:
            line = _cut_text(line)
        return line


# A text line of at most this many characters is under MAX_LINE bytes (a character is at most 4
# bytes of UTF-8, 6 as a backslash escape of a byte that was not UTF-8).
_TEXT_CHECK_ABOVE = (MAX_LINE - 1) // 6


def _cut_text(line: str) -> str:
    """`line` in less than MAX_LINE bytes of UTF-8: its start and its end, saying how much of
    its middle was cut."""
    data = line.encode("utf-8", "backslashreplace")
    if len(data) < MAX_LINE:
        return line
    half = (MAX_LINE - 200) // 2
    head = data[:half].decode("utf-8", "ignore")
    tail = data[len(data) - half :].decode("utf-8", "ignore")
    return f"{head}{_cut_note(len(line) - len(head) - len(tail))}{tail}"


def _cut_note(count: int) -> str:
    return f" [... {count} characters cut: line over {MAX_LINE} bytes ...] "


def _cut_middle(value: str, keep: int) -> str:
    """`value` with `keep` characters of it kept, its start and its end (the last lines of a
    traceback name the exception)."""
    head = keep // 2
    tail = keep - head
    return f"{value[:head]}{_cut_note(len(value) - keep)}{value[len(value) - tail :]}"


def _utf8(text: str) -> str:
    """``text`` that encodes as UTF-8: a byte that was not UTF-8 (surrogateescape) as ``\\xNN``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: the rest stays as it is (JSON escapes it)
        return _SURROGATE.sub(_escape_char, text)
    return text


# How deep the lists and dicts of an `extra` value are walked; deeper (or a list that holds
# itself) is written as its str(): the walk must not reach RecursionError, which logging passes
# on to the code that logged.
_JSON_DEPTH = 8


def _json_text(value: object) -> str:
    try:
        return _utf8(str(value))
    except Exception:  # its __str__ fails (or recurses): the line is still written
        return f"<unprintable {type(value).__name__}>"


def _json_repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:
        return f"<unprintable {type(value).__name__}>"


def _json_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return _utf8(value)
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):  # NaN and Infinity are not JSON: a strict reader refuses them
        return value if math.isfinite(value) else str(value)
    if depth < _JSON_DEPTH:
        if isinstance(value, list | tuple):
            return [_json_value(v, depth + 1) for v in value]
        if isinstance(value, dict):
            return {_json_text(k): _json_value(v, depth + 1) for k, v in value.items()}
    return _json_text(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line (see the module doc); ASCII only, so any reader can parse it."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        try:
            message = record.getMessage()
        except Exception:  # wrong arguments, or an argument whose str() fails: still one line
            args = record.args if isinstance(record.args, tuple) else (record.args,)
            message = f"{_json_repr(record.msg)} % ({', '.join(map(_json_repr, args))})"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": _utf8(message),
        }
        if self.worker is not None:
            fields["worker"] = self.worker
        fields["pid"] = record.process if record.process is not None else os.getpid()
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            fields["exception"] = _utf8(record.exc_text)
        if record.stack_info:
            fields["stack"] = _utf8(self.formatStack(record.stack_info))
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in fields and not key.startswith("_"):
                fields[key] = _json_value(value)
        line = _dumps(fields)
        return line if len(line) < MAX_LINE else _cut_json(fields, line)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=True, allow_nan=False, default=_json_text)


# The fields a cut never touches (short, and what a reader selects on).
_KEEP = frozenset(("time", "level", "logger", "worker", "pid"))


def _cut_json(fields: dict[str, Any], line: str) -> str:
    """One JSON object under MAX_LINE bytes (ASCII: a character is a byte): the middle of the
    longest fields cut, each saying how much (and ``"cut": true`` on the line), to a share of
    the room each."""
    for _ in range(8):
        excess = len(line) - (MAX_LINE - 1)
        if excess <= 0:
            return line
        sizes = {k: len(_dumps(v)) for k, v in fields.items() if k not in _KEEP}
        room = max(0, sum(sizes.values()) - excess - 100 * len(sizes))  # a note each
        cap = _level(sorted(sizes.values()), room)
        for key, size in sizes.items():
            if size > cap:
                value = fields[key] if isinstance(fields[key], str) else _dumps(fields[key])
                # escapes make a character several bytes: the same share of characters
                fields[key] = _cut_middle(value, len(value) * cap // size)
        fields["cut"] = True
        line = _dumps(fields)
    return _dumps(
        {k: fields[k] for k in _KEEP if k in fields}
        | {"message": f"<a line over {MAX_LINE} bytes, cut>", "cut": True}
    )


def _level(sizes: list[int], room: int) -> int:
    """The largest size `cap` (sizes sorted) such that the sizes, each at most `cap`, sum to at
    most `room`."""
    for i, size in enumerate(sizes):
        left = len(sizes) - i
        if size * left > room:
            return room // left
        room -= size
    return sizes[-1] if sizes else 0


# One for the process: its log lines and (in a supervisor) the lines its threads pass on from the
# workers are each written whole. Reentrant: a signal handler that logs must not wait on itself.
_WRITE_LOCK = threading.RLock()


def write_whole(fd: int, data: bytes) -> None:
    """All of `data` to `fd`, no other write of this process's threads in between."""
    with _WRITE_LOCK:
        _write_all(fd, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # a descriptor left non-blocking by whoever shares it
            select.select([], [fd], [], 1.0)


class StderrBuffer:
    """A process's stderr written by a thread of its own (`buffer_stderr`: the node's main
    process, relaygate.app.run), so that a stderr nobody reads (a log shipper that stalled: a full
    pipe) keeps no other thread waiting: `put` never waits. What was put is written in order,
    each piece with one write. While stderr is not read, up to `limit` bytes wait here; what
    comes on top is dropped, counted in lines, and where the lines are missing one line says how
    many (`dropped_notice`), as soon as there is room again or all before it was written."""

    def __init__(self, fd: int, limit: int = STDERR_BUFFER_LIMIT) -> None:
        self.fd = fd
        self.limit = limit
        self._pending: deque[bytes] = deque()
        self._size = 0  # of what is pending or being written
        self._dropped = 0  # lines, since the last notice
        # reentrant: a signal handler that logs while its thread is in `put` must not wait on itself
        self._cond = threading.Condition(threading.RLock())
        self._thread = threading.Thread(target=self._run, name="stderr writer", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> None:
        """`data` to be written after what was put before; dropped (counted) if it does not fit."""
        with self._cond:
            if self._size and self._size + len(data) > self.limit:
                self._dropped += data.count(b"\n") or 1
                return
            if self._dropped:
                self._append(dropped_notice(self._dropped))
                self._dropped = 0
            self._append(data)
            self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for all that was put to be written; whether it was."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._size or self._dropped:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _append(self, data: bytes) -> None:
        self._pending.append(data)
        self._size += len(data)

    def _next(self) -> bytes:
        """What to write next (waits for it): the oldest piece, or the notice of lines dropped
        once all before them is written."""
        with self._cond:
            while not self._pending and not self._dropped:
                self._cond.wait()
            if self._pending:
                return self._pending.popleft()
            notice = dropped_notice(self._dropped)
            self._dropped = 0
            self._size += len(notice)
            return notice

    def _run(self) -> None:
        while True:
            data = self._next()
            # Not under _WRITE_LOCK: this thread alone writes to fd while it runs, and a write
            # that waits for a reader must not keep any other thread waiting.
            with contextlib.suppress(OSError):  # EPIPE, EIO, ENOSPC: lost, as a write's would be
                _write_all(self.fd, data)
            with self._cond:
                self._size -= len(data)
                self._cond.notify_all()


def dropped_notice(count: int) -> bytes:
    """The line saying that `count` lines were dropped (in the service log's format in force)."""
    record = logging.getLogger(__name__).makeRecord(
        __name__, logging.WARNING, __file__, 0, _DROPPED, (count,), None
    )
    handler = _State.handler
    text = handler.format(record) if handler is not None else record.getMessage()
    return (text + "\n").encode("utf-8", "backslashreplace")


def hold_standard_fds() -> None:
    """Descriptors 0, 1 and 2 found closed (``relaygate serve 2>&-``) are opened on /dev/null:
    otherwise the first file the process opens takes one (the node's lock file), and what is
    written to stderr (the workers' lines that a supervisor passes on, a traceback) or to
    stdout (the ready line) went into that file."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:  # EBADF: closed
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)  # as a standard descriptor is


#: How long "RelayGate ready" waits for the service-log lines logged before it (`flush_stderr`).
READY_FLUSH_TIMEOUT = 1.0


def flush_stderr(timeout: float) -> bool:
    """Wait up to `timeout` seconds for the lines waiting in this process's `StderrBuffer` to be
    written (none: at once); whether they were. Before "RelayGate ready" on stdout: whoever reads
    both (a test, a wrapper script) finds the start-up lines ("listening on") already there, as
    when they were written directly; a stderr nobody reads holds it back `timeout` at most."""
    buffered = _State.stderr
    return True if buffered is None else buffered.flush(timeout)


def buffer_stderr() -> StderrBuffer:
    """From now on this process's service-log lines go to stderr through a `StderrBuffer` (the
    one returned, also for other lines to pass on: relaygate.logs.worker_output): a stderr that
    is not read keeps no thread waiting. At exit, what waits is given a little time."""
    if _State.stderr is None:
        _State.stderr = StderrBuffer(2)
        atexit.register(_State.stderr.flush, EXIT_FLUSH_TIMEOUT)
        _buffer_tracebacks(_State.stderr)
    return _State.stderr


def _buffer_tracebacks(buffer: StderrBuffer) -> None:
    """The tracebacks Python writes itself (an exception nothing caught, in the main thread or
    another, or one it ignored in a __del__; the text format's, or any hook's that writes to
    sys.stderr) go through `buffer`
    too: written straight to stderr, one came before the lines still waiting in the buffer
    (most of what was logged just before the crash), and a stderr nobody read kept the process
    from exiting. The JSON format's hooks (`_log_uncaught`) log through it anyway."""
    previous = sys.excepthook
    previous_thread = threading.excepthook
    previous_unraisable = sys.unraisablehook

    def on_exception(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        _through_buffer(buffer, lambda: previous(kind, exc, tb))

    def on_thread_exception(args: threading.ExceptHookArgs) -> None:
        _through_buffer(buffer, lambda: previous_thread(args))

    def on_unraisable(unraisable: Any) -> None:  # "Exception ignored in: ..." (a __del__'s)
        if sys.is_finalizing():
            # Shutting down, past the buffer's last flush at exit (its thread no longer runs):
            # put there, it would never be written.
            previous_unraisable(unraisable)
            return
        _through_buffer(buffer, lambda: previous_unraisable(unraisable))

    sys.excepthook = on_exception
    threading.excepthook = on_thread_exception
    sys.unraisablehook = on_unraisable


#: One hook at a time through `_through_buffer`: sys.stderr is the process's, and two threads'
#: hooks at once each restored what the other had put there (a StringIO, for good). Re-entrant:
#: a hook whose own output fails calls another hook in the same thread.
_HOOK_TURN = threading.RLock()


def _through_buffer(buffer: StderrBuffer, hook: Callable[[], object]) -> None:
    """Run `hook` with what it writes to sys.stderr put in `buffer`, after the lines there."""
    text = io.StringIO()
    try:
        with _HOOK_TURN, contextlib.redirect_stderr(text):
            hook()
    finally:
        if text.getvalue():
            buffer.put(text.getvalue().encode("utf-8", "backslashreplace"))


class _LineHandler(logging.StreamHandler[Any]):
    """Each record as one write(2) of the whole line (`write_whole`): a long line (a traceback)
    written in pieces could be cut by another thread's line, or (on a stderr shared with other
    processes) by another process's."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            stream = self.stream
            try:
                fd = stream.fileno()
            except (AttributeError, OSError, ValueError):  # not a file (a test's capture)
                stream.write(data.decode("utf-8"))
                stream.flush()
                return
            stream.flush()
            buffered = _State.stderr
            if buffered is not None and fd == buffered.fd:
                buffered.put(data)
                return
            try:
                write_whole(fd, data)
            except BrokenPipeError:
                # A worker whose supervisor is gone: its stderr pipe has no reader any more.
                if fd != 2 or not _use_fallback_stderr():
                    raise
                # The node's stderr, which nobody may be reading: through a buffer, so that a
                # full one keeps the worker from neither stopping nor exiting (lines it cannot
                # take are dropped, counted)
                buffer_stderr().put(data)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)


def _use_fallback_stderr() -> bool:
    """A worker's stderr pipe is broken: put the descriptor of its supervisor's own stderr (see
    STDERR_FALLBACK_ENV) in its place, for the lines it still logs while it stops (a supervisor
    killed outright passes nothing on), written from then on through a `StderrBuffer`. False if
    there is none."""
    raw = os.environ.pop(STDERR_FALLBACK_ENV, None)
    if raw is None or not raw.isdigit() or _State.worker is None:
        return False
    fd = int(raw)
    try:
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        return False
    return True


class _State:
    handler: _LineHandler | None = None
    worker: int | None = None
    format: str = "text"
    level: str = "INFO"
    #: --log-format / --log-level: they win over the config file, at start and on reloads
    overrides: dict[str, str] = {}
    #: the process's stderr written by a thread (`buffer_stderr`), or None: written directly
    stderr: StderrBuffer | None = None


def set_overrides(*, log_format: str | None = None, log_level: str | None = None) -> None:
    """The ``relaygate serve`` flags (None: the config file decides)."""
    _State.overrides = {
        k: v for k, v in (("format", log_format), ("level", log_level)) if v is not None
    }


def worker_flags() -> list[str]:
    """The flags a worker is started with so that it logs as its supervisor was told to."""
    flags: list[str] = []
    if "format" in _State.overrides:
        flags += ["--log-format", _State.overrides["format"]]
    if "level" in _State.overrides:
        flags += ["--log-level", _State.overrides["level"]]
    return flags


def current() -> tuple[str, str]:
    """The (format, level) in force."""
    return _State.format, _State.level


def configure(log_format: str, log_level: str, *, worker: int | None = None) -> None:
    """Install the service log on the root logger (replacing what an earlier call installed):
    stderr, ``log_format`` ("text"/"json"), ``log_level``; the flags given to `set_overrides` win."""
    log_format = _State.overrides.get("format", log_format)
    log_level = _State.overrides.get("level", log_level)
    root = logging.getLogger()
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if _State.handler is not None:
        root.removeHandler(_State.handler)
    handler = _LineHandler(sys.stderr)
    handler.setFormatter(_formatter(log_format, worker))
    root.addHandler(handler)
    root.setLevel(log_level)
    _State.handler, _State.worker = handler, worker
    _State.format, _State.level = log_format, log_level
    # warnings.warn(...) as log lines, in either format: Python's own text is not a JSON line,
    # and it is written straight to stderr, past the StderrBuffer (a stderr nobody reads then
    # holds up the thread that warned, the event loop)
    logging.captureWarnings(True)
    if log_format == "json":
        _log_uncaught()


def apply_config(log_format: str, log_level: str) -> bool:
    """A reload: switch to the file's format and level (unless a flag set them). True if that
    changed anything (then one line says what is in force)."""
    log_format = _State.overrides.get("format", log_format)
    log_level = _State.overrides.get("level", log_level)
    if (log_format, log_level) == (_State.format, _State.level) or _State.handler is None:
        return False
    changed_format = log_format != _State.format
    _State.handler.setFormatter(_formatter(log_format, _State.worker))
    logging.getLogger().setLevel(log_level)
    _State.format, _State.level = log_format, log_level
    if log_format == "json":
        _log_uncaught()
    logger = logging.getLogger("relaygate")
    level = logging.WARNING if changed_format else logging.INFO
    message = "service log: format %s, level %s (server.log_format, server.log_level)"
    if logger.isEnabledFor(level):
        logger.log(level, message, log_format, log_level)
    else:  # the new level is above the line's own: it still says what is in force now
        record = logger.makeRecord(
            logger.name, level, __file__, 0, message, (log_format, log_level), None
        )
        _State.handler.handle(record)
    return True


def _formatter(log_format: str, worker: int | None) -> logging.Formatter:
    return JsonFormatter(worker) if log_format == "json" else TextFormatter(worker)


def _log_uncaught() -> None:
    """An exception nothing caught (the main thread's, a thread's, one Python ignored in a
    __del__) as a log line, not a bare traceback on stderr that a JSON reader cannot parse."""
    import threading

    logger = logging.getLogger("relaygate")

    def on_exception(kind: type[BaseException], exc: BaseException, tb: Any) -> None:
        if issubclass(kind, KeyboardInterrupt):
            sys.__excepthook__(kind, exc, tb)
            return
        logger.critical("uncaught exception", exc_info=(kind, exc, tb))

    def on_thread_exception(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit or args.exc_value is None:
            return
        name = args.thread.name if args.thread is not None else "?"
        logger.critical(
            "uncaught exception in thread %s",
            name,
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )

    def on_unraisable(unraisable: Any) -> None:
        # An exception Python can only ignore (in __del__, a finalizer, a weakref callback):
        # "Exception ignored in: ..." and a traceback, free text, unless logged here.
        what = unraisable.err_msg or "Exception ignored in"
        exc_info = None
        if unraisable.exc_type is not None:
            exc_info = (unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback)
        if unraisable.object is None:
            logger.error("%s", what, exc_info=exc_info)
        else:
            logger.error("%s: %s", what, _json_repr(unraisable.object), exc_info=exc_info)

    sys.excepthook = on_exception
    threading.excepthook = on_thread_exception
    sys.unraisablehook = on_unraisable
