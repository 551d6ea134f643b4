"""FP8 GEMMs with all three products on E4M3 operands: the linear layer and the experts' grouped linear.

    y[seg e] = x[seg e] · w[e]ᵀ    x (M, K) rows in E consecutive segments of `sizes` rows,
                                   w (E, N, K), y (M, N); a plain linear is E = 1, one segment

Each GEMM quantises both operands along its own reduction dimension with the granularity its
recipe gives that operand:

| recipe     | forward x · W      | data grad dy · W    | weight grad dyᵀ · x |
|------------|--------------------|---------------------|---------------------|
| blockwise  | 1×128 · 128×128    | 1×128 · 128×128     | 1×128 · 1×128       |
| rowwise    | row · row          | row · row           | row · row           |
| tensorwise | tensor · tensor    | tensor · tensor     | tensor · tensor     |

Blockwise is DeepSeek-V3's recipe (§3.3): activations and activation gradients per 1×128 tile
(never 128×128 for gradients — DeepSeek reports that diverged), weights per 128×128 block
(the scale layout of DeepSeek-V3's inference/kernel.py act_quant and weight_dequant); for the
weight gradient both dy and x are tiled along the tokens, as TE's Float8BlockScaling does.

Segments (the routed experts, Transformer Engine's GroupedLinear interface with per-expert
row counts): every scale group stays inside one expert — weights per expert, activation tiles
and rows never cross a row anyway, token tiles of the weight gradient restart at each
segment's first row (a segment's last tile may be short), tensorwise scales are per segment.
So the grouped call equals the single linear run expert by expert, bit for bit (tests/unit/
test_fp8.py), while quantising every operand in one batched call; only the GEMMs loop over
the non-empty segments.

Backends: `emulated` dequantises and multiplies in the compute dtype (the reference any
device runs); `torch` multiplies the E4M3 operands with torch._scaled_mm (tensorwise or rowwise
scales, the granularities it accepts). torchao's float8 training has the same three-GEMM
structure; this is our own small version. The 128×128 weight blocks quantised in the forward
are reused, transposed, by the data-gradient GEMM (a block's amax does not depend on the
orientation, so this equals quantising wᵀ again); rowwise requantises wᵀ along N.

Shapes: M rows, K reduction dim, N output dim, E experts/segments, G scale groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .quant import _fit, _to_grid, dequantize, e4m3_to_float, quantize, scales_of

RECIPES = {
    "blockwise": (("tile", "block"), ("tile", "block"), ("tile", "tile")),
    "rowwise": (("row", "row"),) * 3,
    "tensorwise": (("tensor", "tensor"),) * 3,
    # DeepSeek-V3's ablation (report §3.3.1): activation gradients in 128×128 blocks, as weights,
    # made a 16B MoE diverge. Emulated only, for negative controls of training comparisons
    # (tests/integration/test_fp8_training.py): not a recipe to train with.
    "grad_blocks": (("tile", "block"), ("act_block", "block"), ("act_block", "tile")),
    # The forward's operands on E5M2 (2 mantissa bits, max 57344) in blockwise groups, the
    # backward as blockwise: another negative control (E5M2 is a gradient format).
    "e5m2_forward": (("e5m2_tile", "e5m2_block"), ("tile", "block"), ("tile", "tile")),
    # Blockwise with DeepSeek's inference act_quant floor (amax ≥ 1e-4) on every operand, the
    # defect this path once had: it flushes the small gradients of real batch sizes. A negative
    # control, run with its gradients at a real batch's magnitude (GRAD_SCALES).
    "amax_floor": (("tile", "block"), ("tile", "block"), ("tile", "tile")),
}
FLOORS = {"amax_floor": 1e-4}
# The output gradient dy scaled by this before its quantisations and the GEMM results scaled
# back, for the control: a mean loss over N tokens gives each token's activations gradients
# ∝ 1/N, so 2^-18 puts a 256-token test step's gradients where DeepSeek-V3's 63M-token (2^26)
# batch has them, where the floor flushed them. At 2^-14 (a 4M-token batch) the control lost
# 0.03 in the 300-step test, inside the spread of seeds; at 2^-18, 0.73 (bench/RESULTS.md).
# Exact for any recipe without a floor: power-of-two scalings commute with amax scaling, and
# the gradients stay far above float32's subnormals (tests/unit/test_fp8.py).
GRAD_SCALES = {"amax_floor": 2.0 ** -18}


def _floor(spec: "Fp8Spec") -> float:
    return FLOORS.get(spec.recipe, 0.0)
E5M2_MAX = 57344.0


def _fake_e5m2(t: torch.Tensor, block: int, dims: tuple[int, ...]) -> torch.Tensor:
    """t (…, R, C) fake-quantised to E5M2 in float32: groups of `block` along the last dim
    (dims=(-1,): 1×128 tiles) or `block`×`block` blocks (dims=(-2, -1))."""
    x = t.float()
    shape = x.shape
    for d in dims:
        x, _ = _fit(x, x.dim() + d, block)
    padded = x.shape
    if dims == (-1,):
        g = x.view(*padded[:-1], -1, min(block, shape[-1]))
        amax = g.abs().amax(dim=-1, keepdim=True)
    else:
        br, bc = min(block, shape[-2]), min(block, shape[-1])
        g = x.view(*padded[:-2], padded[-2] // br, br, padded[-1] // bc, bc)
        amax = g.abs().amax(dim=(-3, -1), keepdim=True)
    s = torch.where(amax > 0, amax / E5M2_MAX, torch.ones_like(amax))
    q = ((g / s).to(torch.float8_e5m2).float() * s).view(padded)
    return q[..., :shape[-2], :shape[-1]] if dims != (-1,) else q[..., :shape[-1]]


@dataclass(frozen=True)
class Fp8Spec:
    backend: str = "emulated"  # emulated | torch
    recipe: str = "blockwise"
    block: int = 128
    pow2: bool = False


def _real(spec: Fp8Spec) -> bool:
    """E4M3 tensors for the kernels; the emulated backend keeps the same values in float32
    (quant.round_to_e4m3), which it only multiplies back."""
    return spec.backend != "emulated"


class Quantised:
    """A quantised operand q (E4M3, or its values in float32 for `emulated`) with its float32
    scales: broadcastable to q, or (tiles, blocks) in the grouped layout quantize() returns."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, granularity: str, block: int = 128):
        self.q, self.scale, self.granularity, self.block = q, scale, granularity, block

    def dequant(self, dtype: torch.dtype) -> torch.Tensor:
        if self.granularity == "token_tile":  # one segment tiled along rows: scales (M/b, 1, C)
            M, C = self.q.shape
            xp, b = _fit(e4m3_to_float(self.q), 0, self.block)
            return (xp.view(-1, b, C) * self.scale).view(-1, C)[:M].to(dtype)
        if self.granularity == "tile" and self.scale.dim() == 3:
            return dequantize(self.q, self.scale, "tile", self.block, dtype)
        if self.granularity == "act_block":
            return dequantize(self.q, self.scale, "block", self.block, dtype)
        if self.granularity == "block":
            return _dequant_blocks(self.q, self.scale, self.block, dtype)
        return (e4m3_to_float(self.q) * self.scale).to(dtype)

    def t(self) -> "Quantised":
        """The transposed weight operand (E, C, R), for granularities that do not depend on the
        orientation (blocks, tensors)."""
        assert self.granularity in ("block", "tensor")
        scale = self.scale.permute(0, 3, 4, 1, 2) if self.granularity == "block" else self.scale
        return Quantised(self.q.transpose(1, 2), scale, self.granularity, self.block)


def _dequant_blocks(q: torch.Tensor, s: torch.Tensor, b: int, dtype: torch.dtype) -> torch.Tensor:
    """q (E, R, C) with block scales (E, R/b, 1, C/b, 1) → (E, R, C) in dtype."""
    E, R, C = q.shape
    xp, br = _fit(e4m3_to_float(q), 1, b)
    xp, bc = _fit(xp, 2, b)
    Rp, Cp = xp.shape[1:]
    return (xp.view(E, Rp // br, br, Cp // bc, bc) * s).view(E, Rp, Cp)[:, :R, :C].to(dtype)


def _lengths(lengths: list[int], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(lengths, dtype=torch.long, device=like.device)


def _segment_amax(a: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """|a| (M, C) → (G, C): column-wise max over each of the consecutive row groups (none empty)."""
    return torch.segment_reduce(a.abs(), "max", lengths=_lengths(lengths, a), axis=0, unsafe=True)


def quant_along_columns(a: torch.Tensor, granularity: str, sizes: list[int], spec: Fp8Spec) -> Quantised:
    """a (M, K), rows in segments, quantised along K (the forward and data-gradient activations)."""
    if granularity in ("tile", "row"):  # no group crosses a row: one call for every segment
        q, s = quantize(a, granularity, spec.block, spec.pow2, as_e4m3=_real(spec), floor=_floor(spec))  # tile (M, K/b, 1), row (M, 1)
        return Quantised(q, s, granularity, spec.block)
    if granularity == "act_block":  # 128×128 blocks over the whole operand (grad_blocks control)
        q, s = quantize(a, "block", spec.block, spec.pow2, as_e4m3=_real(spec), floor=_floor(spec))
        return Quantised(q, s, "act_block", spec.block)
    if granularity == "tensor":  # one scale per segment
        lengths = [n for n in sizes if n]
        amax = _segment_amax(a.float(), lengths).amax(dim=1, keepdim=True)  # (G, 1)
        s = torch.repeat_interleave(scales_of(amax, spec.pow2, _floor(spec)), _lengths(lengths, a), dim=0)  # (M, 1)
        return Quantised(_to_grid(a.float() / s, _real(spec)), s, granularity)
    raise ValueError(f"fp8: activation granularity {granularity!r} is not tile, row or tensor")


def quant_weights(w: torch.Tensor, granularity: str, spec: Fp8Spec) -> Quantised:
    """w (E, R, C) quantised along C per expert: 128×128 blocks, rows, or one tensor per expert."""
    E, R, C = w.shape
    x = w.float()
    if granularity == "block":
        xp, br = _fit(x, 1, spec.block)
        xp, bc = _fit(xp, 2, spec.block)
        Rp, Cp = xp.shape[1:]
        blocks = xp.view(E, Rp // br, br, Cp // bc, bc)  # (E, R/b, b, C/b, b)
        s = scales_of(blocks.abs().amax(dim=(2, 4), keepdim=True), spec.pow2, _floor(spec))  # (E, R/b, 1, C/b, 1)
        q = _to_grid(blocks / s, _real(spec)).view(E, Rp, Cp)[:, :R, :C]
        return Quantised(q, s, granularity, spec.block)
    if granularity == "row":
        s = scales_of(x.abs().amax(dim=2, keepdim=True), spec.pow2, _floor(spec))  # (E, R, 1)
    elif granularity == "tensor":
        s = scales_of(x.abs().amax(dim=(1, 2), keepdim=True), spec.pow2, _floor(spec))  # (E, 1, 1)
    else:
        raise ValueError(f"fp8: weight granularity {granularity!r} is not block, row or tensor")
    return Quantised(_to_grid(x / s, _real(spec)), s, granularity)


def quant_along_rows(a: torch.Tensor, granularity: str, sizes: list[int], spec: Fp8Spec) -> Quantised:
    """a (M, C) quantised along M inside each segment (the weight-gradient operands, whose
    reduction dimension is the segment's tokens): tiles of `block` tokens restarting at each
    segment start, one scale per segment and column (a row of aᵀ), or one per segment."""
    x = a.float()
    if granularity == "act_block":  # a block's amax does not depend on the orientation
        return quant_along_columns(a, granularity, sizes, spec)
    if granularity == "tile" and sum(1 for n in sizes if n) == 1:  # one segment (a plain linear): views
        M, C = x.shape
        xp, b = _fit(x, 0, spec.block)
        tiles = xp.view(-1, b, C)  # (M/b, b, C)
        s = scales_of(tiles.abs().amax(dim=1, keepdim=True), spec.pow2, _floor(spec))  # (M/b, 1, C)
        return Quantised(_to_grid(tiles / s, _real(spec)).view(-1, C)[:M], s, "token_tile", spec.block)
    if granularity == "tile":
        lengths = [min(spec.block, n - t) for n in sizes for t in range(0, n, spec.block)]
    elif granularity in ("row", "tensor"):
        lengths = [n for n in sizes if n]
    else:
        raise ValueError(f"fp8: weight-gradient granularity {granularity!r} is not tile, row or tensor")
    amax = _segment_amax(x, lengths)  # (G, C)
    if granularity == "tensor":
        amax = amax.amax(dim=1, keepdim=True)  # (G, 1)
    s = torch.repeat_interleave(scales_of(amax, spec.pow2, _floor(spec)), _lengths(lengths, a), dim=0)  # (M, C | 1)
    return Quantised(_to_grid(x / s, _real(spec)), s, granularity)


def _starts(sizes: list[int]) -> list[tuple[int, int, int]]:
    """(segment, start, rows) of the non-empty segments."""
    out, total = [], 0
    for e, n in enumerate(sizes):
        if n:
            out.append((e, total, n))
        total += n
    return out


def _segment_mm(qa: Quantised, qw: Quantised, sizes: list[int], spec: Fp8Spec, dtype: torch.dtype,
                shape: tuple[int, int]) -> torch.Tensor:
    """out[seg e] = a[seg e] · w[e]ᵀ with a (M, K) and w (E, N, K) quantised along K.

    Products of E4M3 values with their scales, summed in float32 and rounded once to `dtype`, as
    the FP8 tensor-core kernels (DeepGEMM, TE, _scaled_mm) do; the emulated backend therefore
    dequantises and multiplies in float32 whatever the model dtype (a bf16 dequantisation would
    round each q·scale to 8 bits before the GEMM)."""
    if spec.backend == "emulated":
        out = torch.empty(shape, dtype=torch.float32, device=qa.q.device)
        a, wd = qa.dequant(torch.float32), qw.dequant(torch.float32)
        for e, s, n in _starts(sizes):
            torch.mm(a[s:s + n], wd[e].t(), out=out[s:s + n])
        return out.to(dtype)
    out = torch.empty(shape, dtype=dtype, device=qa.q.device)
    rowwise = qa.granularity == "row"
    for e, s, n in _starts(sizes):  # torch._scaled_mm: a row-major, b column-major; (n, 1) and (1, N) or scalars
        sa = qa.scale[s:s + n] if rowwise else qa.scale[s].reshape(())
        sb = qw.scale[e].t() if rowwise else qw.scale[e].reshape(())
        b = qw.q[e].contiguous().t()  # (K, N) column-major
        out[s:s + n] = torch._scaled_mm(qa.q[s:s + n], b, scale_a=sa, scale_b=sb, out_dtype=dtype)
    return out


def _segment_wgrad(qdy: Quantised, qx: Quantised, sizes: list[int], spec: Fp8Spec, w: torch.Tensor) -> torch.Tensor:
    """dw[e] (N, K) = dy[seg e]ᵀ · x[seg e] in float32; both operands quantised along the segment's tokens.

    Accumulated and returned in float32 whatever w's dtype, as DeepSeek-V3 does for weight
    gradients (report Fig. 6). Autograd rounds it once to the parameter's dtype where it hands
    it to DeepSpeed's gradient hooks (which accumulate in float32 with BF16_Optimizer)."""
    dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    if spec.backend == "emulated":
        dyd, xd = qdy.dequant(torch.float32), qx.dequant(torch.float32)
        for e, s, n in _starts(sizes):
            torch.mm(dyd[s:s + n].t(), xd[s:s + n], out=dw[e])
        return dw
    rowwise = qdy.granularity == "row"
    for e, s, n in _starts(sizes):  # aᵀ (N, n) row-major with (N, 1); b (n, K) column-major with (1, K)
        sa = qdy.scale[s].reshape(-1, 1) if rowwise else qdy.scale[s].reshape(())
        sb = qx.scale[s].reshape(1, -1) if rowwise else qx.scale[s].reshape(())
        a = qdy.q[s:s + n].t().contiguous()
        b = qx.q[s:s + n].t().contiguous().t()
        dw[e] = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.float32)
    return dw


class _Fp8GroupedLinearFn(torch.autograd.Function):
    """x (M, K), w (E, N, K), sizes → (M, N); all three GEMMs on E4M3 operands, per segment."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, sizes: list[int], spec: Fp8Spec, qx: Quantised | None = None,
                defer=None, slot: int = 0):
        ctx.save_for_backward(x, w)
        ctx.sizes, ctx.spec, ctx.defer, ctx.slot = sizes, spec, defer, slot
        if defer is not None:  # w came detached: its gradient is queued in backward (model/wgrad.py)
            defer.expect()
        if x.size(0) == 0:  # an expert-parallel rank that received no rows
            ctx.qw = None
            return x.new_zeros(0, w.size(1))
        (gx, gw), (_, g_w), _ = RECIPES[spec.recipe]
        if gx == "e5m2_tile":  # the e5m2_forward control: fake-quantised operands, float32 GEMMs
            ctx.qw = None
            a, wd = _fake_e5m2(x, spec.block, (-1,)), _fake_e5m2(w, spec.block, (-2, -1))
            out = torch.empty(x.size(0), w.size(1), dtype=torch.float32, device=x.device)
            for e, s, n in _starts(sizes):
                torch.mm(a[s:s + n], wd[e].t(), out=out[s:s + n])
            return out.to(x.dtype)
        qw = quant_weights(w, gw, spec)
        # The data gradient reuses the weight's blocks / tensor scales, transposed (see above).
        ctx.qw = qw if g_w == gw and gw in ("block", "tensor") else None
        qa = qx if qx is not None else quant_along_columns(x, gx, sizes, spec)  # qx: FP8 dispatch (parallel/a2a.py)
        return _segment_mm(qa, qw, sizes, spec, x.dtype, (x.size(0), w.size(1)))

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, w = ctx.saved_tensors
        sizes, spec = ctx.sizes, ctx.spec
        _, (g_dy, g_w), (g_dyt, g_xt) = RECIPES[spec.recipe]
        g = GRAD_SCALES.get(spec.recipe, 1.0)
        dy = dy.contiguous() if g == 1.0 else dy * g

        def wgrad() -> torch.Tensor:  # dw[e] = dy[seg e]ᵀ · x[seg e], reduced over the segment's tokens
            if x.size(0) == 0:
                return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
            dw = _segment_wgrad(quant_along_rows(dy, g_dyt, sizes, spec), quant_along_rows(x, g_xt, sizes, spec),
                                sizes, spec, w)
            return dw if g == 1.0 else dw.div_(g)

        dx = dw = None
        if x.size(0) == 0:
            dx = torch.zeros_like(x)
        elif ctx.needs_input_grad[0]:  # dx[seg e] = dy[seg e] · w[e]: w[e]ᵀ (K, N) quantised along N
            qwt = ctx.qw.t() if ctx.qw is not None else quant_weights(w.transpose(1, 2), g_w, spec)
            dx = _segment_mm(quant_along_columns(dy, g_dy, sizes, spec), qwt, sizes, spec, x.dtype, tuple(x.shape))
            if g != 1.0:
                dx = dx.div_(g)
        if ctx.defer is not None:
            slot = ctx.slot
            ctx.defer.push(lambda: {slot: wgrad()})  # later, behind the reverse dispatch
        elif ctx.needs_input_grad[1] or x.size(0) == 0:
            dw = wgrad()
        ctx.qw = None
        return dx, dw, None, None, None, None, None


def grouped_fp8_linear(x: torch.Tensor, w: torch.Tensor, sizes: list[int], spec: Fp8Spec,
                       qx: Quantised | None = None, defer=None) -> torch.Tensor:
    """x (M, K) in segments of `sizes` rows, w (E, N, K) → (M, N): segment e times w[e]ᵀ.
    `qx`: x already quantised along K as the recipe's forward does it (FP8 dispatch). `defer`: a
    model/wgrad.py queue that takes w's gradient, computed when the queue's anchor runs."""
    if defer is None:
        return _Fp8GroupedLinearFn.apply(x, w, sizes, spec, qx)
    return _Fp8GroupedLinearFn.apply(x, w.detach(), sizes, spec, qx, defer, defer.slot(w))


def fp8_linear(x: torch.Tensor, w: torch.Tensor, spec: Fp8Spec) -> torch.Tensor:
    """x (..., K), w (N, K) → (..., N): one segment of the grouped linear."""
    x2 = x.reshape(-1, x.size(-1))
    y = _Fp8GroupedLinearFn.apply(x2, w.unsqueeze(0), [x2.size(0)], spec)
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
