"""Every validation error of issue 2 (Deliver item 3), each naming the file, the connector and the key.

Each `configs/bad/*.toml` starts with three comment lines giving the connector, the key and a substring of
the expected message; the file must produce exactly that one problem. `configs/good/*.toml` must load.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from relaygate.config import ConfigError, load_config, parse_text

CONFIGS = Path(__file__).parent / "configs"
BAD = sorted((CONFIGS / "bad").glob("*.toml"))
GOOD = sorted((CONFIGS / "good").glob("*.toml"))


def _expectations(path: Path) -> tuple[str, str, str]:
    header: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines()[:3]:
        key, _, value = line.removeprefix("# ").partition(": ")
        header[key] = value
    return header["expect-connector"], header["expect-key"], header["expect"]


def _problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    for problem in info.value.problems:
        assert problem.source == str(path)
    return [str(p) for p in info.value.problems]


def test_fixture_sets_are_not_empty() -> None:
    assert len(BAD) >= 20 and len(GOOD) >= 3


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_bad_config_gives_exactly_its_error(path: Path) -> None:
    connector, key, expected = _expectations(path)
    problems = _problems(path)
    assert len(problems) == 1, problems
    (text,) = problems
    # file, connector and key, in the form `FILE: receive_connectors[i] "NAME": KEY: message`
    assert text.startswith(f"{path}: receive_connectors["), text
    assert f'"{connector}": {key}: ' in text, text
    assert expected in text, text


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.stem)
def test_good_config_loads(path: Path) -> None:
    config = load_config(path)
    assert config.receive_connectors
    assert config.source == str(path)


def test_all_errors_are_reported_at_once() -> None:
    path = CONFIGS / "five_errors.toml"
    problems = _problems(path)
    assert len(problems) == 5, problems
    expected = [
        ('"Printers": remote_ip_range: ', "did you mean 'remote_ip_ranges'"),
        ('"Scanners": remote_ip_ranges[0]: ', "reversed range"),
        (
            '"ERP": auth_mechanism: ',
            "ExternalAuthoritative requires permission_groups to include 'ExchangeServers'",
        ),
        ('"Monitoring": connection_timeout: ', "00:01:00 is not above 00:05:00"),
        ('"Backup": remote_ip_ranges: ', 'partially overlaps 10.0.0.0/24 of connector "Printers"'),
    ]
    for (where, what), text in zip(expected, problems, strict=True):
        assert text.startswith(str(path)) and where in text and what in text, text


def test_index_names_the_connector_in_the_file_even_after_a_broken_one() -> None:
    # The first connector cannot be built (no name); the second must still be receive_connectors[1].
    text = (
        '[[receive_connectors]]\nbindings = ["0.0.0.0:25"]\nremote_ip_ranges = ["10.0.0.1"]\n'
        '[[receive_connectors]]\nname = "B"\nbindings = ["0.0.0.0:25"]\nremote_ip_ranges = ["10.0.1.0/24"]\n'
        'connection_timeout = "00:01:00"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_text(text, "idx.toml")
    lines = [str(p) for p in info.value.problems]
    assert lines == [
        "idx.toml: receive_connectors[0].name: is required",
        'idx.toml: receive_connectors[1] "B": connection_timeout: must be greater than '
        "connection_inactivity_timeout (00:01:00 is not above 00:05:00)",
    ]


def test_bad_entries_do_not_cascade_into_is_required() -> None:
    text = '[[receive_connectors]]\nname = "R"\nbindings = ["0.0.0.0:99999"]\nremote_ip_ranges = ["10.0.0.256"]\n'
    with pytest.raises(ConfigError) as info:
        parse_text(text, "c.toml")
    assert [p.path for p in info.value.problems] == [
        "receive_connectors[0].bindings[0]",
        "receive_connectors[0].remote_ip_ranges[0]",
    ]


def test_missing_bindings_and_ranges_are_required() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text('[[receive_connectors]]\nname = "R"\nbindings = []\n', "r.toml")
    texts = [str(p) for p in info.value.problems]
    assert any('"R": bindings: is required' in t for t in texts), texts
    assert any('"R": remote_ip_ranges: is required' in t for t in texts), texts


def test_nested_ranges_on_one_binding_are_allowed() -> None:
    config = load_config(CONFIGS / "good" / "nested_ranges.toml")
    assert [c.name for c in config.receive_connectors] == ["Default Frontend", "Subnet", "Single"]


def test_unknown_section_and_toml_syntax_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text("[recieve_connectors]\n", "s.toml")
    assert (
        str(info.value.problems[0])
        == "s.toml: recieve_connectors: unknown section (did you mean 'receive_connectors'?)"
    )
    with pytest.raises(ConfigError) as info:
        parse_text("[server\n", "t.toml")
    assert str(info.value.problems[0]).startswith("t.toml: (syntax): not valid TOML")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "missing.toml")
    assert "cannot read" in str(info.value)


def test_a_directory_or_a_non_utf8_file_is_a_config_error_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: (file): cannot read")
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes('[server]\nname = "R\u00e9LAY"\n'.encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(latin1)
    assert str(info.value).startswith(f"{latin1}: (file): not UTF-8")


def test_a_utf8_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    """Windows Notepad writes one at the start of a UTF-8 file."""
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbf" + b'[server]\nname = "RELAY01"\nfqdn = "r.example"\n')
    assert load_config(path).server.name == "RELAY01"


def test_embedded_default_is_valid_and_loopback_only() -> None:
    from relaygate.config.defaults import embedded_default

    config = embedded_default()
    (connector,) = config.receive_connectors
    assert [str(b) for b in connector.bindings] == ["127.0.0.1:2525"]
    assert connector.relay_ranges_text == ["127.0.0.0/8", "::1"]


@pytest.mark.parametrize(
    ("url_line", "expected"),
    [
        ("", 'pg.toml: queue.database_url: required with store = "postgresql"'),
        ('database_url = "  "\n', "pg.toml: queue.database_url: required with store"),
        ('database_url = "mysql://relay@db/relay"\n', "queue.database_url: must start with"),
        ('database_url = "host=db port"\n', "queue.database_url: not a valid PostgreSQL URL"),
    ],
)
def test_the_postgresql_store_needs_a_valid_database_url(url_line: str, expected: str) -> None:
    """`store = "postgresql"` without a usable `database_url` is refused by `check`, naming it."""
    with pytest.raises(ConfigError) as info:
        parse_text(f'[queue]\nstore = "postgresql"\n{url_line}', "pg.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert expected in problem, problem


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://relaygate:Tr0ub4dor%&3@db.corp.example/relaygate",  # a bare % in it
        "postgresql://relaygate:Tr0ub4dor 3@db.corp.example/relaygate",  # a space in it
        "postgresql://relaygate:Tr0ub4dor3@[fd00::5/relaygate",  # a typo elsewhere
    ],
)
def test_an_invalid_database_url_is_refused_without_echoing_its_password(url: str) -> None:
    """libpq's reason quotes the part of the URL it cannot parse, which may be the password:
    `check` prints the problem and `serve` or a refused reload logs it."""
    with pytest.raises(ConfigError) as info:
        parse_text(f'[queue]\nstore = "postgresql"\ndatabase_url = "{url}"\n', "pg.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert "queue.database_url: not a valid PostgreSQL URL: " in problem, problem
    assert "Tr0ub4dor" not in problem, problem


def test_a_lease_shorter_than_three_seconds_is_refused() -> None:
    with pytest.raises(ConfigError) as info:
        parse_text('[queue]\nlease_duration = "00:00:02"\n', "q.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert problem.startswith("q.toml: queue.lease_duration: must be at least"), problem
    assert parse_text('[queue]\nlease_duration = "00:00:03"\n', "q.toml").queue.lease_duration


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("not an address", "'not an address' is not a mail address (name@domain): "),
        ("it@corp@example", "'it@corp@example' is not a mail address (name@domain): "),
        ("postmaster", "'postmaster' is not a mail address (name@domain): address has no domain"),
    ],
)
def test_relaygate_check_refuses_a_bad_admin_notification_address(
    tmp_path: Path, value: str, why: str
) -> None:
    """The copies of NDRs (and the postmaster address) go to queue.admin_notification_address: a
    value that is no address is refused by `check`, naming the key, not found out by the NDRs."""
    path = tmp_path / "relaygate.toml"
    path.write_text(f'[queue]\nadmin_notification_address = "{value}"\n', encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert f"{path}: queue.admin_notification_address: {why}" in out, out
    assert "Traceback" not in out, out
    good = '[queue]\nadmin_notification_address = " it@corp.example "\n'
    assert parse_text(good, "q.toml").queue.admin_notification_address.strip() == "it@corp.example"


def test_serve_names_an_unreachable_queue_database_without_its_password(tmp_path: Path) -> None:
    """`check` accepts a well-formed URL (it does not connect); `serve` cannot reach the
    database: it stops with the reason and the URL, its password left out, not a traceback."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "pg.toml"
    config.write_text(
        f'[server]\ndata_dir = "{tmp_path / "data"}"\n'
        f'[queue]\nstore = "postgresql"\n'
        f'database_url = "postgresql://relay:s3cret@127.0.0.1:{port}/relay?connect_timeout=2"\n',
        encoding="utf-8",
    )
    check = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "relaygate", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert f"cannot connect to the queue database postgresql://relay@127.0.0.1:{port}/relay" in out
    assert "s3cret" not in out, out
    assert "Traceback" not in out, out


@pytest.mark.parametrize(
    "key",
    [
        "receive_protocol_log_max_file_size",
        "receive_protocol_log_max_directory_size",
        "message_tracking_log_max_file_size",
        "message_tracking_log_max_directory_size",
    ],
)
def test_a_zero_log_size_is_refused_naming_the_key(key: str) -> None:
    """`serve` cannot open a log with a size of 0: `check` (and a reload) refuse it, by key."""
    with pytest.raises(ConfigError) as info:
        parse_text(f"[server]\n{key} = 0\n", "s.toml")
    assert [str(p) for p in info.value.problems] == [
        f"s.toml: server.{key}: must be greater than 0"
    ]


_SEND = """
[[send_connectors]]
name = "Out"
address_spaces = ["*"]
dns_routing_enabled = false
smart_hosts = [{hosts}]
"""


@pytest.mark.parametrize(
    "host",
    [
        "smtp.office365.com",
        "relay.corp.example:587",
        "smarthost01.",
        "10.10.10.100",
        "10.10.10.100:2525",
        "[10.10.10.100]",
        "[10.10.10.100]:25",
        "[2001:db8::25]",
        "[IPv6:2001:db8::25]:587",
        "2001:db8::25",
        "mail_gw.corp.example",
    ],
)
def test_smart_host_forms_are_accepted(host: str) -> None:
    config = parse_text(_SEND.format(hosts=f'"{host}"'), "s.toml")
    assert config.send_connectors[0].smart_hosts == (host,)


@pytest.mark.parametrize(
    "host",
    [
        "bad host!",
        "smtp.corp.example:0",
        "smtp.corp.example:70000",
        "smtp.corp.example:x",
        "[smtp.corp.example]",
        "[10.0.0.1",
        "[10.0.0.1]25",
        "2001:db8::zz",
        "-smtp.corp.example",
        "smtp..corp.example",
        "",
    ],
)
def test_a_malformed_smart_host_is_refused_naming_connector_and_key(host: str) -> None:
    """`relaygate send-connector set Out --smart-hosts 'bad host!'` must not pass `check`."""
    with pytest.raises(ConfigError) as info:
        parse_text(_SEND.format(hosts=f'"10.0.0.9", "{host}"'), "s.toml")
    (problem,) = info.value.problems
    assert str(problem).startswith('s.toml: send_connectors[0] "Out": smart_hosts[1]: '), problem


@pytest.mark.parametrize("key", ["max_messages_per_minute", "max_recipients_per_day"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", "must be at least 1 (or 'unlimited' for no limit)"),
        ("-1", "must not be negative, got -1"),
        ("2.5", "expected a whole number, got 2.5"),
        ('"thirty"', "expected a whole number, got 'thirty'"),
        ("true", "expected a whole number, got True"),
    ],
)
def test_a_bad_pacing_limit_is_refused_naming_connector_and_key(
    key: str, value: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(_SEND.format(hosts='"10.0.0.9"') + f"{key} = {value}\n", "s.toml")
    assert [str(p) for p in info.value.problems] == [
        f's.toml: send_connectors[0] "Out": {key}: {expected}'
    ]


def test_pacing_limits_default_to_unlimited_and_take_numbers_or_unlimited() -> None:
    (out,) = parse_text(_SEND.format(hosts='"10.0.0.9"'), "s.toml").send_connectors
    assert (out.max_messages_per_minute, out.max_recipients_per_day) == (None, None)
    text = _SEND.format(hosts='"10.0.0.9"')
    (out,) = parse_text(
        text + 'max_messages_per_minute = 30\nmax_recipients_per_day = "Unlimited"\n', "s.toml"
    ).send_connectors
    assert (out.max_messages_per_minute, out.max_recipients_per_day) == (30, None)
    (out,) = parse_text(text + "max_recipients_per_day = 10000\n", "s.toml").send_connectors
    assert (out.max_messages_per_minute, out.max_recipients_per_day) == (None, 10000)


def test_relaygate_check_refuses_bad_pacing_limits(tmp_path: Path) -> None:
    """The real command: exit 1, every bad value listed with its connector and key."""
    path = tmp_path / "relaygate.toml"
    path.write_text(
        _SEND.format(hosts='"smtp.office365.com"')
        + "max_messages_per_minute = 0\nmax_recipients_per_day = -10\n"
        + '\n[[send_connectors]]\nname = "Second"\naddress_spaces = ["x.example"]\n'
        + "max_messages_per_minute = 1.5\nmax_recipients_per_day = 10000\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert (
        f'{path}: send_connectors[0] "Out": max_messages_per_minute: must be at least 1' in out
    ), out
    assert f'{path}: send_connectors[0] "Out": max_recipients_per_day: must not be negative' in out
    assert (
        f'{path}: send_connectors[1] "Second": max_messages_per_minute: expected a whole number'
        in out
    ), out
    assert "3 error(s)" in out, out


_SPILL = (
    _SEND.format(hosts='"10.0.0.9"')
    + "max_recipients_per_day = 10000\n{overflow}"
    + '\n[[send_connectors]]\nname = "ESP"\naddress_spaces = ["esp.example"]\n'
    + "{esp}"
)


def test_overflow_connector_names_another_send_connector_any_case() -> None:
    config = parse_text(_SPILL.format(overflow='overflow_connector = "esp"\n', esp=""), "s.toml")
    assert config.send_connectors[0].overflow_connector == "esp"
    assert config.send_connectors[1].overflow_connector == ""  # the default: none
    # A disabled one is accepted (skipped while disabled; `relaygate audit` says so).
    parse_text(
        _SPILL.format(overflow='overflow_connector = "ESP"\n', esp="enabled = false\n"), "s.toml"
    )


@pytest.mark.parametrize(
    ("overflow", "expected"),
    [
        (
            "Backup",
            "s.toml: send_connectors[0] \"Out\": overflow_connector: 'Backup' is not a send "
            "connector (send connectors: 'ESP')",
        ),
        (
            "out",
            's.toml: send_connectors[0] "Out": overflow_connector: names the connector itself; '
            "name another send connector",
        ),
    ],
)
def test_a_bad_overflow_connector_is_refused_naming_connector_and_key(
    overflow: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(_SPILL.format(overflow=f'overflow_connector = "{overflow}"\n', esp=""), "s.toml")
    assert [str(p) for p in info.value.problems] == [expected]


def test_relaygate_check_refuses_an_unknown_overflow_connector(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.toml"
    path.write_text(
        _SPILL.format(overflow="", esp='overflow_connector = "Second route"\n'), encoding="utf-8"
    )
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert (
        f"{path}: send_connectors[1] \"ESP\": overflow_connector: 'Second route' is not a send "
        "connector" in out
    ), out


def test_the_postgresql_queue_refuses_a_max_message_size_it_cannot_store() -> None:
    """PostgreSQL keeps a value of at most 1 GB: with a max_message_size above it (the config
    allows 2 GB) such a message would be received whole, then refused at its submit (a 451),
    and sent again by its client for ever; `check` says so by connector and key."""
    base = (
        '[queue]\nstore = "postgresql"\ndatabase_url = "postgresql://relay@db/q"\n'
        '[[receive_connectors]]\nname = "Scans"\nbindings = ["0.0.0.0:25"]\n'
        'remote_ip_ranges = ["10.0.0.5"]\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_text(base + 'max_message_size = "1024MB"\n', "pg.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert 'receive_connectors[0] "Scans": max_message_size: at most 1023MB' in problem, problem
    assert parse_text(base + 'max_message_size = "1023MB"\n', "pg.toml")
    sqlite = base.replace('store = "postgresql"', 'store = "sqlite"')
    assert parse_text(sqlite + 'max_message_size = "2000MB"\n', "s.toml")


# --------------------------------------------------------------------------------------------------
# tls_certificate_file / tls_key_file, ignore_starttls, force_helo, smtp_max_messages_per_connection,
# source_ip_address (Exchange's TlsCertificateName, IgnoreSTARTTLS, ForceHELO,
# SmtpMaxMessagesPerConnection, SourceIPAddress)


def test_the_send_connector_smtp_options_default_as_in_exchange() -> None:
    (out,) = parse_text(_SEND.format(hosts='"10.0.0.9"'), "s.toml").send_connectors
    assert (out.tls_certificate_file, out.tls_key_file) == (None, None)
    assert (out.ignore_starttls, out.force_helo) == (False, False)
    assert out.smtp_max_messages_per_connection == 20
    assert out.source_ip_address is None
    assert out.connect_timeout == timedelta(seconds=30)  # Postfix's smtp_connect_timeout
    assert out.greeting_timeout == timedelta(minutes=5)  # Postfix's smtp_helo_timeout
    (out,) = parse_text(
        _SEND.format(hosts='"10.0.0.9"')
        + 'tls_certificate_file = "relay.crt"\ntls_key_file = "relay.key"\n'
        + "ignore_starttls = true\nforce_helo = true\nsmtp_max_messages_per_connection = 3\n"
        + 'source_ip_address = "2001:db8::25"\n',
        "s.toml",
    ).send_connectors
    assert out.tls_certificate_file == Path("relay.crt") and out.tls_key_file == Path("relay.key")
    assert out.ignore_starttls and out.force_helo
    assert out.smtp_max_messages_per_connection == 3
    assert out.source_ip_address == "2001:db8::25"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (
            'tls_certificate_file = "relay.crt"',
            "tls_certificate_file: set both tls_certificate_file and tls_key_file, or neither",
        ),
        (
            'tls_key_file = "relay.key"',
            "tls_certificate_file: set both tls_certificate_file and tls_key_file, or neither",
        ),
        (
            "ignore_starttls = true\nrequire_tls = true",
            "ignore_starttls: cannot be true with require_tls = true, which requires TLS",
        ),
        (
            'ignore_starttls = true\nsmart_host_auth_mechanism = "BasicAuthRequireTLS"\n'
            'auth_username = "u"\nauth_password_env = "P"',
            "ignore_starttls: cannot be true with smart_host_auth_mechanism = "
            "'BasicAuthRequireTLS', which requires TLS",
        ),
        (
            "force_helo = true\nrequire_tls = true",
            "force_helo: cannot be true with require_tls = true, which requires TLS",
        ),
        (
            'force_helo = true\nsmart_host_auth_mechanism = "BasicAuth"\n'
            'auth_username = "u"\nauth_password_env = "P"',
            "force_helo: cannot be true with smart_host_auth_mechanism = 'BasicAuth': AUTH is",
        ),
        ("smtp_max_messages_per_connection = 0", "smtp_max_messages_per_connection: must be 1-"),
        (
            "smtp_max_messages_per_connection = 100000",
            "smtp_max_messages_per_connection: must be 1-10,000",
        ),
        (
            'source_ip_address = "10.0.0.300"',
            "source_ip_address: '10.0.0.300' is not an IPv4 or IPv6 address",
        ),
        (
            'source_ip_address = "relay.corp.example"',
            "source_ip_address: 'relay.corp.example' is not an IPv4 or IPv6 address",
        ),
        ('connect_timeout = "00:00:00"', "connect_timeout: must be between 00:00:01 and"),
        ('greeting_timeout = "2.00:00:00"', "greeting_timeout: must be between 00:00:01 and"),
    ],
)
def test_bad_send_connector_smtp_options_are_refused_naming_connector_and_key(
    lines: str, expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_text(_SEND.format(hosts='"10.0.0.9"') + lines + "\n", "s.toml")
    problems = [str(p) for p in info.value.problems]
    assert len(problems) == 1, problems
    assert problems[0].startswith(f's.toml: send_connectors[0] "Out": {expected}'), problems


def test_ignore_starttls_and_force_helo_are_accepted_with_implicit_tls() -> None:
    parse_text(
        _SEND.format(hosts='"10.0.0.9"')
        + "implicit_tls = true\nrequire_tls = true\nignore_starttls = true\nforce_helo = true\n",
        "s.toml",
    )


def test_relaygate_check_names_an_unreadable_client_certificate(tmp_path: Path) -> None:
    path = tmp_path / "relaygate.toml"
    key = tmp_path / "relay.key"
    key.write_text("not a key", encoding="utf-8")
    path.write_text(
        _SEND.format(hosts='"10.0.0.9"')
        + f"tls_certificate_file = '{tmp_path / 'missing.crt'}'\ntls_key_file = '{key}'\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    assert (
        f'{path}: send_connectors[0] "Out": tls_certificate_file: {tmp_path / "missing.crt"}: '
        "cannot read" in out
    ), out
    (tmp_path / "missing.crt").write_text("not a certificate", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "tls_certificate_file" in out and "cannot be loaded" in out, out


def test_metrics_require_token_without_an_api_token_file_is_an_error(tmp_path: Path) -> None:
    """`admin.metrics_require_token = true` asks /metrics for the API token: without
    `admin.api_token_file` there is none, and the error names both keys (`check` and the real
    command, text and --json)."""
    base = '[server]\nname = "RELAY01"\n\n[admin]\nlisten = "127.0.0.1:8025"\n'
    with pytest.raises(ConfigError) as info:
        parse_text(base + "metrics_require_token = true\n", "m.toml")
    (problem,) = info.value.problems
    assert problem.path == "admin.metrics_require_token"
    assert "admin.api_token_file" in problem.message
    assert str(problem).startswith("m.toml: admin.metrics_require_token: ")
    # an empty api_token_file is unset: the same error
    with pytest.raises(ConfigError):
        parse_text(base + 'api_token_file = ""\nmetrics_require_token = true\n', "m.toml")
    with pytest.raises(ConfigError) as wrong_type:
        parse_text(base + 'metrics_require_token = "yes"\n', "m.toml")
    assert wrong_type.value.problems[0].path == "admin.metrics_require_token"
    token = tmp_path / "token"
    token.write_text("s3cret\n", encoding="utf-8")
    ok = parse_text(base + f'api_token_file = "{token}"\nmetrics_require_token = true\n', "m.toml")
    assert ok.admin.metrics_require_token is True
    assert parse_text(base, "m.toml").admin.metrics_require_token is False  # the default

    path = tmp_path / "relaygate.toml"
    path.write_text(base + "metrics_require_token = true\n", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    errors = json.loads(done.stdout)["errors"]
    assert [e["path"] for e in errors] == ["admin.metrics_require_token"], errors
    assert "admin.api_token_file" in errors[0]["message"]


@pytest.mark.parametrize("value", ["0", '"0"', '"0KB"', '"0.1B"'])
def test_a_send_connector_max_message_size_of_zero_is_refused(value: str) -> None:
    """0 is Postfix's "no limit" (message_size_limit = 0); here every message routed through the
    connector was too big and got an NDR, and `check` said OK."""
    with pytest.raises(ConfigError) as info:
        parse_text(_SEND.format(hosts='"10.0.0.9"') + f"max_message_size = {value}\n", "s.toml")
    assert [str(p) for p in info.value.problems] == [
        's.toml: send_connectors[0] "Out": max_message_size: 0 bytes would refuse every message '
        "(each would get an NDR); give a size such as '35MB', or 'unlimited' for no limit"
    ]
    for good, size in (('"unlimited"', None), ('"10MB"', 10 * 1024**2), ("1", 1)):
        text = _SEND.format(hosts='"10.0.0.9"') + f"max_message_size = {good}\n"
        assert parse_text(text, "s.toml").send_connectors[0].max_message_size == size


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (
            "message_expiration_timeout",
            "must be greater than 00:00:00, which expires every message before its first "
            "delivery attempt (each gets an NDR); Exchange's default is 2.00:00:00",
        ),
        (
            "transient_failure_retry_interval",
            "must be greater than 00:00:00, which retries a failing destination without pause",
        ),
        (
            "message_retry_interval",
            "must be greater than 00:00:00, which retries a failing destination without pause",
        ),
    ],
)
@pytest.mark.parametrize("zero", ['"00:00:00"', "0", '"0.00:00:00.0"'])
def test_a_zero_queue_timing_is_refused_naming_the_key(key: str, expected: str, zero: str) -> None:
    """Written as "no expiry" or "no wait", 00:00:00 NDR'd every message unsent (the expiry is
    checked before the first attempt) or retried a dead smart host in a loop; `check` said OK."""
    with pytest.raises(ConfigError) as info:
        parse_text(f"[queue]\n{key} = {zero}\n", "q.toml")
    assert [str(p) for p in info.value.problems] == [f"q.toml: queue.{key}: {expected}"]
    assert parse_text(f'[queue]\n{key} = "00:00:01"\n', "q.toml")


def test_a_zero_transient_interval_is_accepted_when_no_transient_retry_is_made() -> None:
    """With transient_failure_retry_count = 0 (Exchange's "no fast retries", 0-15) the transient
    interval is never waited (every retry is message_retry_interval apart): a file that gave it
    00:00:00 too, as "none", worked and was refused after the zero-timing rule, so serve and a
    reload stopped on a harmless key."""
    text = '[queue]\ntransient_failure_retry_count = 0\ntransient_failure_retry_interval = "00:00:00"\n'
    config = parse_text(text, "q.toml")
    assert config.queue.transient_failure_retry_count == 0
    with pytest.raises(ConfigError) as info:  # with fast retries, still refused
        parse_text(text.replace("count = 0", "count = 1"), "q.toml")
    assert [p.path for p in info.value.problems] == ["queue.transient_failure_retry_interval"]


_ON_THE_ADMIN_PORT = """
[admin]
listen = "127.0.0.1:8025"

[[receive_connectors]]
name = "Submission"
bindings = ["0.0.0.0:587", "{binding}"]
remote_ip_ranges = ["10.0.0.0/24"]
{extra}
"""


@pytest.mark.parametrize("binding", ["127.0.0.1:8025", "0.0.0.0:8025", "[::]:8025"])
def test_a_receive_connector_on_the_admin_listener_endpoint_is_refused(binding: str) -> None:
    """`check` said OK and `serve` then stopped with 'cannot listen on admin.listen ...:
    Address already in use' (or, on a reload, refused the new binding)."""
    with pytest.raises(ConfigError) as info:
        parse_text(_ON_THE_ADMIN_PORT.format(binding=binding, extra=""), "a.toml")
    assert [str(p) for p in info.value.problems] == [
        f'a.toml: receive_connectors[0] "Submission": bindings[1]: {binding} is where admin.listen '
        "(127.0.0.1:8025) has the admin centre listen: the two cannot share it; give the "
        "connector or admin.listen another port"
    ]


@pytest.mark.parametrize("extra", ["enabled = false", "[admin]\nenabled = false"])
def test_the_admin_endpoint_is_free_for_a_disabled_connector_or_admin_centre(extra: str) -> None:
    text = _ON_THE_ADMIN_PORT.format(binding="127.0.0.1:8025", extra="")
    if extra.startswith("[admin]"):
        text = text.replace(
            'listen = "127.0.0.1:8025"', 'listen = "127.0.0.1:8025"\nenabled = false'
        )
    else:
        text += extra + "\n"
    assert parse_text(text, "a.toml").receive_connectors[0].bindings[1].port == 8025
    other = _ON_THE_ADMIN_PORT.format(binding="127.0.0.2:8025", extra="")  # another address
    assert parse_text(other, "a.toml")


def test_a_path_with_a_nul_character_is_refused_naming_the_key(tmp_path: Path) -> None:
    """TOML can spell a NUL ("\\u0000"); no path holds one. `check` stopped with a traceback
    (ValueError: embedded null byte) reading the certificate, and serve on the data_dir."""
    path = tmp_path / "nul.toml"
    path.write_text(
        '[server]\ndata_dir = "/var/lib/relay\\u0000gate"\n'
        'tls_certificate_file = "cert\\u0000.pem"\ntls_key_file = "key.pem"\n',
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"{path}: server.data_dir: must not contain a NUL character (\\u0000)",
        f"{path}: server.tls_certificate_file: must not contain a NUL character (\\u0000)",
    ]


def test_a_bad_dns_server_is_refused_naming_the_entry() -> None:
    """server.dns_servers was not checked: `check` said OK and `serve` stopped with a traceback
    (ValueError: bad DNS server port) building the resolver; a reload applied half the file."""
    text = (
        '[server]\ndns_servers = ["127.0.0.1:5353", "1.2.3.4:99999", "[::1]:5353", "10.0.0.53:dns",'
        ' "2001:db8::53", "not a host!"]\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_text(text, "d.toml")
    assert [str(p) for p in info.value.problems] == [
        "d.toml: server.dns_servers[1]: '1.2.3.4:99999': the port must be 1-65535",
        "d.toml: server.dns_servers[3]: '10.0.0.53:dns': the port must be 1-65535",
        "d.toml: server.dns_servers[5]: 'not a host!' is not a host name or IP address; use a "
        "host name, an IPv4 address or an [IP] literal, with an optional :port",
    ]
    good = (
        '[server]\ndns_servers = ["127.0.0.1:5353", "[::1]", "2001:db8::53", "ns1.corp.example"]\n'
    )
    assert len(parse_text(good, "d.toml").server.dns_servers) == 4


def test_the_postgresql_queue_refuses_a_server_name_that_is_a_worker_lease_owner() -> None:
    """The workers of node "edge" lease as "edge-w0".."edge-w63", and a node started as "edge"
    drops those owners' leases: a node named "edge-w1" on the same queue shared a lease owner
    with a worker of "edge" (each took the other's messages in flight as its own) and lost its
    leases whenever "edge" started, and its messages in flight were delivered twice."""
    base = '[queue]\nstore = "postgresql"\ndatabase_url = "postgresql://relay@db/q"\n'
    with pytest.raises(ConfigError) as info:
        parse_text('[server]\nname = "edge-w1"\n' + base, "pg.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert "server.name: 'edge-w1' ends in -w<number>" in problem, problem
    assert "worker processes of a node named 'edge'" in problem, problem
    for fine in ("edge-W1", "edge-web", "edge-w", "edge1"):
        assert parse_text(f'[server]\nname = "{fine}"\n' + base, "pg.toml")
    sqlite = base.replace('store = "postgresql"', 'store = "sqlite"')
    assert parse_text('[server]\nname = "edge-w1"\n' + sqlite, "s.toml")


def test_an_internationalised_domain_is_refused_with_its_a_label_form() -> None:
    """[[dkim]] and accepted domains are written as A-labels (what DNS and the wire carry); a
    U-label (`bücher.example`) was refused as "not a domain" with no word of the form wanted."""
    text = (
        '[[accepted_domains]]\ndomain = "Bücher.example"\n\n'
        '[[dkim]]\ndomain = "bücher.example"\nselector = "s1"\n'
    )
    with pytest.raises(ConfigError) as info:
        parse_text(text, "idn.toml")
    problems = [str(p) for p in info.value.problems]
    hint = "write it as its A-label form 'xn--bcher-kva.example'"
    assert any(
        p.startswith("idn.toml: accepted_domains[0].domain:") and hint in p for p in problems
    ), problems
    assert any(p.startswith("idn.toml: dkim[0].domain:") and hint in p for p in problems), problems
    # a name that is no domain in any form gets no hint
    with pytest.raises(ConfigError) as info:
        parse_text('[[dkim]]\ndomain = "not a domain"\nselector = "s1"\n', "bad.toml")
    assert not any("A-label" in str(p) for p in info.value.problems)


def test_dkim_subdomains_is_a_boolean_off_by_default() -> None:
    """`subdomains` in a [[dkim]] entry: off unless written; a string is refused naming the
    entry and the key (a quoted "false" taken as true would sign every subdomain's mail)."""
    entry = '[[dkim]]\ndomain = "corp.example"\nselector = "s1"\n'
    assert parse_text(entry, "d.toml").dkim[0].subdomains is False
    assert parse_text(entry + "subdomains = true\n", "d.toml").dkim[0].subdomains is True
    with pytest.raises(ConfigError) as info:
        parse_text(entry + 'subdomains = "false"\n', "d.toml")
    (problem,) = [str(p) for p in info.value.problems]
    assert problem.startswith("d.toml: dkim[0].subdomains:"), problem
    assert "expected true or false" in problem, problem


def test_relaygate_check_refuses_exchange_out_of_range_queue_and_cost_values(
    tmp_path: Path,
) -> None:
    """exchange-semantics.md §7.1 / §7.3: an address-space cost is 1-100,
    TransientFailureRetryCount 0-15 and MessageExpirationTimeout at most 90 days; `check` says
    so, naming the key (and the connector), instead of taking a value Exchange refuses."""
    path = tmp_path / "relaygate.toml"
    path.write_text(
        '[queue]\ntransient_failure_retry_count = 16\nmessage_expiration_timeout = "91.00:00:00"\n'
        + _SEND.format(hosts='"smtp.office365.com"')
        + "cost = 0\n"
        + '\n[[send_connectors]]\nname = "Second"\naddress_spaces = ["x.example"]\ncost = 101\n',
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "relaygate", "check", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    out = done.stdout + done.stderr
    for expected in (
        f"{path}: queue.transient_failure_retry_count: 16 is outside the allowed range 0-15",
        f"{path}: queue.message_expiration_timeout: must be at most 90.00:00:00",
        f'{path}: send_connectors[0] "Out": cost: 0 is outside the allowed range 1-100',
        f'{path}: send_connectors[1] "Second": cost: 101 is outside the allowed range 1-100',
    ):
        assert expected in out, out
    edges = (
        '[queue]\ntransient_failure_retry_count = 15\nmessage_expiration_timeout = "90.00:00:00"\n'
        + _SEND.format(hosts='"smtp.office365.com"')
        + "cost = 100\n"
    )
    config = parse_text(edges, "edges.toml")
    assert config.queue.transient_failure_retry_count == 15
    assert config.send_connectors[0].cost == 100


def test_an_exchange_spelled_address_space_is_refused_with_the_form_to_write() -> None:
    """Exchange writes AddressSpaces `[SMTP:]space[;cost]` (exchange-semantics.md §7.1);
    RelayGate's address_spaces take the space alone and `cost` per connector (README, importer).
    An administrator pasting Exchange's spelling is told what to write instead."""
    text = '[[send_connectors]]\nname = "Out"\naddress_spaces = ["SMTP:*.corp.example;5", "x400:c=US"]\n'
    with pytest.raises(ConfigError) as info:
        parse_text(text, "s.toml")
    problems = [str(p) for p in info.value.problems]
    assert problems == [
        "s.toml: send_connectors[0] \"Out\": address_spaces[0]: 'SMTP:*.corp.example;5' is "
        "Exchange's [SMTP:]space[;cost] spelling: write '*.corp.example' (and cost = 5)",
        "s.toml: send_connectors[0] \"Out\": address_spaces[1]: 'x400:c=US' is not '*', a "
        "domain or '*.domain' (only SMTP address spaces are routed)",
    ], problems
