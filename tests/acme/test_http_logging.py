"""The service log of a relay whose ACME client talks to pebble: no line from httpx or httpcore (an
"HTTP Request:" line shows the URL, httpcore's DEBUG lines the headers), at log level INFO or
DEBUG, in the one process or in a supervisor (which runs the ACME client) and its workers
(relaygate.logs.service.QUIET_LOGGERS).
"""

from __future__ import annotations

import json

import pytest

from tests.acme.helpers import wait_until


@pytest.mark.parametrize(("level", "workers"), [("INFO", 1), ("DEBUG", 1), ("DEBUG", 2)])
def test_the_acme_clients_requests_are_not_in_the_service_log(
    pebble, relays, level: str, workers: int
) -> None:  # type: ignore[no-untyped-def]
    relay = relays(
        pebble, workers=workers, server_extra=f'log_format = "json"\nlog_level = "{level}"'
    )
    assert wait_until(lambda: relay.cert_file.exists(), timeout=60), relay.log()
    assert relay.stop() == 0
    records = [json.loads(line) for line in relay.log().splitlines()]
    # the client did talk to pebble (directory, nonce, account, order, challenge, certificate)
    assert any("ACME: certificate for relay.acme.test installed" in r["message"] for r in records)
    assert not [r for r in records if "HTTP Request:" in r["message"]]
    noisy = [r for r in records if r["logger"].split(".")[0] in ("httpx", "httpcore")]
    assert not noisy, noisy[:3]
