"""Expert parallelism: the all-to-all token dispatcher and the expert sharding of a built model.

The dispatcher is the only MoE code that communicates. It follows DeepEP's normal-mode
dispatch rather than Megatron-Core's AlltoAll dispatcher: a token goes to each destination
rank *once*, whatever number of its top-k experts that rank holds, with the top-k ids and gate
weights as metadata; the receiving rank runs its local experts on every (token, expert) copy,
sums them with the gate weights, and sends back one vector per (token, rank). Megatron sends
one copy per (token, expert), which costs up to k× the bytes when a rank holds several of a
token's experts — exactly what node-limited (group-limited) routing makes common. Both
directions therefore move the minimum the routing implies (bench/dispatch.py counts it with
the dispatcher's byte accounting, which training leaves off).

Steps of `AllToAllDispatcher.__call__` (N tokens, K choices, ep ranks, E_l local experts):
  1. pairs (rank r, token n) for every rank that holds one of n's experts, ordered by rank;
  2. all-to-all the per-rank counts (read on the host once: the split sizes), then the token
     rows, their local expert ids and weights (`all_to_all_single` with uneven splits;
     autograd through both directions);
  3. on arrival: expand rows to (row, expert) copies, sort by expert, the same grouped SwiGLU
     as one device, weight by the gate and sum per row;
  4. the reverse all-to-all, then every token sums the partial outputs of its ranks.
No token is dropped and there is no capacity factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from model.moe import Experts, moe_layers


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    if x.requires_grad:
        return _AllToAll.apply(x, send_splits, recv_splits, group)
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    return out


@dataclass
class DispatchStats:
    """Bytes moved by the dispatcher on this rank since the last reset (both directions)."""

    tokens: int = 0  # tokens routed from this rank
    pairs: int = 0  # (token, destination rank) pairs = token rows sent, incl. to this rank itself
    remote_pairs: int = 0  # pairs whose destination is another rank
    payload_bytes: int = 0  # hidden-state rows sent to other ranks, dispatch + combine
    metadata_bytes: int = 0  # expert ids and gate weights sent to other ranks, plus counts
    min_payload_bytes: int = 0  # the routing minimum: one row per (token, remote rank), each way
    per_expert_bytes: int = 0  # what a one-copy-per-(token, expert) dispatcher would send

    def reset(self) -> None:
        self.__init__()


class AllToAllDispatcher:
    """Dispatch across the expert-parallel group; experts hold E / ep local experts.

    `account` (benchmarks and tests) adds every call's bytes to `stats`; it reads device
    tensors on the host, so it stays off in training.
    """

    def __init__(self, group, ep_size: int, ep_rank: int, n_experts: int, account: bool = False):
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank
        self.n_experts = n_experts
        self.n_local = n_experts // ep_size
        self.account = account
        self.stats = DispatchStats()
        self.last_recv_rows, self.last_expert_counts = 0, None  # host int and device tensor: no sync

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                 experts: Experts) -> torch.Tensor:
        N, K = indices.shape
        D = x.size(1)
        E_l, R = self.n_local, self.ep_size
        dest = indices // E_l  # (N, K) rank holding each chosen expert
        # 1. One row per (rank, token) pair, rank-major; the top-k metadata restricted to that rank.
        hits = torch.zeros(R, N, dtype=torch.bool, device=x.device)
        hits[dest.t().flatten(), torch.arange(N, device=x.device).repeat(K)] = True
        pair_rank, pair_token = hits.nonzero(as_tuple=True)
        send_counts = torch.bincount(pair_rank, minlength=R)
        on_rank = dest[pair_token] == pair_rank.unsqueeze(1)  # (P, K)
        local_ids = torch.where(on_rank, indices[pair_token] - pair_rank.unsqueeze(1) * E_l, -1)
        local_w = torch.where(on_rank, weights[pair_token], weights.new_zeros(()))
        # 2. Exchange counts, then rows and metadata.
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        send, recv = torch.stack([send_counts, recv_counts]).tolist()  # one device → host read
        rows = all_to_all(x[pair_token], send, recv, self.group)
        r_ids = all_to_all(local_ids, send, recv, self.group)
        r_w = all_to_all(local_w, send, recv, self.group)
        # 3. Local experts over (row, expert) copies, gate-weighted, summed per row.
        copy_row, copy_k = (r_ids >= 0).nonzero(as_tuple=True)
        copy_expert = r_ids[copy_row, copy_k]
        order = copy_expert.argsort(stable=True)
        counts = torch.bincount(copy_expert, minlength=E_l)
        self.last_recv_rows, self.last_expert_counts = rows.size(0), counts  # for tests
        y = experts(rows[copy_row[order]], counts)  # (C, D) in expert order
        y = y * r_w[copy_row[order], copy_k[order]].unsqueeze(1).to(y.dtype)
        partial = y.new_zeros(rows.size(0), D).index_add(0, copy_row[order], y)
        # 4. Back to the senders; each token sums its ranks' partial outputs.
        back = all_to_all(partial, recv, send, self.group)
        if self.account:
            self._account(N, K, D, x.element_size(), weights.element_size(), send, dest)
        return x.new_zeros(N, D).index_add(0, pair_token, back.to(x.dtype))

    def _account(self, N, K, D, elem, w_elem, send, dest) -> None:
        s = self.stats
        remote = sum(c for r, c in enumerate(send) if r != self.ep_rank)
        s.tokens += N
        s.pairs += sum(send)
        s.remote_pairs += remote
        s.payload_bytes += 2 * remote * D * elem  # rows out, partial sums back
        s.metadata_bytes += remote * K * (8 + w_elem) + 2 * self.ep_size * 8
        # Minimum implied by the routing, counted independently of the pairs built above.
        remote_ranks = torch.zeros(N, self.ep_size, dtype=torch.bool, device=dest.device)
        remote_ranks.scatter_(1, dest, True)
        remote_ranks[:, self.ep_rank] = False
        s.min_payload_bytes += 2 * int(remote_ranks.sum()) * D * elem
        s.per_expert_bytes += 2 * int((dest != self.ep_rank).sum()) * D * elem


# ------------------------------------------------------------------ model transforms
def shard_experts(model: nn.Module, group, ep_size: int, ep_rank: int) -> list[AllToAllDispatcher]:
    """Keep this rank's E/ep experts of every MoE layer and route through the all-to-all dispatcher.

    Works on a model on any device, meta included (the weights are sliced, not re-drawn, so a
    model initialised before sharding keeps its values; one built on meta is initialised after,
    per global expert id, by model/init.py).
    """
    dispatchers = []
    for moe in moe_layers(model):
        full = moe.experts
        E = full.n_experts
        n_local = E // ep_size
        lo = ep_rank * n_local
        local = Experts(n_local, full.w1.size(2), full.w1.size(1), expert_offset=full.expert_offset + lo)
        local = local.to(device=full.w1.device, dtype=full.w1.dtype)
        local.fp8 = full.fp8
        with torch.no_grad():
            if full.w1.device.type != "meta":
                for w in ("w1", "w2", "w3"):
                    getattr(local, w).copy_(getattr(full, w)[lo:lo + n_local])
        moe.experts = local
        moe.dispatcher = AllToAllDispatcher(group, ep_size, ep_rank, E)
        dispatchers.append(moe.dispatcher)
    return dispatchers


def mark_for_deepspeed(model: nn.Module, ep_size: int, group_name: str) -> None:
    """Make DeepSpeed treat our MoE layers' experts as expert-parallel parameters.

    DeepSpeed recognises MoE only through instances of `deepspeed.moe.layer.MoE` (it then
    builds expert-data-parallel gradient reduction and MoE optimizer groups for ZeRO). The
    model stays free of DeepSpeed: here each MoE layer gets a parameter-less child that is such
    an instance (never called), and expert parameters carry the attributes DeepSpeed's own
    experts set (`allreduce = False`, `group_name`). Subclassing DeepSpeed's MoE layer would work
    too (docs/parallel.md); a marker child keeps model/ importable without DeepSpeed.
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class _Marker(DeepSpeedMoE):
        def __init__(self, num_experts: int):
            nn.Module.__init__(self)  # not DeepSpeed's: it would build its own gate and experts
            self.num_experts = num_experts
            self.ep_size = ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = group_name
            self.enable_expert_tensor_parallelism = False
            self.use_residual = False

        def set_deepspeed_parallelism(self, *args, **kwargs) -> None:
            pass  # groups are built up front by parallel.topology.build_groups

        def forward(self, *args, **kwargs):
            raise RuntimeError("marker module; the MoE layer is its parent")

    for moe in moe_layers(model):
        moe.add_module("deepspeed_moe_marker", _Marker(moe.n_routed_experts))
        for p in moe.experts.parameters():
            p.allreduce = False
            p.group_name = group_name


def enable_dispatch_stats(model: nn.Module) -> list[DispatchStats]:
    """Turn on the byte accounting of every all-to-all dispatcher in `model` (benchmarks, tests);
    returns their stats, reset."""
    stats = []
    for m in moe_layers(model):
        if isinstance(m.dispatcher, AllToAllDispatcher):
            m.dispatcher.account = True
            m.dispatcher.stats.reset()
            stats.append(m.dispatcher.stats)
    return stats
