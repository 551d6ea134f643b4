"""Worker of tests/integration/test_fp8_training.py and bench/fp8_band.py: short training runs.

    python tests/integration/fp8_train_worker.py OUT.json DATA STEPS NAME override… [-- NAME override…]…

Each NAME'd run is the real Trainer (DeepSpeed engine, data loader, schedule, expert-bias
updates) driven in this process with the overrides (`fp8=…`, `trainer.seed=…`, …), reading the
per-step losses straight from train_step (no metrics files, reports or plots as the CLI would
write) and the validation loss after the last step; writes
{name: {"loss": [...], "val_loss": v, "seconds": s}}.
A separate process (not the pytest one) because a single-process run sets the torch.distributed
environment (RANK, MASTER_PORT, …) that later CLI tests must not inherit.
"""

from __future__ import annotations

import dataclasses
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

from parallel.engine import init_distributed, resolve_device  # noqa: E402
from train.config import check_fp8, check_layout, compose, to_config  # noqa: E402
from train.data_setup import build_loaders  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def run(data: str, steps: int, overrides: list[str]) -> dict:
    cfg = to_config(compose([f"data.path={data}", f"trainer.max_steps={steps}", *overrides]))
    device = resolve_device(cfg.trainer.device)
    if not dist.is_initialized():
        init_distributed(device)
    check_fp8(cfg)
    dp = check_layout(cfg, 1)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), 1, 0)
        train_loader, _ = build_loaders(cfg, Path(data), dp_rank=0, dp_size=dp)
        # Validation on the same sequences whatever trainer.seed (the loaders draw their order
        # from it): runs of different seeds are then compared on one validation set.
        fixed = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, seed=0))
        _, val_factory = build_loaders(fixed, Path(data), dp_rank=0, dp_size=dp)
        trainer.setup(train_loader, val_factory)
        losses = [trainer.train_step()["loss"] for _ in range(steps)]
        val = trainer.evaluate().get("val_loss")
        # The trained weights evaluated with the other forward: full precision for an FP8 run
        # (what FP8 did to training) and emulated blockwise FP8 for a full-precision run (what an
        # FP8 forward alone costs the loss).
        cross = "off" if cfg.fp8.backend != "off" else "emulated"
        val_cross = evaluate_as(trainer.model, cfg, cross, val_factory)
        trainer.close()
    return {"loss": losses, "val_loss": val, "val_loss_" + ("hp" if cross == "off" else "fp8_forward"): val_cross,
            "seconds": time.perf_counter() - start, "threads": torch.get_num_threads()}


@torch.no_grad()
def evaluate_as(model, cfg, backend: str, val_factory) -> float:
    """The mean validation loss of `model`'s weights in a copy built with fp8.backend=`backend`."""
    from model import Transformer
    from model.linear import precision

    fp8 = dataclasses.replace(cfg.fp8, backend=backend, recipe="blockwise" if backend != "off" else cfg.fp8.recipe)
    with precision(fp8.validate().precision()):
        copy = Transformer(cfg.model)
    copy.load_state_dict(model.state_dict())
    copy.eval()
    loader = val_factory()
    total, n = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if i >= cfg.trainer.eval_batches:
                break
            total += copy.losses(batch["input_ids"], batch["labels"], batch.get("position_ids")).main.item()
            n += 1
    finally:
        loader.close()
    return total / n


def parse_runs(args: list[str]) -> dict[str, list[str]]:
    """NAME override… [-- NAME override…]… → {name: overrides}."""
    runs, current = {}, None
    for a in args:
        if a == "--":
            current = None
        elif current is None:
            current = runs.setdefault(a, [])
        else:
            current.append(a)
    return runs


def main(out_path: str, data: str, steps: int, args: list[str]) -> None:
    results = {name: run(data, steps, overrides) for name, overrides in parse_runs(args).items()}
    Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    sys.stdout.flush()
    os._exit(0)  # as train/__main__.py: no interpreter teardown after the results are written
