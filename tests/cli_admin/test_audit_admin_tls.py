"""`relaygate audit`'s admin-listener-without-tls: the admin listener reachable from the network
in plain HTTP (the API token and the session cookie in clear)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relaygate.audit import audit, has_high
from relaygate.smtp.tls import ensure_self_signed
from tests.cli_admin.helpers import run, write
from tests.cli_admin.test_audit import CLEAN, codes, config


def _with_token(tmp_path: Path, listen: str) -> str:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o600)  # else secret-file-readable
    return (
        CLEAN
        + f'\n[admin]\nlisten = "{listen}"\napi_token_file = "{token}"\n'
        + "metrics_require_token = true\n"
    )


@pytest.mark.parametrize("listen", ["0.0.0.0:8025", "10.0.0.1:8025", "[::]:8025"])
def test_admin_listener_on_the_network_in_plain_http_is_medium(listen: str, tmp_path: Path) -> None:
    """Before, `audit` said nothing of a network-facing admin listener without TLS: its token
    and the session cookie crossed the network in clear, anyone on the way could replay them."""
    plain = _with_token(tmp_path, listen)
    found = audit(config(plain))
    assert codes(found) == [("medium", "admin-listener-without-tls", "")]
    (finding,) = found
    assert finding.key == "admin.tls_certificate_file"
    assert listen in finding.message and "plain HTTP" in finding.message
    assert "admin.tls_key_file" in finding.fix
    assert not has_high(found)
    cert, key = ensure_self_signed(tmp_path / "tls", "relay.corp.example")
    with_tls = plain + f'tls_certificate_file = "{cert}"\ntls_key_file = "{key}"\n'
    assert audit(config(with_tls)) == []
    # on loopback, or with the admin centre off, nobody else is on the way
    for safe in ("127.0.0.1:8025", "[::1]:8025"):
        assert audit(config(CLEAN + f'\n[admin]\nlisten = "{safe}"\n')) == []
    assert audit(config(plain + "enabled = false\n")) == []
    # the CLI: listed with its severity, exit 0 (not high)
    path = write(tmp_path / "relaygate.toml", plain)
    r = run("audit", "-c", str(path), "--json")
    assert r.code == 0, r.err
    listed = [f for f in r.json()["findings"] if f["code"] == "admin-listener-without-tls"]
    assert [(f["severity"], f["key"]) for f in listed] == [("medium", "admin.tls_certificate_file")]
