"""train/estimate.py: the planner's formulas on their own (the CLI and the check against the
trainer's real allocations are in tests/integration/test_plan_cli.py)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from model.config import ModelConfig
from model.flops import param_counts
from parallel.topology import Layout
from train.cluster import ClusterConfig
from train.estimate import GIB, Setup, distinct_ranks_per_token, plan
from train.plan import setup_of
from train.timing import (FP8_BYTES, MEASURED_OVERLAP, Schedule, bubble_slots, ep_rows_per_token, expected_units_hit,
                          row_bytes)


@pytest.fixture(scope="module")
def cfg():
    from train.config import compose, to_config

    return to_config(compose(["model=16b", "cluster=h800", "cluster.nodes=4", "trainer.seq_len=4096",
                              "trainer.global_batch_size=256", "trainer.micro_batch_size=1"]))


def test_distinct_ranks_per_token():
    assert distinct_ranks_per_token(64, 6, 1) == 1.0
    assert math.isclose(distinct_ranks_per_token(64, 6, 64), 6.0)  # one expert per rank: one copy per expert
    two = distinct_ranks_per_token(64, 6, 2)  # 1 - P(all six on one side) each side
    assert math.isclose(two, 2 * (1 - math.comb(32, 6) / math.comb(64, 6)))
    assert all(distinct_ranks_per_token(256, 8, ep) <= min(ep, 8) for ep in (2, 8, 64, 256))


@pytest.mark.parametrize("dp, requested, bf16, runs", [
    (1, 2, False, 0), (1, 1, False, 0),  # fp32 at dp = 1: nothing to partition, no ZeRO
    (4, 0, False, 0), (4, 1, False, 1), (4, 2, False, 2),  # fp32 at dp > 1: as configured
    (1, 2, True, 1), (1, 0, True, 1),  # bf16: BF16_Optimizer, stage 1, even at dp = 1
    (4, 0, True, 1), (4, 1, True, 1), (4, 2, True, 2),
])
def test_zero_stage_deepspeed_runs(dp, requested, bf16, runs):
    layout = Layout(world=dp)
    assert layout.zero_stage(requested, bf16) == runs
    setup = Setup(layout, zero_stage=requested, dtype="bf16" if bf16 else "fp32")
    assert setup.effective_zero == runs  # the planner's stage is the same rule


def test_bubble_and_in_flight_activations(cfg):
    s = setup_of(cfg, 32, pp=4, ep=8)
    assert s.grad_accum == 256 // 8 == 32
    p = plan(cfg.model, cfg.cluster, s)
    assert math.isclose(p.bubble, 3 / (32 + 3))
    # 1F1B: stage s holds min(m, pp - s) micro-batches; with m = 1 every stage holds one
    one = plan(cfg.model, cfg.cluster, dataclasses.replace(s, global_batch=8))
    for st, st1 in zip(p.stages, one.stages):
        assert math.isclose(st.act_no_recompute, (4 - st.stage) * st1.act_no_recompute, rel_tol=1e-9)


def test_zero_stages_shard_what_they_should(cfg):
    base = setup_of(cfg, 32, pp=1, ep=8)
    fp32 = dataclasses.replace(base, dtype="fp32")
    z1 = plan(cfg.model, cfg.cluster, dataclasses.replace(fp32, zero_stage=1)).stages[0]
    z2 = plan(cfg.model, cfg.cluster, dataclasses.replace(fp32, zero_stage=2)).stages[0]
    z0 = plan(cfg.model, cfg.cluster, dataclasses.replace(fp32, zero_stage=0)).stages[0]
    assert z1.weights == z2.weights == z0.weights
    assert z1.moments == z2.moments < z0.moments / 3  # dense over dp 32, experts over dp/ep 4
    assert z2.grads < z1.grads
    # bf16: stages 0 and 1 are both DeepSpeed's BF16_Optimizer (partitioned, full-size fp32
    # gradient accumulators); ZeRO-2 keeps only fp32 gradient partitions.
    b0, b1, b2 = (plan(cfg.model, cfg.cluster, dataclasses.replace(base, dtype="bf16", zero_stage=z)).stages[0]
                  for z in (0, 1, 2))
    assert b0 == b1 and b1.moments == z1.moments and b2.grads < b1.grads / 3
    # the experts are sharded over ep, the rest replicated: parameters per GPU add up to the model
    m = cfg.model
    total = z1.dense_params + z1.expert_params * 8
    assert total == param_counts(m, include_mtp=True).total


def test_stage_parameters_add_up_to_the_model(cfg):
    m = dataclasses.replace(cfg.model, n_mtp_layers=1)
    s = setup_of(cfg, 32, pp=4, ep=2)
    p = plan(m, cfg.cluster, s)
    held = sum(st.dense_params + st.expert_params * 2 for st in p.stages)
    assert held == param_counts(m, include_mtp=True).total + m.vocab_size * m.dim  # + the tied embedding replica


def test_recompute_and_fp8_caching_reduce_activations(cfg):
    s = setup_of(cfg, 32, pp=4, ep=8)
    base = plan(cfg.model, cfg.cluster, s).stages[0]
    rc = plan(cfg.model, cfg.cluster, dataclasses.replace(s, recompute_interval=1)).stages[0]
    f8 = plan(cfg.model, cfg.cluster, dataclasses.replace(s, fp8=True)).stages[0]
    assert rc.activations == rc.act_recompute < base.activations / 4
    assert base.act_no_recompute * 0.5 < f8.activations < base.activations * 0.9  # SDPA q, k, v stay BF16


def test_time_follows_peak_efficiency_and_overlap(cfg):
    s = setup_of(cfg, 32, pp=2, ep=16)  # ep 16 spans two nodes: the all-to-all crosses IB
    half = dataclasses.replace(cfg.cluster, efficiency=0.5)
    p = plan(cfg.model, half, s)
    assert p.step_s and p.tokens_per_s_per_gpu and 0 < p.mfu < 1
    assert math.isclose(p.tokens_per_s_per_gpu * p.step_s * 32, 256 * 4096)
    fast = plan(cfg.model, dataclasses.replace(half, efficiency=1.0), s)
    assert math.isclose(fast.stages[0].t_compute, p.stages[0].t_compute / 2)  # sync: no SM term
    # cluster.comm_overlap hides PP and DP traffic only; the all-to-all stays exposed in sync mode
    hidden = plan(cfg.model, dataclasses.replace(half, comm_overlap=1.0), s)
    assert hidden.step_s < p.step_s and p.stages[0].t_ep > 0
    slot = max(st.t_compute + st.t_ep for st in hidden.stages)
    assert math.isclose(hidden.step_s, (s.grad_accum + 1) * slot)
    assert plan(cfg.model, ClusterConfig(), s).step_s is None  # no peak known: no time


def test_terms_add_up_to_the_step(cfg):
    s = setup_of(cfg, 64, pp=4, ep=16, recompute_interval=1, moe_overlap=True, moe_chunks=2)
    t = plan(cfg.model, cfg.cluster, s).timing
    assert math.isclose(sum(t.per_step.values()), t.step_s)
    assert t.per_step["recompute"] > 0 and t.per_step["sm"] > 0 and t.per_step["ep_ib"] > 0


# ------------------------------------------------------------ node-aware dispatch, FP8 dispatch, overlap
def _monte_carlo_rows(E, k, G, M, ep, rpn, n=20000, seed=0):
    """Random group-limited routings (M of G groups uniformly, then k / M distinct experts in
    each, the planner's assumption): IB rows (distinct remote nodes) and NVLink rows (ranks hit
    other than the landing rank of each hit node, which has the source's local index) per token,
    with standard errors."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per_group, per_rank, nodes = E // G, E // ep, ep // rpn
    ib, nvl = np.empty(n), np.empty(n)
    for t in range(n):
        groups = rng.choice(G, M, replace=False)
        experts = [g * per_group + e for g in groups for e in rng.choice(per_group, k // M, replace=False)]
        ranks = {int(e) // per_rank for e in experts}
        src = int(rng.integers(ep))
        hit_nodes = {r // rpn for r in ranks}
        ib[t] = len(hit_nodes - {src // rpn})
        nvl[t] = len(ranks - {node * rpn + src % rpn for node in hit_nodes})
    return ib.mean(), ib.std() / n**0.5, nvl.mean(), nvl.std() / n**0.5


@pytest.mark.parametrize("ep, rpn, G, M", [
    (64, 8, 8, 4),  # DeepSeek-V3: one expert group per node, M = 4 nodes at most
    (32, 8, 8, 4),  # four nodes, two groups each
    (16, 8, 8, 4),  # two nodes
    (64, 8, 16, 4),  # a node holds two groups
    (64, 8, 1, 1),  # no group limit
])
def test_inter_node_rows_match_monte_carlo(cfg, ep, rpn, G, M):
    m = dataclasses.replace(cfg.model, n_routed_experts=256, n_activated_experts=8, n_expert_groups=G,
                            n_limited_groups=M)
    ib, nvl = ep_rows_per_token(m, ep, rpn, hierarchical=True)
    nodes = ep // rpn
    assert ib <= min(M if G == nodes else nodes, nodes - 1)
    assert math.isclose(ib, expected_units_hit(256, 8, nodes, G, M) * (nodes - 1) / nodes)
    mc_ib, se_ib, mc_nvl, se_nvl = _monte_carlo_rows(256, 8, G, M, ep, rpn, n=4000)
    assert abs(ib - mc_ib) < 4 * se_ib + 1e-3, (ib, mc_ib, se_ib)
    assert abs(nvl - mc_nvl) < 4 * se_nvl + 1e-3, (nvl, mc_nvl, se_nvl)
    flat_ib, _ = ep_rows_per_token(m, ep, rpn, hierarchical=False)
    assert flat_ib > ib  # one copy per remote rank instead of per remote node


def test_inter_node_rows_at_most_m_for_deepseek_v3():
    from train.config import compose, to_config

    m = to_config(compose(["model=671b"])).model
    ib, _ = ep_rows_per_token(m, 64, 8)
    assert ib <= m.n_limited_groups == 4 and math.isclose(ib, 3.5)  # 4 nodes hit, 7 in 8 of them remote


def test_row_formula_matches_the_real_router():
    """The assumption behind expected_units_hit (each chosen group gets k / M of the token's
    experts) against model/moe.py's Gate at DeepSeek-V3's routing shape on random inputs: nodes
    hit (one group per node) and ranks hit at ep 64 (8 ranks per group)."""
    import torch

    from model.moe import Gate
    from train.config import compose, to_config

    m = to_config(compose(["model=671b"])).model
    m = dataclasses.replace(m, dim=256)
    torch.manual_seed(0)
    gate = Gate(m)
    torch.nn.init.normal_(gate.weight, std=0.02)
    with torch.no_grad():
        _, idx, _ = gate(torch.randn(4000, m.dim))
    hit = lambda per_unit: torch.zeros(idx.size(0), 256 // per_unit).scatter_(1, idx // per_unit, 1).sum(1).mean()
    nodes, ranks = float(hit(32)), float(hit(4))
    assert abs(nodes - expected_units_hit(256, 8, 8, 8, 4)) < 0.05 * 4, nodes  # 4.00 modelled
    assert abs(ranks - expected_units_hit(256, 8, 64, 8, 4)) / ranks < 0.05, ranks
    # the uniform-pool assumption it replaced undercounts nodes by ~9%
    assert nodes > 4 * (1 - math.comb(96, 8) / math.comb(128, 8)) + 0.2  # 3.63


def test_fp8_dispatch_halves_dispatch_bytes_not_combine():
    fp8, bf16 = row_bytes(7168, FP8_BYTES, 2, False), row_bytes(7168, 2, 2, False)
    assert math.isclose(fp8["dispatch"] / bf16["dispatch"], (1 + 4 / 128) / 2)
    assert fp8["combine"] == bf16["combine"] and fp8["backward"] == bf16["backward"]
    assert row_bytes(7168, FP8_BYTES, 2, True)["recompute"] == fp8["dispatch"] + fp8["combine"]


def test_fp8_dispatch_in_the_plan(cfg):
    s = dataclasses.replace(setup_of(cfg, 32, pp=2, ep=16), fp8=True)
    on = plan(cfg.model, cfg.cluster, s).stages[0].ep_bytes
    off = plan(cfg.model, cfg.cluster, dataclasses.replace(s, fp8_dispatch=False)).stages[0].ep_bytes
    assert math.isclose(on / off, (FP8_BYTES + 6) / 8)  # dispatch FP8; combine and backward BF16


@pytest.mark.parametrize("overlap, chunks, mode", [(False, 1, "sync"), (True, 1, "shared"), (False, 2, "chunks"),
                                                   (True, 2, "both")])
def test_overlap_fraction_comes_from_measured_overlap(cfg, monkeypatch, overlap, chunks, mode):
    s = setup_of(cfg, 32, pp=2, ep=16, moe_overlap=overlap, moe_chunks=chunks)
    assert s.overlap == mode
    times = []
    for fraction in (0.0, 0.3):
        monkeypatch.setitem(MEASURED_OVERLAP, mode, fraction)
        st = plan(cfg.model, cfg.cluster, s).timing.stages[0]
        assert math.isclose(st.ep_ib + st.ep_nvl, st.ep_raw * (1 - fraction))
        times.append(plan(cfg.model, cfg.cluster, s).step_s)
    assert times[1] < times[0]  # changing the constant changes the time


def test_bubble_term(cfg):
    for pp, gb in ((4, 256), (8, 64), (2, 32)):
        s = setup_of(cfg, 32, pp=pp, ep=1)
        s = dataclasses.replace(s, global_batch=gb)
        p = plan(cfg.model, cfg.cluster, s)
        m = s.grad_accum
        assert math.isclose(p.bubble, (pp - 1) / (m + pp - 1))
        assert math.isclose(p.timing.per_step["bubble"], (pp - 1) * p.timing.slowest.slot)
    assert bubble_slots(Schedule(pipeline="interleaved", vp=4), 8) == 7 / 4
    assert math.isclose(bubble_slots(Schedule(pipeline="dualpipe"), 16), 7 * 2 / 3)  # (F&B + B − 3W) = 2F of 3F


# ------------------------------------------------------------ calibration on published runs
@pytest.fixture(scope="module")
def calibration():
    from train.calibrate import calibrate
    from train.config import compose, to_config

    return calibrate(to_config(compose(["model=671b"])).model)


def test_calibration_reproduces_the_fitted_run(calibration):
    from train.calibrate import error

    (run, t, fitted), = [row for row in calibration.rows if row[2]]
    assert run.name == "Megatron-Core" and math.isclose(run.tokens_per_s, 1297 * 330 / 338)
    assert abs(error(run, t)) < 1e-6
    assert 0.3 < calibration.efficiency < 0.6


def test_validation_run_error_is_the_documented_one(calibration):
    """The figure bench/RESULTS.md and docs/launch.md state; a model change that moves it must update them."""
    from train.calibrate import error

    (run, t, _), = [row for row in calibration.rows if not row[2]]
    assert run.name == "DeepSeek-V3" and round(run.tokens_per_s) == 1543
    assert abs(error(run, t) - -0.037) < 0.005, error(run, t)


def test_validation_run_within_15_percent(calibration):
    from train.calibrate import error

    (run, t, _), = [row for row in calibration.rows if not row[2]]
    assert abs(error(run, t)) <= 0.15


def test_fp32_run_without_zero_is_sixteen_bytes_per_parameter():
    m = ModelConfig(vocab_size=512, dim=128, inter_dim=384, moe_inter_dim=64, n_layers=2, n_heads=4,
                    n_routed_experts=8, n_activated_experts=2, q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32,
                    qk_rope_head_dim=16, v_head_dim=32, max_seq_len=64, original_seq_len=64).validate()
    st = plan(m, ClusterConfig(dtype="fp32"), Setup(Layout(1), seq_len=64, dtype="fp32")).stages[0]
    n = param_counts(m).total
    assert (st.weights, st.grads, st.master, st.moments) == (4 * n, 4 * n, 0, 8 * n)
    assert st.total / GIB < 1


@pytest.mark.parametrize("overrides", [
    ["trainer.seq_len=64", "trainer.micro_batch_size=2"],  # smoke: q_lora, 4 groups, shared expert, MTP
    ["model=16b", "model.n_layers=2", "model.vocab_size=4096", "model.dim=512", "model.inter_dim=1536",
     "model.moe_inter_dim=256", "model.n_heads=8", "model.n_routed_experts=8",  # V2-Lite's kind: no q_lora, softmax,
     "trainer.seq_len=128", "trainer.micro_batch_size=1"],  # 2 shared experts, narrower

])
def test_activations_match_what_autograd_keeps(overrides):
    """Every tensor saved for backward during a real forward (a saved-tensor hook, storages
    counted once, parameters excluded) against the plan's activations at pp = 1, fp32."""
    import torch

    from model import Transformer
    from train.config import compose, to_config

    cfg = to_config(compose([*overrides, "trainer.global_batch_size=2"]))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    kept: dict[int, int] = {}

    def pack(x):
        if x.untyped_storage().data_ptr() not in params:
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    t = cfg.trainer
    ids = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_len + 1))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model.losses(ids[:, :-1], ids[:, 1:])
    st = plan(cfg.model, cfg.cluster, setup_of(cfg, 1)).stages[0]
    transient = t.micro_batch_size * t.seq_len * cfg.model.vocab_size * 4  # one head's logits: live, not kept
    planned = st.act_no_recompute - transient
    assert abs(sum(kept.values()) - planned) <= 0.05 * planned, (sum(kept.values()), planned)
