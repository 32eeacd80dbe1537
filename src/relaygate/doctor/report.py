"""The doctor's report model: a :class:`Report` of :class:`Finding` s, their severities, and the
state the checks hand on to each other.

Kept apart from the checks so that each check family (check_mx.py, check_spf.py, check_dkim.py,
check_dmarc.py) and the CLI that prints the report depend on it, not on one another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SEVERITIES = ("ok", "info", "warning", "error")


@dataclass
class Finding:
    check: str
    severity: str
    summary: str
    detail: str = ""
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass
class Report:
    domain: str
    relay_ip: str | None = None
    selector: str | None = None  # the first of `selectors`
    findings: list[Finding] = field(default_factory=list)
    envelope_domain: str | None = None  # MAIL FROM domain checked for SPF alignment
    signing_domain: str | None = None  # the d= of the relay's signatures (DKIM alignment)
    envelope_sender: str | None = None
    selectors: list[str] = field(default_factory=list)  # every DKIM selector checked

    def add(
        self, check: str, severity: str, summary: str, detail: str = "", fix: str = ""
    ) -> Finding:
        assert severity in SEVERITIES, severity
        finding = Finding(check, severity, summary, detail, fix)
        self.findings.append(finding)
        return finding

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    @property
    def worst(self) -> str:
        return max((f.severity for f in self.findings), key=SEVERITIES.index, default="ok")

    @property
    def has_errors(self) -> bool:
        return any(f.severity == "error" for f in self.findings)

    def to_dict(self) -> dict[str, Any]:
        counts = {s: sum(1 for f in self.findings if f.severity == s) for s in SEVERITIES}
        return {
            "domain": self.domain,
            "relay_ip": self.relay_ip,
            "envelope_domain": self.envelope_domain,
            "signing_domain": self.signing_domain,
            "envelope_sender": self.envelope_sender,
            "selector": self.selector,
            "selectors": self.selectors,
            "worst": self.worst,
            "counts": counts,
            "findings": [f.to_dict() for f in self.findings],
        }


@dataclass
class _State:
    """What later checks need from earlier ones."""

    domain_missing: bool = False
    spf_result: str | None = None  # pyspf result for the relay IP, None = not evaluated
    spf_record: str | None = None
    signing_domain: str = ""  # d= of the relay's signatures
    dkim_ok: bool = False  # published key matches the relay's local RSA key
    # ... an Ed25519 one: valid, but Gmail, Microsoft 365 and Yahoo do not verify Ed25519
    dkim_ed25519_ok: bool = False
    dkim_detail: str = ""
