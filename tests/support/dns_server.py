"""A real authoritative DNS server on loopback, for tests.

`LoopbackDNS` answers UDP and TCP queries on ``127.0.0.1`` at an ephemeral port (the same port for
both transports) from a background thread, using dnslib for the wire format. Tests point a
dnspython resolver at it (``server.resolver()`` for asyncio code, ``server.sync_resolver()`` for
blocking code) or pass ``server.address`` (``"127.0.0.1:PORT"``) to anything that takes a
``dns_servers`` list.

Records are kept per owner name (case-insensitive, trailing dot optional)::

    with LoopbackDNS({
        "corp.example": [
            ("MX", (10, "mx1.corp.example")),
            ("TXT", "v=spf1 ip4:203.0.113.7 -all"),
        ],
        "mx1.corp.example": [("A", "127.0.0.1")],
    }) as dns_server:
        dns_server.add("_dmarc.corp.example", "TXT", "v=DMARC1; p=reject")
        resolver = dns_server.resolver()

Values by type:

====== =====================================================================================
A      ``"192.0.2.1"``
AAAA   ``"2001:db8::1"``
MX     ``(10, "mx.example.org")`` or ``"10 mx.example.org"``; ``(0, ".")`` is a null MX
TXT    ``"text"`` (split into 255-byte character-strings automatically) or a tuple/list of
       strings given as explicit character-strings
CNAME  ``"target.example.org"`` (chased inside the server's own data, like an authority does)
PTR    ``"host.example.org"``
NS     ``"ns1.example.org"``
====== =====================================================================================

Answers follow the real protocol:

* a name with records of the asked type → NOERROR with the records (AA set);
* a name that exists (it has records of another type, or names below it exist: an "empty
  non-terminal" such as ``_domainkey.example.org``) but no records of the type → NOERROR/NODATA;
* any other name → NXDOMAIN;
* ``set_nxdomain(name)`` forces NXDOMAIN and ``set_servfail(name)`` forces SERVFAIL for every type
  (``set_servfail(name, "A")``: for that type only);
* a NODATA or NXDOMAIN carries the SOA of the name's zone (its last two labels) in the authority
  section, with ``ttl`` as its TTL and minimum: a caching resolver keeps the negative answer that
  long (RFC 2308), as it keeps records (``LoopbackDNS(ttl=0)``: nothing is kept, for a test whose
  records change while a resolver that caches asks);
* a UDP answer larger than 512 bytes (or the client's EDNS buffer size) comes back truncated
  (TC set, no records), so the client retries over TCP, as with a real server.

Every query is recorded in ``queries`` as ``(name, type, transport)`` so tests can assert what was
looked up. Only loopback is used: nothing leaves the machine.

Use it from pytest with the fixture in :mod:`tests.support.fixtures`::

    from tests.support.fixtures import loopback_dns_fixture  # noqa: F401

    async def test_something(loopback_dns):
        loopback_dns.add("example.org", "MX", (10, "mx.example.org"))
        answer = await loopback_dns.resolver().resolve("example.org", "MX")
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from typing import Any

import dns.asyncresolver
import dns.resolver
from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSRecord

__all__ = ["LoopbackDNS"]

RecordValue = str | tuple | list
Records = dict[str, list[tuple[str, RecordValue]]]

SUPPORTED_TYPES = ("A", "AAAA", "MX", "TXT", "CNAME", "PTR", "NS")
_UDP_DEFAULT_PAYLOAD = 512
_MAX_CNAME_CHAIN = 8


def _norm(name: str) -> str:
    name = name.strip().lower()
    return name[:-1] if name.endswith(".") and name != "." else name


def _fqdn(name: str) -> str:
    name = name.strip()
    if name in ("", "."):
        return "."
    return name if name.endswith(".") else name + "."


def _txt_chunks(value: RecordValue) -> list[bytes]:
    if isinstance(value, (tuple, list)):
        return [s.encode() if isinstance(s, str) else bytes(s) for s in value]
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if not raw:
        return [b""]
    return [raw[i : i + 255] for i in range(0, len(raw), 255)]


def _rdata(rtype: str, value: Any) -> Any:
    if rtype == "A":
        return A(value)
    if rtype == "AAAA":
        return AAAA(value)
    if rtype == "MX":
        if isinstance(value, str):
            pref, host = value.split(None, 1)
        else:
            pref, host = value
        return MX(_fqdn(host), int(pref))
    if rtype == "TXT":
        return TXT(_txt_chunks(value))
    if rtype == "CNAME":
        return CNAME(_fqdn(value))
    if rtype == "PTR":
        return PTR(_fqdn(value))
    if rtype == "NS":
        return NS(_fqdn(value))
    raise ValueError(f"unsupported record type {rtype!r}; supported: {', '.join(SUPPORTED_TYPES)}")


class LoopbackDNS:
    """An authoritative DNS server for tests on 127.0.0.1 (UDP and TCP, one ephemeral port)."""

    host = "127.0.0.1"

    def __init__(self, records: Records | None = None, *, ttl: int = 60) -> None:
        self.ttl = ttl
        self.port = 0
        self._lock = threading.Lock()
        self._records: dict[str, list[tuple[str, Any]]] = {}
        self._servfail: set[str] = set()
        self._servfail_types: set[tuple[str, str]] = set()
        self._nxdomain: set[str] = set()
        self.queries: list[tuple[str, str, str]] = []
        self._udp: socketserver.ThreadingUDPServer | None = None
        self._tcp: socketserver.ThreadingTCPServer | None = None
        self._threads: list[threading.Thread] = []
        for name, entries in (records or {}).items():
            for rtype, value in entries:
                self.add(name, rtype, value)

    # ---------------------------------------------------------------- data
    @property
    def address(self) -> str:
        """``"127.0.0.1:PORT"``, the form of ``server.dns_servers`` entries."""
        return f"{self.host}:{self.port}"

    def add(self, name: str, rtype: str, value: RecordValue) -> None:
        """Add one record. Validates the value now so a bad test fixture fails loudly."""
        rtype = rtype.upper()
        _rdata(rtype, value)
        with self._lock:
            self._records.setdefault(_norm(name), []).append((rtype, value))

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Drop the records of one type (or all types) at a name."""
        key = _norm(name)
        with self._lock:
            if rtype is None:
                self._records.pop(key, None)
            else:
                kept = [(t, v) for t, v in self._records.get(key, []) if t != rtype.upper()]
                if kept:
                    self._records[key] = kept
                else:
                    self._records.pop(key, None)

    def set_servfail(self, name: str, rtype: str | None = None) -> None:
        """Every query for this exact name (of ``rtype`` only, if given) answers SERVFAIL."""
        with self._lock:
            if rtype is None:
                self._servfail.add(_norm(name))
            else:
                self._servfail_types.add((_norm(name), rtype.upper()))

    def set_nxdomain(self, name: str) -> None:
        """Every query for this exact name answers NXDOMAIN, even if it has records."""
        with self._lock:
            self._nxdomain.add(_norm(name))

    def clear_overrides(self, name: str) -> None:
        with self._lock:
            self._servfail.discard(_norm(name))
            self._servfail_types = {k for k in self._servfail_types if k[0] != _norm(name)}
            self._nxdomain.discard(_norm(name))

    # ------------------------------------------------------------- lifecycle
    def start(self) -> LoopbackDNS:
        if self._udp is not None:
            return self
        last_error: OSError | None = None
        for _ in range(20):  # UDP gets an ephemeral port; TCP must get the same one
            udp = _UDPServer((self.host, 0), _UDPHandler, self)
            port = udp.server_address[1]
            try:
                tcp = _TCPServer((self.host, port), _TCPHandler, self)
            except OSError as exc:
                udp.server_close()
                last_error = exc
                continue
            self._udp, self._tcp, self.port = udp, tcp, port
            break
        else:
            raise RuntimeError(f"could not bind UDP and TCP on one loopback port: {last_error}")
        for server in (self._udp, self._tcp):
            thread = threading.Thread(
                target=server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"loopback-dns-{type(server).__name__}-{self.port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self._udp, self._tcp):
            if server is not None:
                server.shutdown()
                server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads.clear()
        self._udp = self._tcp = None

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- clients
    def resolver(self, lifetime: float = 2.0) -> dns.asyncresolver.Resolver:
        """A dnspython asyncio resolver that asks only this server."""
        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def sync_resolver(self, lifetime: float = 2.0) -> dns.resolver.Resolver:
        """The blocking twin of :meth:`resolver` (for dkimpy's dnsfunc, pyspf, threads)."""
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [self.host]
        resolver.port = self.port
        resolver.lifetime = lifetime
        resolver.timeout = lifetime
        return resolver

    def txt_lookup(self, name: bytes | str, timeout: float = 2.0) -> bytes | None:
        """A dkimpy ``dnsfunc``: the first TXT record at ``name`` joined, or None."""
        qname = name.decode() if isinstance(name, bytes) else name
        try:
            answer = self.sync_resolver(timeout).resolve(qname, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.resolver.NoNameservers):
            return None
        for rdata in answer:
            return b"".join(rdata.strings)
        return None

    # --------------------------------------------------------------- answers
    def _exists(self, name: str) -> bool:
        if name in self._records:
            return True
        suffix = "." + name
        return any(owner.endswith(suffix) for owner in self._records)

    def answer(self, request: DNSRecord, transport: str) -> DNSRecord:
        """Build the reply to one parsed query (public so tests can call it directly)."""
        reply = request.reply()  # sets QR, copies id and question, RA
        reply.header.aa = 1
        reply.header.ra = 0
        if not request.questions:
            reply.header.rcode = RCODE.FORMERR
            return reply
        question = request.questions[0]
        qname = _norm(str(question.qname))
        qtype = QTYPE.get(question.qtype, str(question.qtype))
        with self._lock:
            self.queries.append((qname, qtype, transport))
            if qname in self._servfail or (qname, qtype) in self._servfail_types:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            if qname in self._nxdomain:
                reply.header.rcode = RCODE.NXDOMAIN
                reply.add_auth(self._soa(qname))
                return reply
            current = qname
            for _ in range(_MAX_CNAME_CHAIN):
                entries = self._records.get(current, [])
                cnames = [v for t, v in entries if t == "CNAME"]
                matches = [v for t, v in entries if t == qtype]
                if matches or qtype == "CNAME" or not cnames:
                    for value in matches:
                        reply.add_answer(self._rr(current, qtype, value))
                    break
                reply.add_answer(self._rr(current, "CNAME", cnames[0]))
                current = _norm(cnames[0])
                if current in self._servfail:
                    reply.header.rcode = RCODE.SERVFAIL
                    return reply
            if not reply.rr and not self._exists(qname):
                reply.header.rcode = RCODE.NXDOMAIN
            if not any(rr.rtype == question.qtype for rr in reply.rr):  # NODATA, NXDOMAIN
                reply.add_auth(self._soa(current))
        return reply

    def _soa(self, name: str) -> RR:
        """The SOA of `name`'s zone, taken to be its last two labels, for a negative answer."""
        zone = ".".join(name.split(".")[-2:]).strip(".")
        times = (1, 3600, 600, 86400, self.ttl)  # serial, refresh, retry, expire, minimum
        soa = SOA(_fqdn(f"ns.{zone}"), _fqdn(f"hostmaster.{zone}"), times)
        return RR(_fqdn(zone), QTYPE.SOA, rdata=soa, ttl=self.ttl)

    def _rr(self, owner: str, rtype: str, value: Any) -> RR:
        return RR(_fqdn(owner), getattr(QTYPE, rtype), rdata=_rdata(rtype, value), ttl=self.ttl)

    def _handle(self, data: bytes, transport: str) -> bytes | None:
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None  # garbage in, silence out (like most servers)
        reply = self.answer(request, transport)
        packed = reply.pack()
        if transport == "udp":
            limit = _UDP_DEFAULT_PAYLOAD
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(_UDP_DEFAULT_PAYLOAD, rr.rclass)
            if len(packed) > limit:
                truncated = request.reply()
                truncated.header.aa = 1
                truncated.header.ra = 0
                truncated.header.tc = 1
                packed = truncated.pack()
        return packed


class _UDPServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], handler: type, dns_server: LoopbackDNS) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, address: tuple[str, int], handler: type, dns_server: LoopbackDNS) -> None:
        self.dns_server = dns_server
        super().__init__(address, handler)


class _UDPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns_server._handle(data, "udp")  # type: ignore[attr-defined]
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TCPHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(5)
        try:
            while True:
                header = _recv_exact(sock, 2)
                if header is None:
                    return
                (length,) = struct.unpack("!H", header)
                data = _recv_exact(sock, length)
                if data is None:
                    return
                reply = self.server.dns_server._handle(data, "tcp")  # type: ignore[attr-defined]
                if reply is None:
                    return
                sock.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = sock.recv(remaining)
        if not chunk:
            return None
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)
