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
    p = plan(cfg.model, cfg.cluster, s)
    assert p.step_s and p.tokens_per_s_per_gpu and 0 < p.mfu < 1
    assert math.isclose(p.tokens_per_s_per_gpu * p.step_s * 32, 256 * 4096)
    fast = plan(cfg.model, dataclasses.replace(cfg.cluster, efficiency=1.0), s)
    assert math.isclose(fast.stages[0].t_compute, p.stages[0].t_compute / 2)
    hidden = plan(cfg.model, dataclasses.replace(cfg.cluster, comm_overlap=1.0), s)
    assert hidden.step_s < p.step_s and p.stages[0].t_ep > 0
    slot = max(st.t_compute for st in hidden.stages)
    assert math.isclose(hidden.step_s, (s.grad_accum + 1) * slot)
    assert plan(cfg.model, ClusterConfig(), s).step_s is None  # no peak known: no time


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
