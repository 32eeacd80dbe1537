"""Same client address, same worker: a classic BPF program on the SO_REUSEPORT group.

With ``server.workers = N`` every worker listens on the same port and the kernel picks one per new
connection. By default it hashes the whole 4-tuple, so one client's connections spread over every
worker. The program below makes the kernel pick the worker from the client's address alone (IPv4:
the address; IPv6: the XOR of its four words), so each source's sessions live in one process. (The
per-source limits hold without it too: where an address or a user can reach several workers,
the workers count messages and AUTH failures in a table they share, smtp/shared_rates.py; open
connections are counted in another, node_connections.py, with ``worker_balance = "connection"``.)

The program returns an index into the group's sockets. While a worker restarts the group is one
socket short; an index past its end makes the kernel fall back to its own hash, so nothing is refused
meanwhile. Linux only; elsewhere, or if the kernel refuses, `attach_source_steering` returns False
and one address's connections may reach every worker (README).
"""

from __future__ import annotations

import ctypes
import logging
import socket
import struct

__all__ = ["attach_source_steering", "source_steering_program"]

log = logging.getLogger(__name__)

SO_ATTACH_REUSEPORT_CBPF = 51  # <asm-generic/socket.h>
_NET = -0x100000  # SKF_NET_OFF: offsets relative to the network (IP) header

# classic BPF opcodes (<linux/filter.h>)
_LD_W_ABS = 0x20
_LD_B_ABS = 0x30
_RSH_K = 0x74
_MOD_K = 0x94
_XOR_X = 0xAC
_JEQ_K = 0x15
_TAX = 0x07
_RET_A = 0x16


def source_steering_program(workers: int) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions: socket index = hash(source address) % workers."""
    if workers < 1:
        raise ValueError("workers must be at least 1")

    def net(offset: int) -> int:
        return (_NET + offset) & 0xFFFFFFFF

    return [
        (_LD_B_ABS, 0, 0, net(0)),  # 0: version and header length
        (_RSH_K, 0, 0, 4),  # 1: version
        (_JEQ_K, 3, 0, 6),  # 2: IPv6 → 6
        (_LD_W_ABS, 0, 0, net(12)),  # 3: IPv4 source address
        (_MOD_K, 0, 0, workers),  # 4
        (_RET_A, 0, 0, 0),  # 5
        (_LD_W_ABS, 0, 0, net(8)),  # 6: IPv6 source address, word 0
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, net(12)),
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, net(16)),
        (_XOR_X, 0, 0, 0),
        (_TAX, 0, 0, 0),
        (_LD_W_ABS, 0, 0, net(20)),
        (_XOR_X, 0, 0, 0),
        (_MOD_K, 0, 0, workers),
        (_RET_A, 0, 0, 0),
    ]


def attach_source_steering(sock: socket.socket, workers: int) -> bool:
    """Attach the program to `sock`'s reuseport group (after listen()). False if it cannot be."""
    insns = source_steering_program(workers)
    filters = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    fprog = struct.pack("HL", len(insns), ctypes.addressof(filters))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)
    except OSError as exc:
        log.warning(
            "cannot steer connections by client address (%s): one address's connections may "
            "reach every worker, and max_inbound_connection_per_source is counted per worker "
            '(worker_balance = "connection" counts it for the node)',
            exc.strerror or exc,
        )
        return False
    return True
