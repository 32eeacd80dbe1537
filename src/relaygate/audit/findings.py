"""What an audit returns: `Finding` and the severities, most severe first.

Apart from the rules that produce findings, so that each rule module, the admin centre and the CLI
use the one type without importing the rules."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SEVERITIES = ("high", "medium", "low", "info")


@dataclass(frozen=True, slots=True)
class Finding:
    """One audit result. `connector` is "" for server-wide findings; `key` is the config key to change."""

    severity: str
    code: str
    connector: str
    key: str
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "severity": self.severity,
            "code": self.code,
            "connector": self.connector,
            "key": self.key,
            "message": self.message,
            "fix": self.fix,
        }
