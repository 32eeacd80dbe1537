"""Get-SendConnector exports (Format-List, Export-Csv, ConvertTo-Json) → `[[send_connectors]]`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relaygate.config import parse_config
from relaygate.importer.exchange import (
    ImportResult,
    combine_results,
    parse_exchange_export,
    parse_receive_connectors,
)

FIXTURES = Path(__file__).parent / "fixtures"
SEND_EXPORTS = ["send_connectors_fl.txt", "send_connectors.csv", "send_connectors.json"]

OFFICE_365 = {
    "name": "Outbound to Office 365",
    "address_spaces": ["*"],
    "dns_routing_enabled": False,
    "smart_hosts": ["smtp.office365.com"],
    "port": 587,
    # BasicAuthRequireTLS without its credential would fail `relaygate check`: imported without
    # AUTH and disabled, with a warning (below) saying what to set.
    "smart_host_auth_mechanism": "None",
    "require_tls": True,
    "tls_auth_level": "DomainValidation",
    "tls_domain": "smtp.office365.com",
    "enabled": False,
    "max_message_size": "35MB",
    "protocol_logging_level": "Verbose",
    "comment": "Printers and apps to Microsoft 365 (SMTP AUTH as svc-relay@corp.example)",
    "smtp_max_messages_per_connection": 20,
}
INTERNET = {
    "name": "Internet",
    "address_spaces": ["*"],
    "dns_routing_enabled": True,
    "smart_host_auth_mechanism": "None",
    "enabled": True,
    "fqdn": "mail.corp.example",
    "max_message_size": "35MB",
    "protocol_logging_level": "None",
    "ignore_starttls": True,
    "smtp_max_messages_per_connection": 20,
    "source_ip_address": "10.0.0.5",
}


def parse(name: str, *, full: bool = False) -> ImportResult:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    return parse_exchange_export(text, filename=name, full=full)


@pytest.mark.parametrize("name", SEND_EXPORTS)
def test_send_connector_exports_map_to_send_connectors(name: str) -> None:
    text = (FIXTURES / name).read_text(encoding="utf-8")
    result = parse_exchange_export(text, filename=name)
    assert result.connectors == []  # nothing taken for a receive connector
    assert result.send_connectors == [OFFICE_365, INTERNET]
    assert list(result.send_connectors[0]) == list(OFFICE_365)  # written in the model's key order
    assert result.errors == []


@pytest.mark.parametrize("name", SEND_EXPORTS)
def test_send_connector_warnings(name: str) -> None:
    result = parse_exchange_export((FIXTURES / name).read_text(encoding="utf-8"), filename=name)
    [auth] = [w for w in result.warnings if "SmartHostAuthMechanism" in w]
    assert auth.startswith("Outbound to Office 365: SmartHostAuthMechanism BasicAuthRequireTLS")
    assert "imported disabled" in auth
    assert "smart_host_auth_mechanism = 'BasicAuthRequireTLS'" in auth
    assert "auth_username" in auth and "auth_password_file" in auth
    [cert] = [w for w in result.warnings if "TlsCertificateName" in w]
    assert cert.startswith("Internet: TlsCertificateName '<I>CN=Corp Issuing CA 01")
    assert "tls_certificate_file / tls_key_file" in cert
    [log] = [w for w in result.warnings if "ProtocolLoggingLevel" in w]
    assert log.startswith("Outbound to Office 365: ProtocolLoggingLevel Verbose is imported")
    assert len(result.warnings) == 3


def test_json_credential_user_name_is_named_in_the_warning() -> None:
    result = parse("send_connectors.json")
    assert any("auth_username ('svc-relay@corp.example' in Exchange)" in w for w in result.warnings)


@pytest.mark.parametrize("name", SEND_EXPORTS)
def test_send_parameters_without_a_key_are_skipped_with_the_reason(name: str) -> None:
    result = parse_exchange_export((FIXTURES / name).read_text(encoding="utf-8"), filename=name)
    by_param = {item.split(":", 1)[0] + ":" + item.split(":", 1)[1].split("=")[0].strip(): item
                for item in result.skipped}  # fmt: skip
    assert set(by_param) == {
        "Outbound to Office 365:FrontendProxyEnabled",
        "Outbound to Office 365:SourceTransportServers",
        "Internet:ErrorPolicies",
        "Internet:SourceTransportServers",
    }
    assert by_param["Outbound to Office 365:FrontendProxyEnabled"] == (
        "Outbound to Office 365: FrontendProxyEnabled = True "
        "(there is no Front End Transport proxy in RelayGate)"
    )
    assert by_param["Internet:ErrorPolicies"].startswith(
        "Internet: ErrorPolicies = DowngradeDnsFailures ("
    )
    assert "source transport servers" in by_param["Internet:SourceTransportServers"]
    # Default-valued ones (IsScopedConnector False, CloudServicesMailEnabled False, ...) and derived
    # properties (SmartHostsString, HomeMTA, ...) are not reported.
    assert not any("IsScopedConnector" in s or "SmartHostsString" in s for s in result.skipped)


def test_imported_send_connectors_pass_validation() -> None:
    result = parse("send_connectors_fl.txt")
    config = parse_config({"send_connectors": result.send_connectors}, "<import>")
    assert [s.name for s in config.send_connectors] == ["Outbound to Office 365", "Internet"]
    assert config.send_connectors[1].source_ip_address == "10.0.0.5"


def test_all_values_writes_every_mapped_parameter() -> None:
    internet = parse("send_connectors_fl.txt", full=True).send_connectors[1]
    assert internet["port"] == 25
    assert internet["cost"] == 1
    assert internet["require_tls"] is False
    assert internet["force_helo"] is False
    assert internet["connection_inactivity_timeout"] == "00:10:00"
    assert "source_ip_address" in internet  # 10.0.0.5; 0.0.0.0 stays unset even with --all-values
    assert "source_ip_address" not in parse("send_connectors_fl.txt", full=True).send_connectors[0]


def json_connector(**overrides: object) -> str:
    base: dict[str, object] = {
        "Identity": "Partners",
        "Name": "Partners",
        "AddressSpaces": ["SMTP:partner.example;5", "SMTP:*.partner.example;5"],
        "DNSRoutingEnabled": False,
        "SmartHosts": ["[192.0.2.25]", "mx.partner.example"],
        "SmartHostAuthMechanism": "None",
        "SourceIPAddress": "0.0.0.0",
    }
    base.update(overrides)
    return json.dumps([base])


def test_address_space_cost_becomes_the_connector_cost() -> None:
    result = parse_exchange_export(json_connector())
    [send] = result.send_connectors
    assert send["address_spaces"] == ["partner.example", "*.partner.example"]
    assert send["cost"] == 5
    assert send["smart_hosts"] == ["[192.0.2.25]", "mx.partner.example"]
    assert "source_ip_address" not in send
    assert result.warnings == []


def test_differing_costs_take_the_lowest_and_warn() -> None:
    result = parse_exchange_export(
        json_connector(AddressSpaces=["SMTP:partner.example;3", "SMTP:other.example;7"])
    )
    assert result.send_connectors[0]["cost"] == 3
    [warning] = result.warnings
    assert warning.startswith("Partners: the address spaces have different costs (3, 7)")
    assert "cost = 3" in warning


def test_non_smtp_address_spaces_are_warned_and_none_left_imports_disabled() -> None:
    result = parse_exchange_export(json_connector(AddressSpaces=["X400:c=DE;a= ;p=Corp;1"]))
    [send] = result.send_connectors
    assert send["enabled"] is False and "address_spaces" not in send
    parse_config({"send_connectors": [send]}, "<import>")  # still a valid (disabled) connector
    assert any("is not an SMTP address space" in w for w in result.warnings)
    assert any("imported disabled because no SMTP address space" in w for w in result.warnings)


def test_exchange_server_auth_is_kept_with_a_warning() -> None:
    result = parse_exchange_export(json_connector(SmartHostAuthMechanism="ExchangeServer"))
    assert result.send_connectors[0]["smart_host_auth_mechanism"] == "ExchangeServer"
    assert result.send_connectors[0].get("enabled", True) is True
    assert any("ExchangeServer is Exchange-to-Exchange" in w for w in result.warnings)


def test_receive_exports_are_unchanged_and_mixed_files_split_by_kind() -> None:
    receive = (FIXTURES / "receive_connectors_fl.txt").read_text(encoding="utf-8")
    before = parse_receive_connectors(receive)
    assert before.send_connectors == []
    send = (FIXTURES / "send_connectors_fl.txt").read_text(encoding="utf-8")
    mixed = parse_exchange_export(receive + "\n\n" + send)
    assert mixed.connectors == before.connectors
    assert [s["name"] for s in mixed.send_connectors] == ["Outbound to Office 365", "Internet"]


def test_combine_keeps_identical_send_connectors_once_and_refuses_different_ones() -> None:
    fl, csv = parse("send_connectors_fl.txt"), parse("send_connectors.csv")
    merged = combine_results([fl, csv])
    assert [s["name"] for s in merged.send_connectors] == ["Outbound to Office 365", "Internet"]
    assert merged.errors == []
    other = parse_exchange_export(json_connector(Identity="Internet", Name="Internet"))
    merged = combine_results([fl, other])
    assert merged.errors == [
        "two different send connectors are named 'Internet'; import one of them, or rename one "
        "in the export"
    ]


def test_truncated_address_spaces_are_not_imported_as_the_first_four() -> None:
    text = """
Identity      : Partners
AddressSpaces : {SMTP:a.example;1, SMTP:b.example;1, SMTP:c.example;1, SMTP:d.example;1...}
SmartHosts    : {smarthost.corp.example}
DNSRoutingEnabled : False
Enabled       : True
"""
    result = parse_exchange_export(text)
    [send] = result.send_connectors
    assert send["enabled"] is False and "address_spaces" not in send
    parse_config({"send_connectors": [send]}, "<import>")  # still a valid (disabled) connector
    assert result.warnings == [
        "Partners: AddressSpaces was cut short by $FormatEnumerationLimit ('...' after the first 4 "
        "entries in the export); not imported. Re-export after `$FormatEnumerationLimit = -1` (or with "
        "ConvertTo-Json)",
        "Partners: imported disabled because no SMTP address space could be read; set address_spaces "
        "and enabled = true",
    ]
