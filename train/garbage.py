"""Python's cyclic garbage collector on the trainer's schedule instead of its own.

CPython starts a collection whenever allocations outnumber deallocations by a threshold; a
full (generation-2) collection walks every tracked object, which in a trainer holding a model,
DeepSpeed's engine and their modules took 285 ms in the CPU smoke run (bench/RESULTS.md). It
lands at a random step on each rank, so in data or pipeline parallelism every rank waits for
the slowest: one rank's pause stalls them all, at a different step each time.

torchtitan (`training.gc_freq`) and Megatron-Core (`--manual-gc`, `--manual-gc-interval`)
turn automatic collection off and collect every N steps, on every rank at the same step. This
follows them, and also freezes what exists once setup is done (`gc.freeze`: the model, the
engine, imported modules), so a scheduled collection walks only what the steps allocated since
and is cheaper: 0.3-0.5 ms in a smoke run without evaluation or checkpoints, 30-72 ms in the
full smoke run, whose evaluations and saves leave objects every later collection walks
(bench/RESULTS.md). Either way it lands on every rank at the same step. Frozen objects are
still freed when their last reference goes; only cycles among them would stay.
`trainer.gc_interval=0` leaves Python's automatic collector as it is.
"""

from __future__ import annotations

import gc
import time


class GarbageSchedule:
    """Disables automatic collection on `start()`, collects every `interval` steps in `step()`
    and restores Python's collector on `close()` (in-process users such as tests and benchmarks
    go on with it as before)."""

    def __init__(self, interval: int):
        self.interval = interval
        self.active = False
        self.collections = 0
        self.seconds = 0.0  # spent in scheduled collections
        self.freed = 0  # unreachable objects they found (cycles the steps left behind)

    def start(self) -> None:
        if not self.interval or self.active:
            return
        self.was_enabled = gc.isenabled()
        gc.collect()  # setup's garbage, before the survivors are frozen
        gc.freeze()
        gc.disable()
        self.active = True

    def step(self, step: int) -> None:
        if self.active and step % self.interval == 0:
            t = time.perf_counter()
            self.freed += gc.collect()  # every generation: only the objects created since start() are walked
            self.seconds += time.perf_counter() - t
            self.collections += 1

    def close(self) -> None:
        if not self.active:
            return
        self.active = False
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()
