"""Configuration: the TOML contract of DESIGN.md as frozen, validated dataclasses."""

from relaygate.config.loader import (
    ConfigError,
    Problem,
    default_config_path,
    load_config,
    parse_config,
    parse_text,
)
from relaygate.config.model import (
    AcceptedDomain,
    AdminConfig,
    Config,
    DkimKey,
    Permission,
    QueueConfig,
    ReceiveConnector,
    SendConnector,
    ServerConfig,
)
from relaygate.config.values import (
    Binding,
    IPRange,
    parse_binding,
    parse_ip_range,
    parse_size,
    parse_timespan,
)

__all__ = [
    "AcceptedDomain",
    "AdminConfig",
    "Binding",
    "Config",
    "ConfigError",
    "DkimKey",
    "IPRange",
    "Permission",
    "Problem",
    "QueueConfig",
    "ReceiveConnector",
    "SendConnector",
    "ServerConfig",
    "default_config_path",
    "load_config",
    "parse_binding",
    "parse_config",
    "parse_ip_range",
    "parse_size",
    "parse_text",
    "parse_timespan",
]
