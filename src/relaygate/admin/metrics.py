"""The Prometheus collector behind /metrics (`MetricsCollector`): the queue, deliveries, SMTP
sessions and what the receive connectors took and refused, certificates, back pressure.

Apart from the routes: one class that only reads the relay's figures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from relaygate.worker_stats import NodeFigures, node_figures


class MetricsCollector:
    """Prometheus collector over the manager's counters and the last queue counts."""

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        self.counts: dict[str, int] = {}

    def collect(self) -> Iterable[Any]:
        queue = GaugeMetricFamily(
            "relaygate_queue_messages", "Messages in the queue by status", labels=["status"]
        )
        for key in ("ready", "retry", "suspended", "delivered", "failed"):
            queue.add_metric([key.capitalize()], float(self.counts.get(key, 0)))
        yield queue
        yield GaugeMetricFamily(
            "relaygate_queue_recipients_pending",
            "Recipients not yet delivered or failed",
            value=float(self.counts.get("recipients_pending", 0)),
        )
        yield GaugeMetricFamily(
            "relaygate_queue_active_messages",
            "Messages under a live delivery lease",
            value=float(self.counts.get("active", 0)),
        )
        figures = node_figures(self.relay)  # with server.workers > 1: every worker's, summed
        stats = figures.delivery
        recipients = CounterMetricFamily(
            "relaygate_delivery_recipients",
            "Recipient delivery outcomes",
            labels=["outcome"],
        )
        for key in ("delivered", "deferred", "failed", "paced", "expired"):
            recipients.add_metric([key], float(stats.get(key, 0)))
        yield recipients
        yield CounterMetricFamily(
            "relaygate_delivery_runs", "Delivery runs (one per message attempt)",
            value=float(stats.get("attempts", 0)),
        )  # fmt: skip
        dsn = CounterMetricFamily(
            "relaygate_dsn", "Delivery status notifications generated", labels=["type"]
        )
        dsn.add_metric(["failed"], float(stats.get("ndr", 0)))
        dsn.add_metric(["delayed"], float(stats.get("delay_notices", 0)))
        yield dsn
        yield GaugeMetricFamily(
            "relaygate_deliveries_in_flight",
            "Messages being delivered now",
            value=float(figures.in_flight),
        )
        manager = getattr(self.relay, "manager", None)
        if manager is not None:
            yield GaugeMetricFamily(
                "relaygate_queue_clock_skew",
                "1 while the shared queue (PostgreSQL) refuses this node's leases because its "
                "clock is off the queue database's by more than a third of queue.lease_duration: "
                "it delivers nothing meanwhile",
                value=0.0 if getattr(manager, "clock_skew", None) is None else 1.0,
            )
        yield from self._sessions(figures)
        yield from self._received(figures)
        yield self._certificates()
        pressure = getattr(self.relay, "pressure", None)
        if pressure is not None:
            yield GaugeMetricFamily(
                "relaygate_back_pressure",
                "1 while new messages are refused for lack of disk space (452 4.3.1)",
                value=1.0 if pressure.high else 0.0,
            )
            if pressure.space is not None:
                yield GaugeMetricFamily(
                    "relaygate_queue_disk_free_bytes",
                    "Free space on the queue's file system at the last sample",
                    value=float(pressure.space.free),
                )

    def _certificates(self) -> Any:
        """The notAfter of each certificate the relay holds, as read at start or the last
        reload (certificates.py): alert on `relaygate_certificate_expiry_timestamp_seconds - time()
        < 30 * 86400`."""
        family = GaugeMetricFamily(
            "relaygate_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate (Unix time), as read at start or the last reload; "
            "use: listener, smtp_client, entra_credential, admin_listener",
            labels=["use", "name", "file"],
        )
        # One sample per label set: a receive connector named like server.name with the server's
        # file is the same (use, name, file) twice, and Prometheus rejects a scrape with a
        # duplicate sample. The same file has the same date; should it differ, the earlier counts.
        samples: dict[tuple[str, str, str], float] = {}
        for cert in getattr(self.relay, "certificates", ()):
            labels = (cert.ref.use, cert.ref.name, str(cert.ref.file))
            samples[labels] = min(samples.get(labels, cert.timestamp), cert.timestamp)
        for labels, value in samples.items():
            family.add_metric(list(labels), value)
        return family

    def _received(self, figures: NodeFigures) -> Iterable[Any]:
        """What the receive connectors took and refused, since the node (its workers) started."""
        smtp = figures.smtp
        families = (
            ("relaygate_smtp_sessions_admitted", "SMTP sessions admitted", smtp.sessions),
            (
                "relaygate_smtp_connections_refused",
                "Connections refused with 421 by max_inbound_connection(_per_source)",
                smtp.connections_refused,
            ),
            (
                "relaygate_smtp_messages_received",
                "Messages accepted (250 after DATA)",
                smtp.messages,
            ),
            ("relaygate_smtp_received_bytes", "Bytes of the messages accepted", smtp.bytes),
        )
        for name, text, counts in families:
            family = CounterMetricFamily(name, text, labels=["connector"])
            for connector, n in sorted(counts.items()):
                family.add_metric([connector], float(n))
            yield family
        refusals = CounterMetricFamily(
            "relaygate_smtp_refusals",
            "Replies of 400 and above (a refused recipient, message or command), by reply",
            labels=["connector", "code", "status"],
        )
        for (connector, code, status), n in sorted(smtp.refusals.items()):
            refusals.add_metric([connector, str(code), status], float(n))
        yield refusals

    def _sessions(self, figures: NodeFigures) -> Iterable[Any]:
        """Open SMTP sessions per receive connector, next to the connector's limit: with
        process_open_fds / process_max_fds what an operator alerts on before clients get 421s
        or dropped connections."""
        ctx = getattr(self.relay, "ctx", None)
        open_now = figures.open_sessions
        sessions = GaugeMetricFamily(
            "relaygate_smtp_sessions", "Open inbound SMTP sessions", labels=["connector"]
        )
        limits = GaugeMetricFamily(
            "relaygate_smtp_session_limit",
            "max_inbound_connection of the receive connector (absent: unlimited)",
            labels=["connector"],
        )
        for connector in self.relay.config.receive_connectors:
            if not connector.enabled:
                continue
            sessions.add_metric([connector.name], float(open_now.get(connector.name, 0)))
            if connector.max_inbound_connection is not None:
                limits.add_metric([connector.name], float(connector.max_inbound_connection))
        yield sessions
        yield limits
        memory = getattr(ctx, "data_memory", None)
        if memory is not None:
            yield GaugeMetricFamily(
                "relaygate_data_in_memory_bytes",
                "Message bytes held by sessions receiving or committing them",
                value=float(figures.data_in_memory),
            )
            yield GaugeMetricFamily(
                "relaygate_data_in_memory_limit_bytes",
                "server.max_data_in_memory: past it a message gets 452 4.3.1",
                value=float(memory.limit),
            )
