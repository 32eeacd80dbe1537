"""The supervisor's reloads: the config file's edits and SIGHUP read here and offered to every
worker, the answers settled into the node's configuration (the text a restarted worker gets),
ACME switched on or off, a reload refused when another process listens where it would; and the
copy of the users file the workers fall back on. With them, how the node tells its own
listeners from another process's on a port (/proc/net/tcp).

A mixin of `Supervisor` (workers.py), against the state declared in supervisor_state.py; it
logs as relaygate.workers, as the supervisor does.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
from pathlib import Path

from relaygate.config import Config, ConfigError, parse_text
from relaygate.config.loader import read_config_text
from relaygate.config.values import Binding
from relaygate.logs.service import apply_config as apply_service_log
from relaygate.supervisor_state import _file_stamp, _SupervisorState, _write_private
from relaygate.worker_link import text_digest

logger = logging.getLogger("relaygate.workers")


class _ReloadOwnership(_SupervisorState):
    """Supervisor's reloads and its copy of the users file."""

    def _check_file(self) -> None:
        """The config file was edited (no SIGHUP): reload it, as a SIGHUP does. The workers do
        not watch it: what they run is what this process offers them (`_reload`)."""
        if _file_stamp(self.config_path) != self._file_stamp:
            self._reload()

    def _mirror_users(self) -> None:
        """The users file of the node's configuration, copied (``users_mirror_path``, 0600) each
        time it changed and can be read, for a worker started again while it cannot: the
        running workers keep the users they read, and that worker would not start at all
        (relaygate.app: it starts with the copy, and says so). Blocking, small: a stat every
        FILE_CHECK_INTERVAL, a read and a parse when the file changed."""
        from relaygate.smtp.auth import UserStore, users_path

        if self._node is None:
            return
        data_dir = Path(self.config.server.data_dir)  # the workers' (pinned_queue)
        path = users_path(data_dir, self._node[2].server.users_file)
        seen = (path, _file_stamp(path))
        if seen == self._users_seen:
            return
        self._users_seen = seen
        mirror = users_mirror_path(data_dir)
        if seen[1] is None:  # no file: no users, which a worker starts with
            with contextlib.suppress(FileNotFoundError):
                mirror.unlink()
            return
        tmp = mirror.with_name(mirror.name + ".tmp")
        try:
            _write_private(tmp, path.read_text(encoding="utf-8"))
            UserStore(tmp)  # as a worker reads it: ValueError when it cannot be used
            os.replace(tmp, mirror)
        except (OSError, ValueError):  # (the workers say why, when they read it)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _apply_acme(self, new: Config) -> None:
        """The ACME client of the node (this process's; the workers watch its files): started,
        stopped or given the new settings, as the reloaded file says (the workers apply the
        same file to their listeners). A worker started from now on pins this state."""
        from relaygate.acme import reconcile

        self.acme = reconcile(self.acme, new)
        self.acme_directory_url = new.server.acme_directory_url

    def _reload(self) -> None:
        """Read the config file and offer it to every worker (`_offered_file`, then SIGHUP), unless
        it is refused here: invalid, or a port the node does not listen on yet that another
        process serves. Refused here, it is logged once and reaches no worker."""
        self._file_stamp = _file_stamp(self.config_path)
        try:
            text = read_config_text(self.config_path)
            new = parse_text(text, str(self.config_path), base_dir=self.config_path.parent)
        except ConfigError as exc:
            logger.error("reload refused, configuration invalid:\n%s", exc)
            return
        except Exception:  # never let a reload take the supervisor (and every worker) down
            logger.exception("reload refused: cannot load %s", self.config_path)
            return
        if not self._new_bindings_free(new):
            return
        try:
            _write_private(self._offered_file, text)
        except OSError as exc:
            logger.error("reload refused: cannot write %s: %s", self._offered_file, exc)
            return
        self._pending = (text_digest(text), text, new)
        self._offered.append(self._pending)
        self._hang_timeout = new.server.worker_hang_timeout.total_seconds()
        # this process's own lines; each worker applies the file's on its own reload
        apply_service_log(new.server.log_format, new.server.log_level)
        self._apply_acme(new)
        if new.server.workers != self.count:
            logger.warning(
                "server.workers changed from %d to %d: takes effect when relaygate serve restarts",
                self.count,
                new.server.workers,
            )
        balance = self.config.server.worker_balance  # the start's: the workers keep it
        if new.server.worker_balance != balance:
            logger.warning(
                "server.worker_balance changed from %s to %s: takes effect when relaygate serve "
                "restarts (the open-connection table is made at start, for connection alone)",
                balance,
                new.server.worker_balance,
            )
        for w in self.workers:
            w.runs = None  # until it says what it runs after this reload
            if w.ready is not None:
                self._signal(w, signal.SIGHUP)
            elif w.proc is not None:
                w.reload_pending = True  # still starting: it has no SIGHUP handler yet

    def _new_bindings_free(self, new: Config) -> bool:
        """Whether no other process listens where `new` has a listener (`check_bindings_free`:
        the workers' SO_REUSEPORT would share it with that process, as at start); logs the
        refusal naming the binding. A binding that meets a listener is let through only when
        that listener is the node's own (`_node_holds`): skipping every port the node listened
        on let another process's listener on another address of such a port through."""
        from relaygate.smtp.server import ListenerError, check_bindings_free, listener_bindings

        # the node's, and those of a reload the workers may be applying now
        running = [known[2] for known in (self._node, self._pending) if known is not None]
        held = frozenset(binding for config in running for binding in listener_bindings(config))
        try:
            check_bindings_free(new, node_holds=lambda binding: _node_holds(binding, held))
        except ListenerError as exc:
            logger.error("reload refused, keeping the running configuration: %s", exc)
            return False
        return True

    def _settle_reload(self) -> None:
        """Once every running worker said what it runs: the node runs that text if they all run
        the same (a worker started from now on is handed it). Answers to an earlier offer may
        come after a later one was made: whatever text they agree on is the node's."""
        answers = [w.runs for w in self.workers if w.proc is not None]
        if not answers or None in answers:  # (none runs: each is offered the reload at start)
            return
        offered, self._pending = self._pending, None
        agreed = set(answers)
        if len(agreed) > 1:
            if offered is not None:  # once per reload
                logger.error(
                    "the workers run different configurations: the reload of %s was refused by "
                    "some of them (see their lines); a worker started now runs the previous one",
                    self.config_path,
                )
            return
        digest = agreed.pop()
        if self._node is not None and digest == self._node[0]:
            return
        node = next(
            (known for known in (offered, *self._offered) if known and known[0] == digest), None
        )
        if node is None:
            return
        self._node = node
        try:
            _write_private(self._node_file, node[1])
        except OSError as exc:
            logger.error("cannot write %s: %s", self._node_file, exc)


def users_mirror_path(data_dir: Path) -> Path:
    """The supervisor's copy of the users file as it last could be read (`_mirror_users`)."""
    return Path(data_dir) / "run" / "users-applied.json"


def _node_holds(binding: Binding, held: frozenset[Binding]) -> bool:
    """Whether the listener `binding` cannot be bound beside is the node's own: `binding` is one
    the workers hold, or every listener that shares its endpoint (a wildcard and an address on
    its port) is one of theirs (/proc/net/tcp*). Where the listeners cannot be listed, one that
    shares an endpoint with the node's is taken for the node's (as the check did before)."""
    if binding in held:
        return True
    if not any(binding.shares_endpoint(mine) for mine in held):
        return False  # nothing of the node's there: another process listens
    listening = listening_bindings(binding.port)
    if listening is None:
        return True
    return all(other in held for other in listening if binding.shares_endpoint(other))


#: /proc's files of TCP sockets, and the state of a listening one in them
_PROC_TCP = (Path("/proc/net/tcp"), Path("/proc/net/tcp6"))
_TCP_LISTEN = "0A"


def listening_bindings(port: int) -> set[Binding] | None:
    """The addresses TCP sockets of this network namespace listen on at `port`, any process's
    (Linux's /proc/net/tcp and tcp6), or None when they cannot be read."""
    found: set[Binding] = set()
    try:
        tables = [path.read_text() for path in _PROC_TCP if path.exists()]
    except OSError:
        return None
    if not tables:
        return None
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 4 or fields[3] != _TCP_LISTEN:
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) == port:
                found.add(Binding(_proc_address(address), port))
    return found


def _proc_address(hex_address: str) -> str:
    """An address as /proc/net/tcp* writes it (32-bit words in host order, little-endian here):
    as a configuration writes it (an IPv4-mapped IPv6 address as the IPv4 one)."""
    raw = b"".join(
        bytes.fromhex(hex_address[i : i + 8])[::-1] for i in range(0, len(hex_address), 8)
    )
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)
