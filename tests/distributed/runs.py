"""Constants and launch helpers shared by the distributed tests (tests/distributed/conftest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
}


def launcher(nproc: int, port_salt: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() * 7 + port_salt) % 2000)]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


