"""Trainer options through the real CLI: torch.compile of the blocks, the batch-size ramp.

Measured on the 2-core CPU box (torch 2.13, inductor C++ backend):
- compile: the compiled run of the small MoE model below takes ~170 s with a cold inductor cache
  (~30 s warm; the MoE layer's `counts.tolist()` splits each block into several graphs, each a
  C++ compile); the eager run ~10 s. Compiled and eager losses agree to ~4e-8 relative.
- ramp, dp=1: ~20 s for both runs. Ramp, dp=1 against torchrun dp=2: ~35 s.
"""

from __future__ import annotations

import math

import pytest

from train.config import compose, to_config
from train.schedule import global_batch_at

from test_train_cli import TINY, metrics, run_train

PARITY = ["trainer.deterministic=true", "data.num_workers=0"]

# One MoE block (compiled; the dense path is the attention and shared expert inside it), with
# 4 experts instead of the smoke model's 16, to keep the cold compile short on CI.
SMALL_MOE = [*TINY, "model.n_layers=1", "model.n_dense_layers=0", "model.n_mtp_layers=1",
             "model.n_routed_experts=4", "model.n_activated_experts=2", "model.n_expert_groups=1",
             "model.n_limited_groups=1", *PARITY]


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), 1e-12)


@pytest.mark.slow
def test_compiled_blocks_compute_the_same_losses_as_eager(tmp_path, dataset, monkeypatch):
    # Dynamo's INFO log names every frame it traces and every call of the backend compiler: the
    # cheap way to see, from outside the process, that the blocks really went through inductor.
    monkeypatch.setenv("TORCH_LOGS", "dynamo")
    runs, logs = {}, {}
    for compiled in (False, True):
        run_dir = tmp_path / f"compile_{compiled}"
        r = run_train([f"data.path={dataset}", *SMALL_MOE, "trainer.max_steps=4",
                       f"trainer.compile={str(compiled).lower()}", f"hydra.run.dir={run_dir}"], tmp_path, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[compiled], logs[compiled] = metrics(run_dir), r.stderr
    traced_blocks = [line for line in logs[True].splitlines()
                     if "torchdynamo start tracing forward" in line and "model/block.py" in line]
    assert traced_blocks, logs[True][-3000:]
    assert "calling compiler function inductor" in logs[True]
    assert "torchdynamo start tracing" not in logs[False]  # compile=false compiles nothing
    eager, comp = runs[False], runs[True]
    assert [m["step"] for m in eager] == [m["step"] for m in comp] == [1, 2, 3, 4]
    for e, c in zip(eager, comp):
        for key in ("loss", "mtp_loss", "balance_loss"):
            assert rel(e[key], c[key]) <= 1e-5, (e["step"], key, e[key], c[key])
        assert rel(e["grad_norm"], c["grad_norm"]) <= 1e-4, (e["step"], e["grad_norm"], c["grad_norm"])
    assert len({m["loss"] for m in eager}) > 1  # the steps update the model: the comparison covers training


# TINY's seq_len 64 and micro batch 2; the global batch grows from 4 to 16 sequences over the
# first 2000 tokens, i.e. within 6 steps: [4, 4, 6, 8, 12, 16].
RAMP = [o for o in TINY if not o.startswith("trainer.global_batch_size=")] + [
    "trainer.global_batch_size=16", "schedule.batch_ramp_tokens=2000", "schedule.batch_ramp_start=4"]
RAMP_STEPS = 6


def expected_tokens_per_step(overrides: list[str], dp: int) -> list[int]:
    """Tokens per step from train.schedule.global_batch_at, counting tokens as the trainer does."""
    cfg = to_config(compose([*overrides, f"trainer.max_steps={RAMP_STEPS}"]))
    t = cfg.trainer
    seen, out = 0, []
    for _ in range(t.max_steps):
        gb = global_batch_at(cfg.schedule, seen, t.global_batch_size, t.micro_batch_size * dp)
        out.append(gb * t.seq_len)
        seen += gb * t.seq_len
    return out


def per_step(records: list[dict]) -> list[int]:
    seen = [m["tokens_seen"] for m in records]
    return [b - a for a, b in zip([0, *seen], seen)]


def test_batch_ramp_grows_the_global_batch_to_the_configured_size(tmp_path, dataset):
    ramp_dir, fixed_dir = tmp_path / "ramp", tmp_path / "fixed4"
    r = run_train([f"data.path={dataset}", *RAMP, *PARITY, f"trainer.max_steps={RAMP_STEPS}",
                   f"hydra.run.dir={ramp_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ramp = metrics(ramp_dir)
    assert [m["step"] for m in ramp] == list(range(1, RAMP_STEPS + 1))
    expected = expected_tokens_per_step(RAMP, dp=1)
    assert per_step(ramp) == expected, (per_step(ramp), expected)
    assert expected == [s * 64 for s in (4, 4, 6, 8, 12, 16)]  # the ramp really grows within the run
    assert per_step(ramp)[-1] == 16 * 64  # ends at trainer.global_batch_size
    assert all(math.isfinite(m["loss"]) for m in ramp), [m["loss"] for m in ramp]
    # an optimizer step every step (None: DeepSpeed did not reach its accumulation boundary)
    assert all(m["grad_norm"] is not None and math.isfinite(m["grad_norm"]) for m in ramp), ramp

    # The ramp's first two steps (4 sequences each) are a fixed global batch of 4 on the same
    # sequences (the loader's order does not depend on the global batch): the same losses and
    # gradient norms show that shrinking DeepSpeed's gradient accumulation from the configured 8
    # micro-steps to 2 also rescaled the gradients, and step 2's loss that step 1's update matched.
    fixed_args = [o for o in RAMP if not o.startswith(("trainer.global_batch_size=", "schedule.batch_ramp"))]
    r = run_train([f"data.path={dataset}", *fixed_args, *PARITY, "trainer.global_batch_size=4",
                   f"trainer.max_steps={RAMP_STEPS}", f"hydra.run.dir={fixed_dir}"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    fixed = metrics(fixed_dir)
    for a, b in zip(ramp[:2], fixed[:2]):
        assert a["lr"] == b["lr"]
        assert rel(b["loss"], a["loss"]) <= 1e-6, (a["step"], a["loss"], b["loss"])
        assert rel(b["grad_norm"], a["grad_norm"]) <= 1e-5, (a["step"], a["grad_norm"], b["grad_norm"])
    assert per_step(fixed) == [4 * 64] * RAMP_STEPS


@pytest.mark.slow
def test_batch_ramp_dp2_matches_dp1(tmp_path, dataset):
    """The ramp rounds to micro × dp, so dp=2 runs micro 1 to keep dp=1's grid of 2 sequences
    (and the same ramp); mirrors test_dp2_losses_match_dp1_with_the_same_global_batch."""
    runs = {}
    for nproc in (1, 2):
        run_dir = tmp_path / f"ramp_dp{nproc}"
        overrides = RAMP if nproc == 1 else [o for o in RAMP if not o.startswith("trainer.micro_batch_size=")] + [
            "trainer.micro_batch_size=1"]
        r = run_train([f"data.path={dataset}", *overrides, *PARITY, f"trainer.max_steps={RAMP_STEPS}",
                       f"hydra.run.dir={run_dir}"], tmp_path, nproc=nproc)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[nproc] = metrics(run_dir)
        assert per_step(runs[nproc]) == expected_tokens_per_step(overrides, dp=nproc)
    a_all, b_all = runs[1], runs[2]
    assert len(a_all) == len(b_all) == RAMP_STEPS
    assert per_step(a_all) == per_step(b_all) and len(set(per_step(a_all))) > 2
    for a, b in zip(a_all, b_all):
        assert rel(a["loss"], b["loss"]) <= 1e-5, (a["step"], a["loss"], b["loss"])
        assert rel(a["mtp_loss"], b["mtp_loss"]) <= 1e-5, (a["step"], a["mtp_loss"], b["mtp_loss"])
        assert rel(a["grad_norm"], b["grad_norm"]) <= 1e-4, (a["step"], a["grad_norm"], b["grad_norm"])
