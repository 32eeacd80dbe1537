"""What a `relaygate` command costs before it does anything: importing the CLI.

Every verb an administrator (or a script, or the test suite) runs pays it. The model's type hints
were evaluated once per field the verbs' options asked about (typing.get_type_hints compiles every
annotation string of the class again each time): 0.6 s of a 1.25 s start.
"""

from __future__ import annotations

import json
import subprocess
import sys

COUNT_HINTS = """
import collections, json, typing
calls = collections.Counter()
original = typing.get_type_hints

def counting(obj, *args, **kwargs):
    calls[getattr(obj, "__qualname__", repr(obj))] += 1
    return original(obj, *args, **kwargs)

typing.get_type_hints = counting
import relaygate.cli
print(json.dumps(calls))
"""


def test_importing_the_cli_evaluates_each_model_class_type_hints_once() -> None:
    done = subprocess.run(
        [sys.executable, "-c", COUNT_HINTS], capture_output=True, text=True, timeout=60, check=True
    )
    calls = json.loads(done.stdout)
    assert calls, "the CLI asks for no type hints at import: this test measures nothing any more"
    assert max(calls.values()) == 1, calls
