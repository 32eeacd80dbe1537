"""Connector selection (exchange-semantics.md §2): binding first, then the narrowest RemoteIPRanges entry."""

from __future__ import annotations

import pytest

from relaygate.config import Config, parse_text
from relaygate.policy.selection import select_connector

# Microsoft's example: three connectors on 0.0.0.0:25.
MICROSOFT_EXAMPLE = """
[[receive_connectors]]
name = "Catch-all"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["0.0.0.0-255.255.255.255"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors]]
name = "Subnet"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["192.168.1.0-192.168.1.255"]
permission_groups = ["AnonymousUsers"]

[[receive_connectors]]
name = "Single IP"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["192.168.1.75"]
permission_groups = ["AnonymousUsers"]
"""


def _config(text: str) -> Config:
    return parse_text(text, "selection.toml")


def _pick(config: Config, client: str, local: str = "10.0.0.1", port: int = 25) -> str | None:
    selection = select_connector(
        config.receive_connectors, local_ip=local, local_port=port, client_ip=client
    )
    return selection.connector.name if selection.connector else None


@pytest.mark.parametrize(
    ("client", "expected", "matched"),
    [
        ("192.168.1.75", "Single IP", "192.168.1.75"),
        ("192.168.1.100", "Subnet", "192.168.1.0-192.168.1.255"),
        ("10.0.0.1", "Catch-all", "0.0.0.0-255.255.255.255"),
        ("::ffff:192.168.1.75", "Single IP", "192.168.1.75"),  # IPv4-mapped: matched as IPv4
        ("::ffff:192.168.1.100", "Subnet", "192.168.1.0-192.168.1.255"),
    ],
)
def test_microsoft_selection_example(client: str, expected: str, matched: str) -> None:
    config = _config(MICROSOFT_EXAMPLE)
    selection = select_connector(
        config.receive_connectors, local_ip="10.0.0.1", local_port=25, client_ip=client
    )
    assert selection.connector is not None
    assert selection.connector.name == expected
    assert selection.matched_range is not None and selection.matched_range.text == matched
    assert str(selection.binding) == "0.0.0.0:25"


def test_order_in_file_does_not_matter() -> None:
    blocks = MICROSOFT_EXAMPLE.strip().split("\n\n")
    reversed_config = _config("\n\n".join(reversed(blocks)))
    assert _pick(reversed_config, "192.168.1.75") == "Single IP"
    assert _pick(reversed_config, "192.168.1.100") == "Subnet"
    assert _pick(reversed_config, "172.16.0.1") == "Catch-all"


def test_beaten_connectors_are_reported_with_reasons() -> None:
    selection = select_connector(
        _config(MICROSOFT_EXAMPLE).receive_connectors,
        local_ip="10.0.0.1",
        local_port=25,
        client_ip="192.168.1.75",
    )
    beaten = {c.connector.name: c.reason for c in selection.beaten}
    assert set(beaten) == {"Subnet", "Catch-all"}
    assert beaten["Subnet"] == "range 192.168.1.0-192.168.1.255 is wider than 192.168.1.75"
    assert "narrowest matching RemoteIPRanges entry 192.168.1.75" in selection.reason


def test_exact_binding_beats_wildcard() -> None:
    config = _config(
        MICROSOFT_EXAMPLE
        + """
[[receive_connectors]]
name = "On 10.0.0.1"
bindings = ["10.0.0.1:25"]
remote_ip_ranges = ["0.0.0.0-255.255.255.255"]
"""
    )
    # Local address 10.0.0.1: the connector bound to it wins even against the single-IP one.
    selection = select_connector(
        config.receive_connectors, local_ip="10.0.0.1", local_port=25, client_ip="192.168.1.75"
    )
    assert selection.connector is not None and selection.connector.name == "On 10.0.0.1"
    assert str(selection.binding) == "10.0.0.1:25"
    why = {c.connector.name: c.reason for c in selection.beaten}
    assert (
        why["Single IP"] == "binding 0.0.0.0:25 is a wildcard; On 10.0.0.1 is bound to 10.0.0.1:25"
    )
    # Another local address on the same port: back to the wildcard connectors.
    assert _pick(config, "192.168.1.75", local="10.0.0.2") == "Single IP"


def test_disabled_connector_is_ignored() -> None:
    text = MICROSOFT_EXAMPLE.replace('name = "Single IP"', 'name = "Single IP"\nenabled = false')
    config = _config(text)
    selection = select_connector(
        config.receive_connectors, local_ip="10.0.0.1", local_port=25, client_ip="192.168.1.75"
    )
    assert selection.connector is not None and selection.connector.name == "Subnet"
    assert [(c.connector.name, c.reason) for c in selection.rejected] == [("Single IP", "disabled")]


def test_no_match_is_none() -> None:
    config = _config(
        """
[[receive_connectors]]
name = "Printers"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/24"]
"""
    )
    selection = select_connector(
        config.receive_connectors, local_ip="10.9.9.9", local_port=25, client_ip="10.0.1.1"
    )
    assert (
        selection.connector is None
        and selection.binding is None
        and selection.matched_range is None
    )
    assert selection.rejected[0].reason == "RemoteIPRanges do not contain 10.0.1.1"
    assert "no enabled connector" in selection.reason
    assert (
        select_connector((), local_ip="10.9.9.9", local_port=25, client_ip="10.0.0.1").connector
        is None
    )


def test_different_port_is_not_that_connector() -> None:
    config = _config(
        MICROSOFT_EXAMPLE
        + """
[[receive_connectors]]
name = "Submission"
bindings = ["0.0.0.0:587"]
remote_ip_ranges = ["192.168.1.75"]
"""
    )
    assert _pick(config, "192.168.1.75", port=587) == "Submission"
    assert _pick(config, "192.168.1.100", port=587) is None
    assert _pick(config, "192.168.1.75", port=25) == "Single IP"
    assert _pick(config, "192.168.1.75", port=2525) is None


def test_same_port_other_interface_is_not_that_connector() -> None:
    # security-bar §1C item 45: bound to the internal interface only.
    config = _config(
        """
[[receive_connectors]]
name = "Internal NIC"
bindings = ["10.0.0.1:25"]
remote_ip_ranges = ["0.0.0.0-255.255.255.255"]
"""
    )
    assert _pick(config, "10.0.0.50", local="10.0.0.1") == "Internal NIC"
    assert _pick(config, "10.0.0.50", local="203.0.113.1") is None


def test_ipv6_cidr_and_zone_ids() -> None:
    config = _config(
        """
[[receive_connectors]]
name = "All IPv6"
bindings = ["[::]:25"]
remote_ip_ranges = ["::-ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"]

[[receive_connectors]]
name = "IPv6 apps"
bindings = ["[::]:25"]
remote_ip_ranges = ["2001:db8:0:10::/64", "fe80::1%11"]
"""
    )
    assert _pick(config, "2001:db8:0:10::25", local="2001:db8::1") == "IPv6 apps"
    assert _pick(config, "2001:db8:0:11::25", local="2001:db8::1") == "All IPv6"
    assert (
        _pick(config, "fe80::1%eth0", local="fe80::2%eth0") == "IPv6 apps"
    )  # zone id: parsed, no crash
    # An IPv4 client on the dual-stack [::] listener is matched against IPv4 ranges only.
    assert _pick(config, "::ffff:10.0.0.1", local="::ffff:10.0.0.2") is None


def test_ipv4_mapped_client_on_dual_stack_listener() -> None:
    config = _config(MICROSOFT_EXAMPLE.replace('"0.0.0.0:25"', '"[::]:25"'))
    assert _pick(config, "::ffff:192.168.1.75", local="::") == "Single IP"
    assert _pick(config, "::ffff:192.168.1.100", local="::ffff:10.0.0.1") == "Subnet"


def test_loopback_is_not_implicitly_trusted() -> None:
    # security-bar §1C item 46
    config = _config(
        """
[[receive_connectors]]
name = "Printers"
bindings = ["0.0.0.0:25"]
remote_ip_ranges = ["10.0.0.0/24"]
"""
    )
    assert _pick(config, "127.0.0.1", local="127.0.0.1") is None
