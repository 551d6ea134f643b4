"""train/garbage.py: Python's cyclic collector on the trainer's step schedule."""

from __future__ import annotations

import gc
import weakref

from train.garbage import GarbageSchedule


class Node:
    pass


def cycle() -> weakref.ref:
    """A reference cycle nobody holds: only a collection frees it."""
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_collection_happens_at_the_scheduled_steps_only_and_python_gets_its_collector_back():
    assert gc.isenabled()
    before = gc.get_freeze_count()
    sched = GarbageSchedule(3)
    sched.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > before  # setup's survivors are frozen
        first = cycle()
        for _ in range(5000):  # far past gen 0's threshold: an automatic collection would free it
            cycle()
        assert first() is not None
        sched.step(1)
        sched.step(2)
        assert first() is not None and sched.collections == 0
        sched.step(3)
        assert first() is None and sched.collections == 1 and sched.seconds > 0
        assert sched.freed >= 2 * 5001  # both nodes of every cycle
    finally:
        sched.close()
    assert gc.isenabled() and gc.get_freeze_count() == before


def test_interval_zero_leaves_python_collecting_on_its_own():
    sched = GarbageSchedule(0)
    sched.start()
    try:
        assert gc.isenabled()
        first = cycle()
        for _ in range(5000):
            cycle()
        gc.collect(0)  # what the automatic collector does at its threshold
        assert first() is None
        sched.step(50)
        assert sched.collections == 0
    finally:
        sched.close()
    assert gc.isenabled()
