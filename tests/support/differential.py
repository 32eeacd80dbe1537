"""Differential smuggling fuzz (security-bar items 194 and 188): the same byte streams, cut into the
same writes, sent to RelayGate and to a reference MTA (a private Postfix), then what each delivered
compared message by message.

A stream is a session built from a seeded `random.Random`: EHLO, MAIL, RCPT (recipients both accept),
DATA, content carrying one unique marker line per would-be message, end-of-data look-alikes
(`\\n.\\n`, `\\r.\\r`, `\\r\\n.\\r`...) at odd places, bare CR, bare LF, NUL, commands pipelined
after a fake end, BDAT, RSET, second transactions. The client sends one group of commands, waits
for the replies a well-behaved server gives to that group (or a short timeout), sends the next.

A smuggling candidate is the relay delivering a marker the reference did not, or grouping markers
into messages differently (an injected or split message), or a delivered body that differs. The
relay refusing what the reference took is the relay being stricter (DESIGN.md §5): counted, not a
failure, unless the relay acknowledged with a 250 a message it never delivered.
"""

from __future__ import annotations

import itertools
import random
import re
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace

__all__ = [
    "CLIENT_IP",
    "Delivered",
    "Group",
    "Outcome",
    "Stream",
    "Transcript",
    "Verdict",
    "compare",
    "delivered_by_stream",
    "loosely",
    "make_stream",
    "run_all",
    "run_session",
    "sender",
]

CLIENT_IP = "127.0.0.5"
# One domain: each MTA delivers a message to both in one transaction (one next hop).
RECIPIENTS = (b"user@remote.example", b"other@remote.example")
#: How long the client waits for a group's replies; a server that holds on (content not ended,
#: a command it reads as content) costs this much, then the next group is sent anyway.
REPLY_WAIT = 3.0
#: How long the client waits, after QUIT, for the server to close.
CLOSE_WAIT = 3.0
MARKER = re.compile(rb"MARK(\d+)x(\d+)")
#: The 250 that acknowledges a message (the relay's, Postfix's).
ACK = re.compile(r"^250[ -].*(Queued mail for delivery|[Qq]ueued as )")

# End-of-data look-alikes: none of them is CRLF.CRLF, so none may end the content (RFC 5321 §4.1.1.4).
FAKE_ENDS = (
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r",
    b"\r\n.\r",
    b".\r\n",
    b"\r.\r\n",
    b"\r\n\x00.\r\n",
    b"\r\r\n.\r\r\n",
    b"\n.\r",
    b"\r.\n",
)
# Bytes dropped at random places inside content.
NOISE = (b"\r", b"\n", b"\x00", b".", b"..", b".\r\n", b"\r\n.", b" ", b"\t", b"\xc3\xa9")
# A stream in two of five has no bare CR or LF in its content: RelayGate refuses any (Postfix only
# bare LFs), so these are the streams where both deliver and the boundaries can be compared.
_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
CLEAN_FAKE_ENDS = tuple(f for f in FAKE_ENDS if not _BARE_CR_OR_LF.search(f))
CLEAN_NOISE = tuple(n for n in NOISE if not _BARE_CR_OR_LF.search(n))


def sender(index: int) -> bytes:
    """Every MAIL of stream `index` names it, so a delivery is attributed to its stream."""
    return b"d%d@corp.example" % index


@dataclass
class Group:
    """Bytes the client sends before waiting, the writes they are cut into, and how many replies a
    well-behaved server gives to them."""

    data: bytes
    cuts: list[int]
    replies: int


@dataclass
class Stream:
    index: int
    groups: list[Group]

    def sent_markers(self, groups: int) -> set[bytes]:
        """The markers in the first `groups` groups: all a server that hung up then could see."""
        return {m.group(0) for g in self.groups[:groups] for m in MARKER.finditer(g.data)}


@dataclass
class Transcript:
    received: bytes = b""
    closed: bool = False
    #: Groups sent before the server was seen to close: it never saw the later ones.
    groups_sent: int = 0
    #: Groups after which the client stopped waiting for fewer replies than a well-behaved
    #: server gives (the server held on, or was slow: then the next group came early).
    short_waits: int = 0

    def reply_lines(self) -> list[str]:
        return self.received.decode("utf-8", "replace").split("\r\n")

    def acks(self) -> int:
        return sum(1 for line in self.reply_lines() if ACK.match(line))


@dataclass(frozen=True)
class Delivered:
    """One message as a sink received it: its envelope, its markers in order, its body."""

    sender: str
    recipients: tuple[str, ...]
    markers: tuple[bytes, ...]
    body: bytes


@dataclass
class Outcome:
    transcript: Transcript
    delivered: list[Delivered]


# -- streams ---------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, rng: random.Random, index: int) -> None:
        self.rng = rng
        self.index = index
        self.markers: list[bytes] = []
        self.groups: list[Group] = []
        clean = rng.random() < 0.4
        self.fake_ends = CLEAN_FAKE_ENDS if clean else FAKE_ENDS
        self.noise = CLEAN_NOISE if clean else NOISE

    def marker(self) -> bytes:
        m = b"MARK%dx%d" % (self.index, len(self.markers))
        self.markers.append(m)
        return m

    def add(self, data: bytes, replies: int, *, join: bool = False) -> None:
        """A group; `join`: pipelined onto the previous group instead (no wait in between)."""
        if join and self.groups:
            last = self.groups[-1]
            last.data += data
            last.replies += replies
            return
        self.groups.append(Group(data, [], replies))

    def envelope(self) -> tuple[bytes, int]:
        rcpts = self.rng.sample(RECIPIENTS, self.rng.randint(1, 2))
        data = b"MAIL FROM:<%s>\r\n" % sender(self.index)
        data += b"".join(b"RCPT TO:<%s>\r\n" % r for r in rcpts)
        return data + b"DATA\r\n", 2 + len(rcpts)

    def line(self) -> bytes:
        rng = self.rng
        kind = rng.random()
        if kind < 0.5:
            return b"text %d\r\n" % rng.randint(0, 10**6)
        if kind < 0.65:
            return b"..dot-stuffed line\r\n"
        if kind < 0.75:
            return b"\r\n"
        if kind < 0.85:
            return b"MAIL FROM:<%s>\r\n" % sender(self.index)  # inside content: content
        return b"word" + rng.choice(self.noise) + b"word\r\n"

    def segment(self) -> bytes:
        """Content lines around one marker line."""
        lines = [self.line() for _ in range(self.rng.randint(0, 3))]
        lines.insert(self.rng.randint(0, len(lines)), b"marker " + self.marker() + b"\r\n")
        return b"".join(lines)

    def content(self) -> bytes:
        """A message's content through its real end, with fake ends and smuggled transactions
        between segments, and noise."""
        rng = self.rng
        header = b"From: app@corp.example\r\nSubject: diff %d\r\n\r\n" % self.index
        parts = [header, self.segment()]
        for _ in range(rng.choices((0, 1, 2), (4, 5, 1))[0]):
            fake = rng.choice(self.fake_ends)
            # SEC Consult's payload: a second transaction behind the fake end.
            smuggled = self.envelope()[0] + header if rng.random() < 0.7 else b""
            parts.append(fake + smuggled + self.segment())
        content = b"".join(parts)
        for _ in range(rng.choices((0, 1, 2), (6, 3, 1))[0]):
            at = rng.randint(0, len(content))
            at -= content[at - 1 : at + 1] == b"\r\n"  # not between a CR and its LF
            for marker in MARKER.finditer(content):  # nor inside a marker: it would hide it
                if marker.start() < at < marker.end():
                    at = marker.start()
            content = content[:at] + rng.choice(self.noise + self.fake_ends) + content[at:]
        if not content.endswith(b"\r\n") and rng.random() < 0.8:
            content += b"\r\n"
        return content + b".\r\n"

    def transaction(self, first: bool) -> None:
        rng = self.rng
        envelope, replies = self.envelope()
        bdat = rng.random() < 0.08
        if bdat:  # CHUNKING: the chunk's bytes are content, whatever they look like
            content = self.content()
            envelope = envelope.replace(b"DATA\r\n", b"BDAT %d LAST\r\n" % len(content)) + content
        # After a message, the next transaction may be pipelined behind its end (RFC 2920); behind
        # EHLO it may not (a synchronisation error for the relay, not for Postfix 3.7): rarely.
        self.add(envelope, replies, join=rng.random() < (0.05 if first else 0.3))
        if bdat:
            return
        if rng.random() < 0.08:  # content sent before the 354: a synchronisation error
            self.groups[-1].data += self.content()
        else:
            self.add(self.content(), 1)
        if rng.random() < 0.15:
            self.add(b"RSET\r\n", 1, join=rng.random() < 0.5)

    def build(self) -> Stream:
        rng = self.rng
        self.add(rng.choice((b"EHLO client.corp.example\r\n",) * 9 + (b"HELO client\r\n",)), 1)
        for n in range(rng.randint(1, 3)):
            self.transaction(first=n == 0)
        self.add(b"QUIT\r\n", 1, join=rng.random() < 0.5)
        for group in self.groups:
            if rng.random() < 0.1:  # a bare line end somewhere in the commands
                at = group.data.find(b"\r\n", rng.randint(0, len(group.data)))
                if at > 0:
                    group.data = group.data[:at] + rng.choice((b"\n", b"\r")) + group.data[at + 2 :]
            n = len(group.data)
            group.cuts = sorted(rng.sample(range(1, n), min(n - 1, rng.randint(0, 4))))
        return Stream(self.index, self.groups)


def make_stream(seed: int, index: int) -> Stream:
    """Stream `index` of the run with `seed` (each stream from its own generator: one failing
    stream is reproduced alone from the seed and its index)."""
    return _Builder(random.Random(f"{seed}:{index}"), index).build()


# -- sessions --------------------------------------------------------------------------------------
def _complete_replies(received: bytes) -> int:
    return sum(1 for line in received.split(b"\r\n")[:-1] if line[3:4] != b"-")


def _read_until(sock: socket.socket, t: Transcript, replies: int, timeout: float) -> bool:
    """Read until `replies` complete replies in all or the server closes (True), or `timeout`
    (False)."""
    deadline = time.monotonic() + timeout
    while not t.closed and _complete_replies(t.received) < replies:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return False
        except OSError:
            chunk = b""
        if not chunk:
            t.closed = True
        t.received += chunk
    return True


def run_session(port: int, source: str, stream: Stream) -> Transcript:
    """Send `stream` to 127.0.0.1:`port` group by group, each in its writes; every reply read."""
    t = Transcript()
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        expected = 1
        _read_until(s, t, expected, 5.0)  # the greeting
        for group in stream.groups:
            bounds = [0, *group.cuts, len(group.data)]
            try:
                for a, b in itertools.pairwise(bounds):
                    s.sendall(group.data[a:b])
            except OSError:
                t.closed = True
                break
            t.groups_sent += 1
            expected += group.replies
            if not _read_until(s, t, expected, REPLY_WAIT):
                t.short_waits += 1
            if t.closed:
                break
        _read_until(s, t, 10**6, CLOSE_WAIT)
    return t


def run_all(clients: list[tuple[int, str]], stream: Stream) -> list[Transcript]:
    """The stream sent to each (port, client address) at once (the same bytes and writes, in
    parallel)."""
    out: list[Transcript | BaseException] = [Transcript() for _ in clients]

    def one(i: int) -> None:
        try:
            out[i] = run_session(*clients[i], stream)
        except BaseException as exc:  # re-raised in the caller's thread
            out[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(clients))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    transcripts = []
    for o in out:
        if isinstance(o, BaseException):
            raise o
        transcripts.append(o)
    return transcripts


# -- deliveries ------------------------------------------------------------------------------------
_FOLDED = re.compile(rb"[\r\n\t .]+")
_SENDER_INDEX = re.compile(r"^d(\d+)@corp\.example$")


def body_of(content: bytes) -> bytes:
    """The content (NULs removed) from the line of its first marker on: what is above is the
    header, where each MTA adds its own fields and Postfix repairs a malformed one (a line that is
    no header field ends the header: Postfix puts the empty line before it, the relay keeps the
    bytes as sent)."""
    first = MARKER.search(content)
    start = content.rfind(b"\n", 0, first.start()) + 1 if first else len(content)
    return content[start:]


def delivered_by_stream(
    messages: list[tuple[str, list[str], bytes]],
) -> dict[int, list[Delivered]]:
    """A sink's messages by the stream their sender names (order kept). NULs are removed first:
    RelayGate removes them on delivery (README "Receiving"), Postfix keeps them, and one inside
    a marker would hide it on one side only."""
    out: dict[int, list[Delivered]] = {}
    for mail_from, rcpts, raw in messages:
        m = _SENDER_INDEX.match(mail_from)
        index = int(m.group(1)) if m else -1
        content = raw.replace(b"\x00", b"")
        d = Delivered(
            mail_from,
            tuple(sorted(rcpts)),
            tuple(x.group(0) for x in MARKER.finditer(content)),
            body_of(content),
        )
        out.setdefault(index, []).append(d)
    return out


def _describe(ds: list[Delivered]) -> str:
    return "; ".join(f"{list(d.markers)} to {list(d.recipients)}" for d in ds) or "nothing"


@dataclass
class Verdict:
    #: Smuggling candidates (and 250s for messages never delivered): the test fails on these.
    problems: list[str] = field(default_factory=list)
    #: The reference delivered a message the relay did not (the relay is stricter).
    stricter: bool = False
    #: Relay deliveries made of bytes the reference never read: it had hung up before them
    #: (Postfix ends the session at a command with a bare LF; the relay refuses that line and
    #: reads on, security-bar item 32).
    uncompared: int = 0
    #: Relay messages delivered as the reference delivered them whose 250 the client never read:
    #: the relay ended the session (a later line it refuses) while the client was still writing,
    #: and the client's kernel threw the unread replies away at the RST that data arriving after
    #: the close brings. Not smuggling (the client meant the message); the client would send it
    #: again (a duplicate).
    replies_lost: int = 0


def loosely(d: Delivered) -> Delivered:
    """`d` with its body's line breaks, white space and periods folded: how each MTA passes on
    a bare CR or LF it accepted differs (RelayGate makes each a CRLF, Postfix's `normalize` a bare
    LF a CRLF and a bare CR a space; a period after a bare LF is a line's first octet for Postfix,
    removed as dot-stuffing, not for RelayGate), not which bytes belong to which message. From the
    first marker on: a bare CR or LF before it on its line starts the line there for one MTA only."""
    first = MARKER.search(d.body)
    body = d.body[first.start() :] if first else d.body
    return replace(d, body=_FOLDED.sub(b" ", body).strip())


def compare(stream: Stream, relay: Outcome, reference: Outcome, *, exact: bool = True) -> Verdict:
    """What the relay delivered that the reference did not deliver as the same message (same
    envelope, same markers in the same order, same body; `exact` False: the same `loosely`), a
    250 the relay gave for a message it never delivered; and whether the reference delivered
    something the relay did not."""
    v = Verdict()
    problems = v.problems
    for d in relay.delivered:
        if _BARE_CR_OR_LF.search(d.body):  # security-bar item 79: never passed on
            problems.append(f"{list(d.markers)}: relay delivered a bare CR or LF: {d.body!r}")
    if not exact:
        relay = Outcome(relay.transcript, [loosely(d) for d in relay.delivered])
        reference = Outcome(reference.transcript, [loosely(d) for d in reference.delivered])
    unmatched = Counter(reference.delivered)
    by_markers = {d.markers: d for d in reference.delivered}
    seen = stream.sent_markers(reference.transcript.groups_sent)
    # A message without a marker cannot be placed in the stream: compared only when the
    # reference read all of it.
    hung_up = reference.transcript.groups_sent < len(stream.groups)
    for d in relay.delivered:
        if unmatched[d] > 0:
            unmatched[d] -= 1
            continue
        twin = by_markers.get(d.markers)
        if twin is None and not seen.intersection(d.markers) and (d.markers or hung_up):
            v.uncompared += 1
        elif twin is None:
            problems.append(
                f"relay delivered {list(d.markers)} as one message; the reference: "
                f"{_describe(reference.delivered)}"
            )
        elif (twin.sender, twin.recipients) != (d.sender, d.recipients):
            problems.append(f"{list(d.markers)}: envelope {d} != reference {twin}")
        else:
            problems.append(
                f"{list(d.markers)}: relay body {d.body!r} != reference body {twin.body!r}"
            )
    acked, delivered = relay.transcript.acks(), len(relay.delivered)
    replies_lost = acked < delivered and relay.transcript.closed and not problems
    if acked != delivered and not replies_lost:
        problems.append(f"relay acknowledged {acked} messages with 250, delivered {delivered}")
    v.replies_lost = delivered - acked if replies_lost else 0
    v.stricter = sum(unmatched.values()) > 0
    return v
