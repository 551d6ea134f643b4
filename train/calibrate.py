"""The planner against published runs: fit its one efficiency on one run, predict the other.

`python -m train.plan --calibrate` prints the table. Direction, chosen before the numbers were
seen: calibrate on Megatron-Core's H100 benchmark (a steady-state measurement with a recipe
that states every setting) and predict DeepSeek's H800 run (a whole-run average, and a
schedule, DualPipe, that moeforge does not have).

Each run is described as it was published, in the time model's own terms (train/timing.py);
neither has to be a layout moeforge's trainer can run:
- Megatron-Core / NeMo, DeepSeek-V3 on 1,024 H100, FP8: 1,297 tokens/s/GPU, 338 model TFLOP/s/GPU,
  and 330 with DeepSeek's own quantisation granularity (128×128 weights, 1×128 activations).
  NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md, 25.09 container, DGX-H100 table:
  GBS 8192, MBS 1, seq 4096, TP 2, PP 8, CP 1, VP 4, EP 64, GA 128. The recipe that produced it
  is scripts/performance/run_script.py at the commit that published the figure (ea2990630,
  2025-10-10; the same on branch r0.1.0), DeepSeek-V3 on H100: DeepEP dispatcher with
  moe_router_force_load_balancing, overlap_moe_expert_parallel_comm and delay_wgrad_compute on
  (the all-to-all of one micro-batch under another's compute in the combined 1F1B schedule),
  shared-expert overlap off, recompute_modules [mla_up_proj, mlp], overlap_grad_reduce off,
  layout "Et|(tt|)*30mL" (embedding + block 0, then two blocks per virtual stage, MTP and loss
  last). (The workload config stored later, with HybridEP and the overlap off, is a 2026 change
  that the 25.09 figure did not run.) Modelled so: the all-to-all hidden (fraction 1, the same
  claim as DualPipe's), DeepEP's 20 SMs held while it runs (its default), BF16 dispatch,
  pipeline sends overlapped (VP). The fit uses the 330 figure, 1,297 × 330 / 338 tokens/s,
  because the run it predicts used that granularity. Tensor parallelism, which moeforge lacks,
  is modelled as that layout has it: every GEMM split over the 2 GPUs (sequence parallel; the
  experts, at expert-TP 1, see half the tokens each), plus an all-gather and a reduce-scatter of
  the hidden state around attention and dense MLPs, forward and backward, over NVLink, not
  hidden. Gradient reduction is taken as hidden, as before (its exposed share is ~0.3%).
- DeepSeek-V3 on 2,048 H800: 14.8T tokens in 2.664M GPU-hours (report §1, Table 1) =
  1,543 tokens/s/GPU averaged over the whole pre-training, restarts and evaluations included.
  Layout (§3.1, §3.2, §4.2): PP 16, EP 64 over 8 nodes, ZeRO-1, no TP, DualPipe, 20 of 132 SMs
  for communication, node-limited routing (M = 4), FP8 GEMMs and FP8 dispatch, BF16 combine,
  batch 15,360 × 4,096 (its final value; the ramp from 3,072 over the first 469B tokens is not
  modelled), MTP depth 1, recomputation of RMSNorm and the MLA up-projections. DualPipe, which
  moeforge lacks, is modelled by what the report claims for it: all communication hidden
  (fraction 1, a stated assumption), the SMs held for it all the time, and its bubble
  ((PP/2 − 1)(F&B + B − 3W) from the report's Table 2: (PP/2 − 1)·2/3 slots, instead of 1F1B's
  PP − 1); each GPU holds stage i and stage PP − 1 − i of
  the two directions, so it spends the mean of the two per micro-batch, and the split balances
  those pairs (`dualpipe_stages`; the report does not give its split).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.config import ModelConfig

from .cluster import ClusterConfig
from .timing import Schedule, Timing, stage_terms, step_timing

MEGATRON_SOURCE = ("github.com/NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md (25.09, DGX-H100: "
                   "DeepSeekV3 1024 GPUs, GBS 8192, TP 2, PP 8, VP 4, EP 64: 1297 tokens/s/GPU, 338 (330) TFLOP/s/GPU); "
                   "recipe: scripts/performance/run_script.py at ea2990630")
# The same run with DeepSeek's 128×128 / 1×128 FP8 granularity: 330 of the 338 TFLOP/s.
MEGATRON_TOKENS_PER_S = 1297.0 * 330 / 338
DEEPSEEK_SOURCE = "DeepSeek-V3 technical report §1 Table 1 (2.664M H800 GPU-hours, 14.8T tokens), §3.1-3.3, §4.2"
DEEPSEEK_TOKENS_PER_S = 14.8e12 / (2.664e6 * 3600)  # 1,543


@dataclass
class PublishedRun:
    name: str
    cluster: str  # conf/cluster/<name>.yaml
    world: int
    pp: int
    ep: int
    global_batch: int
    seq_len: int
    stages: list[list[int]]  # block ids per GPU stage (virtual stages merged); ids >= n_layers: MTP
    sched: Schedule
    tokens_per_s: float  # published, per GPU
    source: str
    layout: str
    micro_batch: int = 1
    fp8: bool = True

    @property
    def dp(self) -> int:
        return self.world // (self.sched.tp * self.pp)

    @property
    def m(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)


def megatron_stages(cfg: ModelConfig, pp: int, vp: int) -> list[list[int]]:
    """pp_layout "Et|(tt|)*30mL": block 0, then pairs, then MTP; virtual stage v on GPU stage v % pp."""
    mtp = [cfg.n_layers + k for k in range(cfg.n_mtp_layers)]
    chunks = [[0]] + [[i, i + 1] for i in range(1, cfg.n_layers, 2)] + [mtp]
    if len(chunks) != pp * vp:
        raise ValueError(f"{len(chunks)} virtual stages for pp {pp} × vp {vp}")
    return [sum(chunks[s::pp], []) for s in range(pp)]


def dualpipe_stages(cfg: ModelConfig, pp: int, seq_len: int) -> list[list[int]]:
    """Contiguous stages whose DualPipe pairs (stage i with stage pp − 1 − i) balance the modelled
    compute time; MTP and the heads on the last stage. The report does not give DeepSeek's split:
    this one tries 0-5 blocks on each end stage and splits the rest evenly in time."""
    from parallel.pipeline import balanced_stages

    c = ClusterConfig(peak_bf16_tflops=1.0, peak_fp8_tflops=2.0)  # only the FP8 : BF16 ratio matters
    L, mtp = cfg.n_layers, [cfg.n_layers + k for k in range(cfg.n_mtp_layers)]

    def cost(ids: list[int], last: bool = False) -> float:
        t = stage_terms(cfg, c, ids, first=False, last=last, micro_tokens=seq_len, seq_len=seq_len,
                        sched=Schedule(), efficiency=1.0, fp8=True, ep=1)
        return t.compute + t.mtp

    block = [cost([i]) for i in range(L)]
    best = None
    for head in range(1, 6):
        for tail in range(0, 6):
            mid = balanced_stages([0.0] + block[head:L - tail] + [0.0], pp - 2)
            stages = [list(range(head))] + [list(range(head + a, head + b)) for a, b in zip(mid, mid[1:])] \
                + [list(range(L - tail, L)) + mtp]
            costs = [sum(block[i] for i in st if i < L) for st in stages]
            costs[-1] += cost(mtp, last=True)
            worst = max(costs[i] + costs[pp - 1 - i] for i in range(pp))
            if best is None or worst < best[0]:
                best = (worst, stages)
    return best[1]


def published_runs(cfg: ModelConfig) -> dict[str, PublishedRun]:
    megatron = PublishedRun(
        "Megatron-Core", "h100", 1024, pp=8, ep=64, global_batch=8192, seq_len=4096,
        stages=megatron_stages(cfg, 8, 4),
        sched=Schedule(tp=2, vp=4, pipeline="interleaved", recompute="mla_up+mlp", ep_hide=1.0, pp_hide=1.0,
                       dp_hide=1.0, comm_sms=20, hierarchical=True, ranks_per_node=8, links_concurrent=True,
                       fp8_dispatch=False),
        tokens_per_s=MEGATRON_TOKENS_PER_S, source=MEGATRON_SOURCE,
        layout="TP2 PP8×VP4 EP64 (8 nodes), GBS 8192, FP8, a2a overlapped")
    deepseek = PublishedRun(
        "DeepSeek-V3", "h800", 2048, pp=16, ep=64, global_batch=15360, seq_len=4096,
        stages=dualpipe_stages(cfg, 16, 4096),
        sched=Schedule(pipeline="dualpipe", recompute="mla_up", ep_hide=1.0, pp_hide=1.0, dp_hide=1.0,
                       comm_sms=20, sm_always=True, hierarchical=True, ranks_per_node=8, links_concurrent=True),
        tokens_per_s=DEEPSEEK_TOKENS_PER_S, source=DEEPSEEK_SOURCE,
        layout="PP 16 DualPipe, EP 64 (8 nodes), GBS 15360, FP8, 20/132 SMs")
    return {"megatron": megatron, "deepseek": deepseek}


def cluster_of(name: str, world: int) -> ClusterConfig:
    from .config import compose, to_config

    c = to_config(compose([f"cluster={name}"])).cluster
    return replace(c, nodes=max(1, world // c.gpus_per_node)).validate()


def predict(cfg: ModelConfig, run: PublishedRun, efficiency: float, cluster: ClusterConfig | None = None) -> Timing:
    """The time model on a published run's layout with `efficiency`."""
    c = cluster or cluster_of(run.cluster, run.world)
    terms = [stage_terms(cfg, c, ids, first=s == 0, last=s == run.pp - 1, micro_tokens=run.micro_batch * run.seq_len,
                         seq_len=run.seq_len, sched=run.sched, efficiency=efficiency, fp8=run.fp8, ep=run.ep,
                         pp=run.pp) for s, ids in enumerate(run.stages)]
    return step_timing(terms, m=run.m, sched=run.sched, pp=run.pp,
                       tokens_per_gpu=run.global_batch * run.seq_len / run.world)


def fit_efficiency(cfg: ModelConfig, run: PublishedRun) -> float:
    """The efficiency at which the model reproduces `run`'s tokens/s (bisection; monotone in efficiency)."""
    c = cluster_of(run.cluster, run.world)
    lo, hi = 1e-3, 1.0
    if predict(cfg, run, hi, c).tokens_per_s_per_gpu < run.tokens_per_s:
        raise ValueError(f"{run.name}: {run.tokens_per_s:.0f} tokens/s/GPU is out of reach even at 100% of peak")
    for _ in range(80):
        mid = (lo + hi) / 2
        if predict(cfg, run, mid, c).tokens_per_s_per_gpu < run.tokens_per_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


@dataclass
class Calibration:
    efficiency: float
    rows: list[tuple[PublishedRun, Timing, bool]]  # (run, predicted timing, used for the fit)


def calibrate(cfg: ModelConfig, fit_on: str = "megatron") -> Calibration:
    runs = published_runs(cfg)
    eff = fit_efficiency(cfg, runs[fit_on])
    return Calibration(eff, [(run, predict(cfg, run, eff), key == fit_on) for key, run in runs.items()])


def error(run: PublishedRun, t: Timing) -> float:
    return t.tokens_per_s_per_gpu / run.tokens_per_s - 1


# ------------------------------------------------------------------ the report
# moeforge's DeepSeek-V3 run: the report's batch, sequence and precision, stages cut by FLOPs.
V3_ON_H800 = ["model=671b", "cluster=h800", "cluster.nodes=256", "trainer.global_batch_size=15360",
              "trainer.seq_len=4096", "fp8=te", "parallel.partition=flops"]
TERM_NAMES = {"compute": "compute (GEMMs + attention)", "mtp": "MTP block and head", "recompute": "recomputation",
              "sm": "SMs held by communication", "ep_ib": "exposed all-to-all, IB", "ep_nvl": "exposed all-to-all, NVLink",
              "tp": "tensor parallel", "pp": "exposed pipeline sends", "imbalance": "stage imbalance",
              "bubble": "pipeline bubble", "dp": "exposed DP gradients"}


def per_token_us(t: Timing, tokens_per_gpu: float) -> dict[str, float]:
    """Each term of a step in microseconds per token per GPU (they add up to 1e6 / tokens/s)."""
    return {k: v / tokens_per_gpu * 1e6 for k, v in t.per_step.items()}


def report(top: int = 5) -> str:
    from .config import compose, to_config
    from .plan import describe_search, search

    cfg = to_config(compose(V3_ON_H800))
    model = cfg.model
    cal = calibrate(model)
    out = [f"efficiency fitted on Megatron-Core (fraction of the FP8/BF16 peak the FLOPs reach): {cal.efficiency:.3f}", "",
           f"{'run':<14} {'hardware':<12} {'layout':<58} {'published':>9} {'predicted':>9} {'error':>7}"]
    for run, t, fitted in cal.rows:
        hw = f"{run.world} {run.cluster.upper()}"
        out.append(f"{run.name:<14} {hw:<12} {run.layout:<58} {run.tokens_per_s:9,.0f} "
                   f"{t.tokens_per_s_per_gpu:9,.0f} {error(run, t):+7.1%}{'  (fitted)' if fitted else ''}")
    out += ["", "sources: " + MEGATRON_SOURCE, "         " + DEEPSEEK_SOURCE, ""]
    cfg.cluster = replace(cfg.cluster, efficiency=cal.efficiency)
    found, _ = search(cfg, cfg.cluster.world, top)
    out += ["moeforge on 2,048 H800 (node-aware dispatch, FP8 dispatch, overlap modes; fitted efficiency):",
            describe_search(found, cfg.cluster.world), ""]
    if not found:
        return "\n".join(out + ["no moeforge layout fits"])
    best = found[0]
    ds_run, ds = next((r, t) for r, t, _ in cal.rows if r.name == "DeepSeek-V3")
    ours = per_token_us(best.timing, best.setup.global_batch * best.setup.seq_len / best.setup.world)
    theirs = per_token_us(ds, ds_run.global_batch * ds_run.seq_len / ds_run.world)
    s = best.setup
    out += [f"term by term, µs per token per GPU: moeforge's best (pp {s.pp}, ep {s.ep}, recompute "
            f"{s.recompute_interval}, overlap {s.overlap}) against DeepSeek-V3 as modelled (same efficiency)",
            f"{'term':<30} {'moeforge':>9} {'DeepSeek':>9} {'gap':>8}"]
    for k in ours:
        if ours[k] > 0.005 or theirs[k] > 0.005:
            out.append(f"{TERM_NAMES[k]:<30} {ours[k]:9.1f} {theirs[k]:9.1f} {ours[k] - theirs[k]:+8.1f}")
    a, b = sum(ours.values()), sum(theirs.values())
    out.append(f"{'total':<30} {a:9.1f} {b:9.1f} {a - b:+8.1f}")
    out.append(f"{'tokens/s per GPU':<30} {1e6 / a:9,.0f} {1e6 / b:9,.0f}   (DeepSeek published: {ds_run.tokens_per_s:,.0f})")
    return "\n".join(out)
