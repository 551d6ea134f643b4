"""Worker of tests/distributed/test_dispatch.py (torchrun, gloo, float64): checks, exits non-zero on failure.

Every rank builds the same single-device MoE layer and the same global batch; the expert-
parallel copy runs on this rank's share of the batch and is compared with the single-device
layer on the whole batch.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from model.config import ModelConfig  # noqa: E402
from model.moe import MoE  # noqa: E402
from parallel.expert import AllToAllDispatcher, shard_experts  # noqa: E402

CFG = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=0, n_heads=2,
           n_routed_experts=8, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
           score_func="sigmoid", route_scale=2.0, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8, n_mtp_layers=0, max_seq_len=16, original_seq_len=16)


class Identity(torch.nn.Module):
    def forward(self, rows, counts):
        assert int(counts.sum()) == rows.size(0)
        return rows


def make_layers(world: int, rank: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = ModelConfig(**CFG).validate()
    ref = MoE(cfg).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    par = copy.deepcopy(ref)
    shard_experts(par, None, world, rank)
    return cfg, ref, par


def gathered(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def check_round_trip(world, rank):
    """dispatch → identity experts → combine returns the input exactly (one-hot gate weights)."""
    E, K, N, D = 8, 4, 37 + rank * 5, 16  # uneven token counts per rank
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    indices = torch.rand(N, E, generator=g).argsort(dim=1)[:, :K]  # K distinct experts per token
    weights = torch.zeros(N, K, dtype=torch.float64)
    weights[torch.arange(N), torch.randint(0, K, (N,), generator=g)] = 1.0
    d = AllToAllDispatcher(None, world, rank, E, account=True)
    out = d(x, indices, weights, Identity())
    assert torch.equal(out, x), (out - x).abs().max()
    # Counts: rows this rank received = (token, rank) pairs aimed at it by every rank; per-expert
    # copies = global count of each local expert in the routing.
    all_idx = [torch.empty(0)] * world
    dist.all_gather_object(all_idx, indices)
    E_l = E // world
    expected_rows = sum(int(((idx // E_l) == rank).any(dim=1).sum()) for idx in all_idx)
    assert d.last_recv_rows == expected_rows, (d.last_recv_rows, expected_rows)
    flat = torch.cat([idx.flatten() for idx in all_idx])
    expected_counts = torch.bincount(flat, minlength=E)[rank * E_l:(rank + 1) * E_l]
    assert torch.equal(d.last_expert_counts, expected_counts)
    # Bytes: exactly the routing minimum, less than one copy per (token, expert) would cost.
    s = d.stats
    assert s.payload_bytes == s.min_payload_bytes > 0
    assert s.per_expert_bytes > s.payload_bytes


def check_layer(world, rank, force_low: bool):
    cfg, ref, par = make_layers(world, rank)
    for m in (ref, par):
        m.balance_alpha = 0.01
    # Each rank's balance loss is the mean over its own sequences; the reference's is the mean
    # over all, i.e. the average of the ranks' (what data parallelism's gradient averaging does).
    par.balance_grad_scale = 1.0 / world
    for m in (ref, par):
        if force_low:  # every token to experts 0..K-1 (extreme imbalance): other ranks receive nothing
            m.gate.e_score_correction_bias[: cfg.n_activated_experts] = 100.0
    B, T, D = 2 * world, 8, cfg.dim
    g = torch.Generator().manual_seed(7)
    x_all = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    grad_all = torch.randn(B, T, D, dtype=torch.float64, generator=g)
    x_ref = x_all.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * grad_all).sum().backward()
    share = slice(2 * rank, 2 * rank + 2)
    x = x_all[share].clone().requires_grad_(True)
    y = par(x)
    (y * grad_all[share]).sum().backward()
    torch.testing.assert_close(y, y_ref[share], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad[share], rtol=1e-12, atol=1e-12)
    # Router and shared expert are replicated: their gradients sum over ranks to the reference's.
    for name in ("gate.weight", "shared_experts.w1.weight", "shared_experts.w2.weight"):
        g_par = dict(par.named_parameters())[name].grad.clone()
        dist.all_reduce(g_par)
        g_ref = dict(ref.named_parameters())[name].grad
        torch.testing.assert_close(g_par, g_ref, rtol=1e-10, atol=1e-12)
    E_l = cfg.n_routed_experts // world
    for w in ("w1", "w2", "w3"):
        mine = getattr(par.experts, w).grad
        torch.testing.assert_close(mine, getattr(ref.experts, w).grad[rank * E_l:(rank + 1) * E_l],
                                   rtol=1e-10, atol=1e-12)
    counts = par.tokens_per_expert.clone()
    dist.all_reduce(counts)
    assert torch.equal(counts, ref.tokens_per_expert), (counts, ref.tokens_per_expert)
    if force_low:  # ranks holding none of experts 0..K-1 received nothing, the others everything
        holds = any(e // E_l == rank for e in range(cfg.n_activated_experts))
        assert (par.dispatcher.last_recv_rows == 0) == (not holds), (rank, par.dispatcher.last_recv_rows)
        assert holds or rank > 0


def check_gate_gradient(world, rank):
    """Router gradient without the balance loss: summed over ranks it equals the reference's."""
    cfg, ref, par = make_layers(world, rank, seed=1)
    ref.balance_alpha = par.balance_alpha = 0.0
    g = torch.Generator().manual_seed(8)
    x_all = torch.randn(2 * world, 8, cfg.dim, dtype=torch.float64, generator=g)
    ref(x_all).pow(2).sum().backward()
    par(x_all[2 * rank:2 * rank + 2]).pow(2).sum().backward()
    g_par = par.gate.weight.grad.clone()
    dist.all_reduce(g_par)
    torch.testing.assert_close(g_par, ref.gate.weight.grad, rtol=1e-10, atol=1e-12)


def main():
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    check_round_trip(world, rank)
    check_layer(world, rank, force_low=False)
    check_layer(world, rank, force_low=True)
    check_gate_gradient(world, rank)
    dist.barrier()
    if rank == 0:
        print(f"dispatch checks passed on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
