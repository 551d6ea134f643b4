"""One process's share of the model for a non-pipeline layout (pp = 1).

Built on the meta device, experts sharded for expert parallelism, then materialised and
initialised with the layout-independent seeds of model/init.py: every rank of every layout
starts from the weights of the single-process model, and no rank ever allocates experts it
does not hold. (The pipeline path builds per layer in parallel/pipeline.py the same way.)
"""

from __future__ import annotations

import torch

from model import Transformer
from model.config import ModelConfig

from .expert import mark_for_deepspeed, shard_experts
from .topology import Groups


def build_model(cfg: ModelConfig, *, seed: int, device: torch.device, groups: Groups | None = None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    ep = groups.layout.ep if groups is not None else 1
    if ep > 1:
        shard_experts(model, groups.ep, ep, groups.ep_rank)
    model.to_empty(device=device)
    model.init_weights(seed)
    if ep > 1:
        mark_for_deepspeed(model, ep, groups.ep_group_name)
    return model
