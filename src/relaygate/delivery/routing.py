"""Which send connector takes a recipient (pure, no I/O).

Exchange 2019 semantics (shared/reference/exchange-semantics.md §7.1):

* an address space is ``*`` (every domain), ``corp.example`` (that domain only, not its subdomains) or
  ``*.corp.example`` (the domain *and* its subdomains); Exchange's ``[SMTP:]space[;cost]`` spelling is
  accepted too (the ``;cost`` overrides the connector's cost for that space; non-SMTP types never
  match);
* disabled connectors and connectors whose ``max_message_size`` is below the message size are dropped;
* the most specific matching space wins: more matched labels beat fewer and, at the same number of
  labels, an exact domain beats a wildcard (``marketing.contoso.com`` > ``*.contoso.com`` > ``*``);
* ties go to the lowest cost, then the alphanumerically lowest connector name;
* nothing matches → the Unreachable queue with ``550 5.4.4 ROUTING.NoNextHop; unable to route``; every
  match too small for the message → ``550 5.3.4 ROUTING.SizeLimit``.

The same functions serve the queue manager and ``relaygate explain``, so what explain says is what the
server does.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relaygate import replies
from relaygate.addresses import MAX_LOCAL_PART, MAX_PATH, AddressError, ascii_domain, parse_path
from relaygate.replies import Reply

__all__ = [
    "DELIVERY_DNS",
    "DELIVERY_GRAPH",
    "DELIVERY_SMART_HOST",
    "DELIVERY_UNREACHABLE",
    "AddressSpace",
    "Candidate",
    "RouteExplanation",
    "RouteKey",
    "RouteTable",
    "SendConnectorLike",
    "domain_of",
    "explain_route",
    "match_address_space",
    "parse_address_space",
    "route_key_for",
    "route_recipients",
    "select_send_connector",
    "smart_host_queue_name",
]

DELIVERY_DNS = "DnsConnectorDelivery"
DELIVERY_SMART_HOST = "SmartHostConnectorDelivery"
#: RelayGate's own: a send connector with delivery_method = "Graph" (one queue per connector).
DELIVERY_GRAPH = "MicrosoftGraphDelivery"
DELIVERY_UNREACHABLE = "Unreachable"


class SendConnectorLike(Protocol):
    """The attributes of `relaygate.config.SendConnector` that delivery reads."""

    name: str
    address_spaces: Sequence[str]
    dns_routing_enabled: bool
    smart_hosts: Sequence[str]
    port: int
    cost: int
    enabled: bool
    max_message_size: int | None


# --------------------------------------------------------------------------------------------------
# address spaces


@dataclass(frozen=True, slots=True)
class AddressSpace:
    """One parsed address space.

    raw: as configured. kind: "any" (``*``), "exact" (``corp.example``), "wildcard"
    (``*.corp.example``) or "other" (a non-SMTP type, never matches). domain: lower-case, no trailing
    dot, A-labels. cost: the ``;cost`` suffix, or None to use the connector's cost.
    """

    raw: str
    kind: str
    domain: str = ""
    cost: int | None = None


def _norm_domain(domain: str) -> str:
    d = domain.strip().lower()
    if d.endswith("."):
        d = d[:-1]
    return ascii_domain(d)


def parse_address_space(raw: str) -> AddressSpace:
    """Parse ``[Type:]space[;cost]``."""
    text = raw.strip()
    cost: int | None = None
    if ";" in text:
        text, _, cost_text = text.rpartition(";")
        try:
            cost = int(cost_text.strip())
        except ValueError:
            cost = None
        text = text.strip()
    if ":" in text and not text.startswith("["):
        kind_prefix, _, rest = text.partition(":")
        if kind_prefix.strip().upper() != "SMTP":
            return AddressSpace(raw, "other", rest.strip(), cost)
        text = rest.strip()
    if text == "*":
        return AddressSpace(raw, "any", "", cost)
    if text.startswith("*."):
        return AddressSpace(raw, "wildcard", _norm_domain(text[2:]), cost)
    return AddressSpace(raw, "exact", _norm_domain(text), cost)


def match_address_space(space: AddressSpace, domain: str) -> tuple[int, int] | None:
    """The specificity of `space` for `domain` (higher is more specific), or None if no match.

    (labels matched, 1 for exact / 0 for wildcard): ``*`` → (0, 0); ``*.corp.example`` → (2, 0) for
    corp.example and any subdomain; ``corp.example`` → (2, 1) for corp.example only.
    """
    d = _norm_domain(domain)
    if space.kind == "any":
        return (0, 0)
    if space.kind == "other" or not space.domain or not d:
        return None
    labels = space.domain.count(".") + 1
    if space.kind == "exact":
        return (labels, 1) if d == space.domain else None
    if d == space.domain or d.endswith("." + space.domain):
        return (labels, 0)
    return None


@functools.lru_cache(maxsize=4096)
def domain_of(address: str) -> str:
    """The routing domain of an envelope address (lower-case A-labels; "" for <postmaster>).
    Cached: a pure function of the text, asked for every recipient of every delivery."""
    text = address.strip()
    if text.startswith("<") and text.endswith(">"):
        text = text[1:-1]
    try:
        parsed = parse_path(
            f"<{text}>",
            smtputf8=True,
            allow_null=False,
            allow_postmaster=True,
            error=replies.INVALID_RECIPIENT,
        )
    except AddressError:
        parsed = None
    if parsed is not None:
        return parsed.domain
    _, at, dom = text.rpartition("@")
    return _norm_domain(dom) if at else ""


# --------------------------------------------------------------------------------------------------
# selection and explanation


@dataclass(frozen=True, slots=True)
class Candidate:
    """How one connector fared for one domain (for `relaygate explain`).

    verdict: "selected", "disabled", "no match", "size limit", "less specific", "higher cost",
    "name order".
    """

    connector: str
    address_space: str | None
    specificity: tuple[int, int] | None
    cost: int | None
    verdict: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class RouteKey:
    """The delivery queue a recipient goes to (Exchange's NextHopSolutionKey).

    connector_name: the send connector, None when unreachable.
    next_hop: the recipient domain for DNS routing, the smart-host list for smart-host routing (Exchange
    names those queues after the list, e.g. ``[10.10.10.100]`` or ``smarthost01.contoso.com``), or
    "Unreachable".
    delivery_type: DnsConnectorDelivery | SmartHostConnectorDelivery | Unreachable.
    connector: the connector object itself (not part of equality or hash).
    """

    connector_name: str | None
    next_hop: str
    delivery_type: str
    connector: Any = field(default=None, compare=False, hash=False, repr=False)

    @property
    def is_unreachable(self) -> bool:
        return self.connector_name is None


@dataclass(frozen=True, slots=True)
class RouteExplanation:
    """Why a recipient goes where it goes.

    connector: the chosen connector or None; reason: one sentence for people; candidates: every
    configured connector with its verdict; reply: the failure reply when there is no route;
    route: the delivery queue the recipient goes to.
    """

    address: str
    domain: str
    connector: Any
    reason: str
    candidates: tuple[Candidate, ...]
    route: RouteKey
    reply: Reply | None = None


def _best_space(connector: Any, domain: str) -> tuple[AddressSpace, tuple[int, int], int] | None:
    best: tuple[AddressSpace, tuple[int, int], int] | None = None
    conn_cost = int(getattr(connector, "cost", 1) or 1)
    for raw in getattr(connector, "address_spaces", ()) or ():
        space = parse_address_space(raw)
        spec = match_address_space(space, domain)
        if spec is None:
            continue
        cost = space.cost if space.cost is not None else conn_cost
        if best is None or spec > best[1] or (spec == best[1] and cost < best[2]):
            best = (space, spec, cost)
    return best


def smart_host_queue_name(smart_hosts: Iterable[str]) -> str:
    """The queue name Exchange gives a smart-host route: the list joined with commas."""
    return ",".join(h.strip() for h in smart_hosts)


def route_key_for(connector: Any, domain: str) -> RouteKey:
    """The delivery queue for `domain` through `connector` (None → Unreachable)."""
    if connector is None:
        return RouteKey(None, DELIVERY_UNREACHABLE, DELIVERY_UNREACHABLE)
    if getattr(connector, "delivery_method", "SMTP") == "Graph":
        from relaygate.delivery.graph import route_label

        return RouteKey(connector.name, route_label(connector), DELIVERY_GRAPH, connector)
    hosts = list(getattr(connector, "smart_hosts", ()) or ())
    if hosts and not getattr(connector, "dns_routing_enabled", False):
        return RouteKey(
            connector.name, smart_host_queue_name(hosts), DELIVERY_SMART_HOST, connector
        )
    return RouteKey(connector.name, domain, DELIVERY_DNS, connector)


#: A local part of atext and dots only (RFC 5321 Dot-string, ASCII): parsing such an address
#: succeeds or fails on its domain alone (within MAX_LOCAL_PART and MAX_PATH).
_PLAIN_LOCAL = re.compile(
    r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*"
)


def _plain_domain(address: str) -> str | None:
    """The text after the ``@`` of an address whose routing domain depends on that text alone
    (a plain local part, no brackets or spaces around, within the length limits), else None:
    every such address with the same domain text has the same ``domain_of``."""
    local, at, domain = address.rpartition("@")
    if (
        not at
        or len(local) > MAX_LOCAL_PART
        or len(address.encode("utf-8", "surrogatepass")) + 2 > MAX_PATH
        or not _PLAIN_LOCAL.fullmatch(local)
        or domain != domain.strip()
    ):
        return None
    return domain


def _route_domain(address: str) -> str:
    """The domain a route is chosen for: an address's, or a bare domain."""
    return (
        domain_of(address) if "@" in address or address.startswith("<") else _norm_domain(address)
    )


def explain_route(
    connectors: Iterable[Any], address: str, *, size: int | None = None
) -> RouteExplanation:
    """Choose the send connector for `address` and say why, naming the connectors that lost."""
    domain = _route_domain(address)
    verdicts: dict[str, Candidate] = {}
    eligible: list[tuple[tuple[int, int], int, str, Any, AddressSpace]] = []
    too_small: list[str] = []
    order: list[str] = []
    for conn in connectors:
        name = str(conn.name)
        order.append(name)
        best = _best_space(conn, domain)
        if not getattr(conn, "enabled", True):
            verdicts[name] = Candidate(name, best[0].raw if best else None, None, None, "disabled")
            continue
        if best is None:
            verdicts[name] = Candidate(
                name, None, None, None, "no match", "no address space matches " + (domain or "<>")
            )
            continue
        space, spec, cost = best
        limit = getattr(conn, "max_message_size", None)
        if size is not None and limit is not None and size > limit:
            verdicts[name] = Candidate(
                name,
                space.raw,
                spec,
                cost,
                "size limit",
                f"message of {size} bytes exceeds max_message_size {limit}",
            )
            too_small.append(name)
            continue
        eligible.append((spec, cost, name, conn, space))

    # most specific first, then lowest cost, then name
    eligible.sort(key=lambda e: (-e[0][0], -e[0][1], e[1], e[2]))
    chosen = eligible[0] if eligible else None
    if chosen is not None:
        c_spec, c_cost, c_name, c_conn, c_space = chosen
        verdicts[c_name] = Candidate(c_name, c_space.raw, c_spec, c_cost, "selected")
        for spec, cost, name, _conn, space in eligible[1:]:
            if spec != c_spec:
                verdict, detail = (
                    "less specific",
                    f"{space.raw!r} is less specific than {c_space.raw!r}",
                )
            elif cost != c_cost:
                verdict, detail = "higher cost", f"cost {cost} > {c_cost}"
            else:
                verdict, detail = "name order", f"same specificity and cost; {c_name!r} sorts first"
            verdicts[name] = Candidate(name, space.raw, spec, cost, verdict, detail)
        route = route_key_for(c_conn, domain)
        how = (
            f"MX lookup for {domain}"
            if route.delivery_type == DELIVERY_DNS
            else route.next_hop
            if route.delivery_type == DELIVERY_GRAPH
            else f"smart hosts {route.next_hop}"
        )
        reason = (
            f"send connector {c_name!r} matches {domain or '<>'} with address space "
            f"{c_space.raw!r} (cost {c_cost}); delivery by {how}"
        )
        explanation = RouteExplanation(
            address, domain, c_conn, reason, tuple(verdicts[n] for n in order), route
        )
        return explanation

    if too_small:
        reply = replies.ROUTE_SIZE_LIMIT
        reason = (
            f"every send connector matching {domain or '<>'} has a max_message_size below the "
            f"message size ({', '.join(too_small)})"
        )
    else:
        reply = replies.NO_NEXT_HOP
        reason = f"no enabled send connector has an address space matching {domain or '<>'}"
    return RouteExplanation(
        address,
        domain,
        None,
        reason,
        tuple(verdicts[n] for n in order),
        route_key_for(None, domain),
        reply,
    )


def select_send_connector(
    connectors: Iterable[Any], domain: str, *, size: int | None = None
) -> Any | None:
    """The send connector for `domain` (most specific space, lowest cost, lowest name) or None."""
    return explain_route(connectors, _norm_domain(domain), size=size).connector


def route_recipients(
    connectors: Iterable[Any], recipients: Iterable[str], *, size: int | None = None
) -> dict[RouteKey, list[str]]:
    """Group recipients per delivery queue: (connector, domain) for DNS routing, (connector,
    smart-host list) for smart hosts, and one Unreachable key for recipients with no route (see
    `explain_route(...).reply` for their reason). Recipient order is kept inside each group."""
    return RouteTable(list(connectors)).route(recipients, size=size)


class RouteTable:
    """`route_recipients` for one list of send connectors, remembering each decision.

    The queue manager routes every message to the same few domains: a decision depends only on
    the recipient's domain and on which of the connectors' size limits the message exceeds, so it
    is remembered under that key (bounded: cleared past _MAX entries). `source` is the
    configuration's own list; the manager builds a new table when that list is replaced.
    """

    _MAX = 4096

    def __init__(self, connectors: Sequence[Any]) -> None:
        self.source = connectors
        self.connectors = list(connectors)
        self._limits = tuple(
            int(limit)
            for conn in self.connectors
            if (limit := getattr(conn, "max_message_size", None)) is not None
        )
        self._memo: dict[tuple[str, tuple[bool, ...] | None], RouteKey] = {}
        self._domains: dict[str, str] = {}

    def route(
        self, recipients: Iterable[str], *, size: int | None = None
    ) -> dict[RouteKey, list[str]]:
        over = self._over(size)
        groups: dict[RouteKey, list[str]] = {}
        for rcpt in recipients:
            groups.setdefault(self._key(rcpt, size, over), []).append(rcpt)
        return groups

    def route_one(self, recipient: str, *, size: int | None = None) -> RouteKey:
        """The delivery queue of one recipient of a message of ``size`` bytes: what
        ``explain_route(connectors, recipient, size=size).route`` says, remembered."""
        return self._key(recipient, size, self._over(size))

    def _over(self, size: int | None) -> tuple[bool, ...] | None:
        return None if size is None else tuple(size > limit for limit in self._limits)

    def _domain(self, rcpt: str) -> str:
        """``_route_domain(rcpt)``, parsed once per domain text (not once per address): a
        queue of 100,000 recipients at a few domains has a few domains to parse."""
        raw = _plain_domain(rcpt)
        if raw is None:
            return _route_domain(rcpt)
        domain = self._domains.get(raw)
        if domain is None:
            domain = _route_domain(rcpt)
            if len(self._domains) >= self._MAX:
                self._domains.clear()
            self._domains[raw] = domain
        return domain

    def _key(self, rcpt: str, size: int | None, over: tuple[bool, ...] | None) -> RouteKey:
        memo_key = (self._domain(rcpt), over)
        key = self._memo.get(memo_key)
        if key is None:
            key = explain_route(self.connectors, rcpt, size=size).route
            if len(self._memo) >= self._MAX:
                self._memo.clear()
            self._memo[memo_key] = key
        return key
