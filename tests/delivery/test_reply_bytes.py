"""A next hop's reply with bytes that are not UTF-8, end to end: a real `relaygate serve`, a raw
next hop on loopback that answers the end of DATA with "250 2.0.0 Ok: queued as \\xff\\xfe"."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import tomlkit

from relaygate.config import load_config
from tests.smtp.conftest import RelayHandle, relay, relay_connector  # noqa: F401


class LatinHop:
    """Takes every message; its final reply to DATA has two bytes that are not UTF-8."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.messages = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: Any) -> None:
        with conn:
            conn.settimeout(10)
            f = conn.makefile("rb")
            conn.sendall(b"220 hop.example ESMTP\r\n")
            in_data = False
            for line in f:
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        with self.lock:
                            self.messages += 1
                        conn.sendall(b"250 2.0.0 Ok: queued as \xff\xfe\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    in_data = True
                    conn.sendall(b"354 go ahead\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()


def test_a_final_reply_that_is_not_utf8_is_recorded_and_the_message_sent_once(relay):  # noqa: F811
    """aiosmtplib reads a reply with surrogateescape: the queue store could not encode the reply
    (UnicodeEncodeError), the delivery that had succeeded was never recorded, and the message was
    sent again at every scan (25 copies in 25 s)."""
    hop = LatinHop()
    try:
        node: RelayHandle = relay([relay_connector(["127.0.0.5"])], mode="process", start=False)
        node.doc["send_connectors"][0]["port"] = hop.port
        node.doc["queue"]["transient_failure_retry_interval"] = "00:00:01"
        node.config_path.write_text(tomlkit.dumps(node.doc), encoding="utf-8")
        node.config = load_config(node.config_path)
        node.start()
        with node.smtp("127.0.0.5") as c:
            c.sendmail("scanner@corp.example", ["bob@corp.example"], b"Subject: x\r\n\r\nx\r\n")
        deadline = time.monotonic() + 20
        done = None
        while done is None and time.monotonic() < deadline:
            [msg] = node.messages()
            if all(r.status.name == "DELIVERED" for r in msg.recipients):
                done = msg
            time.sleep(0.2)
        assert done is not None, "the delivery was never recorded"
        assert done.recipients[0].last_error.startswith("250 2.0.0 Ok: queued as \ufffd\ufffd")
        time.sleep(3)  # more scans: nothing is sent again
        assert hop.messages == 1
    finally:
        hop.stop()
