"""Training metrics: MFU against known device peaks, memory, expert load, cost.

MFU follows PaLM (appendix B): model FLOPs per token (model/flops.py) × tokens/s over the
device's dense peak. On a CPU there is no trustworthy peak, so MFU is null unless overridden.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

# Dense peak TFLOP/s (BF16, FP8) from vendor datasheets, matched by substring of the device name.
PEAK_TFLOPS = {
    "H100 PCIe": (756.0, 1513.0),
    "H100": (989.0, 1979.0),
    "H800": (989.0, 1979.0),
    "H200": (989.0, 1979.0),
    "H20": (148.0, 296.0),
    "B200": (2250.0, 4500.0),
    "A100": (312.0, None),
    "A800": (312.0, None),
    "L40S": (362.0, 733.0),
}


def peak_tflops(device: torch.device, override: float | None = None, fp8: bool = False) -> float | None:
    if override:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16, f8) in PEAK_TFLOPS.items():  # insertion order: specific names first
        if key in name:
            return f8 if fp8 else bf16
    return None


def model_tflops(flops_per_token: float, tokens_per_s_per_device: float) -> float:
    return flops_per_token * tokens_per_s_per_device / 1e12


def mfu(flops_per_token: float, tokens_per_s_per_device: float, peak: float | None) -> float | None:
    return None if not peak else model_tflops(flops_per_token, tokens_per_s_per_device) / peak


def memory_stats(device: torch.device) -> dict:
    gib = 2**30
    if device.type == "cuda":
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / gib,
                "mem_reserved_gib": torch.cuda.memory_reserved(device) / gib,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / gib}
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    kib = lambda k: int(fields[k].split()[0]) * 1024 / gib if k in fields else None  # noqa: E731
    return {"mem_rss_gib": kib("VmRSS"), "mem_peak_gib": kib("VmHWM")}


def gpu_hours_and_cost(elapsed_s: float, n_devices: int, price_per_gpu_hour: float, tokens_done: int,
                       tokens_total: int) -> dict:
    """Device-hours so far and projected for the planned tokens, × price (DeepSeek-V3's cost table)."""
    hours = elapsed_s * n_devices / 3600
    projected = hours * tokens_total / tokens_done if tokens_done else None
    return {"gpu_hours": hours, "cost_usd": hours * price_per_gpu_hour,
            "projected_gpu_hours": projected,
            "projected_cost_usd": projected * price_per_gpu_hour if projected is not None else None}


def expert_load_summary(load: torch.Tensor) -> dict:
    """From (n_moe_layers, n_experts) token counts of one step: per-layer balance and the normalised matrix."""
    load = load.double()
    mean = load.mean(dim=-1, keepdim=True).clamp(min=1e-9)
    norm = load / mean
    max_over_mean = norm.max(dim=-1).values
    cv = load.std(dim=-1, correction=0) / mean.squeeze(-1)
    return {"expert_load_max_over_mean": max_over_mean.mean().item(), "expert_load_cv": cv.mean().item(),
            "expert_load_max_over_mean_per_layer": max_over_mean.tolist(),
            "expert_load_cv_per_layer": cv.tolist(), "expert_load": norm.tolist()}


def bias_summary(biases: torch.Tensor) -> dict:
    b = biases.double()
    return {"expert_bias_mean": b.mean().item(), "expert_bias_std": b.std(correction=0).item(),
            "expert_bias_min": b.min().item(), "expert_bias_max": b.max().item()}


class Throughput:
    """Tokens/s over the last log interval and overall, not counting the first (warm-up) step."""

    def __init__(self):
        self.first = self.last = self.window_t = None
        self.total = self.window_tokens = 0

    def update(self, tokens: int, now: float) -> None:
        if self.first is None:  # the step that just ended was the warm-up: start the clock here
            self.first = self.window_t = self.last = now
            return
        self.total += tokens
        self.last = now

    def rate(self) -> float | None:
        if self.window_t is None or self.total == self.window_tokens or self.last <= self.window_t:
            return None
        r = (self.total - self.window_tokens) / (self.last - self.window_t)
        self.window_t, self.window_tokens = self.last, self.total
        return r

    def overall(self) -> float | None:
        if not self.total or self.last <= self.first:
            return None
        return self.total / (self.last - self.first)
