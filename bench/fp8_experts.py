"""Routed experts in FP8 (emulated blockwise): the grouped path against the per-expert one it replaced.

Times forward + backward of one MoE layer's experts (SwiGLU, E experts, tokens routed top-k
with a random but fixed assignment) in fp32 without FP8, through the grouped FP8 path
(model/fp8/grouped.py `grouped_fp8_swiglu`: each operand quantised once for all experts)
and through the single FP8 linear expert by expert (`per_expert_fp8_swiglu`, kept in
tests/fp8_reference.py), alternating the three in one process so load drift hits all of them
alike; prints median milliseconds.

    python bench/fp8_experts.py                   # smoke and tiny expert shapes, CPU
    python bench/fp8_experts.py --repeats 20 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.fp8.gemm import Fp8Spec  # noqa: E402
from model.fp8.grouped import grouped_fp8_swiglu  # noqa: E402
from model.moe import _SegmentedSwiGLU  # noqa: E402
from tests.fp8_reference import per_expert_fp8_swiglu  # noqa: E402

# name → (experts E, dim D, expert hidden F, token copies M = tokens × top-k)
SHAPES = {"smoke (4×64 tokens, top-4)": (16, 128, 64, 1024), "tiny (4×256 tokens, top-4)": (24, 512, 256, 4096)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    spec = Fp8Spec("emulated", "blockwise")
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.repeats} fwd+bwd (ms)")
    print("| shape | fp32 (no FP8) | FP8 per expert | FP8 grouped | grouped speedup | grouped / fp32 |")
    print("|---|---|---|---|---|---|")
    for name, (E, D, F_, M) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        sizes = torch.bincount(torch.randint(0, E, (M,), generator=g), minlength=E).tolist()
        x = torch.randn(M, D, generator=g, requires_grad=True)
        ws = [(torch.randn(*s, generator=g) * 0.05).requires_grad_(True) for s in ((E, F_, D), (E, D, F_), (E, F_, D))]
        runs = {"fp32": lambda: _SegmentedSwiGLU.apply(x, *ws, sizes),
                "per expert": lambda: per_expert_fp8_swiglu(x, *ws, sizes, spec),
                "grouped": lambda: grouped_fp8_swiglu(x, *ws, sizes, spec)}
        times = {k: [] for k in runs}
        for i in range(args.repeats + 1):
            for k, fn in runs.items():
                t = time.perf_counter()
                fn().sum().backward()
                if i:  # the first round warms up
                    times[k].append(time.perf_counter() - t)
        ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"| {name} | {ms['fp32']:.1f} | {ms['per expert']:.1f} | {ms['grouped']:.1f} | "
              f"{ms['per expert'] / ms['grouped']:.2f}× | {ms['grouped'] / ms['fp32']:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
