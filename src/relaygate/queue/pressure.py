"""Back pressure on the queue's disk: refuse new mail at MAIL FROM before the disk is full.

Exchange's transport watches the free space of the drive that holds its queue database and, at
its "High" level, rejects every MAIL FROM with ``452 4.3.1 Insufficient system resources`` while it
goes on delivering what it has (exchange-semantics.md §5.4). Exchange 2010's documentation gives
the High level as the disk less a fixed 500 MB, and the "Normal" level, where mail is accepted
again, as 4 % of the disk lower in use, so that the server does not flap around the threshold. RelayGate does the same with `queue.min_free_disk_space`
(default 500MB, 0 turns it off):

* free space below the minimum → under pressure: MAIL FROM gets 452 4.3.1;
* under pressure, free space back above the minimum plus 4 % of the disk → accepting again;
* a MAIL FROM whose SIZE= would not fit above the minimum gets 452 4.3.1 too (RFC 1870).

The space is sampled by a background task every `INTERVAL` seconds (statvfs in a thread: a hung
network file system must not stop the event loop), never on the command path. Without it, a full
disk still loses nothing: the store's commit fails and the client gets a 4xx at the end of DATA.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DiskPressure", "DiskSpace"]

logger = logging.getLogger("relaygate.queue")

INTERVAL = 2.0  # seconds between samples
RESUME_SHARE = 0.04  # Exchange's Normal level: 4 % of the disk below the High level


@dataclass(frozen=True, slots=True)
class DiskSpace:
    free: int  # bytes an unprivileged writer may still use (f_bavail)
    total: int


def disk_space(path: Path) -> DiskSpace:
    st = os.statvfs(path)
    return DiskSpace(free=st.f_bavail * st.f_frsize, total=st.f_blocks * st.f_frsize)


class DiskPressure:
    """The back-pressure state of the file system holding `path` (the queue directory)."""

    def __init__(self, path: Path, min_free: int) -> None:
        self.path = path
        self.min_free = min_free
        self.high = False
        self.space: DiskSpace | None = None
        self._task: asyncio.Task[None] | None = None
        self._resample: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- what the session asks

    def refuses(self, declared_size: int | None = None) -> bool:
        """True if a new message must be refused now (452 4.3.1): under pressure, or its declared
        SIZE would take the free space below the minimum."""
        if self.high:
            return True
        space = self.space
        if declared_size is None or space is None or self.min_free <= 0:
            return False
        return space.free - declared_size < self.min_free

    # ---------------------------------------------------------------- sampling

    def update(self, space: DiskSpace) -> None:
        """Take a sample and move between the levels (with the hysteresis above)."""
        self.space = space
        if self.min_free <= 0:
            self.high = False
            return
        if not self.high and space.free < self.min_free:
            self.high = True
            logger.warning(
                "back pressure: %s MB free on the queue's disk (%s), below queue.min_free_disk_space"
                " (%s MB): new messages are refused with 452 4.3.1 until %s MB are free",
                space.free // 2**20,
                self.path,
                self.min_free // 2**20,
                self._resume_at(space) // 2**20,
            )
        elif self.high and space.free >= self._resume_at(space):
            self.high = False
            logger.warning(
                "back pressure over: %s MB free on the queue's disk (%s); accepting messages again",
                space.free // 2**20,
                self.path,
            )

    def _resume_at(self, space: DiskSpace) -> int:
        return self.min_free + int(space.total * RESUME_SHARE)

    async def sample(self) -> None:
        try:
            space = await asyncio.to_thread(disk_space, self.path)
        except OSError as exc:  # keep the last state; the store reports real write failures
            logger.warning("back pressure: cannot read the free space of %s: %s", self.path, exc)
            return
        self.update(space)

    def apply(self, min_free: int) -> None:
        """A reloaded `queue.min_free_disk_space`: re-evaluated at the next sample."""
        if min_free != self.min_free:
            self.min_free = min_free
            if min_free <= 0:
                self.high = False
            if self._task is not None:
                self._resample = asyncio.get_running_loop().create_task(self.sample())

    async def start(self) -> None:
        await self.sample()  # a relay started on a full disk refuses from its first message
        self._task = asyncio.get_running_loop().create_task(self._run(), name="disk-pressure")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(INTERVAL)
            await self.sample()
