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

Distribution: Normal(0, init_std) for every matrix (DeepSeek-V3 report §4.2), ones for norm
gains, zeros for the router's selection bias.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .moe import Experts, Gate, MoE
from .norm import RMSNorm


def tensor_seed(base_seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{base_seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def _normal_(t: torch.Tensor, std: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


@torch.no_grad()
def init_weights_(module: nn.Module, std: float, base_seed: int, prefix: str = "") -> None:
    """Initialise `module`, whose parameters are named `prefix` + local name in the full model.

    Routed experts are seeded per global expert id (`Experts.expert_offset` + local index).
    """
    for local, m in module.named_modules():
        name = ".".join(p for p in (prefix.rstrip("."), local) if p)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            _normal_(m.weight, std, tensor_seed(base_seed, f"{name}.weight"))
        elif isinstance(m, Gate):
            _normal_(m.weight, std, tensor_seed(base_seed, f"{name}.weight"))
            m.e_score_correction_bias.zero_()
        elif isinstance(m, Experts):
            for w in ("w1", "w2", "w3"):
                param = getattr(m, w)
                for e in range(param.size(0)):
                    _normal_(param[e], std, tensor_seed(base_seed, f"{name}.{w}[{m.expert_offset + e}]"))
        elif isinstance(m, RMSNorm):
            m.weight.fill_(1.0)
        elif isinstance(m, MoE):
            m.tokens_per_expert.zero_()  # a buffer: garbage after to_empty()
