"""E4M3 quantisation with DeepSeek-V3's fine-grained scales, in plain PyTorch.

Every operand of a GEMM is viewed as (outer, reduce) — rows times the GEMM's inner
dimension — and scaled by one of four granularities:

- "tile":   one scale per 1×128 tile along the reduction dimension (activations and their
            gradients; DeepSeek-V3 §3.3.2, TE's Float8BlockScaling 1D)
- "block":  one scale per 128×128 block (weights; TE's 2D blocks)
- "row":    one scale per row (torch's rowwise _scaled_mm, torchao's rowwise)
- "tensor": one scale for the tensor

scale = amax / 448, optionally rounded up to a power of two (TE's default for blocks, DeepSeek
V3.1's ue8m0); q = cast_e4m3(x / scale). An all-zero group gets scale 1 (q = 0). There is no
amax floor: DeepSeek's inference act_quant floors amax at 1e-4, harmless for activations but not
for gradients, whose elements are ~1e-9 at a pretraining batch (~63M tokens a step) and would be
scaled by a floor-set 2.2e-7 into E4M3's subnormals or to zero. TE's current scaling likewise
uses an amax epsilon of 0 and guards only the all-zero case.
A ragged last tile or block (a dimension not divisible by the block size) is scaled on its own
— the emulated path allows it; the kernel backends refuse it in their capability checks.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
GRANULARITIES = ("tile", "block", "row", "tensor")


def _pad_to(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    size = t.size(dim)
    pad = (-size) % multiple
    if not pad:
        return t
    shape = list(t.shape)
    shape[dim] = pad
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _fit(t: torch.Tensor, dim: int, block: int) -> tuple[torch.Tensor, int]:
    """t padded along `dim` to whole groups of b = min(block, size) elements, and b: a dimension
    shorter than the block is one group as it is (no padding copy); zeros never raise an amax."""
    size = t.size(dim)
    b = min(block, size) or block
    return _pad_to(t, dim, b), b


def scales_of(amax: torch.Tensor, pow2: bool, floor: float = 0.0) -> torch.Tensor:
    """amax → the float32 scale that maps it to E4M3_MAX; 1 for an all-zero group.

    amax / 448 stays a normal float32 down to amax ~5e-36 (then divisions by it lose bits, still
    finite); a non-finite amax gives a non-finite scale, so a NaN or inf gradient stays visible
    to the step guard instead of being quantised into finite values. `floor` > 0 is the old
    DeepSeek-inference floor, kept only for the `amax_floor` negative control (gemm.py)."""
    amax = amax.float() if not floor else amax.float().clamp(min=floor)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    if pow2:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    return scale


def round_to_e4m3(v: torch.Tensor) -> torch.Tensor:
    """float32 v (|v| at most ~448, as scaled operands are) rounded to the nearest E4M3 value,
    ties to even, kept in float32: bit for bit `v.to(E4M3).float()` (tests/unit/test_fp8.py),
    without CPU torch's element-by-element FP8 conversions (~3× slower than these four ops).

    E4M3's step in v's binade [2^e, 2^(e+1)) is 2^(e-3), and 2^-9 below its smallest normal
    2^-6. Adding c = 1.5·2^(max(e, -6)+20) puts that step at the last bit of the float32 sum,
    so the FPU's round-to-nearest-even rounds v exactly as the cast does; subtracting c is exact.
    """
    c = (v.view(torch.int32) & 0x7F800000).view(torch.float32)  # 2^e: v's exponent bits only
    c = c.clamp_(min=2.0 ** -6).mul_(1.5 * 2 ** 20)
    return (v + c).sub_(c)


def _to_grid(v: torch.Tensor, as_e4m3: bool) -> torch.Tensor:
    return v.to(E4M3) if as_e4m3 else round_to_e4m3(v)


def quantize(t: torch.Tensor, granularity: str, block: int = 128, pow2: bool = False, as_e4m3: bool = True,
             floor: float = 0.0):
    """2-D t (outer, reduce) → (q of t's shape, float32 scales in the granularity's grouped layout).

    q is an E4M3 tensor, or with as_e4m3=False the same values in float32 (the emulated backend,
    which only multiplies them back)."""
    if t.dim() != 2:
        raise ValueError(f"quantize: expected a 2-D (outer, reduce) operand, got shape {tuple(t.shape)}")
    R, C = t.shape
    x = t.float()
    if granularity == "tensor":
        scale = scales_of(x.abs().amax(), pow2, floor)
        return _to_grid(x / scale, as_e4m3), scale
    if granularity == "row":
        scale = scales_of(x.abs().amax(dim=1, keepdim=True), pow2, floor)  # (R, 1)
        return _to_grid(x / scale, as_e4m3), scale
    if granularity == "tile":
        xp, b = _fit(x, 1, block)
        xp = xp.view(R, -1, b)  # (R, C/b, b)
        scale = scales_of(xp.abs().amax(dim=2, keepdim=True), pow2, floor)  # (R, C/b, 1)
        q = _to_grid(xp / scale, as_e4m3).view(R, -1)[:, :C]
        return q, scale
    if granularity == "block":
        xp, br = _fit(x, 0, block)
        xp, bc = _fit(xp, 1, block)
        Rp, Cp = xp.shape
        blocks = xp.view(Rp // br, br, Cp // bc, bc)
        scale = scales_of(blocks.abs().amax(dim=(1, 3), keepdim=True), pow2, floor)  # (R/b, 1, C/b, 1)
        q = _to_grid(blocks / scale, as_e4m3).view(Rp, Cp)[:R, :C]
        return q, scale
    raise ValueError(f"quantize: granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")


_E4M3_VALUES: dict[torch.device, torch.Tensor] = {}


def e4m3_to_float(q: torch.Tensor) -> torch.Tensor:
    """q.float(), exactly, through a 256-entry table: CPU torch converts E4M3 element by element
    (~3× slower than this gather on the 2-core CI box); elsewhere the plain cast. Non-E4M3
    input (round_to_e4m3's float32 values) is returned as float32."""
    if q.dtype != E4M3:
        return q.float()
    if q.device.type != "cpu":
        return q.float()
    table = _E4M3_VALUES.get(q.device)
    if table is None:
        table = _E4M3_VALUES[q.device] = torch.arange(256, dtype=torch.uint8).view(E4M3).float()
    return table.index_select(0, q.reshape(-1).view(torch.uint8).int()).view(q.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = 128,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    R, C = q.shape
    x = e4m3_to_float(q) if q.dtype == E4M3 else q.float()
    if granularity in ("tensor", "row"):
        return (x * scale).to(dtype)
    if granularity == "tile":
        xp, b = _fit(x, 1, block)
        return (xp.view(R, -1, b) * scale).view(R, -1)[:, :C].to(dtype)
    xp, br = _fit(x, 0, block)
    xp, bc = _fit(xp, 1, block)
    Rp, Cp = xp.shape
    return (xp.view(Rp // br, br, Cp // bc, bc) * scale).view(Rp, Cp)[:R, :C].to(dtype)


def fake_quantize(t: torch.Tensor, granularity: str, block: int = 128, pow2: bool = False) -> torch.Tensor:
    """quantise → dequantise, back in t's dtype."""
    q, s = quantize(t, granularity, block, pow2)
    return dequantize(q, s, granularity, block, t.dtype)
