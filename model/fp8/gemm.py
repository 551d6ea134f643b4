"""The FP8 linear layer: y = x Wᵀ with all three GEMMs on E4M3 operands.

Each GEMM quantises both operands along its own reduction dimension (an operand is viewed as
(outer, reduce)), with the granularity its recipe gives that operand:

| recipe     | forward x · W      | data grad dy · W    | weight grad dyᵀ · x |
|------------|--------------------|---------------------|---------------------|
| blockwise  | 1×128 · 128×128    | 1×128 · 128×128     | 1×128 · 1×128       |
| rowwise    | row · row          | row · row           | row · row           |
| tensorwise | tensor · tensor    | tensor · tensor     | tensor · tensor     |

Blockwise is DeepSeek-V3's recipe (§3.3): activations and activation gradients per 1×128 tile
(never 128×128 for gradients — DeepSeek reports that diverged), weights per 128×128 block;
for the weight gradient both dy and x are re-tiled along the token dimension, as TE's
Float8BlockScaling does. The `emulated` backend dequantises and multiplies in the compute
dtype (the reference any device can run); `torch` multiplies the E4M3 operands with
torch._scaled_mm (tensorwise or rowwise scales, the granularities it accepts). torchao's
float8 training follows the same three-GEMM structure; this is our own small version.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quant import dequantize, quantize

RECIPES = {
    "blockwise": (("tile", "block"), ("tile", "block"), ("tile", "tile")),
    "rowwise": (("row", "row"),) * 3,
    "tensorwise": (("tensor", "tensor"),) * 3,
}


@dataclass(frozen=True)
class Fp8Spec:
    backend: str = "emulated"  # emulated | torch
    recipe: str = "blockwise"
    block: int = 128
    pow2: bool = False


def fp8_mm(a: torch.Tensor, b: torch.Tensor, ga: str, gb: str, spec: Fp8Spec, out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b (N, K)ᵀ with both operands E4M3-quantised along K."""
    qa, sa = quantize(a, ga, spec.block, spec.pow2)
    qb, sb = quantize(b, gb, spec.block, spec.pow2)
    if spec.backend == "emulated":
        da = dequantize(qa, sa, ga, spec.block, out_dtype)
        db = dequantize(qb, sb, gb, spec.block, out_dtype)
        return da @ db.t()
    # torch._scaled_mm: a row-major, b column-major; scales a scalar each or (M, 1) and (1, N).
    scale_b = sb.t() if gb == "row" else sb
    return torch._scaled_mm(qa, qb.t(), scale_a=sa, scale_b=scale_b, out_dtype=out_dtype)


class _Fp8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, spec: Fp8Spec):
        ctx.save_for_backward(x, w)
        ctx.spec = spec
        (gx, gw), _, _ = RECIPES[spec.recipe]
        return fp8_mm(x, w, gx, gw, spec, x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        spec = ctx.spec
        _, (g_dy, g_w), (g_dyt, g_xt) = RECIPES[spec.recipe]
        dy = dy.contiguous()
        dx = fp8_mm(dy, w.t().contiguous(), g_dy, g_w, spec, x.dtype) if ctx.needs_input_grad[0] else None
        dw = fp8_mm(dy.t().contiguous(), x.t().contiguous(), g_dyt, g_xt, spec, w.dtype) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def fp8_linear(x: torch.Tensor, w: torch.Tensor, spec: Fp8Spec) -> torch.Tensor:
    """x (..., K), w (N, K) → (..., N)."""
    y = _Fp8LinearFn.apply(x.reshape(-1, x.size(-1)), w, spec)
    return y.view(*x.shape[:-1], w.size(0))


class Fp8Linear(nn.Linear):
    """nn.Linear (same parameters, names and init) whose GEMMs run in FP8."""

    def __init__(self, in_features: int, out_features: int, spec: Fp8Spec, bias: bool = False, **kw):
        super().__init__(in_features, out_features, bias=bias, **kw)
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, self.spec)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.spec.backend}/{self.spec.recipe}"
