"""Layout-independent weight initialisation.

Every tensor is drawn from its own generator, seeded by (base seed, the parameter's name in the
full single-device model, and for routed experts the global expert id). A pipeline stage that
builds only its blocks, or an expert-parallel rank that holds only its experts, therefore gets
bit-for-bit the weights the single-process model has, without materialising the rest — what
makes every layout start from the same point (parity tests) and lets huge models be built on
the meta device and materialised per rank. torchtitan re-initialises per stage with one
shared RNG stream, so its stages differ from a 1-stage run; Megatron seeds per tensor-parallel
rank. Neither gives layout-independent weights, which moeforge's parity and elastic-resume
goals need.

Rules by parameter role, not by the class of the module holding it, so every precision backend
(nn.Linear, Fp8Linear, Transformer Engine's Linear, whatever registers a `weight`) draws the
same values from the same seeds (a class-based rule once left every `te.Linear` built on meta
with uninitialised memory, because only nn.Linear / nn.Embedding were recognised):

- every parameter with ≥ 2 dims: Normal(0, init_std) (DeepSeek-V3 report §4.2), seeded by its
  full-model name; routed-expert stacks (E, ·, ·) one generator per global expert id;
- 1-D parameters: norm gains (`…norm.weight`) ones, biases zeros; any other 1-D parameter is
  an error (a new kind of parameter needs a rule here, not silent garbage);
- buffers: zeros (the router's selection bias, the load counters); derived tables (RoPE) are
  rebuilt by their owner after this;
- anything that is neither a parameter nor a buffer (Transformer Engine's `_extra_state`, its
  empty `bias` attribute when built without bias) is not model state and is left alone.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .moe import Experts


def tensor_seed(base_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{base_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


def _full_name(prefix: str, local: str) -> str:
    return ".".join(p for p in (prefix.rstrip("."), local) if p)


@torch.no_grad()
def init_weights_(module: nn.Module, std: float, base_seed: int, prefix: str = "") -> None:
    """Initialise `module`, whose parameters are named `prefix` + local name in the full model.

    Routed experts are seeded per global expert id (`Experts.expert_offset` + local index).
    """
    expert_offset = {id(getattr(m, w)): m.expert_offset for m in module.modules() if isinstance(m, Experts)
                     for w in ("w1", "w2", "w3")}
    for local, p in module.named_parameters():
        name = _full_name(prefix, local)
        if id(p) in expert_offset:
            stem, _, w = name.rpartition(".")
            for e in range(p.size(0)):
                _normal_(p[e], std, tensor_seed(base_seed, f"{stem}.{w}[{expert_offset[id(p)] + e}]"))
        elif p.dim() >= 2:
            _normal_(p, std, tensor_seed(base_seed, name))
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            raise ValueError(f"model/init.py: no initialisation rule for the {p.dim()}-D parameter {name}")
    for _, b in module.named_buffers():
        b.zero_()
