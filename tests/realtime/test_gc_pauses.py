"""realtime/gc_pauses.py: collections timed per generation, and the loaded heap kept out of later collections."""

from __future__ import annotations

import gc

from realtime.gc_pauses import GcPauses, freeze_heap


def test_each_collection_is_counted_and_timed_in_its_generation() -> None:
    pauses = GcPauses()
    pauses.install()
    pauses.install()  # once per process, however often asked
    try:
        assert gc.callbacks.count(pauses._callback) == 1
        gc.collect(1)
        gc.collect(2)
        gc.collect(2)
    finally:
        gc.callbacks.remove(pauses._callback)
    assert pauses.collections[2] == 2 and pauses.collections[1] >= 1
    assert pauses.seconds[2] >= pauses.longest[2] > 0


def test_frozen_objects_are_no_longer_walked_by_a_full_collection() -> None:
    """What a full collection walks shrinks to what is allocated after the freeze."""
    held = [[i] for i in range(200_000)]  # tracked containers, as a loaded model's modules and dicts are
    try:
        frozen = freeze_heap()
        assert frozen >= len(held)
        assert gc.get_freeze_count() == frozen
        walked = sum(len(gc.get_objects(g)) for g in range(3))
        assert walked < len(held)  # the lists are frozen, not in any generation
    finally:
        gc.unfreeze()  # this test process goes on collecting as before
    assert sum(len(gc.get_objects(g)) for g in range(3)) >= len(held)
    del held
