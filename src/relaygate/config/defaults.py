"""The embedded default: what `relaygate serve` runs with no config file.

Safe by construction: SMTP on 127.0.0.1:2525 relaying for loopback clients only, the admin centre on
127.0.0.1:8025, DNS (MX) delivery, and the SQLite queue under ./relaygate-data.
"""

from __future__ import annotations

from relaygate.config.loader import parse_config
from relaygate.config.model import Config

EMBEDDED_DEFAULT_TOML = """\
[server]
data_dir = "./relaygate-data"

[admin]
listen = "127.0.0.1:8025"

[[receive_connectors]]
name = "Default Loopback Relay"
usage = "Custom"
bindings = ["127.0.0.1:2525"]
remote_ip_ranges = ["127.0.0.0/8", "::1"]
auth_mechanism = ["Tls"]
permission_groups = ["AnonymousUsers"]
protocol_logging_level = "Verbose"
max_message_size = "25MB"

[[receive_connectors.permissions]]
user = "NT AUTHORITY\\\\ANONYMOUS LOGON"
extended_rights = ["ms-Exch-SMTP-Accept-Any-Recipient"]

[[send_connectors]]
name = "Default Outbound (MX)"
address_spaces = ["*"]
dns_routing_enabled = true
"""


def embedded_default() -> Config:
    import tomllib

    return parse_config(tomllib.loads(EMBEDDED_DEFAULT_TOML), "<embedded default>")
