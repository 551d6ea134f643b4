"""Worker of tests/distributed/test_dispatch.py (torchrun, gloo): checks, exits non-zero on failure.

Every rank builds the same single-device MoE layer (or model) and the same global batch; the
expert-parallel copy runs on this rank's share of the batch and is compared with the single-
device one on the whole batch. Each check runs under every dispatch variant: one level or
node-aware (the group split into 2 simulated nodes), synchronous, shared-expert overlap,
two chunks, both.
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
from model.fp8 import gemm  # noqa: E402
from model.linear import Precision, precision  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from parallel.expert import AllToAllDispatcher, configure_dispatch, shard_experts  # noqa: E402

MODES = {"sync": {}, "overlap": dict(overlap=True), "chunks": dict(chunks=2), "both": dict(overlap=True, chunks=2)}

CFG = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=0, n_heads=2,
           n_routed_experts=8, n_shared_experts=1, n_activated_experts=4, n_expert_groups=4, n_limited_groups=2,
           score_func="sigmoid", route_scale=2.0, q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8,
           qk_rope_head_dim=8, v_head_dim=8, n_mtp_layers=0, max_seq_len=16, original_seq_len=16)


class Identity(torch.nn.Module):
    def forward(self, rows, counts):
        assert int(counts.sum()) == rows.size(0)
        return rows


def make_layers(world: int, rank: int, seed: int = 0, opts: dict | None = None):
    torch.manual_seed(seed)
    cfg = ModelConfig(**CFG).validate()
    ref = MoE(cfg).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
    par = copy.deepcopy(ref)
    shard_experts(par, None, world, rank)
    configure_dispatch(par, **(opts or {}))
    return cfg, ref, par


def gathered(t: torch.Tensor) -> torch.Tensor:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return torch.cat(out)


def check_round_trip(world, rank, opts):
    """dispatch → identity experts → combine returns the input exactly (one-hot gate weights)."""
    E, K, N, D = 8, 4, 37 + rank * 5, 16  # uneven token counts per rank
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(N, D, dtype=torch.float64, generator=g)
    indices = torch.rand(N, E, generator=g).argsort(dim=1)[:, :K]  # K distinct experts per token
    weights = torch.zeros(N, K, dtype=torch.float64)
    weights[torch.arange(N), torch.randint(0, K, (N,), generator=g)] = 1.0
    d = AllToAllDispatcher(None, world, rank, E, account=True)
    model = torch.nn.Module()
    model.moe = MoE(ModelConfig(**CFG).validate())
    model.moe.dispatcher = d
    configure_dispatch(model, **opts)
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
    # Rows over all ranks (a rank sends the combine rows of other ranks' tokens): exactly the
    # routing minima, per link; fewer than one copy per (token, expert).
    s, t = d.stats, d.stats.traffic
    assert t.inter_bytes + t.intra_bytes == (t.inter_rows + t.intra_rows) * D * 8
    tot = torch.tensor([t.inter_rows, t.intra_rows, s.min_inter_rows, s.min_intra_rows, s.min_flat_rows,
                        s.per_expert_rows])
    dist.all_reduce(tot)
    inter, intra, min_inter, min_intra, min_flat, per_expert = tot.tolist()
    if d.peers.n_nodes == 1:
        assert inter == 0 and intra == min_flat > 0, tot
    else:
        assert (inter, intra) == (min_inter, min_intra), tot
        # A row crosses to a node once, not once per rank there (the same with one rank per node).
        assert 0 < inter < min_flat if d.peers.per_node > 1 else 0 < inter == min_flat, tot
    # One copy per (token, expert) costs more wherever a rank holds several of a token's experts.
    assert per_expert > min_flat if E_l > 1 else per_expert == min_flat, tot


def check_layer(world, rank, force_low: bool, opts: dict):
    cfg, ref, par = make_layers(world, rank, opts=opts)
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


def check_gate_gradient(world, rank, opts):
    """Router gradient without the balance loss: summed over ranks it equals the reference's."""
    cfg, ref, par = make_layers(world, rank, seed=1, opts=opts)
    ref.balance_alpha = par.balance_alpha = 0.0
    g = torch.Generator().manual_seed(8)
    x_all = torch.randn(2 * world, 8, cfg.dim, dtype=torch.float64, generator=g)
    ref(x_all).pow(2).sum().backward()
    par(x_all[2 * rank:2 * rank + 2]).pow(2).sum().backward()
    g_par = par.gate.weight.grad.clone()
    dist.all_reduce(g_par)
    torch.testing.assert_close(g_par, ref.gate.weight.grad, rtol=1e-10, atol=1e-12)


def check_model(world, rank, opts):
    """A whole model with MTP in float32: losses and every gradient equal the one-process model's (1e-5)."""
    cfg = ModelConfig(**{**CFG, "n_mtp_layers": 1, "n_layers": 2}).validate()
    torch.manual_seed(3)
    ref = Transformer(cfg)
    ref.init_weights(3)
    par = copy.deepcopy(ref)
    shard_experts(par, None, world, rank)
    configure_dispatch(par, **opts)
    for m in (ref, par):
        for moe in (x for x in m.modules() if isinstance(x, MoE)):
            moe.balance_alpha = 0.0
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, cfg.vocab_size, (world, 17), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    lr = ref.losses(inputs, labels)
    (lr.main + 0.3 * lr.mtp).backward()
    lp = par.losses(inputs[rank:rank + 1], labels[rank:rank + 1])
    (lp.main + 0.3 * lp.mtp).backward()
    got = torch.stack([lp.main.detach(), lp.mtp.detach()])
    dist.all_reduce(got)
    torch.testing.assert_close(got / world, torch.stack([lr.main, lr.mtp]).detach(), rtol=1e-5, atol=1e-6)
    ref_p = dict(ref.named_parameters())
    n = 0
    for name, p in par.named_parameters():
        want = ref_p[name].grad
        if ".experts.w" in name:  # this rank's slice: every rank's tokens already reached it
            E_l = p.size(0)
            want, grad = want[rank * E_l:(rank + 1) * E_l], p.grad
        else:  # replicated: each rank's share of the batch
            grad = p.grad.clone()
            dist.all_reduce(grad)
        torch.testing.assert_close(grad / world, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        n += 1
    assert n > 20


def check_fp8_dispatch(world, rank, per_node, backend="emulated", recipe="blockwise"):
    """FP8 dispatch: the same expert outputs, bit for bit, as quantising after the exchange; input
    gradients equal too; dispatched bytes (1 + 4/128) / 2 of BF16's with 1×128 tiles (blockwise),
    (1 + 4/dim) / 2 with one scale per row (rowwise: torch._scaled_mm), combine bytes unchanged."""
    cfg = ModelConfig(**{**CFG, "dim": 256, "moe_inter_dim": 128}).validate()
    torch.manual_seed(5)
    with precision(Precision(backend, recipe)):
        base = MoE(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    base = base.to(torch.bfloat16)
    base.balance_alpha = 0.0
    runs = []
    for fp8 in (False, True):
        layer = copy.deepcopy(base)
        shard_experts(layer, None, world, rank)
        (d,) = configure_dispatch(layer, per_node=per_node, fp8=fp8)
        d.account = True
        x = torch.randn(2, 8, cfg.dim, generator=torch.Generator().manual_seed(20 + rank)).to(torch.bfloat16)
        x.requires_grad_(True)
        calls = []
        real = gemm.quant_along_columns
        gemm.quant_along_columns = lambda a, *args: calls.append(a.size(0)) or real(a, *args)
        try:
            y = layer(x)  # forward: quantisations counted
        finally:
            gemm.quant_along_columns = real
        y.float().square().sum().backward()
        runs.append((y.detach(), x.grad, layer.experts.w1.grad, d.stats.traffic, len(calls)))
    (y0, g0, w0, t0, n0), (y1, g1, w1, t1, n1) = runs
    # The shared expert quantises its three inputs either way. Routed, quantising after the
    # exchange: the w1, w3 and w2 inputs; FP8 dispatch: the tokens once where they live, then only
    # w2's input — the first GEMMs take the dispatched rows as they are.
    assert (n0, n1) == (3 + 3, 3 + 2), (n0, n1)
    assert torch.equal(y0, y1), (y0 - y1).abs().max()
    assert torch.equal(g0, g1), (g0 - g1).abs().max()
    # The weight gradients see the dispatched (dequantised) rows instead of the originals: close, not equal.
    torch.testing.assert_close(w1, w0, rtol=0.1, atol=0.05 * float(w0.abs().max()))
    assert t1.combine_bytes == t0.combine_bytes and t0.dispatch_bytes > 0
    scale_bytes = 4 * 2 if recipe == "blockwise" else 4  # float32 scales per 256-wide row
    assert t1.dispatch_bytes * 2 * 256 == t0.dispatch_bytes * (256 + scale_bytes), (t1.dispatch_bytes, t0.dispatch_bytes)


def check_fp8_deferred_wgrad(world, rank, per_node):
    """FP8 experts with the weight gradients deferred (overlap on: model/wgrad.py) equal the
    synchronous layer bit for bit: output, input gradient and every expert weight's gradient."""
    cfg = ModelConfig(**{**CFG, "dim": 256, "moe_inter_dim": 128}).validate()
    torch.manual_seed(6)
    with precision(Precision("emulated", "blockwise")):
        base = MoE(cfg)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_(0, 0.05)
    base = base.to(torch.bfloat16)
    runs = []
    for opts in ({}, {"overlap": True}):
        layer = copy.deepcopy(base)
        shard_experts(layer, None, world, rank)
        configure_dispatch(layer, per_node=per_node, fp8=True, **opts)
        x = torch.randn(2, 8, cfg.dim, generator=torch.Generator().manual_seed(30 + rank)).to(torch.bfloat16)
        x.requires_grad_(True)
        y = layer(x)
        y.float().square().sum().backward()
        e = layer.experts
        runs.append([y.detach(), x.grad, e.w1.grad, e.w2.grad, e.w3.grad])
    for a, b in zip(*runs):
        assert a is not None and torch.equal(a, b), (a - b).abs().max()


def main():
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)
    layouts = [world] + ([world // 2] if world >= 2 else [])  # one node; 2 simulated nodes
    for per_node in layouts:
        for mode, opts in MODES.items():
            opts = {**opts, "per_node": per_node}
            check_round_trip(world, rank, opts)
            check_layer(world, rank, force_low=False, opts=opts)
            check_layer(world, rank, force_low=True, opts=opts)
            check_model(world, rank, opts)
        check_gate_gradient(world, rank, {"per_node": per_node, "overlap": True, "chunks": 2})
        check_fp8_dispatch(world, rank, per_node)
        check_fp8_dispatch(world, rank, per_node, "torch", "rowwise")  # torch._scaled_mm runs on the CPU
        check_fp8_deferred_wgrad(world, rank, per_node)
    dist.barrier()
    if rank == 0:
        print(f"dispatch checks passed on {world} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
