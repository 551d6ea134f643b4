"""Rotary position embedding with YaRN context extension.

Follows DeepSeek's reference (inference/model.py `precompute_freqs_cis`): frequencies between
the beta_fast and beta_slow rotation counts are blended from interpolated (divided by
rope_factor) to extrapolated ones (YaRN, Peng et al. 2023, §3.2), and only when the model's
max_seq_len exceeds the pretraining length original_seq_len. Pairs are interleaved
(x[2i], x[2i+1]) as in DeepSeek's checkpoints; we keep cos/sin tables in real form so that
bf16 and torch.compile paths need no complex numbers.
"""

import math

import torch

from .config import ModelConfig


def yarn_active(cfg: ModelConfig) -> bool:
    return cfg.max_seq_len > cfg.original_seq_len


def yarn_mscale(cfg: ModelConfig) -> float:
    """Attention-logit rescale of YaRN: softmax_scale is multiplied by mscale**2."""
    if not yarn_active(cfg) or cfg.rope_factor <= 1:
        return 1.0
    return 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0


def _correction_dim(n_rotations: float, dim: int, base: float, seq_len: int) -> float:
    # dimension index whose wavelength completes n_rotations over seq_len tokens
    return dim * math.log(seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """(R/2,) inverse frequencies in float32, YaRN-corrected when active."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if yarn_active(cfg):
        low = max(math.floor(_correction_dim(cfg.beta_fast, dim, base, cfg.original_seq_len)), 0)
        high = min(math.ceil(_correction_dim(cfg.beta_slow, dim, base, cfg.original_seq_len)), dim - 1)
        if low == high:
            high += 0.001  # avoid a zero-width ramp
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp  # 1 = keep the original (extrapolated) frequency
        inv_freq = inv_freq / cfg.rope_factor * (1 - smooth) + inv_freq * smooth
    return inv_freq


def rope_tables(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (T, R/2) in float32 for positions 0..seq_len-1."""
    t = torch.arange(seq_len, dtype=torch.float32, device=device)
    freqs = torch.outer(t, inv_frequencies(cfg).to(device))
    return freqs.cos(), freqs.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (B, T, H, R) by the angles in cos/sin (T, R/2) or (B, T, R/2)."""
    dtype = x.dtype
    x = x.float().unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    x0, x1 = x[..., 0], x[..., 1]
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(dtype)
