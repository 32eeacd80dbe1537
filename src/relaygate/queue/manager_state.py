"""The state of a `QueueManager`, declared once for the parts it is made of.

The queue manager is one class put together from mixins, one seam each (manager_loop.py,
manager_routes.py, manager_pacing.py, manager_sending.py, manager_graph.py, manager_results.py,
manager_reports.py, manager_tracking.py); `QueueManager.__init__` (manager.py) sets what is
declared here, so that each mixin is type-checked against the same attributes without importing
the class that combines them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from relaygate.delivery.client import ConnectionPool
from relaygate.delivery.dns import Resolver
from relaygate.delivery.graph import GraphTransport
from relaygate.delivery.oauth import TokenProvider
from relaygate.delivery.routing import RouteTable
from relaygate.queue.model import SendWait
from relaygate.queue.retry import RetrySchedule
from relaygate.queue.store import Store


class _ManagerState:
    """The attributes `QueueManager.__init__` sets (see there for what each one is)."""

    config: Any
    _routes: RouteTable | None
    store: Store
    tracking: Any
    log_privacy: Any
    node_id: str
    clock: Callable[[], float]
    scan_interval: float
    lease_seconds: float
    stop_grace: float
    delivery_timeout: float | None
    resubmit_page_size: int
    local_endpoints: set[tuple[str, int]]
    endpoints_known: asyncio.Event
    local_names: frozenset[str]
    schedule: RetrySchedule
    _resolver_fixed: bool
    resolver: Resolver
    signer: Any
    token_providers: dict[str, TokenProvider]
    pool: ConnectionPool | None
    graph: GraphTransport | None
    _wake: asyncio.Event
    _inflight: dict[str, asyncio.Task[None]]
    _background: set[asyncio.Task[Any]]
    _loop_task: asyncio.Task[None] | None
    _stopping: bool
    _last_purge: float
    _last_renew: float
    _rescan: bool
    clock_skew: str | None
    _ended_during_scan: set[str] | None
    _paced_until: dict[str, SendWait]
    _paced_count: dict[str, int]
    _signing_logged: dict[tuple[str, str], None]
    _delay_flag_owed: set[str]
    stats: dict[str, int]

    if TYPE_CHECKING:
        # QueueManager's (manager.py): the reports wake the loop for the report they store.
        def wake(self, queue_id: str | None = None) -> None: ...
