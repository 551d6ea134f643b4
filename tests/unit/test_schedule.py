"""Learning-rate shapes, DeepSeek-V3's token-indexed schedules, the batch ramp, AdamW groups, conf YAMLs."""

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from model import ModelConfig, Transformer
from model.config import ConfigError
from train.schedule import (OptimConfig, ScheduleConfig, gamma_at, global_batch_at, lr_at, mtp_lambda_at,
                            param_groups)

CONF = Path(__file__).resolve().parents[2] / "conf"
T = 10**12  # tokens per "T" in DeepSeek's numbers
DS_TOTAL = int(14.8 * T)


@pytest.mark.parametrize("name", ["cosine", "wsd", "deepseek_v3", "constant"])
def test_every_schedule_warms_up_linearly_from_near_zero_to_peak(name):
    cfg = ScheduleConfig(name=name, warmup_steps=10)
    lrs = [lr_at(cfg, 2.0, s, 100, 0, 1000) for s in range(10)]
    assert lrs[0] == pytest.approx(0.2) and lrs[-1] == pytest.approx(2.0)
    assert [b - a for a, b in zip(lrs, lrs[1:])] == pytest.approx([0.2] * 9)


def test_cosine_reaches_min_ratio_on_the_last_step_with_the_midpoint_halfway():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(cfg, 1.0, s, 110, 0, 1) for s in range(110)]
    assert lrs[9] == pytest.approx(1.0) and 0.99 < lrs[10] < 1.0  # decay starts right after warmup
    assert all(a > b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[59] == pytest.approx(0.55)  # 50 of 100 decay steps: (1 + 0.1) / 2
    assert lrs[109] == pytest.approx(0.1)  # the last step trains at the floor
    assert lr_at(cfg, 1.0, 500, 110, 0, 1) == pytest.approx(0.1)  # past the end: stays there


def test_wsd_is_flat_then_decays_as_one_minus_sqrt_to_min_ratio():
    cfg = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.1, decay_fraction=0.2)
    assert [lr_at(cfg, 2.0, s, 100, 0, 1) for s in (0, 40, 79)] == [2.0, 2.0, 2.0]  # decay: steps 80..99
    assert lr_at(cfg, 2.0, 84, 100, 0, 1) == pytest.approx(2.0 * (0.1 + 0.9 * (1 - math.sqrt(0.25))))
    assert lr_at(cfg, 2.0, 99, 100, 0, 1) == pytest.approx(0.2)
    linear = ScheduleConfig(name="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2, decay_shape="linear")
    assert lr_at(linear, 2.0, 84, 100, 0, 1) == pytest.approx(1.5)
    no_decay = ScheduleConfig(name="wsd", warmup_steps=0, decay_fraction=0.0)
    assert lr_at(no_decay, 2.0, 99, 100, 0, 1) == lr_at(no_decay, 2.0, 100, 100, 0, 1) == 2.0


def test_deepseek_v3_reproduces_the_reports_learning_rates_over_14_8T_tokens():
    cfg = ScheduleConfig(name="deepseek_v3", warmup_steps=2000)
    peak = 2.2e-4
    lr = lambda tokens: lr_at(cfg, peak, 10_000, 10**6, int(tokens), DS_TOTAL)  # noqa: E731
    assert lr_at(cfg, peak, 999, 10**6, 0, DS_TOTAL) == pytest.approx(peak / 2)  # warmup is in steps
    assert lr(1 * T) == lr(9.9 * T) == peak  # constant to 10T
    assert lr(12.15 * T) == pytest.approx((peak + 2.2e-5) / 2, rel=0.01)  # cosine midpoint
    assert lr(14.299 * T) == pytest.approx(2.2e-5, rel=0.01)  # end of the 4.3T cosine
    assert lr(14.5 * T) == pytest.approx(2.2e-5)  # 333B at 2.2e-5
    assert lr(14.7 * T) == pytest.approx(7.3e-6, rel=0.01)  # the last 167B


def test_deepseek_v3_stages_scale_with_the_runs_tokens():
    cfg = ScheduleConfig(name="deepseek_v3", warmup_steps=0)
    for fraction in (0.3, 0.8, 0.97, 0.995):
        big = lr_at(cfg, 1.0, 5, 100, int(fraction * DS_TOTAL), DS_TOTAL)
        small = lr_at(cfg, 1.0, 5, 100, int(fraction * 10**6), 10**6)
        assert big == pytest.approx(small, rel=1e-6)
    assert lr_at(cfg, 1.0, 5, 100, 995, 1000) == pytest.approx(0.0332)


def test_lr_at_is_pure_and_does_not_touch_the_config():
    cfg = ScheduleConfig(name="wsd", warmup_steps=5)
    before = repr(cfg)
    a = [lr_at(cfg, 1e-3, s, 50, s * 100, 5000) for s in range(50)]
    b = [lr_at(cfg, 1e-3, s, 50, s * 100, 5000) for s in reversed(range(50))][::-1]
    assert a == b and repr(cfg) == before


def test_bad_schedule_values_are_named():
    with pytest.raises(ValueError, match="schedule.name='bogus'"):
        lr_at(ScheduleConfig(name="bogus"), 1.0, 3, 10, 0, 1)  # named even during warmup
    with pytest.raises(ValueError, match="total_tokens=0"):
        lr_at(ScheduleConfig(name="deepseek_v3", warmup_steps=0), 1.0, 3, 10, 0, 0)
    for kwargs, key in [({"name": "linear"}, "schedule.name"), ({"min_lr_ratio": 1.5}, "schedule.min_lr_ratio"),
                        ({"decay_shape": "exp"}, "schedule.decay_shape"),
                        ({"warmup_steps": -1}, "schedule.warmup_steps"),
                        ({"ds_cosine_until": 0.5}, "ds_constant_until/ds_cosine_until/ds_floor_until")]:
        with pytest.raises(ConfigError, match=re.escape(key)):
            ScheduleConfig(**kwargs).validate()
    assert ScheduleConfig().validate() == ScheduleConfig()
    with pytest.raises(ConfigError, match=r"optim.betas=\[0.9\]"):
        OptimConfig(betas=[0.9]).validate()
    with pytest.raises(ConfigError, match="optim.lr=0"):
        OptimConfig(lr=0).validate()


def test_batch_ramp_follows_deepseek_v3_in_granular_steps():
    cfg = ScheduleConfig(batch_ramp_tokens=469 * 10**9, batch_ramp_start=3072)
    gran = 64  # micro batch × dp
    at = lambda tokens: global_batch_at(cfg, int(tokens), 15360, gran)  # noqa: E731
    assert at(0) == 3072 and at(469e9) == 15360 and at(10 * T) == 15360
    assert at(234.5e9) == 9216  # halfway: (3072 + 15360) / 2, a multiple of 64
    sizes = [at(t) for t in range(0, 470 * 10**9, 10**9)]
    assert sizes == sorted(sizes) and all(s % gran == 0 and gran <= s <= 15360 for s in sizes)


def test_batch_ramp_bounds_and_off_switch():
    assert global_batch_at(ScheduleConfig(), 0, 60, 8) == 60  # ramp off: the final batch, as configured
    cfg = ScheduleConfig(batch_ramp_tokens=1000, batch_ramp_start=0)  # 0 = start at one micro-step
    assert global_batch_at(cfg, 0, 64, 8) == 8
    assert global_batch_at(ScheduleConfig(batch_ramp_tokens=1000, batch_ramp_start=5), 0, 64, 8) == 8
    assert global_batch_at(ScheduleConfig(batch_ramp_tokens=1000, batch_ramp_start=500), 10, 64, 8) == 64
    assert global_batch_at(ScheduleConfig(batch_ramp_tokens=1000, batch_ramp_start=12), 0, 64, 8) == 8  # rounded down
    with pytest.raises(ValueError, match="granularity=0"):
        global_batch_at(cfg, 0, 64, 0)


def test_gamma_and_lambda_switch_at_deepseeks_token_counts():
    cfg = ScheduleConfig()
    assert gamma_at(cfg, int(14.2 * T), DS_TOTAL) == 0.001 and gamma_at(cfg, int(14.4 * T), DS_TOTAL) == 0.0
    assert mtp_lambda_at(cfg, int(9.9 * T), DS_TOTAL) == 0.3
    assert mtp_lambda_at(cfg, int(10.1 * T), DS_TOTAL) == 0.1
    custom = ScheduleConfig(bias_update_gamma=0.01, bias_update_gamma_end_fraction=0.5, mtp_lambda=1.0,
                            mtp_lambda_late=0.0, mtp_lambda_switch_fraction=0.25)
    assert [gamma_at(custom, t, 100) for t in (49, 50)] == [0.01, 0.0]
    assert [mtp_lambda_at(custom, t, 100) for t in (24, 25)] == [1.0, 0.0]


TINY = dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=2, n_dense_layers=1, n_heads=2,
            n_routed_experts=4, n_shared_experts=1, n_activated_experts=2, n_expert_groups=1, n_limited_groups=1,
            q_lora_rank=0, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=32,
            original_seq_len=32)


def test_param_groups_decay_matrices_only_and_never_see_the_router_bias():
    model = Transformer(ModelConfig(**TINY))
    decay, no_decay = param_groups(model, 0.1)
    assert (decay["name"], no_decay["name"]) == ("decay", "no_decay")
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda group: {id(p) for p in group["params"]}  # noqa: E731
    assert id(model.embed.weight) in ids(decay) and id(model.head.weight) in ids(decay)
    moe = model.layers["1"].ffn
    assert {id(moe.experts.w1), id(moe.experts.w2), id(moe.gate.weight)} <= ids(decay)  # stacked (E, F, D)
    assert id(model.norm.weight) in ids(no_decay) and id(model.layers["0"].attn.kv_norm.weight) in ids(no_decay)
    bias = moe.gate.e_score_correction_bias
    assert "gate.e_score_correction_bias" in dict(moe.named_buffers())
    assert id(bias) not in ids(decay) | ids(no_decay)
    assert len(ids(decay)) + len(ids(no_decay)) == len(list(model.parameters()))
    assert all(p.ndim >= 2 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def test_param_groups_put_biases_in_no_decay_and_skip_frozen_parameters():
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 2, bias=False))
    model[2].weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.05)
    assert [p.shape for p in decay["params"]] == [torch.Size([3, 4])]
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias)}
    torch.optim.AdamW(param_groups(model, 0.05))  # a valid AdamW argument, names included


def _yaml_keys(path: Path) -> list[str]:
    return [line.split(":")[0] for line in path.read_text().splitlines() if re.match(r"^[a-z_]+:", line)]


@pytest.mark.parametrize("path", sorted((CONF / "schedule").glob("*.yaml")) + [CONF / "optim" / "adamw.yaml"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_conf_yamls_hold_only_schema_keys_each_commented(path):
    schema = OptimConfig if path.parent.name == "optim" else ScheduleConfig
    merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.load(path))  # unknown key: raises
    cfg = OmegaConf.to_object(merged)
    cfg.validate()
    keys = _yaml_keys(path)
    assert set(keys) <= {f.name for f in fields(schema)}
    for line in path.read_text().splitlines():
        if re.match(r"^[a-z_]+:", line):
            assert "#" in line, f"{path.name}: no comment on {line!r}"
    if schema is ScheduleConfig:
        assert cfg.name == path.stem


def test_schedule_yamls_cover_all_four_schedules_with_their_own_keys():
    names = {p.stem for p in (CONF / "schedule").glob("*.yaml")}
    assert names == {"cosine", "wsd", "deepseek_v3", "constant"}
    ds = _yaml_keys(CONF / "schedule" / "deepseek_v3.yaml")
    assert {"ds_constant_until", "ds_cosine_until", "ds_floor_until", "ds_floor_ratio", "ds_final_ratio"} <= set(ds)
    assert {"decay_fraction", "decay_shape", "min_lr_ratio"} <= set(_yaml_keys(CONF / "schedule" / "wsd.yaml"))
