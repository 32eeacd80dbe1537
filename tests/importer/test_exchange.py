"""Exchange connector and AD-permission exports → RelayGate tables, from hand-written fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.importer.exchange import (
    ExchangeImportError,
    combine_results,
    decode_export,
    detect_format,
    format_size,
    is_open_relay,
    parse_ad_permissions,
    parse_receive_connectors,
    relays_anonymously,
)

FIXTURES = Path(__file__).parent / "fixtures"

RELAY_PRINTERS = {
    "name": "Relay Printers",
    "transport_role": "FrontendTransport",
    "enabled": True,
    "bindings": ["[::]:25", "0.0.0.0:25"],
    "remote_ip_ranges": [
        "192.168.20.0/24",
        "10.10.5.20-10.10.5.40",
        "10.10.5.13",
        "10.10.5.12",
        "10.10.5.11",
        "2001:db8:10::25",
    ],
    "auth_mechanism": ["Tls"],
    "permission_groups": ["AnonymousUsers"],
    "protocol_logging_level": "Verbose",
    "fqdn": "EX01.corp.example",
    "comment": "Printers and scanners, floors 1-3. Change CHG-1042 (J. Meyer): do not add ranges without approval.",
    "max_message_size": "25MB",
    "max_recipients_per_message": 200,
    "connection_timeout": "00:10:00",
    "connection_inactivity_timeout": "00:05:00",
    "max_inbound_connection_per_source": 20,
    "max_local_hop_count": 5,
}
APP_RELAY = {
    "name": "App Relay",
    "transport_role": "FrontendTransport",
    "enabled": True,
    "bindings": ["10.0.0.25:25"],
    "remote_ip_ranges": ["10.20.30.41", "10.20.30.40"],
    "auth_mechanism": ["Tls", "ExternalAuthoritative"],
    "permission_groups": ["ExchangeServers"],
    "protocol_logging_level": "None",
    "fqdn": "EX01.corp.example",
    "banner": "220 relay.corp.example ERP relay ready",
    "max_message_size": "36MB",
    "max_recipients_per_message": 500,
    "connection_timeout": "00:20:00",
    "connection_inactivity_timeout": "00:05:00",
    "max_inbound_connection_per_source": "unlimited",
    "bare_linefeed_rejection_enabled": True,
}
DEFAULT_FRONTEND_EX02 = {
    "name": "Default Frontend EX02",
    "transport_role": "FrontendTransport",
    "enabled": True,
    "bindings": ["[::]:25", "0.0.0.0:25"],
    "remote_ip_ranges": ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "0.0.0.0-255.255.255.255"],
    "auth_mechanism": ["Tls", "Integrated", "BasicAuth", "BasicAuthRequireTLS", "ExchangeServer"],
    "permission_groups": ["AnonymousUsers", "ExchangeServers", "ExchangeLegacyServers"],
    "protocol_logging_level": "Verbose",
    "fqdn": "EX02.corp.example",
    "max_message_size": "36MB",
    "max_recipients_per_message": 200,
    "connection_timeout": "00:10:00",
    "connection_inactivity_timeout": "00:05:00",
    "max_inbound_connection_per_source": 20,
}
BARE_LF = (
    "BareLinefeedRejectionEnabled is False in Exchange; RelayGate keeps rejecting bare LF in DATA "
    "(SMTP smuggling protection). Set bare_linefeed_rejection_enabled = false only if a device needs it"
)


def fixture(name: str) -> str:
    return decode_export((FIXTURES / name).read_bytes())


def test_format_list_with_wrapped_values() -> None:
    result = parse_receive_connectors(fixture("receive_connectors_fl.txt"), filename="fl.txt")
    assert result.connectors == [RELAY_PRINTERS, APP_RELAY]
    assert result.permissions == {}
    assert result.sources == {
        "Relay Printers": ["EX01\\Relay Printers"],
        "App Relay": ["EX01\\App Relay"],
    }
    assert result.warnings == [
        f"EX01\\Relay Printers: {BARE_LF}",
        "EX01\\Relay Printers: TlsCertificateName '<I>CN=Corp Issuing CA 01, DC=corp, DC=example<S>CN=relay."
        "corp.example, O=Corp...' cannot be imported: export that certificate and set tls_certificate_file "
        "/ tls_key_file",
    ]
    assert result.skipped == [
        "EX01\\Relay Printers: TlsCertificateName = <I>CN=Corp Issuing CA 01, DC=corp, DC=example<S>CN=relay."
        "corp.example, O=Corp...",
        "EX01\\App Relay: XProxyMaxAge = 1.00:00:00",
    ]
    assert result.errors == []


def _format_list(properties: dict[str, str], *, width: int, word_wrap: bool) -> str:
    """One object as Format-List writes it at a console `width`: labels padded to the longest, values
    wrapped at word ends (en, fr, de, it, pt, es cultures: a line keeps the space after its last
    word) or cut at exactly the width (every other culture: StringManipulationHelper)."""
    label_width = max(map(len, properties))
    value_width = width - label_width - 3
    lines = []
    for label, value in properties.items():
        chunks: list[str] = []
        if word_wrap:
            line = ""
            for word in value.split(" "):
                if line and len(line) + len(word) > value_width:
                    chunks.append(line)
                    line = ""
                line += word + " "
            chunks.append(line.rstrip())
        else:
            chunks = [value[i : i + value_width] for i in range(0, len(value), value_width)] or [""]
        lines.append(f"{label.ljust(label_width)} : {chunks[0]}")
        lines += [" " * (label_width + 3) + chunk for chunk in chunks[1:]]
    return "\r\n" + "\r\n".join(lines) + "\r\n"


@pytest.mark.parametrize("word_wrap", [True, False], ids=["word-wrap", "cut-at-width"])
def test_format_list_values_wrapped_in_any_culture(word_wrap: bool) -> None:
    text = _format_list(
        {
            "Identity": "EX01\\Relay Printers and Scanners Building 2",
            "Bindings": "{0.0.0.0:25}",
            "RemoteIPRanges": "{10.10.5.11, 10.10.5.12-10.10.5.40, 192.168.20.0/24}",
            "AuthMechanism": "Tls, Integrated, BasicAuth, BasicAuthRequireTLS",
            "PermissionGroups": "AnonymousUsers, ExchangeUsers, ExchangeServers",
            "TransportRole": "FrontendTransport",
            "Banner": "220 relay.corp.example ready for printers and scanners only",
            "MaxInboundConnectionPercentagePerSource": "2",  # the longest label: 38 columns left
        },
        width=80,
        word_wrap=word_wrap,
    )
    assert any(line.startswith(" ") for line in text.splitlines())  # it did wrap
    result = parse_receive_connectors(text)
    [connector] = result.connectors
    assert connector["name"] == "Relay Printers and Scanners Building 2"
    assert connector["remote_ip_ranges"] == [
        "10.10.5.11",
        "10.10.5.12-10.10.5.40",
        "192.168.20.0/24",
    ]
    assert connector["auth_mechanism"] == ["Tls", "Integrated", "BasicAuth", "BasicAuthRequireTLS"]
    assert connector["permission_groups"] == ["AnonymousUsers", "ExchangeUsers", "ExchangeServers"]
    assert connector["banner"] == "220 relay.corp.example ready for printers and scanners only"


def test_csv_with_type_line_quoting_and_space_separated_lists() -> None:
    result = parse_receive_connectors(fixture("receive_connectors.csv"))
    assert result.connectors == [
        {**RELAY_PRINTERS, "fqdn": "EX02.corp.example"},
        DEFAULT_FRONTEND_EX02,
    ]
    assert result.warnings == [
        f"EX02\\Relay Printers: {BARE_LF}",
        f"EX02\\Default Frontend EX02: {BARE_LF}",
        "EX02\\Default Frontend EX02: a connector Exchange setup creates; keep it only if devices send "
        "through it (check the protocol-log usage report)",
        "EX02\\Default Frontend EX02: AuthMechanism Integrated (NTLM/Kerberos) needs Active Directory; "
        "clients that authenticate that way must switch to BasicAuth over TLS",
        "EX02\\Default Frontend EX02: AuthMechanism ExchangeServer is for Exchange-to-Exchange traffic; "
        "there is no Exchange server behind RelayGate",
    ]
    assert result.skipped == []


def test_json_with_nested_objects_and_remoting_strings() -> None:
    result = parse_receive_connectors(fixture("receive_connectors.json"))
    assert result.connectors == [
        {
            "name": "Scanner Relay",
            "transport_role": "FrontendTransport",
            "enabled": True,
            "bindings": ["0.0.0.0:25", "[::]:25"],
            "remote_ip_ranges": [
                "172.16.40.0/24",
                "172.16.41.10-172.16.41.20",
                "172.16.42.7",
                "fd00:10::/64",
            ],
            "auth_mechanism": ["Tls"],
            "permission_groups": ["AnonymousUsers"],
            "protocol_logging_level": "Verbose",
            "fqdn": "scan.corp.example",
            "max_message_size": "50MB",
            "max_recipients_per_message": 100,
            "connection_timeout": "00:10:00",
            "connection_inactivity_timeout": "00:03:00",
            "max_inbound_connection_per_source": 10,
            "max_inbound_connection": "unlimited",
            "message_rate_limit": 120,
            "require_tls": True,
            "tarpit_interval": "00:00:00",
            "bare_linefeed_rejection_enabled": True,
        },
        {
            "name": "Legacy App Submission",
            "transport_role": "FrontendTransport",
            "enabled": False,
            "bindings": ["0.0.0.0:587", "[::]:587"],
            "remote_ip_ranges": ["10.50.0.0/16"],
            "auth_mechanism": ["Tls", "Integrated", "BasicAuth", "BasicAuthRequireTLS"],
            "permission_groups": ["ExchangeUsers"],
            "protocol_logging_level": "None",
            "fqdn": "EX03.corp.example",
            "max_message_size": "10MB",
            "max_recipients_per_message": 200,
            "connection_timeout": "00:10:00",
            "connection_inactivity_timeout": "00:05:00",
            "max_inbound_connection_per_source": 20,
            "message_rate_limit": 5,
            "message_rate_source": "User",
        },
    ]
    assert result.warnings == [
        "EX03\\Scanner Relay: SizeEnabled numeric value 1 has no known name; re-export with names (e.g. "
        "ConvertTo-Json from the Exchange Management Shell, or -EnumsAsStrings); not imported",
        "EX03\\Legacy App Submission: AuthMechanism Integrated (NTLM/Kerberos) needs Active Directory; "
        "clients that authenticate that way must switch to BasicAuth over TLS",
    ]
    assert result.skipped == ["EX03\\Legacy App Submission: SmtpUtf8Enabled = False"]


def test_ad_permissions_format_list() -> None:
    assert parse_ad_permissions(fixture("adpermission_fl.txt")) == {
        "Relay Printers": [
            {
                "user": "NT AUTHORITY\\ANONYMOUS LOGON",
                "extended_rights": [
                    "ms-Exch-SMTP-Submit",
                    "ms-Exch-Accept-Headers-Routing",
                    "ms-Exch-SMTP-Accept-Any-Recipient",
                    "ms-Exch-SMTP-Accept-Any-Sender",
                ],
            },
            {
                "user": "CORP\\svc-scan",
                "extended_rights": ["ms-Exch-SMTP-Submit", "ms-Exch-SMTP-Accept-Any-Recipient"],
            },
        ]
    }


def test_ad_permissions_csv_keeps_deny_and_drops_inherited() -> None:
    assert parse_ad_permissions(fixture("adpermission.csv")) == {
        "Default Frontend EX02": [
            {"user": "NT AUTHORITY\\ANONYMOUS LOGON", "extended_rights": ["ms-Exch-SMTP-Submit"]},
            {
                "user": "NT AUTHORITY\\ANONYMOUS LOGON",
                "extended_rights": ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"],
                "deny": True,
            },
        ],
        "App Relay": [
            {
                "user": "MS Exchange\\Externally Secured Servers",
                "extended_rights": [
                    "ms-Exch-SMTP-Accept-Any-Recipient",
                    "ms-Exch-Bypass-Anti-Spam",
                    "ms-Exch-SMTP-Submit",
                ],
            }
        ],
    }


def test_ad_permissions_skips_non_smtp_rights() -> None:
    result = parse_receive_connectors(fixture("adpermission_fl.txt"))
    assert result.connectors == []
    assert result.skipped == [
        "EX01\\Relay Printers: extended right ms-Exch-SMTP-Accept-XShadow for MS Exchange\\Hub Transport Servers"
    ]
    assert result.warnings == [
        "EX01\\Relay Printers: CORP\\svc-scan is an Active Directory account; RelayGate has no directory, "
        "so it only matches a RelayGate user of that exact name"
    ]


def test_combine_attaches_permissions_without_group_rights_and_dedupes_servers() -> None:
    results = [
        parse_receive_connectors(fixture(name))
        for name in (
            "receive_connectors_fl.txt",
            "receive_connectors.csv",
            "adpermission_fl.txt",
            "adpermission.csv",
        )
    ]
    merged = combine_results(results)
    assert [c["name"] for c in merged.connectors] == [
        "Relay Printers",
        "App Relay",
        "Default Frontend EX02",
    ]
    assert merged.connectors[0] == {
        **RELAY_PRINTERS,
        "permissions": [
            {
                "user": "NT AUTHORITY\\ANONYMOUS LOGON",
                "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
            },
            {
                "user": "CORP\\svc-scan",
                "extended_rights": ["ms-Exch-SMTP-Submit", "ms-Exch-SMTP-Accept-Any-Recipient"],
            },
        ],
    }
    # Externally Secured Servers' ACEs all come from permission_groups = ExchangeServers.
    assert merged.connectors[1] == APP_RELAY
    # The implied Submit is dropped; the Deny (anti-spoofing) stays.
    assert merged.connectors[2]["permissions"] == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Authoritative-Domain-Sender"],
            "deny": True,
        }
    ]
    assert merged.sources["Relay Printers"] == ["EX01\\Relay Printers", "EX02\\Relay Printers"]
    assert (
        "Relay Printers: the same settings on EX01\\Relay Printers, EX02\\Relay Printers; imported once "
        "with fqdn 'EX01.corp.example'"
    ) in merged.warnings
    assert merged.errors == []
    assert not any("OPEN RELAY" in w for w in merged.warnings)


def test_combine_refuses_two_different_connectors_with_one_name() -> None:
    csv_text = fixture("receive_connectors.csv").replace(
        "10.10.5.40 10.10.5.13", "10.10.5.40 10.10.5.99"
    )
    merged = combine_results(
        [
            parse_receive_connectors(fixture("receive_connectors_fl.txt")),
            parse_receive_connectors(csv_text),
        ]
    )
    assert merged.errors == [
        "two different connectors are named 'Relay Printers' (EX01\\Relay Printers, EX02\\Relay Printers); "
        "RelayGate is one server, so import one of them, or rename one in the export"
    ]


def test_open_relay_is_called_out() -> None:
    connector = """
Identity         : EX01\\Anything Goes
Bindings         : {0.0.0.0:25}
RemoteIPRanges   : {0.0.0.0-255.255.255.255}
AuthMechanism    : Tls
PermissionGroups : AnonymousUsers
TransportRole    : FrontendTransport
"""
    acl = """
User           : NT AUTHORITY\\ANONYMOUS LOGON
ExtendedRights : {ms-Exch-SMTP-Accept-Any-Recipient}
Deny           : False
IsInherited    : False
Identity       : EX01\\Anything Goes
"""
    merged = combine_results([parse_receive_connectors(connector), parse_receive_connectors(acl)])
    assert merged.warnings == [
        "EX01\\Anything Goes: grants relay to (nearly) all addresses: this is an OPEN RELAY, so it is "
        "imported disabled. Narrow remote_ip_ranges to the devices that send (see the protocol-log usage "
        "report), then set enabled = true"
    ]
    assert merged.connectors[0]["enabled"] is False


def test_accept_any_recipient_without_submit_is_not_imported_as_an_open_relay() -> None:
    """Anonymous sessions need ms-Exch-SMTP-Submit as well to send at all (MAIL is answered 530
    without it, on Exchange as here): a connector granting Everyone only Accept-Any-Recipient on
    every address relays nothing, yet it was imported disabled and called an OPEN RELAY (the
    check looked at the relay right alone; audit had the same gap, 9c2c557)."""
    connector = """
Identity         : EX01\\Partners Only
Bindings         : {0.0.0.0:25}
RemoteIPRanges   : {0.0.0.0-255.255.255.255}
AuthMechanism    : Tls
PermissionGroups : Custom
TransportRole    : FrontendTransport

User           : Everyone
ExtendedRights : {ms-Exch-SMTP-Accept-Any-Recipient}
Deny           : False
IsInherited    : False
Identity       : EX01\\Partners Only
"""
    merged = combine_results([parse_receive_connectors(connector)])
    assert merged.errors == []
    assert not any("OPEN RELAY" in w for w in merged.warnings), merged.warnings
    assert not any("may relay" in w for w in merged.warnings), merged.warnings
    assert merged.disabled_open_relays == []
    assert merged.connectors[0].get("enabled", True) is True
    assert not relays_anonymously(merged.connectors[0])
    assert not is_open_relay(merged.connectors[0])
    # With Submit too it is one, as before.
    merged = combine_results(
        [parse_receive_connectors(connector.replace("{ms-Exch", "{ms-Exch-SMTP-Submit, ms-Exch"))]
    )
    assert merged.connectors[0]["enabled"] is False
    assert any("this is an OPEN RELAY" in w for w in merged.warnings), merged.warnings


def _connector_and_acl(name: str, groups: str, ranges: str, user: str, auth: str = "Tls") -> str:
    return f"""
Identity         : EX01\\{name}
Bindings         : {{0.0.0.0:25}}
RemoteIPRanges   : {{{ranges}}}
AuthMechanism    : {auth}
PermissionGroups : {groups}
TransportRole    : FrontendTransport

User           : {user}
ExtendedRights : {{ms-Exch-SMTP-Submit, ms-Exch-SMTP-Accept-Any-Recipient}}
Deny           : False
IsInherited    : False
Identity       : EX01\\{name}
"""


@pytest.mark.parametrize(
    ("groups", "ranges", "user"),
    [
        # Custom: the anonymous session's rights come from the ACE alone (as on the server).
        ("Custom", "0.0.0.0-255.255.255.255", "NT AUTHORITY\\ANONYMOUS LOGON"),
        # Everyone covers anonymous sessions too.
        ("AnonymousUsers", "0.0.0.0/0", "Everyone"),
        # Two halves are every address as much as one /0 is.
        ("AnonymousUsers", "0.0.0.0/1, 128.0.0.0/1", "NT AUTHORITY\\ANONYMOUS LOGON"),
        # A French domain controller's spelling of the same principal.
        (
            "AnonymousUsers",
            "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            "AUTORITE NT\\ANONYMOUS LOGON",
        ),
    ],
)
def test_open_relay_is_called_out_whichever_way_anonymous_sessions_get_the_right(
    groups: str, ranges: str, user: str
) -> None:
    merged = combine_results(
        [parse_receive_connectors(_connector_and_acl("Wide Open", groups, ranges, user))]
    )
    assert (
        "EX01\\Wide Open: grants relay to (nearly) all addresses: this is an OPEN RELAY, so it is "
        "imported disabled. Narrow remote_ip_ranges to the devices that send (see the protocol-log usage "
        "report), then set enabled = true"
    ) in merged.warnings
    assert merged.connectors[0]["enabled"] is False
    assert not any("is an Active Directory account" in w for w in merged.warnings)


def test_well_known_principals_keep_their_meaning_in_any_spelling() -> None:
    merged = combine_results(
        [
            parse_receive_connectors(
                _connector_and_acl(
                    "Printers", "AnonymousUsers", "10.1.1.5", "AUTORITE NT\\ANONYMOUS LOGON"
                )
            )
        ]
    )
    assert merged.connectors[0]["permissions"] == [
        {
            "user": "NT AUTHORITY\\ANONYMOUS LOGON",
            "extended_rights": ["ms-Exch-SMTP-Accept-Any-Recipient"],
        }
    ]
    assert merged.warnings == []


def test_externally_secured_connector_is_always_called_full_trust() -> None:
    text = """
Identity         : EX01\\Trusted Subnet
Bindings         : {0.0.0.0:25}
RemoteIPRanges   : {10.0.0.0/8}
AuthMechanism    : Tls, ExternalAuthoritative
PermissionGroups : ExchangeServers
TransportRole    : FrontendTransport
"""
    merged = combine_results([parse_receive_connectors(text)])
    assert merged.warnings == [
        "EX01\\Trusted Subnet: ExternalAuthoritative (externally secured) trusts 16,777,216 address(es) "
        "fully: their mail relays, counts as internal and authenticated, may use any internal sender "
        "address, and bypasses the size limit. Keep it for a few hosts secured outside the relay, or "
        "move the devices to AnonymousUsers + an Accept-Any-Recipient permission"
    ]


def test_truncated_format_list_enumeration_is_reported_and_never_imported() -> None:
    # $FormatEnumerationLimit (4 by default) cut both lists; the second wraps at the console width.
    text = """
Identity         : EX01\\Many Printers
Bindings         : {10.0.0.25:25, 10.0.0.26:25, 10.0.0.27:25, 10.0.0.28:25...}
RemoteIPRanges   : {10.1.0.1, 10.1.0.2, 10.1.0.3,
                   10.1.0.4...}
AuthMechanism    : Tls
PermissionGroups : AnonymousUsers
"""
    result = parse_receive_connectors(text)
    assert result.connectors == [
        {
            "name": "Many Printers",
            "enabled": False,
            "auth_mechanism": ["Tls"],
            "permission_groups": ["AnonymousUsers"],
        }
    ]
    assert result.warnings == [
        f"EX01\\Many Printers: {name} was cut short by $FormatEnumerationLimit ('...' after the first 4 "
        "entries in the export); not imported, and the connector is imported disabled. Re-export after "
        f"`$FormatEnumerationLimit = -1` (or with ConvertTo-Json), or fill in {key} and set enabled = true"
        for name, key in (("Bindings", "bindings"), ("RemoteIPRanges", "remote_ip_ranges"))
    ]


def test_csv_type_name_instead_of_values_disables_the_connector() -> None:
    text = (
        "#TYPE Microsoft.Exchange.Data.Directory.SystemConfiguration.ReceiveConnector\n"
        '"Identity","Bindings","RemoteIPRanges","AuthMechanism","PermissionGroups","Enabled"\n'
        '"EX01\\Relay","0.0.0.0:25","Microsoft.Exchange.Data.MultiValuedProperty`1[Microsoft.Exchange.Data.IPRange]",'
        '"Tls","AnonymousUsers","True"\n'
    )
    result = parse_receive_connectors(text)
    assert result.connectors == [
        {
            "name": "Relay",
            "enabled": False,
            "bindings": ["0.0.0.0:25"],
            "auth_mechanism": ["Tls"],
            "permission_groups": ["AnonymousUsers"],
        }
    ]
    assert result.warnings[0].startswith(
        "EX01\\Relay: RemoteIPRanges holds the .NET type name 'Microsoft.Exchange.Data.MultiValuedProperty`1"
    )
    assert result.warnings[1] == (
        "EX01\\Relay: imported disabled because its RemoteIPRanges could not be read; fill in "
        "remote_ip_ranges and set enabled = true"
    )


def test_semicolon_csv_and_unicode_export() -> None:
    text = (
        '"Identity";"Bindings";"RemoteIPRanges";"AuthMechanism";"PermissionGroups";"MaxMessageSize";"Banner"\n'
        '"EX01\\Relais Drucker";"0.0.0.0:25";"10.0.0.1 10.0.0.2";"None";"AnonymousUsers";'
        '"25 MB (26.214.400 bytes)";"220 Relais für Drucker; bitte nur intern"\n'
    )
    for data in (
        text.encode("utf-16"),
        b"\xef\xbb\xbf" + text.encode("utf-8"),
        text.encode("cp1252"),
    ):
        result = parse_receive_connectors(decode_export(data))
        assert result.connectors == [
            {
                "name": "Relais Drucker",
                "bindings": ["0.0.0.0:25"],
                "remote_ip_ranges": ["10.0.0.1", "10.0.0.2"],
                "auth_mechanism": ["None"],
                "permission_groups": ["AnonymousUsers"],
                "max_message_size": "25MB",
                "banner": "220 Relais für Drucker; bitte nur intern",
            }
        ]


def test_json_enum_numbers_and_ipv4_address_long() -> None:
    text = """{"Identity": "EX09\\\\Ops", "AuthMechanism": 33, "PermissionGroups": 4,
      "Bindings": [{"Address": {"Address": 419430410}, "Port": 25}],
      "RemoteIPRanges": [{"LowerBound": "10.9.0.0", "UpperBound": "10.9.0.255", "RangeFormat": "CIDR"}],
      "TransportRole": 32, "MessageRateSource": 3, "ConnectionTimeout": {"Days": 1, "Hours": 0}}"""
    result = parse_receive_connectors(text)
    assert result.connectors == [
        {
            "name": "Ops",
            "transport_role": "HubTransport",
            "bindings": ["10.0.0.25:25"],
            "remote_ip_ranges": ["10.9.0.0/24"],
            "auth_mechanism": ["Tls", "ExternalAuthoritative"],
            "permission_groups": ["ExchangeServers"],
            "connection_timeout": "1.00:00:00",
            "message_rate_source": "All",
        }
    ]


def test_all_values_writes_defaults_too() -> None:
    result = parse_receive_connectors(fixture("receive_connectors_fl.txt"), full=True)
    relay = result.connectors[0]
    assert relay["max_header_size"] == "256KB"
    assert relay["message_rate_limit"] == "unlimited"
    assert relay["tarpit_interval"] == "00:00:05"
    assert relay["size_enabled"] == "Enabled"
    assert "bare_linefeed_rejection_enabled" not in relay  # RelayGate's safer default is kept


def test_format_detection_and_errors() -> None:
    assert detect_format(fixture("receive_connectors.json")) == "json"
    assert detect_format(fixture("receive_connectors.csv")) == "csv"
    assert detect_format(fixture("receive_connectors_fl.txt")) == "list"
    assert detect_format(fixture("adpermission_fl.txt")) == "list"
    assert detect_format(fixture("logs/RECV2024031409-1.LOG")) == "protocol-log"
    with pytest.raises(ExchangeImportError, match="empty"):
        parse_receive_connectors("  \n")
    with pytest.raises(ExchangeImportError, match=r"x\.txt: not valid JSON"):
        parse_receive_connectors("[{", filename="x.txt")


@pytest.mark.parametrize(
    ("size", "text"),
    [(37748736, "36MB"), (262144, "256KB"), (2147483648, "2GB"), (1000, "1000"), (0, "0")],
)
def test_format_size(size: int, text: str) -> None:
    assert format_size(size) == text


def test_server_as_an_object_without_a_name_is_not_a_crash() -> None:
    # ConvertTo-Json at a depth where Server (an ADObjectId) lost its Name: the Identity DN still
    # names the server.
    text = (
        '{"Identity": "CN=Relay,CN=SMTP Receive Connectors,CN=Protocols,CN=EX01,CN=Servers,CN=Exchange",'
        ' "Server": {"DistinguishedName": "CN=EX01,CN=Servers,CN=Exchange"}, "Bindings": ["0.0.0.0:25"],'
        ' "RemoteIPRanges": ["10.0.0.1"], "PermissionGroups": "AnonymousUsers"}'
    )
    result = parse_receive_connectors(text)
    assert [c["name"] for c in result.connectors] == ["Relay"]
    assert result.sources == {"Relay": ["EX01\\Relay"]}


def test_a_type_name_from_convertto_json_depth_says_how_to_re_export() -> None:
    text = (
        '{"Identity": "EX01\\\\Relay", "Bindings": ["0.0.0.0:25"], "PermissionGroups": "AnonymousUsers",'
        ' "RemoteIPRanges": "Microsoft.Exchange.Data.MultiValuedProperty`1[Microsoft.Exchange.Data.IPRange]"}'
    )
    result = parse_receive_connectors(text)
    assert result.connectors[0]["enabled"] is False
    assert result.warnings[0] == (
        "EX01\\Relay: RemoteIPRanges holds the .NET type name "
        "'Microsoft.Exchange.Data.MultiValuedProperty`1[Microsoft.Exchange.Data.IPRange]' instead of its "
        "values (Export-Csv writes multi-valued properties so, ConvertTo-Json what lies deeper than its "
        "-Depth, 2 by default); re-export with `ConvertTo-Json -Depth 5`, or with Format-List after "
        "`$FormatEnumerationLimit = -1`; not imported"
    )


def test_a_wide_relay_range_is_called_out_but_imported() -> None:
    merged = combine_results(
        [
            parse_receive_connectors(
                _connector_and_acl(
                    "Site Relay",
                    "AnonymousUsers",
                    "10.0.0.0-10.255.255.255, 192.168.7.0/24, 2001:db8::/48",
                    "NT AUTHORITY\\ANONYMOUS LOGON",
                )
            )
        ]
    )
    assert merged.connectors[0].get("enabled", True) is True
    assert merged.warnings == [
        "EX01\\Site Relay: anonymous clients of 10.0.0.0-10.255.255.255 (16,777,216 addresses, as wide "
        "as a /8), 2001:db8::/48 (as wide as a /48) may relay: narrow remote_ip_ranges to the devices "
        "that send (see the protocol-log usage report, or --narrow-ranges)"
    ]


def test_a_plain_ace_without_a_connector_is_not_warned_about() -> None:
    text = (
        '[{"User": "CORP\\\\Exchange Servers", "Identity": {"DistinguishedName": null},'
        ' "ExtendedRights": ["ms-Exch-EPI-Token-Serialization"], "Deny": false, "IsInherited": false}]'
    )
    assert parse_receive_connectors(text).warnings == []


def test_an_inherited_relay_grant_to_anonymous_is_said_not_dropped_in_silence() -> None:
    """An ACE inherited from the server's receive-connector container (Add-ADPermission run on
    the container, not the connector) is not imported: most are Exchange's own groups' rights,
    which the connector's permission groups carry. But an inherited relay right for ANONYMOUS
    LOGON is what let the devices relay: dropped in silence, they stop after the cut-over."""
    ace = (
        "\nAccessRights        : {ExtendedRight}\n"
        "ExtendedRights      : {ms-Exch-SMTP-Accept-Any-Recipient}\n"
        "Deny                : False\n"
        "User                : NT AUTHORITY\\ANONYMOUS LOGON\n"
        "Identity            : EX01\\Relay Printers\n"
        "IsInherited         : True\n"
    )
    result = parse_receive_connectors(fixture("adpermission_fl.txt") + ace)
    assert [w for w in result.warnings if "inherited" in w] == [
        "EX01\\Relay Printers: NT AUTHORITY\\ANONYMOUS LOGON holds "
        "ms-Exch-SMTP-Accept-Any-Recipient by inheritance (from the server's receive connector "
        "container); inherited rights are not imported: if the devices relay by it, add it with "
        "`relaygate permission add`"
    ]
    # an inherited Exchange-group grant stays quiet, as before
    quiet = ace.replace("NT AUTHORITY\\ANONYMOUS LOGON", "MS Exchange\\Hub Transport Servers")
    result = parse_receive_connectors(fixture("adpermission_fl.txt") + quiet)
    assert not [w for w in result.warnings if "inherited" in w]
