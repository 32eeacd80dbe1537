"""What a send connector says about Graph: whether it delivers through Graph, the token scope
it may ask for, the mailbox it sends as, its endpoint's host and how routes name it.

Separate from the delivery itself so that configuration checks, ``explain`` and the CLI can ask
these questions without the HTTP code.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from relaygate.delivery.oauth import DEFAULT_SCOPE

DEFAULT_ENDPOINT = "https://graph.microsoft.com/v1.0"
GRAPH_SCOPE = "https://graph.microsoft.com/.default"

#: The Graph hosts of Microsoft's clouds (global, US Government L4/L5, China, Germany).
_GRAPH_HOSTS = frozenset(
    {
        "graph.microsoft.com",
        "graph.microsoft.us",
        "dod-graph.microsoft.us",
        "microsoftgraph.chinacloudapi.cn",
        "graph.microsoft.de",
    }
)


def is_graph(connector: Any) -> bool:
    return getattr(connector, "delivery_method", "SMTP") == "Graph"


def is_graph_scope(scope: str, endpoint: str = DEFAULT_ENDPOINT) -> bool:
    """The scope a Graph connector may ask for: left at Exchange's default (→ Graph's), or
    ``https://<a Graph host, or graph_endpoint's host>/.default``."""
    if not scope or scope == DEFAULT_SCOPE:
        return True
    url = urlsplit(scope)
    host = (url.hostname or "").lower()
    return (
        url.scheme == "https"
        and url.path == "/.default"
        and (host in _GRAPH_HOSTS or host == (urlsplit(endpoint).hostname or "").lower())
    )


def graph_scope(connector: Any) -> str:
    """The token scope of a Graph connector: oauth_scope at Exchange's default → the Graph of
    graph_endpoint when it is one of Microsoft's (a national cloud's Graph refuses the global
    Graph's tokens), else the global Graph's."""
    scope = str(getattr(connector, "oauth_scope", "") or "")
    if scope and scope != DEFAULT_SCOPE:
        return scope
    host = graph_host(connector).lower()
    return f"https://{host}/.default" if host in _GRAPH_HOSTS else GRAPH_SCOPE


def graph_mailbox(connector: Any, sender: str) -> str:
    """The mailbox whose sendMail is called: graph_mailbox, else send_as, else the sender."""
    return (
        str(getattr(connector, "graph_mailbox", "") or "")
        or str(getattr(connector, "send_as", "") or "")
        or ("" if sender in ("", "<>") else sender)
    )


def route_label(connector: Any) -> str:
    """How `explain`, the queue and the CLI name a Graph route."""
    mailbox = (
        str(getattr(connector, "graph_mailbox", "") or "")
        or str(getattr(connector, "send_as", "") or "")
        or "of the envelope sender"
    )
    return f"Microsoft Graph (mailbox {mailbox})"


def graph_host(connector: Any) -> str:
    return (
        urlsplit(str(getattr(connector, "graph_endpoint", "") or DEFAULT_ENDPOINT)).hostname or ""
    )
