"""The DeepSeek-V3-family transformer, single-device plain PyTorch.

Layers live in a ModuleDict keyed by str(layer index) and forward is a loop over it, so a
pipeline split (parallel/) and checkpoint names stay stable, as in torchtitan. No process
group or collective appears in model/: parallel/ transforms a built model from outside.

Shapes: B batch, T tokens, D dim, V vocab.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .attention import BACKENDS, document_mask
from .block import Block
from .config import ModelConfig
from .init import init_weights_
from .mtp import MTPModule, cross_entropy, mtp_losses
from .norm import RMSNorm
from .rope import rope_tables


class Losses(NamedTuple):
    main: torch.Tensor  # next-token cross-entropy
    mtp: torch.Tensor  # mean over MTP depths of their cross-entropies (0 without MTP)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(i, cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleDict({str(k): MTPModule(k, cfg) for k in range(cfg.n_mtp_layers)})
        cos, sin = rope_tables(cfg, cfg.max_seq_len, device=self.embed.weight.device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.attention = "sdpa"  # document-mask backend (model/attention.py); set_attention changes it
        if self.embed.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """Normal(0, init_std) matrices, unit norms (model/init.py: one generator per tensor).

        `seed` None draws the base seed from torch's global generator (so torch.manual_seed
        still decides it); the trainer passes trainer.seed so every layout gets equal weights.
        """
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        init_weights_(self, self.cfg.init_std, seed)
        cos, sin = rope_tables(self.cfg, self.cfg.max_seq_len, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)

    def set_attention(self, backend: str) -> None:
        """The backend of document masks: "sdpa" (dense mask, every device) or "flex" (CUDA)."""
        if backend not in BACKENDS:
            raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.attention = backend

    def _rope(self, T: int, position_ids: torch.Tensor | None):
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if position_ids is None:
            return self.rope_cos[:T], self.rope_sin[:T]
        return self.rope_cos[position_ids], self.rope_sin[position_ids]

    def hidden(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → last hidden state (B, T, D) before the final norm.

        position_ids (B, T) are per-document positions: a 0 starts a document, and attention
        stays inside documents (model/attention.py) unless attn_mask says otherwise.
        """
        cos, sin = self._rope(tokens.size(1), position_ids)
        if attn_mask is None:
            attn_mask = document_mask(position_ids, self.attention)
        h = self.embed(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin, attn_mask)
        return h

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, T) → logits (B, T, V) of the main head."""
        return self.head(self.norm(self.hidden(tokens, position_ids, attn_mask)))

    def losses(self, input_ids: torch.Tensor, labels: torch.Tensor,
               position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None) -> Losses:
        """Main and MTP cross-entropies; labels (B, T) are input_ids shifted by one (IGNORE_INDEX = skip).

        The MTP depths (model/mtp.py `mtp_losses`) start from the main model's final-norm output
        and embed the next tokens with this model's embedding, one depth at a time. The trainer
        weights mtp by λ.
        """
        h = self.norm(self.hidden(input_ids, position_ids, attn_mask))
        main = cross_entropy(self.head(h), labels)
        if not self.mtp:
            return Losses(main, main.new_zeros(()))
        mtp = mtp_losses(self.mtp.values(), self.head, h, labels, self.embed, self.rope_cos, self.rope_sin,
                         position_ids, attn_mask, self.attention)
        return Losses(main, mtp)
