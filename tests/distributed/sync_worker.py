"""Worker of tests/distributed/test_host_syncs.py: count host synchronisations in one loop step.

    [torchrun --nproc_per_node W] tests/distributed/sync_worker.py OUT.json DATA override…

Runs the real Trainer's loop (`Trainer.loop_step`) for two warm-up steps, then counts, during
the third step (not logged, not evaluated, not checkpointed), every call that makes the host
wait for the device: `Tensor.item`, `.tolist`, `.cpu`, `.numpy` and Python's `bool`, `float`
and `int` of a tensor. Each call is keyed by the moeforge file and function that made it (the
immediate caller); calls made inside torch or DeepSpeed are not moeforge's and are not counted.
Rank 0 writes every rank's counts and what the design allows per rank (the number of MoE
layer forwards, the micro-batches).
"""

from __future__ import annotations

import collections
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

from model.moe import moe_layers  # noqa: E402
from parallel.engine import DistEnv, init_distributed  # noqa: E402
from tests.distributed.runs import BASE  # noqa: E402
from train.config import check_layout, compose, to_config  # noqa: E402
from train.data_setup import build_loaders  # noqa: E402
from train.trainer import Trainer  # noqa: E402

SYNCING = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
OWN = {"model", "parallel", "train", "data"}


class SyncCounter:
    """Wraps torch.Tensor's synchronising methods while active; counts moeforge's calls by call site."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()
        self.saved = {}

    def __enter__(self):
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            self.saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)

    def _wrap(self, name, original):
        counts = self.counts

        def wrapper(t, *args, **kwargs):
            frame = sys._getframe(1)
            path = Path(frame.f_code.co_filename).resolve()
            try:
                rel = path.relative_to(ROOT)
            except ValueError:
                rel = None
            if rel is not None and rel.parts[0] in OWN:
                counts[f"{rel.as_posix()}:{frame.f_code.co_name}:{name.strip('_')}"] += 1
            return original(t, *args, **kwargs)

        return wrapper


def main(out_path: str, data: str, overrides: list[str]) -> None:
    env = DistEnv.from_environ()
    init_distributed(torch.device("cpu"))
    cfg = to_config(compose(BASE + [f"data.path={data}", "trainer.max_steps=10", *overrides]))
    dp = check_layout(cfg, env.world_size)
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, Path(run_dir), env.world_size, env.rank)
        train_loader, val_factory = build_loaders(cfg, Path(data), dp_rank=env.rank % dp, dp_size=dp)
        trainer.setup(train_loader, val_factory)
        trainer.model.train()
        for _ in range(2):
            trainer.loop_step()
        with SyncCounter() as counter:
            trainer.loop_step()
        mine = {"counts": dict(counter.counts), "moe_layers": len(moe_layers(trainer.model)),
                "grad_accum": trainer.step_module.grad_accum, "step": trainer.step}
        trainer.close()
    everyone = [None] * env.world_size
    if env.world_size > 1:
        dist.all_gather_object(everyone, mine)
    else:
        everyone = [mine]
    if env.rank == 0:
        Path(out_path).write_text(json.dumps(everyone))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    sys.stdout.flush()
    sys.stderr.flush()
    # As train/__main__.py and parity_worker.py: no interpreter teardown after the results are
    # written (once, under heavy load, a rank aborted in teardown with "terminate called without an
    # active exception" after writing them).
    os._exit(0)
