"""Hugging Face interop: read and write DeepSeek-V3 (and V2-style softmax) checkpoint folders.

`load(path)` builds our Transformer from a transformers checkpoint folder (config.json plus
model.safetensors, or shards listed by model.safetensors.index.json); `save(model, path)` writes
one that `transformers.AutoModelForCausalLM.from_pretrained` runs with the same logits. Neither
imports transformers: it is only the external reference of the parity tests (tests/unit/test_hf.py).

Tensor names, ours ↔ checkpoint ({i} layer, {j} routed expert, {n} = n_layers, {k} MTP depth;
every projection and norm name ends in .weight; the tables in code below are the same mapping):

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

Formats. Sigmoid-scored models are `deepseek_v3`. transformers' deepseek_v3 router is
sigmoid-only, so softmax-scored (DeepSeek-V2-style) models are written as `deepseek_v2`, whose
router is softmax with topk_method "greedy" (n_expert_groups 1) or "group_limited_greedy", without
normalizing the top-k weights, as ours. `load` accepts both model types: the tensor names and the
attention, RoPE layout and YaRN semantics are the same. config.json carries the YaRN parameters
both as transformers 5's `rope_parameters` and as the legacy `rope_scaling` + `rope_theta`
(transformers 4, DeepSeek's remote code and other tools read those), plus DeepSeek's own
`scoring_func` / `topk_method`.

Deviations of transformers from DeepSeek's reference (inference/model.py); we follow the reference:
- deepseek_v2 group_limited_greedy scores a group by its best expert, as DeepSeek's reference and
  we do for softmax routing, but zero-fills dropped groups where we mask them with -inf. Softmax
  scores are positive, so the two agree whenever the correction bias is zero (the next point).
- deepseek_v2 has no e_score_correction_bias. `save` still writes it (transformers reports it as
  unexpected and ignores it) so that `load` restores it, and warns when it is non-zero, because
  transformers then routes differently. A V2 folder without it loads with a zero bias.
- YaRN: transformers multiplies cos/sin by attention_factor = m(factor, mscale) / m(factor,
  mscale_all_dim) and the softmax scale by m(factor, mscale_all_dim)², with m(s, c) = 0.1·c·ln s + 1;
  the reference only has the latter, with our `mscale`. We write mscale = mscale_all_dim (as the
  released configs do, so attention_factor = 1) and refuse to load configs where attention_factor
  != 1, or with `truncate: false`. transformers applies YaRN whenever rope_type is "yarn", we when
  max_seq_len > original_seq_len: a yarn config with max_position_embeddings <= its
  original_max_position_embeddings (and factor > 1) is refused. A missing `factor` is
  max_position_embeddings / original_max_position_embeddings, as in transformers.
- transformers' deepseek_v3 router adds 1e-20 to the top-k normalizer; negligible.
- rope_interleave false (a non-interleaved layout some conversions use) is read by permuting
  the rotary rows of wq/wq_b and wkv_a into DeepSeek's interleaved pairs; `save` always writes
  rope_interleave true.

MTP and transformers: its forward never runs MTP layers, and from_pretrained ignores only the
released layer index (`_keys_to_ignore_on_load_unexpected = model\\.layers\\.61.*`); for other
depths its load report lists our MTP tensors as unexpected, a warning, and the model loads.
Its save_pretrained drops them: `load` of such a folder (num_nextn_predict_layers > 0, no MTP
tensors) warns and builds a model without MTP. Like transformers' generate(use_mtp=True) (and
vLLM), our training feeds depth 1 the main model's hidden state after its final norm and each
next depth the previous depth's normed output.

Checked against transformers 5.24.0 (torch 2.13, safetensors 0.8): parity of logits both ways
within 1e-4 in float32 (tests/unit/test_hf.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from data.durable import durable_folder
from data.errors import UserError

from .config import ConfigError, ModelConfig
from .mla import MLA
from .rope import yarn_active
from .transformer import Transformer


class HFCheckpointError(UserError):
    """A checkpoint folder we cannot read or write faithfully. One line naming the file and what is wrong."""


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

# Keys a config.json may omit take transformers 5.24's defaults for its model type.
_DEFAULTS = {
    "deepseek_v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        initializer_range=0.02, rms_norm_eps=1e-6, rope_interleave=True, num_nextn_predict_layers=1),
    "deepseek_v2": dict(vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, max_position_embeddings=2048, initializer_range=0.02,
                        rms_norm_eps=1e-6, first_k_dense_replace=0, kv_lora_rank=512, q_lora_rank=1536,
                        n_group=None, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128,
                        qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None, topk_method="greedy",
                        norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407,
                        num_nextn_predict_layers=0),
}
# Fields that are one number on both sides: ours → checkpoint config.
_SAME_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "n_activated_experts": "num_experts_per_tok", "route_scale": "routed_scaling_factor",
    "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "max_seq_len": "max_position_embeddings", "norm_eps": "rms_norm_eps",
    "init_std": "initializer_range",
}


def _yarn_m(scale: float, c: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * c * math.log(scale) + 1.0


# ---------------------------------------------------------------------------------------------
# Config


def to_hf_config(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    """The config.json of `cfg`: deepseek_v3 for sigmoid scoring, deepseek_v2 for softmax.

    YaRN parameters are written only where YaRN is active (max_seq_len > original_seq_len), as
    rope_type "yarn"; otherwise rope_type is "default" and they read back as our defaults.
    """
    sigmoid = cfg.score_func == "sigmoid"
    d = {"architectures": ["DeepseekV3ForCausalLM" if sigmoid else "DeepseekV2ForCausalLM"],
         "model_type": "deepseek_v3" if sigmoid else "deepseek_v2"}
    d.update({hf: getattr(cfg, ours) for ours, hf in _SAME_FIELDS.items()})
    d.update(
        num_key_value_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank or None,
        n_group=cfg.n_expert_groups,
        topk_group=cfg.n_limited_groups,
        scoring_func=cfg.score_func,
        topk_method="noaux_tc" if sigmoid else ("greedy" if cfg.n_expert_groups == 1 else "group_limited_greedy"),
        norm_topk_prob=sigmoid,  # the reference normalizes sigmoid top-k weights only
        num_nextn_predict_layers=cfg.n_mtp_layers,
        hidden_act="silu",
        attention_bias=False,
        tie_word_embeddings=False,
        rope_theta=cfg.rope_theta,
    )
    if sigmoid:
        d["rope_interleave"] = True
    if yarn_active(cfg):
        yarn = {"factor": cfg.rope_factor, "original_max_position_embeddings": cfg.original_seq_len,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                "mscale": cfg.mscale, "mscale_all_dim": cfg.mscale}
        if cfg.mscale == 0:  # transformers would fall back to attention_factor = m(factor, 1)
            yarn["attention_factor"] = 1.0
        d["rope_scaling"] = {"type": "yarn", **yarn}
        d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, **yarn}
    else:
        d["rope_scaling"] = None
        d["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    d["dtype"] = str(dtype).removeprefix("torch.")
    return d


@dataclasses.dataclass
class _Layout:
    """What a checkpoint's config says beyond ModelConfig: how to read its tensors."""

    model_type: str
    rope_interleave: bool
    tie_word_embeddings: bool


def from_hf_config(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig of a deepseek_v3 / deepseek_v2 config.json mapping; HFCheckpointError where it has no equivalent.

    The architecture only: `load` also refuses quantized weights (quantization_config) and takes
    n_mtp_layers from the MTP tensors actually present.
    """
    return _parse_config(d, where)[0]


def _parse_config(d: dict, where: str) -> tuple[ModelConfig, _Layout]:
    def fail(msg: str):
        raise HFCheckpointError(f"{where}: {msg}")

    model_type = d.get("model_type")
    if model_type not in _DEFAULTS:
        fail(f"model_type={model_type!r}, expected 'deepseek_v3' or 'deepseek_v2'")
    v3 = model_type == "deepseek_v3"
    defaults = _DEFAULTS[model_type]

    def get(key: str):
        return d[key] if key in d else defaults.get(key)

    if d.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={d['hidden_act']!r}: only silu (SwiGLU) is supported")
    for key in ("attention_bias", "mlp_bias"):
        if d.get(key):
            fail(f"{key}=true: moeforge projections have no bias")
    heads = get("num_attention_heads")
    if d.get("num_key_value_heads") not in (None, heads):
        fail(f"num_key_value_heads={d['num_key_value_heads']} != num_attention_heads={heads}: "
             "MLA has one kv head per head")
    if d.get("moe_layer_freq", 1) != 1:
        fail(f"moe_layer_freq={d['moe_layer_freq']}: only an MoE in every layer past first_k_dense_replace "
             "is supported")

    fields = {ours: get(hf) for ours, hf in _SAME_FIELDS.items()}
    fields["n_routed_experts"] = fields["n_routed_experts"] or 0
    fields["q_lora_rank"] = get("q_lora_rank") or 0
    if v3:
        scoring, method = d.get("scoring_func", "sigmoid"), d.get("topk_method", "noaux_tc")
        if scoring != "sigmoid":
            fail(f"scoring_func={scoring!r}: transformers runs deepseek_v3 with sigmoid scores "
                 "(deepseek_v2 is the softmax format)")
        if method != "noaux_tc":
            fail(f"topk_method={method!r}: deepseek_v3 routes with 'noaux_tc' (biased group-limited top-k)")
        if not get("norm_topk_prob"):
            fail("norm_topk_prob=false: DeepSeek-V3's sigmoid router always normalizes the top-k weights")
        fields["score_func"] = "sigmoid"
        fields["n_expert_groups"] = get("n_group") or 1
        fields["n_limited_groups"] = get("topk_group") or 1
    else:
        scoring, method = d.get("scoring_func", "softmax"), get("topk_method")
        if scoring != "softmax":
            fail(f"scoring_func={scoring!r}: transformers runs deepseek_v2 with softmax scores")
        if get("norm_topk_prob"):
            fail("norm_topk_prob=true: transformers' deepseek_v2 ignores it and DeepSeek's reference does not "
                 "normalize softmax top-k weights, so the folder is ambiguous")
        fields["score_func"] = "softmax"
        if method == "greedy":
            fields["n_expert_groups"] = fields["n_limited_groups"] = 1
        elif method == "group_limited_greedy":
            fields["n_expert_groups"] = get("n_group") or 1
            fields["n_limited_groups"] = get("topk_group") or 1
        else:
            fail(f"topk_method={method!r}: deepseek_v2 routes with 'greedy' or 'group_limited_greedy'")
    if fields["n_activated_experts"] is None:
        if fields["n_routed_experts"]:
            fail("num_experts_per_tok is missing")
        fields["n_activated_experts"] = 1  # unused without routed experts
    mtp = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", defaults["num_nextn_predict_layers"]))
    fields["n_mtp_layers"] = mtp or 0
    fields.update(_parse_rope(d, fields["max_seq_len"], fail))
    # transformers' deepseek_v2 always rotates interleaved pairs, whatever the key says.
    layout = _Layout(model_type, bool(get("rope_interleave")) or not v3, bool(d.get("tie_word_embeddings", False)))
    try:
        return ModelConfig(**fields).validate(), layout
    except ConfigError as e:
        fail(str(e))
    except TypeError as e:  # a null where a number belongs
        fail(f"invalid value ({e})")


def _parse_rope(d: dict, max_pos: int, fail) -> dict:
    """Our rope fields from rope_scaling (preferred, as transformers 5 does) or rope_parameters."""
    rope = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if any(k in rope for k in ("full_attention", "sliding_attention")):
        fail("per-layer-type rope_parameters are not supported")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", d.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        fail(f"partial_rotary_factor={rope['partial_rotary_factor']}: MLA rotates the whole rope head dim")
    if rope_type == "default":
        return dict(rope_theta=theta, original_seq_len=max_pos)  # YaRN off: max_seq_len == original_seq_len
    if rope_type != "yarn":
        fail(f"rope type {rope_type!r} is not supported (DeepSeek uses 'yarn' or none)")
    original = rope.get("original_max_position_embeddings", d.get("original_max_position_embeddings", max_pos))
    factor = rope.get("factor") or max_pos / original
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if attention_factor is None:
        attention_factor = (_yarn_m(factor, mscale) / _yarn_m(factor, mscale_all_dim) if mscale and mscale_all_dim
                            else _yarn_m(factor, 1.0))
    if abs(attention_factor - 1.0) > 1e-12:
        fail(f"YaRN attention_factor={attention_factor:.6g} (mscale={mscale}, mscale_all_dim={mscale_all_dim}) "
             "scales cos/sin, which DeepSeek's reference does not: need mscale == mscale_all_dim")
    if rope.get("truncate", True) is False:
        fail("YaRN truncate=false: DeepSeek's reference always truncates the correction range")
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1  # `or` as transformers
    out = dict(rope_theta=theta, rope_factor=float(factor), original_seq_len=int(original),
               beta_fast=int(beta_fast) if float(beta_fast).is_integer() else beta_fast,
               beta_slow=int(beta_slow) if float(beta_slow).is_integer() else beta_slow,
               mscale=float(mscale_all_dim or 0.0))
    if max_pos <= original:
        if factor > 1:
            fail(f"YaRN with max_position_embeddings={max_pos} <= original_max_position_embeddings={original}: "
                 "moeforge applies YaRN only beyond the original length")
        out["original_seq_len"] = max_pos  # factor 1: YaRN is the identity
    return out


# ---------------------------------------------------------------------------------------------
# Tensor names


def _block_prefix(cfg: ModelConfig, name: str) -> tuple[str, str] | None:
    """(checkpoint prefix, name inside the block) for a name inside a Block, else None."""
    m = re.match(r"layers\.(\d+)\.(.+)", name)
    if m:
        return f"model.layers.{m[1]}.", m[2]
    m = re.match(r"mtp\.(\d+)\.block\.(.+)", name)
    if m:
        return f"model.layers.{cfg.n_layers + int(m[1])}.", m[2]
    return None


def _hf_name(cfg: ModelConfig, name: str) -> str | tuple[str, str]:
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
    raise RuntimeError(f"model/hf.py has no Hugging Face name for {name}: add it to the tables there")


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Checkpoint name → tensor (views of the model's, experts split, MTP copies included), in file order."""
    cfg = model.cfg
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith("_extra_state"):  # precision backends' metadata (e.g. TransformerEngine), not weights
            continue
        hf = _hf_name(cfg, name)
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

    def order(item):  # embedding, layers in order (MTP last), final norm, head
        m = re.match(r"model\.layers\.(\d+)\.", item[0])
        return (1, int(m[1])) if m else ((0, 0) if "embed" in item[0] else (2, 0))

    return dict(sorted(out.items(), key=order))


# ---------------------------------------------------------------------------------------------
# Reading


class _Checkpoint:
    """The tensors of a folder by name, opened lazily; records which names were read."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._handles: dict[str, object] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.where = str(index)
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise HFCheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            self.files = {name: folder / f for name, f in weight_map.items()}
            for name, f in self.files.items():
                if not f.is_file():
                    raise HFCheckpointError(f"{index}: shard {f.name} (holding {name}) does not exist")
        else:
            self.where = str(folder)
            single = folder / "model.safetensors"
            paths = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
            if not paths:
                extra = " (pytorch_model.bin is not read: convert to safetensors)" if any(folder.glob("*.bin")) else ""
                raise HFCheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json{extra}")
            self.files = {name: p for p in paths for name in self._open(p).keys()}
        self.used: set[str] = set()

    def _open(self, path: Path):
        key = str(path)
        if key not in self._handles:
            try:
                self._handles[key] = safe_open(key, framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise HFCheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
        return self._handles[key]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """The tensor `name`, which must have `shape` (what config.json implies)."""
        shape = tuple(shape)
        if name not in self.files:
            raise HFCheckpointError(f"{self.where}: missing tensor {name} (expected shape {shape} from config.json)")
        path = self.files[name]
        handle = self._open(path)
        try:
            actual = tuple(handle.get_slice(name).get_shape())
        except SafetensorError:
            raise HFCheckpointError(f"{path}: missing tensor {name} listed in the index") from None
        if actual != shape:
            raise HFCheckpointError(f"{path}: tensor {name} has shape {actual}, expected {shape} from config.json")
        self.used.add(name)
        return handle.get_tensor(name)

    def close(self) -> None:
        self._handles.clear()


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise HFCheckpointError(f"{folder}: not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise HFCheckpointError(f"{folder}: no config.json (not a Hugging Face checkpoint folder)")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise HFCheckpointError(f"{path}: not a JSON object")
    if d.get("quantization_config"):
        method = d["quantization_config"].get("quant_method", "?")
        raise HFCheckpointError(f"{path}: quantized weights (quant_method={method!r}) are not supported; "
                                "dequantize to bf16/fp32 first")
    return d


def _deinterleave_rope_rows(model: Transformer) -> None:
    """Turn rotate-half rotary rows (pairs i, i+R/2) into DeepSeek's interleaved pairs (2i, 2i+1)."""
    cfg = model.cfg
    C, R = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    perm = torch.arange(R).view(2, R // 2).t().flatten()  # ours[2i] = theirs[i], ours[2i+1] = theirs[i+R/2]
    for m in model.modules():
        if isinstance(m, MLA):
            wq = m.wq.weight if cfg.q_lora_rank == 0 else m.wq_b.weight
            q = wq.view(cfg.n_heads, C + R, -1)  # (H, C+R, in)
            q[:, C:] = q[:, C:][:, perm]
            k = m.wkv_a.weight[cfg.kv_lora_rank:]  # (R, D)
            k.copy_(k[perm])


@torch.no_grad()
def load(path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Transformer:
    """Our Transformer from a Hugging Face deepseek_v3 or deepseek_v2 checkpoint folder.

    Reads per-expert and fused expert layouts, single-file and sharded folders. MTP depths come
    from the tensors present (see the module docstring). `dtype` casts the model (default float32);
    the router bias stays float32. The model comes back in eval mode, as from_pretrained's.
    Raises HFCheckpointError, one line, for anything that does not map exactly: a missing,
    misshapen or unexpected tensor, or a config with no equivalent.
    """
    folder = Path(path)
    config_path = folder / "config.json"
    raw = _read_config(folder)
    cfg, layout = _parse_config(raw, str(config_path))
    ckpt = _Checkpoint(folder)
    try:
        n = cfg.n_layers
        present = 0
        while f"model.layers.{n + present}.eh_proj.weight" in ckpt:
            present += 1
        if present == 0 and cfg.n_mtp_layers > 0:
            warnings.warn(f"{folder}: config.json declares {cfg.n_mtp_layers} MTP layer(s) but the folder has no MTP "
                          "weights (transformers' save_pretrained drops them); loading without MTP", stacklevel=2)
        elif present < cfg.n_mtp_layers:
            ckpt.get(f"model.layers.{n + present}.eh_proj.weight", (cfg.dim, 2 * cfg.dim))  # raises: missing
        elif present > cfg.n_mtp_layers:
            raise HFCheckpointError(f"{ckpt.files[f'model.layers.{n + cfg.n_mtp_layers}.eh_proj.weight']}: "
                                    f"unexpected MTP layer {n + cfg.n_mtp_layers} (config.json declares "
                                    f"num_nextn_predict_layers={cfg.n_mtp_layers})")
        cfg = dataclasses.replace(cfg, n_mtp_layers=present)
        model = Transformer(cfg)
        if dtype is not None:
            model.to(dtype)
        state = model.state_dict()
        for name, param in state.items():
            if name.endswith("_extra_state"):
                continue
            hf = _hf_name(cfg, name)
            if isinstance(hf, tuple):
                _load_experts(ckpt, hf, param, name)
            elif hf.endswith("e_score_correction_bias") and layout.model_type == "deepseek_v2" and hf not in ckpt:
                param.zero_()  # V2 has no correction bias
            elif hf == "lm_head.weight" and hf not in ckpt and layout.tie_word_embeddings:
                param.copy_(state["embed.weight"])
            else:
                param.copy_(ckpt.get(hf, param.shape))
        for k in range(cfg.n_mtp_layers):
            for ours, hf in MTP_SHARED.items():
                hf = f"model.layers.{n + k}.{hf}"
                if hf in ckpt and not torch.equal(ckpt.get(hf, state[ours].shape).to(state[ours].dtype), state[ours]):
                    raise HFCheckpointError(f"{ckpt.files[hf]}: {hf} differs from {TOP_NAMES[ours]}; moeforge's MTP "
                                            "shares the main embedding and output head")
        unused = sorted(set(ckpt.files) - ckpt.used - {h for h in ckpt.files if h.endswith("rotary_emb.inv_freq")}
                        - {f"model.layers.{n + k}.{h}" for k in range(cfg.n_mtp_layers) for h in MTP_SHARED.values()})
        if unused:
            more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
            raise HFCheckpointError(f"{ckpt.files[unused[0]]}: unexpected tensor {unused[0]}{more} "
                                    "(no such weight in a model with this config.json)")
        if not layout.rope_interleave:
            _deinterleave_rope_rows(model)
    finally:
        ckpt.close()
    return model.eval()


def _load_experts(ckpt: _Checkpoint, hf: tuple[str, str], param: torch.Tensor, name: str) -> None:
    prefix, proj = hf
    E = param.size(0)
    fused = prefix + ("mlp.experts.down_proj" if proj == "down_proj" else "mlp.experts.gate_up_proj")
    if fused in ckpt:
        if proj == "down_proj":
            param.copy_(ckpt.get(fused, param.shape))
        else:
            F_, D = param.shape[1:]
            both = ckpt.get(fused, (E, 2 * F_, D))  # [gate; up] along F
            param.copy_(both[:, :F_] if proj == "gate_proj" else both[:, F_:])
        return
    for j in range(E):
        param[j].copy_(ckpt.get(f"{prefix}mlp.experts.{j}.{proj}.weight", param.shape[1:]))



# ---------------------------------------------------------------------------------------------
# Writing


@torch.no_grad()
def save(model: Transformer, path: str | os.PathLike, *, overwrite: bool = False,
         max_shard_bytes: int = 5 * 2**30) -> None:
    """Write `model` as a Hugging Face checkpoint folder (config.json + safetensors) at `path`.

    Sigmoid models become deepseek_v3, softmax ones deepseek_v2 (module docstring). Tensors keep
    the model's dtype; files are split at `max_shard_bytes` with a model.safetensors.index.json.
    Everything is written into a temporary folder next to `path`, fsynced and renamed at the end
    (data/durable.py), so a failure leaves no partial folder. A non-empty existing `path` is
    replaced only with overwrite=True.
    """
    cfg = model.cfg
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise HFCheckpointError(f"{target}: exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise HFCheckpointError(f"{target}: folder is not empty (pass overwrite=True to replace it)")
    if cfg.score_func == "softmax":
        if any(m.e_score_correction_bias.any() for m in model.modules() if hasattr(m, "e_score_correction_bias")):
            warnings.warn(f"{target}: non-zero e_score_correction_bias in a softmax model: transformers' deepseek_v2 "
                          "has no such bias and ignores it, so it routes this model differently", stacklevel=2)
    tensors = hf_state_dict(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with durable_folder(target) as tmp:
        config = to_hf_config(cfg, model.embed.weight.dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        names = (["model.safetensors"] if len(shards) == 1 else
                 [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        for file, shard in zip(names, shards):
            # Clones: expert slices and the MTP copies share storage, which safetensors refuses.
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in shard.items()}, str(tmp / file),
                      metadata={"format": "pt"})
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                     "weight_map": {k: file for file, shard in zip(names, shards) for k in shard}}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
