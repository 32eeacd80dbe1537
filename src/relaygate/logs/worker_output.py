"""A worker's stdout and stderr, read by its supervisor and written whole (``server.workers > 1``).

Workers do not write to the stderr the supervisor was started with: when that is a pipe (systemd's
journal, docker, a log shipper), a write of more than PIPE_BUF (4,096) bytes by one process can be
cut by another process's, and a JSON line is then no longer one. Each worker's stderr and stdout
are pipes instead, each read by a thread of the supervisor (`WorkerOutput`) that writes what it
read up to its last complete line to the supervisor's own stderr with one write, under the lock its
own log lines take (`relaygate.logs.service.write_whole`). So the supervisor is the only writer,
each worker's lines keep their order, and a worker's raw output (a fatal error, a C library's
message, anything it printed) passes through too.

* A line longer than MAX_LINE (64 KiB) is passed on in pieces of MAX_LINE bytes, each but the last
  ending with CUT_MARKER: what is held stays bounded. The service log's own lines are never that
  long (relaygate.logs.service cuts a longer message first, keeping a JSON line JSON).
* A last line without its newline (a worker that died while writing it) is passed on, with a
  newline, when the pipe ends.
* The threads only read and pass on: a supervisor busy with something else (a reload, stopping
  its workers) does not keep a worker waiting, and each pipe is made PIPE_SIZE (1 MiB) where the
  kernel allows. In a supervisor they pass the lines to its `StderrBuffer`
  (relaygate.logs.service.buffer_stderr), which never waits: a supervisor's stderr that nobody
  reads (a stalled log shipper, a full pipe) blocks neither a thread here nor, its pipe filling
  up, a worker's event loop in its next log line; the lines on top of what the buffer holds are
  dropped, and counted.
* When the pipe ends (the worker and anything it started that held its stderr are gone) the
  thread says so (`on_end`): the supervisor logs a worker's exit after its last lines.
* A supervisor that is killed (SIGKILL) closes the pipes' reading ends: a worker's next line fails
  with EPIPE and the worker then writes to a descriptor of the supervisor's stderr that it was
  given (relaygate.logs.service.STDERR_FALLBACK_ENV), so the lines it logs while it stops (it
  reads EOF on its link, relaygate.workers) are not lost; through a `StderrBuffer` of its own,
  so that a stderr nobody reads does not keep it from stopping.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct
import termios
import threading
import time
from collections.abc import Callable

from relaygate.logs.service import MAX_LINE, StderrBuffer, write_whole

__all__ = ["CUT_MARKER", "PIPE_SIZE", "WorkerOutput", "complete_lines"]

#: Ends each piece of a line cut at MAX_LINE bytes but the last.
CUT_MARKER = b" [line over 64 KiB: continued on the next line]"
#: The size asked for each pipe (F_SETPIPE_SZ; 1 MiB is Linux's default limit for a user).
PIPE_SIZE = 1 << 20
_READ_SIZE = 64 * 1024
#: How long the rest of a write that filled the pipe is waited for, and how much is held for it.
_REST_WAIT = 0.25
_HOLD_MAX = 4 * PIPE_SIZE
_PIECE = MAX_LINE - len(CUT_MARKER) - 1


def _waiting(fd: int) -> int:
    """How many bytes the pipe `fd` holds now (0 if that cannot be asked)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0])
    except OSError:
        return 0


def _pipe_capacity(fd: int) -> int:
    """How many bytes the pipe `fd` can hold (F_GETPIPE_SZ; PIPE_SIZE if that cannot be asked)."""
    try:
        return int(fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ))
    except (OSError, AttributeError):
        return PIPE_SIZE


def complete_lines(data: bytes) -> tuple[bytes, bytes]:
    """(what to write now, what to keep): `data` up to its last newline, a line over MAX_LINE
    bytes (its newline included) in pieces that end with CUT_MARKER; what is kept is shorter than
    MAX_LINE."""
    end = data.rfind(b"\n") + 1
    out, rest = data[:end], data[end:]
    if len(out) > MAX_LINE:  # then a line may be too long (never when this is not)
        out = b"".join(_cut(line) + b"\n" for line in out[:-1].split(b"\n"))
    while len(rest) >= MAX_LINE:
        out += rest[:_PIECE] + CUT_MARKER + b"\n"
        rest = rest[_PIECE:]
    return out, rest


def _cut(line: bytes) -> bytes:
    """`line` (without its newline) in pieces each MAX_LINE bytes at most with a newline."""
    if len(line) < MAX_LINE:
        return line
    parts = []
    while len(line) >= MAX_LINE:
        parts.append(line[:_PIECE] + CUT_MARKER + b"\n")
        line = line[_PIECE:]
    parts.append(line)
    return b"".join(parts)


class WorkerOutput:
    """One pipe of one worker (its stderr or its stdout): a thread passes what the worker writes
    on to `target` (the supervisor's stderr: its `StderrBuffer`, or a descriptor written
    directly), a run of whole lines at a time, until the pipe ends (every process holding its
    writing end exited, or closed it); then it calls `on_end`."""

    def __init__(
        self,
        target: int | StderrBuffer,
        name: str,
        on_end: Callable[[], None] | None = None,
    ) -> None:
        self.target = target
        self.name = name
        self._on_end = on_end
        self._ended = threading.Event()
        read_fd, self.write_fd = os.pipe()  # both close-on-exec; Popen puts write_fd on 1 or 2
        with contextlib.suppress(OSError, AttributeError):  # Linux only; a limit may refuse it
            fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self._read_fd = read_fd
        self._capacity = _pipe_capacity(read_fd)
        # True from the moment the thread takes something out of the pipe until it has passed it
        # on: with the pipe empty and this False, all the worker wrote is with the target.
        self._busy = False
        self._busy_lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        """After the worker started: the writing end is the worker's alone from now on."""
        self.close_write_end()
        self._thread.start()

    def close_write_end(self) -> None:
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def close(self) -> None:
        """The worker could not be started: nothing to read."""
        self.close_write_end()
        if not self._thread.is_alive() and self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    @property
    def done(self) -> bool:
        """The pipe ended and all read from it was passed on (or the thread never started)."""
        return self._ended.is_set() or not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def caught_up(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds until what the worker has written so far is with the
        target (the pipe holds nothing and nothing read is still being passed on); whether it
        is. The supervisor asks before its ready line: a worker flushed its own lines before it
        said it was ready, and they are then on stderr before the ready line, as in one process."""
        deadline = time.monotonic() + timeout
        while True:
            with self._busy_lock:
                if self.done or (not self._busy and _waiting(self._read_fd) == 0):
                    return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def _run(self) -> None:
        held = b""
        poller = select.poll()
        poller.register(self._read_fd, select.POLLIN)
        try:
            while True:
                poller.poll()  # something to read, or the pipe's end: then busy until passed on
                with self._busy_lock:
                    self._busy = True
                data = self._read_writes()
                if not data:
                    break
                out, held = complete_lines(held + data)
                if out:
                    # The target cannot be written (EPIPE, EIO, ENOSPC...): these lines are
                    # dropped and reading goes on; the next ones are tried again, since a full
                    # disk gets space back (as the supervisor's own lines do).
                    self._write(out)
                with self._busy_lock:
                    self._busy = False
            if held:
                self._write(held + b"\n")
        finally:
            with self._busy_lock:
                os.close(self._read_fd)
                self._read_fd = -1
                self._busy = False
            self._ended.set()
            if self._on_end is not None:
                self._on_end()

    def _read_writes(self) -> bytes:
        """What the worker wrote, b"" at the pipe's end. All that the pipe holds, not _READ_SIZE
        of it: a record the worker wrote with one write (a text record of several lines: a
        traceback, a list of config problems) is then passed on in one piece, never cut at a
        read's end by another worker's lines. A read that found the pipe full may have taken the
        start of a write longer than the pipe (a kernel that refused PIPE_SIZE leaves a pipe of
        a page or two to a user over its pipe quota): the rest follows as soon as the writer
        runs, so it is waited for, briefly, before anything is passed on."""
        data = self._read_once()
        while data and len(data) >= self._capacity and len(data) < _HOLD_MAX:
            if not select.select([self._read_fd], [], [], _REST_WAIT)[0]:
                break  # a write that ended just as the pipe filled up
            more = self._read_once()
            if not more:
                break  # the pipe's end: the next read says so again
            data += more
        return data

    def _read_once(self) -> bytes:
        try:
            return os.read(self._read_fd, max(_READ_SIZE, _waiting(self._read_fd)))
        except OSError:
            return b""

    def _write(self, data: bytes) -> None:
        if isinstance(self.target, StderrBuffer):
            self.target.put(data)  # never waits (dropped, counted, if it does not fit)
            return
        with contextlib.suppress(OSError):
            write_whole(self.target, data)
