"""The C allocator's thresholds for a process that copies whole messages.

glibc's malloc gives a freed block of 128 KiB or more straight back to the kernel: such a block is
mapped with mmap, and it raises that threshold only once a block that big has been freed, while the
heap's top is trimmed whenever more than twice the threshold is free there. A big message arrives
in chunks of up to 256 KiB, is joined once and copied once more with the Received header put
first, and the transport buffers what the next hop has not taken yet, so at one session each of
those buffers was fresh pages from the kernel: ~400 page faults and about 1 ms of system CPU per
1 MB message (docs/benchmarks.md, eleventh session). Blocks up to `HEAP_BLOCK` now come from the heap, and up to `KEEP_FREE` of free heap stays
with the process for the next message. A process holds no more for it than the peak of what its
messages in transit need (that is bounded, `smtp/limits.py`), plus `KEEP_FREE`.

Other C libraries (musl, macOS) are left alone: `tune_malloc` says so and does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

__all__ = ["HEAP_BLOCK", "KEEP_FREE", "tune_malloc"]

logger = logging.getLogger("relaygate")

HEAP_BLOCK = 4 << 20  # M_MMAP_THRESHOLD: blocks up to this size come from the heap
KEEP_FREE = 16 << 20  # M_TRIM_THRESHOLD: free heap kept at its top before it is given back

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _glibc() -> str | None:
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None
    return version if version and version.startswith("glibc") else None


def tune_malloc() -> bool:
    """Set the thresholds above in this process. True when they were set (glibc only)."""
    version = _glibc()
    if version is None:
        logger.info("malloc: not glibc, its thresholds are left as they are")
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_THRESHOLD, HEAP_BLOCK) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_FREE) == 1
    if ok:
        logger.info(
            "malloc (%s): blocks up to %d MiB from the heap, %d MiB of free heap kept",
            version,
            HEAP_BLOCK >> 20,
            KEEP_FREE >> 20,
        )
    else:
        logger.warning("malloc (%s): mallopt refused the thresholds", version)
    return ok
