"""Step time of a layout, term by term: what `python -m train.plan` prints and `--calibrate` fits.

One model serves moeforge's layouts and the published runs it is calibrated on (train/calibrate.py).
Per micro-batch on each pipeline stage (T = micro-batch × seq_len / tp tokens per GPU):

- compute: the stage's FLOPs (model/flops.py's counts: 6 × activated parameters + causal
  attention) over peak × efficiency, the projections at the FP8 peak when fp8 is on, attention,
  router and output head at the BF16 peak (DeepSeek-V3 §3.3 keeps those in BF16). The
  efficiency is the one fitted number (fraction of peak reached by the GEMMs; everything not
  modelled — norms, permutes, optimizer step, kernel gaps — lands in it);
- mtp: the MTP block, its eh_proj and its pass through the shared head (last stage);
- recompute: moeforge's full block recomputation is one more forward of every block (+1/3 of the
  block FLOPs) and one more dispatch/combine; DeepSeek recomputes RMSNorm and the MLA
  up-projections (§3.3.3), Megatron's recipe `mla_up_proj` and the dense `mlp`: the forward of
  those GEMMs only;
- sm: communication kernels that run beside the GEMMs take SMs from them. DeepSeek reserves 20
  of 132 SMs for its all-to-all at all times (§3.2.2): compute / (1 − 20/132). Where
  communication only overlaps part of the compute (moeforge's modes), the slowdown applies to
  the overlapped part, with NCCL_OVERLAP_SMS;
- ep_ib, ep_nvl: the exposed part of the expert-parallel traffic. Rows per token from
  `ep_rows_per_token` (node-aware dispatch: one IB copy per remote destination node, NVLink
  fan-out inside it), bytes per row 1 + 4/128 per element for an FP8 dispatch and 2 for
  the BF16 combine and both backward exchanges; the hidden fraction is MEASURED_OVERLAP of the
  configured mode, never assumed;
- tp: tensor-parallel all-gather / reduce-scatter around attention and dense MLPs (published
  layouts only: moeforge has no TP), NVLink, not hidden;
- pp: activations and their gradients to the neighbour stages.

A step is (m + bubble) slots of the slowest stage plus the exposed data-parallel gradient
traffic: the bubble is pp − 1 slots for 1F1B, (pp − 1)/vp for Megatron's interleaved schedule
and (pp/2 − 1)·2/3 for DualPipe (the report's Table 2, (PP/2 − 1)(F&B + B − 3W), with the overlapped
F&B = F + B, a full backward B = 2F and its weight part W = F, against a slot of F + B = 3F);
under DualPipe a GPU runs stage i of one direction and stage pp − 1 − i of the other
(`dualpipe_devices`). `Timing.per_step` splits the step into the average stage's terms, the
slowest stage's excess over them ("imbalance"), the bubble and DP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config import ModelConfig
from model.flops import attention_flops_per_token, block_params

from .cluster import ClusterConfig

FP8_BYTES = 1 + 4 / 128  # E4M3 value + one FP32 scale per 1×128 tile (DeepSeek-V3 §3.3.2)

# Fraction of the exposed all-to-all time each moeforge overlap mode hides, by mode:
# sync (neither), shared (parallel.moe_overlap: shared experts while the dispatch is in flight),
# chunks (parallel.moe_chunks=2: one half's all-to-all under the other half's experts), both.
# Measured by bench/dispatch.py on a simulated inter-node link whose time equals the layer's
# compute ("exposed link time hidden, vs synchronous"; bench/RESULTS.md, 2026-12-04, with the
# weight gradients deferred: the median of three runs on the 2-core CPU box; both ranged
# 0.80-0.86). Simulated, not a GPU measurement.
MEASURED_OVERLAP = {"sync": 0.0, "shared": 0.32, "chunks": 0.64, "both": 0.81}

# SMs NCCL's all-to-all occupies while it runs beside a GEMM (moeforge's overlap modes):
# NCCL's default channel count on an 8-GPU NVSwitch node with one HCA per GPU is of this order.
# Stated, not measured.
NCCL_OVERLAP_SMS = 16

RECOMPUTE = ("none", "full", "mla_up", "mla_up+mlp")
PIPELINES = ("1f1b", "interleaved", "dualpipe")


def overlap_mode(moe_overlap: bool, moe_chunks: int) -> str:
    """MEASURED_OVERLAP's key for `parallel.moe_overlap` and `parallel.moe_chunks`."""
    chunks = moe_chunks > 1
    return {(False, False): "sync", (True, False): "shared", (False, True): "chunks", (True, True): "both"}[
        (bool(moe_overlap), chunks)]


# ------------------------------------------------------------------ routing geometry
def _miss(pool: int, held: int, k: int) -> float:
    """P(none of k distinct experts drawn uniformly from `pool` is among `held` of them)."""
    if pool - held < k:
        return 0.0
    return math.comb(pool - held, k) / math.comb(pool, k)


def _per_group_hit(per_group: int, held: int, top_k: int, limited: int) -> float:
    """P(a unit holding `held` experts of a chosen group gets at least one of that group's share
    of the token's experts: k / M of them, the floor or the ceiling in proportion to the mean)."""
    lo, frac = divmod(top_k, limited)
    frac = frac / limited
    return (1 - frac) * (1 - _miss(per_group, held, lo)) + frac * (1 - _miss(per_group, held, lo + 1))


def expected_units_hit(n_experts: int, top_k: int, units: int, n_groups: int = 1, limited: int = 1) -> float:
    """Expected number of `units` (nodes or EP ranks, each holding n_experts / units consecutive
    experts) that hold at least one of a token's top_k experts.

    Routing is group-limited as in model/ (DeepSeek-V3 §2.1.2 node-limited routing: with one
    expert group per node, `limited` = M nodes at most): `limited` of the `n_groups` groups,
    uniformly, each holding k / M of the token's experts, uniformly inside it. Groups are chosen
    by the sum of their best k / M scores, so a chosen group almost always gets some: the real
    router on random inputs hits 3.96 of its 4 groups at DeepSeek-V3's shape (tests/unit/
    test_plan.py), where drawing k experts uniformly from the chosen groups' pool would say 3.63
    (the formula before, which undercounted inter-node rows by ~9%). Linearity of expectation:
    units × P(a given unit is hit).
    """
    if units <= 1:
        return 1.0
    per_unit = n_experts // units
    if n_groups <= 1 or limited >= n_groups:
        return units * (1 - _miss(n_experts, per_unit, top_k))
    per_group = n_experts // n_groups
    if top_k < limited:  # not every chosen group can be hit: k uniformly from the chosen groups' pool
        pool = limited * per_group
        if per_group % per_unit == 0:
            return units * limited / n_groups * (1 - _miss(pool, per_unit, top_k))
        return units * (1 - _miss(n_experts, per_unit, top_k))
    if per_unit % per_group == 0:  # a unit holds g whole groups: hit when one of them is chosen
        g = per_unit // per_group
        p = 1 - math.comb(n_groups - g, limited) / math.comb(n_groups, limited)
    elif per_group % per_unit == 0:  # a group spans several units: its share of the token's experts
        p = limited / n_groups * _per_group_hit(per_group, per_unit, top_k, limited)
    else:  # groups straddle units: no closed form here, fall back to unlimited routing
        return units * (1 - _miss(n_experts, per_unit, top_k))
    return units * p


def ep_rows_per_token(cfg: ModelConfig, ep: int, ranks_per_node: int, hierarchical: bool = True) -> tuple[float, float]:
    """(InfiniBand rows, NVLink rows) one token's hidden row costs per dispatch (and per combine).

    Node-aware dispatch (parallel/expert.py): one IB copy per destination node other than the
    token's own, landing on the rank with the same local index, then one NVLink copy per other
    rank of that node holding one of the token's experts. Expected values, exact by linearity:
    IB = nodes hit × (N − 1)/N (the own node is any node with probability 1/N), NVLink = ranks
    hit × (1 − 1/ranks_per_node) (on each node one rank, the landing one, already has the row).
    Flat dispatch (hierarchical=False): one copy per destination rank; those on other nodes cross IB.
    """
    E, k = cfg.n_routed_experts, cfg.n_activated_experts
    G, M = cfg.n_expert_groups, cfg.n_limited_groups
    if ep <= 1:
        return 0.0, 0.0
    ranks = expected_units_hit(E, k, ep, G, M)
    rpn = min(max(1, ranks_per_node), ep)
    if ep % rpn or ep == rpn:  # inside one node
        return 0.0, ranks * (ep - 1) / ep
    nodes = ep // rpn
    if not hierarchical:
        return ranks * (ep - rpn) / ep, ranks * (rpn - 1) / ep
    return expected_units_hit(E, k, nodes, G, M) * (nodes - 1) / nodes, ranks * (1 - 1 / rpn)


def row_bytes(dim: int, dispatch_bytes: float, act_bytes: int, full_recompute: bool) -> dict[str, float]:
    """Bytes one token row costs per MoE layer and link crossing: the forward dispatch (FP8 rows
    with their 1×128 scales when on), the forward combine (BF16, DeepSeek-V3 §3.3.4), the two
    backward exchanges (gradients, BF16), and under full recomputation the forward's pair again."""
    return {"dispatch": dim * dispatch_bytes, "combine": dim * act_bytes, "backward": 2 * dim * act_bytes,
            "recompute": dim * (dispatch_bytes + act_bytes) if full_recompute else 0.0}


# ------------------------------------------------------------------ the model
@dataclass
class Schedule:
    """How a layout runs, beyond pp/ep/batch: what moeforge configures, or what a published run used."""

    tp: int = 1  # tensor parallel (published layouts only)
    vp: int = 1  # virtual stages per GPU (interleaved schedule)
    pipeline: str = "1f1b"  # 1f1b | interleaved | dualpipe
    recompute: str = "none"  # none | full | mla_up | mla_up+mlp
    ep_hide: float = 0.0  # fraction of the all-to-all hidden behind compute
    pp_hide: float = 0.0
    dp_hide: float = 0.0
    comm_sms: int = 0  # SMs the communication kernels hold while they overlap compute
    sm_always: bool = False  # held for the whole step (DeepSeek's 20 of 132), not only while overlapping
    hierarchical: bool = True  # node-aware dispatch
    ranks_per_node: int = 0  # EP ranks per node; 0 = cluster.gpus_per_node
    links_concurrent: bool = False  # IB and NVLink stages pipelined (DeepEP-style) instead of one after the other
    fp8_dispatch: bool = True  # FP8 dispatch rows when fp8 is on

    def check(self) -> "Schedule":
        if self.recompute not in RECOMPUTE or self.pipeline not in PIPELINES:
            raise ValueError(f"recompute={self.recompute!r}, pipeline={self.pipeline!r}")
        return self


TERMS = ("compute", "mtp", "recompute", "sm", "ep_ib", "ep_nvl", "tp", "pp")


@dataclass
class Terms:
    """Seconds per micro-batch on one stage; ep_ib/ep_nvl/pp are the exposed parts."""

    compute: float = 0.0
    mtp: float = 0.0
    recompute: float = 0.0
    sm: float = 0.0
    ep_ib: float = 0.0
    ep_nvl: float = 0.0
    tp: float = 0.0
    pp: float = 0.0
    ep_raw: float = 0.0  # all-to-all time before hiding
    pp_raw: float = 0.0
    ep_bytes: float = 0.0  # sent by one GPU per micro-batch (IB + NVLink)
    ep_ib_bytes: float = 0.0
    pp_bytes: float = 0.0
    flops: float = 0.0  # per GPU per micro-batch, recomputation included
    fp8_flops: float = 0.0

    @property
    def slot(self) -> float:
        return sum(getattr(self, t) for t in TERMS)


def _block_flops(cfg: ModelConfig, i: int, seq_len: int) -> tuple[float, float]:
    """(projection FLOPs, BF16 FLOPs: attention + router) per token, forward + backward, of block i."""
    router = cfg.n_routed_experts * cfg.dim if cfg.is_moe_layer(i) else 0
    return 6 * (block_params(cfg, i).activated - router), 6 * router + attention_flops_per_token(cfg, seq_len)


def _recompute_flops(cfg: ModelConfig, i: int, seq_len: int, mode: str) -> tuple[float, float]:
    """Extra (projection, BF16) FLOPs per token of block i's recomputation under `mode`."""
    if mode == "full":
        lin, bf = _block_flops(cfg, i, seq_len)
        return lin / 3, bf / 3
    if mode == "none":
        return 0.0, 0.0
    H = cfg.n_heads
    up = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # wkv_b
    if cfg.q_lora_rank:
        up += cfg.q_lora_rank * H * cfg.qk_head_dim  # wq_b
    lin = 2 * up
    if mode == "mla_up+mlp" and not cfg.is_moe_layer(i):
        lin += 2 * 3 * cfg.dim * cfg.inter_dim
    return lin, 0.0


def stage_terms(cfg: ModelConfig, cluster: ClusterConfig, ids: list[int], *, first: bool, last: bool,
                micro_tokens: int, seq_len: int, sched: Schedule, efficiency: float, fp8: bool, ep: int,
                act_bytes: int = 2, pp: int = 1, pp_over_ib: bool = True) -> Terms:
    """The terms of one stage holding blocks `ids` (ids ≥ n_layers are MTP blocks) per micro-batch."""
    sched.check()
    D, V = cfg.dim, cfg.vocab_size
    t = Terms()
    T = micro_tokens / sched.tp  # tokens per GPU (sequence parallel inside the TP group)
    bf_rate = cluster.peak_bf16_tflops * 1e12 * efficiency
    f8_rate = (cluster.peak_fp8_tflops or cluster.peak_bf16_tflops) * 1e12 * efficiency if fp8 else bf_rate
    if act_bytes == 4:  # FP32 tensor-core rate is half of BF16 at best
        bf_rate = f8_rate = bf_rate / 2
    main = [i for i in ids if i < cfg.n_layers]
    mtp = [i for i in ids if i >= cfg.n_layers]

    def seconds(lin: float, bf: float) -> float:
        return (lin * T / f8_rate + bf * T / bf_rate) if bf_rate else 0.0

    lin = bf = 0.0
    for i in main:
        a, b = _block_flops(cfg, i, seq_len)
        lin, bf = lin + a, bf + b
    if last:
        bf += 6 * V * D  # output head
    t.compute = seconds(lin, bf)
    mlin = mbf = 0.0
    for i in mtp:
        a, b = _block_flops(cfg, i, seq_len)
        mlin, mbf = mlin + a + 6 * 2 * D * D, mbf + b + 6 * V * D  # + eh_proj, + its pass through the head
    t.mtp = seconds(mlin, mbf)
    rlin = rbf = 0.0
    for i in ids:
        a, b = _recompute_flops(cfg, i, seq_len, sched.recompute)
        rlin, rbf = rlin + a, rbf + b
    t.recompute = seconds(rlin, rbf)
    t.flops = (lin + bf + mlin + mbf + rlin + rbf) * T
    t.fp8_flops = (lin + mlin + rlin) * T if fp8 else 0.0
    # --- expert parallelism
    n_moe = sum(1 for i in ids if cfg.is_moe_layer(i))
    if ep > 1 and n_moe:
        rpn = sched.ranks_per_node or cluster.gpus_per_node
        ib_rows, nvl_rows = ep_rows_per_token(cfg, ep, rpn, sched.hierarchical)
        disp = FP8_BYTES if fp8 and sched.fp8_dispatch else act_bytes
        per_row = sum(row_bytes(D, disp, act_bytes, sched.recompute == "full").values())
        ib_b = n_moe * T * ib_rows * per_row
        nvl_b = n_moe * T * nvl_rows * per_row
        t.ep_ib_bytes, t.ep_bytes = ib_b, ib_b + nvl_b
        t_ib, t_nvl = _link(ib_b, cluster.ib_gbps), _link(nvl_b, cluster.nvlink_gbps)
        raw = max(t_ib, t_nvl) if sched.links_concurrent else t_ib + t_nvl
        # no more can hide than there is compute to hide behind
        hidden = min(raw * sched.ep_hide, t.compute + t.mtp + t.recompute)
        keep = 1 - hidden / raw if raw else 1.0
        if sched.links_concurrent:  # the slower link sets the time; attributed to it
            t.ep_raw = max(t_ib, t_nvl)
            t.ep_ib, t.ep_nvl = (t.ep_raw * keep, 0.0) if t_ib >= t_nvl else (0.0, t.ep_raw * keep)
        else:
            t.ep_raw = t_ib + t_nvl
            t.ep_ib, t.ep_nvl = t_ib * keep, t_nvl * keep
    # --- tensor parallelism: all-gather + reduce-scatter around attention and dense MLPs, forward and backward
    if sched.tp > 1:
        n_coll = sum(4 + (0 if cfg.is_moe_layer(i) else 4) for i in ids)
        t.tp = _link(n_coll * (sched.tp - 1) / sched.tp * micro_tokens * D * act_bytes, cluster.nvlink_gbps)
    # --- pipeline: activations forward, their gradients backward, once per virtual chunk
    if pp > 1:
        t.pp_bytes = T * D * act_bytes * sched.vp * ((0 if last else 1) + (0 if first else 1))
        t.pp_raw = _link(t.pp_bytes, cluster.ib_gbps if pp_over_ib else cluster.nvlink_gbps)
        t.pp = t.pp_raw * (1 - sched.pp_hide)
    # --- SMs held by communication kernels
    busy = t.compute + t.mtp + t.recompute
    if sched.comm_sms and cluster.sms:
        f = sched.comm_sms / cluster.sms
        overlapped = busy if sched.sm_always else min(busy, (t.ep_raw - t.ep_ib - t.ep_nvl) + (t.pp_raw - t.pp))
        t.sm = overlapped * f / (1 - f)
    return t


def dualpipe_devices(stages: list[Terms]) -> list[Terms]:
    """DualPipe runs two pipelines in opposite directions over the same GPUs: GPU i holds stage i
    of one and stage pp − 1 − i of the other (the report, §3.2.1 and §3.4: the embedding and the
    output head on the same rank), and half the micro-batches take each, so per micro-batch a GPU
    spends the mean of the two stages' terms."""
    pp = len(stages)
    out = []
    for i in range(pp):
        a, b = stages[i], stages[pp - 1 - i]
        out.append(Terms(**{f: (getattr(a, f) + getattr(b, f)) / 2 for f in Terms.__dataclass_fields__}))
    return out


def bubble_slots(sched: Schedule, pp: int) -> float:
    if pp <= 1:
        return 0.0
    if sched.pipeline == "interleaved":
        return (pp - 1) / sched.vp
    if sched.pipeline == "dualpipe":  # (PP/2 − 1)(F&B + B − 3W): F&B = F + B, B = 2F, W = F; a slot is F + B = 3F
        return (pp / 2 - 1) * 2 / 3
    return pp - 1


@dataclass
class Timing:
    """A step: m slots of the slowest stage, the bubble, exposed DP; `per_step` splits it by term."""

    step_s: float
    tokens_per_s_per_gpu: float
    m: int
    bubble_slots: float
    slowest: Terms
    stages: list[Terms]
    dp_s: float  # exposed
    per_step: dict[str, float] = field(default_factory=dict)

    @property
    def bubble(self) -> float:
        return self.bubble_slots / (self.m + self.bubble_slots)


def step_timing(stages: list[Terms], *, m: int, sched: Schedule, pp: int, tokens_per_gpu: float,
                dp_s: float = 0.0) -> Timing:
    """Combine per-stage terms into a step. `tokens_per_gpu`: tokens per step / world."""
    if sched.pipeline == "dualpipe":
        stages = dualpipe_devices(stages)
    slowest = max(stages, key=lambda q: q.slot)
    slots = bubble_slots(sched, pp)
    dp = dp_s * (1 - sched.dp_hide)
    step = (m + slots) * slowest.slot + dp
    # By term: the average stage's terms over the m slots, what the slowest stage adds to that
    # ("imbalance"), the bubble and DP; they add up to the step. (The slowest stage alone would
    # book, say, the MTP block and both heads of the last stage as if every stage ran them.)
    per_step = {name: m * sum(getattr(q, name) for q in stages) / len(stages) for name in TERMS}
    per_step["imbalance"] = m * slowest.slot - sum(per_step.values())
    per_step["bubble"] = slots * slowest.slot
    per_step["dp"] = dp
    return Timing(step, tokens_per_gpu / step if step else 0.0, m, slots, slowest, stages, dp, per_step)


def _link(nbytes: float, gbps: float) -> float:
    return nbytes / (gbps * 1e9) if nbytes > 0 and gbps > 0 else 0.0
