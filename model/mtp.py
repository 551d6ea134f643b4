"""Multi-token prediction module (DeepSeek-V3 report §2.2).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token
t_{i+k}: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), runs one transformer block,
and predicts t_{i+k+1} through its own final norm and the main model's shared output head.
The concatenation order (embedding first) and the names enorm / hnorm / eh_proj follow the
released DeepSeek-V3 checkpoint (layer 61), whose order differs from the paper's equation 21.
h^{k-1} is the normed state that feeds the previous head (Transformer.losses), as vLLM and
transformers run that layer.
"""

import torch
from torch import nn

from .block import Block
from .config import ModelConfig
from .linear import linear
from .norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, depth: int, cfg: ModelConfig):
        super().__init__()
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.eh_proj = linear(2 * cfg.dim, cfg.dim, "mtp.eh_proj")
        self.block = Block(cfg.n_layers + depth, cfg)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h, emb (B, T', D) → the new hidden state (B, T', D), before this depth's final norm."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, cos, sin, attn_mask)
