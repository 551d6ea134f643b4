"""The `cluster` config group: what the hardware offers, for the planner and the launch scripts.

The trainer itself reads nothing here (it measures its own device); `python -m train.plan`
turns these numbers into memory, time and communication estimates, and launch/env/<name>.sh
holds the matching NCCL and allocator settings. Bandwidths are per GPU and per direction,
as achieved by NCCL rather than the datasheet's bidirectional totals.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError


@dataclass
class ClusterConfig:
    """One cluster profile (conf/cluster/<name>.yaml); every number carries its reason there."""

    name: str = "local"
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gib: float = 16.0  # usable memory of one device
    peak_bf16_tflops: float = 0.0  # dense peak per device; 0 = unknown (no time estimate)
    peak_fp8_tflops: float = 0.0  # dense FP8 peak; 0 = no FP8
    nvlink_gbps: float = 0.0  # GB/s per GPU per direction inside a node
    ib_gbps: float = 0.0  # GB/s per GPU per direction between nodes
    efficiency: float = 0.5  # fraction of the peak the model's FLOPs reach (`python -m train.plan --calibrate` fits it)
    comm_overlap: float = 0.0  # fraction of PP/DP communication hidden behind compute (EP: train/timing.py MEASURED_OVERLAP)
    sms: int = 0  # streaming multiprocessors per GPU; 0 = unknown (no SM-reservation term)
    reserved_gib: float = 0.0  # CUDA context, NCCL buffers, allocator slack per device
    dtype: str = "bf16"  # compute precision the planner assumes: bf16 | fp32

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> "ClusterConfig":
        for key in ("nodes", "gpus_per_node"):
            if getattr(self, key) < 1:
                raise ConfigError(f"cluster.{key}={getattr(self, key)}: must be >= 1")
        for key in ("gpu_memory_gib", "efficiency"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"cluster.{key}={getattr(self, key)}: must be > 0")
        for key in ("peak_bf16_tflops", "peak_fp8_tflops", "nvlink_gbps", "ib_gbps", "reserved_gib", "sms"):
            if getattr(self, key) < 0:
                raise ConfigError(f"cluster.{key}={getattr(self, key)}: must be >= 0")
        if self.efficiency > 1:
            raise ConfigError(f"cluster.efficiency={self.efficiency}: a fraction of the peak, must be <= 1")
        if not 0 <= self.comm_overlap <= 1:
            raise ConfigError(f"cluster.comm_overlap={self.comm_overlap}: must be in [0, 1]")
        if self.dtype not in ("bf16", "fp32"):
            raise ConfigError(f"cluster.dtype={self.dtype!r}: must be bf16 or fp32")
        return self
