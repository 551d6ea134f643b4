"""Every hook moeforge puts into DeepSpeed's internals, in one place.

DeepSpeed has no public callback between "gradients are ready" and "the optimizer updates",
nor a correct stage-0 gradient norm under a pipeline. These hooks supply both. Each one was
written against DeepSpeed 0.19.8 (`WRITTEN_FOR`) and is checked at run time: every optimizer
step must pass through the step guard, and a stage-0 run must pass through the norm hook, or
`check_fired` raises `HookBypassed` naming the hook. tests/unit/test_ds_hooks.py runs each
optimizer kind DeepSpeed can pick for us and fails when an upgrade stops calling a hook.

The hooks never read a device tensor on the host: the guard's flag and the norm stay tensors
(the trainer reads them once per step, with the losses, in the guard's single all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

WRITTEN_FOR = "0.19.8"  # the DeepSpeed version every hook below was written and tested against


class HookBypassed(RuntimeError):
    """DeepSpeed did not call one of our hooks (an upgrade changed its internals)."""


class Hooks:
    """The hooks installed into one engine, and whether each fired since the last check."""

    def __init__(self, engine):
        self.engine = engine
        self.fired: dict[str, int] = {}
        self.expected: list[str] = []
        self.verdict = None  # what the guard's decide() returned at the last update

    def _fire(self, name: str) -> None:
        self.fired[name] = self.fired.get(name, 0) + 1

    def check_fired(self) -> None:
        """After an optimizer step: raise HookBypassed unless every installed hook ran exactly once."""
        for name in self.expected:
            if self.fired.get(name, 0) != 1:
                raise HookBypassed(f"DeepSpeed {_installed_version()} ran an optimizer step without moeforge's "
                                   f"'{name}' hook ({self.fired.get(name, 0)} calls; written for DeepSpeed "
                                   f"{WRITTEN_FOR}): see parallel/ds_hooks.py")
        self.fired.clear()

    def take_verdict(self):
        """The step guard's verdict of the step that just ran (checks the hooks first)."""
        self.check_fired()
        verdict, self.verdict = self.verdict, None
        return verdict

    # ------------------------------------------------------------------ step guard
    def install_step_guard(self, decide: Callable[[], object]) -> None:
        """Call `decide()` on every rank right before each optimizer update; skip it when the verdict says so.

        `decide` returns a verdict with a `skip` attribute; it is collective (it all-reduces the
        step's losses and flags), so every rank makes the same choice at the same step. A skipped
        step goes through DeepSpeed's own overflow path: gradients cleared, parameters and
        optimizer state bitwise unchanged, `engine.skipped_steps` counts it.
        """
        opt = self.engine.optimizer
        self.expected.append("step guard")

        def judged() -> bool:
            self._fire("step guard")
            self.verdict = decide()
            return bool(self.verdict.skip)

        # DeepSpeed 0.19.8, DeepSpeedZeroOptimizer (fp32 ZeRO-1/2, bf16 ZeRO-2): `step` calls
        # `check_overflow` → `has_overflow(partition_gradients)` once, before the norm and the
        # update, when `check_grad_overflow` is set; an overflow clears the gradients and returns.
        # It also skips a step whose global gradient norm is not finite (global, so ranks agree).
        if hasattr(opt, "has_overflow") and hasattr(opt, "check_grad_overflow"):
            opt.check_grad_overflow = True
            opt.has_overflow = lambda partition_gradients=True: judged()
            return
        # DeepSpeed 0.19.8, every other optimizer (the torch AdamW of an fp32 run without ZeRO;
        # BF16_Optimizer of bf16 at stage 0/1): the engine's `_take_model_step` calls
        # `optimizer.step()` once per update and reads `optimizer.overflow` to count skipped steps.
        step = opt.step

        def guarded_step(*args, **kwargs):
            if judged():
                # BF16_Optimizer's zero_grad also zeroes its fp32 accumulators (clear_hp_grads):
                # the skipped step's gradients must not reach the next update.
                opt.zero_grad(set_to_none=True)
                opt.overflow = True
                return None
            opt.overflow = False
            return step(*args, **kwargs)

        opt.step = guarded_step

    # ------------------------------------------------------------------ stage-0 norm
    def install_grad_norm(self, expert_group=None) -> None:
        """Stage-0 (no ZeRO) clipping with the right global norm, kept for `get_global_grad_norm()`.

        DeepSpeed 0.19.8's engine, without ZeRO or bf16, calls `self.clip_fp32_gradients()` in
        `_take_model_step` before `optimizer.step()`; its version calls
        `deepspeed.runtime.utils.clip_grad_norm_`, which under a pipeline counts only the first
        stage's parameters and drops the value (measured: the logged norm of a pp=2 run was stage
        0's alone and clipping used it). Ours sums every stage once (tied replicas marked
        `ds_pipe_replicated` skipped, as ZeRO does) and each expert shard once over the
        expert-parallel group, and leaves the norm in `engine._global_grad_norm` (which
        `get_global_grad_norm()` returns) as a device tensor. No host read: the clip factor is
        applied as a tensor (a factor of exactly 1 leaves the gradients bitwise unchanged).
        """
        engine = self.engine
        self.expected.append("stage-0 gradient norm")

        def clip_and_record():
            self._fire("stage-0 gradient norm")
            grads, dense, expert = [], [], []
            for p in engine.module.parameters():
                if p.grad is None:
                    continue
                grads.append(p.grad.detach())  # every gradient is clipped, a tied replica's too
                if not getattr(p, "ds_pipe_replicated", False):  # counted once, on its first stage
                    (dense if getattr(p, "allreduce", True) else expert).append(p.grad.detach())
            device = grads[0].device if grads else torch.device("cpu")
            total = _sum_of_squares(dense, device)
            if expert_group is not None:
                sq = _sum_of_squares(expert, device)
                dist.all_reduce(sq, group=expert_group)
                total = total + sq
            elif expert:
                total = total + _sum_of_squares(expert, device)
            if engine.mpu is not None:
                dist.all_reduce(total, group=engine.mpu.get_model_parallel_group())
            norm = total.sqrt()
            coef = (engine.gradient_clipping() / (norm + 1e-6)).clamp(max=1.0)
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].dtype))
            engine._global_grad_norm = norm

        engine.clip_fp32_gradients = clip_and_record


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Σ‖g‖² in float64, on the gradients' device, without a host read."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm([g.double() for g in grads])
    return torch.stack(norms).square().sum()


def local_grads_nonfinite(engine) -> torch.Tensor:
    """1.0 when this rank's gradients for the coming update hold a NaN or an infinity, else 0.0 (float64 tensor).

    Reads, per optimizer kind (DeepSpeed 0.19.8): BF16_Optimizer's `fp32_groups_gradients_flat`
    (the fp32 sum of every micro-batch; a bf16 `.grad` holds at most the last one); ZeRO's
    `averaged_gradients` (this rank's reduced partitions, per group); otherwise `.grad`.
    """
    opt = engine.optimizer
    if hasattr(opt, "fp32_groups_gradients_flat"):
        grads = list(opt.fp32_groups_gradients_flat)
    elif hasattr(opt, "has_overflow") and hasattr(opt, "check_grad_overflow"):
        averaged = getattr(opt, "averaged_gradients", None)
        if not isinstance(averaged, dict):
            raise HookBypassed(f"DeepSpeed {_installed_version()}: ZeRO optimizer without `averaged_gradients` "
                               f"(written for {WRITTEN_FOR}): see parallel/ds_hooks.py")
        grads = [g for group in averaged.values() if group for g in group if g is not None]
    else:
        grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    bad = torch.stack([g.isfinite().all() for g in grads]).logical_not().any()
    return bad.to(torch.float64)


def _installed_version() -> str:
    try:
        import deepspeed

        return deepspeed.__version__
    except ImportError:  # pragma: no cover - DeepSpeed is a dependency
        return "?"
