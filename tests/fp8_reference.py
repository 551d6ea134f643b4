"""FP8 routed experts one expert at a time: the reference the grouped path (model/fp8/grouped.py
`grouped_fp8_swiglu`) replaced, kept for tests/unit/test_fp8.py and bench/fp8_experts.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.fp8.gemm import Fp8Spec, fp8_linear


def per_expert_fp8_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                          sizes: list[int], spec: Fp8Spec, qx=None, defer=None) -> torch.Tensor:
    """x (M, D) in expert segments of `sizes` rows; w1, w3 (E, F, D), w2 (E, D, F) → (M, D),
    through the single FP8 linear, one expert at a time. grouped_fp8_swiglu's signature; the
    reference quantises its own input and computes weight gradients at once (qx, defer: None)."""
    assert qx is None and defer is None, "the per-expert reference takes neither FP8 dispatch nor deferral"
    outs, start = [], 0
    for e, n in enumerate(sizes):
        if n:
            xs = x[start:start + n]
            h = F.silu(fp8_linear(xs, w1[e], spec)) * fp8_linear(xs, w3[e], spec)
            outs.append(fp8_linear(h, w2[e], spec))
            start += n
    return torch.cat(outs) if outs else x.new_zeros(0, w2.size(1))
