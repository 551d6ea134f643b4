"""DeepSeekMoE: shared experts plus fine-grained routed experts (DeepSeek-V3 report §2.1.2).

forward() is four steps, as Megatron-Core splits them:
  1. Gate: scores (sigmoid or softmax, float32), group-limited top-k selection on scores plus
     the aux-loss-free expert bias, gate weights from the unbiased scores.
  2. Dispatch: token copies are permuted so each expert's tokens are contiguous. The local
     dispatcher here never communicates; parallel/ swaps in the all-to-all one for expert
     parallelism (the only MoE code that does).
  3. Experts: SwiGLU over contiguous segments, grouped GEMM where the device supports it.
  4. Combine: un-permute and sum the copies weighted by the gate; add the shared experts.

Load balancing is DeepSeek-V3's: the bias `e_score_correction_bias` is used for selection only
and moved by `update_expert_bias` once per optimizer step (b_i -= γ·sign(load_i − mean load));
a small sequence-wise balance loss reaches the router as an injected gradient so the module's
output value is unchanged (pipeline stages need not carry it).

Shapes: N tokens, D dim, E routed experts, F expert hidden, K activated experts, G groups.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .fp8.gemm import Fp8Spec
from .fp8.grouped import grouped_fp8_swiglu
from .linear import current_precision
from .mlp import MLP
from .wgrad import DeferredWgrad


class Gate(nn.Module):
    """Router: returns gate weights (N, K), expert ids (N, K) and all scores (N, E), float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.n_groups = cfg.n_expert_groups
        self.topk_groups = cfg.n_limited_groups
        self.score_func = cfg.score_func
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        # Selection-only bias of the aux-loss-free balancing; float32 whatever the model dtype.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # model.to(bf16) must not round the bias: it moves by γ=1e-3 steps.
        super()._apply(fn, recurse)
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        N = x.size(0)
        dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32, as DeepSeek routes
        logits = F.linear(x.to(dtype), self.weight.to(dtype))  # (N, E)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        biased = scores.detach() + self.e_score_correction_bias
        if self.n_groups > 1:
            grouped = biased.view(N, self.n_groups, -1)  # (N, G, E/G)
            # DeepSeek's reference (inference/model.py Gate): a group scores its best expert in V2
            # (softmax, no selection bias) and the sum of its top-2 biased experts in V3 (sigmoid
            # with the correction bias). The rule follows score_func, as the released configs pair them.
            if self.score_func == "softmax":
                group_scores = grouped.amax(dim=-1)  # (N, G)
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # (N, G)
            kept = group_scores.topk(self.topk_groups, dim=-1).indices
            dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
            # -inf, not 0 as transformers fills: a biased score can be negative.
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).flatten(1)
        indices = biased.topk(self.topk, dim=-1).indices  # (N, K)
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices, scores


@functools.cache
def grouped_mm_supported(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._grouped_mm runs forward and backward here (CPU torch 2.13 has no backward)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        x = torch.randn(32, 16, device=device_type, dtype=dtype, requires_grad=True)
        w = torch.randn(2, 16, 16, device=device_type, dtype=dtype, requires_grad=True)
        offs = torch.tensor([16, 32], device=device_type, dtype=torch.int32)
        torch._grouped_mm(x, w.transpose(-2, -1), offs=offs).sum().backward()
        return True
    except (RuntimeError, NotImplementedError):
        return False


class _SegmentedSwiGLU(torch.autograd.Function):
    """SwiGLU experts over contiguous token segments, one GEMM per expert and weight.

    The fallback where torch._grouped_mm has no backward (CPU torch 2.13): a hand-written
    backward keeps autograd to one node instead of ~10 per expert, and the elementwise parts
    run once over all segments.
    """

    @staticmethod
    def forward(ctx, x, w1, w2, w3, sizes: list[int], defer: DeferredWgrad | None = None, slots=()):
        M, F_ = x.size(0), w1.size(1)
        h1, h3 = x.new_empty(M, F_), x.new_empty(M, F_)
        segments = [(e, s, s + n) for e, (s, n) in enumerate(zip(_starts(sizes), sizes)) if n]
        for e, a, b in segments:
            torch.mm(x[a:b], w1[e].t(), out=h1[a:b])
            torch.mm(x[a:b], w3[e].t(), out=h3[a:b])
        act = F.silu(h1) * h3
        out = x.new_empty(M, w2.size(1))
        for e, a, b in segments:
            torch.mm(act[a:b], w2[e].t(), out=out[a:b])
        ctx.save_for_backward(x, w1, w2, w3, h1, h3, act)
        ctx.segments, ctx.defer, ctx.slots = segments, defer, slots
        if defer is not None:
            defer.expect()
        return out

    @staticmethod
    def backward(ctx, dout):
        x, w1, w2, w3, h1, h3, act = ctx.saved_tensors
        dout = dout.contiguous()
        dact = torch.empty_like(act)
        segments = ctx.segments
        for e, a, b in segments:
            torch.mm(dout[a:b], w2[e], out=dact[a:b])
        sig = torch.sigmoid(h1)
        dh3 = dact * (h1 * sig)
        dh1 = dact * h3 * sig * (1 + h1 * (1 - sig))
        dx = torch.empty_like(x)
        for e, a, b in segments:
            torch.mm(dh1[a:b], w1[e], out=dx[a:b])
            dx[a:b].addmm_(dh3[a:b], w3[e])

        def wgrad():
            dw1, dw2, dw3 = torch.zeros_like(w1), torch.zeros_like(w2), torch.zeros_like(w3)
            for e, a, b in segments:
                torch.mm(dout[a:b].t(), act[a:b], out=dw2[e])
                torch.mm(dh1[a:b].t(), x[a:b], out=dw1[e])
                torch.mm(dh3[a:b].t(), x[a:b], out=dw3[e])
            return dw1, dw2, dw3

        if ctx.defer is None:
            return dx, *wgrad(), None, None, None
        ctx.defer.push(lambda: dict(zip(ctx.slots, wgrad())))  # dW later, behind the reverse dispatch
        return dx, None, None, None, None, None, None


def _starts(sizes: list[int]) -> list[int]:
    starts, total = [], 0
    for n in sizes:
        starts.append(total)
        total += n
    return starts


class Experts(nn.Module):
    """E SwiGLU experts with weights stacked per expert, computed over contiguous token segments.

    w1, w3: (E, F, D); w2: (E, D, F) — DeepSeek's per-expert w1/w2/w3, stacked.
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, expert_offset: int = 0):
        super().__init__()
        self.n_experts = n_experts
        self.expert_offset = expert_offset  # global id of expert 0 here (expert parallelism shards them)
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        # FP8 as the Linear factory would build it (linear name "experts"): emulated / torch run
        # the grouped FP8 GEMMs of model/fp8/grouped.py, te runs te.GroupedLinear (model/fp8/te.py).
        p = current_precision()
        on = p.backend in ("emulated", "torch", "te") and not p.excludes("experts")
        self.fp8 = Fp8Spec(p.backend, p.recipe, p.block, p.pow2) if on and p.backend != "te" else None
        self.te = None
        if on and p.backend == "te":
            from .fp8 import te

            self.te = te.GroupedExperts(n_experts, dim, inter_dim, p.recipe)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, qx=None,
                defer: DeferredWgrad | None = None) -> torch.Tensor:
        """x (M, D) sorted by expert, counts (E,) tokens per expert → (M, D). `qx`: x already
        quantised for the first GEMMs (FP8 dispatch, parallel/a2a.py), used as it is. `defer`:
        the weight gradients go to that queue (model/wgrad.py) where `defers_wgrad(x)`."""
        if self.fp8 is not None or self.te is not None:
            return self._fp8_forward(x, counts, qx, defer)
        if grouped_mm_supported(x.device.type, x.dtype) and x.size(0) > 0:
            offs = counts.cumsum(0).to(torch.int32)
            h = F.silu(torch._grouped_mm(x, self.w1.transpose(-2, -1), offs=offs))
            h = h * torch._grouped_mm(x, self.w3.transpose(-2, -1), offs=offs)
            return torch._grouped_mm(h, self.w2.transpose(-2, -1), offs=offs)
        ws = (self.w1, self.w2, self.w3)
        if defer is None:
            return _SegmentedSwiGLU.apply(x.contiguous(), *ws, counts.tolist())
        slots = tuple(defer.slot(w) for w in ws)
        return _SegmentedSwiGLU.apply(x.contiguous(), *(w.detach() for w in ws), counts.tolist(), defer, slots)

    def defers_wgrad(self, x: torch.Tensor) -> bool:
        """Whether forward(x, defer=…) queues its weight gradients: the segmented and the grouped
        FP8 paths do; torch's grouped GEMM (autograd's own backward) and TE's GroupedLinear (its
        `delay_wgrad_compute` is not wired) compute them at once."""
        if self.te is not None:
            return False
        return self.fp8 is not None or not grouped_mm_supported(x.device.type, x.dtype)

    def _fp8_forward(self, x: torch.Tensor, counts: torch.Tensor, qx=None, defer=None) -> torch.Tensor:
        """FP8 experts: one grouped FP8 GEMM per projection over all experts (model/fp8/grouped.py),
        equal to running the single FP8 linear expert by expert."""
        if self.te is not None:
            return self.te(x, counts.tolist(), self.w1, self.w2, self.w3)
        args = (x.contiguous(), self.w1, self.w2, self.w3, counts.tolist(), self.fp8)
        return grouped_fp8_swiglu(*args, qx, defer)


class LocalDispatcher:
    """Single-device dispatch: sort token copies by expert, run experts, un-sort, combine."""

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 experts: Experts, shared: nn.Module | None = None) -> torch.Tensor:
        N, K = indices.shape
        flat = indices.flatten()  # (N*K,) expert id of each token copy
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=experts.n_experts)
        out = experts(x[order // K], counts)  # (N*K, D) in expert order
        out = torch.zeros_like(out).index_copy(0, order, out)  # back to (token, k) order
        y = (out.view(N, K, -1) * weights.unsqueeze(-1).to(out.dtype)).sum(dim=1)
        return y if shared is None else y + shared(x)


class _InjectGrad(torch.autograd.Function):
    """Identity on `out`; in backward, also hands d(aux)=scale to the balance loss's graph."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, aux: torch.Tensor, scale: float):
        ctx.scale, ctx.aux_dtype = scale, aux.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        return grad_out, torch.full((), ctx.scale, dtype=ctx.aux_dtype, device=grad_out.device), None


class MoE(nn.Module):
    """Shared + routed experts. Input and output (B, T, D)."""

    def __init__(self, cfg: ModelConfig, balance_alpha: float = 1e-4):
        super().__init__()
        self.dim = cfg.dim
        self.n_routed_experts = cfg.n_routed_experts
        self.topk = cfg.n_activated_experts
        self.score_func = cfg.score_func
        self.gate = Gate(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim)
        self.shared_experts = MLP(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim) if cfg.n_shared_experts else None
        self.dispatcher = LocalDispatcher()
        self.balance_alpha = balance_alpha
        # Gradient scale of the balance loss: the trainer sets 1/grad_accum so it matches the main loss.
        self.balance_grad_scale = 1.0
        # Sum of this layer's balance losses since the trainer last read it (logging only).
        self.balance_loss_sum: torch.Tensor | None = None
        # Count routed tokens in forwards that run with autograd on. Activation checkpointing
        # runs a block twice (no-grad, then recompute): parallel/ sets False there so each
        # micro-batch is counted once, in the first pass.
        self.count_when_grad = True
        # Token copies per expert since the last bias update; summed over micro-batches.
        self.register_buffer("tokens_per_expert", torch.zeros(cfg.n_routed_experts, dtype=torch.float32),
                             persistent=False)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.tokens_per_expert = self.tokens_per_expert.float()  # counts exceed bf16's exact range
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x_flat = x.reshape(B * T, D)
        weights, indices, scores = self.gate(x_flat)
        if self.training and (self.count_when_grad or not torch.is_grad_enabled()):
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(indices.flatten(), minlength=self.n_routed_experts)
        # Routed plus shared experts: the all-to-all dispatcher may compute the shared ones while
        # its exchange is in flight (parallel/expert.py).
        y = self.dispatcher(x_flat, indices, weights, self.experts, self.shared_experts)
        y = y.view(B, T, D)
        if self.training and self.balance_alpha > 0 and torch.is_grad_enabled():
            aux = self.sequence_balance_loss(scores, indices, B, T)
            prev = self.balance_loss_sum
            self.balance_loss_sum = aux.detach() if prev is None else prev + aux.detach()
            y = _InjectGrad.apply(y, aux, self.balance_grad_scale)
        return y

    def sequence_balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, B: int, T: int) -> torch.Tensor:
        """α Σ_i f_i P_i per sequence, averaged over the batch (DeepSeek-V3 report eqs. 17–20)."""
        E, K = self.n_routed_experts, self.topk
        if self.score_func == "sigmoid":
            scores = scores / scores.sum(dim=-1, keepdim=True)
        p = scores.view(B, T, E).mean(dim=1)  # (B, E)
        hits = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.view(B, T * K), torch.ones(B, T * K, device=scores.device))
        f = hits * (E / (K * T))  # (B, E)
        return self.balance_alpha * (f * p).sum(dim=-1).mean()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, gamma: float, reduce_counts=None) -> torch.Tensor:
    """Aux-loss-free balancing step: b_i -= γ·sign(load_i − mean load) in every MoE layer.

    Call once per optimizer step. `reduce_counts(tensor)` sums the accumulated counts in place
    over the ranks that route different tokens (data and expert parallel), so every replica
    applies the same update. Returns the step's (global) load, (n_moe_layers, E), and resets it.
    """
    layers = moe_layers(model)
    if not layers:
        return torch.zeros(0, 0)
    counts = torch.stack([m.tokens_per_expert for m in layers])  # (L, E)
    if reduce_counts is not None:
        reduce_counts(counts)
    mean = counts.mean(dim=-1, keepdim=True)
    for m, load, mu in zip(layers, counts, mean):
        if gamma:
            m.gate.e_score_correction_bias -= gamma * torch.sign(load - mu)
        m.tokens_per_expert.zero_()
    return counts


def load_stats(counts: torch.Tensor) -> dict[str, float]:
    """Mean over layers of max/mean load and of the coefficient of variation, from (L, E) counts."""
    if counts.numel() == 0:
        return {}
    mean = counts.mean(dim=-1).clamp(min=1e-9)
    return {
        "expert_load_max_over_mean": (counts.max(dim=-1).values / mean).mean().item(),
        "expert_load_cv": (counts.std(dim=-1, correction=0) / mean).mean().item(),
    }
