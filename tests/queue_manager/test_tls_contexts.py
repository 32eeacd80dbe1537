"""The delivery client's TLS contexts: built before the first delivery, and cheap where nothing is
verified. A context that validates certificates loads the system's trust store (~20 ms), which on
the event loop at a connector's first delivery would hold up every session of the process."""

from __future__ import annotations

import ssl
from pathlib import Path

from relaygate.delivery.client import tls_context_for
from relaygate.delivery.client.tls import _cached_context
from tests.queue_manager.helpers import free_port, send_connector_text, start_relay, wait_for


def validating_connector(port: int) -> str:
    """A send connector that validates the smart host's certificate (and so requires TLS)."""
    return send_connector_text(
        "Validated",
        "validated.test",
        port,
        'tls_auth_level = "DomainValidation"',
        "require_tls = true",
    )


async def test_the_send_connectors_tls_contexts_are_built_when_the_relay_starts(
    tmp_path: Path,
) -> None:
    _cached_context.cache_clear()
    relay = await start_relay(
        tmp_path, {"remote.test": free_port()}, extra=validating_connector(free_port())
    )
    try:
        loaded = _cached_context.cache_info()
        assert loaded.currsize == 2, loaded  # EncryptionOnly ("To remote.test"), DomainValidation
        validated = next(c for c in relay.config.send_connectors if c.name == "Validated")
        ctx = tls_context_for(validated)  # what its first delivery asks for: already there
        assert _cached_context.cache_info().hits == loaded.hits + 1
        assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
        assert ctx.cert_store_stats()["x509_ca"] > 0  # the trust store, loaded at start
    finally:
        await relay.stop()


async def test_a_connector_added_by_a_reload_gets_its_context_built_at_once(tmp_path: Path) -> None:
    _cached_context.cache_clear()
    config_file = tmp_path / "relaygate.toml"
    relay = await start_relay(tmp_path, {"remote.test": free_port()}, config_file=config_file)
    try:
        assert _cached_context.cache_info().currsize == 1  # EncryptionOnly only
        with config_file.open("a", encoding="utf-8") as f:
            f.write(validating_connector(free_port()))
        await relay.reload()
        assert any(c.name == "Validated" for c in relay.config.send_connectors)
        # built in the background by the reload, before any message asks for it
        await wait_for(lambda: _cached_context.cache_info().currsize == 2, timeout=10)
    finally:
        await relay.stop()


def test_encryption_only_has_the_default_settings_without_the_trust_store() -> None:
    ctx = _cached_context("EncryptionOnly", None)
    default = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname
    assert ctx.cert_store_stats()["x509_ca"] == 0  # nothing loaded that it would never consult
    assert ctx.options == default.options
    assert ctx.minimum_version == default.minimum_version
    assert ctx.protocol == default.protocol
