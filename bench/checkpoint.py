"""Checkpoint cost: training time lost per save, asynchronous against synchronous, and save/load GB/s.

One process trains (the full trainer, ZeRO-1 on the CPU). It runs windows of a few training
steps (`--steps`), each after a synchronous save, after an asynchronous save, or after no save,
the three kinds interleaved on the same trainer (`--saves` of each). The stall of a save is the
training time it costs:

    stall = median over rounds of (window with that save, the save waited for at its end,
                                   minus the window without a save of the same round)

Synchronous: essentially the save, plus what the deletion of the checkpoint it retired (a
thread) takes from the steps after it. Asynchronous: the snapshot on the training thread plus
what the writer process (its write and its deletion) takes from the steps that run meanwhile
(CPU, memory bandwidth, kernel time; on this 2-core CPU machine it competes with training).
Every window waits at its end for what its save started, so no save's work spills into
another window, and each starts after 0.1 s idle, so that the kernel's deferred work after the
previous one (journal commits, discards) has ended; the kinds take turns in all six orders.
Medians of paired differences of interleaved windows keep one noisy step, and the drift of
step time over minutes, from deciding the figure.
"blocking" is the save call alone. Goal: async stall ≤ 20% of the synchronous stall.

Throughput: save GB/s = checkpoint bytes / synchronous save time (write, fsync, SHA-256, commit);
load GB/s = bytes / `CheckpointManager.load` time (read into the engine, no hashing); both against
`cp -r` of the same directory followed by `sync` of the copies (goal ≥ 0.7 of cp).

    python bench/checkpoint.py                        # smoke and the larger CPU config
    python bench/checkpoint.py --configs smoke --saves 2
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

sys.path.append(str(Path(__file__).resolve().parent))  # after the repository: bench/data.py is not the data package
from corpus import prepare_stdlib  # noqa: E402

# The models of bench/trainer.py; short steps (64 tokens × 2) so that the step-time noise of a
# shared machine stays small against the save (the checkpoint's size depends on the model only).
GAP_S = 0.1  # idle between windows: the kernel's deferred work after one (journal, discards) ends before the next
SHORT = ["trainer.seq_len=64", "trainer.micro_batch_size=2", "trainer.global_batch_size=2"]
CONFIGS = {
    "smoke": ["model=smoke", *SHORT],
    "large": ["model=smoke", "model.dim=384", "model.n_heads=6", "model.moe_inter_dim=192", "model.inter_dim=1024",
              "model.n_routed_experts=32", "model.n_layers=6", "model.q_lora_rank=192", "model.kv_lora_rank=128",
              "model.vocab_size=512", *SHORT, "model.max_seq_len=512", "model.original_seq_len=512"],
}


def build_trainer(overrides: list[str], data: Path, work: Path):
    from parallel.engine import init_distributed
    from train.config import compose, to_config
    from train.data_setup import build_loaders
    from train.trainer import Trainer

    cfg = to_config(compose([*overrides, f"data.path={data}", "trainer.max_steps=100000", "trainer.log_interval=1000",
                             "trainer.eval_interval=0", "logging.wandb.mode=disabled", "logging.progress_bar=false",
                             f"checkpoint.dir={work / 'ckpt'}", "checkpoint.interval=0",
                             "checkpoint.interval_minutes=0", "checkpoint.keep=2", "checkpoint.resume=never"]))
    if not torch.distributed.is_initialized():
        init_distributed(torch.device("cpu"))
    trainer = Trainer(cfg, work / "run", world_size=1, rank=0)
    train_loader, val_factory = build_loaders(cfg, data, 0, 1)
    trainer.setup(train_loader, val_factory)
    return trainer


def window(trainer, steps: int, mode: str | None) -> dict:
    """`steps` training steps, after a save of `mode` ("sync" / "async"; None: no save); the save
    in flight and the deletion of the checkpoint it retired (a thread after a synchronous save)
    are waited for at the end (counted), so the window holds the whole save."""
    ck = trainer.checkpointer
    t0 = time.perf_counter()
    blocking = 0.0
    if mode is not None:
        ck.async_save = mode == "async"
        ck.save()
        blocking = time.perf_counter() - t0
    for _ in range(steps):
        trainer.train_step()
    busy_at_end = ck.in_flight()
    ck.settle()  # the save in flight and the deletion of the checkpoint it retired
    return {"s": time.perf_counter() - t0, "blocking": blocking, "late": busy_at_end}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def cp_seconds(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    subprocess.run(["sync", *map(str, dst.iterdir())], check=True)
    return time.perf_counter() - t0


def run(name: str, data: Path, saves: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        trainer = build_trainer(CONFIGS[name], data, work)
        try:
            for _ in range(3):  # warm-up
                trainer.train_step()
            window(trainer, 1, "async")  # the first save of each kind allocates (host image, files)
            window(trainer, 1, "sync")
            res = {None: [], "sync": [], "async": []}
            orders = list(itertools.permutations([None, "sync", "async"]))
            for i in range(saves):  # the three kinds interleaved, in each of the 6 orders in turn
                for mode in orders[i % len(orders)]:
                    time.sleep(GAP_S)
                    res[mode].append(window(trainer, steps, mode))
            latest = max(trainer.checkpointer.root.glob("step-*"))
            size = dir_bytes(latest)
            print(f"{name} windows, s:", {m or "none": [round(r["s"], 3) for r in rs] for m, rs in res.items()},
                  file=sys.stderr)
            base = statistics.median(r["s"] for r in res[None])
            # Paired: each save's window minus the no-save window of the same round (adjacent in
            # time), then the median. This machine's step time drifts by 20% over minutes; a
            # difference of the two medians carried that drift into the figure.
            stall = {m: statistics.median(a["s"] - b["s"] for a, b in zip(res[m], res[None])) for m in ("sync", "async")}
            save_s = stall["sync"]  # a synchronous save blocks for all of it
            load_s, cp_s = [], []
            for i in range(3):
                t0 = time.perf_counter()
                trainer.checkpointer.load(latest, with_loader=False)
                load_s.append(time.perf_counter() - t0)
                cp_s.append(cp_seconds(latest, work / f"cp{i}"))
        finally:
            trainer.close()
    gb = size / 1e9
    cp = statistics.median(cp_s)
    return {"config": name, "gb": gb, "window_s": base, "steps": steps, "sync_stall": stall["sync"],
            "async_stall": stall["async"], "async_blocking": statistics.median(r["blocking"] for r in res["async"]),
            "late": sum(r["late"] for r in res["async"]), "windows": saves,
            "ratio": stall["async"] / stall["sync"],
            "save_gbs": gb / save_s, "load_gbs": gb / statistics.median(load_s), "cp_gbs": gb / cp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--saves", type=int, default=7, help="windows of each kind per config (interleaved)")
    ap.add_argument("--steps", type=int, default=3, help="training steps per window (the async write must fit)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = prepare_stdlib(Path(tmp) / "stdlib", "max_chars=3000000", "val_fraction=0.05")
        rows = []
        for c in args.configs:
            rows.append(run(c, data, args.saves, args.steps))
            print(f"{c}: {rows[-1]}", file=sys.stderr, flush=True)
    print("| config | checkpoint GB | window s (steps) | sync stall s | async stall s | async blocking s "
          "| async writes outlasting the window | async/sync stall (goal ≤ 0.20) | save GB/s | load GB/s | cp GB/s "
          "| save/cp | load/cp (goal ≥ 0.7) |")
    print("|---" * 13 + "|")
    for r in rows:
        print(f"| {r['config']} | {r['gb']:.3f} | {r['window_s']:.3f} ({r['steps']}) | {r['sync_stall']:.3f} "
              f"| {r['async_stall']:.3f} | {r['async_blocking']:.3f} | {r['late']} of {r['windows']} | {r['ratio']:.2f} "
              f"| {r['save_gbs']:.2f} | {r['load_gbs']:.2f} | {r['cp_gbs']:.2f} | {r['save_gbs'] / r['cp_gbs']:.2f} "
              f"| {r['load_gbs'] / r['cp_gbs']:.2f} |")


if __name__ == "__main__":
    main()
