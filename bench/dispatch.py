"""Expert-parallel dispatch: rows per link against the routing minima, FP8 dispatch bytes, and
communication hidden behind compute on a simulated slow link.

Part 1 (bytes) runs the real AllToAllDispatcher on `--ep` gloo ranks grouped as `--ep / --per-node`
simulated nodes, with DeepSeek-V3's routing shape (256 experts, top-8, 8 groups of which each
token may use 4, groups = nodes: node-limited routing). It counts the hidden-state rows each
rank sends over the inter-node and the intra-node links, dispatch and combine, for the one-level
dispatcher (one row per (token, remote rank), the path before node-aware dispatch) and the
node-aware one, against the routing minima counted from the routing alone — inter-node: one
row per (token, remote node); intra-node: one per (token, rank on a node other than the row's
holder there) — and the dispatched bytes with FP8 dispatch against BF16 rows.

Part 2 (time, simulated) measures forward+backward of one MoE layer (the smoke model's, wider)
at ep=2 as 2 simulated nodes of one rank. Each inter-node transfer is given the time its bytes
would take on a link of `--gbps` GB/s (`parallel/a2a.py LinkModel`: the rank sleeps until the
link would have delivered them, so compute can proceed meanwhile); by default the bandwidth
is chosen so that the layer's link time equals its compute time (comm:compute = 1:1, the
ratio DeepSeek-V3 reports before DualPipe). Modes: synchronous, shared-expert overlap,
two-chunk overlap, both. Perfect hiding would be max(compute, link) = 0.5 × synchronous.
SIMULATED: no network is involved; the figures say how much of the exchange each schedule
hides, not what a cluster measures.

    python bench/dispatch.py                     # both parts
    python bench/dispatch.py --ep 64 --per-node 8 --tokens 512
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
def worker_bytes(out: Path, tokens: int, dim: int, per_node: int) -> None:
    import torch
    import torch.distributed as dist

    from model.config import ModelConfig
    from model.fp8.gemm import Fp8Spec
    from model.moe import Gate
    from parallel.expert import AllToAllDispatcher

    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
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
        fp8 = Fp8Spec("emulated", "blockwise")

        def forward(self, rows, counts, qx=None):
            return rows

    res = {}
    for name, node_aware, fp8 in (("one-level", False, False), ("node-aware", True, False),
                                  ("node-aware, FP8 dispatch", True, True)):
        d = AllToAllDispatcher(None, ep, rank, cfg.n_routed_experts, account=True, per_node=per_node)
        d.node_aware, d.fp8 = node_aware, fp8
        with torch.no_grad():
            d(x, indices, weights, Identity())
        s, t = d.stats, d.stats.traffic
        v = torch.tensor([t.inter_rows, t.intra_rows, t.inter_bytes, t.intra_bytes, t.dispatch_bytes,
                          t.combine_bytes, t.metadata_bytes, s.min_inter_rows, s.min_intra_rows, s.min_flat_rows,
                          s.per_expert_rows, s.tokens], dtype=torch.float64)
        dist.all_reduce(v)
        res[name] = dict(zip(("inter_rows", "intra_rows", "inter_bytes", "intra_bytes", "dispatch_bytes",
                              "combine_bytes", "metadata_bytes", "min_inter", "min_intra", "min_flat",
                              "per_expert", "tokens"), v.tolist()))
    if rank == 0:
        out.write_text(json.dumps({"runs": res, "row_bytes": dim * x.element_size()}))
    dist.destroy_process_group()


MODES = {"synchronous (baseline)": {}, "shared-expert overlap": {"overlap": True},
         "two-chunk overlap": {"chunks": 2}, "both": {"overlap": True, "chunks": 2},
         "both, four chunks": {"overlap": True, "chunks": 4}}


def worker_time(out: Path, batch: int, seq: int, iters: int, dim: int, gbps: float) -> None:
    import copy

    import torch
    import torch.distributed as dist

    from model.moe import MoE
    from parallel.a2a import LinkModel
    from parallel.expert import configure_dispatch, shard_experts
    from train.config import compose, model_config

    dist.init_process_group("gloo")
    ep, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    cfg = model_config(compose(["model=smoke", f"model.dim={dim}", f"model.moe_inter_dim={dim // 2}"]).model)
    torch.manual_seed(0)
    base = MoE(cfg)
    for p in base.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(batch // ep, seq, cfg.dim, generator=torch.Generator().manual_seed(3 + rank))
    x.requires_grad_(True)

    def step(layer) -> float:
        dist.barrier()
        t = time.perf_counter()
        layer.zero_grad(set_to_none=True)
        layer(x).square().mean().backward()
        return time.perf_counter() - t

    def medians(layers: dict, rounds: int) -> dict:
        """Modes interleaved round by round (drift on a shared machine hits every mode alike);
        the median per mode, the slower rank's."""
        times = {name: [] for name in layers}
        for r in range(rounds + 2):
            for name, layer in layers.items():
                t = step(layer)
                if r >= 2:
                    times[name].append(t)
        med = torch.tensor([sorted(v)[len(v) // 2] for v in times.values()])
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        return dict(zip(times, med.tolist()))

    layers = {}
    for name, opts in MODES.items():
        layers[name] = copy.deepcopy(base)
        shard_experts(layers[name], None, ep, rank)
    # The bandwidth: link time per step = the synchronous layer's time without a link, unless given.
    probe = LinkModel(1e9)
    configure_dispatch(layers["synchronous (baseline)"], per_node=1, link=probe)
    compute = medians({"sync": layers["synchronous (baseline)"]}, iters)["sync"]
    per_step = torch.tensor(probe.bytes / (iters + 2), dtype=torch.float64)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)
    if gbps <= 0:
        gbps = per_step.item() / compute / 1e9
    res = {"compute_ms": 1e3 * compute, "gbps": gbps, "link_ms": 1e3 * per_step.item() / (gbps * 1e9)}
    for name, opts in MODES.items():
        configure_dispatch(layers[name], per_node=1, **opts)
    res["no_link"] = {k: 1e3 * v for k, v in medians(layers, iters).items()}
    for name, opts in MODES.items():
        configure_dispatch(layers[name], per_node=1, link=LinkModel(gbps), **opts)
    res["modes"] = {k: 1e3 * v for k, v in medians(layers, iters).items()}
    if rank == 0:
        out.write_text(json.dumps(res))
    dist.destroy_process_group()


# ------------------------------------------------------------------ report
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, default=16, help="expert-parallel ranks for the byte count")
    ap.add_argument("--per-node", type=int, default=2, help="ranks per simulated node (8 nodes = 8 groups at the default)")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per rank for the byte count")
    ap.add_argument("--dim", type=int, default=7168, help="hidden size for the byte count (V3: 7168)")
    ap.add_argument("--layer-dim", type=int, default=512, help="hidden size of the timed MoE layer")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--iters", type=int, default=15)
    ap.add_argument("--gbps", type=float, default=0.0, help="simulated link GB/s; 0 = link time = compute time")
    ap.add_argument("--parts", nargs="+", default=["bytes", "time"], choices=["bytes", "time"])
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        out, kind = Path(a.worker[0]), a.worker[1]
        if kind == "bytes":
            worker_bytes(out, a.tokens, a.dim, a.per_node)
        else:
            worker_time(out, a.batch, a.seq, a.iters, a.layer_dim, a.gbps)
        return
    if "bytes" in a.parts:
        report_bytes(a, _torchrun(a.ep, ["bytes", "--tokens", str(a.tokens), "--dim", str(a.dim),
                                         "--per-node", str(a.per_node)]))
    if "time" in a.parts:
        report_time(a, _torchrun(2, ["time", "--batch", str(a.batch), "--seq", str(a.seq), "--iters", str(a.iters),
                                     "--layer-dim", str(a.layer_dim), "--gbps", str(a.gbps)]))


def report_bytes(a, b: dict) -> None:
    runs, row = b["runs"], b["row_bytes"]
    base = runs["one-level"]
    tok = base["tokens"]
    print(f"dispatch rows: ep={a.ep} as {a.ep // a.per_node} simulated nodes × {a.per_node}, 256 experts top-8, "
          f"4 of 8 groups per token (groups = nodes), dim {a.dim} bf16, {a.tokens} tokens/rank. Rows per token are "
          "one direction (dispatch; the combine sends as many back).")
    print("| dispatcher | inter-node rows/token | vs inter minimum | intra-node rows/token | vs intra minimum "
          "| inter-node bytes/token | dispatched bytes vs BF16 |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {r['inter_rows'] / tok / 2:.2f} | {r['inter_rows'] / r['min_inter']:.3f} "
              f"| {r['intra_rows'] / tok / 2:.2f} "
              f"| {r['intra_rows'] / max(r['min_intra'], 1) if name != 'one-level' else float('nan'):.3f} "
              f"| {r['inter_bytes'] / tok:,.0f} | {r['dispatch_bytes'] / runs['node-aware']['dispatch_bytes']:.3f} |")
    print(f"| one copy per (token, expert), Megatron/DeepSpeed-MoE style | {base['per_expert'] / tok / 2:.2f} "
          "(all remote) | | | | | |")
    print(f"routing minima per token (one direction): inter-node {base['min_inter'] / tok / 2:.2f}, intra-node "
          f"{base['min_intra'] / tok / 2:.2f}; one-level minimum (remote ranks) {base['min_flat'] / tok / 2:.2f}; "
          f"row = {row:,} bytes; metadata {runs['node-aware']['metadata_bytes'] / tok:,.0f} bytes/token")
    print()


def report_time(a, t: dict) -> None:
    sync = t["modes"]["synchronous (baseline)"]
    print(f"MoE layer forward+backward, ep=2 as 2 simulated nodes, smoke MoE at dim {a.layer_dim}, "
          f"{a.batch}×{a.seq} tokens, median of {a.iters}; SIMULATED link {t['gbps']:.3f} GB/s: "
          f"{t['link_ms']:.1f} ms of link time per step against {t['compute_ms']:.1f} ms of compute")
    print("| schedule | ms, no link | ms, simulated link | vs synchronous (goal for both ≤ 0.65) "
          "| exposed link time hidden, vs synchronous (1 = perfect) |")
    print("|---|---|---|---|---|")
    # Perfect hiding leaves max(compute, link); the synchronous schedule's excess over that is
    # what a schedule can hide (the planner's MEASURED_OVERLAP, train/timing.py).
    ideal = max(t["no_link"]["synchronous (baseline)"], t["link_ms"])
    for name, ms in t["modes"].items():
        hidden = (sync - ms) / (sync - ideal)
        print(f"| {name} | {t['no_link'][name]:.1f} | {ms:.1f} | {ms / sync:.2f} | {hidden:.2f} |")


if __name__ == "__main__":
    main()
