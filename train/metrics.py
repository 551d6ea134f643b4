"""Training metrics: throughput, MFU against known device peaks, memory, expert load, cost.

MFU follows PaLM (Chowdhery et al. 2022, appendix B): model FLOPs per token (model/flops.py)
× tokens/s per device, over the device's dense peak. As torchtitan (tools/utils.py
`get_peak_flops`) and OLMo-core (train/callbacks/speed_monitor.py) do, the peak comes from a
table of datasheet numbers keyed by the CUDA device name; unlike both, an unknown device or a
CPU gives `None` and MFU is reported as null rather than against a guessed peak (OLMo-core
falls back to the A100's, torchtitan to inf). The throughput window skips the first step, as
OLMo-core's speed monitor does: it carries compilation and allocator warm-up.

Everything here is a plain function of numbers or tensors: no process groups (the trainer
reduces before calling) and no state but the `Throughput` timer.
"""

from __future__ import annotations

import re
import resource
import sys
import time
from pathlib import Path

import torch

GIB = 2**30

# Dense (no-sparsity) peak TFLOP/s as (BF16, FP8 or None), from vendor datasheets, matched as a
# case-insensitive whole-word substring of torch.cuda.get_device_name(), longest key first: so
# "H100 PCIe" wins over "H100", and "H20" cannot match "H200", "B200" "GB200", "A40" "RTX A4000".
PEAK_TFLOPS: dict[str, tuple[float, float | None]] = {
    "H100": (989.0, 1979.0),  # SXM; torch reports e.g. "NVIDIA H100 80GB HBM3"
    "H100 PCIe": (756.0, 1513.0),
    "H100 NVL": (835.0, 1671.0),
    "H800": (989.0, 1979.0),  # H800 SXM: H100 compute, cut NVLink (DeepSeek-V3's GPU)
    "H800 PCIe": (756.0, 1513.0),
    "H200": (989.0, 1979.0),
    "H200 NVL": (835.0, 1671.0),
    "GH200": (989.0, 1979.0),
    "H20": (148.0, 296.0),
    "B200": (2250.0, 4500.0),
    "GB200": (2500.0, 5000.0),
    "A100": (312.0, None),
    "A800": (312.0, None),
    "A40": (149.7, None),
    "L40S": (362.0, 733.0),
    "L40": (181.0, 362.0),
    "L4": (121.0, 242.5),
    "MI300X": (1307.4, 2614.9),
    "MI325X": (1307.4, 2614.9),
}


def lookup_peak_tflops(device_name: str, fp8: bool = False) -> float | None:
    """Dense peak TFLOP/s of a device by name (BF16, or FP8 when `fp8`); None when unknown."""
    name = device_name.casefold()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if re.search(rf"(?<![a-z0-9]){re.escape(key.casefold())}(?![a-z0-9])", name):
            bf16, f8 = PEAK_TFLOPS[key]
            return f8 if fp8 else bf16
    return None


def peak_tflops(device: torch.device | str, override: float | None = None, fp8: bool = False) -> float | None:
    """The peak MFU is measured against: `override` when given (logging.peak_tflops), else the
    CUDA device's table entry; None on a CPU or an unknown device (MFU is then null)."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"logging.peak_tflops={override}: must be > 0 (or null to look the device up)")
        return float(override)
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return lookup_peak_tflops(torch.cuda.get_device_name(device), fp8=fp8)


def model_tflops(flops_per_token: float, tokens_per_s_per_device: float) -> float:
    """Achieved model TFLOP/s per device (model FLOPs only: no recomputation, no padding)."""
    return flops_per_token * tokens_per_s_per_device / 1e12


def mfu(flops_per_token: float, tokens_per_s_per_device: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation as a fraction (0.38 = 38%); None without a peak or a rate."""
    if not peak_tflops or tokens_per_s_per_device is None:
        return None
    return model_tflops(flops_per_token, tokens_per_s_per_device) / peak_tflops


def memory_stats(device: torch.device | str) -> dict:
    """Memory of this process in GiB.

    CUDA: mem_allocated_gib / mem_reserved_gib (now), mem_peak_gib (peak allocated since start
    or the last torch.cuda.reset_peak_memory_stats), mem_alloc_retries (the caching allocator
    freed its cache and retried: fragmentation close to OOM; torchtitan logs it too).
    CPU: mem_rss_gib (resident set now) and mem_peak_gib (peak resident set), from
    /proc/self/status, or getrusage's peak where /proc is absent.
    """
    device = torch.device(device)
    if device.type == "cuda":
        stats = torch.cuda.memory_stats(device)
        return {"mem_allocated_gib": torch.cuda.memory_allocated(device) / GIB,
                "mem_reserved_gib": torch.cuda.memory_reserved(device) / GIB,
                "mem_peak_gib": torch.cuda.max_memory_allocated(device) / GIB,
                "mem_alloc_retries": int(stats.get("num_alloc_retries", 0))}
    status = Path("/proc/self/status")
    if status.exists():
        fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        kib = {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM") if k in fields}
        if kib:
            return {"mem_rss_gib": kib.get("VmRSS", 0) * 1024 / GIB,
                    "mem_peak_gib": kib.get("VmHWM", kib.get("VmRSS", 0)) * 1024 / GIB}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024
    return {"mem_rss_gib": None, "mem_peak_gib": peak_bytes / GIB}


def gpu_hours_and_cost(elapsed_s: float, n_devices: int, price_per_gpu_hour: float, tokens_done: int,
                       tokens_total: int) -> dict:
    """Device-hours and their price so far, and projected for the planned tokens.

    As DeepSeek-V3's cost table (report Table 1: GPU-hours × $2 per H800 hour). The projection
    extrapolates the run's average tokens per device-hour, start-up included, so it is an upper
    estimate early in a run and tightens as the run goes; None before any token is counted.
    """
    hours = elapsed_s * n_devices / 3600.0
    projected = hours * tokens_total / tokens_done if tokens_done > 0 else None
    return {"gpu_hours": hours, "cost_usd": hours * price_per_gpu_hour,
            "projected_gpu_hours": projected,
            "projected_cost_usd": projected * price_per_gpu_hour if projected is not None else None}


def expert_load_summary(load: torch.Tensor) -> dict:
    """Balance of one step's routed-token counts `load` (n_moe_layers, n_experts).

    Per layer: max/mean load (1 = perfectly balanced; what bounds an expert-parallel step, as
    the busiest expert sets its time), min/mean (0 = a dead expert) and the coefficient of
    variation std/mean (population std). Scalars are means over layers. "expert_load" is the
    matrix normalised by each layer's mean, rounded to 3 decimals, for the report's heatmaps:
    at DeepSeek-V3's 58 × 256 it is still ~90 KB of JSON per logged step. Empty input: {}.
    """
    if load.numel() == 0:
        return {}
    if load.ndim != 2:
        raise ValueError(f"expert_load_summary: load has shape {tuple(load.shape)}, expected (n_moe_layers, "
                         "n_experts)")
    load = load.detach().double().cpu()
    mean = load.mean(dim=-1, keepdim=True).clamp(min=1e-12)  # a layer that saw no token: all zeros
    norm = load / mean  # (L, E)
    max_over_mean = norm.max(dim=-1).values
    min_over_mean = norm.min(dim=-1).values
    cv = norm.std(dim=-1, correction=0)
    return {"expert_load_max_over_mean": max_over_mean.mean().item(),
            "expert_load_min_over_mean": min_over_mean.mean().item(),
            "expert_load_cv": cv.mean().item(),
            "expert_load_max_over_mean_per_layer": max_over_mean.tolist(),
            "expert_load_cv_per_layer": cv.tolist(),
            "expert_load": norm.mul(1000).round().div(1000).tolist()}  # 3 decimals: ~5 chars a value


def bias_summary(biases: torch.Tensor) -> dict:
    """Mean, std (population), min and max of the routers' e_score_correction_bias, all layers."""
    if biases.numel() == 0:
        return {}
    b = biases.detach().double().cpu()
    return {"expert_bias_mean": b.mean().item(), "expert_bias_std": b.std(correction=0).item(),
            "expert_bias_min": b.min().item(), "expert_bias_max": b.max().item()}


class Throughput:
    """Tokens/s over the last log window and over the run, not counting the first step.

    Call `update(tokens)` after every optimizer step; `rate()` at each log returns tokens/s
    since the previous `rate()` call (or since the end of the first step) and starts a new
    window. The first step's tokens and time are dropped: the clock starts when it ends.
    """

    def __init__(self) -> None:
        self.first: float | None = None  # end of the first (warm-up) step
        self.last: float | None = None  # end of the latest step
        self.window_start: float | None = None
        self.total = 0  # tokens since the clock started
        self.window_tokens = 0  # `total` at the window's start

    def update(self, tokens: int, now: float | None = None) -> None:
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = self.window_start = self.last = now
            return
        self.total += tokens
        self.last = now

    def rate(self) -> float | None:
        """Tokens/s since the last call; None when nothing was counted in between."""
        if self.window_start is None or self.total == self.window_tokens or self.last <= self.window_start:
            return None
        r = (self.total - self.window_tokens) / (self.last - self.window_start)
        self.window_start, self.window_tokens = self.last, self.total
        return r

    def overall(self) -> float | None:
        """Tokens/s from the end of the first step to the latest one."""
        if not self.total or self.first is None or self.last <= self.first:
            return None
        return self.total / (self.last - self.first)
