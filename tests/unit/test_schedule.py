import math

import pytest

from model import ModelConfig, Transformer
from train.schedule import ScheduleConfig, gamma_at, global_batch_at, lr_at, mtp_lambda_at, param_groups


def test_cosine_warms_up_then_decays_to_min_ratio():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, 1.0, s, 110, 0, 1) for s in range(111)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[110] == pytest.approx(0.1)


def test_wsd_is_flat_then_decays_linearly():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_at(cfg, 2.0, 79, 100, 0, 1) == 2.0
    assert lr_at(cfg, 2.0, 90, 100, 0, 1) == pytest.approx(1.0)
    assert lr_at(cfg, 2.0, 100, 100, 0, 1) == pytest.approx(0.0)


def test_deepseek_v3_stages_by_tokens():
    cfg = ScheduleConfig(name="deepseek_v3", warmup_steps=0)
    total = 14_800
    peak = 2.2e-4
    assert lr_at(cfg, peak, 5, 10**6, 9_000, total) == peak  # constant until 10T
    assert lr_at(cfg, peak, 5, 10**6, 14_299, total) == pytest.approx(2.2e-5, rel=0.01)  # end of cosine
    assert lr_at(cfg, peak, 5, 10**6, 14_500, total) == pytest.approx(2.2e-5)
    assert lr_at(cfg, peak, 5, 10**6, 14_700, total) == pytest.approx(7.3e-6, rel=0.01)


def test_unknown_schedule_is_named():
    with pytest.raises(ValueError, match="schedule.name='bogus'"):
        lr_at(ScheduleConfig(name="bogus", warmup_steps=0), 1.0, 3, 10, 0, 1)


def test_batch_ramp_grows_in_granular_steps_to_the_final_batch():
    cfg = ScheduleConfig(batch_ramp_tokens=1000, batch_ramp_start=8)
    sizes = [global_batch_at(cfg, t, 64, 8) for t in range(0, 1100, 100)]
    assert sizes[0] == 8 and sizes[-1] == 64
    assert all(s % 8 == 0 and 8 <= s <= 64 for s in sizes)
    assert sizes == sorted(sizes)
    assert global_batch_at(ScheduleConfig(), 0, 64, 8) == 64  # ramp off


def test_gamma_and_lambda_switch_at_their_fractions():
    cfg = ScheduleConfig()
    assert gamma_at(cfg, 0, 1000) == 0.001 and gamma_at(cfg, 970, 1000) == 0.0
    assert mtp_lambda_at(cfg, 0, 1000) == 0.3 and mtp_lambda_at(cfg, 700, 1000) == 0.1


def test_param_groups_decay_matrices_only_and_skip_the_router_bias():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2,
                                    n_dense_layers=1, n_heads=2, n_routed_experts=4, n_shared_experts=1,
                                    n_activated_experts=2, n_expert_groups=1, n_limited_groups=1, q_lora_rank=0,
                                    kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                                    max_seq_len=32, original_seq_len=32))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.embed.weight for p in decay["params"])
    assert any(p is model.layers["1"].ffn.experts.w1 for p in decay["params"])
    assert any(p is model.norm.weight for p in no_decay["params"])
    bias = model.layers["1"].ffn.gate.e_score_correction_bias
    assert not any(p is bias for g in (decay, no_decay) for p in g["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
