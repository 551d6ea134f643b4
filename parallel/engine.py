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


def resolve_device(name: str) -> torch.device:
    """`trainer.device` (auto, cpu, cuda) → the device; cuda without a visible GPU is a ConfigError."""
    from model.config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("trainer.device=cuda: no CUDA device is visible")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`trainer.dtype` (auto, fp32, bf16) on `device` → the compute dtype; auto = bf16 on CUDA, else fp32."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


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


def _without_shm_comm_op(deepspeed) -> None:
    """Keep DeepSpeed from JIT-building its CPU shared-memory all-reduce, `deepspeed_shm_comm`.

    DeepSpeed's communication backend (deepspeed/comm/torch.py `TorchBackend`) builds the op
    with torch.utils.cpp_extension whenever it is created on the CPU accelerator and
    `deepspeed.ops.__compatible_ops__` calls the op compatible; on CUDA there is no such
    builder. The op serves only `deepspeed.comm.inference_all_reduce` (DeepSpeed's inference
    tensor parallelism), which moeforge never calls and which falls back to the process group's
    all_reduce without it. The build costs tens of seconds on a cold cache, and a process killed
    during it leaves a `lock` in the extensions directory on which every later start waited
    forever. DeepSpeed reads the dict at that moment and keeps one dict per process (its
    ops/__init__.py: "edits to it persist"), so marking the op incompatible skips the build.
    """
    ops = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(ops, dict):
        ops["deepspeed_shm_comm"] = False


def keep_freed_host_memory() -> bool:
    """Training on the CPU: glibc keeps freed large blocks for reuse instead of unmapping them.

    By default a block above the (dynamic, at most 32 MiB) mmap threshold is a fresh mapping,
    and freed memory above the trim threshold goes back to the kernel, so every step's
    gradients and activations are page-faulted in again: 186,000 faults and 40% of a CPU step
    spent in the kernel (bench/checkpoint.py's larger model; 0.95 s per step, 0.55–0.70 s
    with this). A training process reaches its peak every step anyway. glibc only; returns
    whether it applied (elsewhere the allocator's defaults stay)."""
    import ctypes

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc <malloc.h>
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def init_distributed(device: torch.device, timeout_s: int = 600, startup_timeout_s: int = 600) -> None:
    """Initialise torch.distributed through DeepSpeed: NCCL on GPU, gloo on CPU.

    A single process started without torchrun gets a one-rank loopback group, so the same
    engine code path serves `python -m train` and `torchrun -m train`.

    Guarded by the startup watchdog (parallel/startup.py): when the process group and DeepSpeed's
    communication backend are not ready after `startup_timeout_s` (`trainer.startup_timeout_s`;
    $MOEFORGE_STARTUP_TIMEOUT_S overrides it, 0 = no watchdog), the process prints one line naming
    what it waits for and exits with `EXIT_STARTUP_TIMEOUT` (5).
    """
    from .startup import StartupWatchdog, startup_timeout

    env = DistEnv.from_environ()
    with StartupWatchdog(startup_timeout(startup_timeout_s), rank=env.rank, world_size=env.world_size):
        _init_distributed(device, timeout_s)


def _init_distributed(device: torch.device, timeout_s: int) -> None:
    import deepspeed
    import torch.distributed as dist

    if device.type == "cpu":
        _without_shm_comm_op(deepspeed)
        keep_freed_host_memory()
    backend = "nccl" if device.type == "cuda" else "gloo"
    # A peer that dies mid-collective must end the others in bounded time: the launch scripts
    # (launch/torchrun.sh checks the value) and the two-node test set MOEFORGE_DIST_TIMEOUT_S.
    timeout_s = int(os.environ.get("MOEFORGE_DIST_TIMEOUT_S", timeout_s))
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
        # One process: an in-memory store. The env:// default would host a TCPStore server
        # thread in this process, and a run that exited while that thread was still joinable
        # aborted ("terminate called without an active exception", exit -6) — seen only in
        # single-process runs, never under torchrun, where the agent hosts the store.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    elif "TORCHELASTIC_RESTART_COUNT" in os.environ and not dist.is_initialized():
        _init_under_torchrun(backend, timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout)  # adopts an existing group


def _init_under_torchrun(backend: str, timeout: datetime.timedelta) -> None:
    """The default process group under torchrun, on a store namespace of this restart's own.

    After torchrun restarted its workers (MAX_RESTARTS) because one died in a collective, the
    env:// rendezvous of torch 2.13 let gloo read the dead worker's address: the new group failed
    with "connectFullMesh … Connection refused" or hung (measured on CPU with a plain torch script
    and with the trainer). A prefix per restart (`TORCHELASTIC_RESTART_COUNT`) on the agent's
    store gives every attempt fresh keys."""
    import torch.distributed as dist

    # torch's own env:// store (the agent's, as torch would open it: a TCPStore client of its own
    # would outlive the group and abort the process at exit), under a prefix of this restart.
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    prefix = f"moeforge/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}"
    dist.init_process_group(backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world,
                            timeout=timeout)


def deepspeed_config(*, micro_batch_size: int, grad_accum: int, zero_stage: int, grad_clip: float,
                     bf16: bool, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                     device_type: str, extra: dict | None = None) -> dict:
    """The DeepSpeed JSON config (the pipeline engine reads the same keys).

    `extra` (`parallel.deepspeed`) is merged in last, key by key into nested mappings (a value
    that is not a mapping replaces ours). parallel/ds_config.py `check_deepspeed` has already refused
    the keys set here from moeforge's own config and checked the rest against DeepSpeed's schema.

    `zero_stage` is the stage DeepSpeed runs, from `Layout.zero_stage` (parallel/topology.py),
    which holds the rule below. bf16: bf16 weights and gradients, fp32 master weights and fp32 gradient accumulation (as
    DeepSeek-V3 keeps them, report §3.3.3; the Adam moments stay fp32 here). DeepSpeed picks its
    optimizer wrapper from (zero stage, grad_accum_dtype, pipeline):
    - ZeRO stage 0, 1 → `Layout.zero_stage` gives stage 1, with `grad_accum_dtype: fp32`, i.e. `BF16_Optimizer` (fp32
      masters and moments partitioned over data-parallel ranks, fp32 gradient accumulators,
      reduced in fp32), with or without a pipeline, at dp = 1 too. DeepSpeed refuses fp32
      accumulation without ZeRO, and its stage-0 choices are worse: `FP16_UnfusedOptimizer`
      without a pipeline (bf16 accumulation, its checkpointable state is keyed by fp32 copies
      parallel/state.py cannot address, and it takes one AdamW step with zero gradients when
      built: step count 1 and one weight decay before training; measured, the loss after the
      first update was 6.023 against 5.956 in fp32) and `BF16_Optimizer` with bf16
      accumulation under a pipeline.
    - ZeRO stage 2 → `DeepSpeedZeroOptimizer` (bf16 parameters, fp32 partitions, fp32
      accumulation of the gradient partitions).
    docs/parallel.md has the table; tests/distributed/test_bf16.py checks it.
    """
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
        cfg["data_types"] = {"grad_accum_dtype": "fp32"}
        if zero_stage < 1:
            raise ValueError("bf16 needs ZeRO stage >= 1 (Layout.zero_stage gives it; see the docstring)")

    import copy

    def merge(into: dict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(into.get(key), dict):
                merge(into[key], value)
            else:
                into[key] = copy.deepcopy(value)

    merge(cfg, extra or {})
    return cfg


def initialize(module: torch.nn.Module, param_groups: list[dict], ds_config: dict, startup_timeout_s: int = 600):
    """deepspeed.initialize → (engine, optimizer), under the startup watchdog: on GPU DeepSpeed
    JIT-builds its fused Adam here (`torch.utils.cpp_extension`, the same lock file as the
    communication op), so a build lock left by a killed process is named in one line instead
    of a silent wait (parallel/startup.py)."""
    import deepspeed

    from .startup import StartupWatchdog, startup_timeout

    env = DistEnv.from_environ()
    with StartupWatchdog(startup_timeout(startup_timeout_s), rank=env.rank, world_size=env.world_size,
                         what="deepspeed.initialize (optimizer and ZeRO setup)"):
        engine, optimizer, _, _ = deepspeed.initialize(model=module, model_parameters=param_groups,
                                                       config=ds_config)
    return engine, optimizer
