"""Weight gradients computed later in backward than the data gradients they come with.

An expert GEMM's backward has two halves: the data gradient dX, which the reverse all-to-all
waits for, and the weight gradient dW, which nothing in the layer waits for. Computing dX first,
sending it, and computing dW while it travels hides the reverse dispatch behind dW — the
split of backward into "input" and "weight" parts that DeepSeek-V3's DualPipe (§3.2) and
zero-bubble pipelines schedule, and that Megatron-Core's MoE all-to-all overlap uses
(`--delay-wgrad-compute`). Followed here in the form autograd allows without bypassing it:

- the expert functions, given a `DeferredWgrad`, return no weight gradient in backward and
  queue a job that computes it;
- `anchor()` adds one autograd node that takes the weights as inputs and, in backward, runs the
  queued jobs and returns their sum, so the weights' gradients still arrive through autograd
  (`AccumulateGrad`, and with it DeepSpeed's gradient hooks) exactly once per step.

When it runs: autograd runs the ready node with the highest sequence number first (the order
nodes were recorded in forward). The dispatcher records the anchor after starting the dispatch
and before the experts run, so in backward it becomes due after every expert backward of the
layer (recorded later) and before the nodes that wait for the reverse dispatch (recorded
earlier): dW runs while those bytes move. Should that order ever break, the anchor or a late
expert backward raises instead of dropping a gradient.
"""

from __future__ import annotations

from typing import Callable

import torch


class DeferredWgrad:
    """The weight-gradient jobs of one layer call; `params` are the weights they are for."""

    def __init__(self, params: tuple[torch.nn.Parameter, ...]):
        self.params = params
        self.jobs: list[Callable[[], dict[int, torch.Tensor]]] = []
        self.pending = 0  # expert functions recorded in forward whose backward has not run
        self.done = False

    def slot(self, param: torch.Tensor) -> int:
        """The index of `param` among the anchored weights."""
        for i, p in enumerate(self.params):
            if p is param:
                return i
        raise ValueError("deferred weight gradient for a tensor the anchor does not hold")

    def expect(self) -> None:
        """Forward: one more function will queue a job in backward."""
        self.pending += 1

    def push(self, job: Callable[[], dict[int, torch.Tensor]]) -> None:
        """Backward: `job()` returns {slot: gradient}; run when the anchor's backward runs."""
        if self.done:
            raise RuntimeError("deferred weight gradient: an expert backward ran after the layer's "
                               "anchor; autograd's order assumption is broken (model/wgrad.py)")
        self.jobs.append(job)
        self.pending -= 1

    def run(self) -> list[torch.Tensor | None]:
        if self.pending:
            raise RuntimeError(f"deferred weight gradient: the anchor ran before {self.pending} expert "
                               "backward(s) of its layer; autograd's order assumption is broken (model/wgrad.py)")
        self.done = True
        grads: list[torch.Tensor | None] = [None] * len(self.params)
        jobs, self.jobs = self.jobs, []
        for job in jobs:
            for i, g in job().items():
                grads[i] = g if grads[i] is None else grads[i] + g
        return grads


class _Anchor(torch.autograd.Function):
    @staticmethod
    def forward(ctx, queue: DeferredWgrad, *params):
        ctx.queue = queue
        return params[0].new_zeros(())

    @staticmethod
    def backward(ctx, _grad):
        return None, *ctx.queue.run()


def anchor(queue: DeferredWgrad) -> torch.Tensor:
    """A zero scalar to add to the layer's output; its backward runs the queued jobs."""
    return _Anchor.apply(queue, *queue.params)
