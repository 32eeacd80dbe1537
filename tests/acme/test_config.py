"""[server] acme_* keys: defaults, and the errors `relaygate check` gives, naming the keys."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from relaygate.config import ConfigError, parse_text

BASE = """\
[server]
fqdn = "relay.corp.example"
data_dir = "{data}"
{extra}
"""


def problems(tmp_path: Path, extra: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_text(BASE.format(data=tmp_path, extra=extra), source="relaygate.toml")
    return [str(p) for p in info.value.problems]


def test_defaults_leave_acme_off_and_name_the_fqdn(tmp_path: Path) -> None:
    config = parse_text(BASE.format(data=tmp_path, extra=""), source="relaygate.toml")
    s = config.server
    assert s.acme_directory_url == "" and s.acme_domains == ()
    assert s.acme_http_listen == "0.0.0.0:80"
    assert s.acme_renew_before == timedelta(days=30)
    on = parse_text(
        BASE.format(data=tmp_path, extra='acme_directory_url = "https://ca.example/dir"'),
        source="relaygate.toml",
    )
    from relaygate.acme import acme_domains

    assert acme_domains(on.server) == ("relay.corp.example",)


def test_acme_with_a_certificate_file_is_an_error_naming_both_keys(tmp_path: Path) -> None:
    (text,) = problems(
        tmp_path,
        'acme_directory_url = "https://ca.example/dir"\n'
        f'tls_certificate_file = "{tmp_path}/c.pem"\ntls_key_file = "{tmp_path}/c.key"',
    )
    assert text.startswith("relaygate.toml: server.acme_directory_url: ")
    assert "server.acme_directory_url" in text and "server.tls_certificate_file" in text
    assert "not both" in text


@pytest.mark.parametrize(
    ("extra", "key", "expected"),
    [
        ('acme_directory_url = "http://ca.example/dir"', "acme_directory_url", "https://"),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_domains = ["*.corp.example"]',
            "acme_domains[0]",
            "wildcard",
        ),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_domains = ["relay"]',
            "acme_domains[0]",
            "not a fully qualified host name",
        ),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_http_listen = "80"',
            "acme_http_listen",
            "not a binding",
        ),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_email = "hostmaster"',
            "acme_email",
            "not an email address",
        ),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_ca_file = "/nonexistent/ca.pem"',
            "acme_ca_file",
            "is not a file",
        ),
        (
            'acme_directory_url = "https://ca.example/dir"\nacme_renew_before = "00:00:00"',
            "acme_renew_before",
            "greater than 0",
        ),
        ('acme_email = "it@corp.example"', "acme_email", "without server.acme_directory_url"),
    ],
)
def test_bad_acme_settings_name_the_key(
    tmp_path: Path, extra: str, key: str, expected: str
) -> None:
    (text,) = problems(tmp_path, extra)
    assert text.startswith(f"relaygate.toml: server.{key}: "), text
    assert expected in text, text


@pytest.mark.parametrize(
    ("extra", "other"),
    [
        (
            '[[receive_connectors]]\nname = "Web"\nbindings = ["0.0.0.0:80"]\n'
            'remote_ip_ranges = ["0.0.0.0/0"]',
            'receive connector "Web" (bindings[0], 0.0.0.0:80)',
        ),
        ('[admin]\nlisten = "127.0.0.1:80"', "admin.listen (127.0.0.1:80)"),
    ],
)
def test_a_challenge_responder_on_another_listeners_endpoint_is_refused(
    tmp_path: Path, extra: str, other: str
) -> None:
    # `check` said OK; then every order failed at run time (the responder cannot listen on
    # port 80 beside the other listener), and no certificate was ever obtained.
    (text,) = problems(tmp_path, f'acme_directory_url = "https://ca.example/dir"\n{extra}')
    assert text.startswith("relaygate.toml: server.acme_http_listen: "), text
    assert f"0.0.0.0:80 is where {other} listens" in text, text
