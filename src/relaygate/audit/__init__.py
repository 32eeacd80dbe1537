"""`relaygate audit`: what the Exchange playbooks check by hand, as findings with a severity and a fix.

Pure: `audit(config)` reads a validated `Config` and returns `Finding`s; it uses the same rights and
selection code as the server (`relaygate.policy`), so "this connector relays" means what the server does.

A *relay connector* is one whose anonymous sessions hold ms-Exch-SMTP-Accept-Any-Recipient, by either
recipe of exchange-semantics.md §3.3: method A (AnonymousUsers plus an explicit permission for
ANONYMOUS LOGON) or method B (ExternalAuthoritative + ExchangeServers, "externally secured").

Certificates: `audit(config, certificates=...)` adds a finding for each certificate that expires within
CERTIFICATE_WARNING_DAYS (medium) or has expired (high); the caller reads the dates
(`relaygate.certificates.read_expiries`: the CLI when it runs, the server at start and reload), so the
function stays pure (but for one existence check, `_acme_findings`, and the permission bits of
the secret files, `_secret_file_findings`).

Severities: high (an open or nearly open relay, full trust for too many hosts; `audit` exits 1),
medium (weakens security or forensics), low (missing abuse limits), info (worth a look).

The package's modules, one group of rules each: receive_connectors.py (relay ranges, externally
secured hosts, limits, shadowed connectors), server.py (accepted domains, workers, trusted proxies,
ACME, secret files, the queue), send_connectors.py (Microsoft 365 endpoints, credentials in clear,
Graph), admin_listener.py (the admin listener on the network), senders.py (DKIM for anyone, users
without send-as), certificate_expiry.py (certificates that expire); findings.py holds `Finding`,
relay_grants.py `relay_grant`, ranges.py the questions about RemoteIPRanges entries. This module
puts them together (`audit`); every name the rest of RelayGate uses is imported from here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from relaygate.audit.admin_listener import _admin_findings
from relaygate.audit.admin_listener import admin_exposed as admin_exposed
from relaygate.audit.admin_listener import metrics_exposed as metrics_exposed
from relaygate.audit.certificate_expiry import CERTIFICATE_WARNING_DAYS as CERTIFICATE_WARNING_DAYS
from relaygate.audit.certificate_expiry import certificate_findings as certificate_findings
from relaygate.audit.findings import SEVERITIES as SEVERITIES
from relaygate.audit.findings import Finding as Finding
from relaygate.audit.receive_connectors import (
    MAX_EXTERNALLY_SECURED_HOSTS as MAX_EXTERNALLY_SECURED_HOSTS,
)
from relaygate.audit.receive_connectors import MAX_RANGES as MAX_RANGES
from relaygate.audit.receive_connectors import _connector_findings, _shadow_findings
from relaygate.audit.relay_grants import RelayGrant as RelayGrant
from relaygate.audit.relay_grants import relay_grant as relay_grant
from relaygate.audit.send_connectors import _graph_findings, _send_connector_findings
from relaygate.audit.senders import (
    _dkim_findings,
    _ed25519_only_findings,
    _rsa_key_size_findings,
    _send_as_findings,
)
from relaygate.audit.server import (
    _accepted_domain_findings,
    _acme_findings,
    _config_file_findings,
    _proxy_findings,
    _queue_findings,
    _relative_path_findings,
    _secret_file_findings,
)
from relaygate.certificates import CertificateExpiry
from relaygate.config.model import Config
from relaygate.config.relative_paths import RelativeFiles

__all__ = [
    "SEVERITIES",
    "Finding",
    "RelayGrant",
    "audit",
    "certificate_findings",
    "has_high",
    "relay_grant",
    "summary",
]


def audit(
    config: Config,
    *,
    max_prefix_v4: int = 24,
    max_prefix_v6: int = 64,
    certificates: Sequence[CertificateExpiry] = (),
    now: datetime | None = None,
    users_without_send_as: Sequence[str] = (),
    relative_files: RelativeFiles | None = None,
    dkim_key_sizes: Mapping[int, int] | None = None,
) -> list[Finding]:
    """Every finding for `config`, most severe first (stable within a severity: file order).
    `certificates`: the expiry dates read from the configuration's certificate files (none: no
    certificate findings); `now`: the time they are judged at (default: the current time);
    `users_without_send_as`: the users file's users that have no send-as list (the caller reads
    the file: `UserStore.without_send_as`); `relative_files`: the configuration's relative file
    paths and the directory they were taken from (`config` holds them taken from it already), for
    a finding that says so (the caller finds the directory: `relaygate.config.relative_paths`);
    `dkim_key_sizes`: the bits of each enabled RSA DKIM key by `[[dkim]]` index (the caller reads
    the keys: `relaygate.dkim.keys.rsa_key_sizes`)."""
    findings: list[Finding] = []
    for connector in config.receive_connectors:
        findings.extend(_connector_findings(connector, config, max_prefix_v4, max_prefix_v6))
    findings.extend(_shadow_findings(config))
    findings.extend(_accepted_domain_findings(config))
    findings.extend(_proxy_findings(config, max_prefix_v4, max_prefix_v6))
    findings.extend(_acme_findings(config))
    findings.extend(_admin_findings(config))
    findings.extend(_queue_findings(config))
    findings.extend(_secret_file_findings(config))
    findings.extend(_config_file_findings(config))
    findings.extend(_relative_path_findings(relative_files, config.server.data_dir))
    findings.extend(_send_connector_findings(config))
    findings.extend(_graph_findings(config))
    findings.extend(_dkim_findings(config))
    findings.extend(_ed25519_only_findings(config))
    findings.extend(_rsa_key_size_findings(config, dkim_key_sizes or {}))
    findings.extend(_send_as_findings(config, users_without_send_as))
    if certificates:
        findings.extend(certificate_findings(certificates, now or datetime.now(UTC)))
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(findings, key=lambda f: order[f.severity])


def has_high(findings: list[Finding]) -> bool:
    return any(f.severity == "high" for f in findings)


def summary(findings: list[Finding]) -> dict[str, int]:
    return {s: sum(1 for f in findings if f.severity == s) for s in SEVERITIES}
