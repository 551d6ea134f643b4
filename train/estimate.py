"""Memory, time and communication of one layout, from the config alone (for `python -m train.plan`).

Three estimators were read. torchtitan (scripts/estimate/estimation.py) runs the real model
under FakeTensorMode with a memory tracker: exact for what it builds, but it needs the model
built at its real size. DeepSpeed's `estimate_zero2_model_states_mem_needs` books 2 + 18/N
bytes per parameter (BF16 weights; BF16 and FP32 gradients, FP32 master and moments over N),
model states only. Followed: Megatron-LM's `theoretical_memory_usage.py` for the structure —
bytes per parameter for weights and optimizer state on the most loaded pipeline shard,
activations per layer times the micro-batches in flight under 1F1B (min(m, pp) on the first
stage) — and the ZeRO paper's accounting of model states (Rajbhandari et al. 2020, §3: 2Ψ
weights + 2Ψ gradients + KΨ optimizer state, the last divided by dp at stage 1, gradients too
at stage 2). Not Megatron's formulas: its per-layer `sbh(34 + 5as/h)` describes a GPT layer
with dropout, and ours is MLA + DeepSeekMoE, so activations are counted tensor by tensor from
what autograd keeps for backward in model/ (`block_activations`). The model states follow what
moeforge's DeepSpeed setup actually holds (checked against the trainer in
tests/integration/test_plan_cli.py):

- weights and `.grad` in the compute dtype, full size (ZeRO-2 frees `.grad` into partitions);
- FP32 with ZeRO ≥ 1: DeepSpeed's FP32 master partition (ZeRO-1/2 copy even FP32 weights into
  their flat partition) and an FP32 copy of the gradient partition of the parameter group
  being updated — one group at a time, measured, where DeepSpeed's own estimator books all
  groups at once; an FP32 run without ZeRO has neither — the weights are the master;
- BF16 (FP32 gradient accumulation, parallel/engine.py): at ZeRO 0 or 1 DeepSpeed's
  BF16_Optimizer, an FP32 master partition and full-size FP32 gradient accumulators beside the
  BF16 `.grad`; at ZeRO-2 FP32 master and gradient partitions (`.grad` freed into them);
- two FP32 Adam moments (moeforge's AdamW keeps them in FP32; DeepSeek-V3 §3.3 kept them in
  BF16, which the trainer does not do), partitioned like the master;
- dense (non-expert) states shard over dp, expert states over the expert-data-parallel group
  (dp / ep), the experts themselves over ep. The ZeRO stage is the one DeepSpeed runs
  (`Layout.zero_stage`: none at dp = 1, at least 1 in bf16).

Time: train/timing.py, term by term (compute, MTP, recomputation, SMs held by communication,
exposed IB and NVLink all-to-all after the measured overlap of the configured mode, PP, DP,
the 1F1B bubble), with the efficiency `python -m train.plan --calibrate` fits on a published run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from model.config import ModelConfig
from model.flops import block_params, flops_per_token, param_counts
from parallel.topology import Layout

from .cluster import ClusterConfig
from .timing import (FP8_BYTES, MEASURED_OVERLAP, NCCL_OVERLAP_SMS, Schedule, Timing, overlap_mode, stage_terms,
                     step_timing)

GIB = 2**30


@dataclass
class Setup:
    """Everything a plan depends on besides the model and the cluster."""

    layout: Layout
    zero_stage: int = 1  # parallel.zero_stage, as configured
    micro_batch: int = 1
    global_batch: int = 1
    seq_len: int = 4096
    recompute_interval: int = 0  # parallel.activation_checkpoint_interval
    fp8: bool = False
    dtype: str = "bf16"  # compute precision: bf16 | fp32
    stage_bounds: list[int] = field(default_factory=list)  # block boundaries [0, …, n_layers]
    moe_overlap: bool = False  # parallel.moe_overlap: shared experts while the dispatch is in flight
    moe_chunks: int = 1  # parallel.moe_chunks: 2 = two-chunk all-to-all / expert overlap
    ep_ranks_per_node: int = 0  # parallel.ep_ranks_per_node; 0 = cluster.gpus_per_node
    hierarchical: bool = True  # node-aware dispatch (one IB copy per destination node)
    fp8_dispatch: bool = True  # parallel.fp8_dispatch: with fp8 on, dispatched rows travel as E4M3 + scales

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def edp(self) -> int:
        return self.layout.edp

    @property
    def grad_accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def effective_zero(self) -> int:
        """The ZeRO stage DeepSpeed runs (`Layout.zero_stage`)."""
        return self.layout.zero_stage(self.zero_stage, bf16=self.dtype == "bf16")

    @property
    def act_bytes(self) -> int:
        return 2 if self.dtype == "bf16" else 4

    @property
    def overlap(self) -> str:
        return overlap_mode(self.moe_overlap, self.moe_chunks)

    def schedule(self, cluster: ClusterConfig) -> Schedule:
        """How moeforge runs this layout: DeepSpeed's 1F1B, full block recomputation when
        configured, the all-to-all hidden by the measured fraction of its overlap mode, NCCL's SMs
        taken from the GEMMs only while it overlaps them; PP and DP by `cluster.comm_overlap`."""
        hide = MEASURED_OVERLAP[self.overlap]
        return Schedule(recompute="full" if self.recompute_interval > 0 else "none", ep_hide=hide,
                        pp_hide=cluster.comm_overlap, dp_hide=cluster.comm_overlap,
                        comm_sms=NCCL_OVERLAP_SMS if hide > 0 else 0, hierarchical=self.hierarchical,
                        ranks_per_node=self.ep_ranks_per_node or cluster.gpus_per_node,
                        fp8_dispatch=self.fp8_dispatch)


@dataclass
class StagePlan:
    stage: int
    blocks: tuple[int, int]  # [first, last) block ids
    dense_params: int  # non-expert parameters held by one GPU of this stage
    expert_params: int  # expert parameters held by one GPU (already / ep)
    weights: float = 0.0  # bytes, per GPU
    grads: float = 0.0
    master: float = 0.0
    moments: float = 0.0
    act_no_recompute: float = 0.0
    act_recompute: float = 0.0  # full recomputation of every block (interval 1)
    activations: float = 0.0  # under the configured setting
    all_to_all: float = 0.0
    pipe_buffers: float = 0.0
    reserved: float = 0.0
    flops_per_micro: float = 0.0
    fp8_flops_per_micro: float = 0.0
    t_compute: float = 0.0  # seconds per micro-batch
    t_ep: float = 0.0
    t_pp: float = 0.0
    ep_bytes: float = 0.0  # per micro-batch, sent by one GPU
    pp_bytes: float = 0.0

    @property
    def terms(self) -> dict[str, float]:
        return {"weights": self.weights, "gradients": self.grads, "master weights": self.master,
                "Adam moments": self.moments, "activations": self.activations, "all-to-all buffers": self.all_to_all,
                "pipeline buffers": self.pipe_buffers, "reserved": self.reserved}

    @property
    def total(self) -> float:
        return sum(self.terms.values())


@dataclass
class Plan:
    setup: Setup
    cluster: ClusterConfig
    stages: list[StagePlan]
    bubble: float
    step_s: float | None
    tokens_per_s_per_gpu: float | None
    mfu: float | None
    ep_bytes_step: float  # per GPU per step (largest stage)
    pp_bytes_step: float
    dp_bytes_step: float
    t_dp: float
    timing: Timing | None = None

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.total)

    @property
    def memory(self) -> float:
        return self.cluster.gpu_memory_gib * GIB

    @property
    def fits(self) -> bool:
        return self.worst.total <= self.memory


# ------------------------------------------------------------------ pieces
def distinct_ranks_per_token(n_experts: int, top_k: int, ep: int) -> float:
    """Expected EP ranks a token is sent to under uniform routing: moeforge's dispatcher sends one
    copy per (token, destination rank), not per (token, expert)."""
    if ep <= 1:
        return 1.0
    local = n_experts // ep
    miss = math.comb(n_experts - local, top_k) / math.comb(n_experts, top_k)
    return ep * (1.0 - miss)


def block_activations(cfg: ModelConfig, layer_id: int, ep: int) -> tuple[float, float, float]:
    """Elements per token kept for backward by one block: (compute dtype, FP8-cacheable, FP32).

    Counted from what autograd keeps for model/'s plain-PyTorch modules (checked against a
    saved-tensor hook on the CPU, tests/unit/test_plan.py): each RMSNorm keeps its input, the
    normalised value and its output; SwiGLU keeps gate, up, silu(gate) and their product; the
    MoE keeps the permuted rows, the experts' SwiGLU and outputs, and the rows back in token
    order for the weighted sum. Attention is SDPA/flash: q, k, v (values zero-padded to the q/k
    head dim), output and log-sum-exp, no T×T scores. FP8-cacheable are the inputs of the FP8
    projections, which DeepSeek-V3 (§3.3.3) caches in FP8; FP32 are router scores and the
    log-sum-exp.
    """
    D, H = cfg.dim, cfg.n_heads
    qk = cfg.qk_head_dim
    keep = 4 * D  # attn_norm and ffn_norm: input and normalised value each
    fp8 = D  # attn_norm output: input of wq_a / wkv_a
    if cfg.q_lora_rank:
        keep += 2 * cfg.q_lora_rank  # q_norm input and normalised value
        fp8 += cfg.q_lora_rank  # q_norm output: input of wq_b
    keep += cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank  # wkv_a output (kv_norm input), normalised
    fp8 += cfg.kv_lora_rank  # kv_norm output: input of wkv_b
    keep += 4 * H * qk  # SDPA's q, k, v (padded to the q/k head dim) and output
    fp8 += H * cfg.v_head_dim  # attention output: input of wo
    fp32 = H  # log-sum-exp per head
    fp8 += D  # ffn_norm output: input of the MLP / experts / router
    if cfg.is_moe_layer(layer_id):
        F, k = cfg.moe_inter_dim, cfg.n_activated_experts
        fp32 += cfg.n_routed_experts  # router scores
        keep += 3 * F * cfg.n_shared_experts  # shared experts: gate, up, silu(gate)
        fp8 += F * cfg.n_shared_experts  # silu(gate) * up: input of w2
        copies = distinct_ranks_per_token(cfg.n_routed_experts, k, ep) if ep > 1 else k
        fp8 += copies * D  # rows received by the experts (one per token and rank, or per expert)
        keep += k * 2 * F + k * D  # per (token, expert): gate and up outputs, expert output
        fp8 += k * F  # silu(gate) * up: input of w2
        keep += copies * D  # rows back in token order (after the combine all-to-all) for the weighted sum
    else:
        keep += 3 * cfg.inter_dim  # gate, up, silu(gate)
        fp8 += cfg.inter_dim  # silu(gate) * up: input of w2
    if layer_id >= cfg.n_layers:  # MTP: enorm and hnorm (input, normalised, output), the concatenation
        keep += 6 * D + 2 * D
    return keep, fp8, fp32


def _block_bytes(cfg: ModelConfig, layer_id: int, s: Setup) -> float:
    keep, fp8, fp32 = block_activations(cfg, layer_id, s.ep)
    per_fp8 = FP8_BYTES if s.fp8 else s.act_bytes
    return keep * s.act_bytes + fp8 * per_fp8 + fp32 * 4


def _expert_params(cfg: ModelConfig, layer_id: int) -> int:
    return cfg.n_routed_experts * 3 * cfg.dim * cfg.moe_inter_dim if cfg.is_moe_layer(layer_id) else 0


def stage_layers(cfg: ModelConfig, bounds: list[int], stage: int) -> list[int]:
    """Block ids on `stage`; the last stage also runs the MTP blocks (ids n_layers…)."""
    ids = list(range(bounds[stage], bounds[stage + 1]))
    if stage == len(bounds) - 2:
        ids += [cfg.n_layers + k for k in range(cfg.n_mtp_layers)]
    return ids


# ------------------------------------------------------------------ plan
def plan(cfg: ModelConfig, cluster: ClusterConfig, s: Setup) -> Plan:
    """Per-stage memory, per-step time and communication of layout `s` on `cluster`."""
    D, V = cfg.dim, cfg.vocab_size
    T = s.micro_batch * s.seq_len  # tokens per micro-batch
    b = s.act_bytes
    m = max(1, s.grad_accum)
    zero = s.effective_zero
    bf16_optimizer = b == 2 and zero == 1  # DeepSpeed's BF16_Optimizer, partitioned like ZeRO-1
    gpn = cluster.gpus_per_node
    bounds = s.stage_bounds or [0, cfg.n_layers]
    k_eff = distinct_ranks_per_token(cfg.n_routed_experts, cfg.n_activated_experts, s.ep)
    sched = s.schedule(cluster)
    stages, stage_terms_ = [], []
    for st in range(s.pp):
        ids = stage_layers(cfg, bounds, st)
        first, last = st == 0, st == s.pp - 1
        dense = sum(block_params(cfg, i).total - _expert_params(cfg, i) for i in ids)
        expert = sum(_expert_params(cfg, i) for i in ids) // s.ep
        if first:
            dense += V * D  # embedding
        if last:
            dense += V * D + D  # head + final norm
            dense += cfg.n_mtp_layers * (2 * D + 2 * D * D + D)  # MTP enorm, hnorm, eh_proj, norm
            if s.pp > 1 and cfg.n_mtp_layers:
                dense += V * D  # the last stage's replica of the tied embedding (MTP embeds the next tokens)
        p = StagePlan(st, (bounds[st], bounds[st + 1]), dense, expert)
        # --- model states
        dshard = s.dp if zero >= 1 else 1
        eshard = s.edp if zero >= 1 else 1
        p.weights = b * (dense + expert)
        p.grads = b * (dense / (s.dp if zero == 2 else 1) + expert / (s.edp if zero == 2 else 1))
        opt_side = dense / dshard + expert / eshard
        if bf16_optimizer:  # full-size FP32 gradient accumulators beside the bf16 .grad (measured)
            p.master = 4 * opt_side
            p.grads += 4 * (dense + expert)
        elif b == 2:  # bf16 ZeRO-2: FP32 gradient partitions; .grad is freed into them (measured)
            p.master = 4 * opt_side
            p.grads = 4 * opt_side
        elif zero >= 1:
            p.master = 4 * opt_side
            # ZeRO-1/2 step one parameter group at a time, each with an FP32 copy of its gradient
            # partition: the larger of the dense and the expert partitions is alive at the peak
            # (measured: tests/integration/test_plan_cli.py).
            p.grads += 4 * max(dense / dshard, expert / eshard)
        p.moments = 2 * 4 * opt_side  # two FP32 moments
        # --- activations: micro-batches in flight on this stage under 1F1B
        in_flight = min(m, s.pp - st)
        per_micro = sum(_block_bytes(cfg, i, s) for i in ids) * T
        if last:
            heads = 1 + cfg.n_mtp_layers
            per_micro += heads * T * V * 4 + T * V * b  # FP32 log-softmax per head, one head's logits live
            per_micro += heads * T * D * b  # head inputs
        p.act_no_recompute = in_flight * per_micro
        biggest = max((_block_bytes(cfg, i, s) for i in ids), default=0.0) * T
        p.act_recompute = in_flight * len(ids) * T * D * b + biggest
        if last:
            p.act_recompute += T * V * (4 * (1 + cfg.n_mtp_layers) + b)
        k = s.recompute_interval
        if k > 0:
            windows = math.ceil(len(ids) / k)
            window = max(sum(_block_bytes(cfg, i, s) for i in ids[j:j + k]) for j in range(0, len(ids), k)) * T
            p.activations = in_flight * windows * T * D * b + window
            if last:
                p.activations += T * V * (4 * (1 + cfg.n_mtp_layers) + b)
        else:
            p.activations = p.act_no_recompute
        n_moe = sum(1 for i in ids if cfg.is_moe_layer(i))
        if s.ep > 1 and n_moe:
            p.all_to_all = 2 * T * k_eff * D * b  # send buffers of one layer's dispatch and combine
        if s.pp > 1:
            p.pipe_buffers = in_flight * T * 8 * 2 + 2 * T * D * b  # labels (+ positions), gradient send/recv
        p.reserved = cluster.reserved_gib * GIB
        # --- time per micro-batch (train/timing.py)
        terms = stage_terms(cfg, cluster, ids, first=first, last=last, micro_tokens=T, seq_len=s.seq_len,
                            sched=sched, efficiency=cluster.efficiency, fp8=s.fp8, ep=s.ep, act_bytes=b, pp=s.pp,
                            pp_over_ib=s.dp >= gpn)
        stage_terms_.append(terms)
        p.flops_per_micro, p.fp8_flops_per_micro = terms.flops, terms.fp8_flops
        p.t_compute = terms.compute + terms.mtp + terms.recompute + terms.sm
        p.t_ep, p.t_pp, p.ep_bytes, p.pp_bytes = terms.ep_raw, terms.pp_raw, terms.ep_bytes, terms.pp_bytes
        stages.append(p)
    # DP: ring all-reduce (or ZeRO's reduce-scatter + all-gather, the same volume) of each GPU's gradients
    worst_dp = max(stages, key=lambda q: q.dense_params + q.expert_params)
    dp_bytes = b * (2 * (s.dp - 1) / s.dp * worst_dp.dense_params
                    + (2 * (s.edp - 1) / s.edp * worst_dp.expert_params if s.edp > 1 else 0))
    t_dp = _link_time(dp_bytes, cluster.ib_gbps if s.dp > gpn else cluster.nvlink_gbps)
    timing = step_timing(stage_terms_, m=m, sched=sched, pp=s.pp, tokens_per_gpu=s.global_batch * s.seq_len / s.world,
                         dp_s=t_dp)
    step = tps = mfu = None
    if cluster.peak_bf16_tflops:
        step, tps = timing.step_s, timing.tokens_per_s_per_gpu
        mfu = flops_per_token(cfg, s.seq_len) * tps / (cluster.peak_bf16_tflops * 1e12)
    return Plan(s, cluster, stages, timing.bubble, step, tps, mfu, ep_bytes_step=m * max(q.ep_bytes for q in stages),
                pp_bytes_step=m * max(q.pp_bytes for q in stages), dp_bytes_step=dp_bytes, t_dp=t_dp,
                timing=timing if step else None)


def _link_time(nbytes: float, gbps: float) -> float:
    if nbytes <= 0:
        return 0.0
    return nbytes / (gbps * 1e9) if gbps > 0 else 0.0


def total_params(cfg: ModelConfig) -> int:
    return param_counts(cfg, include_mtp=True).total
