"""Each DeepSpeed optimizer kind moeforge can get, with parallel/ds_hooks.py installed (one process).

    python tests/unit/ds_hooks_worker.py OUT.json

For every kind: an applied step (hooks fired once, the recorded norm equals the true norm),
a step the guard skips (parameters bitwise unchanged, counted by DeepSpeed), a NaN gradient
(the guard sees the flag), and the same step with the hook bypassed the way a DeepSpeed
upgrade could bypass it (must raise HookBypassed).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from parallel import ds_hooks  # noqa: E402
from parallel import engine as ds_engine  # noqa: E402

KINDS = {"fp32_stage0": (False, 0), "fp32_zero1": (False, 1), "bf16_stage1": (True, 1), "bf16_zero2": (True, 2)}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 1)
        self.nan = False

    def forward(self, x):
        x = x.to(self.a.weight.dtype)
        loss = self.b(torch.tanh(self.a(x))).float().square().mean() * 100.0  # gradients above the clip
        return loss * float("nan") if self.nan else loss


class Verdict:
    def __init__(self, skip: bool):
        self.skip = skip


def build(bf16: bool, stage: int, bypass: str | None = None):
    torch.manual_seed(0)
    module = Tiny()
    cfg = ds_engine.deepspeed_config(micro_batch_size=4, grad_accum=1, zero_stage=stage, grad_clip=1.0, bf16=bf16,
                                     lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, device_type="cpu")
    engine, _ = ds_engine.initialize(module, [{"params": list(module.parameters())}], cfg)
    hooks = ds_hooks.Hooks(engine)
    state = {"skip": False, "flags": []}

    def decide():
        state["flags"].append(float(ds_hooks.local_grads_nonfinite(engine)))
        return Verdict(state["skip"])

    if cfg["zero_optimization"]["stage"] == 0:
        hooks.install_grad_norm()
    hooks.install_step_guard(decide)
    if bypass == "guard":  # an upgrade that no longer calls the overflow check / wrapped step
        opt = engine.optimizer
        if hasattr(opt, "check_grad_overflow"):
            opt.check_grad_overflow = False
        else:
            opt.step = type(opt).step.__get__(opt)
    elif bypass == "norm":  # an upgrade whose stage-0 path no longer calls clip_fp32_gradients
        engine.clip_fp32_gradients = lambda: None
    return engine, hooks, state


def params(engine) -> list[torch.Tensor]:
    return [p.detach().float().clone() for p in engine.module.parameters()]


def step(engine, x) -> None:
    loss = engine(x)
    engine.backward(loss)
    engine.step()


def run_kind(bf16: bool, stage: int) -> dict:
    x = torch.randn(4, 8)
    engine, hooks, state = build(bf16, stage)
    out = {"optimizer": type(engine.optimizer).__name__, "stage": engine.zero_optimization_stage()}
    # 1. applied: the guard ran once; a stage-0 norm is the true norm of the unclipped gradient
    loss = engine(x)
    engine.backward(loss)
    true_norm = None
    if out["stage"] == 0:
        true_norm = torch.cat([p.grad.double().flatten() for p in engine.module.parameters()]).norm().item()
    before = params(engine)
    engine.step()
    hooks.take_verdict()
    out["applied_changed"] = any(not torch.equal(a, b) for a, b in zip(before, params(engine)))
    norm = engine.get_global_grad_norm()
    out["norm"], out["true_norm"] = (float(norm) if norm is not None else None), true_norm
    out["norm_is_tensor"] = isinstance(norm, torch.Tensor)
    # 2. skipped by the guard: bitwise unchanged, counted
    state["skip"], skipped = True, engine.skipped_steps
    before = params(engine)
    step(engine, x)
    hooks.take_verdict()
    out["skip_unchanged"] = all(torch.equal(a, b) for a, b in zip(before, params(engine)))
    out["skip_counted"] = engine.skipped_steps == skipped + 1
    # 3. a NaN gradient reaches the guard's flag
    state["skip"], engine.module.nan = False, True
    step(engine, x)
    hooks.take_verdict()
    out["flags"] = state["flags"]
    # 4. bypassed hooks are loud
    out["bypass"] = {}
    for what in ("guard", "norm") if out["stage"] == 0 else ("guard",):
        engine2, hooks2, _ = build(bf16, stage, bypass=what)
        try:
            step(engine2, x)
            hooks2.take_verdict()
            out["bypass"][what] = "not detected"
        except ds_hooks.HookBypassed as exc:
            out["bypass"][what] = str(exc)
    return out


def main(out_path: str) -> None:
    ds_engine.init_distributed(torch.device("cpu"))
    results = {name: run_kind(*kind) for name, kind in KINDS.items()}
    results["deepspeed"] = __import__("deepspeed").__version__
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1])
