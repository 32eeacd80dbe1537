"""relaygate.app.tune_gc: what a serving process does to CPython's collector after start-up."""

from __future__ import annotations

import gc

from relaygate.app import GC_THRESHOLDS, tune_gc


def test_tune_gc_freezes_start_up_objects_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gc.unfreeze()
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 1000  # this interpreter's modules at least

        # cyclic garbage made afterwards is still collected
        class Node:
            pass

        a, b = Node(), Node()
        a.other, b.other = b, a  # type: ignore[attr-defined]
        del a, b
        assert gc.collect() >= 2
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
