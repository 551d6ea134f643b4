"""Constants and launch helpers shared by the distributed tests (tests/distributed/conftest.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "tests" / "distributed" / "parity_worker.py"
STEPS = 20
SAVE_EVERY = 10

LAYOUTS = {
    "single": (1, []),
    "ep2": (2, ["parallel.ep=2"]),
    "pp2": (2, ["parallel.pp=2"]),
    "dp2": (2, []),
    "pp2_ep2": (4, ["parallel.pp=2", "parallel.ep=2"]),
    "pp2_dp2": (4, ["parallel.pp=2"]),
    "dp4_ep2": (4, ["parallel.ep=2"]),  # expert-data-parallel size 2: ZeRO-1 partitions the experts
    "pp2_ckpt": (2, ["parallel.pp=2", "parallel.activation_checkpoint_interval=1"]),  # DeepSpeed recompute
}


def launcher(nproc: int, port_salt: int) -> list[str]:
    if nproc == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(29500 + (os.getpid() * 7 + port_salt) % 2000)]


def worker_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


