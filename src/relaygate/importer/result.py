"""`ImportResult`: what one or more Exchange exports yield (connectors, permissions, warnings...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ImportResult:
    """What one or more exports yield.

    connectors: `[[receive_connectors]]` tables as plain dicts, in file order.
    send_connectors: `[[send_connectors]]` tables from Get-SendConnector exports, in file order.
    permissions: connector name → `[{user, extended_rights[, deny]}]` from Get-ADPermission output.
    warnings: values RelayGate cannot express, or imports that would behave differently.
    skipped: Exchange parameters with no RelayGate key (`SERVER\\Name: Parameter = value`).
    errors: problems that make a write unsafe (two different connectors with one name).
    sources: connector name → the Exchange identity(ies) it came from (`EX01\\Relay`).
    disabled_open_relays: names of the connectors imported disabled because they would be open relays.
    """

    connectors: list[dict[str, Any]] = field(default_factory=list)
    permissions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)
    send_connectors: list[dict[str, Any]] = field(default_factory=list)
    disabled_open_relays: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "connectors": self.connectors,
            "send_connectors": self.send_connectors,
            "permissions": self.permissions,
            "warnings": self.warnings,
            "skipped": self.skipped,
            "errors": self.errors,
            "sources": self.sources,
        }
