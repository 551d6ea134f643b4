"""Document masks: attention that stays inside each document of a packed sequence.

Pretraining packs documents end to end into fixed-length rows. With `data.document_aware`
the loader restarts `position_ids` at 0 at every document start inside a row (and at the row
start); this module turns those positions into the mask that keeps attention inside each
document: query i may attend to key j iff j ≤ i and both lie in the same document. A
document's segment then computes exactly what the same tokens would compute alone, so the
logits of a packed row equal, position by position, those of each document run alone.

The contract is that position ids *are* the document structure: a 0 after position 0 starts
a new document, so the mask needs nothing else from the batch and can be rebuilt on every
pipeline stage from the position ids that already travel between stages (no (T × T) mask
ever crosses a pipeline link). Without position ids attention is plain causal.

Two backends, chosen per model (`attention=`; the trainer's `trainer.attention`):

- `sdpa` (default; every device): a dense boolean (B, 1, T, T) mask handed to
  `scaled_dot_product_attention`. On CPU this is the math/flash-CPU path; on CUDA it selects
  the memory-efficient kernel (flash attention takes no mask). The mask costs T² bytes per
  row and attention still computes the masked-out blocks.
- `flex` (CUDA): `torch.nn.attention.flex_attention` with a `BlockMask` built from the same
  rule, compiled once; blocks that lie wholly outside every document are skipped, so packed
  short documents cost less than causal attention. Torch's flex attention has no CPU
  backward, so CPU runs use `sdpa`; the CPU tests check flex's forward against sdpa's.

Prior art, and why this design. torchtitan builds a flex `BlockMask` from EOS positions in
the input tokens (document_causal_mask); Megatron-Core passes `cu_seqlens` in
PackedSeqParams to Transformer Engine's THD (variable-length) attention; Hugging Face's
flash-attention path detects packed sequences from position ids that restart at 0. We take
Hugging Face's signal (position ids), because it already exists in every layout of ours
including pipelines and is exact where an EOS-based rule is not (a row that starts inside a
document, a document containing the EOS id as text), and torchtitan's flex backend for CUDA.
moeforge's MLA runs its attention through torch (Transformer Engine accelerates the GEMMs
only), so TE's variable-length attention is not used; flex attention plays its role.
"""

from __future__ import annotations

import torch

BACKENDS = ("sdpa", "flex")


def document_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids → (B, T) document numbers, 1-based per row: a new one at each 0."""
    return torch.cumsum(position_ids == 0, dim=1)


def dense_document_mask(position_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position ids → (B, 1, T, T) bool, True where query i may attend to key j."""
    doc = document_ids(position_ids)
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril_()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def flex_document_mask(position_ids: torch.Tensor):
    """The same rule as a flex-attention BlockMask (blocks outside every document are skipped)."""
    from torch.nn.attention.flex_attention import create_block_mask

    doc = document_ids(position_ids)
    B, T = doc.shape

    def same_document_causal(b, h, q, k):
        return (k <= q) & (doc[b, q] == doc[b, k])

    return create_block_mask(same_document_causal, B, None, T, T, device=doc.device)


def document_mask(position_ids: torch.Tensor | None, backend: str = "sdpa"):
    """The mask for `backend` (None without position ids: plain causal attention)."""
    if position_ids is None:
        return None
    if backend == "flex":
        return flex_document_mask(position_ids)
    if backend != "sdpa":
        raise ValueError(f"attention backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return dense_document_mask(position_ids)


def is_block_mask(mask) -> bool:
    return mask is not None and type(mask).__name__ == "BlockMask"


_compiled_flex = None


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """flex_attention over (B, H, T, ·); compiled on CUDA (eager flex materialises the scores)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention as flex

    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale)
    return flex(q, k, v, block_mask=block_mask, scale=scale)
