"""Routed experts in FP8 for the emulated and torch backends: SwiGLU over expert segments.

Each projection (w1, w3, w2) is one grouped FP8 linear over all experts (gemm.py
`grouped_fp8_linear`): every operand quantised once for all experts, each expert's scale
groups kept inside its own rows and weights, so the result equals running the single FP8
linear expert by expert (the path it replaced, kept as tests/fp8_reference.py). The
interface — rows split by per-expert counts, one call per projection — is Transformer
Engine's GroupedLinear, which the te backend uses instead (te.py `GroupedExperts`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .gemm import Fp8Spec, grouped_fp8_linear


def grouped_fp8_swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                       sizes: list[int], spec: Fp8Spec, qx=None, defer=None) -> torch.Tensor:
    """x (M, D) in expert segments of `sizes` rows; w1, w3 (E, F, D), w2 (E, D, F) → (M, D).
    `qx`: x as already quantised for the forward GEMMs (FP8 dispatch), used without re-quantising.
    `defer`: a model/wgrad.py queue that takes the weight gradients."""
    h = F.silu(grouped_fp8_linear(x, w1, sizes, spec, qx, defer)) * grouped_fp8_linear(x, w3, sizes, spec, qx, defer)
    return grouped_fp8_linear(h, w2, sizes, spec, defer=defer)  # (M, D)

