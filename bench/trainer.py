"""Framework overhead: the full trainer against a bare PyTorch loop on the same batches.

The trainer (DeepSpeed engine, ZeRO-1, stateful loader with a background reader, metrics,
logging to metrics.jsonl, expert-bias update) and a bare loop (model forward, loss, backward,
torch AdamW step) train the same model config from the same seed on the same token batches,
in one process, alternating blocks of steps so machine drift hits both. Prints tokens/s of
each and the ratio (goal ≥ 0.95).

    python bench/trainer.py                       # smoke and a larger CPU config
    python bench/trainer.py --configs smoke --blocks 3 --steps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # after the repository: bench/data.py is not the data package
from corpus import prepare_stdlib  # noqa: E402

CONFIGS = {
    "smoke": ["model=smoke", "trainer.seq_len=256", "trainer.micro_batch_size=8", "trainer.global_batch_size=16"],
    "large": ["model=smoke", "model.dim=384", "model.n_heads=6", "model.moe_inter_dim=192", "model.inter_dim=1024",
              "model.n_routed_experts=32", "model.n_layers=6", "model.q_lora_rank=192", "model.kv_lora_rank=128",
              "model.vocab_size=512", "trainer.seq_len=512", "trainer.micro_batch_size=4",
              "trainer.global_batch_size=8", "model.max_seq_len=512", "model.original_seq_len=512"],
}


def build_trainer(overrides: list[str], data: Path, run_dir: Path):
    from parallel.engine import init_distributed
    from train.config import compose, to_config
    from train.data_setup import build_loaders
    from train.trainer import Trainer

    cfg = to_config(compose([*overrides, f"data.path={data}", "trainer.max_steps=100000", "trainer.log_interval=10",
                             "trainer.eval_interval=0", "logging.wandb.mode=disabled",
                             "logging.progress_bar=false"]))
    init_distributed(torch.device("cpu"))
    trainer = Trainer(cfg, run_dir, world_size=1, rank=0)
    train_loader, val_factory = build_loaders(cfg, data, 0, 1)
    trainer.setup(train_loader, val_factory)
    return cfg, trainer


class Bare:
    """Model, AdamW with the same groups and hyper-parameters, the same batches; nothing else."""

    def __init__(self, cfg, batches: list[dict]):
        from model import Transformer
        from train.schedule import param_groups

        torch.manual_seed(cfg.trainer.seed)
        self.model = Transformer(cfg.model).train()
        o = cfg.optim
        self.opt = torch.optim.AdamW(param_groups(self.model, o.weight_decay), lr=o.lr, betas=tuple(o.betas),
                                     eps=o.eps, weight_decay=o.weight_decay)
        self.batches = batches
        self.i = 0
        self.ga = cfg.trainer.global_batch_size // cfg.trainer.micro_batch_size

    def step(self) -> None:
        for _ in range(self.ga):
            b = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = self.model.losses(b["input_ids"], b["labels"])
            ((loss.main + 0.3 * loss.mtp) / self.ga).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def run(name: str, data: Path, blocks: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cfg, trainer = build_trainer(CONFIGS[name], data, Path(tmp))
        t = cfg.trainer
        from train.data_setup import build_loaders

        it = iter(build_loaders(cfg, data, 0, 1)[0])  # a loader of its own: same order as the trainer's
        batches = [next(it) for _ in range(8)]  # the bare loop cycles through real batches
        bare = Bare(cfg, batches)
        trainer.model.train()
        tokens = t.global_batch_size * t.seq_len
        trainer.loop_step()  # warm-up of both
        bare.step()
        times = {"trainer": [], "bare": []}
        for _ in range(blocks):
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.loop_step()  # the real loop: step, metrics logged every log_interval
            times["trainer"].append((time.perf_counter() - t0) / steps)
            t0 = time.perf_counter()
            for _ in range(steps):
                bare.step()
            times["bare"].append((time.perf_counter() - t0) / steps)
        trainer.close()
    res = {"config": name, "tokens_per_step": tokens,
           "trainer_tok_s": tokens / statistics.median(times["trainer"]),
           "bare_tok_s": tokens / statistics.median(times["bare"])}
    res["ratio"] = res["trainer_tok_s"] / res["bare_tok_s"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_stdlib(Path(tmp) / "stdlib")
        rows = [run(c, data, args.blocks, args.steps) for c in args.configs]
    print(f"{'config':<8}{'tokens/step':>12}{'trainer tok/s':>15}{'bare loop tok/s':>17}{'ratio':>8}")
    for r in rows:
        print(f"{r['config']:<8}{r['tokens_per_step']:>12}{r['trainer_tok_s']:>15.0f}{r['bare_tok_s']:>17.0f}"
              f"{r['ratio']:>8.3f}")


if __name__ == "__main__":
    main()
