"""Worker of the bf16 tests: train in bf16 and record what the optimizer holds after every step.

    [torchrun --nproc_per_node W] tests/distributed/bf16_worker.py OUT.json DATA STEPS SAVE_AT override…

Drives the real Trainer (DeepSpeed engine or pipeline engine) in this process, with the fault
injection of MOEFORGE_FAULTS (train/faults.py), saving checkpoints after the steps in SAVE_AT
(comma-separated, possibly empty). Rank 0 writes:
- per step: loss, MTP loss, gradient norm, skip reason;
- per step and rank: SHA-256 digests of the model weights (bf16), the optimizer's fp32 master
  weights, its Adam state (moments and step count) and the buffers (router biases…), and
  whether the fp32 gradient accumulators are zero after the step;
- per step and rank (BF16_Optimizer): master-weight counts (see `master_stats`);
- per rank: the optimizer classes and the dtypes of parameters, masters, moments, accumulators;
- the same digests right after setup (`restored`: what a resume loaded), and the validation loss
  after the last step.
Run it as a new process for each leg of a resume test (the resumed leg passes checkpoint.resume).
"""

from __future__ import annotations

import hashlib
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

from parallel.engine import DistEnv, init_distributed  # noqa: E402
from tests.distributed.runs import BASE  # noqa: E402
from train.config import check_layout, compose, to_config  # noqa: E402
from train.data_setup import build_loaders  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().contiguous().reshape(-1)
        h.update(str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def masters(opt) -> list[torch.Tensor]:
    """This rank's fp32 master weights (partitions under BF16_Optimizer and ZeRO)."""
    for attr in ("fp32_groups_flat_partition", "single_partition_of_fp32_groups"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return [p for g in opt.param_groups for p in g["params"]]  # a plain optimizer: the parameters


def adam_state(opt) -> list[torch.Tensor]:
    base = getattr(opt, "optimizer", opt)
    out = []
    for group in base.param_groups:
        for p in group["params"]:
            s = base.state.get(p, {})
            out += [s[k] for k in ("exp_avg", "exp_avg_sq", "step") if k in s]
    return out


def accumulators(opt) -> list[torch.Tensor] | None:
    """BF16_Optimizer's fp32 gradient accumulators (None for other optimizers)."""
    return list(opt.fp32_groups_gradients_flat) if hasattr(opt, "fp32_groups_gradients_flat") else None


def lp_partitions(opt) -> list[torch.Tensor]:
    """The bf16 weights of this rank's master partitions, element for element (BF16_Optimizer)."""
    return [opt.bf16_partitioned_groups[i][dist.get_rank(group=opt.real_dp_process_group[i])]
            for i in range(len(opt.fp32_groups_flat_partition))]


def _host(value):
    """A step output as a JSON value (the gradient norm stays a device tensor until read)."""
    return float(value) if isinstance(value, torch.Tensor) else value


def snapshot(trainer: Trainer) -> dict:
    opt = trainer.optimizer
    acc = accumulators(opt)
    return {"weights": _digest(p for p in trainer.model.parameters()),
            "masters": _digest(masters(opt)), "moments": _digest(adam_state(opt)),
            "buffers": _digest(trainer.model.buffers()),
            "accumulators_zero": None if acc is None else all(bool((g == 0).all()) for g in acc)}


def master_stats(opt, before: tuple | None) -> tuple[dict, tuple]:
    """Counts over this rank's partition after a step (BF16_Optimizer).

    rounded: the bf16 weights are the masters rounded to bf16, everywhere.
    finer: elements whose master is not representable in bf16 (the master keeps what bf16 drops).
    rounded_away: elements whose master moved this step by an amount that, added to the bf16
      weight, rounds back to the same bf16 value (a pure-bf16 update would have lost it).
    carried: elements whose bf16 weight moved this step although this step's update alone would
      have been rounded away: the master had accumulated earlier sub-ulp updates.
    """
    lp = [t.detach().clone() for t in lp_partitions(opt)]
    hp = [t.detach().clone() for t in opt.fp32_groups_flat_partition]
    stats = {"rounded": all(torch.equal(m.to(torch.bfloat16), w) for m, w in zip(hp, lp)),
             "finer": sum(int((m != w.float()).sum()) for m, w in zip(hp, lp)),
             "rounded_away": 0, "carried": 0, "elements": sum(m.numel() for m in hp)}
    if before is not None:
        for m, w, m0, w0 in zip(hp, lp, *before):
            d = m - m0
            lost = (d != 0) & ((w0.float() + d).to(torch.bfloat16) == w0)
            stats["rounded_away"] += int(lost.sum())
            stats["carried"] += int((lost & (w != w0)).sum())
    return stats, (hp, lp)


def describe(trainer: Trainer) -> dict:
    opt = trainer.optimizer
    acc = accumulators(opt)
    return {"optimizer": type(opt).__name__, "base": type(getattr(opt, "optimizer", opt)).__name__,
            "params": sorted({str(p.dtype) for p in trainer.model.parameters()}),
            "masters": sorted({str(t.dtype) for t in masters(opt)}),
            "moments": sorted({str(t.dtype) for t in adam_state(opt) if t.dim() > 0}),
            "accumulators": None if acc is None else sorted({str(g.dtype) for g in acc}),
            "zero_stage": trainer.engine.zero_optimization_stage()}


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def run(out_path: str, data: str, steps: int, save_at: set[int], overrides: list[str]) -> None:
    env = DistEnv.from_environ()
    init_distributed(torch.device("cpu"))
    cfg = to_config(compose(BASE + [f"data.path={data}", f"trainer.max_steps={steps}", *overrides]))
    dp = check_layout(cfg, env.world_size)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), env.world_size, env.rank)
        train_loader, val_factory = build_loaders(cfg, Path(data), dp_rank=env.rank % dp, dp_size=dp)
        trainer.setup(train_loader, val_factory)
        bf16_opt = hasattr(trainer.optimizer, "fp32_groups_flat_partition")
        restored = snapshot(trainer)
        stats, before = master_stats(trainer.optimizer, None) if bf16_opt else (None, None)
        records, states, master = [], [], []
        while trainer.step < steps:
            out = trainer.train_step()
            records.append({"step": trainer.step, **{k: _host(out[k]) for k in ("loss", "mtp_loss", "grad_norm", "skipped")}})
            states.append(snapshot(trainer))
            if bf16_opt:
                stats, before = master_stats(trainer.optimizer, before)
                master.append(stats)
            if trainer.step in save_at:
                trainer.save_checkpoint()
        val = trainer.evaluate()["val_loss"]
        info = describe(trainer)
        trainer.close()
    result = {"steps": records, "val_loss": val, "states": gather(states), "restored": gather(restored),
              "master": gather(master), "info": gather(info), "resumed_at": trainer.step - len(records)}
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    save = {int(s) for s in sys.argv[4].split(",") if s}
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), save, sys.argv[5:])
    sys.stdout.flush()
    os._exit(0)  # as train/__main__.py: no interpreter teardown after the results are written
