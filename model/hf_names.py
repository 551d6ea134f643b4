"""Tensor names, ours ↔ a Hugging Face DeepSeek checkpoint's (used by model/hf.py load and save).

{i} layer, {j} routed expert, {n} = n_layers, {k} MTP depth; every projection and norm name ends
in .weight; the tables in the code below are the same mapping:

| ours                                    | Hugging Face checkpoint (P = model.layers.{i}.)          |
|-----------------------------------------|----------------------------------------------------------|
| embed.weight                            | model.embed_tokens.weight                                |
| layers.{i}.attn_norm.weight             | P input_layernorm.weight                                 |
| layers.{i}.attn.wq (q_lora_rank 0)      | P self_attn.q_proj                                       |
| layers.{i}.attn.wq_a / q_norm / wq_b    | P self_attn.q_a_proj / q_a_layernorm / q_b_proj          |
| layers.{i}.attn.wkv_a / kv_norm / wkv_b | P self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj |
| layers.{i}.attn.wo                      | P self_attn.o_proj                                       |
| layers.{i}.ffn_norm.weight              | P post_attention_layernorm.weight                        |
| layers.{i}.ffn.w1 / w3 / w2 (dense)     | P mlp.gate_proj / up_proj / down_proj                    |
| layers.{i}.ffn.gate.weight              | P mlp.gate.weight                                        |
| layers.{i}.ffn.gate.e_score_correction_bias | P mlp.gate.e_score_correction_bias (float32)         |
| layers.{i}.ffn.experts.w1/w3/w2[j]      | P mlp.experts.{j}.gate_proj / up_proj / down_proj ¹      |
| layers.{i}.ffn.shared_experts.w1/w3/w2  | P mlp.shared_experts.gate_proj / up_proj / down_proj     |
| norm.weight                             | model.norm.weight                                        |
| head.weight                             | lm_head.weight                                           |
| mtp.{k}.enorm / hnorm / eh_proj         | model.layers.{n+k}.enorm / hnorm / eh_proj               |
| mtp.{k}.norm.weight                     | model.layers.{n+k}.shared_head.norm.weight               |
| mtp.{k}.block.<as in layers.{i}>        | model.layers.{n+k}.<as in P>                             |
| embed.weight, head.weight (shared)      | model.layers.{n+k}.embed_tokens, .shared_head.head (copies) ² |

¹ Per expert, as DeepSeek released them and as transformers' save_pretrained writes by default
  (it fuses them only in memory). `load` also reads the fused layout that
  save_pretrained(save_original_format=False) writes: mlp.experts.gate_up_proj (E, 2F, D) = [w1; w3]
  along F, and mlp.experts.down_proj (E, D, F) = w2.
² The MTP layer sits where the released DeepSeek-V3 checkpoint puts it (layer 61 there). `save`
  writes the copies as released; `load` checks them equal to the main embedding and head.
"""

from __future__ import annotations

import re

import torch

from .config import ModelConfig
from .transformer import Transformer

# Inside one block: our name → checkpoint name (the table above).
BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq_a.weight": "self_attn.q_a_proj.weight",
    "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
    "attn.wq_b.weight": "self_attn.q_b_proj.weight",
    "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
    "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
    "attn.wkv_b.weight": "self_attn.kv_b_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn.w1.weight": "mlp.gate_proj.weight",
    "ffn.w3.weight": "mlp.up_proj.weight",
    "ffn.w2.weight": "mlp.down_proj.weight",
    "ffn.gate.weight": "mlp.gate.weight",
    "ffn.gate.e_score_correction_bias": "mlp.gate.e_score_correction_bias",
    "ffn.shared_experts.w1.weight": "mlp.shared_experts.gate_proj.weight",
    "ffn.shared_experts.w3.weight": "mlp.shared_experts.up_proj.weight",
    "ffn.shared_experts.w2.weight": "mlp.shared_experts.down_proj.weight",
}
# Stacked routed experts (E, ·, ·) → per-expert projection name.
EXPERT_NAMES = {"ffn.experts.w1": "gate_proj", "ffn.experts.w3": "up_proj", "ffn.experts.w2": "down_proj"}
TOP_NAMES = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "head.weight": "lm_head.weight"}
MTP_NAMES = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
             "norm.weight": "shared_head.norm.weight"}
# Copies of the shared embedding and head inside each released MTP layer.
MTP_SHARED = {"embed.weight": "embed_tokens.weight", "head.weight": "shared_head.head.weight"}



def _block_prefix(cfg: ModelConfig, name: str) -> tuple[str, str] | None:
    """(checkpoint prefix, name inside the block) for a name inside a Block, else None."""
    m = re.match(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}.", m[2]
    m = re.match(r"mtp\.(\d+)\.block\.(.+)", name)
    if m:
        return f"model.layers.{cfg.n_layers + int(m[1])}.", m[2]
    return None


def hf_name(cfg: ModelConfig, name: str) -> str | tuple[str, str]:
    """Checkpoint name of one of our state_dict entries; for stacked experts (layer prefix, projection)."""
    if name in TOP_NAMES:
        return TOP_NAMES[name]
    block = _block_prefix(cfg, name)
    if block:
        prefix, rest = block
        if rest in BLOCK_NAMES:
            return prefix + BLOCK_NAMES[rest]
        if rest in EXPERT_NAMES:
            return prefix, EXPERT_NAMES[rest]
    m = re.match(r"mtp\.(\d+)\.(.+)", name)
    if m and m[2] in MTP_NAMES:
        return f"model.layers.{cfg.n_layers + int(m[1])}.{MTP_NAMES[m[2]]}"
    raise RuntimeError(f"model/hf_names.py has no Hugging Face name for {name}: add it to the tables there")


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Checkpoint name → tensor (views of the model's, experts split, MTP copies included), in file order."""
    cfg = model.cfg
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):  # precision backends' metadata (e.g. TransformerEngine), not weights
            continue
        hf = hf_name(cfg, name)
        if isinstance(hf, tuple):
            prefix, proj = hf
            for j in range(t.size(0)):
                out[f"{prefix}mlp.experts.{j}.{proj}.weight"] = t[j]
        else:
            out[hf] = t
    sd = model.state_dict()
    for k in range(cfg.n_mtp_layers):
        for ours, hf in MTP_SHARED.items():
            out[f"model.layers.{cfg.n_layers + k}.{hf}"] = sd[ours]

    return dict(sorted(out.items(), key=lambda item: file_order(item[0])))


def file_order(hf: str) -> tuple[int, int]:
    """Sort key of checkpoint names: embedding, layers in order (MTP last), final norm, head."""
    m = re.match(r"model\.layers\.(\d+)\.", hf)
    return (1, int(m[1])) if m else ((0, 0) if "embed" in hf else (2, 0))
