"""Faults: preemption signals, the loss-spike detector, and fault injection for tests.

Preemption: SIGTERM or SIGUSR1 (SLURM's `--signal=B:USR1@…` warning, torchrun's SIGTERM on
shutdown) only sets a flag here. The flag travels in the one all-reduce every step already
makes (train/trainer.py `_decide`, the step guard), so all ranks learn of a signal on any rank at the same
step, save, and leave with EXIT_PREEMPTED.

Loss spikes: `SpikeDetector` flags a step whose loss exceeds the mean of the last `window`
accepted losses by `k` standard deviations (and by `min_rise` × mean, so a flat stretch with a
tiny spread does not flag noise). Every rank runs it on the same all-reduced loss, so every rank
decides the same; its state is checkpointed, so a resumed run decides as the uninterrupted one.
Followed: PaLM's recovery recipe (restart from a checkpoint before the spike and skip the data
batches around it) and OLMo's / Megatron's skip-the-update on non-finite values.

Fault injection (tests only): MOEFORGE_FAULTS="what@where[:rank][,…]", e.g.
  nan_loss@5        the loss of step 5 is NaN on every rank (nan_loss@5:1 on rank 1 only)
  nan_grad@5:1      finite loss, NaN gradients on rank 1 at step 5
  spike@30          step 30's loss (and gradient) × 20 on the named rank(s)
  kill@save:shards:1#2   SIGKILL rank 1 the 2nd time it reaches save phase "shards"
Save phases: writing (half of a rank file written), shards (all files written, before the
manifest), manifest (manifest written, before the rename), renamed (before the `latest` pointer).
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved, please run again (launch/slurm.sbatch requeues on it)
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    """Remembers that a preemption signal arrived; install() in the main thread."""

    def __init__(self):
        self.signum: int | None = None

    def install(self) -> None:
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        del frame
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


class SpikeDetector:
    def __init__(self, window: int, k: float, min_rise: float, warmup: int):
        self.window, self.k, self.min_rise, self.warmup = window, k, min_rise, warmup
        self.losses: deque[float] = deque(maxlen=window)

    def threshold(self) -> float | None:
        if len(self.losses) < max(self.warmup, 2):
            return None
        mean = math.fsum(self.losses) / len(self.losses)
        var = math.fsum((x - mean) ** 2 for x in self.losses) / (len(self.losses) - 1)
        return mean + max(self.k * math.sqrt(var), self.min_rise * abs(mean))

    def is_spike(self, loss: float) -> bool:
        limit = self.threshold()
        return limit is not None and loss > limit

    def accept(self, loss: float) -> None:
        self.losses.append(loss)

    def state_dict(self) -> dict:
        return {"losses": list(self.losses)}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque((float(x) for x in state.get("losses", [])), maxlen=self.window)


class Faults:
    """Parsed MOEFORGE_FAULTS (empty in real runs)."""

    def __init__(self, spec: str, rank: int):
        self.rank = rank
        self.items: list[tuple[str, str, int | None, int]] = []
        self.seen: dict[str, int] = {}
        for item in filter(None, (s.strip() for s in spec.split(","))):
            what, _, where = item.partition("@")
            count = 1
            if "#" in where:
                where, _, n = where.partition("#")
                count = int(n)
            target = None
            head, _, tail = where.rpartition(":")
            if head and tail.isdigit() and (what != "kill" or head.count(":") >= 1):
                where, target = head, int(tail)
            self.items.append((what, where, target, count))

    @classmethod
    def from_environ(cls, rank: int) -> "Faults":
        return cls(os.environ.get("MOEFORGE_FAULTS", ""), rank)

    def _mine(self, what: str, where: str) -> bool:
        return any(w == what and loc == where and t in (None, self.rank) for w, loc, t, _ in self.items)

    def loss_fault(self, step: int) -> str | None:
        """'nan_loss', 'nan_grad' or 'spike' when injected at this (1-based) step on this rank.

        Once per process: a step reached again after a rollback trains on new data, so it does
        not repeat the fault (a new process — a resumed run — does)."""
        for what in ("nan_loss", "nan_grad", "spike"):
            key = f"{what}@{step}"
            if self._mine(what, str(step)) and key not in self.seen:
                self.seen[key] = 1
                return what
        return None

    def armed(self, phase: str) -> bool:
        """Whether some kill waits at save phase `phase` (callers skip fault-only work otherwise)."""
        return any(what == "kill" and where == f"save:{phase}" for what, where, _, _ in self.items)

    def fires(self, phase: str) -> bool:
        """Whether this pass through save phase `phase` is where a kill was asked for (counts the pass).
        An asynchronous save asks this for its phases when it hands the save to the writer process,
        which then kills the rank at them (train/checkpoint_writer.py)."""
        hit = False
        for what, where, target, count in self.items:
            if what == "kill" and where == f"save:{phase}" and target in (None, self.rank):
                self.seen[phase] = self.seen.get(phase, 0) + 1
                hit = hit or self.seen[phase] == count
        return hit

    def crash_point(self, phase: str) -> None:
        """SIGKILL this process at a save phase when asked to."""
        if self.fires(phase):
            os.kill(os.getpid(), signal.SIGKILL)


class _NanGrad(torch.autograd.Function):
    """Identity forward; NaN gradient backward (an injected non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject(loss: torch.Tensor, fault: str | None) -> torch.Tensor:
    if fault == "nan_loss":
        return loss * float("nan")
    if fault == "nan_grad":
        return _NanGrad.apply(loss)
    if fault == "spike":
        return loss * 20.0
    return loss
