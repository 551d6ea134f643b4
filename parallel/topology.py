"""The parallel layout: world = pp × dp, expert parallelism (ep) inside dp.

Rank order follows DeepSpeed's PipeDataParallelTopology (pipe is the outer axis): stage s holds
ranks s·dp … s·dp + dp − 1, so `rank % dp` is the data-parallel rank and both ends of one
pipeline replica read the same batch. Inside a stage the expert-parallel groups are ep
consecutive data-parallel ranks and the expert-data-parallel groups stride by ep — the order
DeepSpeed's `groups._create_expert_and_data_parallel` uses, which we call so that DeepSpeed's
own gradient reduction and ZeRO partitioning see the same groups as our dispatcher
(Megatron-Core orders its expert groups the same way inside a pipeline stage).

`Layout.check` runs before any process group exists; `build_groups` creates every group once,
collectively on every rank in the same order (`dist.new_group` is collective over the world;
lazily creating groups on the stages that need them hangs the others).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from model.config import ConfigError, ModelConfig


@dataclass(frozen=True)
class Layout:
    world: int
    pp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.world // self.pp

    @property
    def edp(self) -> int:
        """Expert-data-parallel size: replicas of each expert."""
        return self.dp // self.ep

    def zero_stage(self, requested: int, bf16: bool) -> int:
        """The ZeRO stage DeepSpeed runs for `parallel.zero_stage=requested`: none at dp = 1
        (nothing to partition), and at least 1 in bf16, where stages 0 and 1 both run DeepSpeed's
        BF16_Optimizer with FP32 gradient accumulation (parallel/engine.py `deepspeed_config`)."""
        stage = requested if self.dp > 1 else 0
        return max(stage, 1) if bf16 else stage

    def check(self, model: ModelConfig | None = None, zero_stage: int | None = None) -> "Layout":
        """One-line ConfigError naming the values when the layout cannot run."""
        if self.pp < 1 or self.ep < 1:
            raise ConfigError(f"parallel.pp={self.pp}, parallel.ep={self.ep}: must be >= 1")
        if self.world % self.pp:
            raise ConfigError(f"parallel.pp={self.pp}: does not divide the world size {self.world}")
        if self.dp % self.ep:
            raise ConfigError(f"parallel.ep={self.ep}: does not divide dp={self.dp} "
                              f"(world {self.world} / pp {self.pp}); expert parallelism lives inside dp")
        if model is not None:
            if model.n_routed_experts % self.ep:
                raise ConfigError(f"parallel.ep={self.ep}: does not divide model.n_routed_experts="
                                  f"{model.n_routed_experts}")
            if self.pp > model.n_layers:
                raise ConfigError(f"parallel.pp={self.pp}: more pipeline stages than model.n_layers={model.n_layers}")
            if self.ep > 1 and model.n_layers <= model.n_dense_layers:
                raise ConfigError(f"parallel.ep={self.ep}: the model has no MoE layer "
                                  f"(model.n_dense_layers={model.n_dense_layers} >= n_layers={model.n_layers})")
        if zero_stage is not None and self.pp > 1 and zero_stage > 1:
            raise ConfigError(f"parallel.zero_stage={zero_stage}: DeepSpeed's pipeline engine allows ZeRO stage "
                              f"0 or 1 only (parallel.pp={self.pp})")
        return self

    # ------------------------------------------------------------ coordinates
    def stage_of(self, rank: int) -> int:
        return rank // self.dp

    def dp_rank_of(self, rank: int) -> int:
        return rank % self.dp

    def ep_rank_of(self, rank: int) -> int:
        return self.dp_rank_of(rank) % self.ep

    def dp_ranks(self, stage: int) -> list[int]:
        return list(range(stage * self.dp, (stage + 1) * self.dp))

    def ep_ranks(self, rank: int) -> list[int]:
        start = self.stage_of(rank) * self.dp + (self.dp_rank_of(rank) // self.ep) * self.ep
        return list(range(start, start + self.ep))

    def edp_ranks(self, rank: int) -> list[int]:
        stage0 = self.stage_of(rank) * self.dp
        return list(range(stage0 + self.ep_rank_of(rank), stage0 + self.dp, self.ep))


@dataclass
class Groups:
    """The process groups of one rank, built once and passed explicitly."""

    layout: Layout
    rank: int
    dp: object  # data-parallel group of this rank's stage (None at dp = 1)
    ep: object  # expert-parallel group (None at ep = 1)
    ep_group_name: str  # DeepSpeed's name for the expert groups ("ep_size_{ep}")

    @property
    def stage(self) -> int:
        return self.layout.stage_of(self.rank)

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank_of(self.rank)


def build_groups(layout: Layout, rank: int) -> Groups:
    """Create the data-parallel groups of every stage and DeepSpeed's expert groups, on every rank."""
    dp_group = None
    for stage in range(layout.pp):
        ranks = layout.dp_ranks(stage)
        group = dist.new_group(ranks) if layout.world > 1 else None
        if rank in ranks and layout.dp > 1:
            dp_group = group
    name = f"ep_size_{layout.ep}"
    ep_group = None
    if layout.ep > 1:
        from deepspeed.utils import groups as ds_groups

        ds_groups._create_expert_and_data_parallel(layout.ep, pp_size=layout.pp)
        ep_group = ds_groups._get_expert_parallel_group(name)
        got = sorted(dist.get_process_group_ranks(ep_group))
        if got != layout.ep_ranks(rank):  # DeepSpeed changed its rank order: our dispatcher would be wrong
            raise RuntimeError(f"DeepSpeed's expert-parallel group {got} differs from the expected "
                               f"{layout.ep_ranks(rank)} on rank {rank}")
    return Groups(layout, rank, dp_group, ep_group, name)
