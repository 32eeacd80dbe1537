"""logon_failure_rate_limit with `server.workers = 2`: one count of failed AUTH per client address
for the node, whatever worker each connection reached.

`relaygate serve` as a subprocess with worker_balance = "connection" (the kernel spreads one
address's connections over both workers), as in tests/workers/test_shared_rates.py: the
connections are opened first, until both workers hold some, then each tries one wrong password,
alternating between the workers, so per-worker counting would let twice the limit be guessed.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.smtp.helpers import RawClient
from tests.workers.test_shared_rates import (
    CONFIG,
    PASSWORD,
    RateServed,
    add_users,
    open_on_both_workers,
)
from tests.workers.test_workers import Sink, sink  # noqa: F401 (the sink fixture)

LIMIT = 3
AUTH_LIMIT_SETTINGS = f"""
logon_failure_rate_limit = {LIMIT}
auth_tarpit_interval = "00:00:00"
"""


class AuthServed(RateServed):
    """A connector that takes BasicAuth, counting failures per address (LIMIT a minute)."""

    def write_config(self, banner: str) -> None:
        self.config.write_text(
            CONFIG.format(
                data=self.data,
                workers=self.workers,
                server_extra=self.server_extra,
                port=self.port,
                banner=banner,
                sink_port=self.sink_port,
                limit='"unlimited"',
                rate_source="None",
                auth='["Tls", "BasicAuth"]',
                groups='["ExchangeUsers"]',
                permissions=AUTH_LIMIT_SETTINGS,
            )
        )


@pytest.fixture
def auth_serve(tmp_path: Path, sink: tuple[Sink, int]) -> Iterator[Any]:  # noqa: F811
    started: list[AuthServed] = []

    def make(extra: str = "") -> AuthServed:
        s = AuthServed(tmp_path, sink[1], rate_source="None", server_extra=extra)
        add_users(s.data, "scanner")
        started.append(s)
        s.start()
        return s

    yield make
    for s in started:
        s.stop()


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_failures_are_counted_for_the_node_with_connection_balance(auth_serve: Any) -> None:
    """One address on both workers: LIMIT wrong passwords are answered 535, then every AUTH from
    it is refused 450 before any password is checked, even the right one, on either worker.
    Another address is not affected. Counted per worker, 2 × LIMIT were answered 535."""
    s = auth_serve('worker_balance = "connection"')
    clients = open_on_both_workers(s, ["127.0.0.9"], user=None, at_most=40, each=LIMIT)
    try:
        codes = [c.cmd(plain("scanner", f"guess {i}")).code for i, (c, _pid) in enumerate(clients)]
        assert len({pid for _c, pid in clients[: LIMIT + 1]}) == 2
        right = clients[0][0].cmd(plain("scanner", PASSWORD))
        right_other_worker = clients[1][0].cmd(plain("scanner", PASSWORD))
    finally:
        for c, _pid in clients:
            c.close()
    assert codes == [535] * LIMIT + [450] * (len(codes) - LIMIT), codes
    assert right.text == "450 4.7.1 Too many AUTH commands from 127.0.0.9"
    assert right_other_worker.code == 450
    with RawClient(s.port, source="127.0.0.10", timeout=10) as c:  # another address is not
        c.greet()
        c.cmd(plain("scanner", PASSWORD), 235)
    assert s.stop() == 0
