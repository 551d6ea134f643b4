"""Optimizer hyper-parameters and every schedule of a run: learning rate, batch-size ramp,
expert-bias update speed γ and MTP loss weight λ.

All are pure functions of (step, tokens seen), so a resumed run recomputes them exactly and
nothing but the step and token count needs checkpointing. Followed torchtitan's
lr_scheduler (warmup + decay as a multiplier of the peak) rather than a stateful torch
LRScheduler for that reason. DeepSeek-V3's schedule is expressed in tokens (report §4.2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | wsd | deepseek_v3 | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr / peak for cosine and wsd
    decay_fraction: float = 0.2  # wsd: the last fraction of steps decays linearly (Hu et al. 2024, MiniCPM)
    # deepseek_v3, as fractions of the run's tokens (DeepSeek: constant to 10T of 14.8T, cosine to
    # 2.2e-5 (10% of 2.2e-4) over 4.3T, 2.2e-5 for 333B, 7.3e-6 (3.3%) for the last 167B).
    ds_constant_until: float = 0.676
    ds_cosine_until: float = 0.966
    ds_low_until: float = 0.989
    ds_cosine_floor: float = 0.1
    ds_final_ratio: float = 0.0332
    batch_ramp_tokens: int = 0  # 0 = off; DeepSeek: 3072 → 15360 sequences over the first 469B tokens
    batch_ramp_start: int = 0  # starting global batch (sequences)
    bias_update_gamma: float = 0.001  # DeepSeek: 0.001, then 0 for the last 500B of 14.8T tokens
    bias_update_gamma_end_fraction: float = 0.966
    mtp_lambda: float = 0.3  # DeepSeek: 0.3 for the first 10T tokens, then 0.1
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_fraction: float = 0.676


def lr_at(cfg: ScheduleConfig, peak_lr: float, step: int, max_steps: int, tokens: int, total_tokens: int) -> float:
    """Learning rate of 0-based `step` (linear warmup from peak/warmup_steps to peak)."""
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        p = min((step - cfg.warmup_steps) / span, 1.0)
        return peak_lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))
    if cfg.name == "wsd":
        decay_start = max_steps * (1 - cfg.decay_fraction)
        if step < decay_start:
            return peak_lr
        p = min((step - decay_start) / max(max_steps - decay_start, 1), 1.0)
        return peak_lr * (1 - (1 - cfg.min_lr_ratio) * p)
    if cfg.name == "deepseek_v3":
        f = tokens / max(total_tokens, 1)
        if f < cfg.ds_constant_until:
            return peak_lr
        if f < cfg.ds_cosine_until:
            p = (f - cfg.ds_constant_until) / (cfg.ds_cosine_until - cfg.ds_constant_until)
            return peak_lr * (cfg.ds_cosine_floor + (1 - cfg.ds_cosine_floor) * 0.5 * (1 + math.cos(math.pi * p)))
        return peak_lr * (cfg.ds_cosine_floor if f < cfg.ds_low_until else cfg.ds_final_ratio)
    raise ValueError(f"schedule.name={cfg.name!r}: must be cosine, wsd, deepseek_v3 or constant")


def global_batch_at(cfg: ScheduleConfig, tokens: int, final_global_batch: int, granularity: int) -> int:
    """Global batch (sequences) after `tokens`: linear ramp from batch_ramp_start, in multiples of granularity."""
    if cfg.batch_ramp_tokens <= 0 or tokens >= cfg.batch_ramp_tokens:
        return final_global_batch
    start = cfg.batch_ramp_start or granularity
    gb = start + (final_global_batch - start) * tokens / cfg.batch_ramp_tokens
    return int(min(max(granularity, gb // granularity * granularity), final_global_batch))


def gamma_at(cfg: ScheduleConfig, tokens: int, total_tokens: int) -> float:
    return cfg.bias_update_gamma if tokens < cfg.bias_update_gamma_end_fraction * total_tokens else 0.0


def mtp_lambda_at(cfg: ScheduleConfig, tokens: int, total_tokens: int) -> float:
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_switch_fraction * total_tokens else cfg.mtp_lambda_late


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices (embedding and stacked experts included), none on norms and biases.

    The router's expert bias is a buffer, so the optimizer never sees it.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
