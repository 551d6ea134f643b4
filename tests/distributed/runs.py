"""Constants and launch helpers shared by the distributed tests (tests/distributed/conftest.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from parallel.state import Reader

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "parity_worker.py"
STEPS = 20
SAVE_EVERY = 10

# SGD-like AdamW (eps = 1 ≫ sqrt(v)): the update is proportional to the gradient, so float
# reassociation between layouts (all-reduce and all-to-all summation order, ~1e-7) is not
# amplified the way Adam's g/sqrt(v) amplifies it on near-zero gradients, and the comparison
# measures the parallel computation rather than the optimizer's conditioning. The model still
# learns (loss 6.2 → 3.5 in 20 steps).
BASE = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=8",
        "trainer.log_interval=1000", "trainer.eval_interval=0", "trainer.eval_batches=2", "trainer.threads=1",
        "trainer.deterministic=true", "checkpoint.resume=never", "logging.wandb.mode=disabled", "logging.progress_bar=false",
        "optim.lr=0.5", "optim.eps=1.0", "schedule.warmup_steps=2", "data.num_workers=0"]

OVERLAP = ["parallel.moe_overlap=true", "parallel.moe_chunks=2"]

# Layout → (processes, overrides). MTP on and off for the single process and the pipelines (where
# MTP changes what the stages hold and send); MTP only elsewhere, to keep the suite short. A
# pipeline with data parallelism (ZeRO-1 across each stage's replicas) is pp2_ep2: pp=2 × dp=2.
LAYOUTS = {
    "single": (1, []),
    "ep2": (2, ["parallel.ep=2", "parity.mtp=1"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, ["parity.mtp=1"]),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    "dp4_ep2": (4, ["parallel.ep=2", "parity.mtp=1"]),  # expert-data-parallel size 2: ZeRO-1 partitions the experts
    "pp2_ckpt": (2, ["parallel.pp=2", "parallel.activation_checkpoint_interval=1"]),  # DeepSpeed recompute
    # The dispatch options on together (each alone: tests/distributed/dispatch_worker.py): the
    # exchanges asynchronous, shared experts behind the dispatch, two chunks, and node-aware
    # dispatch over simulated nodes (ep 2 as 2 nodes × 1 rank; ep 4 as 2 × 2).
    "ep2_overlap": (2, ["parallel.ep=2", "parity.mtp=1", *OVERLAP, "parallel.ep_ranks_per_node=1"]),
    "pp2_ep2_overlap": (4, ["parallel.pp=2", "parallel.ep=2", "parity.mtp=1", *OVERLAP, "parallel.ep_ranks_per_node=1"]),
    "dp4_ep4_nodes": (4, ["parallel.ep=4", "parity.mtp=1", *OVERLAP, "parallel.ep_ranks_per_node=2"]),
}


def launcher(nproc: int, port_salt: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() * 7 + port_salt) % 2000)]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def assert_same_state(a: Path, b: Path, adam_steps: int = STEPS) -> None:
    """Two checkpoints hold equal tensors of every kind, the same loader position and counters."""
    ra, rb = Reader(a), Reader(b)
    assert ra.fragments.keys() == rb.fragments.keys() == {"param", "exp_avg", "exp_avg_sq", "buffer"}
    n = 0
    for kind in ra.fragments:
        assert ra.names(kind) == rb.names(kind)
        for name in ra.names(kind):
            assert torch.equal(ra.read(kind, name), rb.read(kind, name)), (kind, name)
            n += 1
    assert n > 100
    sa, sb = (json.loads((p / "trainer.json").read_text()) for p in (a, b))
    assert sa["loader"] == sb["loader"] and sa["adam_step"] == sb["adam_step"] == adam_steps
    assert (sa["step"], sa["tokens_seen"]) == (sb["step"], sb["tokens_seen"])


# bf16 runs (tests/distributed/test_bf16.py): the parity settings in bf16, 12 steps, resumed from
# step 6. Each layout injects a NaN loss at step 2, a NaN gradient at step 3 (each on one rank
# where there are several: a data-parallel peer, and a last-stage rank whose NaN flows back to the
# first stage) and a ×20 loss at step 5 that the spike detector (window 4, warmed up after 2
# accepted steps) must skip: the same steps are skipped in every layout, so the trajectories stay
# comparable.
WORKER_BF16 = ROOT / "tests" / "distributed" / "bf16_worker.py"
BF16_STEPS, BF16_RESUME = 12, 6
BF16 = ["trainer.dtype=bf16", "trainer.spike.window=4", "trainer.spike.warmup=2", "trainer.spike.k=3",
        "trainer.spike.min_rise=0.05"]
BF16_SKIPS = {2: "non-finite loss", 3: "non-finite gradient", 5: "loss spike"}
# Layout → (processes, overrides, MOEFORGE_FAULTS). Pipe-major ranks: pp2_ep2's last stage is ranks 2, 3.
BF16_LAYOUTS = {
    "single": (1, [], "nan_loss@2,nan_grad@3,spike@5"),
    "dp2_zero2": (2, ["parallel.zero_stage=2"], "nan_loss@2:1,nan_grad@3:0,spike@5"),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"], "nan_loss@2:3,nan_grad@3:2,spike@5"),
}
