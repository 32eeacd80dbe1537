"""The editing engine (relaygate.config.edit) in-process: validation, byte-identical refusal, atomic
writes, comment placement."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomlkit

from relaygate.config import ConfigError, load_config
from relaygate.config import edit as ed
from tests.cli_admin.helpers import write

BASE = """
# head comment
[server]
name = "R1"  # inline

[[receive_connectors]]
name = "A"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.1"]

# section B
[[receive_connectors]]
name = "B"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.2"]

# tail section
[[send_connectors]]
name = "S"
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return write(tmp_path / "relaygate.toml", BASE)


def test_apply_edit_writes_and_validates(path: Path) -> None:
    def mutate(doc):
        _, table = ed.find_table(doc, "receive_connectors", "name", "a", "receive connector")
        ed.set_key(table, "max_message_size", "10MB")
        return "done"

    result = ed.apply_edit(path, mutate)
    assert result.changed and result.value == "done"
    assert result.config.connector("A").max_message_size == 10 * 1024 * 1024
    assert (
        result.before is not None
        and result.before.connector("A").max_message_size == 36 * 1024 * 1024
    )
    text = path.read_text()
    assert "# head comment" in text and "# inline" in text and "# section B" in text
    # the new key sits with A's keys, before B's heading comment
    assert text.index('max_message_size = "10MB"') < text.index("# section B")


def test_invalid_edit_raises_and_leaves_bytes(path: Path) -> None:
    before = path.read_bytes()
    stat_before = path.stat()

    def mutate(doc):
        _, table = ed.find_table(doc, "receive_connectors", "name", "B", "receive connector")
        ed.set_key(table, "remote_ip_ranges", ["10.0.0.9-10.0.0.1"])

    with pytest.raises(ConfigError) as info:
        ed.apply_edit(path, mutate)
    assert str(info.value.problems[0]).startswith(
        f'{path}: receive_connectors[1] "B": remote_ip_ranges[0]:'
    )
    assert path.read_bytes() == before
    assert (
        path.stat().st_ino == stat_before.st_ino
        and path.stat().st_mtime_ns == stat_before.st_mtime_ns
    )
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_edit_error_leaves_file(path: Path) -> None:
    before = path.read_bytes()
    with pytest.raises(ed.EditError, match="no receive connector named 'C'"):
        ed.apply_edit(
            path,
            lambda doc: ed.find_table(doc, "receive_connectors", "name", "C", "receive connector"),
        )
    assert path.read_bytes() == before


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ed.EditError, match="no such config file"):
        ed.apply_edit(tmp_path / "missing.toml", lambda doc: None)


def test_create(tmp_path: Path) -> None:
    target = tmp_path / "new.toml"

    def mutate(doc):
        ed.append_table(doc, "accepted_domains", ed.new_table([("domain", "corp.example")]))

    result = ed.apply_edit(target, mutate, create=True)
    assert result.created and result.changed
    assert result.config.accepted_domains[0].domain == "corp.example"
    assert target.read_text().startswith("# RelayGate configuration")


def test_unchanged_not_rewritten(path: Path) -> None:
    inode = path.stat().st_ino
    result = ed.apply_edit(path, lambda doc: None)
    assert not result.changed and path.stat().st_ino == inode


def test_atomic_write_replaces_inode_and_keeps_mode(path: Path) -> None:
    os.chmod(path, 0o600)
    inode = path.stat().st_ino
    ed.atomic_write(path, b"[server]\n")
    assert path.read_bytes() == b"[server]\n"
    assert path.stat().st_ino != inode  # a rename, not an in-place rewrite
    assert path.stat().st_mode & 0o777 == 0o600


def test_atomic_write_through_symlink(tmp_path: Path, path: Path) -> None:
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    ed.atomic_write(link, b"[server]\n")
    assert link.is_symlink() and path.read_bytes() == b"[server]\n"


def test_atomic_write_failure_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write(tmp_path / "x.toml", "[server]\n")

    def boom(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ed.atomic_write(target, b"new")
    assert target.read_text() == "[server]\n"
    assert sorted(os.listdir(tmp_path)) == ["x.toml"]


def test_remove_table_keeps_following_heading(path: Path) -> None:
    def mutate(doc):
        index, _ = ed.find_table(doc, "receive_connectors", "name", "B", "receive connector")
        ed.remove_table(doc, "receive_connectors", index)

    ed.apply_edit(path, mutate)
    text = path.read_text()
    assert "# section B" not in text  # B's own heading went with it
    assert "# tail section" in text and text.index("# tail section") < text.index(
        "[[send_connectors]]"
    )


def test_append_table_keeps_following_heading(path: Path) -> None:
    def mutate(doc):
        ed.append_table(
            doc,
            "receive_connectors",
            ed.new_table(
                [("name", "C"), ("bindings", ["0.0.0.0:25"]), ("remote_ip_ranges", ["10.0.0.3"])]
            ),
        )

    ed.apply_edit(path, mutate)
    text = path.read_text()
    assert (
        text.index('name = "C"') < text.index("# tail section") < text.index("[[send_connectors]]")
    )


def test_list_value_comma_string(tmp_path: Path) -> None:
    p = write(
        tmp_path / "c.toml",
        """
        [[receive_connectors]]
        name = "A"
        bindings = "0.0.0.0:25"
        remote_ip_ranges = "10.0.0.1, 10.0.0.2"
        """,
    )
    seen = {}

    def mutate(doc):
        _, table = ed.find_table(doc, "receive_connectors", "name", "A", "receive connector")
        seen["ranges"] = ed.list_value(table, "remote_ip_ranges")

    ed.apply_edit(p, mutate)
    assert seen["ranges"] == ["10.0.0.1", "10.0.0.2"]


def test_inline_array_of_tables_refused(tmp_path: Path) -> None:
    p = write(tmp_path / "i.toml", 'accepted_domains = [{domain = "corp.example"}]\n')
    with pytest.raises(ed.EditError, match="inline array"):
        ed.apply_edit(p, lambda doc: ed.tables(doc, "accepted_domains"))


def test_a_new_key_goes_after_the_plain_keys_before_sub_tables_and_their_comments() -> None:
    doc = tomlkit.parse(
        '[server]\nname = "A"\n# the TLS sub-table\n[server.tls]\nx = 1\n\n'
        '[[receive_connectors]]\nname = "c"\nbindings = ["0.0.0.0:25"]\n'
        '# permissions follow\n[[receive_connectors.permissions]]\nuser = "u"\n'
    )
    ed.set_key(doc["server"], "fqdn", "relay.example")
    ed.set_key(doc["receive_connectors"][0], "tarpit_interval", "00:00:05")
    assert tomlkit.dumps(doc) == (
        '[server]\nname = "A"\nfqdn = "relay.example"\n# the TLS sub-table\n[server.tls]\nx = 1\n\n'
        '[[receive_connectors]]\nname = "c"\nbindings = ["0.0.0.0:25"]\n'
        'tarpit_interval = "00:00:05"\n'
        '# permissions follow\n[[receive_connectors.permissions]]\nuser = "u"\n'
    )


def _waiting_for_a_flock() -> bool:
    """A thread of this process waits for an flock (a `->` line of /proc/locks with our pid)."""
    pid = f" {os.getpid()} "
    with open("/proc/locks", encoding="ascii") as locks:
        return any("->" in line and "FLOCK" in line and pid in line for line in locks)


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_two_edits_at_once_are_serialised_and_neither_is_lost(path: Path) -> None:
    """Two verbs run at once (a script's parallel calls, two admins): each read the file, changed
    it and wrote it, so the first write was lost though both reported success. The second edit
    now waits for the first and reads its result."""
    first_is_editing, second_done = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def add_domain(domain: str, first: bool) -> None:
        def mutate(doc: Any) -> None:
            if first:  # hold the edit open until the second one has run or waits for us
                first_is_editing.set()
                assert _wait_for(lambda: second_done.is_set() or _waiting_for_a_flock())
            ed.append_table(doc, "accepted_domains", ed.new_table([("domain", domain)]))

        try:
            ed.apply_edit(path, mutate)
        except BaseException as exc:  # reported by the test thread
            errors.append(exc)
        finally:
            if not first:
                second_done.set()

    first = threading.Thread(target=add_domain, args=("first.example", True))
    first.start()
    assert first_is_editing.wait(10)
    second = threading.Thread(target=add_domain, args=("second.example", False))
    second.start()
    first.join(30)
    second.join(30)
    assert not errors, errors
    domains = [d.domain for d in load_config(path).accepted_domains]
    assert sorted(domains) == ["first.example", "second.example"]


def test_a_file_that_cannot_be_written_is_an_error_not_a_traceback(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An admin without write access to the config's directory (/etc/relaygate owned by root):
    the edit stopped with a PermissionError traceback. It is an error naming the file, with
    --json too, and the file is unchanged."""
    import errno
    import json
    import tempfile

    from typer.testing import CliRunner

    from relaygate.cli import app

    def refused(*args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent))

    before = path.read_bytes()
    monkeypatch.setattr(tempfile, "mkstemp", refused)
    runner = CliRunner()
    result = runner.invoke(app, ["connector", "set", "A", "--banner", "220 x", "-c", str(path)])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    stderr = " ".join(result.stderr.split())
    assert f"error: {path}: cannot write the file: cannot create a file in its directory" in stderr
    assert "(Permission denied)" in stderr
    result = runner.invoke(app, ["domain", "add", "x.example", "-c", str(path), "--json"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert json.loads(result.stdout)["error"].startswith(f"{path}: cannot write the file")
    assert path.read_bytes() == before


def test_an_edit_goes_ahead_where_the_directory_cannot_be_locked(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """flock on the config's directory (334f9e2) fails where the file system cannot lock it
    (NFS: EBADF, its flock being a byte-range lock that needs a file open for writing; ENOLCK
    without lockd; EOPNOTSUPP on some FUSE mounts): every edit, which worked there before,
    stopped with an OSError traceback. The edit is made unlocked, as it was."""
    import errno
    import fcntl
    import os

    from typer.testing import CliRunner

    from relaygate.cli import app

    for code, domain in ((errno.EBADF, "nfs.example"), (errno.ENOLCK, "nolockd.example")):

        def no_locks(fd: int, operation: int, code: int = code) -> None:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "flock", no_locks)
        result = CliRunner().invoke(app, ["domain", "add", domain, "-c", str(path)])
        assert result.exit_code == 0, (result.output, result.exception)
        assert domain in [d.domain for d in load_config(path).accepted_domains]


def test_a_directory_that_cannot_be_written_is_named_not_the_writable_file(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is replaced as a whole (a temporary file beside it, then a rename), so it is the
    directory that must be writable: with a writable file in a directory the admin cannot write
    (/etc/relaygate owned by root, the file group-writable), the error said 'cannot write the
    file' about a file `ls -l` shows writable. It names the directory now."""
    import errno
    import tempfile

    from typer.testing import CliRunner

    from relaygate.cli import app

    def refused(*args: object, **kwargs: object) -> None:
        # as mkstemp fails: on the temporary file's name, in the config's directory
        raise PermissionError(errno.EACCES, "Permission denied", str(path.parent / ".x.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    result = CliRunner().invoke(app, ["domain", "add", "x.example", "-c", str(path)])
    assert result.exit_code == 1, result.output
    assert (
        f"cannot create a file in its directory {path.parent} (Permission denied): the file is "
        "replaced as a whole, through a temporary file beside it, so the directory must be "
        "writable"
    ) in " ".join(result.stderr.split()), result.stderr
