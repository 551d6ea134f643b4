"""Worker of tests/distributed/test_parity.py: train a layout for N steps, with MTP on and off.

    torchrun --nproc_per_node W tests/distributed/parity_worker.py OUT.json DATA STEPS override…

Runs the real Trainer (DeepSpeed engine or pipeline engine) twice in one process group, once
with model.n_mtp_layers=1 and once with 0, and writes from rank 0: per-step loss, MTP loss,
balance loss and gradient norm, and every rank's expert biases keyed by layer id. With
`checkpoint.dir=… checkpoint.interval=k` the MTP run also saves a checkpoint every k steps
(tests/distributed/test_resume.py resumes from them in new processes).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.block import Block  # noqa: E402
from model.moe import MoE  # noqa: E402
from parallel.engine import DistEnv, init_distributed  # noqa: E402
from train.config import check_layout, compose, to_config  # noqa: E402
from train.data_setup import build_loaders  # noqa: E402
from tests.distributed.runs import BASE  # noqa: E402
from train.trainer import Trainer  # noqa: E402



def biases(trainer: Trainer) -> dict[str, list[float]]:
    out = {}
    for m in trainer.model.modules():
        if isinstance(m, Block) and isinstance(m.ffn, MoE):
            out[str(m.layer_id)] = m.ffn.gate.e_score_correction_bias.tolist()
    return out


def run(out_path: str, data: str, steps: int, overrides: list[str]) -> None:
    """`parity.mtp=1,0` (default) runs with MTP and without; `parity.mtp=1` only with."""
    depths = [1, 0]
    for item in [o for o in overrides if o.startswith("parity.mtp=")]:
        depths = [int(d) for d in item.split("=", 1)[1].split(",")]
        overrides.remove(item)
    env = DistEnv.from_environ()
    init_distributed(torch.device("cpu"))
    results = {}
    for n_mtp in depths:
        cfg = to_config(compose(BASE + [f"data.path={data}", f"model.n_mtp_layers={n_mtp}",
                                        f"trainer.max_steps={steps}", *overrides]))
        dp = check_layout(cfg, env.world_size)
        with tempfile.TemporaryDirectory() as run_dir:
            trainer = Trainer(cfg, Path(run_dir), env.world_size, env.rank)
            train_loader, val_factory = build_loaders(cfg, Path(data), dp_rank=env.rank % dp, dp_size=dp)
            trainer.setup(train_loader, val_factory)
            steps_out = []
            interval = cfg.checkpoint.interval if n_mtp else 0
            for _ in range(steps):
                out = trainer.train_step()
                steps_out.append({k: float(out[k]) for k in ("loss", "mtp_loss", "balance_loss", "grad_norm")})
                if interval and trainer.step % interval == 0:
                    trainer.save_checkpoint()
            val = trainer.evaluate()["val_loss"]  # the pipeline path runs DeepSpeed's eval_batch
            trainer.close()
        per_rank = [None] * env.world_size
        dist.all_gather_object(per_rank, biases(trainer))
        results[f"mtp{n_mtp}"] = {"steps": steps_out, "biases": per_rank, "val_loss": val}
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    sys.stdout.flush()
    os._exit(0)  # as train/__main__.py: no interpreter teardown after the results are written
