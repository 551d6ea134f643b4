"""Multi-head latent attention (DeepSeek-V2 report §2.1).

Queries go through an optional low-rank bottleneck (wq_a → q_norm → wq_b); keys and values
are compressed into one kv_lora_rank latent (wkv_a → kv_norm → wkv_b) plus a rotary key
of qk_rope_head_dim shared by all heads. Training computes the "naive" form (latents
expanded to per-head keys/values) and hands it to scaled_dot_product_attention; the
weight-absorbed form only pays off for decoding with a latent cache.

Shapes: B batch, T tokens, H heads, C nope head dim, R rope head dim, V value head dim.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .attention import flex_attention, is_block_mask
from .config import ModelConfig
from .linear import linear
from .norm import RMSNorm
from .rope import apply_rope, yarn_mscale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.qk_nope_head_dim = cfg.qk_nope_head_dim
        self.qk_rope_head_dim = cfg.qk_rope_head_dim
        self.v_head_dim = cfg.v_head_dim
        qk_head_dim = cfg.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = linear(cfg.dim, cfg.n_heads * qk_head_dim, "attn.wq")
        else:
            self.wq_a = linear(cfg.dim, cfg.q_lora_rank, "attn.wq_a")
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = linear(cfg.q_lora_rank, cfg.n_heads * qk_head_dim, "attn.wq_b")
        self.wkv_a = linear(cfg.dim, cfg.kv_lora_rank + cfg.qk_rope_head_dim, "attn.wkv_a")
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = linear(cfg.kv_lora_rank, cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), "attn.wkv_b")
        self.wo = linear(cfg.n_heads * cfg.v_head_dim, cfg.dim, "attn.wo")
        self.softmax_scale = qk_head_dim**-0.5 * yarn_mscale(cfg) ** 2

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) → (B, T, D). Causal; attn_mask overrides it: a (B, 1, T, T) bool (True =
        attend) for SDPA, or a flex-attention BlockMask (model/attention.py document masks)."""
        B, T, _ = x.shape
        H, C, R, V = self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, H, C + R)
        q_nope, q_pe = q.split([C, R], dim=-1)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, R], dim=-1)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin)  # (B, T, 1, R)
        q = torch.cat([q_nope, apply_rope(q_pe, cos, sin)], dim=-1)  # (B, T, H, C+R)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, H, C + V)
        k_nope, v = kv.split([C, V], dim=-1)
        k = torch.cat([k_nope, k_pe.expand(B, T, H, R)], dim=-1)  # (B, T, H, C+R)
        if V < C + R:
            # Fused (flash) SDPA kernels want equal q/k/v head dims; zero-padding v costs
            # a little extra AV work and selects them (CPU: ~1.7x faster attention backward).
            v = F.pad(v, (0, C + R - V))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, ·)
        if is_block_mask(attn_mask):
            o = flex_attention(q, k, v, attn_mask, self.softmax_scale)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=attn_mask is None,
                                               scale=self.softmax_scale)
        return self.wo(o.transpose(1, 2)[..., :V].reshape(B, T, H * V))
