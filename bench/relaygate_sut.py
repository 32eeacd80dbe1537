"""RelayGate configured like the benchmark's Postfix, started as `relaygate serve --config FILE`.

(Not named `relaygate.py`: `python bench/run.py` puts bench/ first on sys.path, and a module of that
name would shadow the real package.)

One relay connector on 127.0.0.1:PORT for 127.0.0.0/8 with ms-Exch-SMTP-Accept-Any-Recipient,
protocol logging Verbose (as an administrator runs it), message tracking on, no tarpit, connection
limits raised so that the load generator is never refused; one send connector to the smtp-sink as
smart host. The queue is the default SQLite store under the temp dir, or what `queue_extra` says
(bench/ab.py --b-postgresql: a PostgreSQL queue).
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, VENV_BIN, free_port, kill_group, wait_port

__all__ = ["RelayGateSystem", "has_queue_manager"]

CONFIG = """\
[server]
name = "BENCH01"
fqdn = "relaygate-bench.localdomain"
data_dir = "{data}"
# smtp-source sends everything from 127.0.0.1 (per-source limits are raised below for the same
# reason): hash every connection on its own so that one address can use every worker.
worker_balance = "connection"
{server_extra}
[admin]
enabled = false

[[accepted_domains]]
domain = "bench.example"
domain_type = "Authoritative"

[[receive_connectors]]
name = "Bench Relay"
usage = "Custom"
bindings = ["127.0.0.1:{port}"]
remote_ip_ranges = ["127.0.0.0/8"]
auth_mechanism = ["None"]
permission_groups = ["AnonymousUsers"]
protocol_logging_level = "Verbose"
tarpit_interval = "00:00:00"
max_inbound_connection = {max_conn}
max_inbound_connection_per_source = 10000
max_inbound_connection_percentage_per_source = 100
connection_inactivity_timeout = "00:05:00"
connection_timeout = "00:10:00"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "Bench sink"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = ["127.0.0.1"]
port = {sink_port}
{queue_section}"""


def relaygate_exe() -> list[str]:
    exe = VENV_BIN / "relaygate"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "relaygate"]


def has_queue_manager() -> bool:
    """True when this build has the queue manager that delivers to smart hosts."""
    python = VENV_BIN / "python"
    out = subprocess.run(
        [
            str(python if python.exists() else sys.executable),
            "-c",
            "import relaygate.queue.manager",
        ],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
    )
    return out.returncode == 0


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 65536
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RelayGateSystem:
    name = "RelayGate"

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        *,
        max_connections: int = 20000,
        server_extra: str = "",
        queue_extra: str = "",
        env: dict[str, str] | None = None,
        python: Path | None = None,
    ) -> None:
        self.dir = workdir / "relaygate"
        self.data = self.dir / "data"
        self.config = self.dir / "relaygate.toml"
        self.sink_port = sink_port
        self.port = free_port()
        self.max_connections = max_connections
        self.server_extra = server_extra
        #: lines of a `[queue]` section (empty: the default SQLite queue)
        self.queue_extra = queue_extra
        #: set in the relay's environment on top of ours (bench/ab.py's variant: PYTHONPATH...)
        self.env = dict(env or {})
        #: run `python -m relaygate` instead of this checkout's .venv (bench/ab.py --python)
        self.python = python
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "serve.log"

    def configure(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            CONFIG.format(
                data=self.data,
                port=self.port,
                sink_port=self.sink_port,
                max_conn=self.max_connections,
                server_extra=self.server_extra,
                queue_section=f"\n[queue]\n{self.queue_extra}" if self.queue_extra else "",
            )
        )

    def start(self) -> None:
        self.configure()
        env = dict(os.environ)
        env.pop("RELAYGATE_CONFIG", None)
        env.update(self.env)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [*self.command(), "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.dir,
                env=env,
                start_new_session=True,
                preexec_fn=_raise_nofile,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"relaygate serve exited with {self.proc.returncode}:\n{self.tail_log()}"
                )
            if b"RelayGate ready" in self.log.read_bytes():
                break
            time.sleep(0.05)
        if not wait_port("127.0.0.1", self.port, 10):
            raise RuntimeError(
                f"relaygate did not listen on 127.0.0.1:{self.port}:\n{self.tail_log()}"
            )

    def command(self) -> list[str]:
        if self.python is not None:
            return [str(self.python), "-m", "relaygate"]
        return relaygate_exe()

    def tail_log(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def roots(self) -> list[int]:
        return [self.proc.pid] if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        kill_group(self.proc, grace=15)

    def describe(self) -> str:
        python = VENV_BIN / "python"
        out = subprocess.run(
            [
                str(python if python.exists() else sys.executable),
                "-c",
                "import importlib.metadata as m, sys\n"
                "try:\n import uvloop; u = 'uvloop ' + uvloop.__version__\n"
                "except ImportError:\n u = 'asyncio'\n"
                "print(m.version('relaygate'), sys.version.split()[0], u)",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        parts = out.stdout.split()
        if len(parts) >= 3:
            return f"RelayGate {parts[0]} (Python {parts[1]}, {' '.join(parts[2:])})"
        return "RelayGate"
