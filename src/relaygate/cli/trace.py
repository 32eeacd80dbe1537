"""`relaygate trace`: message tracking search (Get-MessageTrackingLog)."""

from __future__ import annotations

import errno
import re
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import typer

from relaygate.cli.common import (
    CONFIG_OPTION,
    JSON_OPTION,
    console,
    die,
    emit_json,
    err_console,
    load_or_exit,
)
from relaygate.cli.tables import CUT, WHOLE, WIDE, list_table, print_narrow_hint, when
from relaygate.logs.privacy import AddressPrivacy, PrivacyKeyError, privacy_for
from relaygate.logs.tracking import (
    DEFAULT_SEARCH_LIMIT,
    EVENT_IDS,
    MESSAGE_TRACKING_DIR,
    search,
)

__all__ = ["parse_when", "register"]

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(value: str, now: datetime | None = None) -> datetime:
    """``2h`` / ``30m`` / ``1d`` / ``1w`` ago, or an ISO date or date-time. A time without an offset
    is local time (as Get-MessageTrackingLog -Start); ``Z`` or ``+hh:mm`` are honoured."""
    now = now or datetime.now(UTC)
    m = _RELATIVE.match(value)
    if m:
        return now - timedelta(**{_UNITS[m.group(2).lower()]: float(m.group(1))})
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        try:
            d = date.fromisoformat(text)
        except ValueError:
            raise typer.BadParameter(
                f"{value!r}: use an ISO date/time (2025-01-31, 2025-01-31T08:00) "
                "or a relative time (30m, 2h, 1d, 1w)"
            ) from None
        dt = datetime(d.year, d.month, d.day)
    if dt.tzinfo is None:
        dt = dt.astimezone()  # local time
    return dt.astimezone(UTC)


def _tracking_dir(config: Path | None, log_dir: Path | None) -> Path:
    if log_dir is not None:
        return log_dir
    return Path(load_or_exit(config).server.data_dir) / MESSAGE_TRACKING_DIR


def _privacy(config: Path | None, log_dir: Path | None) -> AddressPrivacy | None:
    """The configured ``server.log_address_privacy`` (the config is read unless only --log-dir
    is given): the searched addresses are rewritten as the relay wrote them. Reads the key, never
    creates it (a key made by another user than the service's would lock the relay out)."""
    if log_dir is not None and config is None:
        return None
    s = load_or_exit(config).server
    return privacy_for(s.log_address_privacy, Path(s.data_dir), create_key=False)


def _local(value: str) -> str:
    """Log date-time (UTC) shown in local time for the table."""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _print_table(rows: list[dict[str, Any]], directory: Path) -> None:
    from rich.text import Text

    if not rows:
        console.print(f"No tracking events found in {directory}.", markup=False)
        return
    columns = [
        ("Date-time", WHOLE),
        ("Event", WHOLE),
        ("Source", WIDE),
        ("Sender", CUT),
        ("Recipients", CUT),
        ("Status", CUT),
        ("Message-Id", WIDE),
        ("Subject", WIDE),
    ]
    cells = []
    for r in rows:
        values = (
            when(_local(r.get("date-time", ""))),
            r.get("event-id", ""),
            r.get("source", ""),
            r.get("sender-address", ""),
            "\n".join(r.get("recipient-address") or []),
            "\n".join(r.get("recipient-status") or []),
            r.get("message-id", ""),
            r.get("message-subject", ""),
        )
        # Text(): subjects and addresses come from senders; never interpret them as markup.
        cells.append([Text(str(c)) for c in values])
    console.print(list_table(columns, cells))
    console.print(f"{len(rows)} event(s); times are local.", style="dim", markup=False)
    print_narrow_hint()


def register(app: typer.Typer) -> None:
    @app.command("trace")
    def trace(
        sender: str | None = typer.Option(
            None, "--sender", help="Envelope sender (MAIL FROM); <> for reports (the null sender)."
        ),
        recipient: str | None = typer.Option(None, "--recipient", help="One recipient address."),
        since: str | None = typer.Option(
            None, "--since", help="ISO date/time (local unless Z/offset) or relative: 30m, 2h, 1d."
        ),
        until: str | None = typer.Option(None, "--until", help="Same forms as --since."),
        message_id: str | None = typer.Option(
            None, "--message-id", help="Message-ID header, with or without <>."
        ),
        event_id: str | None = typer.Option(
            None, "--event-id", help=f"{', '.join(EVENT_IDS)} (any case)."
        ),
        limit: int = typer.Option(
            DEFAULT_SEARCH_LIMIT, "--limit", min=0, help="Most recent N events (ResultSize)."
        ),
        as_json: bool = JSON_OPTION,
        config: Path | None = CONFIG_OPTION,
        log_dir: Path | None = typer.Option(
            None,
            "--log-dir",
            help="Tracking log directory (default <data_dir>/logs/MessageTracking).",
        ),
    ) -> None:
        """Search the message tracking log (Get-MessageTrackingLog)."""
        try:
            since_dt = parse_when(since) if since else None
            until_dt = parse_when(until) if until else None
        except typer.BadParameter as exc:
            die(str(exc.message), 2)
        if event_id is not None and event_id.strip().upper() not in EVENT_IDS:
            # A mistyped id matched nothing and read as "no such events".
            die(f"--event-id {event_id!r}: use one of {', '.join(EVENT_IDS)}", 2)
        event_id = event_id.strip() if event_id is not None else None
        directory = _tracking_dir(config, log_dir)
        where = f"--log-dir {directory}" if log_dir is not None else str(directory)
        try:
            privacy = _privacy(config, log_dir) if sender or recipient else None
        except PrivacyKeyError as exc:
            if as_json:
                emit_json({"ok": False, "directory": str(directory), "error": str(exc)})
                raise typer.Exit(1) from None
            die(str(exc))
        if privacy is not None and privacy.mode == "mask":
            wanted = ", ".join(privacy.text(a) for a in (sender, recipient) if a)
            err_console.print(
                f"server.log_address_privacy = mask: the log holds {wanted}, which other "
                "addresses may share; the events of all of them are shown.",
                markup=False,
            )
        try:
            if directory.exists() and not directory.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "not a directory")
            if log_dir is not None and not directory.exists():
                # A mistyped --log-dir is not "no events": the default directory may be missing
                # (nothing logged yet), a directory named on purpose must be there.
                raise FileNotFoundError(errno.ENOENT, "no such directory")
            rows = search(
                directory,
                sender=sender,
                recipient=recipient,
                since=since_dt,
                until=until_dt,
                message_id=message_id,
                event_id=event_id,
                limit=limit + 1,  # one more: whether older events match too
                privacy=privacy,
            )
        except OSError as exc:
            reason = "not a directory" if isinstance(exc, NotADirectoryError) else exc.strerror
            message = f"{where}: {reason or exc}"
            if as_json:
                emit_json({"ok": False, "directory": str(directory), "error": message})
                raise typer.Exit(1) from None
            die(message)
        cut = len(rows) > limit
        if cut:
            rows = rows[len(rows) - limit :] if limit else []
        if as_json:
            emit_json(rows)
        else:
            _print_table(rows, directory)
        if cut:
            # stderr: --json's stdout stays the list. Without it the shown events read as all.
            err_console.print(
                f"Showing the {limit} most recent of the matching events; older ones match too "
                "(--limit N to see more, --since/--until to narrow the search).",
                markup=False,
            )
