"""Relative file paths in a configuration, and the directory the running relay reads them from.

`relaygate serve` opens a relative `tls_key_file`, `users_file`, `api_token_file`, DKIM
`key_file`... from its own working directory (README: only `server.data_dir` is taken from the
config file's folder; the packaged unit runs in /var/lib/relaygate). `relaygate audit` and `check`
run from another directory would look elsewhere: a false alarm (a file called missing that the
relay reads fine) or a false all-clear (a world-readable key never examined). So they ask the node
lock in data_dir which `relaygate serve` runs (`running_relay_directory`) and read the files from
its working directory (`rebased`).

Linux only (/proc): elsewhere, or when the process cannot be examined, no running relay is found
and the files are read from the command's directory, which the callers say.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relaygate.config.model import Config

__all__ = [
    "RelativeFiles",
    "as_the_relay_reads",
    "rebased",
    "relative_file_keys",
    "running_relay_directory",
    "running_relay_pid",
]

#: The node lock `relaygate serve` holds in data_dir (relaygate.node_lock.LOCK_FILE; not imported:
#: that module pulls in the PostgreSQL driver for a name).
_LOCK_FILE = "relaygate.lock"


@dataclass(frozen=True, slots=True)
class RelativeFiles:
    """The relative file keys of a configuration (`keys`: (key, path as written)) and where they
    were read from: `base`, the running relay's working directory (`pid`: that relay) or, with
    `pid` None, the command's own."""

    keys: tuple[tuple[str, Path], ...]
    base: Path
    pid: int | None


def _sections(config: Config) -> list[tuple[str, Any]]:
    """(key prefix, object) of every part of `config` that may hold file paths."""
    parts: list[tuple[str, Any]] = [
        ("server", config.server),
        ("admin", config.admin),
        ("queue", config.queue),
    ]
    parts += [(f"receive_connectors[{i}]", c) for i, c in enumerate(config.receive_connectors)]
    parts += [(f"send_connectors[{i}]", c) for i, c in enumerate(config.send_connectors)]
    parts += [(f"dkim[{i}]", k) for i, k in enumerate(config.dkim)]
    return parts


def _relative_fields(obj: Any) -> list[tuple[str, Path]]:
    # data_dir is taken from the config file's folder by the loader, never from a directory
    return [
        (f.name, value)
        for f in dataclasses.fields(obj)
        if f.name != "data_dir"
        and isinstance(value := getattr(obj, f.name), Path)
        and not value.is_absolute()
    ]


def relative_file_keys(config: Config) -> list[tuple[str, Path]]:
    """(dotted key, path as written) of every relative file path in `config`."""
    return [
        (f"{prefix}.{name}", path)
        for prefix, obj in _sections(config)
        for name, path in _relative_fields(obj)
    ]


def _rebase(obj: Any, base: Path) -> Any:
    changes = {name: base / path for name, path in _relative_fields(obj)}
    return dataclasses.replace(obj, **changes) if changes else obj


def rebased(config: Config, base: Path) -> Config:
    """`config` with every relative file path taken from `base` (data_dir left as it is)."""
    return dataclasses.replace(
        config,
        server=_rebase(config.server, base),
        admin=_rebase(config.admin, base),
        queue=_rebase(config.queue, base),
        receive_connectors=tuple(_rebase(c, base) for c in config.receive_connectors),
        send_connectors=tuple(_rebase(c, base) for c in config.send_connectors),
        dkim=tuple(_rebase(k, base) for k in config.dkim),
    )


def _lock_holder(lock: Path) -> int | None:
    """The pid written in the node lock file when that process holds its flock now (by
    /proc/locks, without taking the lock: a start at that moment must not find it taken)."""
    try:
        pid = int(lock.read_text(encoding="ascii").strip())
        st = lock.stat()
        held = Path("/proc/locks").read_text(encoding="ascii")
    except (OSError, ValueError):
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in held.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:123 0 EOF" (a blocked waiter's line has "->")
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[4:6] == [str(pid), inode]:
            return pid
    return None


def running_relay_pid(data_dir: Path) -> int | None:
    """The pid of the `relaygate serve` that holds the node lock of `data_dir` (its supervisor
    with workers); None when none runs, or it cannot be examined (not Linux)."""
    return _lock_holder(Path(data_dir) / _LOCK_FILE)


def running_relay_directory(data_dir: Path) -> tuple[int, Path] | None:
    """(pid, working directory) of the `relaygate serve` that holds the node lock of `data_dir`;
    None when none runs, or it cannot be examined (another user's process, not Linux)."""
    pid = running_relay_pid(data_dir)
    if pid is None:
        return None
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None
    if cwd.endswith(" (deleted)"):  # its directory was removed: nothing to read there
        return None
    return pid, Path(cwd)


def as_the_relay_reads(config: Config) -> tuple[Config, RelativeFiles]:
    """`config` with its relative file paths taken from the running relay's working directory
    (unchanged when no relay runs: a relay started here would read them from here), and what
    was done, for the caller to say."""
    keys = tuple(relative_file_keys(config))
    running = running_relay_directory(config.server.data_dir) if keys else None
    if running is None:
        try:
            here = Path.cwd()
        except OSError:  # the directory was removed under the command
            here = Path(".")
        return config, RelativeFiles(keys, here, None)
    pid, base = running
    return rebased(config, base), RelativeFiles(keys, base, pid)
