"""A disk whose fsync of a SQLite write-ahead log fails (EIO), for a real process: the LD_PRELOAD
shim tests/support/fsync_fault.c, built here with gcc into the test's tmp dir.

While the trigger file exists, fsync/fdatasync of a descriptor whose path ends in "-wal" fail
with EIO (what the kernel says when writeback of the file's dirty pages failed). Every fsync,
fdatasync and ftruncate of the process is logged, in order, to `FsyncFault.log` (see `calls`).
gcc is a Debian package the Makefile's `debs` target installs; without it the test fails, never
skips."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = ["Call", "FsyncFault", "build_fsync_fault"]

SOURCE = Path(__file__).with_name("fsync_fault.c")


@dataclass(frozen=True, slots=True)
class Call:
    """One logged call: `name` (fsync, fdatasync, ftruncate: ftruncate64 too), the file's `path`,
    `result` (0 or -1) and, for a truncation, `length`."""

    name: str
    path: str
    result: int
    length: int | None = None

    @property
    def failed_wal_sync(self) -> bool:
        return self.is_sync and self.path.endswith("-wal") and self.result != 0

    @property
    def is_sync(self) -> bool:
        return self.name in ("fsync", "fdatasync")


@dataclass(frozen=True, slots=True)
class FsyncFault:
    library: Path
    trigger: Path
    log: Path

    def env(self) -> dict[str, str]:
        """What a process started with it needs in its environment."""
        return {
            "LD_PRELOAD": str(self.library),
            "RG_FAULT_TRIGGER": str(self.trigger),
            "RG_FAULT_LOG": str(self.log),
        }

    def arm(self) -> None:
        self.trigger.touch()

    def disarm(self) -> None:
        self.trigger.unlink()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0

    def calls(self, up_to: int | None = None) -> list[Call]:
        """The calls logged so far (the first `up_to` bytes of the log only, if given)."""
        if not self.log.exists():
            return []
        text = self.log.read_bytes()[:up_to].decode()
        out = []
        for line in text.splitlines():
            name, rest = line.split(" ", 1)
            if name == "ftruncate":
                path, length, result = rest.rsplit(" ", 2)
                out.append(Call(name, path, int(result), int(length)))
            else:
                path, result = rest.rsplit(" ", 1)
                out.append(Call(name, path, int(result)))
        return out


def build_fsync_fault(directory: Path) -> FsyncFault:
    """Compile the shim into `directory`; its trigger and log files are named there too."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is needed to build tests/support/fsync_fault.c (make debs installs it)")
    library = directory / "fsync_fault.so"
    flags = ["-Wall", "-Wextra", "-Werror", "-shared", "-fPIC"]
    built = subprocess.run(
        [gcc, *flags, "-o", str(library), str(SOURCE), "-ldl"],
        capture_output=True,
        text=True,
        check=False,
    )
    if built.returncode != 0:
        pytest.fail(f"cannot build {SOURCE}: {built.stderr.strip()}")
    return FsyncFault(library, directory / "fsync-fault.trigger", directory / "fsync-fault.log")
