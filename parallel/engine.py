"""DeepSpeed engine construction from our typed config.

DeepSpeed owns what it already does well — gradient accumulation, the data-parallel gradient
reduction, ZeRO-1/2 optimizer sharding, gradient clipping, bf16 master weights — and we hand
it a plain config dict built here, so the user never edits a DeepSpeed JSON. Followed
Megatron-DeepSpeed's and DeepSpeed-Chat's pattern of generating the dict in code (not
torchtitan's FSDP2 route, since DeepSpeed is the engine this product is built on).

The learning rate is not DeepSpeed's: the trainer sets it on the optimizer's param groups
before each step, from train/schedule.py, so every schedule (and the batch-size ramp) lives in
one place and is checkpointed as plain numbers.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass

import torch


@dataclass
class DistEnv:
    """Process facts known before any process group exists (torchrun's environment)."""

    rank: int
    world_size: int
    local_rank: int

    @classmethod
    def from_environ(cls) -> "DistEnv":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: torch.device, timeout_s: int = 600) -> None:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPU, gloo on CPU.

    A single process started without torchrun gets a one-rank loopback group, so the same
    engine code path serves `python -m train` and `torchrun -m train`.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    backend = "nccl" if device.type == "cuda" else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, zero_stage: int, grad_clip: float,
                     bf16: bool, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                     device_type: str) -> dict:
    """The DeepSpeed JSON config for a dp-only (non-pipeline) run."""
    cfg = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": lr, "betas": list(betas), "eps": eps, "weight_decay": weight_decay,
                       # DeepSpeed's fused CPU Adam needs a compiled op; torch's AdamW runs everywhere.
                       "torch_adam": device_type != "cuda", "adam_w_mode": True},
        },
        "steps_per_print": 2**31 - 1,  # our logger prints; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    if bf16:
        cfg["bf16"] = {"enabled": True}
    return cfg


def initialize(module: torch.nn.Module, param_groups: list[dict], ds_config: dict):
    """deepspeed.initialize → (engine, optimizer)."""
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups, config=ds_config)
    return engine, optimizer
