"""`python -m train.plan model=… cluster=… nodes=… parallel.pp=… parallel.ep=… [--search | --check]`
`python -m train.plan --calibrate`

What a layout needs before you book the GPUs: per GPU and per pipeline stage the weights,
gradients, master weights and FP32 Adam moments (by ZeRO stage and precision), the activations of
the micro-batch with and without recomputation (FP8-cached when fp8 is on), all-to-all and
pipeline buffers against the GPU's memory; the 1F1B bubble; the step time and tokens/s per GPU,
term by term (compute, MTP, recomputation, SMs held by communication, exposed IB and NVLink
all-to-all after the measured overlap of parallel.moe_overlap / parallel.moe_chunks, PP, DP,
stage imbalance, bubble); EP, PP and DP bytes per step.
The formulas and what they follow: train/estimate.py (memory), train/timing.py (time),
train/calibrate.py (the efficiency, fitted on a published run and checked on another).

Arguments are the trainer's Hydra overrides plus the planner's own keys:
  nodes=N            nodes of the cluster (= cluster.nodes); world = nodes × cluster.gpus_per_node
  gpus_per_node=G    (= cluster.gpus_per_node)
  top=K              --search: how many layouts to list (default 15)
  --search           list the feasible layouts (and all-to-all overlap modes) by estimated tokens/s per GPU
  --check            only check that the layout divides the world (launch scripts call this)
  --calibrate        fit the efficiency on Megatron-Core's DeepSeek-V3 H100 run, predict DeepSeek's
                     H800 run with it, then moeforge's best 671B layout on 2,048 H800 against
                     DeepSeek's, term by term (no other argument but top=K)
Exit codes: 0 fits, 1 does not fit (one line on stderr naming the excess and the largest
term), 2 a configuration mistake.
"""

from __future__ import annotations

import sys

from data.errors import EXIT_USER_ERROR, UserError
from model.config import ConfigError

from .estimate import GIB, Plan, Setup, plan, total_params
from .timing import ep_rows_per_token

EXIT_DOES_NOT_FIT = 1
OVERLAP_MODES = ((False, 1), (True, 1), (False, 2), (True, 2))  # (parallel.moe_overlap, parallel.moe_chunks)
PLAN_KEYS = {"nodes": "cluster.nodes", "gpus_per_node": "cluster.gpus_per_node"}


def parse(argv: list[str]) -> tuple[list[str], dict]:
    """Split the planner's own flags and keys from the Hydra overrides."""
    overrides, opts = [], {"search": False, "check": False, "calibrate": False, "top": 15}
    for arg in argv:
        key, eq, value = arg.partition("=")
        if arg in ("--search", "--check", "--calibrate"):
            opts[arg[2:]] = True
        elif arg.startswith("--"):
            raise ConfigError(f"{arg}: unknown option (--search, --check, --calibrate)")
        elif eq and key in PLAN_KEYS:
            overrides.append(f"{PLAN_KEYS[key]}={value}")
        elif eq and key == "top":
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(f"top={value!r}: must be a positive integer")
            opts["top"] = int(value)
        elif arg.startswith("hydra."):
            continue  # a launch script passes the trainer's run directory through
        else:
            overrides.append(arg)
    return overrides, opts


def load(overrides: list[str]):
    from .config import compose, to_config

    cfg = to_config(compose(overrides))
    cfg.cluster.validate()
    return cfg


def setup_of(cfg, world: int, **overrides) -> Setup:
    """The Setup of a config (pp, ep and the other Setup fields overridable for --search), stage
    bounds as the trainer cuts them."""
    from parallel.pipeline import balanced_stages, layer_costs
    from parallel.topology import Layout

    p, t = cfg.parallel, cfg.trainer
    # getattr: the dispatch keys are newer than some configs this reads
    values = dict(pp=p.pp, ep=p.ep, zero_stage=p.zero_stage, micro_batch=t.micro_batch_size,
                  recompute_interval=p.activation_checkpoint_interval,
                  moe_overlap=bool(getattr(p, "moe_overlap", False)), moe_chunks=int(getattr(p, "moe_chunks", 1)),
                  ep_ranks_per_node=int(getattr(p, "ep_ranks_per_node", 0)),
                  fp8_dispatch=bool(getattr(p, "fp8_dispatch", True)))
    values.update(overrides)
    layout = Layout(world, values.pop("pp"), values.pop("ep"))
    costs = list(p.layer_costs) or layer_costs(cfg.model, p.partition, t.seq_len)
    dtype = t.dtype if t.dtype != "auto" else cfg.cluster.dtype
    return Setup(layout, global_batch=t.global_batch_size, seq_len=t.seq_len, fp8=cfg.fp8.backend != "off",
                 dtype=dtype, stage_bounds=balanced_stages(costs, layout.pp), **values)


def check(cfg, world: int) -> None:
    """The trainer's own layout checks against `world` (ConfigError naming the values)."""
    from .config import check_layout

    c = cfg.cluster
    try:
        check_layout(cfg, world)
    except ConfigError as exc:
        raise ConfigError(f"{c.nodes} nodes × {c.gpus_per_node} GPUs = {world} processes: {exc}") from None


def gib(x: float) -> str:
    return f"{x / GIB:7.2f}"


def describe(pl: Plan, cfg) -> str:
    s, c = pl.setup, pl.cluster
    lines = [f"model {total_params(cfg.model) / 1e9:.2f}B parameters (with MTP) on {c.name}: "
             f"{c.nodes} nodes × {c.gpus_per_node} GPUs = {s.world}; pp={s.pp} dp={s.dp} ep={s.ep} "
             f"(expert-data-parallel {s.edp}), ZeRO-{s.effective_zero}, {s.dtype} weights, fp32 Adam moments, "
             f"fp8 {'on (projection inputs cached in FP8, dispatch in FP8)' if s.fp8 else 'off'}",
             f"batch: global {s.global_batch} × {s.seq_len} tokens, micro {s.micro_batch}, "
             f"{s.grad_accum} micro-batches per step per pipeline; recompute "
             f"{'every ' + str(s.recompute_interval) + ' blocks' if s.recompute_interval else 'off'}",
             "",
             "memory per GPU, GiB (activations: configured | no recompute | full recompute)"]
    head = (f"{'stage':>5} {'blocks':>9} {'params':>9} {'weights':>7} {'grads':>7} {'master':>7} {'moments':>7} "
            f"{'activ':>7} {'no-rc':>7} {'full-rc':>7} {'a2a':>7} {'pipe':>7} {'rsrvd':>7} {'total':>7}  of {c.gpu_memory_gib:g}")
    lines.append(head)
    for st in pl.stages:
        n = st.dense_params + st.expert_params
        params = f"{n / 1e9:8.2f}B" if n >= 1e9 else f"{n / 1e6:8.2f}M"
        lines.append(f"{st.stage:>5} {st.blocks[0]:>4}-{st.blocks[1] - 1:<4} {params} {gib(st.weights)} "
                     f"{gib(st.grads)} {gib(st.master)} {gib(st.moments)} {gib(st.activations)} "
                     f"{gib(st.act_no_recompute)} {gib(st.act_recompute)} {gib(st.all_to_all)} {gib(st.pipe_buffers)} "
                     f"{gib(st.reserved)} {gib(st.total)}  {'ok' if st.total <= pl.memory else 'OVER'}")
    lines.append("")
    lines.append(f"pipeline bubble (1F1B): {pl.bubble:.1%} = (pp-1)/(m+pp-1) with m = {max(1, s.grad_accum)}")
    lines.append(f"communication per GPU per step: EP {pl.ep_bytes_step / 1e9:.2f} GB, PP {pl.pp_bytes_step / 1e9:.3f} GB, "
                 f"DP {pl.dp_bytes_step / 1e9:.2f} GB (links: NVLink {c.nvlink_gbps:g} GB/s, IB {c.ib_gbps:g} GB/s per GPU)")
    if s.ep > 1:
        sched = s.schedule(c)
        ib, nvl = ep_rows_per_token(cfg.model, s.ep, sched.ranks_per_node, sched.hierarchical)
        lines.append(f"all-to-all: {'node-aware' if sched.hierarchical else 'flat'} dispatch, {ib:.2f} IB + {nvl:.2f} NVLink "
                     f"rows per token, dispatch {'FP8' if s.fp8 and s.fp8_dispatch else s.dtype.upper()}; overlap mode "
                     f"{s.overlap!r} hides {sched.ep_hide:.0%} (train/timing.py MEASURED_OVERLAP)")
    if pl.step_s is None:
        lines.append("time: cluster has no peak FLOP/s (cluster.peak_bf16_tflops = 0): no estimate")
    else:
        worst = max(pl.stages, key=lambda q: q.t_compute + q.t_ep + q.t_pp)
        lines.append(f"slowest stage per micro-batch: compute {worst.t_compute * 1e3:.1f} ms, EP {worst.t_ep * 1e3:.1f} ms "
                     f"before overlap, PP {worst.t_pp * 1e3:.1f} ms; DP per step {pl.t_dp:.2f} s")
        lines.append("step by term, s: " + ", ".join(f"{k} {v:.2f}" for k, v in pl.timing.per_step.items() if v > 5e-3))
        lines.append(f"estimated step {pl.step_s:.2f} s, {pl.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, "
                     f"MFU {pl.mfu:.1%} of BF16 peak (efficiency {c.efficiency:.0%} of "
                     f"{'FP8' if s.fp8 else 'BF16'} peak on the projections: `python -m train.plan --calibrate`)")
    return "\n".join(lines)


def does_not_fit(pl: Plan) -> str:
    w = pl.worst
    name, value = max(w.terms.items(), key=lambda kv: kv[1])
    s = pl.setup
    return (f"layout does not fit: stage {w.stage} needs {w.total / GIB:.1f} GiB of {pl.cluster.gpu_memory_gib:g} GiB "
            f"(over by {(w.total - pl.memory) / GIB:.1f} GiB); largest term: {name} {value / GIB:.1f} GiB "
            f"(parallel.pp={s.pp} parallel.ep={s.ep} parallel.zero_stage={s.zero_stage} "
            f"trainer.micro_batch_size={s.micro_batch})")


def search(cfg, world: int, top: int) -> tuple[list[Plan], Plan | None]:
    """Every layout the trainer accepts for `world`, with each all-to-all overlap mode at ep > 1:
    (feasible sorted by tokens/s, closest infeasible)."""
    from parallel.topology import Layout

    m, t = cfg.model, cfg.trainer
    feasible, closest = [], None
    for pp in [d for d in range(1, min(world, m.n_layers) + 1) if world % d == 0]:
        dp = Layout(world, pp).dp
        for ep in [e for e in range(1, dp + 1) if dp % e == 0 and m.n_routed_experts % e == 0]:
            if ep > 1 and m.n_layers <= m.n_dense_layers:
                continue
            for zero in ((1,) if pp > 1 else (1, 2)):
                for micro in (1, 2, 4, 8):
                    if t.global_batch_size % (micro * dp):
                        continue
                    for rc in ((0, 1) if pp > 1 else (0,)):
                        Layout(world, pp, ep).check(m, zero)
                        for overlap, chunks in (OVERLAP_MODES if ep > 1 else OVERLAP_MODES[:1]):
                            pl = plan(m, cfg.cluster, setup_of(cfg, world, pp=pp, ep=ep, zero_stage=zero,
                                                               micro_batch=micro, recompute_interval=rc,
                                                               moe_overlap=overlap, moe_chunks=chunks))
                            if pl.fits:
                                feasible.append(pl)
                            elif closest is None or pl.worst.total < closest.worst.total:
                                closest = pl
    feasible.sort(key=lambda q: -(q.tokens_per_s_per_gpu or 0.0))
    return feasible[:top], closest


def describe_search(found: list[Plan], world: int) -> str:
    lines = [f"feasible layouts on {world} GPUs, by estimated tokens/s per GPU:",
             f"{'pp':>4} {'dp':>5} {'ep':>4} {'edp':>4} {'zero':>4} {'micro':>5} {'recomp':>6} {'overlap':>7} "
             f"{'mem GiB':>8} {'bubble':>7} {'step s':>8} {'tok/s/GPU':>10}"]
    for pl in found:
        s = pl.setup
        step = f"{pl.step_s:8.2f}" if pl.step_s else "     n/a"
        tps = f"{pl.tokens_per_s_per_gpu:10,.0f}" if pl.tokens_per_s_per_gpu else "       n/a"
        lines.append(f"{s.pp:>4} {s.dp:>5} {s.ep:>4} {s.edp:>4} {s.effective_zero:>4} {s.micro_batch:>5} "
                     f"{s.recompute_interval:>6} {s.overlap:>7} {pl.worst.total / GIB:8.2f} {pl.bubble:7.1%} {step} {tps}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    try:
        overrides, opts = parse(argv)
        if opts["calibrate"]:
            if overrides or opts["search"] or opts["check"]:
                raise ConfigError("--calibrate takes no other argument but top=K: it plans fixed published layouts")
            from .calibrate import report

            print(report(opts["top"]))
            return 0
        cfg = load(overrides)
        world = cfg.cluster.world
        if opts["search"]:
            found, closest = search(cfg, world, opts["top"])
            if not found:
                detail = does_not_fit(closest) if closest else "no layout divides the world"
                print(f"error: no layout fits on {world} GPUs; closest: {detail}", file=sys.stderr)
                return EXIT_DOES_NOT_FIT
            print(describe_search(found, world))
            return 0
        check(cfg, world)
        if opts["check"]:
            from parallel.topology import Layout

            lay = Layout(world, cfg.parallel.pp, cfg.parallel.ep)
            print(f"ok: {world} processes = pp {lay.pp} × dp {lay.dp}; ep {lay.ep} inside dp "
                  f"(expert-data-parallel {lay.edp})")
            return 0
        pl = plan(cfg.model, cfg.cluster, setup_of(cfg, world))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(describe(pl, cfg))
    if not pl.fits:
        print(f"error: {does_not_fit(pl)}", file=sys.stderr)
        return EXIT_DOES_NOT_FIT
    return 0


if __name__ == "__main__":
    sys.exit(main())

