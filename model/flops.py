"""Parameter counts and training FLOPs per token, from the config alone.

Counts are analytic (no module is built) and a unit test checks them against the built
model. "Activated" counts what one token touches: all dense weights, the shared experts,
the router and n_activated_experts routed experts per MoE layer, but not the embedding table (a
lookup, no matmul). With that convention 671b gives 671.0B / 36.6B and 236b 235.7B / 20.9B,
within 1% of DeepSeek's published 671B / 37B and 236B / 21B; counting the embedding as
activated would put both over 1% high. MTP modules are excluded unless asked for (the
released V3 checkpoint's 685B = 671B + 14B of MTP).
"""

from __future__ import annotations

from typing import NamedTuple

from .config import ModelConfig


class ParamCounts(NamedTuple):
    total: int
    activated: int


def _attention_params(cfg: ModelConfig) -> int:
    D, H = cfg.dim, cfg.n_heads
    qk, kv, R = cfg.qk_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    q = D * H * qk if cfg.q_lora_rank == 0 else D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    return q + D * (kv + R) + kv + kv * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D


def block_params(cfg: ModelConfig, layer_id: int) -> ParamCounts:
    """Total and activated parameters of transformer block `layer_id` (ids past n_layers: MTP blocks)."""
    D = cfg.dim
    common = _attention_params(cfg) + 2 * D  # + attn_norm, ffn_norm
    if not cfg.is_moe_layer(layer_id):
        dense = 3 * D * cfg.inter_dim
        return ParamCounts(common + dense, common + dense)
    expert = 3 * D * cfg.moe_inter_dim
    always = cfg.n_routed_experts * D + cfg.n_shared_experts * expert  # router + shared experts
    return ParamCounts(common + always + cfg.n_routed_experts * expert,
                       common + always + cfg.n_activated_experts * expert)


def param_counts(cfg: ModelConfig, include_mtp: bool = False) -> ParamCounts:
    """Total and activated parameters; MTP modules (which share embedding and head) on request."""
    D, V = cfg.dim, cfg.vocab_size
    total = 2 * V * D + D  # embedding, head, final norm
    activated = V * D + D
    layer_ids = list(range(cfg.n_layers))
    if include_mtp:
        layer_ids += [cfg.n_layers + k for k in range(cfg.n_mtp_layers)]
        extra = cfg.n_mtp_layers * (2 * D + 2 * D * D + D)  # enorm, hnorm, eh_proj, norm
        total += extra
        activated += extra
    for i in layer_ids:
        t, a = block_params(cfg, i)
        total += t
        activated += a
    return ParamCounts(total, activated)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Forward+backward FLOPs of the score and value matmuls of one layer, per token.

    Forward is 2·T·(qk_head_dim + v_head_dim) per head (PaLM appendix B counts 2·2·T·head_dim);
    backward twice that. Causal masking halves the useful work.
    """
    flops = 3 * 2 * seq_len * cfg.n_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return flops / 2 if causal else flops


def flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True, causal: bool = True) -> float:
    """Training FLOPs per token: 6 × activated matmul parameters + attention (for MFU)."""
    matmul_params = param_counts(cfg, include_mtp=include_mtp).activated
    n_mtp = cfg.n_mtp_layers if include_mtp else 0
    matmul_params += n_mtp * cfg.vocab_size * cfg.dim  # each MTP depth runs the shared head again
    return 6 * matmul_params + (cfg.n_layers + n_mtp) * attention_flops_per_token(cfg, seq_len, causal)
