"""E4M3 quantisation with DeepSeek-V3's fine-grained scales, in plain PyTorch.

Every operand of a GEMM is viewed as (outer, reduce) — rows times the GEMM's inner
dimension — and scaled by one of four granularities:

- "tile":   one scale per 1×128 tile along the reduction dimension (activations and their
            gradients; DeepSeek-V3 §3.3.2, TE's Float8BlockScaling 1D)
- "block":  one scale per 128×128 block (weights; TE's 2D blocks)
- "row":    one scale per row (torch's rowwise _scaled_mm, torchao's rowwise)
- "tensor": one scale for the tensor

scale = max(amax, floor) / 448 (DeepSeek's act_quant floors amax at 1e-4), optionally rounded
up to a power of two (TE's default for blocks, DeepSeek V3.1's ue8m0); q = cast_e4m3(x / scale).
A ragged last tile or block (a dimension not divisible by the block size) is scaled on its own
— the emulated path allows it; the kernel backends refuse it in their capability checks.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
GRANULARITIES = ("tile", "block", "row", "tensor")


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    size = t.size(dim)
    pad = (-size) % multiple
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def scales_of(amax: torch.Tensor, pow2: bool) -> torch.Tensor:
    scale = amax.float().clamp(min=AMAX_FLOOR) / E4M3_MAX
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def quantize(t: torch.Tensor, granularity: str, block: int = 128, pow2: bool = False):
    """2-D t (outer, reduce) → (E4M3 tensor of t's shape, float32 scales broadcastable after expand_scales)."""
    if t.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D (outer, reduce) operand, got shape {tuple(t.shape)}")
    R, C = t.shape
    x = t.float()
    if granularity == "tensor":
        scale = scales_of(x.abs().amax(), pow2)
        return (x / scale).to(E4M3), scale
    if granularity == "row":
        scale = scales_of(x.abs().amax(dim=1, keepdim=True), pow2)  # (R, 1)
        return (x / scale).to(E4M3), scale
    if granularity == "tile":
        xp = _pad_to(x, 1, block).view(R, -1, block)  # (R, C/b, b)
        scale = scales_of(xp.abs().amax(dim=2, keepdim=True), pow2)  # (R, C/b, 1)
        q = (xp / scale).to(E4M3).view(R, -1)[:, :C]
        return q, scale
    if granularity == "block":
        xp = _pad_to(_pad_to(x, 0, block), 1, block)
        Rp, Cp = xp.shape
        blocks = xp.view(Rp // block, block, Cp // block, block)
        scale = scales_of(blocks.abs().amax(dim=(1, 3), keepdim=True), pow2)  # (R/b, 1, C/b, 1)
        q = (blocks / scale).to(E4M3).view(Rp, Cp)[:R, :C]
        return q, scale
    raise ValueError(f"quantize: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = 128,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    R, C = q.shape
    x = q.float()
    if granularity in ("tensor", "row"):
        return (x * scale).to(dtype)
    if granularity == "tile":
        xp = _pad_to(x, 1, block).view(R, -1, block)
        return (xp * scale).view(R, -1)[:, :C].to(dtype)
    xp = _pad_to(_pad_to(x, 0, block), 1, block)
    Rp, Cp = xp.shape
    return (xp.view(Rp // block, block, Cp // block, block) * scale).view(Rp, Cp)[:R, :C].to(dtype)


def fake_quantize(t: torch.Tensor, granularity: str, block: int = 128, pow2: bool = False) -> torch.Tensor:
    """quantise → dequantise, back in t's dtype."""
    q, s = quantize(t, granularity, block, pow2)
    return dequantize(q, s, granularity, block, t.dtype)
