"""Worker of tests/integration/test_plan_cli.py: what the trainer really allocates, against the plan.

    [torchrun --nproc_per_node W] tests/integration/plan_memory_worker.py OUT.json override…

Builds the real Trainer (DeepSpeed engine) on the CPU, runs one optimizer step on random
tokens and measures, right before the update (a global optimizer step pre-hook) and right
after it, the bytes of every distinct storage behind the module's parameters (weights), the
optimizer's own parameters when they are not the module's (DeepSpeed's FP32 master
partitions), the optimizer state (Adam moments), and every other tensor alive at the update
(gradients in all their DeepSpeed forms and the pipeline buffers, which the plan books
separately: they are added to its gradients here). Writes each rank's measurement and
train.plan's estimate for that rank's stage.
"""

from __future__ import annotations

import gc
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
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402

from parallel.engine import DistEnv, init_distributed  # noqa: E402
from train.config import check_layout, compose, to_config  # noqa: E402
from train.estimate import plan  # noqa: E402
from train.plan import setup_of  # noqa: E402
from train.trainer import Trainer  # noqa: E402


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def main(out: str, overrides: list[str]) -> None:
    env = DistEnv.from_environ()
    init_distributed(torch.device("cpu"))
    # gc_interval=0: the gradients are found through gc.get_objects(), which does not list the
    # objects a scheduled collector freezes after setup (train/garbage.py).
    cfg = to_config(compose(["trainer.eval_interval=0", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                             "trainer.threads=1", "trainer.max_steps=1", "trainer.gc_interval=0", *overrides]))
    dp = check_layout(cfg, env.world_size)
    t = cfg.trainer

    def batches():
        gen = torch.Generator().manual_seed(env.rank)
        while True:
            ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1), generator=gen)
            yield {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}

    seen: dict[str, dict[int, int]] = {}
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), env.world_size, env.rank)
        trainer.setup(batches(), lambda: iter(()))
        module_params = list(trainer.engine.module.parameters())

        def before(opt, args, kwargs):
            # DeepSpeed's ZeRO steps its optimizer once per parameter group: accumulate over calls.
            weights = _storages(module_params)
            own = _storages([p for g in opt.param_groups for p in g["params"]])
            buffers = _storages(list(trainer.engine.module.buffers()))
            seen.setdefault("weights", {}).update(weights)
            seen.setdefault("master", {}).update({k: v for k, v in own.items() if k not in weights})
            # Gradients: every other tensor alive at the update (DeepSpeed's gradient partitions and
            # buckets, `.grad`, the FP32 gradient of the group being stepped, pipeline buffers),
            # found through the garbage collector; the largest total over the per-group calls.
            live = _storages([o for o in gc.get_objects() if torch.is_tensor(o) and o.device.type == "cpu"])
            skip = set(weights) | set(own) | set(buffers) | set(seen.get("moments", {}))
            other = sum(v for k, v in live.items() if k not in skip and v > 4096)
            seen["grads"] = {0: max(other, seen.get("grads", {0: 0})[0])}

        def after(opt, args, kwargs):
            state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
            seen.setdefault("moments", {}).update(_storages(state))

        h1, h2 = register_optimizer_step_pre_hook(before), register_optimizer_step_post_hook(after)
        trainer.train_step()
        h1.remove()
        h2.remove()
        trainer.close()
    measured = {k: sum(v.values()) for k, v in seen.items()}
    stage = env.rank // dp
    planned_stage = plan(cfg.model, cfg.cluster, setup_of(cfg, env.world_size)).stages[stage]
    planned = {"weights": planned_stage.weights, "grads": planned_stage.grads + planned_stage.pipe_buffers,
               "master": planned_stage.master, "moments": planned_stage.moments}
    per_rank = [None] * env.world_size
    dist.all_gather_object(per_rank, {"rank": env.rank, "stage": stage, "measured": measured, "planned": planned})
    if env.rank == 0:
        Path(out).write_text(json.dumps(per_rank))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
    sys.stdout.flush()
    os._exit(0)  # as train/__main__.py: no interpreter teardown after the results are written
