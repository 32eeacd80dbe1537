"""Which receive connector takes a connection (exchange-semantics.md §2).

1. Candidates: enabled connectors with a binding on the local IP:port (an exact address or the
   0.0.0.0 / [::] wildcard) whose RemoteIPRanges contain the client.
2. A connector bound to the exact local address beats one bound to a wildcard.
3. Then the narrowest RemoteIPRanges entry containing the client wins (a single IP beats a /24 beats the
   catch-all). Validation guarantees ranges on one binding are nested, so this is a total order; the
   connector name breaks any remaining tie so the result never depends on file order.
4. No candidate: no connector; the server closes the connection without a banner.
IPv4-mapped IPv6 clients (::ffff:10.1.2.3) are matched as the IPv4 address they carry.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from relaygate.config.model import ReceiveConnector
from relaygate.config.values import Binding, IPRange, normalise_ip

__all__ = ["Candidate", "Selection", "select_connector"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """A connector considered for a connection and why it did or did not win."""

    connector: ReceiveConnector
    binding: Binding | None
    matched_range: IPRange | None
    reason: str


@dataclass(frozen=True, slots=True)
class Selection:
    """The result of connector selection. `connector` is None when nothing accepts the client."""

    connector: ReceiveConnector | None
    binding: Binding | None
    matched_range: IPRange | None
    beaten: tuple[Candidate, ...]
    rejected: tuple[Candidate, ...]

    @property
    def reason(self) -> str:
        if self.connector is None:
            return "no enabled connector has a binding on this endpoint whose RemoteIPRanges contain the client"
        exact = "exact address" if self.binding and not self.binding.is_wildcard else "wildcard"
        return f"binding {self.binding} ({exact}), narrowest matching RemoteIPRanges entry {self.matched_range}"


def _best_range(
    connector: ReceiveConnector, client: ipaddress.IPv4Address | ipaddress.IPv6Address
) -> IPRange | None:
    best: IPRange | None = None
    for entry in connector.remote_ip_ranges:
        if entry.contains(client) and (best is None or entry.size < best.size):
            best = entry
    return best


def _best_binding(
    connector: ReceiveConnector,
    local_ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    local_port: int,
) -> Binding | None:
    matches = [b for b in connector.bindings if b.matches(local_ip, local_port)]
    if not matches:
        return None
    return min(matches, key=lambda b: b.is_wildcard)


def select_connector(
    connectors: Iterable[ReceiveConnector],
    *,
    local_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
    local_port: int,
    client_ip: str | ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> Selection:
    local = normalise_ip(ipaddress.ip_address(str(local_ip).partition("%")[0]))
    client = normalise_ip(ipaddress.ip_address(str(client_ip).partition("%")[0]))
    scored: list[tuple[tuple[bool, int, str], Candidate]] = []
    rejected: list[Candidate] = []
    for connector in connectors:
        if not connector.enabled:
            rejected.append(Candidate(connector, None, None, "disabled"))
            continue
        binding = _best_binding(connector, local, local_port)
        if binding is None:
            rejected.append(Candidate(connector, None, None, f"no binding on {local}:{local_port}"))
            continue
        matched = _best_range(connector, client)
        if matched is None:
            rejected.append(
                Candidate(connector, binding, None, f"RemoteIPRanges do not contain {client}")
            )
            continue
        key = (binding.is_wildcard, matched.size, connector.name.lower())
        scored.append((key, Candidate(connector, binding, matched, "")))
    if not scored:
        return Selection(None, None, None, (), tuple(rejected))
    scored.sort(key=lambda item: item[0])
    winner = scored[0][1]
    beaten = []
    for _, cand in scored[1:]:
        if (
            cand.binding
            and winner.binding
            and cand.binding.is_wildcard
            and not winner.binding.is_wildcard
        ):
            why = f"binding {cand.binding} is a wildcard; {winner.connector.name} is bound to {winner.binding}"
        else:
            why = f"range {cand.matched_range} is wider than {winner.matched_range}"
        beaten.append(Candidate(cand.connector, cand.binding, cand.matched_range, why))
    return Selection(
        winner.connector, winner.binding, winner.matched_range, tuple(beaten), tuple(rejected)
    )
