"""Exchange value syntaxes: time spans, sizes, RemoteIPRanges, bindings; usage seeding and defaults."""

from __future__ import annotations

import ipaddress
from datetime import timedelta

import pytest

from relaygate.config import ConfigError, parse_text
from relaygate.config.values import (
    format_size,
    format_timespan,
    parse_binding,
    parse_ip_range,
    parse_size,
    parse_timespan,
)

ip = ipaddress.ip_address


# --- time spans ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("00:05:00", timedelta(minutes=5)),
        ("00:10:00", timedelta(minutes=10)),
        ("2.00:00:00", timedelta(days=2)),
        ("0.00:00:05", timedelta(seconds=5)),
        ("04:00:00", timedelta(hours=4)),
        ("1.02:03:04", timedelta(days=1, hours=2, minutes=3, seconds=4)),
        ("00:00:01.5", timedelta(seconds=1.5)),  # .NET fraction, as Get-ReceiveConnector may print
        (" 00:01:00 ", timedelta(minutes=1)),
        (30, timedelta(seconds=30)),  # a bare TOML integer is seconds
    ],
)
def test_timespan_parses(text: object, expected: timedelta) -> None:
    assert parse_timespan(text) == expected


@pytest.mark.parametrize(
    "bad",
    [
        "5 minutes",
        "00:60:00",
        "24:00:00",
        "00:00:60",
        "-00:05:00",
        "",
        "1:2",
        "2d",
        "00:05",
        True,
        -1,
        None,
    ],
)
def test_timespan_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_timespan(bad)


@pytest.mark.parametrize(
    "bad", ["100000000000.00:00:00", float("inf"), float("nan"), 1e300, 10**20]
)
def test_timespan_out_of_range_is_a_value_error(bad: object) -> None:
    """Beyond what a timedelta holds: a ValueError the loader reports with the key, never an
    OverflowError that crashes `check`, `serve` or a reload."""
    with pytest.raises(ValueError):
        parse_timespan(bad)


def test_out_of_range_values_in_a_file_name_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        _connector(
            'bindings = ["0.0.0.0:25"]\nconnection_timeout = "100000000000.00:00:00"\n'
            "connection_inactivity_timeout = inf\n"
            f'max_message_size = "{"9" * 400}MB"\n'
        )
    text = str(info.value)
    for key in ("connection_timeout", "connection_inactivity_timeout", "max_message_size"):
        assert f'receive_connectors[0] "C": {key}: ' in text, text


def test_timespan_round_trip() -> None:
    for text in ("00:05:00", "2.00:00:00", "00:00:05", "30.00:00:00"):
        assert format_timespan(parse_timespan(text)) == text


# --- sizes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("25MB", 26_214_400),
        ("36MB", 37_748_736),
        ("512KB", 524_288),
        ("256KB", 262_144),
        ("2GB", 2 * 1024**3),
        ("25 mb", 26_214_400),
        ("65536", 65_536),
        ("100B", 100),
        (37_748_736, 37_748_736),
        ("36 MB (37,748,736 bytes)", 37_748_736),  # as Get-ReceiveConnector prints it
        ("10 MB (10,485,760 bytes)", 10_485_760),
    ],
)
def test_size_parses_binary_units(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "bad", ["abc", "-5", "MB", "25XB", "", "1,000", "25 M B", True, -1, 2.5, None, "9" * 400]
)
def test_size_rejects(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_size_formats_back() -> None:
    assert format_size(37_748_736) == "36MB"
    assert format_size(524_288) == "512KB"
    assert format_size(1000) == "1000"


# --- RemoteIPRanges ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "inside", "outside", "size"),
    [
        ("192.168.1.1", ["192.168.1.1"], ["192.168.1.2"], 1),
        ("2001:db8::1", ["2001:db8::1"], ["2001:db8::2"], 1),
        ("fe80::1%11", ["fe80::1"], ["fe80::2"], 1),  # zone id accepted and dropped
        ("fe80::39bd:88f7:6969:d223%11", ["fe80::39bd:88f7:6969:d223"], ["fe80::1"], 1),
        (
            "192.168.1.1-192.168.1.254",
            ["192.168.1.1", "192.168.1.254"],
            ["192.168.1.0", "192.168.1.255"],
            254,
        ),
        ("10.0.0.1 - 10.0.0.5", ["10.0.0.3"], ["10.0.0.6"], 5),
        (
            "192.168.1.1/24",
            ["192.168.1.0", "192.168.1.255"],
            ["192.168.2.0"],
            256,
        ),  # host bits allowed
        ("10.0.0.5/8", ["10.255.255.255"], ["11.0.0.0"], 2**24),
        ("2001:0DB8::CD3/60", ["2001:db8::", "2001:db8:0:f::1"], ["2001:db8:0:10::"], 2**68),
        ("0.0.0.0-255.255.255.255", ["0.0.0.0", "255.255.255.255"], ["::1"], 2**32),
        (
            "::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
            ["::1", "2001:db8::1"],
            ["10.0.0.1"],
            2**128,
        ),
    ],
)
def test_ip_range_forms(text: str, inside: list[str], outside: list[str], size: int) -> None:
    r = parse_ip_range(text)
    assert r.text == text
    assert r.size == size
    for a in inside:
        assert r.contains(ip(a)), a
    for a in outside:
        assert not r.contains(ip(a)), a


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("010.000.000.001", "no leading zeros"),
        ("10.0.0.256", "not a valid IPv4"),
        ("10.0.0.5/33", "prefix length must be 0-32"),
        ("2001:db8::/129", "prefix length must be 0-128"),
        ("10.0.0.9-10.0.0.1", "reversed range"),
        ("2001:db8::9-2001:db8::1", "reversed range"),
        ("10.0.0.1-::1", "same address family"),
        ("10.0.0", "not a valid IPv4"),
        ("10.0.0.1/", "prefix length"),
        ("2001:db8::zz", "not a valid IPv6"),
        ("", "empty"),
        ("printer.corp.example", "not a valid IPv4"),
    ],
)
def test_ip_range_rejects_malformed(bad: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_ip_range(bad)


def test_ipv4_mapped_client_matched_as_ipv4() -> None:
    r = parse_ip_range("10.0.0.0/24")
    assert r.contains(ip("::ffff:10.0.0.5"))
    assert not r.contains(ip("::ffff:10.0.1.5"))
    # Python alone gets this wrong (security-bar §1C item 42): the mapped form is an IPv6 address.
    assert ip("::ffff:10.0.0.5") not in ipaddress.ip_network("10.0.0.0/24")


def test_ipv4_mapped_entry_is_stored_as_ipv4() -> None:
    # An entry written in the mapped form must match the clients it names, not silently nobody.
    for text in ("::ffff:10.0.0.5", "::ffff:10.0.0.0/120", "::ffff:10.0.0.1-::ffff:10.0.0.9"):
        r = parse_ip_range(text)
        assert r.version == 4, text
        assert r.contains(ip("10.0.0.5")) and r.contains(ip("::ffff:10.0.0.5")), text


def test_range_relations() -> None:
    wide, net, one = (
        parse_ip_range(t) for t in ("0.0.0.0-255.255.255.255", "192.168.1.0/24", "192.168.1.75")
    )
    assert wide.contains_range(net) and net.contains_range(one)
    assert not one.contains_range(net)
    partial = parse_ip_range("192.168.1.128-192.168.2.10")
    assert (
        partial.overlaps(net)
        and not net.contains_range(partial)
        and not partial.contains_range(net)
    )
    assert not net.overlaps(parse_ip_range("2001:db8::/32"))


# --- bindings ----------------------------------------------------------------------------------------


def test_bindings() -> None:
    b = parse_binding("0.0.0.0:25")
    assert (b.address, b.port, b.is_wildcard, str(b)) == ("0.0.0.0", 25, True, "0.0.0.0:25")
    b6 = parse_binding("[::]:25")
    assert (b6.address, b6.is_wildcard, str(b6)) == ("::", True, "[::]:25")
    exact = parse_binding("10.0.0.1:587")
    assert exact.matches(ip("10.0.0.1"), 587) and not exact.matches(ip("10.0.0.2"), 587)
    assert not exact.matches(ip("10.0.0.1"), 25)
    assert b.matches(ip("10.9.9.9"), 25) and not b.matches(ip("2001:db8::1"), 25)
    assert b6.matches(ip("2001:db8::1"), 25) and b6.matches(ip("10.0.0.1"), 25)  # dual-stack
    for bad in (
        "0.0.0.0",
        "::25",
        "0.0.0.0:0",
        "0.0.0.0:65536",
        "010.0.0.1:25",
        "[::1:25",
        "host:25",
    ):
        with pytest.raises(ValueError):
            parse_binding(bad)


# --- usage seeding (§1.1) and Exchange defaults (§1.4) -----------------------------------------------


def _connector(body: str):  # type: ignore[no-untyped-def]
    text = '[[receive_connectors]]\nname = "C"\nremote_ip_ranges = ["10.0.0.0/24"]\n' + body
    config = parse_text(text, "seed.toml")
    return config.receive_connectors[0]


@pytest.mark.parametrize(
    ("usage", "groups", "auth", "bindings"),
    [
        (
            "Client",
            ("ExchangeUsers",),
            ("Tls", "BasicAuth", "BasicAuthRequireTLS", "Integrated"),
            ("0.0.0.0:587",),
        ),
        ("Custom", (), ("Tls",), None),
        (
            "Internal",
            ("ExchangeLegacyServers", "ExchangeServers"),
            ("Tls", "ExchangeServer"),
            ("0.0.0.0:25",),
        ),
        ("Internet", ("AnonymousUsers",), ("Tls",), None),
        ("Partner", ("Partners",), ("Tls",), None),
    ],
)
def test_usage_seeds_groups_and_auth(
    usage: str, groups: tuple[str, ...], auth: tuple[str, ...], bindings: tuple[str, ...] | None
) -> None:
    given = "" if bindings else 'bindings = ["10.1.1.1:2525"]\n'
    c = _connector(f'usage = "{usage}"\n' + given)
    assert c.usage == usage
    assert c.permission_groups == groups
    assert c.auth_mechanism == auth
    if bindings:  # Client and Internal have fixed default bindings
        assert tuple(str(b) for b in c.bindings) == bindings


def test_usage_only_seeds_explicit_values_win() -> None:
    c = _connector(
        'usage = "Client"\nbindings = ["0.0.0.0:2587"]\npermission_groups = ["AnonymousUsers"]\n'
    )
    assert c.permission_groups == ("AnonymousUsers",)
    assert [str(b) for b in c.bindings] == ["0.0.0.0:2587"]
    assert c.auth_mechanism == ("Tls", "BasicAuth", "BasicAuthRequireTLS", "Integrated")


def test_internet_usage_fixes_ranges_to_all_ipv4() -> None:
    config = parse_text(
        '[[receive_connectors]]\nname = "I"\nusage = "Internet"\nbindings = ["0.0.0.0:25"]\n',
        "i.toml",
    )
    assert config.receive_connectors[0].relay_ranges_text == ["0.0.0.0-255.255.255.255"]


def test_exchange_defaults_on_minimal_connector() -> None:
    c = _connector('bindings = ["0.0.0.0:25"]\n')
    assert c.transport_role == "FrontendTransport"
    assert c.usage == "Custom"
    assert c.enabled is True
    assert c.fqdn is None and c.banner is None
    assert c.require_tls is False and c.require_ehlo_domain is False
    assert c.max_message_size == 37_748_736
    assert c.max_header_size == 262_144
    assert c.max_recipients_per_message == 200
    assert c.max_hop_count == 30
    assert c.max_local_hop_count == 8
    assert c.connection_timeout == timedelta(minutes=10)
    assert c.connection_inactivity_timeout == timedelta(minutes=5)
    assert c.max_inbound_connection == 5000
    assert c.max_inbound_connection_per_source == 20
    assert c.max_inbound_connection_percentage_per_source == 2
    assert c.max_protocol_errors == 5
    assert c.max_logon_failures == 3
    assert c.logon_failure_rate_limit == 6  # RelayGate's own: failed AUTH per minute per address
    assert c.message_rate_limit is None  # unlimited
    assert c.tarpit_interval == timedelta(seconds=5)
    assert c.auth_tarpit_interval == timedelta(seconds=5)
    assert c.protocol_logging_level == "None"
    assert c.enhanced_status_codes_enabled and c.pipelining_enabled and c.chunking_enabled
    assert (
        c.binary_mime_enabled
        and c.eight_bit_mime_enabled
        and c.delivery_status_notification_enabled
    )
    assert c.size_enabled == "Enabled"
    assert not c.reject_reserved_top_level_recipient_domains
    assert not c.reject_reserved_second_level_recipient_domains
    assert not c.reject_single_label_recipient_domains
    assert c.permissions == ()


def test_values_in_config_keys() -> None:
    c = _connector(
        'bindings = "0.0.0.0:25, [::]:25"\n'
        'max_message_size = "36 MB (37,748,736 bytes)"\n'
        'connection_timeout = "1.00:00:00"\n'
        'connection_inactivity_timeout = "0.00:00:05"\n'
        'max_inbound_connection = "unlimited"\n'
        'auth_mechanism = "Tls, BasicAuth"\n'
        'permission_groups = "anonymoususers"\n'  # enum values are case-insensitive, stored canonical
    )
    assert [str(b) for b in c.bindings] == ["0.0.0.0:25", "[::]:25"]
    assert c.max_message_size == 37_748_736
    assert c.connection_timeout == timedelta(days=1)
    assert c.connection_inactivity_timeout == timedelta(seconds=5)
    assert c.max_inbound_connection is None
    assert c.auth_mechanism == ("Tls", "BasicAuth")
    assert c.permission_groups == ("AnonymousUsers",)


def test_remote_ip_ranges_as_comma_separated_string() -> None:
    config = parse_text(
        '[[receive_connectors]]\nname = "C"\nbindings = ["0.0.0.0:25"]\n'
        'remote_ip_ranges = "10.0.0.0/24, 192.168.12.5,192.168.12.100-192.168.12.120, fe80::1%11, 2001:db8::/64"\n',
        "list.toml",
    )
    ranges = config.receive_connectors[0].relay_ranges_text
    assert ranges == [
        "10.0.0.0/24",
        "192.168.12.5",
        "192.168.12.100-192.168.12.120",
        "fe80::1%11",
        "2001:db8::/64",
    ]


def test_bad_value_names_key_and_connector() -> None:
    with pytest.raises(ConfigError) as info:
        _connector('bindings = ["0.0.0.0:25"]\nmax_message_size = "36 furlongs"\n')
    (problem,) = info.value.problems
    assert str(problem).startswith('seed.toml: receive_connectors[0] "C": max_message_size: ')


def test_logon_failure_rate_limit_can_be_unlimited() -> None:
    binding = 'bindings = ["0.0.0.0:587"]\n'
    c = _connector(binding + 'logon_failure_rate_limit = "unlimited"\n')
    assert c.logon_failure_rate_limit is None
    assert _connector(binding + "logon_failure_rate_limit = 20\n").logon_failure_rate_limit == 20
    assert c.logon_failure_ipv6_prefix_length == 64  # one IPv6 subnet counted as one client
    c = _connector(binding + "logon_failure_ipv6_prefix_length = 128\n")
    assert c.logon_failure_ipv6_prefix_length == 128


def test_a_fraction_of_a_second_is_shown_not_dropped() -> None:
    """`connector show` / `set` printed tarpit_interval = "00:00:00.5" as 00:00:00 (and a change
    from 00:00:05 to half a second as '00:00:05 → 00:00:00'): Exchange's form keeps the fraction."""
    for text, shown in (
        ("00:00:00.5", "00:00:00.5000000"),
        ("1.00:00:01.25", "1.00:00:01.2500000"),
        ("00:00:00.0000001", "00:00:00"),  # below a microsecond: what timedelta holds
    ):
        assert format_timespan(parse_timespan(text)) == shown
    assert parse_timespan(format_timespan(parse_timespan("00:00:00.5"))) == parse_timespan(
        "00:00:00.5"
    )
