"""Pipeline parallelism: the DeepSeek-V3 model as a DeepSpeed PipelineModule.

DeepSpeed owns the schedule (1F1B `TrainSchedule`), the p2p transfers, the tied-weight
gradient reduction and activation checkpointing; this file only cuts the model into layer
specs, as Megatron-DeepSpeed's GPTModelPipe does for GPT:

    [embed (tied "embed")] [block 0] … [block L-1] [next-token embed (tied "embed"), MTP only] [output]

- Activations between layers are tuples `(h, labels[, position_ids])`: the labels travel with
  the hidden state as an integer tensor (no gradient), because MTP on the last stage embeds the
  next tokens t_{i+k} = labels[:, i+k-1] and DeepSpeed hands the last stage nothing else from
  the batch before the loss function. Position ids travel the same way when the loader makes
  them (document-aware runs); each block stage rebuilds the document mask from them
  (model/attention.py), so no (T × T) mask crosses a stage boundary.
- The MTP modules sit on the last stage with the head; they need the input embedding, which
  lives on the first stage: the second `TiedLayerSpec("embed")` gives the last stage its own
  replica, and DeepSpeed all-reduces the two replicas' gradients after every backward.
- The output layer computes the main and MTP cross-entropies itself (the MTP depths through
  model/mtp.py `mtp_losses`, as the single-process model) and returns both; the engine's loss
  function combines them as main + λ·MTP and keeps the parts for logging.
- Each layer builds and initialises only its own weights, on the meta device first, with the
  layout-independent seeds of model/init.py, so every layout starts from the single-process
  weights; expert-parallel ranks build only their experts.
- Partition: contiguous stages minimising the largest stage cost, by parameters, by training
  FLOPs, uniform over blocks, or an explicit per-layer cost list; the embedding always goes
  with block 0 and the output (+ MTP) with the last block.
"""

from __future__ import annotations

import torch
from torch import nn

from model.attention import document_mask
from model.block import Block
from model.config import ConfigError, ModelConfig
from model.flops import attention_flops_per_token, block_params
from model.init import init_weights_
from model.moe import moe_layers
from model.mtp import MTPModule, cross_entropy, mtp_losses
from model.norm import RMSNorm
from model.rope import rope_tables

PARTITIONS = ("parameters", "flops", "uniform")


class _Rope(nn.Module):
    """RoPE tables for one layer (non-persistent buffers, rebuilt from the config)."""

    def __init__(self, cfg: ModelConfig, device):
        super().__init__()
        cos, sin = rope_tables(cfg, cfg.max_seq_len, device=device)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def tables(self, T: int, position_ids: torch.Tensor | None):
        if position_ids is None:
            return self.cos[:T], self.sin[:T]
        return self.cos[position_ids], self.sin[position_ids]


class SharedEmbedding(nn.Embedding):
    """The input embedding; tied between the first stage and the MTP modules on the last."""

    def __init__(self, cfg: ModelConfig, seed: int):
        with torch.device("meta"):
            super().__init__(cfg.vocab_size, cfg.dim)
        self.to_empty(device="cpu")
        init_weights_(self, cfg.init_std, seed, prefix="embed")


def embed_inputs(embed: SharedEmbedding, inputs: tuple) -> tuple:
    input_ids, labels, *pos = inputs
    return (embed(input_ids), labels, *pos)


def embed_next_tokens(embed: SharedEmbedding, act: tuple) -> tuple:
    """Append the embeddings of t_{i+1} = labels[:, i] for MTP (ignored labels still need an input)."""
    h, labels, *pos = act
    return (h, embed(labels.clamp(min=0)), labels, *pos)


def _materialise(module: nn.Module, cfg: ModelConfig, seed: int, prefix: str, expert_parallel=None) -> nn.Module:
    if expert_parallel is not None:
        from .expert import shard_experts

        group, ep, ep_rank = expert_parallel
        shard_experts(module, group, ep, ep_rank)
    module.to_empty(device="cpu")
    init_weights_(module, cfg.init_std, seed, prefix=prefix)
    return module


class BlockPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, seed: int, expert_parallel=None,
                 checkpointed: bool = False, attention: str = "sdpa"):
        super().__init__()
        self.attention = attention
        with torch.device("meta"):
            block = Block(layer_id, cfg)
        self.block = _materialise(block, cfg, seed, f"layers.{layer_id}", expert_parallel)
        self.rope = _Rope(cfg, "cpu")
        for moe in moe_layers(self):
            moe.count_when_grad = not checkpointed

    def forward(self, act: tuple) -> tuple:
        h, labels, *pos = act
        position_ids = pos[0] if pos else None
        cos, sin = self.rope.tables(h.size(1), position_ids)
        return (self.block(h, cos, sin, document_mask(position_ids, self.attention)), labels, *pos)


class OutputPipe(nn.Module):
    """Final norm, head and MTP depths; returns stack([main CE, mean MTP CE])."""

    def __init__(self, cfg: ModelConfig, seed: int, expert_parallel=None, attention: str = "sdpa"):
        super().__init__()
        self.attention = attention
        with torch.device("meta"):
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
            self.mtp = nn.ModuleDict({str(k): MTPModule(k, cfg) for k in range(cfg.n_mtp_layers)})
        for name in ("norm", "head", "mtp"):
            _materialise(getattr(self, name), cfg, seed, name, expert_parallel)
        self.rope = _Rope(cfg, "cpu")

    def forward(self, act: tuple) -> torch.Tensor:
        if self.mtp:
            h, next_emb, labels, *pos = act
        else:
            h, labels, *pos = act
        h = self.norm(h)
        main = cross_entropy(self.head(h), labels)
        if not self.mtp:
            return torch.stack([main, main.new_zeros(())])
        mtp = mtp_losses(self.mtp.values(), self.head, h, labels, next_emb, self.rope.cos, self.rope.sin,
                         pos[0] if pos else None, attention=self.attention)
        return torch.stack([main, mtp])


# ------------------------------------------------------------------ partition
def layer_costs(cfg: ModelConfig, method: str, seq_len: int) -> list[float]:
    """Costs of [embedding, block 0 … block L-1, output (+ MTP)] for `method`."""
    V, D, L = cfg.vocab_size, cfg.dim, cfg.n_layers
    mtp_ids = [L + k for k in range(cfg.n_mtp_layers)]
    mtp_extra = cfg.n_mtp_layers * (4 * D + 2 * D * D)
    if method == "parameters":
        return ([V * D] + [block_params(cfg, i).total for i in range(L)]
                + [V * D + D + mtp_extra + sum(block_params(cfg, i).total for i in mtp_ids)])
    if method == "flops":
        attn = attention_flops_per_token(cfg, seq_len)
        blocks = [6 * block_params(cfg, i).activated + attn for i in range(L)]
        tail = 6 * V * D * (1 + cfg.n_mtp_layers) + sum(6 * block_params(cfg, i).activated + attn for i in mtp_ids)
        return [0.0] + blocks + [tail + 6 * mtp_extra]
    if method == "uniform":
        return [0.0] + [1.0] * L + [0.0]
    raise ConfigError(f"parallel.partition={method!r}: must be one of {', '.join(PARTITIONS)}")


def balanced_stages(costs: list[float], pp: int) -> list[int]:
    """Block boundaries [0, b1, …, L] of pp contiguous non-empty stages minimising the largest cost.

    `costs` are [embed, blocks…, output]: the embedding is charged to the first block's stage
    and the output to the last block's. Exact dynamic programme, O(pp · L²).
    """
    blocks = list(costs[1:-1])
    blocks[0] += costs[0]
    blocks[-1] += costs[-1]
    L = len(blocks)
    prefix = [0.0]
    for c in blocks:
        prefix.append(prefix[-1] + c)
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(pp + 1)]  # best[s][i]: first i blocks in s stages
    cut = [[0] * (L + 1) for _ in range(pp + 1)]
    best[0][0] = 0.0
    for s in range(1, pp + 1):
        for i in range(s, L - (pp - s) + 1):
            for j in range(s - 1, i):
                v = max(best[s - 1][j], prefix[i] - prefix[j])
                if v < best[s][i]:
                    best[s][i], cut[s][i] = v, j
    bounds, i = [L], L
    for s in range(pp, 0, -1):
        i = cut[s][i]
        bounds.append(i)
    return bounds[::-1]


def spec_parts(block_bounds: list[int], has_mtp: bool) -> list[int]:
    """DeepSpeed `parts` over the layer specs from block boundaries (spec 0 is the embedding)."""
    n_specs = 1 + block_bounds[-1] + (2 if has_mtp else 1)
    return [0] + [b + 1 for b in block_bounds[1:-1]] + [n_specs]


# ------------------------------------------------------------------ module
class PipelineLoss:
    """The engine's loss function: main + λ·MTP; keeps the detached parts of every micro-batch."""

    def __init__(self, mtp_lambda: float = 0.3):
        self.mtp_lambda = mtp_lambda
        self.parts: list[torch.Tensor] = []
        self.fault = None  # (tests) injected fault: a function of the loss, applied to every micro-batch

    def __call__(self, outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        del labels  # they travelled with the activations
        if self.fault is not None:
            outputs = self.fault(outputs)
        self.parts.append(outputs.detach())
        return outputs[0] + self.mtp_lambda * outputs[1]

    def peek(self) -> torch.Tensor:
        """Sum of (main, mtp) over the micro-batches since the last take (zeros off the last stage)."""
        return torch.stack(self.parts).sum(0) if self.parts else torch.zeros(2)

    def take(self) -> torch.Tensor:
        total = self.peek()
        self.parts = []
        return total


def build_pipeline(cfg: ModelConfig, *, pp: int, seed: int, partition: str = "parameters",
                   layer_costs_override: list[float] | None = None, seq_len: int = 0,
                   activation_checkpoint_interval: int = 0, expert_parallel=None, topology=None,
                   attention: str = "sdpa"):
    """A DeepSpeed PipelineModule of the model; `expert_parallel` = (group, ep, ep_rank) or None;
    `attention` is the document-mask backend (model/attention.py)."""
    from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
    from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
    from deepspeed.runtime.activation_checkpointing import checkpointing

    has_mtp = cfg.n_mtp_layers > 0
    costs = list(layer_costs_override) if layer_costs_override else layer_costs(cfg, partition, seq_len)
    if len(costs) != cfg.n_layers + 2:
        raise ConfigError(f"parallel.layer_costs: {len(costs)} values; need n_layers + 2 = {cfg.n_layers + 2} "
                          "(embedding, each block, output)")
    parts = spec_parts(balanced_stages(costs, pp), has_mtp)
    ckpt = activation_checkpoint_interval > 0
    specs = [TiedLayerSpec("embed", SharedEmbedding, cfg, seed, forward_fn=embed_inputs)]
    specs += [LayerSpec(BlockPipe, cfg, i, seed, expert_parallel, ckpt, attention) for i in range(cfg.n_layers)]
    if has_mtp:
        specs.append(TiedLayerSpec("embed", SharedEmbedding, cfg, seed, forward_fn=embed_next_tokens))
    specs.append(LayerSpec(OutputPipe, cfg, seed, expert_parallel, attention))

    class MoEForgePipe(PipelineModule):
        def _partition_layers(self, method="uniform"):
            self.parts = parts
            stage = self._topo.get_coord(self.global_rank).pipe
            self._set_bounds(start=parts[stage], stop=parts[stage + 1])

    import torch.distributed as dist

    world = dist.get_world_size()
    topo = topology or PipeDataParallelTopology(num_pp=pp, num_dp=world // pp)
    loss = PipelineLoss()
    module = MoEForgePipe(layers=specs, topology=topo, loss_fn=loss, partition_method="moeforge",
                          activation_checkpoint_interval=activation_checkpoint_interval,
                          activation_checkpoint_func=checkpointing.checkpoint,
                          checkpointable_layers=["BlockPipe"])
    return module, loss
