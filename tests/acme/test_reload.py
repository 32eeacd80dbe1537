"""Turning ACME on or off, or changing its names, by a reload (SIGHUP or the config watcher),
against pebble with a real `relaygate serve`: on, the ACME client starts and the listeners take
pebble's certificate; off, it stops and they go back to the configured certificate files; new
acme_domains, a new order at once. With workers, the supervisor runs the client and every worker
follows."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tests.acme.helpers import (
    Relay,
    attempt,
    file_serial,
    implicit_certificate,
    make_api_certificate,
    san_names,
    starttls_certificate,
    wait_until,
)

SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]  # (workers: the kernel spreads them)


def _variants(relay: Relay, files: Path) -> tuple[str, str]:
    """(the relay's config with ACME on, the same with ACME off and the server's certificate
    files instead)."""
    with_acme = relay.config.read_text()
    files.mkdir()
    _ca, cert, key = make_api_certificate(files)
    without = "".join(
        line
        for line in with_acme.splitlines(True)
        if not line.startswith("acme_")
    ).replace(
        "[server]\n", f'[server]\ntls_certificate_file = "{cert}"\ntls_key_file = "{key}"\n', 1
    )  # fmt: skip
    return with_acme, without


def _edit(relay: Relay, text: str, *, hup: bool) -> None:
    relay.config.write_text(text)
    if hup:
        assert relay.proc is not None
        os.kill(relay.proc.pid, signal.SIGHUP)


def _everyone_sees(
    relay: Relay, root: bytes, name: str, wanted: Callable[[x509.Certificate], bool]
) -> bool:
    """Every client (each source address: with workers, each lands on some worker) gets a
    certificate that `wanted` takes after STARTTLS, verified against `root` for `name`."""
    for source in SOURCES:
        cert = attempt(lambda s=source: starttls_certificate(relay.port, root, name, source=s))
        if cert is None or not wanted(cert):
            return False
    return True


def _on_and_off(tmp_path: Path, pebble, *, workers: int, hup: bool) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "relay"
    folder.mkdir()
    # a check each second: a client still running after "off" would order within the 3 s below
    relay = Relay(folder, pebble, workers=workers, implicit=True, check_interval="00:00:01")
    with_acme, without = _variants(relay, tmp_path / "files")
    files_root = (tmp_path / "files" / "api-ca.pem").read_bytes()
    relay.config.write_text(without)
    relay.start()
    try:
        file_cert = starttls_certificate(relay.port, files_root, "localhost")
        root = pebble.root_pem()

        # on: the ACME client starts, orders, and the listeners take pebble's certificate
        _edit(relay, with_acme, hup=hup)
        assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
        serial = file_serial(relay.cert_file)
        assert wait_until(
            lambda: _everyone_sees(
                relay, root, "relay.acme.test", lambda c: c.serial_number == serial
            ),
            timeout=30,
        ), relay.log()
        implicit = wait_until(
            lambda: attempt(lambda: implicit_certificate(relay.implicit_port, root)), timeout=20
        )
        assert implicit is not None and implicit.serial_number == serial, relay.log()
        log = relay.log()
        assert "ACME: turned on by the reload" in log
        assert "takes effect when relaygate serve restarts" not in log
        assert "relaygate.acme: ACME: ordering a certificate for relay.acme.test" in log
        if workers > 1:
            assert "relaygate.acme[w" not in log  # the supervisor's client, no worker's

        # off: the client stops; the listeners go back to the file's certificate
        _edit(relay, without, hup=hup)
        assert wait_until(
            lambda: _everyone_sees(
                relay, files_root, "localhost", lambda c: c.serial_number == file_cert.serial_number
            ),
            timeout=30,
        ), relay.log()
        files_ca = files_root
        implicit = wait_until(
            lambda: attempt(
                lambda: implicit_certificate(relay.implicit_port, files_ca, "localhost")
            ),
            timeout=20,
        )
        assert implicit is not None and implicit.serial_number == file_cert.serial_number
        assert "ACME: turned off by the reload" in relay.log()
        assert "takes effect when relaygate serve restarts" not in relay.log()
        # no ACME client runs any more: no order, whatever comes due
        orders = relay.log().count("ACME: ordering")
        relay.cert_file.unlink()  # (a client still running would order at its next look)
        time.sleep(3)
        assert relay.log().count("ACME: ordering") == orders, relay.log()
    finally:
        relay.stop()


def test_sighup_turns_acme_on_then_off(tmp_path: Path, pebble) -> None:  # type: ignore[no-untyped-def]
    _on_and_off(tmp_path, pebble, workers=1, hup=True)


def test_with_workers_an_edit_turns_acme_on_then_off(tmp_path: Path, pebble) -> None:  # type: ignore[no-untyped-def]
    # no SIGHUP: the supervisor and the workers each see the edit of the file
    _on_and_off(tmp_path, pebble, workers=2, hup=False)


def test_with_workers_sighup_turns_acme_on_then_off(tmp_path: Path, pebble) -> None:  # type: ignore[no-untyped-def]
    _on_and_off(tmp_path, pebble, workers=2, hup=True)


def test_new_acme_domains_by_a_reload_are_ordered_at_once(tmp_path: Path, pebble, relays) -> None:  # type: ignore[no-untyped-def]
    # acme_check_interval is an hour: only the reload can make the order come now
    relay = relays(pebble, check_interval="01:00:00")
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    root = pebble.root_pem()
    first = file_serial(relay.cert_file)
    text = relay.config.read_text().replace(
        "acme_email =", 'acme_domains = ["relay.acme.test", "mail.acme.test"]\nacme_email =', 1
    )
    relay.config.write_text(text)
    assert relay.proc is not None
    os.kill(relay.proc.pid, signal.SIGHUP)

    def both_names() -> x509.Certificate | None:
        cert = attempt(lambda: starttls_certificate(relay.port, root, "mail.acme.test"))
        return cert if cert is not None and cert.serial_number != first else None

    cert = wait_until(both_names, timeout=60)
    assert cert is not None, relay.log()
    assert sorted(san_names(cert)) == ["mail.acme.test", "relay.acme.test"]
    assert "names changed (relay.acme.test → mail.acme.test, relay.acme.test)" in relay.log()
