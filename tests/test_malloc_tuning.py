"""relaygate.malloc_tuning.tune_malloc: big message copies reuse heap memory instead of fresh pages."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from relaygate.malloc_tuning import _glibc

# A fresh interpreter copies a 1 MB message the way the receive path does (the chunks joined, a
# header put first) and reports its minor page faults: each copy is new memory unless the
# allocator keeps the freed blocks.
_COPIES = textwrap.dedent(
    """
    import resource, sys
    from relaygate.malloc_tuning import tune_malloc
    if sys.argv[1] == "tuned":
        assert tune_malloc()
    chunks = [bytes([65 + i]) * 262144 for i in range(4)]
    def one_message():
        content = b"".join(chunks)
        data = b"Received: from x\\r\\n" + content
        wire = data + b".\\r\\n"
        return len(wire)
    for _ in range(5):
        one_message()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):
        one_message()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


def _faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _COPIES, mode],
        check=True,
        capture_output=True,
        text=True,
        # glibc's defaults, whatever the environment running the suite sets
        env={
            k: v
            for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"
        },
    )
    return int(out.stdout)


@pytest.mark.skipif(_glibc() is None, reason="mallopt's thresholds are glibc's")
def test_tuned_process_copies_big_messages_without_page_faults() -> None:
    untuned, tuned = _faults("untuned"), _faults("tuned")
    # 50 messages of three 1 MB copies: untuned, glibc maps fresh pages for most of them
    assert untuned > 50 * 256, untuned
    assert tuned < 50, (tuned, untuned)


def test_other_c_libraries_are_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from relaygate import malloc_tuning

    monkeypatch.setattr(malloc_tuning, "_glibc", lambda: None)
    assert malloc_tuning.tune_malloc() is False
