"""What the running relay reports to the admin listener: the health report (`health_report`), the
SMTP AUTH users as the service last read them, the open sessions.

Apart from the routes: the admin centre's pages show the same."""

from __future__ import annotations

import time
from typing import Any

from relaygate.audit import Finding, audit
from relaygate.config.model import Config
from relaygate.control import QueueControl
from relaygate.policy.address_rules import SendAsList
from relaygate.worker_stats import node_figures


def relay_findings(relay: Any, config: Config) -> list[Finding]:
    """`relaygate audit`'s findings for `config`, with the certificates' dates, the users file and
    the DKIM key sizes as the relay last read them (at start and reload: no I/O here)."""
    return audit(
        config,
        certificates=getattr(relay, "certificates", ()),
        users_without_send_as=users_without_send_as(relay),
        dkim_key_sizes=getattr(relay, "dkim_key_sizes", None),
    )


def users_without_send_as(relay: Any) -> list[str]:
    """The SMTP AUTH users without a send-as list, as the SMTP service last read its users file
    (for the audit findings; none before it runs)."""
    ctx = getattr(relay, "ctx", None)
    return ctx.users.without_send_as() if ctx is not None else []


def user_send_as(relay: Any, user: str) -> SendAsList | None:
    """`user`'s send-as list as the SMTP service last read its users file (for explain)."""
    ctx = getattr(relay, "ctx", None)
    return ctx.users.send_as(user) if ctx is not None else None


def user_unknown_in(relay: Any, user: str) -> str | None:
    """The users file's path when, as the SMTP service last read it, it does not hold `user`
    (AUTH as `user` fails: for explain); None when it does, or before the service runs."""
    ctx = getattr(relay, "ctx", None)
    if ctx is None or user.lower() in ctx.users:
        return None
    return str(ctx.users.path)


def open_sessions(relay: Any) -> dict[str, int]:
    """Open SMTP sessions per receive connector name, of every worker of the node (none before
    it listens)."""
    return node_figures(relay).open_sessions


async def health_report(
    relay: Any, control: QueueControl, started: float
) -> tuple[dict[str, Any], int]:
    """The body of ``/api/health`` and its HTTP status (200, or 503 when the store fails);
    the web dashboard shows the same report."""
    manager = getattr(relay, "manager", None)
    server = getattr(relay, "server", None)
    body: dict[str, Any] = {
        "status": "ok",
        "server": relay.config.server.name,
        "fqdn": relay.config.server.fqdn,
        "uptime_seconds": round(time.time() - started, 1),
        "smtp": [f"{h}:{p}" for h, p in (getattr(server, "endpoints", None) or [])],
        "queue_manager": {
            "running": bool(getattr(manager, "running", False)),
            "in_flight": int(getattr(manager, "in_flight", 0) or 0),
            # why the shared queue refuses this node's leases (its clock), None while it leases
            "clock_skew": getattr(manager, "clock_skew", None),
        },
    }
    try:
        body["queue"] = await control.shared_counts()
    except Exception as exc:
        body["status"] = "error"
        body["error"] = f"queue store: {exc}"
        return body, 503
    if manager is not None and not body["queue_manager"]["running"]:
        body["status"] = "degraded"
    if body["queue_manager"]["clock_skew"] is not None:
        # Degraded, not down: the node still receives (its messages stored for the others to
        # deliver), but delivers nothing until its clock agrees with the queue database's.
        body["status"] = "degraded"
    pressure = getattr(relay, "pressure", None)
    if pressure is not None:
        space = pressure.space
        body["back_pressure"] = {
            "active": pressure.high,
            "disk_free_bytes": space.free if space is not None else None,
            "min_free_disk_space": pressure.min_free,
        }
        if pressure.high:
            body["status"] = "degraded"
    return body, 200
