"""A FUSE file system that forgets, at a "power cut", everything that was not fsync'd: the test
equivalent of LazyFS (security-bar §4B item 167), in Python on fusepy (libfuse2).

The model is conservative POSIX, stricter than ext4's ordered mode:

* each file's current content lives in memory; its DURABLE content is updated only by an fsync or
  fdatasync of that file (FUSE ``fsync``). Writes, truncates and close change only the current one;
* create, mkdir, unlink, rename, link, symlink and rmdir change the current tree; a directory's
  DURABLE entries are updated only by an fsync of that directory (FUSE ``fsyncdir``);
* a power cut throws the current state away: the next mount starts from the durable state, where
  an entry whose file was never fsync'd names an empty file and a file no durable entry reaches is
  gone.

The durable state outlives the process: the content of each fsync'd file is in ``<state>/data/<n>``
(only the ranges written since its last fsync are copied at the next one), and the durable tree
and attributes are in ``<state>/tree.pickle``, rewritten at each fsync. At unmount (``destroy``) the
process writes ``<state>/discarded.json``: how many bytes and directory entries the current state
held that the durable one did not, i.e. what a power cut at that moment loses.

A cut, as `LazyMount.cut` does it: SIGKILL the programs using the mount, unmount (the kernel's page
cache of the mount goes with it), let this process exit, and mount again from the same state
directory. SQLite in WAL mode works on it: no ``direct_io`` (its -shm file is mapped MAP_SHARED),
and ``lock`` is left out so that the kernel keeps fcntl locks itself.

Run as ``python -m tests.support.lazy_fs STATE_DIR MOUNTPOINT`` (in the foreground, single-threaded,
until unmounted or sent SIGTERM); tests use `LazyMount`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pickle
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["LazyMount", "LazyOperations"]

ROOT_INO = 1
_TREE = "tree.pickle"
_DISCARDED = "discarded.json"
_DATA = "data"
_BLOCK = 4096
_TOTAL_BLOCKS = 1 << 20  # statfs: a 4 GiB file system, so that the relay's free-space check passes


@dataclass
class Node:
    """An inode of the current state: a directory (`entries`), a file (`data`) or a symlink."""

    kind: int  # stat.S_IFDIR, S_IFREG or S_IFLNK
    mode: int  # permission bits
    entries: dict[str, int] = field(default_factory=dict)
    data: bytearray = field(default_factory=bytearray)
    target: str = ""
    #: [start, end) ranges of `data` changed since the last fsync (unmerged)
    dirty: list[tuple[int, int]] = field(default_factory=list)
    #: the durable content's length (what the backing file holds)
    durable_size: int = 0
    nlink: int = 0
    opened: int = 0
    uid: int = 0
    gid: int = 0
    atime: float = 0.0
    mtime: float = 0.0
    ctime: float = 0.0

    def mark(self, start: int, end: int) -> None:
        if end > start:
            self.dirty.append((start, end))


def _merged(ranges: list[tuple[int, int]], limit: int) -> list[tuple[int, int]]:
    """`ranges` clipped to [0, limit), sorted and merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted((s, min(e, limit)) for s, e in ranges if s < limit):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


class LazyOperations:
    """fusepy operations over the in-memory current state, with the durable state in `state`."""

    # libfuse passes a NULL path for operations on an open file that was unlinked (hard_remove):
    # those use the file handle (the inode number) instead.
    flag_nullpath_ok = 1
    use_ns = False

    def __init__(self, state: Path) -> None:
        self.state = state
        (state / _DATA).mkdir(parents=True, exist_ok=True)
        self.nodes: dict[int, Node] = {}
        #: the durable tree: directory inode -> {name: inode}, and inode -> (kind, mode, target)
        self.durable_dirs: dict[int, dict[str, int]] = {}
        self.durable_meta: dict[int, tuple[int, int, str]] = {}
        self.next_ino = ROOT_INO + 1
        self._load()

    # ------------------------------------------------------------------ durable state

    def _load(self) -> None:
        """Build the current state from the durable one (a fresh file system on first use)."""
        tree = self.state / _TREE
        if tree.exists():
            saved = pickle.loads(tree.read_bytes())
            self.durable_dirs, self.durable_meta = saved["dirs"], saved["meta"]
            self.next_ino = saved["next_ino"]
        else:
            self.durable_meta = {ROOT_INO: (stat.S_IFDIR, 0o755, "")}
            self.durable_dirs = {ROOT_INO: {}}
        reachable = self._reachable()
        now = time.time()
        for ino in reachable:
            kind, mode, target = self.durable_meta[ino]
            node = Node(kind, mode, target=target, atime=now, mtime=now, ctime=now)
            if kind == stat.S_IFDIR:
                node.entries = dict(self.durable_dirs.get(ino, {}))
            elif kind == stat.S_IFREG:
                backing = self._backing(ino)
                node.data = bytearray(backing.read_bytes()) if backing.exists() else bytearray()
                node.durable_size = len(node.data)
            self.nodes[ino] = node
        for node in list(self.nodes.values()):
            for child in node.entries.values():
                self.nodes[child].nlink += 1
        self.nodes[ROOT_INO].nlink += 1
        # What no durable entry reaches is gone for good.
        self.durable_meta = {i: m for i, m in self.durable_meta.items() if i in reachable}
        self.durable_dirs = {i: d for i, d in self.durable_dirs.items() if i in reachable}
        for backing in (self.state / _DATA).iterdir():
            if int(backing.name) not in reachable:
                backing.unlink()
        self._save_tree()

    def _reachable(self) -> set[int]:
        seen = {ROOT_INO}
        todo = [ROOT_INO]
        while todo:
            for child in self.durable_dirs.get(todo.pop(), {}).values():
                if child not in seen and child in self.durable_meta:
                    seen.add(child)
                    todo.append(child)
        return seen

    def _backing(self, ino: int) -> Path:
        return self.state / _DATA / str(ino)

    def _save_tree(self) -> None:
        tmp = self.state / (_TREE + ".tmp")
        tmp.write_bytes(
            pickle.dumps(
                {"dirs": self.durable_dirs, "meta": self.durable_meta, "next_ino": self.next_ino}
            )
        )
        tmp.replace(self.state / _TREE)

    def _note_durable_meta(self, ino: int) -> None:
        node = self.nodes[ino]
        self.durable_meta[ino] = (node.kind, node.mode, node.target)

    def discarded(self) -> dict[str, int]:
        """What a power cut now would lose: bytes written since their file's fsync, and directory
        entries that differ from the durable ones."""
        dirty_bytes = 0
        for node in self.nodes.values():
            if node.kind == stat.S_IFREG:
                changed = _merged(node.dirty, len(node.data))
                dirty_bytes += sum(end - start for start, end in changed)
                dirty_bytes += max(0, node.durable_size - len(node.data))
        entries = 0
        for ino in set(self.durable_dirs) | {
            i for i, n in self.nodes.items() if n.kind == stat.S_IFDIR and n.nlink
        }:
            now = self.nodes[ino].entries if ino in self.nodes else {}
            durable = self.durable_dirs.get(ino, {})
            entries += sum(now.get(name) != durable.get(name) for name in set(now) | set(durable))
        return {"bytes": dirty_bytes, "entries": entries}

    # ------------------------------------------------------------------ the current tree

    def _lookup(self, path: str) -> int:
        ino = ROOT_INO
        for part in path.strip("/").split("/"):
            if not part:
                continue
            node = self.nodes[ino]
            if node.kind != stat.S_IFDIR:
                raise OSError(errno.ENOTDIR, path)
            if part not in node.entries:
                raise OSError(errno.ENOENT, path)
            ino = node.entries[part]
        return ino

    def _parent(self, path: str) -> tuple[Node, str]:
        head, _, name = path.rstrip("/").rpartition("/")
        parent = self.nodes[self._lookup(head or "/")]
        if parent.kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, path)
        return parent, name

    def _node(self, path: str | None, fh: Any = None) -> tuple[int, Node]:
        ino = int(fh) if fh else self._lookup(path or "/")
        return ino, self.nodes[ino]

    def _new(self, kind: int, mode: int) -> int:
        ino = self.next_ino
        self.next_ino += 1
        now = time.time()
        self.nodes[ino] = Node(kind, mode & 0o7777, atime=now, mtime=now, ctime=now)
        return ino

    def _link_into(self, path: str, ino: int) -> None:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise OSError(errno.EEXIST, path)
        parent.entries[name] = ino
        parent.mtime = parent.ctime = time.time()
        self.nodes[ino].nlink += 1

    def _drop_link(self, ino: int) -> None:
        node = self.nodes[ino]
        node.nlink -= 1
        node.ctime = time.time()
        self._forget_if_unused(ino)

    def _forget_if_unused(self, ino: int) -> None:
        node = self.nodes[ino]
        if node.nlink <= 0 and node.opened <= 0 and ino != ROOT_INO:
            # Gone from the current tree; its durable copy (if any) stays until the next mount.
            del self.nodes[ino]

    # ------------------------------------------------------------------ FUSE operations

    def __call__(self, op: str, *args: Any) -> Any:
        if not hasattr(self, op):
            raise OSError(errno.EFAULT, op)
        try:
            return getattr(self, op)(*args)
        except KeyError as exc:  # a path or handle that does not exist
            raise OSError(errno.ENOENT, str(exc)) from exc

    def init(self, path: str) -> None:
        pass

    def destroy(self, path: str) -> None:
        (self.state / _DISCARDED).write_text(json.dumps(self.discarded()), encoding="utf-8")

    def getattr(self, path: str | None, fh: Any = None) -> dict[str, Any]:
        ino, node = self._node(path, fh)
        size = len(node.data) if node.kind == stat.S_IFREG else len(node.target)
        if node.kind == stat.S_IFDIR:
            size = _BLOCK
        return {
            "st_ino": ino,
            "st_mode": node.kind | node.mode,
            "st_nlink": max(node.nlink, 1 if node.kind != stat.S_IFDIR else 2),
            "st_size": size,
            "st_blocks": (size + 511) // 512,
            "st_uid": node.uid,
            "st_gid": node.gid,
            "st_atime": node.atime,
            "st_mtime": node.mtime,
            "st_ctime": node.ctime,
        }

    def statfs(self, path: str) -> dict[str, int]:
        used = sum(len(n.data) for n in self.nodes.values()) // _BLOCK + 1
        free = _TOTAL_BLOCKS - used
        return {
            "f_bsize": _BLOCK,
            "f_frsize": _BLOCK,
            "f_blocks": _TOTAL_BLOCKS,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": 1 << 20,
            "f_ffree": (1 << 20) - len(self.nodes),
            "f_favail": (1 << 20) - len(self.nodes),
            "f_namemax": 255,
        }

    def access(self, path: str, amode: int) -> None:
        self._lookup(path)

    def chmod(self, path: str, mode: int) -> None:
        _, node = self._node(path)
        node.mode = mode & 0o7777
        node.ctime = time.time()

    def chown(self, path: str, uid: int, gid: int) -> None:
        _, node = self._node(path)
        if uid != -1 and uid != 0xFFFFFFFF:
            node.uid = uid
        if gid != -1 and gid != 0xFFFFFFFF:
            node.gid = gid

    def utimens(self, path: str, times: tuple[float, float] | None = None) -> None:
        _, node = self._node(path)
        node.atime, node.mtime = times if times else (time.time(), time.time())

    def readlink(self, path: str) -> str:
        return self._node(path)[1].target

    # -- namespace

    def mkdir(self, path: str, mode: int) -> None:
        ino = self._new(stat.S_IFDIR, mode)
        self._link_into(path, ino)

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        ino = parent.entries[name]
        if self.nodes[ino].kind != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, path)
        if self.nodes[ino].entries:
            raise OSError(errno.ENOTEMPTY, path)
        del parent.entries[name]
        self._drop_link(ino)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        ino = self._new(stat.S_IFREG, mode)
        self._link_into(path, ino)
        self.nodes[ino].opened += 1
        return ino

    def mknod(self, path: str, mode: int, dev: int) -> None:
        if not stat.S_ISREG(mode):
            raise OSError(errno.EPERM, path)
        self._link_into(path, self._new(stat.S_IFREG, mode))

    def symlink(self, target: str, source: str) -> None:
        ino = self._new(stat.S_IFLNK, 0o777)
        self.nodes[ino].target = source
        self._link_into(target, ino)

    def link(self, target: str, source: str) -> None:
        self._link_into(target, self._lookup(source))

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        ino = parent.entries.pop(name)
        parent.mtime = parent.ctime = time.time()
        self._drop_link(ino)

    def rename(self, old: str, new: str) -> None:
        old_parent, old_name = self._parent(old)
        new_parent, new_name = self._parent(new)
        ino = old_parent.entries[old_name]
        replaced = new_parent.entries.get(new_name)
        if replaced == ino:
            return
        if replaced is not None and self.nodes[replaced].entries:  # a directory not empty
            raise OSError(errno.ENOTEMPTY, new)
        del old_parent.entries[old_name]
        new_parent.entries[new_name] = ino
        old_parent.mtime = new_parent.mtime = time.time()
        if replaced is not None:
            self._drop_link(replaced)

    def opendir(self, path: str) -> int:
        return self._lookup(path)

    def readdir(self, path: str | None, fh: Any) -> list[str]:
        _, node = self._node(path, fh)
        return [".", "..", *node.entries]

    def releasedir(self, path: str | None, fh: Any) -> None:
        pass

    def fsyncdir(self, path: str | None, datasync: int, fh: Any) -> None:
        """Make this directory's entries durable (not its children's content: each file and
        directory is made durable by its own fsync)."""
        ino, node = self._node(path, fh)
        self.durable_dirs[ino] = dict(node.entries)
        self._note_durable_meta(ino)
        for child in node.entries.values():
            if child not in self.durable_meta:  # an entry to a file never fsync'd: empty
                self._note_durable_meta(child)
        self._save_tree()

    # -- files

    def open(self, path: str, flags: int) -> int:
        ino = self._lookup(path)
        self.nodes[ino].opened += 1
        return ino

    def release(self, path: str | None, fh: Any) -> None:
        ino = int(fh)
        node = self.nodes[ino]
        node.opened -= 1
        self._forget_if_unused(ino)

    def flush(self, path: str | None, fh: Any) -> None:
        pass  # close() makes nothing durable

    def read(self, path: str | None, size: int, offset: int, fh: Any) -> bytes:
        _, node = self._node(path, fh)
        node.atime = time.time()
        return bytes(node.data[offset : offset + size])

    def write(self, path: str | None, data: bytes, offset: int, fh: Any) -> int:
        _, node = self._node(path, fh)
        end = offset + len(data)
        if end > len(node.data):
            node.mark(len(node.data), offset)  # a hole reads as zeros, durable ones too
            node.data.extend(bytes(end - len(node.data)))
        node.data[offset:end] = data
        node.mark(offset, end)
        node.mtime = node.ctime = time.time()
        return len(data)

    def truncate(self, path: str | None, length: int, fh: Any = None) -> None:
        _, node = self._node(path, fh)
        size = len(node.data)
        if length < size:
            del node.data[length:]
        else:
            node.data.extend(bytes(length - size))
            node.mark(size, length)
        node.mtime = node.ctime = time.time()

    def fsync(self, path: str | None, datasync: int, fh: Any) -> None:
        """Make this file's content durable: copy the ranges changed since the last fsync."""
        ino, node = self._node(path, fh)
        if node.kind == stat.S_IFREG:
            size = len(node.data)
            fd = os.open(self._backing(ino), os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                for start, end in _merged(node.dirty, size):
                    os.pwrite(fd, node.data[start:end], start)
            finally:
                os.close(fd)
            node.dirty.clear()
            node.durable_size = size
        self._note_durable_meta(ino)
        self._save_tree()


# ---------------------------------------------------------------------- the test side


def _mounted(mountpoint: Path) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return any(line.split()[4] == target for line in f)


def _unmount(mountpoint: Path, *, lazy: bool = False) -> bool:
    args = ["umount", "-l", str(mountpoint)] if lazy else ["umount", str(mountpoint)]
    done = subprocess.run(args, capture_output=True, timeout=20, check=False)
    return done.returncode == 0


class LazyMount:
    """A `LazyOperations` file system at `mountpoint`, its durable state in `state`, served by
    its own process. `cut()` is the power cut; `close()` (always called, see `lazy_mount`)
    unmounts and ends the process whatever happened."""

    def __init__(self, mountpoint: Path, state: Path) -> None:
        self.mountpoint = mountpoint
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = state.parent / f"{state.name}.log"
        #: what each cut threw away ({"bytes": n, "entries": n}), in order
        self.cuts: list[dict[str, int]] = []

    def start(self, timeout: float = 20.0) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.state.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.support.lazy_fs",
                    str(self.state),
                    str(self.mountpoint),
                ],
                stdout=log,
                stderr=log,
                cwd=Path(__file__).resolve().parents[2],
            )
        deadline = time.monotonic() + timeout
        while not _mounted(self.mountpoint):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"lazy_fs did not mount {self.mountpoint}: {self._log_tail()}")
            time.sleep(0.05)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def unmount(self, timeout: float = 20.0) -> dict[str, int]:
        """Unmount (the kernel drops its cache of the mount) and wait for the process to end;
        returns what the current state held beyond the durable one."""
        (self.state / _DISCARDED).unlink(missing_ok=True)
        deadline = time.monotonic() + timeout
        while not _unmount(self.mountpoint):
            if time.monotonic() > deadline:  # still busy: detach it, the process then ends
                _unmount(self.mountpoint, lazy=True)
                break
            time.sleep(0.1)
        assert self.proc is not None
        try:
            self.proc.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise RuntimeError(f"lazy_fs did not exit after unmount: {self._log_tail()}") from None
        report = self.state / _DISCARDED
        if not report.exists():
            raise RuntimeError(f"lazy_fs wrote no {_DISCARDED}: {self._log_tail()}")
        discarded: dict[str, int] = json.loads(report.read_text(encoding="utf-8"))
        return discarded

    def cut(self) -> dict[str, int]:
        """The power cut: unmount, end the process, mount again from the durable state. The
        programs using the mount must be stopped first (SIGKILL, as the power would)."""
        discarded = self.unmount()
        self.cuts.append(discarded)
        self.start()
        return discarded

    def close(self) -> None:
        """Unmount and end the process, whatever state they are in (a finalizer)."""
        if _mounted(self.mountpoint) and not _unmount(self.mountpoint):
            _unmount(self.mountpoint, lazy=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if _mounted(self.mountpoint):
            _unmount(self.mountpoint, lazy=True)


@contextlib.contextmanager
def lazy_mount(base: Path) -> Iterator[LazyMount]:
    """A started `LazyMount` at ``base/mnt`` (state in ``base/state``), always torn down."""
    mount = LazyMount(base / "mnt", base / "state")
    try:
        mount.start()
        yield mount
    finally:
        mount.close()


def main(argv: list[str]) -> int:
    from fuse import FUSE  # fusepy: imported here, the test side does not need libfuse

    state, mountpoint = Path(argv[0]), argv[1]
    logging.basicConfig(level=logging.WARNING)
    FUSE(
        LazyOperations(state),
        mountpoint,
        foreground=True,
        nothreads=True,  # one request at a time: the model needs no locks
        hard_remove=True,  # unlink removes at once (no .fuse_hidden entries in the tree)
        big_writes=True,
        max_write=131072,
        fsname="lazy_fs",
        subtype="lazy_fs",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
