"""The pyspf resolver hook: pyspf does its own lookups through a module-level ``spf.DNSLookup``,
which this module replaces once (at import) with a dispatcher. Inside a doctor run the dispatcher
answers from a blocking twin of the given resolver (same name servers and ports); outside it
defers to pyspf's own lookup, so other users of pyspf in the process are unaffected.

Kept apart because it patches a third-party module: the one place that does so, and why.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver
import spf

_spf_lookup: contextvars.ContextVar[Callable[..., list] | None] = contextvars.ContextVar(
    "relaygate_spf_lookup", default=None
)
_original_spf_lookup = spf.DNSLookup


def _spf_dispatch(name: str, qtype: str, strict: Any = True, timeout: float = 30) -> list:
    lookup = _spf_lookup.get()
    if lookup is None:
        return _original_spf_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype, timeout)


def _install_spf_hook() -> None:
    if spf.DNSLookup is not _spf_dispatch:
        spf.DNSLookup = _spf_dispatch


def _blocking_twin(resolver: dns.asyncresolver.Resolver) -> dns.resolver.Resolver:
    sync = dns.resolver.Resolver(configure=False)
    sync.nameservers = list(resolver.nameservers)
    sync.port = resolver.port
    sync.timeout = resolver.timeout
    sync.lifetime = resolver.lifetime
    return sync


def _spf_lookup_with(sync: dns.resolver.Resolver) -> Callable[..., list]:
    """A pyspf ``DNSLookup`` answering from ``sync`` (same result shapes as pyspf's own)."""

    def lookup(name: str, qtype: str, timeout: float = 30) -> list:
        try:
            answer = sync.resolve(
                dns.name.from_text(name), qtype, lifetime=min(timeout, sync.lifetime), search=False
            )
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        except dns.resolver.NoNameservers as exc:
            raise spf.TempError(f"DNS ServerFailure: {exc}") from exc
        except dns.exception.Timeout as exc:
            raise spf.TempError(f"DNS timeout: {exc}") from exc
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from exc
        out: list = []
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    return lookup


def _evaluate_spf(
    sync: dns.resolver.Resolver, ip: str, sender: str, domain: str
) -> tuple[str, str]:
    """pyspf's verdict for mail from ``sender`` (its macros %{l}, %{s}, %{o} are expanded from
    it) by ``ip``."""
    token = _spf_lookup.set(_spf_lookup_with(sync))
    try:
        result, explanation = spf.check2(
            i=ip, s=sender, h=domain, querytime=max(sync.lifetime * 5, 10)
        )
    finally:
        _spf_lookup.reset(token)
    return str(result), str(explanation)


_install_spf_hook()
