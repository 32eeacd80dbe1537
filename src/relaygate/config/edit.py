"""Editing the config file in place: comments and layout kept, every edit validated, atomic writes.

The CLI's `connector`, `permission`, `domain` and `send-connector` verbs (and `import exchange --write`)
change the file through this module:

1. the file is read and parsed with tomlkit (a lossless document: comments, blank lines, key order,
   inline comments and string styles survive);
2. the caller mutates the document with the helpers below;
3. the whole resulting text is validated with the same parser `relaygate check` uses, so a refused edit
   raises `ConfigError` whose problems print exactly as `check` prints them, and the file is untouched;
4. the text is written atomically: a temporary file in the same directory, fsync, rename over the
   original (mode kept), fsync of the directory. A running server sees either the old or the new file,
   never half of one, and reloads on the change (file watch or SIGHUP).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import tomlkit
from tomlkit.container import Container
from tomlkit.items import AoT, Array, Comment, Null, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from relaygate.config.loader import ConfigError, Problem, parse_text
from relaygate.config.model import Config

__all__ = [
    "EditError",
    "EditResult",
    "append_table",
    "apply_edit",
    "atomic_write",
    "find_table",
    "list_value",
    "new_table",
    "remove_table",
    "set_key",
    "tables",
]

T = TypeVar("T")

#: The UTF-8 byte order mark Windows Notepad writes: the loader skips it (utf-8-sig), so the editor
#: reads past it too and writes it back, keeping the file as its author saved it.
_BOM = b"\xef\xbb\xbf"

NEW_FILE_HEADER = (
    "# RelayGate configuration (created by `relaygate`; edit by hand or with the CLI, comments are kept).\n"
    "# Check it with `relaygate check`; a running server reloads it on change or SIGHUP.\n"
)


class EditError(Exception):
    """An edit that cannot be made (unknown connector, entry not present...): nothing was written."""


@dataclass(frozen=True, slots=True)
class EditResult(Generic[T]):
    """The outcome of `apply_edit`: the validated new config, the config before (None if the file was
    missing or invalid), whether the file changed, and what the mutation returned."""

    path: Path
    config: Config
    before: Config | None
    changed: bool
    value: T
    created: bool = False


# -- file level -------------------------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (temp file + fsync + rename + fsync dir).

    A symlinked config is written through to its target. An existing file keeps its permission bits
    (and owner, when allowed); a new file gets 0644 less the umask.
    """
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            st = os.stat(target)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp_name, 0o644 & ~umask)
        else:
            os.chmod(tmp_name, stat.S_IMODE(st.st_mode))
            with contextlib.suppress(AttributeError, PermissionError, OSError):
                os.chown(tmp_name, st.st_uid, st.st_gid)
        os.replace(tmp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # e.g. Windows: directories cannot be opened; rename is durable enough there
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path, create: bool) -> tuple[bytes | None, TOMLDocument]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise EditError(
                f"{path}: no such config file (create one with `relaygate connector new`, or pass --config)"
            ) from None
        if not path.parent.exists() and str(path.parent):
            raise EditError(f"{path}: directory {path.parent} does not exist") from None
        doc = tomlkit.document()
        for line in NEW_FILE_HEADER.splitlines():
            doc.add(tomlkit.comment(line.removeprefix("# ")))
        doc.add(tomlkit.nl())
        return None, doc
    except OSError as exc:
        raise ConfigError([Problem(str(path), "(file)", f"cannot read: {exc.strerror}")]) from None
    try:
        text = raw.removeprefix(_BOM).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem(str(path), "(file)", f"not UTF-8: {exc}")]) from None
    try:
        return raw, tomlkit.parse(text)
    except Exception as exc:  # tomlkit raises its own ParseError subclasses
        raise ConfigError([Problem(str(path), "(syntax)", f"not valid TOML: {exc}")]) from None


def apply_edit(
    path: Path,
    mutate: Callable[[TOMLDocument], T],
    *,
    create: bool = False,
    source: str | None = None,
) -> EditResult[T]:
    """Read `path`, run `mutate(doc)`, validate the result as `check` would, write it atomically.

    Raises `EditError` (from `mutate`, a missing file or one that cannot be written) or
    `ConfigError` (the edit would leave an invalid file); in both cases the file is
    byte-identical to before.
    """
    source = source or str(path)
    with _edit_lock(path):
        raw, doc = _read(path, create)
        base_dir = path.parent
        before: Config | None = None
        if raw is not None:
            with contextlib.suppress(ConfigError):
                text = raw.removeprefix(_BOM).decode("utf-8")
                before = parse_text(text, source, base_dir=base_dir)
        value = mutate(doc)
        text = tomlkit.dumps(doc)
        config = parse_text(text, source, base_dir=base_dir)  # raises ConfigError: nothing written
        bom = _BOM if raw is not None and raw.startswith(_BOM) else b""
        data = bom + text.encode("utf-8")
        changed = raw != data
        if changed:
            try:
                atomic_write(path, data)
            except OSError as exc:  # e.g. no write access to the directory: not a traceback
                raise EditError(_write_failure(path, exc)) from None
    return EditResult(path, config, before, changed, value, created=raw is None)


def _write_failure(path: Path, exc: OSError) -> str:
    """Why `atomic_write` failed, naming the directory when it failed there: the file may well
    be writable (`ls -l` says so) while its directory, where the temporary file goes, is not."""
    reason = exc.strerror or str(exc)
    target = Path(os.path.realpath(path))
    failed = Path(os.path.realpath(exc.filename)) if exc.filename else None
    if failed is not None and target.parent in (failed, failed.parent) and failed != target:
        return (
            f"{path}: cannot write the file: cannot create a file in its directory "
            f"{target.parent} ({reason}): the file is replaced as a whole, through a temporary "
            "file beside it, so the directory must be writable; nothing changed"
        )
    return f"{path}: cannot write the file: {reason}; nothing changed"


@contextlib.contextmanager
def _edit_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive flock for one read-change-write of `path`: two edits at once (a script's
    parallel calls, two admins) each read the file and wrote their version, and the first change
    was lost though both reported it made. The lock is on the file's directory: the file itself is
    replaced by every write, so a lock on it would not be seen by the next editor. A directory
    that cannot be opened (a new file's missing directory: `_read` says so), or not locked, is
    edited unlocked."""
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    directory = target.parent if str(target.parent) else Path(".")
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            # A file system that cannot lock the directory: NFS emulates flock with byte-range
            # locks, which need a file open for writing (EBADF on a directory), or has no lockd
            # (ENOLCK); some FUSE mounts (EOPNOTSUPP). The edit goes ahead unlocked, as every
            # edit did before the lock.
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


# -- document helpers -------------------------------------------------------------------------------


def tables(doc: TOMLDocument | Table, array: str, *, header: str | None = None) -> list[Table]:
    """The `[[array]]` tables of the document (empty if the key is absent). `header`: the tables'
    header as written in the file when it is not `array` (a sub-table's dotted path)."""
    if array not in doc:
        return []
    value = doc[array]
    if isinstance(value, AoT):
        return list(value.body)
    header = header or array
    if isinstance(value, Array | list):
        raise EditError(
            f"{array} is written as an inline array; rewrite it as [[{header}]] tables to edit "
            "it with the CLI"
        )
    raise EditError(f"{array} is not an array of tables")


def find_table(
    doc: TOMLDocument, array: str, key: str, wanted: str, label: str
) -> tuple[int, Table]:
    """The table of `array` whose `key` equals `wanted` (case-insensitive), or EditError naming the choices."""
    found = tables(doc, array)
    # The name as given (any case) first: "Relay." and "Relay" are two connectors to the loader,
    # and the first of them matched either spelling, so `remove "Relay."` removed "Relay".
    for same in (_exact_name, _norm_name):
        wanted_form = same(wanted)
        for i, table in enumerate(found):
            value = table.get(key)
            if isinstance(value, str) and same(value) == wanted_form:
                return i, table
    names = [str(t.get(key)) for t in found if isinstance(t.get(key), str)]
    have = (
        f" (have: {', '.join(repr(n) for n in names)})" if names else f" (the file has no {label}s)"
    )
    raise EditError(f"no {label} named {wanted!r}{have}")


def _norm_name(value: str) -> str:
    return value.strip().lower().rstrip(".")


def _exact_name(value: str) -> str:
    return value.lower()


def new_table(values: Iterable[tuple[str, Any]], *, separate: bool = True) -> Table:
    """A fresh table holding `values` in order (None values skipped), preceded by a blank line."""
    table = tomlkit.table()
    if separate:
        table.trivia.indent = "\n"
    for key, value in values:
        if value is not None:
            table[key] = _item(value)
    return table


def append_table(doc: TOMLDocument | Table, array: str, table: Table) -> int:
    """Append `table` to the `[[array]]` tables, creating the array at the end if needed."""
    if array not in doc:
        # Inside a table (e.g. a connector's first [[...permissions]]), the table's trailing comments head
        # the next section of the file: keep them after the new sub-table.
        trailing = _take_trailing_trivia(doc) if isinstance(doc, Table) else []
        for item in trailing:
            table.add(item)
        aot = tomlkit.aot()
        aot.append(table)
        doc.append(array, aot)
        return 0
    value = doc[array]
    if not isinstance(value, AoT):
        raise EditError(f"{array} is not an array of tables; rewrite it as [[{array}]] tables")
    if value.body:
        # Comments after the last table's keys head whatever follows it in the file (the next section):
        # move them below the new table so they keep heading that section.
        for item in _take_trailing_trivia(value.body[-1]):
            table.add(item)
    value.append(table)
    return len(value.body) - 1


def remove_table(doc: TOMLDocument | Table, array: str, index: int) -> None:
    """Remove the `index`-th `[[array]]` table with its own leading comments; the comments after it
    (which head the next section of the file) take their place."""
    value = doc[array]
    assert isinstance(value, AoT)
    trailing = _take_trailing_trivia(value.body[index])
    if index > 0:
        previous = _deepest_last(value.body[index - 1])
        _take_trailing_trivia(previous)  # the removed table's leading comments go with it
        for item in trailing:
            previous.add(item)
    else:
        _replace_leading_comments(doc, value, trailing)
    del value[index]
    if not value.body:
        del doc[array]


def _replace_leading_comments(doc: TOMLDocument | Table, aot: AoT, items: list[Any]) -> None:
    """Replace the comment lines just above the first header of `aot` (and the blank lines above
    them) by `items`. That text sits in `doc` just before the array, or, when a table precedes the
    array, at the end of that table's text."""
    container = doc if isinstance(doc, Container) else doc.value
    body = container.body
    end = next(i for i, (_, item) in enumerate(body) if item is aot)
    before = next((item for _, item in reversed(body[:end]) if not isinstance(item, Null)), None)
    if isinstance(before, Table | AoT) and not (isinstance(before, AoT) and not before.body):
        last = before.body[-1] if isinstance(before, AoT) else before
        container = _deepest_last(last).value
        body = container.body
        end = len(body)
    start = end
    while (
        start > 0 and body[start - 1][0] is None and isinstance(body[start - 1][1], Comment | Null)
    ):
        start -= 1
    while (
        start > 0
        and body[start - 1][0] is None
        and isinstance(body[start - 1][1], Whitespace | Null)
    ):
        start -= 1
    _splice_unkeyed(container, start, end, items)


def _splice_unkeyed(container: Container, start: int, stop: int, items: list[Any]) -> None:
    """Replace the unkeyed items body[start:stop] by `items`, keeping tomlkit's key index in step
    (tomlkit private API: `_map` holds each key's position in the body list)."""
    body = container.body
    assert all(key is None for key, _ in body[start:stop])
    body[start:stop] = [(None, item) for item in items]
    delta = len(items) - (stop - start)
    if delta:
        positions = container._map
        for key, where in positions.items():
            if isinstance(where, tuple):
                positions[key] = tuple(i + delta if i >= stop else i for i in where)
            elif where >= stop:
                positions[key] = where + delta


def _deepest_last(table: Table) -> Table:
    """The table whose body holds the text just before the next header: a table ending in sub-tables
    hands over to its last sub-table."""
    body = table.value.body
    while body:
        last = body[-1][1]
        if isinstance(last, AoT) and last.body:
            table = last.body[-1]
        elif isinstance(last, Table):
            table = last
        else:
            break
        body = table.value.body
    return table


def _take_trailing_trivia(table: Table) -> list[Any]:
    """Remove and return the comment and blank-line items at the very end of a table's text."""
    target = _deepest_last(table)
    body = target.value.body
    taken: list[Any] = []
    # Only unkeyed items at the very end are popped, so tomlkit's index of keyed items stays valid.
    while body and body[-1][0] is None and isinstance(body[-1][1], Comment | Whitespace | Null):
        item = body.pop()[1]
        if not isinstance(item, Null):
            taken.insert(0, item)
    return taken


def set_key(table: Table, key: str, value: Any) -> None:
    """Set `key` (None deletes it). An existing key is replaced in place, keeping its comment; a new key
    goes after the table's last plain key, before any sub-tables and their leading comments."""
    if value is None:
        if key in table:
            del table[key]
        return
    item = _item(value)
    if key in table:
        table[key] = item
        return
    last: int | None = None  # where the table's last plain key is, in tomlkit's body list
    for i, (k, existing) in enumerate(table.value.body):
        if k is not None and not isinstance(existing, Table | AoT):
            last = i
    if last is None:
        table[key] = item
        return
    try:
        # tomlkit private API (present in 0.12 to 0.15; `_insert_after` went away in 0.15): keeps
        # the new key with the other plain keys, before any sub-table. It refuses a position past
        # the end, where appending is the same thing.
        table.value._insert_at(last + 1, key, item)
    except Exception:
        table[key] = item


def _item(value: Any) -> Any:
    if isinstance(value, list | tuple):
        array = tomlkit.array()
        for entry in value:
            array.append(entry)
        return array
    return value


def list_value(table: Table, key: str, default: Iterable[str] = ()) -> list[str]:
    """A multi-valued key as a list of strings: a TOML array, or Exchange's comma-separated string."""
    if key not in table:
        return list(default)
    value = table[key]
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]
