"""A real, throwaway PostgreSQL server for tests.

`PostgresServer` runs ``initdb`` into a fresh temporary directory and starts ``postgres`` on
``127.0.0.1`` at a free port (TCP on loopback only; the Unix socket lives inside the data
directory), with authentication ``trust`` for the superuser ``relaygate``. ``fsync`` stays on:
tests check durability against it. ``stop()`` shuts it down and deletes the directory.

PostgreSQL refuses to run as root, so when the tests run as root the server programs run as the
``postgres`` OS user (``runuser -u postgres``) and the data directory belongs to that user.

Use it from pytest through the ``postgres_server`` / ``postgres_url`` fixtures in
``tests/conftest.py``::

    def test_something(postgres_url: str) -> None:
        with psycopg.connect(postgres_url) as conn:
            ...
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from tests.support.ports import free_port

__all__ = ["PostgresNotInstalledError", "PostgresServer", "PostgresStartError", "find_bindir"]

USER = "relaygate"
_RUN_AS = "postgres"  # the OS user the server runs as when the tests run as root


class PostgresNotInstalledError(RuntimeError):
    """The PostgreSQL server programs (initdb, pg_ctl, postgres) were not found."""


class PostgresStartError(RuntimeError):
    """initdb or pg_ctl start failed; the message carries the tail of the server log."""


def _version_key(bindir: str) -> tuple[int, ...]:
    # /usr/lib/postgresql/<version>/bin: sort numerically so 15 beats 9.6.
    version = Path(bindir).parent.name
    return tuple(int(part) for part in re.findall(r"\d+", version))


def find_bindir() -> Path:
    """The directory holding initdb, pg_ctl and postgres: the newest Debian install first."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_version_key, reverse=True)
    try:
        out = subprocess.run(
            ["pg_config", "--bindir"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        candidates.append(out)
    except (OSError, subprocess.SubprocessError):
        pass
    initdb = shutil.which("initdb")
    if initdb:
        # /usr/local/bin/initdb may be a symlink to the versioned bin dir.
        candidates.append(str(Path(initdb).resolve().parent))
    for candidate in candidates:
        if all((Path(candidate) / prog).is_file() for prog in ("initdb", "pg_ctl", "postgres")):
            return Path(candidate)
    raise PostgresNotInstalledError(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found under "
        "/usr/lib/postgresql/*/bin, via pg_config or on PATH: install the Debian package "
        "`postgresql` (`make debs` does it)"
    )


def _free_port() -> int:
    return free_port()  # below the ephemeral range: tests/support/ports.py


class PostgresServer:
    """One PostgreSQL cluster in a private temporary directory; ``start()`` / ``stop()``."""

    def __init__(self) -> None:
        self.port = 0
        self.base_dir: Path | None = None
        self.bindir: Path | None = None

    # -- paths ------------------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        if self.base_dir is None:
            raise RuntimeError("PostgresServer is not started")
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "log"

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        self.bindir = find_bindir()
        # mkdtemp makes the directory 0700; the postgres user must be able to traverse it, and
        # /tmp (not $TMPDIR, which may sit under an unreadable home) is world-traversable.
        tmp_root = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()
        self.base_dir = Path(tempfile.mkdtemp(prefix="relaygate-pg-", dir=tmp_root))
        try:
            self.base_dir.chmod(0o755)
            self.data_dir.mkdir(mode=0o700)
            if os.geteuid() == 0:
                pw = pwd.getpwnam(_RUN_AS)
                os.chown(self.data_dir, pw.pw_uid, pw.pw_gid)
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                USER,
                "--encoding=UTF8",
                # The C locale always exists; the environment's locale may not be installed.
                "--locale=C",
                "--no-instructions",
                what="initdb",
            )
            self._start_on_free_port()
        except BaseException:
            self.stop()
            raise

    def _start_on_free_port(self, attempts: int = 5) -> None:
        # Between picking a port and postgres binding it another process (another xdist
        # worker, say) can take it: then try another port.
        for attempt in range(attempts):
            self.port = _free_port()
            self.log_path.unlink(missing_ok=True)
            try:
                self._pg_ctl_start(what="pg_ctl start")
                return
            except PostgresStartError as exc:
                if "address already in use" not in str(exc).lower() or attempt == attempts - 1:
                    raise

    def crash(self) -> None:
        """Stop the server the way a crash would (``-m immediate``: no shutdown checkpoint, so
        the next start replays the WAL), keeping its data."""
        self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", what="crash")

    def restart(self) -> None:
        """Start a crashed server again on its data and port (crash recovery runs first)."""
        self._pg_ctl_start(what="pg_ctl start (restart)")

    def _pg_ctl_start(self, *, what: str) -> None:
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-w",
            "-t",
            "60",
            "-l",
            str(self.log_path),
            "-o",
            self._options(),
            what=what,
        )

    def _options(self) -> str:
        return " ".join(
            f"-c {setting}"
            for setting in (
                "listen_addresses=127.0.0.1",
                f"port={self.port}",
                f"unix_socket_directories={shlex.quote(str(self.data_dir))}",
                "max_connections=200",
                "shared_buffers=32MB",
            )
        )

    def stop(self) -> None:
        """Stop the server (if running) and delete its directory; safe to call twice."""
        if self.base_dir is None:
            return
        if self.bindir is not None and (self.data_dir / "postmaster.pid").exists():
            # The data is thrown away, so there is no point in a clean checkpoint.
            subprocess.run(
                [
                    *self._as_server_user(),
                    str(self.bindir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "immediate",
                    "-w",
                    "-t",
                    "60",
                ],
                cwd=self.base_dir,
                capture_output=True,
                timeout=90,
            )
        shutil.rmtree(self.base_dir, ignore_errors=True)
        self.base_dir = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- databases --------------------------------------------------------------------------

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """Create a fresh, uniquely named database and return its URL."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        # CREATE DATABASE cannot run inside a transaction block.
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, disconnecting any sessions a test left open (FORCE)."""
        with psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def _as_server_user() -> list[str]:
        return ["runuser", "-u", _RUN_AS, "--"] if os.geteuid() == 0 else []

    def _run(self, prog: str, *args: str, what: str) -> None:
        assert self.bindir is not None and self.base_dir is not None
        # cwd: the postgres user cannot necessarily enter the caller's working directory.
        proc = subprocess.run(
            [*self._as_server_user(), str(self.bindir / prog), *args],
            cwd=self.base_dir,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if proc.returncode != 0:
            raise PostgresStartError(
                f"{what} failed (exit {proc.returncode}) in {self.data_dir}:\n"
                f"{proc.stdout}{proc.stderr}\n--- server log (tail) ---\n{self._log_tail()}"
            )

    def _log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])
