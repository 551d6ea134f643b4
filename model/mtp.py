"""Multi-token prediction module (DeepSeek-V3 report §2.2).

Depth k combines the previous depth's hidden state h^{k-1}_i with the embedding of token
t_{i+k}: h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h^{k-1}_i)]), runs one transformer block,
and predicts t_{i+k+1} through its own final norm and the main model's shared output head.
The concatenation order (embedding first) and the names enorm / hnorm / eh_proj follow the
released DeepSeek-V3 checkpoint (layer 61), whose order differs from the paper's equation 21.
h^{k-1} is the normed state that feeds the previous head, as vLLM and transformers run that
layer.

`mtp_losses` runs the depths after the main head; the single-process model
(Transformer.losses) and the pipeline's last stage (parallel/pipeline.py OutputPipe) both call
it, each with its own embedding of the next tokens and its own RoPE tables.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import document_ids, document_mask
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


IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits (B, T, V), labels (B, T) → mean float32 cross-entropy over labels != IGNORE_INDEX."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)


def mtp_losses(modules: Iterable[MTPModule], head: nn.Module, h: torch.Tensor, labels: torch.Tensor,
               next_emb: torch.Tensor | Callable[[torch.Tensor], torch.Tensor],
               cos: torch.Tensor, sin: torch.Tensor, position_ids: torch.Tensor | None = None,
               attn_mask: torch.Tensor | None = None, attention: str = "sdpa") -> torch.Tensor:
    """Mean over the MTP depths (at least one) of their cross-entropies.

    h (B, T, D): the main model's final-norm output; labels (B, T): the main targets
    (IGNORE_INDEX = skip). Depth k (1-based) sees h^{k-1} and the embedding of
    t_{i+k} = labels[:, i+k-1] at positions i < n = T-k, and predicts labels[:, i+k].
    `next_emb` is either the embedding of labels.clamp(min=0), (B, T, D), sliced per depth, or
    the embedding function, applied per depth to that depth's clamped label ids (ignored
    positions still need an embedding input). cos, sin: RoPE tables indexed by position (at
    least T rows), read at position_ids (B, T) when given, else at 0..n-1.

    Position ids are per-document positions (model/attention.py): with them, depth k attends
    inside documents (a mask of `attention`'s backend over its first n positions) and position
    i's target labels[:, i+k] counts only when it lies in i's document, so a packed row's MTP
    loss sums exactly the terms of its documents run alone. An explicit attn_mask (B, 1, T, T)
    is sliced to each depth instead.
    """
    T = h.size(1)
    next_tokens = labels.clamp(min=0) if callable(next_emb) else None
    losses = []
    for k, module in enumerate(modules, start=1):
        n = T - k
        if position_ids is None:
            c, s = cos[:n], sin[:n]
        else:
            c, s = cos[position_ids[:, :n]], sin[position_ids[:, :n]]
        if next_tokens is None:
            emb = next_emb[:, k - 1:k - 1 + n]
        else:
            emb = next_emb(next_tokens[:, k - 1:k - 1 + n])
        target = labels[:, k:]
        if attn_mask is not None:
            mask = attn_mask[..., :n, :n]
        else:
            mask = document_mask(None if position_ids is None else position_ids[:, :n], attention)
        if position_ids is not None:  # a target in the next document is not this one's to predict
            doc = document_ids(position_ids)
            target = target.masked_fill(doc[:, k:] != doc[:, :n], IGNORE_INDEX)
        h = module.norm(module(h[:, :n], emb, c, s, mask))
        losses.append(cross_entropy(head(h), target))
    return torch.stack(losses).mean()
