"""A private, loopback-only Postfix instance for the benchmark (never the system's /etc/postfix).

The system main.cf and master.cf are copied into a temporary config_directory and changed with
`postconf -c DIR`: queue, data and log under the temp dir, smtpd on 127.0.0.1:PORT only, relaying
for 127.0.0.0/8 to `[127.0.0.1]:SINKPORT`, no chroot (the chroot jail would need copies of system
files), no TLS. Everything else, including the durable queue (fsync of every queue file before the
250), process limits and the connection cache, stays at Postfix's defaults. The log goes to a
`maillog_file` (postlogd), as an administrator's Postfix logs every message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from common import free_port, process_tree, wait_port

__all__ = ["PostfixSystem"]

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


def available() -> str | None:
    """None if a private Postfix can be run here, else the reason it cannot."""
    if not os.access(POSTFIX, os.X_OK) or not os.access(POSTCONF, os.X_OK):
        return "postfix/postconf not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "starting a Postfix instance needs root"
    if not Path("/etc/postfix/main.cf").exists():
        return "/etc/postfix/main.cf missing"
    return None


class PostfixSystem:
    name = "Postfix"

    def __init__(
        self,
        workdir: Path,
        sink_port: int,
        *,
        process_limit: int | None = None,
        port: int | None = None,
        settings: dict[str, str] | None = None,
        services: dict[int, str] | None = None,
    ) -> None:
        """`port`: smtpd's (default: a free one); `settings`: main.cf parameters set after the
        private instance's own (tests/smtp/test_differential.py: smtpd_forbid_bare_newline);
        `services`: more smtpd listeners, port -> `-o name=value` options."""
        self.dir = workdir / "postfix"
        self.etc = self.dir / "etc"
        self.spool = self.dir / "spool"
        self.data = self.dir / "data"
        self.sink_port = sink_port
        self.port = port or free_port()
        self.process_limit = process_limit
        self.settings = settings or {}
        self.services = services or {}
        self.master_pid: int | None = None
        self.started = False

    def _postconf(self, *args: str) -> None:
        subprocess.run(
            [POSTCONF, "-c", str(self.etc), *args],
            check=True,
            capture_output=True,
            timeout=30,
        )

    def configure(self) -> None:
        for d in (self.etc, self.spool, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.copy("/etc/postfix/main.cf", self.etc / "main.cf")
        shutil.copy("/etc/postfix/master.cf", self.etc / "master.cf")
        shutil.chown(self.data, user="postfix")
        settings = {
            "queue_directory": str(self.spool),
            "data_directory": str(self.data),
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "myhostname": "postfix-bench.localdomain",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "mail_owner": "postfix",
            "maillog_file": str(self.dir / "maillog"),
            "maillog_file_prefixes": str(self.dir),
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
        }
        if self.process_limit:
            settings["default_process_limit"] = str(self.process_limit)
        settings.update(self.settings)
        self._postconf("-e", *(f"{k}={v}" for k, v in settings.items()))
        self._postconf("-F", "*/*/chroot = n")
        self._postconf("-MX", "smtp/inet")
        self._postconf(
            "-M", f"127.0.0.1:{self.port}/inet=127.0.0.1:{self.port} inet n - n - - smtpd"
        )
        for port, options in self.services.items():
            self._postconf(
                "-M", f"127.0.0.1:{port}/inet=127.0.0.1:{port} inet n - n - - smtpd {options}"
            )

    def start(self) -> None:
        self.configure()
        out = subprocess.run(
            [POSTFIX, "-c", str(self.etc), "start"], capture_output=True, text=True, timeout=60
        )
        self.started = True
        if out.returncode != 0:
            raise RuntimeError(f"postfix start failed: {out.stderr.strip() or out.stdout.strip()}")
        pidfile = self.spool / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.master_pid = int(pidfile.read_text().strip())
                if Path(f"/proc/{self.master_pid}").exists():
                    break
            time.sleep(0.05)
        if not self.master_pid or not wait_port("127.0.0.1", self.port, 15):
            raise RuntimeError(f"postfix did not listen on 127.0.0.1:{self.port}")

    def roots(self) -> list[int]:
        return [self.master_pid] if self.master_pid else []

    def queue_empty(self) -> bool:
        for sub in ("incoming", "active", "deferred", "maildrop"):
            d = self.spool / sub
            with contextlib.suppress(OSError):
                for _root, _dirs, files in os.walk(d):
                    if files:
                        return False
        return True

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([POSTFIX, "-c", str(self.etc), "stop"], capture_output=True, timeout=60)
        # `postfix stop` returns before master is gone; make sure nothing is left behind.
        pid = self.master_pid
        if pid:
            deadline = time.monotonic() + 15
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{pid}").exists():
                for child in process_tree([pid]):
                    with contextlib.suppress(OSError):
                        os.kill(child, signal.SIGKILL)

    def describe(self) -> str:
        out = subprocess.run(
            [POSTCONF, "-c", str(self.etc), "-h", "mail_version"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return f"Postfix {out.stdout.strip()}"
