"""config.json of a Hugging Face DeepSeek checkpoint ↔ our ModelConfig (used by model/hf.py).

Formats. Sigmoid-scored models are `deepseek_v3`. transformers' deepseek_v3 router is
sigmoid-only, so softmax-scored (DeepSeek-V2-style) models are written as `deepseek_v2`, whose
router is softmax with topk_method "greedy" (n_expert_groups 1) or "group_limited_greedy", without
normalizing the top-k weights, as ours. `load` accepts both model types: the tensor names and the
attention, RoPE layout and YaRN semantics are the same. config.json carries the YaRN parameters
both as transformers 5's `rope_parameters` and as the legacy `rope_scaling` + `rope_theta`
(transformers 4, DeepSeek's remote code and other tools read those), plus DeepSeek's own
`scoring_func` / `topk_method`.

What transformers does differently from DeepSeek's reference, and which configs are refused
for it (YaRN attention_factor != 1, truncate false, …): model/hf.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from data.errors import UserError

from .config import ConfigError, ModelConfig
from .rope import yarn_active


class HFCheckpointError(UserError):
    """A checkpoint folder we cannot read or write faithfully. One line naming the file and what is wrong."""


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
class Layout:
    """What a checkpoint's config says beyond ModelConfig: how to read its tensors."""

    model_type: str
    rope_interleave: bool
    tie_word_embeddings: bool


def from_hf_config(d: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig of a deepseek_v3 / deepseek_v2 config.json mapping; HFCheckpointError where it has no equivalent.

    The architecture only: `load` also refuses quantized weights (quantization_config) and takes
    n_mtp_layers from the MTP tensors actually present.
    """
    return parse_config(d, where)[0]


def parse_config(d: dict, where: str) -> tuple[ModelConfig, Layout]:
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
    layout = Layout(model_type, bool(get("rope_interleave")) or not v3, bool(d.get("tie_word_embeddings", False)))
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


def read_config(folder: Path) -> dict:
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
