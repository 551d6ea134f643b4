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

from dataclasses import dataclass, field

import torch
from torch import nn

from model.moe import Experts, moe_layers
from model.wgrad import DeferredWgrad, anchor

from .a2a import LinkModel, Peers, Traffic, Transfer, land, launch


def _pairs(dest: torch.Tensor, n_dest: int):
    """dest (N, K) destination of each choice (-1: none) → (pair_dest, pair_row, on): one pair per
    (destination, row) holding at least one choice, destination-major, and on (P, K) marking the
    row's choices that go to the pair's destination."""
    N, K = dest.shape
    hits = torch.zeros(n_dest, N, dtype=torch.bool, device=dest.device)
    valid = dest >= 0
    rows = torch.arange(N, device=dest.device).unsqueeze(1).expand(N, K)
    hits[dest[valid], rows[valid]] = True
    pair_dest, pair_row = hits.nonzero(as_tuple=True)
    on = dest[pair_row] == pair_dest.unsqueeze(1)
    return pair_dest, pair_row, on


@dataclass
class DispatchStats:
    """Bytes moved by the dispatcher on this rank since the last reset (forward; backward mirrors it).

    `traffic` counts what the exchanges sent, per link; the routing minima are counted from the
    routing alone (ignoring how the exchanges are built), so a dispatcher that sends more than
    the routing requires shows a ratio above 1."""

    tokens: int = 0  # tokens routed from this rank
    traffic: Traffic = field(default_factory=Traffic)
    min_inter_rows: int = 0  # one row per (token, remote node), each way
    min_intra_rows: int = 0  # one row per (token, rank on a node other than the row's holder there), each way
    min_flat_rows: int = 0  # one row per (token, remote rank), each way: the one-level minimum
    per_expert_rows: int = 0  # what a one-copy-per-(token, expert) dispatcher sends, each way

    @property
    def payload_bytes(self) -> int:
        return self.traffic.inter_bytes + self.traffic.intra_bytes

    def reset(self) -> None:
        traffic = self.traffic
        traffic.reset()
        self.__init__(traffic=traffic)  # the exchanges keep counting into the same object


class AllToAllDispatcher:
    """Dispatch across the expert-parallel group; experts hold E / ep local experts.

    Node-aware when the group spans several nodes (`per_node` ep ranks each): a token's row goes
    once to each other node holding one of its experts — to the rank with this rank's local
    index there, as DeepEP's internode kernels route over the RDMA rail — which forwards it
    inside its node to the ranks that hold the experts; the combine sums a node's partial
    outputs at that rank before they cross back. Inside one node: one level, as before.

    Options (`configure_dispatch`): `overlap` starts every exchange asynchronously and computes
    the shared experts while the dispatch is in flight; `chunks` = 2 runs the layer's tokens as
    two halves whose exchanges overlap the other half's experts; `fp8` sends the dispatched rows
    as E4M3 (`Experts.fp8`'s row-local activation quantisation). `account` (benchmarks and tests)
    counts bytes in `stats`; it reads device tensors on the host, so it stays off in training.
    """

    def __init__(self, group, ep_size: int, ep_rank: int, n_experts: int, account: bool = False,
                 per_node: int | None = None):
        self.n_experts = n_experts
        self.n_local = n_experts // ep_size
        self.peers = Peers(group, ep_size, ep_rank, per_node or ep_size)
        self.overlap, self.chunks, self.fp8 = False, 1, False
        self.node_aware = True  # False: one hop to every rank even across nodes (the baseline of bench/dispatch.py)
        self.stats = DispatchStats()
        self.account = account
        self.last_recv_rows, self.last_expert_counts = 0, None  # host int and device tensor: no sync

    @property
    def ep_size(self) -> int:
        return self.peers.size

    @property
    def ep_rank(self) -> int:
        return self.peers.rank

    @property
    def account(self) -> bool:
        return self.peers.traffic is not None

    @account.setter
    def account(self, on: bool) -> None:
        self.peers.traffic = self.stats.traffic if on else None

    def __call__(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, experts: Experts,
                 shared: nn.Module | None = None) -> torch.Tensor:
        """Routed experts' output (N, D) for this rank's tokens, plus `shared(x)` when given."""
        if self.account:
            self._account(indices)
        spec = self._fp8_spec(experts)
        self.last_recv_rows, self.last_expert_counts = 0, 0
        n = x.size(0)
        chunks = self.chunks if n >= self.chunks else 1
        bounds = [n * c // chunks for c in range(chunks + 1)]
        outs: list = [None] * chunks
        overlapped = self.overlap or chunks > 1
        defer = None
        if (overlapped and torch.is_grad_enabled() and isinstance(experts, Experts) and experts.w1.requires_grad
                and experts.defers_wgrad(x)):
            defer = DeferredWgrad((experts.w1, experts.w2, experts.w3))
        steps = [self._chunk(x[a:b], indices[a:b], weights[a:b], experts, spec, outs, c, defer)
                 for c, (a, b) in enumerate(zip(bounds, bounds[1:]))]
        shared_out = zero = None
        if overlapped:
            # Forward: every chunk's dispatch in flight; then the chunks in turn (chunk 1's
            # dispatch moves behind chunk 0's experts, chunk 0's combine behind chunk 1's); then
            # the shared experts behind the last combine. The order is fixed (never "whichever
            # has arrived"): every rank must start the same collectives in the same order.
            # Backward runs the recorded nodes newest first (model/wgrad.py): the reverse
            # combines start, the shared experts' backward hides them, each chunk's data
            # gradient hides the other's exchange, and the deferred weight gradients, anchored
            # here between the dispatch and the experts, run behind the reverse dispatch.
            for step in steps:
                next(step)
            if defer is not None:
                zero = anchor(defer)
            pending = [s for s in steps if next(s, None) is not None]
            if shared is not None and self.overlap:
                shared_out = shared(x)
            while pending:
                pending = [s for s in pending if next(s, None) is not None]
        else:
            for step in steps:
                for _ in step:  # synchronous: each exchange is waited for at once
                    pass
        y = outs[0] if chunks == 1 else torch.cat(outs)
        if shared is not None:
            y = y + (shared(x) if shared_out is None else shared_out)
        return y if zero is None else y + zero  # the anchor's zero joins its node to the graph

    def _fp8_spec(self, experts: Experts):
        """The experts' FP8 spec when the dispatched rows may travel as E4M3: a row-local
        activation quantisation (1×128 tiles or rows) commutes with the exchange."""
        spec = getattr(experts, "fp8", None)
        if not self.fp8 or spec is None:
            return None
        from model.fp8.gemm import RECIPES

        return spec if RECIPES[spec.recipe][0][0] in ("tile", "row") else None

    def _chunk(self, x, indices, weights, experts, spec, outs, slot, defer):
        """One chunk's dispatch → experts → combine; yields after each exchange it starts."""
        peers, E_l = self.peers, self.n_local
        qx = None
        if spec is not None:
            from model.fp8.gemm import RECIPES, quant_along_columns

            qx = quant_along_columns(x, RECIPES[spec.recipe][0][0], [x.size(0)], spec)  # once per token
        hop = None
        rows, ids, w = x, indices, weights
        if peers.n_nodes > 1 and peers.per_node > 1 and self.node_aware:  # one rank per node: one hop is node-aware
            # 1. Inter-node: one row per (token, node holding its experts), to the rail peer there.
            dest_rank = indices // E_l
            node = dest_rank // peers.per_node
            pair_node, pair_tok, on = _pairs(node, peers.n_nodes)
            relay = pair_node * peers.per_node + peers.local
            send, recv = peers.split_counts(torch.bincount(relay, minlength=peers.size))
            hop = Transfer(peers, send, recv, "dispatch")
            ids1 = torch.where(on, indices[pair_tok], -1)
            w1 = torch.where(on, weights[pair_tok], weights.new_zeros(()))
            token = launch(hop, (x[pair_tok], ids1, w1), _take(qx, pair_tok))
            yield True
            rows, ids, w = land(token, hop)
            qx = hop.qx
        # 2. Inside the node (or the whole group): one row per (row, rank holding its experts).
        dest = torch.where(ids >= 0, ids // E_l, -1)
        pair_rank, pair_row, on = _pairs(dest, peers.size)
        send, recv = peers.split_counts(torch.bincount(pair_rank, minlength=peers.size))
        fan = Transfer(peers, send, recv, "dispatch")
        local_ids = torch.where(on, ids[pair_row] - pair_rank.unsqueeze(1) * E_l, -1)
        local_w = torch.where(on, w[pair_row], w.new_zeros(()))
        token = launch(fan, (rows[pair_row], local_ids, local_w), _take(qx, pair_row))
        if hop is None:  # two hops: the fan-out inside the node is waited for at once (NVLink)
            yield True
        r_rows, r_ids, r_w = land(token, fan)
        # 3. Local experts over (row, expert) copies, gate-weighted, summed per row.
        copy_row, copy_k = (r_ids >= 0).nonzero(as_tuple=True)
        copy_expert = r_ids[copy_row, copy_k]
        order = copy_expert.argsort(stable=True)
        counts = torch.bincount(copy_expert, minlength=E_l)
        self.last_recv_rows += r_rows.size(0)  # for tests: summed over the chunks of a call
        self.last_expert_counts = counts + self.last_expert_counts
        src = copy_row[order]
        kw = {} if defer is None else {"defer": defer}
        if fan.qx is not None:  # the first GEMMs take the dispatched E4M3 rows as they are
            kw["qx"] = _take(fan.qx, src)
        y = experts(r_rows[src], counts, **kw)  # (C, D) in expert order
        y = y * r_w[src, copy_k[order]].unsqueeze(1).to(y.dtype)
        partial = y.new_zeros(r_rows.size(0), y.size(1)).index_add(0, src, y)
        # 4. Back: to the row's holder on this node, summed there, then across to the token's rank.
        back = Transfer(peers, recv, send, "combine")
        token = launch(back, (partial,))
        if hop is None:
            yield True
        (got,) = land(token, back)
        summed = got.new_zeros(rows.size(0), got.size(1)).index_add(0, pair_row, got)
        if hop is not None:
            home = Transfer(peers, hop.recv, hop.send, "combine")
            token = launch(home, (summed,))
            yield True
            (got,) = land(token, home)
            summed = got.new_zeros(x.size(0), got.size(1)).index_add(0, pair_tok, got)
        outs[slot] = summed.to(x.dtype)

    def _account(self, indices: torch.Tensor) -> None:
        """The routing minima of this call, from the routing alone."""
        s, peers = self.stats, self.peers
        N = indices.size(0)
        dest = indices // self.n_local
        ranks = torch.zeros(N, peers.size, dtype=torch.bool, device=indices.device).scatter_(1, dest, True)
        by_node = ranks.view(N, peers.n_nodes, peers.per_node)
        nodes = by_node.any(dim=2)
        # The row's holder on each node: this rank on its own node, the rail peer elsewhere.
        holder = by_node[:, :, peers.local]
        s.tokens += N
        s.min_inter_rows += 2 * (int(nodes.sum()) - int(nodes[:, peers.node].sum()))
        s.min_intra_rows += 2 * (int(by_node.sum()) - int(holder.sum()))
        s.min_flat_rows += 2 * (int(ranks.sum()) - int(ranks[:, peers.rank].sum()))
        s.per_expert_rows += 2 * int((dest != peers.rank).sum())


def _take(qx, index: torch.Tensor):
    """The Quantised rows `index` of qx (None stays None)."""
    if qx is None:
        return None
    from model.fp8.gemm import Quantised

    return Quantised(qx.q[index], qx.scale[index], qx.granularity, qx.block)


def ranks_per_node(ep_members: list[int], local_world: int) -> int:
    """EP ranks per node from the launch: torchrun puts ranks [k·L, (k+1)·L) on node k (L =
    LOCAL_WORLD_SIZE). Node-aware only when the group's ranks sit evenly on their nodes, in
    order; otherwise one level (always correct, never node-aware)."""
    nodes = [r // max(local_world, 1) for r in ep_members]
    per = {n: nodes.count(n) for n in nodes}
    if len(set(per.values())) == 1 and nodes == sorted(nodes):
        return next(iter(per.values()))
    return len(ep_members)


def configure_dispatch(model: nn.Module, *, per_node: int = 0, overlap: bool = False, chunks: int = 1,
                       fp8: bool = False, link: LinkModel | None = None,
                       node_aware: bool = True) -> list[AllToAllDispatcher]:
    """Set the dispatch options of every all-to-all dispatcher in `model` (parallel.* keys);
    `link` simulates a slow inter-node link (tests and benchmarks only)."""
    found = []
    for m in moe_layers(model):
        d = m.dispatcher
        if isinstance(d, AllToAllDispatcher):
            counting = d.account
            if per_node:
                d.peers = Peers(d.peers.group, d.ep_size, d.ep_rank, per_node)
            d.peers.link = link
            d.overlap, d.chunks, d.fp8, d.node_aware = overlap, chunks, fp8, node_aware
            d.account = counting
            found.append(d)
    return found


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
            m.dispatcher.stats.reset()
            m.dispatcher.account = True
            stats.append(m.dispatcher.stats)
    return stats
