"""`relaygate queue list/show/retry/suspend/resume/remove/summary`: queue operations on the running
server.

Like Exchange's Get-Message / Get-Queue / Retry-Queue / Suspend-Message / Resume-Message /
Remove-Message, these act on the running node: the CLI calls the admin API at ``admin.listen`` (see
`relaygate.admin.api`), sending the token of ``admin.api_token_file`` when one is configured. It
never opens the queue database itself.
"""

from __future__ import annotations

import os
import re
import ssl
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

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
from relaygate.config import default_config_path
from relaygate.control import MAX_LIST_LIMIT

__all__ = ["admin_url", "register"]

URL_ENV = "RELAYGATE_ADMIN_URL"
URL_OPTION = typer.Option(
    None,
    "--url",
    help=f"Admin API base URL (default: from admin.listen in the config, or ${URL_ENV}).",
)
EXIT_NOT_RUNNING = 3

_STATUS_STYLE = {
    "Delivered": "green",
    "Failed": "red",
    "Retry": "yellow",
    "Unreachable": "magenta",
    "Suspended": "cyan",
    "Active": "blue",
    "Ready": "",
}


def admin_url(listen: str, *, https: bool = False) -> str:
    """``admin.listen`` → the URL a local client uses (a wildcard address means loopback);
    ``https``: the listener has a certificate (admin.tls_certificate_file)."""
    scheme = "https" if https else "http"
    text = listen.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.lstrip(":")
        host = "::1" if host in ("::", "") else host
        return f"{scheme}://[{host}]:{port}"
    host, _, port = text.rpartition(":")
    host = "127.0.0.1" if host in ("0.0.0.0", "", "*") else host
    return f"{scheme}://{host}:{port}"


def pinned_tls_context(certificate_file: Path) -> ssl.SSLContext:
    """A client context that trusts the admin listener's own certificate, the first of
    ``admin.tls_certificate_file``, and no other: the CLI reads the configuration the server
    runs, so it knows the server by the certificate it presents, self-signed or not, whatever
    name the URL has (127.0.0.1 for a wildcard admin.listen, which no certificate names). A
    different certificate, even one a public CA issued, is refused before the token is sent.
    OSError / ValueError when the file holds no certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    leaf = x509.load_pem_x509_certificates(Path(certificate_file).read_bytes())[0]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the certificate itself is checked, not a name in it
    context.load_verify_locations(cadata=leaf.public_bytes(Encoding.PEM).decode("ascii"))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the leaf is the trust anchor
    return context


class _Api:
    #: What the server's certificate is checked against: the system's CAs, or (`pinned`) the
    #: certificate of admin.tls_certificate_file alone (`pinned_tls_context`).
    verify: ssl.SSLContext | bool = True
    pinned: Path | None = None
    #: The node's data_dir when the URL is its admin.listen (not --url): where to learn, when
    #: nothing answers, whether the relay runs all the same (`not_running`).
    data_dir: Path | None = None

    def __init__(self, config_path: Path | None, url: str | None) -> None:
        token = None
        if url is None:
            url = os.environ.get(URL_ENV) or None
        config = None
        # The config is read for the URL and for the token: with --url (or $RELAYGATE_ADMIN_URL)
        # too when there is one (--config, $RELAYGATE_CONFIG, ./relaygate.toml), or a server that
        # wants the token would only answer 401.
        if url is None or default_config_path(config_path) is not None:
            config = load_or_exit(config_path)
        if config is not None:
            if url is None:
                if not config.admin.enabled:
                    # nothing answers at admin.listen, but the relay may well run: say what is off
                    die(
                        f"the admin API is off in {config.source} (admin.enabled = false): the "
                        "queue verbs go through it; set admin.enabled = true (a restart of "
                        "relaygate serve applies it) or pass --url"
                    )
                url = admin_url(
                    config.admin.listen, https=config.admin.tls_certificate_file is not None
                )
                self.data_dir = config.server.data_dir
            certificate_file = config.admin.tls_certificate_file
            if certificate_file is not None:
                try:
                    self.verify = pinned_tls_context(certificate_file)
                except (OSError, ValueError) as exc:
                    reason = getattr(exc, "strerror", None) or exc
                    die(
                        f"cannot read admin.tls_certificate_file {str(certificate_file)!r}: {reason}"
                    )
                self.pinned = certificate_file
            token_file = getattr(config.admin, "api_token_file", None)
            if token_file is not None:
                from relaygate.admin.api import TokenFileError, read_token

                try:
                    token = read_token(token_file)
                except OSError as exc:
                    die(f"cannot read admin.api_token_file {str(token_file)!r}: {exc.strerror}")
                except TokenFileError as exc:
                    die(str(exc))
        assert url is not None
        self.url = url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    #: How long a call may take to answer (seconds).
    timeout = 30.0

    def call(self, method: str, path: str, **params: Any) -> Any:
        import httpx

        try:
            response = httpx.request(
                method,
                self.url + path,
                params={k: v for k, v in params.items() if v is not None},
                headers=self.headers,
                timeout=self.timeout,
                verify=self.verify,
            )
        except httpx.ConnectError as exc:
            if _tls_refused(exc):
                self.certificate_refused(exc)
            self.not_running()
        except httpx.TimeoutException:
            die(f"the RelayGate server at {self.url} did not answer in time")
        except httpx.HTTPError as exc:
            die(f"admin API at {self.url}: {exc}")
        try:
            body = response.json()
        except ValueError:
            body = {"error": response.text.strip() or response.reason_phrase}
        if not response.is_success:  # a redirect too (a proxy, a wrong --url): not the answer
            message = body.get("error") if isinstance(body, dict) else None
            die(f"{message or response.reason_phrase} (HTTP {response.status_code})")
        return body

    def certificate_refused(self, exc: Exception) -> NoReturn:
        """Something answers, but not with a certificate the CLI trusts: "not running" would
        send the admin looking for a stopped service. The pinned certificate expired: said so,
        with its date ("does not present the certificate" sent the admin looking for another)."""
        if self.pinned is not None and _verify_code(exc) == X509_V_ERR_CERT_HAS_EXPIRED:
            die(
                f"admin API at {self.url}: admin.tls_certificate_file {str(self.pinned)!r} "
                f"expired on {_not_after_text(self.pinned)}: renew it and replace the file (the "
                "admin listener takes it within seconds); relaygate queue checks its dates"
            )
        trusted = (
            f"the certificate of admin.tls_certificate_file ({self.pinned})"
            if self.pinned is not None
            else "a certificate of the system's trusted CAs"
        )
        die(f"admin API at {self.url}: TLS failed, the server does not present {trusted}: {exc}")

    def not_running(self) -> NoReturn:
        """Nothing answers at the URL. A relay that runs all the same (it holds the node lock of
        data_dir) is not said to be stopped: its worker 0 may keep the admin listener closed
        until its certificate loads (the reason it wrote, admin/closed_note.py), or
        admin.listen was changed since it started."""
        running = self._running_without_listener()
        if running is not None:
            die(running)
        die(
            f"the RelayGate server is not running: nothing answers at {self.url} "
            "(admin.listen in the configuration; start it with `relaygate serve`)",
            EXIT_NOT_RUNNING,
        )

    def _running_without_listener(self) -> str | None:
        """What to say when the relay runs but its admin listener does not answer; None when no
        relay runs (or it cannot be known: --url, not Linux)."""
        if self.data_dir is None:
            return None
        from relaygate.admin.closed_note import closed_reason
        from relaygate.config.relative_paths import running_relay_pid

        pid = running_relay_pid(self.data_dir)
        if pid is None:
            return None
        reason = closed_reason(self.data_dir)
        if reason is not None:
            why = (
                f"{reason} (worker 0 was started again and opens it once the files load; SMTP "
                "is served meanwhile)"
            )
        else:
            why = (
                "nothing answers there (still starting, or admin.listen changed since it "
                "started: that takes effect when relaygate serve restarts)"
            )
        return (
            f"the RelayGate server runs (pid {pid}) but its admin listener at {self.url} is "
            f"closed, and the queue verbs go through it: {why}"
        )


#: OpenSSL's verify result for a certificate past its notAfter
X509_V_ERR_CERT_HAS_EXPIRED = 10


def _verify_code(exc: BaseException) -> int | None:
    """OpenSSL's verify result of the certificate check that failed under `exc`, if one did."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_code
        seen = seen.__cause__ or seen.__context__
    return None


def _not_after_text(certificate_file: Path) -> str:
    """The notAfter of the file's first certificate, as the audit writes dates; "?" when the
    file cannot be read now."""
    from relaygate.certificates import read_not_after

    try:
        return read_not_after(certificate_file).strftime("%Y-%m-%d %H:%M UTC")
    except (OSError, ValueError):
        return "?"


def _tls_refused(exc: BaseException) -> bool:
    """Whether a connection failed in the TLS handshake (httpx calls it a ConnectError)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _path(identity: str) -> str:
    if not identity.strip():  # "/api/queue/" is no message (``show "$ID"`` with ID unset)
        die("a message identity cannot be empty: give SERVER\\QueueId or the queue id", 2)
    return "/api/queue/" + quote(identity.strip(), safe="")


def _local(value: str | None) -> str:
    if not value:
        return ""
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return dt.astimezone().strftime("%Y-%m-%d %H:%M:%S")


#: C0 and C1 controls and DEL: a terminal acts on them (ESC and U+009B CSI begin escape sequences
#: that move the cursor, erase lines or set the title). A remote server's reply loses its controls
#: as it is read, but a message queued by an earlier release may still hold C1 ones in its
#: LastError; printed, they could hide or fake lines of `queue list` / `show`.
_TERMINAL_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _text(value: Any) -> Any:
    """A table cell shown as is: queue fields hold text from devices and remote servers, never
    markup, and never a terminal control (each is shown as U+FFFD)."""
    from rich.text import Text

    return Text(_TERMINAL_CONTROLS.sub("\ufffd", "" if value is None else str(value)))


def _status(value: str) -> Any:
    from rich.text import Text

    return Text(value, style=_STATUS_STYLE.get(value, ""))


def _print_table(columns: list[tuple[str, str]], rows: list[list[Any]], summary: str) -> None:
    console.print(list_table(columns, rows))
    console.print(summary, markup=False)
    print_narrow_hint()


def _when(value: str | None) -> str:
    return when(_local(value))


def _print_records(
    records: list[dict[str, Any]], columns: list[tuple[str, str, str]], summary: str
) -> None:
    """A list table of API records: ``columns`` are (header, WHOLE | CUT | WIDE, field)."""
    rows = [[_cell(record, field) for _h, _k, field in columns] for record in records]
    _print_table([(header, kind) for header, kind, _f in columns], rows, summary)


def _cell(record: dict[str, Any], field: str) -> Any:
    if field == "Status":
        return _status(record["Status"])
    if field == "NextRetryTime":
        return _text(_when(record.get("NextRetryTime")))
    return _text(record[field])


def _print_list(messages: list[dict[str, Any]], selective: bool = False) -> None:
    """`selective`: a filter, --after or --limit 0 chose the page, so an empty page says that
    nothing matched, not that the queue is empty."""
    if not messages:
        text = "No message matches." if selective else "The queue is empty."
        console.print(text, markup=False)
        return
    columns = [
        ("Identity", WHOLE, "Identity"),
        ("FromAddress", CUT, "FromAddress"),
        ("Status", WHOLE, "Status"),
        ("Size", WHOLE, "Size"),
        ("NextHopDomain", WIDE, "NextHopDomain"),
        ("Rcpts", WIDE, "RecipientCount"),
        ("LastError", CUT, "LastError"),
        ("NextRetryTime", WHOLE, "NextRetryTime"),
    ]
    _print_records(messages, columns, f"{len(messages)} message(s).")


def _print_queues(queues: list[dict[str, Any]]) -> None:
    if not queues:
        console.print("No message waits in a delivery queue.", markup=False)
        return
    columns = [
        ("Identity", WHOLE, "Identity"),
        ("DeliveryType", WIDE, "DeliveryType"),
        ("Status", WHOLE, "Status"),
        ("MessageCount", WHOLE, "MessageCount"),
        ("NextRetryTime", WHOLE, "NextRetryTime"),
        ("LastError", CUT, "LastError"),
    ]
    _print_records(queues, columns, f"{len(queues)} queue(s).")


def _print_message(m: dict[str, Any]) -> None:
    from rich.table import Table

    info = Table(show_header=False, box=None, pad_edge=False)
    info.add_column("Field", style="bold", no_wrap=True)
    info.add_column("Value", overflow="fold")
    rows = [
        ("Identity", m["Identity"]),
        ("Status", _status(m["Status"])),
        ("Queue", m.get("Queue", "")),
        ("FromAddress", m["FromAddress"]),
        ("Subject", m.get("Subject", "")),
        ("MessageId", m.get("MessageId", "")),
        ("Size", str(m["Size"])),
        ("DateReceived", _local(m.get("DateReceived"))),
        ("ExpirationTime", _local(m.get("ExpirationTime"))),
        ("NextHopDomain", m.get("NextHopDomain", "")),
        ("DeliveryType", m.get("DeliveryType", "")),
        ("SendConnector", m.get("SendConnector", "")),
        ("LastError", m.get("LastError", "")),
        ("NextRetryTime", _local(m.get("NextRetryTime"))),
        ("RetryCount", str(m.get("RetryCount", 0))),
        ("SourceIP", m.get("SourceIP", "")),
        ("ReceiveConnector", m.get("ReceiveConnector", "")),
    ]
    if m.get("IsDsn"):
        rows.append(("OriginalQueueId", m.get("OriginalQueueId", "")))
    for name, value in rows:
        info.add_row(name, value if not isinstance(value, str) else _text(value))
    console.print(info)
    table = Table(title="Recipients", header_style="bold", title_justify="left")
    for col in ("Address", "Status", "RetryCount", "LastAttemptTime", "NextRetryTime"):
        table.add_column(col, overflow="fold")
    table.add_column("NextHopDomain", overflow="fold")
    table.add_column("LastResponse", overflow="fold", max_width=60)
    for r in m.get("Recipients", []):
        table.add_row(
            _text(r["Address"]),
            _status(r["Status"]),
            _text(r["RetryCount"]),
            _text(_local(r.get("LastAttemptTime"))),
            _text(_local(r.get("NextRetryTime"))),
            _text(r.get("NextHopDomain", "")),
            _text(r.get("LastResponse", "")),
        )
    console.print(table)


def register(app: typer.Typer) -> None:
    queue_app = typer.Typer(
        help="Queue operations on the running server (Get-Message, Retry-Queue, ...).",
        no_args_is_help=True,
    )
    app.add_typer(queue_app, name="queue")

    @queue_app.command("list")
    def list_(
        status: str | None = typer.Option(
            None,
            "--status",
            help="Active, Ready, Retry, Suspended, Unreachable, Delivered or Failed.",
        ),
        limit: int = typer.Option(
            1000, "--limit", min=0, max=MAX_LIST_LIMIT, help="At most this many messages."
        ),
        after: str | None = typer.Option(
            None,
            "--after",
            help="Start past this message (SERVER\\QueueId or the queue id): the next page.",
        ),
        sender: str | None = typer.Option(
            None,
            "--from",
            help="FromAddress: an address or a pattern like *@scanners.corp.example or "
            "scanner@* (any case); <> for the null sender.",
        ),
        recipient: str | None = typer.Option(
            None, "--to", help="Any recipient: an address or a pattern like *@example.com."
        ),
        queue: str | None = typer.Option(
            None,
            "--queue",
            help="The delivery queue (its NextHopDomain, as `relaygate queue summary` lists "
            "them) or Unreachable.",
        ),
        config: Path | None = CONFIG_OPTION,
        url: str | None = URL_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Messages in the queue, oldest first, a page at a time (Get-Message [-Filter])."""
        body = _Api(config, url).call(
            "GET",
            "/api/queue",
            status=status,
            limit=limit,
            after=after,
            **{"from": sender, "to": recipient, "queue": queue},
        )
        if json_out:
            emit_json(body["messages"])
        else:
            selective = limit == 0 or any(
                v is not None for v in (status, after, sender, recipient, queue)
            )
            _print_list(body["messages"], selective)
        next_after = body.get("next_after")
        if next_after:
            # On stderr with --json, so that stdout stays the JSON list.
            out = err_console if json_out else console
            out.print(
                f"More messages follow: add --after {next_after} (with the same filters) "
                "for the next page.",
                markup=False,
            )

    @queue_app.command("summary")
    def summary(
        config: Path | None = CONFIG_OPTION,
        url: str | None = URL_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """The delivery queues: next hop, delivery type, status, message count (Get-Queue)."""
        body = _Api(config, url).call("GET", "/api/queues")
        if json_out:
            emit_json(body["queues"])
        else:
            _print_queues(body["queues"])

    @queue_app.command("show")
    def show(
        identity: str = typer.Argument(..., help="SERVER\\QueueId or the queue id."),
        config: Path | None = CONFIG_OPTION,
        url: str | None = URL_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """One message with its recipients (Get-Message -IncludeRecipientInfo)."""
        body = _Api(config, url).call("GET", _path(identity))
        if json_out:
            emit_json(body)
        else:
            _print_message(body)

    def _single(verb: str, done: str, identity: str, api: _Api, json_out: bool) -> None:
        body = api.call("POST", _path(identity) + "/" + verb)
        if json_out:
            emit_json(body)
        else:
            console.print(f"{body['Identity']}: {done}; status {body['Status']}.", markup=False)

    def _action(verb: str, done: str) -> Any:
        def command(
            identity: str | None = IDENTITY_ARGUMENT,
            sender: str | None = BULK_FROM,
            recipient: str | None = BULK_TO,
            queue: str | None = BULK_QUEUE,
            status: str | None = BULK_STATUS,
            after: str | None = BULK_AFTER,
            yes: bool = YES_OPTION,
            config: Path | None = CONFIG_OPTION,
            url: str | None = URL_OPTION,
            json_out: bool = JSON_OPTION,
        ) -> None:
            filters = _filters(identity, sender, recipient, queue, status, after)
            api = _Api(config, url)
            if identity is not None:
                _single(verb, done, identity, api, json_out)
            else:
                _bulk(api, verb, filters, yes=yes, json_out=json_out)

        return command

    @queue_app.command("retry")
    def retry(
        identity: str | None = typer.Argument(
            None, help="SERVER\\QueueId or the queue id (or --queue, or filters)."
        ),
        queue: str | None = typer.Option(
            None,
            "--queue",
            help="Retry a whole delivery queue instead: its NextHopDomain or SERVER\\NextHop, "
            "or Unreachable (Retry-Queue -Resubmit). With --from, --to or --status: only the "
            "messages of that queue that match them (a bulk retry, see --yes).",
        ),
        sender: str | None = BULK_FROM,
        recipient: str | None = BULK_TO,
        status: str | None = BULK_STATUS,
        after: str | None = BULK_AFTER,
        yes: bool = YES_OPTION,
        config: Path | None = CONFIG_OPTION,
        url: str | None = URL_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Attempt the message's unfinished recipients now, or those of every message in a
        delivery queue with --queue (Retry-Queue; routing is done again: -Resubmit), or of every
        message matching --from/--to/--status (Get-Message -Filter | Retry-Message)."""
        filters = _filters(identity, sender, recipient, queue, status, after)
        api = _Api(config, url)
        if identity is not None:
            _single("retry", "queued for an immediate retry", identity, api, json_out)
            return
        if sender is None and recipient is None and status is None and after is None:
            assert queue is not None
            _retry_queue(api, queue, json_out)
            return
        _bulk(api, "retry", filters, yes=yes, json_out=json_out)

    queue_app.command(
        "suspend",
        help="Stop delivering the message, or every message matching the filters "
        "(Suspend-Message [-Filter]).",
    )(_action("suspend", "suspended"))
    queue_app.command(
        "resume",
        help="Deliver the message again, or every message matching the filters "
        "(Resume-Message [-Filter]).",
    )(_action("resume", "resumed"))

    @queue_app.command("remove")
    def remove(
        identity: str | None = IDENTITY_ARGUMENT,
        sender: str | None = BULK_FROM,
        recipient: str | None = BULK_TO,
        queue: str | None = BULK_QUEUE,
        status: str | None = BULK_STATUS,
        after: str | None = BULK_AFTER,
        with_ndr: bool = typer.Option(
            False,
            "--with-ndr",
            help="Send the sender an NDR (550 4.3.2 QUEUE.Admin) for undelivered recipients.",
        ),
        yes: bool = YES_OPTION,
        config: Path | None = CONFIG_OPTION,
        url: str | None = URL_OPTION,
        json_out: bool = JSON_OPTION,
    ) -> None:
        """Delete a message from the queue, or every message matching the filters
        (Remove-Message [-Filter] [-WithNDR])."""
        filters = _filters(identity, sender, recipient, queue, status, after)
        api = _Api(config, url)
        if identity is None:
            _bulk(api, "remove", filters, yes=yes, json_out=json_out, with_ndr=with_ndr)
            return
        body = api.call("DELETE", _path(identity), with_ndr="true" if with_ndr else "false")
        if json_out:
            emit_json(body)
            return
        removed = body["Removed"]
        line = f"{removed['Identity']}: removed"
        if body.get("NdrQueueId"):
            line += f"; NDR queued as {removed['Identity'].split(chr(92))[0]}\\{body['NdrQueueId']}"
        elif with_ndr:
            line += "; no NDR (nothing undelivered, or the null sender)"
        console.print(line + ".", markup=False)


def _retry_queue(api: _Api, queue: str, json_out: bool) -> None:
    """Retry-Queue: ``retry --queue NAME`` alone, at once as before (no dry run)."""
    path = "/api/queues/" + quote(queue.strip(), safe="") + "/retry"
    api.timeout = BULK_TIMEOUT  # it goes through the whole queue (every page of it)
    body = api.call("POST", path)
    if json_out:
        emit_json(body)
        return
    line = f"{body['Identity']}: {body['RetriedCount']} message(s) queued for an immediate retry"
    if body.get("Resubmit"):
        line += " (resubmitted: routed again)"
    if body.get("SuspendedCount"):
        line += f"; {body['SuspendedCount']} suspended message(s) left as they are"
    console.print(line + ".", markup=False)


IDENTITY_ARGUMENT = typer.Argument(
    None, help="SERVER\\QueueId or the queue id (or filters: --from, --to, --queue, --status)."
)
BULK_FROM = typer.Option(
    None,
    "--from",
    help="Instead of an ID: every message whose FromAddress matches (an address, or a pattern "
    "like *@scanners.corp.example or scanner@*; <> for the null sender).",
)
BULK_TO = typer.Option(
    None, "--to", help="Instead of an ID: every message with a recipient matching (*@example.com)."
)
BULK_QUEUE = typer.Option(
    None,
    "--queue",
    help="Instead of an ID: every message in this delivery queue (its NextHopDomain, or "
    "Unreachable).",
)
BULK_STATUS = typer.Option(
    None,
    "--status",
    help="Instead of an ID: every message with this status (Active, Ready, Retry, Suspended, "
    "Unreachable, Delivered, Failed).",
)
BULK_AFTER = typer.Option(
    None,
    "--after",
    help="With filters: only messages past this one (to go on where a call that reached the "
    f"limit of {MAX_LIST_LIMIT} stopped).",
)
YES_OPTION = typer.Option(
    False,
    "--yes",
    "-y",
    help="With filters: do it. Without --yes only the number of messages that match (and the "
    "first few) is shown, and nothing is changed.",
)

#: How long the CLI waits for a bulk call (at most MAX_LIST_LIMIT messages) to answer.
BULK_TIMEOUT = 600.0

#: Identities a dry run or a bulk result lists before "... and N more".
_SHOWN = 10


def _filters(
    identity: str | None,
    sender: str | None,
    recipient: str | None,
    queue: str | None,
    status: str | None,
    after: str | None,
) -> dict[str, str | None]:
    """The bulk filters as the API names them; exit 2 unless exactly one of the identity and
    the filters is given."""
    filters = {"from": sender, "to": recipient, "queue": queue, "status": status}
    given = any(v is not None for v in filters.values())
    if (identity is None) == (not given):
        die(
            "give a message identity or filters (--from, --to, --queue, --status): one of the two",
            2,
        )
    if identity is not None and after is not None:
        die("--after goes with filters, not with a message identity", 2)
    return {**filters, "after": after}


_DONE = {"retry": "queued for an immediate retry", "suspend": "suspended", "resume": "resumed"}


def _bulk(
    api: _Api,
    verb: str,
    filters: dict[str, str | None],
    *,
    yes: bool,
    json_out: bool,
    with_ndr: bool = False,
) -> None:
    """``POST /api/queue/{verb}`` with the filters: a dry run without ``yes``."""
    params: dict[str, Any] = {**filters, "dry_run": "false" if yes else "true"}
    if verb == "remove":
        params["with_ndr"] = "true" if with_ndr else "false"
    # 100,000 messages take a while (removing 20,000 took 6.5 s: docs/benchmarks.md)
    api.timeout = BULK_TIMEOUT
    body = api.call("POST", f"/api/queue/{verb}", **params)
    if json_out:
        emit_json(body)
    else:
        _print_bulk(verb, body, filters, with_ndr=with_ndr)
    if body.get("limit_reached"):
        # on stderr, so that stdout stays the JSON object with --json
        out = err_console if json_out else console
        out.print(
            f"At most {MAX_LIST_LIMIT} messages are taken at a time and more may match: run it "
            f"again with --after {body['next_after']} (and the same filters) for the rest.",
            markup=False,
        )


def _print_bulk(
    verb: str, body: dict[str, Any], filters: dict[str, str | None], *, with_ndr: bool
) -> None:
    identities: list[str] = body["identities"]
    skipped: list[dict[str, str]] = body["skipped"]
    if body["dry_run"]:
        line = f"{body['matched']} message(s) match"
        if skipped:
            line += f", {body['would_do']} of them can be {_DONE.get(verb, 'removed')}"
        console.print(line + ": nothing was changed (a dry run).", markup=False)
        for identity in identities[:_SHOWN]:
            console.print(f"  {identity}", markup=False)
        if len(identities) > _SHOWN:
            console.print(f"  ... and {len(identities) - _SHOWN} more", markup=False)
        _print_skipped(skipped, "would be skipped")
        if body["would_do"]:
            console.print(
                f"Add --yes to {verb} them{' (with NDRs)' if with_ndr else ''}.", markup=False
            )
        return
    if verb == "remove":
        line = f"{body['done']} of {body['matched']} message(s) removed"
        if with_ndr:
            line += f"; {body['ndrs']} NDR(s) queued"
    else:
        line = f"{body['done']} of {body['matched']} message(s) {_DONE[verb]}"
    console.print(line + ".", markup=False)
    _print_skipped(skipped, "skipped")


def _print_skipped(skipped: list[dict[str, str]], what: str) -> None:
    if skipped:
        console.print(f"{len(skipped)} {what}:", markup=False)
        for item in skipped[:_SHOWN]:
            console.print(f"  {item['identity']}: {item['reason']}", markup=False)
        if len(skipped) > _SHOWN:
            console.print(
                f"  ... and {len(skipped) - _SHOWN} more (--json lists them)", markup=False
            )
