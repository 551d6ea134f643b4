"""Expert-parallel dispatch: bytes per token against the routing minimum, and MoE layer time at ep=2 vs ep=1.

Part 1 (bytes) runs the real AllToAllDispatcher on `--ep` gloo ranks with DeepSeek-V3's
routing shape (256 experts, top-8, 8 groups of which each token may use 4) and the groups
mapped one-to-one to EP ranks, as node-limited routing maps them to nodes. It counts the
hidden-state bytes each rank sends to other ranks (dispatch + combine) and compares them with
(a) the minimum the routing implies — each token once to each other rank holding at least one
of its experts, each way — and (b) what a one-copy-per-(token, expert) dispatcher (Megatron-
Core's AlltoAll, DeepSpeed's MoE) would send for the same routing. Metadata (top-k ids and
weights, counts) is reported separately.

Part 2 (time) measures forward+backward of one smoke-sized MoE layer on the same global batch
with ep=1 (one process, local dispatcher) and ep=2 (two processes, all-to-all), on this CPU.
A report, not a goal: on a 2-core VM two processes share the cores that one uses at ep=1.

    python bench/dispatch.py                     # both parts
    python bench/dispatch.py --ep 8 --tokens 1024
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _torchrun(nproc: int, args: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), __file__, "--worker", str(out), *args]
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"worker failed:\n{r.stderr[-3000:]}")
        return json.loads(out.read_text())


# ------------------------------------------------------------------ workers
def worker_bytes(out: Path, tokens: int, dim: int) -> None:
    import torch
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.moe import Gate
    from parallel.expert import AllToAllDispatcher

    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    cfg = ModelConfig(dim=dim, n_routed_experts=256, n_activated_experts=8, n_expert_groups=8, n_limited_groups=4,
                      score_func="sigmoid", route_scale=2.5, n_layers=4, n_dense_layers=1).validate()
    torch.manual_seed(0)  # same router on every rank; different tokens per rank
    gate = Gate(cfg)
    torch.nn.init.normal_(gate.weight, std=0.02)
    g = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, dim, generator=g, dtype=torch.bfloat16)
    with torch.no_grad():
        weights, indices, _ = gate(x)

    class Identity(torch.nn.Module):
        def forward(self, rows, counts):
            return rows

    d = AllToAllDispatcher(None, ep, rank, cfg.n_routed_experts, account=True)
    with torch.no_grad():
        d(x, indices, weights, Identity())
    s = d.stats
    dest = indices // (cfg.n_routed_experts // ep)
    ranks_per_token = torch.zeros(tokens, ep, dtype=torch.bool).scatter_(1, dest, True).sum(1).float().mean()
    totals = torch.tensor([s.payload_bytes, s.min_payload_bytes, s.per_expert_bytes, s.metadata_bytes, s.tokens],
                          dtype=torch.float64)
    dist.all_reduce(totals)
    rpt = ranks_per_token.clone()
    dist.all_reduce(rpt)
    if rank == 0:
        out.write_text(json.dumps({"payload": totals[0].item(), "minimum": totals[1].item(),
                                   "per_expert": totals[2].item(), "metadata": totals[3].item(),
                                   "tokens": totals[4].item(), "ranks_per_token": rpt.item() / ep,
                                   "elem_bytes": x.element_size()}))
    dist.destroy_process_group()


def worker_time(out: Path, batch: int, seq: int, iters: int) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from model.moe import MoE
    from parallel.expert import shard_experts
    from train.config import compose, model_config

    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    cfg = model_config(compose(["model=smoke"]).model)
    torch.manual_seed(0)
    layer = MoE(cfg)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    if ep > 1:
        layer = copy.deepcopy(layer)
        shard_experts(layer, None, ep, rank)
    per_rank = batch // ep
    x = torch.randn(batch, seq, cfg.dim, generator=torch.Generator().manual_seed(3))[rank * per_rank:(rank + 1) * per_rank]
    x.requires_grad_(True)

    def step():
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()

    for _ in range(3):
        step()
    dist.barrier()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t)
    if rank == 0:
        times.sort()
        out.write_text(json.dumps({"median_ms": 1e3 * times[len(times) // 2]}))
    dist.destroy_process_group()


# ------------------------------------------------------------------ report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=8, help="expert-parallel ranks for the byte count (groups per rank = 8/ep)")
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per rank for the byte count")
    ap.add_argument("--dim", type=int, default=7168, help="hidden size for the byte count (V3: 7168)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out, kind = Path(a.worker[0]), a.worker[1]
        if kind == "bytes":
            worker_bytes(out, a.tokens, a.dim)
        else:
            worker_time(out, a.batch, a.seq, a.iters)
        return
    b = _torchrun(a.ep, ["bytes", "--tokens", str(a.tokens), "--dim", str(a.dim)])
    t1 = _torchrun(1, ["time", "--batch", str(a.batch), "--seq", str(a.seq), "--iters", str(a.iters)])
    t2 = _torchrun(2, ["time", "--batch", str(a.batch), "--seq", str(a.seq), "--iters", str(a.iters)])
    row = b["elem_bytes"] * a.dim
    per_tok = lambda v: v / b["tokens"]  # noqa: E731
    print(f"dispatch bytes: ep={a.ep}, 256 experts top-8, 4 of 8 groups per token, groups = EP ranks, "
          f"dim {a.dim} bf16, {a.tokens} tokens/rank; mean destination ranks per token {b['ranks_per_token']:.2f}")
    print("| sent to other ranks (dispatch + combine) | bytes/token | rows/token | vs routing minimum |")
    print("|---|---|---|---|")
    for name, v in (("routing minimum (baseline)", b["minimum"]), ("moeforge AllToAllDispatcher", b["payload"]),
                    ("one copy per (token, expert)", b["per_expert"])):
        print(f"| {name} | {per_tok(v):,.0f} | {per_tok(v) / row / 2:.2f} | {v / b['minimum']:.3f} |")
    print(f"| metadata (ids, weights, counts) | {per_tok(b['metadata']):,.0f} | | |")
    print()
    print(f"MoE layer forward+backward, smoke model, batch {a.batch}×{a.seq}, median of {a.iters}:")
    print("| layout | ms | vs ep=1 |")
    print("|---|---|---|")
    print(f"| ep=1, one process (baseline) | {t1['median_ms']:.1f} | 1.00 |")
    print(f"| ep=2, two processes | {t2['median_ms']:.1f} | {t1['median_ms'] / t2['median_ms']:.2f} |")


if __name__ == "__main__":
    main()
