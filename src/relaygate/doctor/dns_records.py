"""DNS as the doctor's checks see it: one lookup's outcome (:class:`_Lookup`, with the reply a
relay logs for a failure), TXT lookups, zone-file lines for the fixes, and the ``tag=value`` lists
of DKIM and DMARC records.

Shared by every check family; kept apart so that they read without the resolver's exceptions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.resolver

from relaygate import replies


@dataclass
class _Lookup:
    status: str  # ok | nodata | nxdomain | servfail | timeout | error
    records: list[Any] = field(default_factory=list)
    error: str = ""
    canonical: str = ""  # the name the records are at, after CNAMEs (lower case, no final dot)

    @property
    def failed(self) -> bool:
        return self.status in ("servfail", "timeout", "error")

    @property
    def reply(self) -> str:
        """The line Exchange (and this relay) would log for this failure."""
        if self.status == "nxdomain":
            return replies.DNS_NONEXISTENT_DOMAIN.line()
        reason = "ServerFailure" if self.status == "servfail" else "ErrorRetry"
        return replies.dns_query_failed(reason).line()


async def _query(resolver: dns.asyncresolver.Resolver, name: str, rtype: str) -> _Lookup:
    try:
        qname = dns.name.from_text(name)
        answer = await resolver.resolve(qname, rtype, search=False)
    except dns.resolver.NXDOMAIN:
        return _Lookup("nxdomain")
    except dns.resolver.NoAnswer:
        return _Lookup("nodata")
    except dns.resolver.NoNameservers as exc:
        return _Lookup("servfail", error=str(exc))
    except dns.exception.Timeout as exc:
        return _Lookup("timeout", error=str(exc))
    except dns.exception.DNSException as exc:
        return _Lookup("error", error=str(exc))
    canonical = answer.canonical_name.to_text(omit_final_dot=True).lower()
    return _Lookup("ok", list(answer), canonical=canonical)


async def _txt(resolver: dns.asyncresolver.Resolver, name: str) -> _Lookup:
    result = await _query(resolver, name, "TXT")
    if result.status == "ok":
        result.records = [b"".join(r.strings).decode("utf-8", "replace") for r in result.records]
    return result


def zone_txt(name: str, value: str, ttl: int = 3600) -> str:
    """A zone-file line for a TXT record; values over 255 bytes split into quoted strings."""
    owner = name if name.endswith(".") else name + "."
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)] or [""]
    quoted = " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)
    if len(chunks) > 1:
        quoted = f"( {quoted} )"
    return f"{owner} {ttl} IN TXT {quoted}"


def parse_tags(record: str) -> dict[str, str] | None:
    """A ``tag=value; tag=value`` list (DKIM, DMARC); None if malformed or a tag repeats."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name in tags:
            return None
        tags[name] = re.sub(r"\s+", "", value) if name in ("p", "b", "bh") else value.strip()
    return tags
