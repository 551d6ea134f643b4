"""The cost of document-aware attention against plain causal attention (model/attention.py).

For each config, one training step (forward, main + MTP losses, backward) of moeforge's model
on a fixed batch: plain causal (no position ids: SDPA's `is_causal` path), and document masks
for packed documents of a given mean length (position ids restarting at each document; a dense
boolean mask on SDPA, or flex attention with `--device cuda --backends sdpa,flex`). The
variants are alternated step by step in one process so drift of the machine hits them
equally; the table gives the median step time and its ratio to causal, plus the attention
call alone (the layer's scaled-dot-product part, forward + backward).

    python bench/attention.py                      # CPU: smoke (8 × 256) and long (2 × 1024)
    python bench/attention.py --device cuda --backends sdpa,flex
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fp8_gemm import load_preset  # noqa: E402
from model import Transformer  # noqa: E402
from model.attention import document_mask, flex_attention, is_block_mask  # noqa: E402

SHAPES = {"smoke": (8, 256), "long": (2, 1024)}  # (micro batch, seq_len)


def position_ids(B: int, T: int, mean_len: int, seed: int = 0) -> torch.Tensor:
    """Per-document positions for rows packed with documents of geometric lengths (mean `mean_len`)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, T, generator=g) < 1.0 / mean_len
    starts[:, 0] = True
    idx = torch.arange(T).expand(B, T)
    last_start = torch.cummax(torch.where(starts, idx, torch.zeros_like(idx)), dim=1).values
    return idx - last_start


def time_call(fn, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="smoke,long")
    ap.add_argument("--doc-lengths", default="64,256", help="mean document lengths in tokens")
    ap.add_argument("--backends", default="sdpa")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"device {dev}, torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps each "
          "(alternated), median seconds")
    print(f"{'config':7} {'B×T':>8} {'variant':18} {'step s':>8} {'ratio':>6} {'attn s':>8} {'ratio':>6}")
    for name in args.configs.split(","):
        B, T = SHAPES[name]
        cfg = load_preset("smoke")
        cfg.max_seq_len = cfg.original_seq_len = max(cfg.max_seq_len, T)
        torch.manual_seed(0)
        model = Transformer(cfg.validate()).to(dev)
        tokens = torch.randint(0, cfg.vocab_size, (B, T + 1), device=dev)
        x, y = tokens[:, :-1], tokens[:, 1:]
        variants = {"causal": None}
        for backend in args.backends.split(","):
            for mean_len in (int(v) for v in args.doc_lengths.split(",")):
                variants[f"{backend} docs~{mean_len}"] = (backend, position_ids(B, T, mean_len).to(dev))
        H, D = cfg.n_heads, cfg.qk_head_dim
        q, k, v = (torch.randn(B, H, T, D, device=dev, requires_grad=True) for _ in range(3))

        def step(variant):
            if variant is None:
                loss = model.losses(x, y)
            else:
                model.set_attention(variant[0])
                loss = model.losses(x, y, variant[1])
            (loss.main + 0.3 * loss.mtp).backward()
            model.zero_grad(set_to_none=True)

        def attn(variant):
            if variant is None:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = document_mask(variant[1], variant[0])
                o = flex_attention(q, k, v, mask, D**-0.5) if is_block_mask(mask) else \
                    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            o.sum().backward()

        times = {n: ([], []) for n in variants}
        for n, var in variants.items():  # warm-up (and flex compilation)
            time_call(lambda: step(var), 1), time_call(lambda: attn(var), 1)
        for _ in range(args.steps):
            for n, var in variants.items():
                times[n][0].extend(time_call(lambda: step(var), 1))
                times[n][1].extend(time_call(lambda: attn(var), 1))
        base_step, base_attn = (statistics.median(t) for t in times["causal"])
        for n, (ts, ta) in times.items():
            s, a = statistics.median(ts), statistics.median(ta)
            print(f"{name:7} {f'{B}×{T}':>8} {n:18} {s:8.4f} {s / base_step:6.2f} {a:8.4f} {a / base_attn:6.2f}")


if __name__ == "__main__":
    main()
