"""Optimizer hyper-parameters and every schedule of a run: learning rate, batch-size ramp,
expert-bias update speed γ, MTP loss weight λ, and the AdamW parameter groups.

Design. Every schedule is a pure function of (step, tokens seen): a resumed run recomputes
the same values from the two counters it checkpoints anyway, and nothing else needs saving.
torchtitan (components/lr_scheduler.py) wraps a warmup-stable-decay multiplier in a stateful
`LambdaLR` whose `last_epoch` must be checkpointed; OLMo-core (optim/scheduler.py) keeps
schedulers as small dataclasses with a stateless `get_lr(initial_lr, step, max_steps)`. We
follow OLMo-core's stateless shape, torchtitan's "warmup, then a decay shape scaled between
peak and a minimum", and go one step further than both: DeepSeek-V3 states its schedule in
*tokens* (report §4.2), so the `deepseek_v3` stages, γ and λ are fractions of the run's
planned tokens and the same config scales from a smoke run to 14.8T tokens. The trainer sets
`group["lr"]` on the optimizer before each step; there is no torch LRScheduler.

Conventions: `step` is 0-based (the step about to run); `tokens` are the tokens consumed
before it; the last step of a run is `max_steps - 1` and trains at the cosine/WSD floor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from torch import nn

from model.config import ConfigError

SCHEDULES = ("cosine", "wsd", "deepseek_v3", "constant")
DECAY_SHAPES = ("1-sqrt", "linear")


@dataclass
class OptimConfig:
    """AdamW (group `optim/`, conf/optim/adamw.yaml). Defaults are DeepSeek-V3's (report §4.2)
    except `lr`, which is per model size.

    lr: peak learning rate (schedules scale it).
    betas: AdamW (β1, β2). A `list[float]`, not a tuple: OmegaConf stores a tuple field as a
        list anyway (to_object returns a list) and does not check its length, so we type it
        honestly and `validate()` checks there are two.
    eps: AdamW ε.
    weight_decay: decoupled weight decay, applied to matrices only (see `param_groups`).
    grad_clip: global gradient-norm clipping threshold; 0 = off.
    """

    lr: float = 3e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def validate(self) -> "OptimConfig":
        """Raise ConfigError naming the first bad key; return self."""
        if not self.lr > 0:
            raise ConfigError(f"optim.lr={self.lr}: must be > 0")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas={list(self.betas)}: must be two values in [0, 1)")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps={self.eps}: must be > 0")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay={self.weight_decay}: must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"optim.grad_clip={self.grad_clip}: must be >= 0 (0 = off)")
        return self


@dataclass
class ScheduleConfig:
    """Learning-rate shape and the token-indexed schedules of DeepSeek-V3 (group `schedule/`).

    name: cosine | wsd | deepseek_v3 | constant. All start with `warmup_steps` of linear warmup.
      - cosine: cosine decay from peak to `min_lr_ratio`·peak at the last step
        (Loshchilov & Hutter 2017, SGDR, without restarts).
      - wsd: warmup-stable-decay; flat at peak, then the last `decay_fraction` of steps decay
        to `min_lr_ratio`·peak (Hu et al. 2024, MiniCPM §4). The decay shape is `decay_shape`.
      - deepseek_v3: DeepSeek-V3 report §4.2, stages as fractions of the run's tokens (ds_*).
      - constant: peak after warmup.
    warmup_steps: linear warmup length in optimizer steps (DeepSeek-V3: 2000).
    min_lr_ratio: final lr / peak for cosine and wsd.
    decay_fraction: wsd: the last fraction of steps that decay.
    decay_shape: wsd decay: "1-sqrt" (default; lr ∝ 1 − √progress, which beat linear and
        cosine cooldowns in Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training
        Beyond Fixed Training Durations", §3) or "linear" (MiniCPM / torchtitan / OLMo-core).
    ds_constant_until: deepseek_v3: peak until this fraction of tokens (10T / 14.8T).
    ds_cosine_until: deepseek_v3: cosine from peak to `ds_floor_ratio`·peak until this
        fraction (14.3T / 14.8T: 4.3T tokens of decay).
    ds_floor_until: deepseek_v3: `ds_floor_ratio`·peak until this fraction (333B more tokens,
        14.633T / 14.8T), then `ds_final_ratio`·peak for the rest (the last 167B).
    ds_floor_ratio: deepseek_v3: 2.2e-5 / 2.2e-4 = 0.1.
    ds_final_ratio: deepseek_v3: 7.3e-6 / 2.2e-4 ≈ 0.0332.
        (Fractions are rounded to 3 decimals, as are γ's and λ's below.)
    batch_ramp_tokens: global batch grows linearly from `batch_ramp_start` to the configured
        global batch over this many tokens; 0 = off (DeepSeek-V3: 3072 → 15360 sequences over
        the first 469B tokens).
    batch_ramp_start: starting global batch in sequences (0 = one micro-step: micro × dp).
    bias_update_gamma: aux-loss-free expert-bias update speed γ (DeepSeek-V3 §2.1.2, §4.2: 0.001).
    bias_update_gamma_end_fraction: γ becomes 0 after this fraction of tokens (14.3T / 14.8T).
    mtp_lambda: MTP loss weight λ early in the run (DeepSeek-V3 §2.2, §4.2: 0.3).
    mtp_lambda_late: λ after the switch (0.1).
    mtp_lambda_switch_fraction: λ switches after this fraction of tokens (10T / 14.8T).
    """

    name: str = "cosine"
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2
    decay_shape: str = "1-sqrt"
    ds_constant_until: float = 0.676
    ds_cosine_until: float = 0.966
    ds_floor_until: float = 0.989
    ds_floor_ratio: float = 0.1
    ds_final_ratio: float = 0.0332
    batch_ramp_tokens: int = 0
    batch_ramp_start: int = 0
    bias_update_gamma: float = 0.001
    bias_update_gamma_end_fraction: float = 0.966
    mtp_lambda: float = 0.3
    mtp_lambda_late: float = 0.1
    mtp_lambda_switch_fraction: float = 0.676

    def validate(self) -> "ScheduleConfig":
        """Raise ConfigError naming the first bad key; return self."""
        if self.name not in SCHEDULES:
            raise ConfigError(f"schedule.name={self.name!r}: must be one of {', '.join(SCHEDULES)}")
        if self.decay_shape not in DECAY_SHAPES:
            raise ConfigError(f"schedule.decay_shape={self.decay_shape!r}: must be 1-sqrt or linear")
        for key in ("warmup_steps", "batch_ramp_tokens", "batch_ramp_start", "bias_update_gamma", "mtp_lambda",
                    "mtp_lambda_late"):
            if getattr(self, key) < 0:
                raise ConfigError(f"schedule.{key}={getattr(self, key)}: must be >= 0")
        for key in ("min_lr_ratio", "decay_fraction", "ds_floor_ratio", "ds_final_ratio",
                    "bias_update_gamma_end_fraction", "mtp_lambda_switch_fraction"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ConfigError(f"schedule.{key}={getattr(self, key)}: must be in [0, 1]")
        bounds = ("ds_constant_until", "ds_cosine_until", "ds_floor_until")
        values = [getattr(self, k) for k in bounds]
        if not 0.0 <= values[0] <= values[1] <= values[2] <= 1.0:
            raise ConfigError(f"schedule.{'/'.join(bounds)}={values}: must satisfy 0 <= constant <= cosine "
                              "<= floor <= 1")
        return self


def _decayed(progress: float, floor: float, shape: str) -> float:
    """Multiplier in [floor, 1] for decay progress in [0, 1]."""
    p = min(max(progress, 0.0), 1.0)
    if shape == "cosine":
        fall = 0.5 * (1.0 + math.cos(math.pi * p))
    elif shape == "1-sqrt":
        fall = 1.0 - math.sqrt(p)
    else:  # linear
        fall = 1.0 - p
    return floor + (1.0 - floor) * fall


def lr_at(cfg: ScheduleConfig, peak_lr: float, step: int, max_steps: int, tokens: int, total_tokens: int) -> float:
    """Learning rate of 0-based `step`, having consumed `tokens` of the run's `total_tokens`.

    Warmup is linear, peak·(step+1)/warmup_steps: the first step trains at peak/warmup (not 0,
    which would waste it) and the last warmup step at peak. A decay phase of n steps starting
    at step a gives step s the progress (s+1−a)/n, the same "+1" as warmup: its first step is
    already below peak and the run's last step (max_steps−1) trains at the floor. cosine and
    wsd are indexed by steps, deepseek_v3 by tokens (a batch-size ramp then moves its stage
    boundaries in steps exactly as it did for DeepSeek).
    """
    if step < 0 or max_steps <= 0:
        raise ValueError(f"lr_at: step={step}, max_steps={max_steps}: need step >= 0 and max_steps > 0")
    if cfg.name not in SCHEDULES:
        raise ValueError(f"schedule.name={cfg.name!r}: must be one of {', '.join(SCHEDULES)}")
    if step < cfg.warmup_steps:
        return peak_lr * (step + 1) / cfg.warmup_steps
    if cfg.name == "constant":
        return peak_lr
    if cfg.name == "cosine":
        span = max(max_steps - cfg.warmup_steps, 1)
        return peak_lr * _decayed((step + 1 - cfg.warmup_steps) / span, cfg.min_lr_ratio, "cosine")
    if cfg.name == "wsd":
        decay_steps = min(round(max_steps * cfg.decay_fraction), max_steps - cfg.warmup_steps)
        decay_start = max_steps - decay_steps
        if decay_steps <= 0 or step < decay_start:
            return peak_lr
        return peak_lr * _decayed((step + 1 - decay_start) / decay_steps, cfg.min_lr_ratio, cfg.decay_shape)
    # deepseek_v3: stages by the fraction of the run's tokens consumed
    if total_tokens <= 0:
        raise ValueError(f"lr_at: total_tokens={total_tokens}: deepseek_v3 needs the run's planned tokens")
    f = tokens / total_tokens
    if f < cfg.ds_constant_until:
        return peak_lr
    if f < cfg.ds_cosine_until:
        p = (f - cfg.ds_constant_until) / (cfg.ds_cosine_until - cfg.ds_constant_until)
        return peak_lr * _decayed(p, cfg.ds_floor_ratio, "cosine")
    return peak_lr * (cfg.ds_floor_ratio if f < cfg.ds_floor_until else cfg.ds_final_ratio)


def global_batch_at(cfg: ScheduleConfig, tokens: int, final_global_batch: int, granularity: int) -> int:
    """Global batch in sequences once `tokens` have been consumed (DeepSeek-V3 §4.2 ramp).

    Linear in tokens from `batch_ramp_start` to `final_global_batch`, rounded down to a multiple
    of `granularity` (micro batch × dp: the ramp changes only gradient accumulation), never
    below `granularity` nor above `final_global_batch`. Ramp off or finished: the final batch.
    """
    if granularity <= 0:
        raise ValueError(f"global_batch_at: granularity={granularity}: must be > 0")
    if cfg.batch_ramp_tokens <= 0 or tokens >= cfg.batch_ramp_tokens:
        return final_global_batch
    start = min(max(cfg.batch_ramp_start, granularity), final_global_batch)
    batch = start + (final_global_batch - start) * max(tokens, 0) / cfg.batch_ramp_tokens
    batch = int(batch // granularity) * granularity
    return max(granularity, min(batch, final_global_batch))


def gamma_at(cfg: ScheduleConfig, tokens: int, total_tokens: int) -> float:
    """Expert-bias update speed γ: `bias_update_gamma`, then 0 for the end of the run, so
    routing stops moving while the learning rate is at its floor (DeepSeek-V3 §4.2)."""
    if total_tokens <= 0:
        raise ValueError(f"gamma_at: total_tokens={total_tokens}: must be > 0")
    return cfg.bias_update_gamma if tokens < cfg.bias_update_gamma_end_fraction * total_tokens else 0.0


def mtp_lambda_at(cfg: ScheduleConfig, tokens: int, total_tokens: int) -> float:
    """MTP loss weight λ: `mtp_lambda` early, `mtp_lambda_late` after the switch (DeepSeek-V3 §4.2)."""
    if total_tokens <= 0:
        raise ValueError(f"mtp_lambda_at: total_tokens={total_tokens}: must be > 0")
    return cfg.mtp_lambda if tokens < cfg.mtp_lambda_switch_fraction * total_tokens else cfg.mtp_lambda_late


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups `[decay, no_decay]`, each a dict with "params", "weight_decay" and "name".

    Decay on every parameter with ndim >= 2: linear weights, the embedding, the output head,
    the router and the stacked (E, F, D) expert weights. No decay on 1-D parameters (RMSNorm
    scales, biases), which set scales rather than directions (nanoGPT's `configure_optimizers`
    rule; Loshchilov & Hutter 2019 for decoupled decay). Frozen parameters are skipped. The
    router's `e_score_correction_bias` is a buffer, so the optimizer never sees it: it moves
    only by `update_expert_bias`. Both groups are always returned (one may be empty).
    """
    decay, no_decay = [], []
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
