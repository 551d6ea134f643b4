"""Document-aware attention (model/attention.py): a packed row computes what its documents compute alone.

Rows are packed the way data/loader.py packs them in document-aware mode: position ids restart
at 0 at each document start (and at the row start), and the label of a document's last token
(the next document's first) is IGNORE_INDEX.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from model import ModelConfig, Transformer
from model.attention import dense_document_mask, document_ids, document_mask
from model.mtp import IGNORE_INDEX
from parallel.pipeline import BlockPipe, OutputPipe, SharedEmbedding, embed_inputs, embed_next_tokens

SEED = 3


def cfg(n_mtp: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3, n_dense_layers=1, n_heads=2,
                       n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                       n_limited_groups=2, score_func="sigmoid", route_scale=2.5, q_lora_rank=16, kv_lora_rank=16,
                       qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_mtp_layers=n_mtp, max_seq_len=64,
                       original_seq_len=64, init_std=0.2).validate()


def packed_rows(lengths: list[list[int]], vocab: int = 64, seed: int = 0):
    """Rows of documents of the given lengths: (input_ids, labels, position_ids, segments per row).

    The last segment of a row continues into the row's last label (a document that goes on past
    the row, as in the loader); every other segment's last label is IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths[0])
    ids, labels, pos, segments = [], [], [], []
    for row in lengths:
        assert sum(row) == T
        tokens = torch.randint(0, vocab, (T + 1,), generator=g)
        lab = tokens[1:].clone()
        p = torch.cat([torch.arange(n) for n in row])
        bounds = np.cumsum([0, *row])
        for end in bounds[1:-1]:
            lab[end - 1] = IGNORE_INDEX
        ids.append(tokens[:T]), labels.append(lab), pos.append(p)
        segments.append(list(zip(bounds[:-1], bounds[1:])))
    return torch.stack(ids), torch.stack(labels), torch.stack(pos), segments


LENGTHS = [[5, 1, 9, 3, 14], [2, 17, 6, 7]]  # a one-token document, and rows cut differently


def model(n_mtp: int = 2) -> Transformer:
    torch.manual_seed(0)
    m = Transformer(cfg(n_mtp)).double()
    m.init_weights(seed=SEED)
    return m.double().eval()


def test_mask_is_block_diagonal_causal():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    assert document_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3]]
    want = torch.tensor([[1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0, 0],
                         [1, 1, 1, 0, 0, 0],
                         [0, 0, 0, 1, 0, 0],
                         [0, 0, 0, 1, 1, 0],
                         [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(dense_document_mask(pos)[0, 0], want)
    assert document_mask(None) is None
    with pytest.raises(ValueError, match="attention backend 'bogus'"):
        document_mask(pos, "bogus")


def test_packed_logits_equal_each_document_alone():
    m = model()
    ids, _, pos, segments = packed_rows(LENGTHS)
    with torch.no_grad():
        packed = m(ids, pos)
        causal = m(ids)  # the same row without document boundaries: attention crosses them
    crossed = 0
    for b, row in enumerate(segments):
        for lo, hi in row:
            with torch.no_grad():
                alone = m(ids[b:b + 1, lo:hi])[0]
            torch.testing.assert_close(packed[b, lo:hi], alone, rtol=0, atol=1e-10)
            crossed += int(not torch.allclose(causal[b, lo:hi], alone, rtol=0, atol=1e-6))
    assert crossed >= 6  # without the mask every document after a row's first differs


def _token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy and the number of counted labels."""
    lab = labels.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).double(), lab, ignore_index=IGNORE_INDEX,
                           reduction="sum")
    return loss, int((lab != IGNORE_INDEX).sum())


def _mtp_sum(m: Transformer, ids, labels, pos=None) -> tuple[float, int]:
    """The MTP loss times its label count, with one depth: a sum over positions, comparable across splits."""
    loss = m.losses(ids, labels, pos).mtp
    # depth 1 predicts labels[:, i+1] from position i; with position ids only same-document targets count
    target = labels[:, 1:].clone()
    if pos is not None:
        doc = document_ids(pos)
        target[doc[:, 1:] != doc[:, :-1]] = IGNORE_INDEX
    n = int((target != IGNORE_INDEX).sum())
    return float(loss) * n, n


def test_packed_losses_equal_the_documents_alone_main_and_mtp():
    m = model(n_mtp=1)
    ids, labels, pos, segments = packed_rows(LENGTHS, seed=1)
    with torch.no_grad():
        main, main_n = _token_losses(m(ids, pos), labels)
        mtp, mtp_n = _mtp_sum(m, ids, labels, pos)
        alone_main, alone_mtp, n_main, n_mtp = 0.0, 0.0, 0, 0
        for b, row in enumerate(segments):
            for lo, hi in row:
                s, n = _token_losses(m(ids[b:b + 1, lo:hi]), labels[b:b + 1, lo:hi])
                alone_main, n_main = alone_main + float(s), n_main + n
                if hi - lo > 2:
                    s, n = _mtp_sum(m, ids[b:b + 1, lo:hi], labels[b:b + 1, lo:hi])
                    alone_mtp, n_mtp = alone_mtp + s, n_mtp + n
        # the packed loss through the model's own path equals the sum over the documents
        total = m.losses(ids, labels, pos)
    assert (main_n, mtp_n) == (n_main, n_mtp) and mtp_n > 20
    assert float(total.main) * main_n == pytest.approx(alone_main, rel=1e-6)  # the model's CE is float32
    assert float(main) == pytest.approx(alone_main, rel=1e-12)
    assert mtp == pytest.approx(alone_mtp, rel=1e-6)


def test_mtp_targets_never_cross_a_document():
    """Without the target mask a depth-2 position near a document's end would predict the next document."""
    m = model(n_mtp=2)
    ids, labels, pos, _ = packed_rows(LENGTHS, seed=2)
    with torch.no_grad():
        got = m.losses(ids, labels, pos).mtp
        leaky = m.losses(ids, labels, attn_mask=dense_document_mask(pos)).mtp  # the same mask, targets unmasked
    assert not torch.allclose(got, leaky)


def test_pipeline_stages_compute_the_same_document_losses():
    """BlockPipe / OutputPipe (each rebuilding the mask from the position ids they pass on) equal the model."""
    c = cfg(n_mtp=1)
    m = Transformer(c)
    m.init_weights(seed=SEED)
    ids, labels, pos, _ = packed_rows(LENGTHS, seed=4)
    embed = SharedEmbedding(c, SEED)
    blocks = [BlockPipe(c, i, SEED) for i in range(c.n_layers)]
    out = OutputPipe(c, SEED)
    with torch.no_grad():
        act = embed_inputs(embed, (ids, labels, pos))
        for block in blocks:
            act = block(act)
        got = out(embed_next_tokens(embed, act))
        want = m.losses(ids, labels, pos)
    torch.testing.assert_close(got, torch.stack([want.main, want.mtp]), rtol=1e-6, atol=0)
    with torch.no_grad():
        plain = m.losses(ids, labels)
    assert abs(float(plain.main) - float(want.main)) > 1e-4  # the mask changes the result


def test_flex_backend_forward_equals_sdpa():
    """The CUDA backend's mask rule, run forward on CPU (torch's flex attention has no CPU backward)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    m = model()
    m.float()
    ids, _, pos, _ = packed_rows(LENGTHS, seed=5)
    with torch.no_grad():
        sdpa = m(ids, pos)
        m.set_attention("flex")
        flex = m(ids, pos)
    torch.testing.assert_close(flex, sdpa, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="attention backend 'x'"):
        m.set_attention("x")
