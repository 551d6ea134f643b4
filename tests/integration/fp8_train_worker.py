"""Worker of tests/integration/test_fp8_training.py: the same short training run per precision.

    python tests/integration/fp8_train_worker.py OUT.json DATA STEPS BACKEND[,BACKEND…] override…

Drives the real Trainer (DeepSpeed engine, data loader, schedule, expert-bias updates) in this
process for each fp8.backend in turn, reading the per-step losses straight from train_step (no
metrics files, no reports, no plots as the CLI would write), and writes
{backend: {"loss": [...], "seconds": s}}.
A separate process (not the pytest one) because a single-process run sets the torch.distributed
environment (RANK, MASTER_PORT, …) that later CLI tests must not inherit.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from parallel.engine import init_distributed  # noqa: E402
from train.config import check_fp8, check_layout, compose, to_config  # noqa: E402
from train.data_setup import build_loaders  # noqa: E402
from train.trainer import Trainer, resolve_device  # noqa: E402


def main(out_path: str, data: str, steps: int, backends: list[str], overrides: list[str]) -> None:
    results = {}
    for backend in backends:
        cfg = to_config(compose([f"data.path={data}", f"trainer.max_steps={steps}", f"fp8={backend}", *overrides]))
        device = resolve_device(cfg.trainer.device)
        if not dist.is_initialized():
            init_distributed(device)
        check_fp8(cfg)
        dp = check_layout(cfg, 1)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir), 1, 0)
            train_loader, val_factory = build_loaders(cfg, Path(data), dp_rank=0, dp_size=dp)
            trainer.setup(train_loader, val_factory)
            losses = [trainer.train_step()["loss"] for _ in range(steps)]
            trainer.close()
        results[backend] = {"loss": losses, "seconds": time.perf_counter() - start,
                            "threads": torch.get_num_threads()}
    Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(","), sys.argv[5:])
    sys.stdout.flush()
    os._exit(0)  # as train/__main__.py: no interpreter teardown after the results are written
