"""The findings about certificates that expire soon or have expired (`certificate_findings`).

Apart because its input is not the configuration but the expiry dates the caller read
(`relaygate.certificates.read_expiries`), and the server asks it at start and reload."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from relaygate.audit.findings import Finding
from relaygate.certificates import (
    ADMIN_LISTENER,
    ENTRA_CREDENTIAL,
    LISTENER,
    SMTP_CLIENT,
    CertificateExpiry,
)

#: A certificate that expires within this many days is a medium finding (expired: high).
CERTIFICATE_WARNING_DAYS = 30


_CERTIFICATE_ROLE = {
    LISTENER: (
        "the listener's TLS certificate",
        "clients that verify it refuse STARTTLS (and implicit TLS) with this relay",
    ),
    SMTP_CLIENT: (
        "the client certificate presented to smart hosts",
        "a Microsoft 365 connector or smart host that recognises the relay by it refuses its mail",
    ),
    ENTRA_CREDENTIAL: (
        "the Entra ID certificate credential",
        "Entra ID refuses its token requests and the connector's mail waits in the queue",
    ),
    ADMIN_LISTENER: (
        "the admin listener's HTTPS certificate",
        "browsers refuse the admin centre and `relaygate queue` refuses the admin API "
        "(it checks the dates)",
    ),
}


def _time_left(left: timedelta) -> str:
    """ "in 12 days", "in 5 hours" under a day (it said "in 0 days"), "within an hour"."""
    if left.days >= 1:
        return f"in {left.days} day{'s' if left.days != 1 else ''}"
    hours = int(left.total_seconds() // 3600)
    if hours >= 1:
        return f"in {hours} hour{'s' if hours != 1 else ''}"
    return "within an hour"


def certificate_findings(
    certificates: Iterable[CertificateExpiry],
    now: datetime,
    *,
    warning_days: int = CERTIFICATE_WARNING_DAYS,
) -> list[Finding]:
    """A finding per certificate expired at `now` (high) or expiring within `warning_days`
    (medium), naming the key, the connector and the date."""
    findings = []
    for cert in certificates:
        ref = cert.ref
        left = cert.not_after - now
        if left >= timedelta(days=warning_days):
            continue
        role, effect = _CERTIFICATE_ROLE.get(ref.use, ("the certificate", "TLS with it fails"))
        date = cert.not_after.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
        if left <= timedelta(0):
            severity, code = "high", "certificate-expired"
            when = f"expired on {date}"
            effect_text = f": {effect}"
        else:
            severity, code = "medium", "certificate-expiring"
            when = f"expires on {date} ({_time_left(left)})"
            effect_text = f"; after that {effect}"
        findings.append(
            Finding(
                severity,
                code,
                ref.connector,
                ref.key,
                f"{role} {ref.file} {when}{effect_text}",
                (
                    "RelayGate renews it itself (server.acme_renew_before ahead): see the log for "
                    "why it has not (relaygate.acme)"
                    if ref.key == "server.acme_directory_url"
                    else f"renew it, replace {ref.file} and reload (systemctl reload relaygate)"
                )
                + (
                    "; upload the new certificate to the app registration first"
                    if ref.use == ENTRA_CREDENTIAL
                    else ""
                ),
            )
        )
    return findings
