"""Hugging Face interop (model/hf.py): logits parity with transformers both ways, exact round trips, bad input.

transformers is the external reference: random DeepseekV3 / DeepseekV2 models built from small
configs (no download), with random norm weights and router biases so that a swapped or skipped
tensor shows in the logits. Tolerance 1e-4 on logits of std ~1.5 in float32.
"""

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import model.hf as hf
import model.hf_config as hf_config
import model.hf_names as hf_names
from model import ModelConfig, Transformer
from model.hf import HFCheckpointError
from model.mla import MLA
from model.rope import inv_frequencies

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

ATOL = 1e-4
VOCAB = 128
ROOT = Path(__file__).resolve().parents[2]


def hf_kwargs(**kw) -> dict:
    """A small DeepSeek-V3 config: 3 layers (1 dense), 4 heads, 8 experts in 4 groups, top-2."""
    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
                n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
                routed_scaling_factor=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=64, initializer_range=0.2,
                num_nextn_predict_layers=0)
    base.update(kw)
    return base


YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
            beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707)


@torch.no_grad()
def randomise(m: torch.nn.Module, bias: bool = True) -> torch.nn.Module:
    """Norm weights around 1 and small positive router biases, so both reach the logits."""
    for name, p in m.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1 + 0.2 * torch.randn_like(p))
    for name, b in m.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.2 * torch.rand_like(b) if bias else torch.zeros_like(b))
    return m.eval()


def build_hf(v2: bool = False, seed: int = 0, **kw):
    torch.manual_seed(seed)
    if v2:
        return randomise(DeepseekV2ForCausalLM(DeepseekV2Config(**hf_kwargs(**kw))))
    return randomise(DeepseekV3ForCausalLM(DeepseekV3Config(**hf_kwargs(**kw))))


def small_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=VOCAB, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                score_func="sigmoid", route_scale=2.5, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_mtp_layers=1, max_seq_len=64, original_seq_len=16,
                rope_factor=4.0, mscale=0.707, init_std=0.2)
    base.update(kw)
    return ModelConfig(**base).validate()


def build_ours(cfg: ModelConfig, seed: int = 0, bias: bool = True) -> Transformer:
    torch.manual_seed(seed)
    return randomise(Transformer(cfg), bias)


def tokens(T: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, T), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_diff(ours: Transformer, theirs, T: int = 32) -> float:
    x = tokens(T)
    return (ours(x) - theirs(x).logits).abs().max().item()


def from_pretrained(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager").eval()


def quiet_load(path, **kw) -> Transformer:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf.load(path, **kw)


def tensors_equal(a: Transformer, b: Transformer) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------------------------
# transformers → ours

HF_VARIANTS = {
    # name: (deepseek_v2?, config overrides, save_pretrained kwargs)
    "v3-qlora-groups-sharded": (False, {}, dict(max_shard_size="100KB")),
    "v3-no-qlora-one-group": (False, dict(q_lora_rank=None, n_group=1, topk_group=1), {}),
    "v3-yarn": (False, dict(rope_parameters=YARN), {}),
    "v3-fused-experts": (False, {}, dict(save_original_format=False)),
    "v3-rope-not-interleaved": (False, dict(rope_interleave=False), {}),
    "v2-softmax-greedy-yarn": (True, dict(q_lora_rank=None, n_group=None, topk_group=None, topk_method="greedy",
                                          routed_scaling_factor=1.5, rope_parameters=YARN), {}),
    "v2-softmax-qlora": (True, dict(n_group=None, topk_group=None, topk_method="greedy"), {}),
}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_transformers_checkpoint_loads_with_equal_logits(variant, tmp_path):
    v2, kw, save_kw = HF_VARIANTS[variant]
    theirs = build_hf(v2, **kw)
    theirs.save_pretrained(tmp_path, **save_kw)
    files = {p.name for p in tmp_path.iterdir()}
    if "max_shard_size" in save_kw:
        assert "model.safetensors.index.json" in files and len([f for f in files if f.endswith(".safetensors")]) > 2
    names = set(load_file(tmp_path / "model.safetensors")) if "model.safetensors" in files else set()
    if "save_original_format" in save_kw:
        assert "model.layers.1.mlp.experts.gate_up_proj" in names
    elif names:
        assert "model.layers.1.mlp.experts.7.up_proj.weight" in names  # save_pretrained writes per expert
    ours = hf.load(tmp_path)
    assert ours.cfg.score_func == ("softmax" if v2 else "sigmoid")
    if "rope_parameters" in kw:
        assert ours.cfg.max_seq_len > ours.cfg.original_seq_len  # YaRN active, mscale applied
        assert ours.layers["0"].attn.softmax_scale == pytest.approx(theirs.model.layers[0].self_attn.scaling)
    assert logits_diff(ours, theirs) <= ATOL


def test_router_bias_and_norms_reach_the_logits(tmp_path):
    """Guards the parity tests: zero biases or unit norms would change the logits far beyond ATOL."""
    theirs = build_hf()
    theirs.save_pretrained(tmp_path)
    ours = hf.load(tmp_path)
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.zero_()
    assert logits_diff(ours, theirs) > 100 * ATOL
    ours = hf.load(tmp_path)
    with torch.no_grad():
        ours.layers["1"].attn.kv_norm.weight.fill_(1.0)
    assert logits_diff(ours, theirs) > 100 * ATOL


MISTAKES = {
    "experts-w1-w3-swapped": lambda mp: (mp.setitem(hf_names.EXPERT_NAMES, "ffn.experts.w1", "up_proj"),
                                         mp.setitem(hf_names.EXPERT_NAMES, "ffn.experts.w3", "gate_proj")),
    "dense-w1-w3-swapped": lambda mp: (mp.setitem(hf_names.BLOCK_NAMES, "ffn.w1.weight", "mlp.up_proj.weight"),
                                       mp.setitem(hf_names.BLOCK_NAMES, "ffn.w3.weight", "mlp.gate_proj.weight")),
    "attn-ffn-norms-swapped": lambda mp: (
        mp.setitem(hf_names.BLOCK_NAMES, "attn_norm.weight", "post_attention_layernorm.weight"),
        mp.setitem(hf_names.BLOCK_NAMES, "ffn_norm.weight", "input_layernorm.weight")),
    "rope-layout-ignored": lambda mp: mp.setattr(hf, "_deinterleave_rope_rows", lambda model: None),
    "yarn-ignored": lambda mp: _patch_rope(mp, lambda rope: rope.update(original_seq_len=64)),
    "yarn-mscale-ignored": lambda mp: _patch_rope(mp, lambda rope: rope.update(mscale=0.0)),
}


def _patch_rope(mp, edit) -> None:
    parse = hf_config._parse_rope

    def patched(*args):
        rope = parse(*args)
        edit(rope)
        return rope

    mp.setattr(hf_config, "_parse_rope", patched)


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_wrong_mapping_is_detected(mistake, tmp_path, monkeypatch):
    """The parity check can fail: each deliberate mapping error moves the logits far beyond ATOL."""
    theirs = build_hf(rope_interleave=False, rope_parameters=YARN)
    theirs.save_pretrained(tmp_path)
    assert logits_diff(hf.load(tmp_path), theirs) <= ATOL
    MISTAKES[mistake](monkeypatch)
    assert logits_diff(hf.load(tmp_path), theirs) > 100 * ATOL


def test_transformers_save_drops_mtp_so_load_warns_and_builds_none(tmp_path):
    build_hf(num_nextn_predict_layers=1).save_pretrained(tmp_path)  # transformers' default is 1 MTP layer
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = hf.load(tmp_path)
    assert ours.cfg.n_mtp_layers == 0 and len(ours.mtp) == 0


# ---------------------------------------------------------------------------------------------
# ours → transformers

OUR_VARIANTS = {
    # name: (config overrides, random router bias?)
    "sigmoid-qlora-groups-yarn-mtp": ({}, True),
    "sigmoid-no-qlora-one-group-no-yarn": (dict(q_lora_rank=0, n_expert_groups=1, n_limited_groups=1,
                                                original_seq_len=64, n_mtp_layers=0), True),
    # transformers' deepseek_v2 has no correction bias (module docstring): zero bias for softmax
    "softmax-one-group-yarn": (dict(score_func="softmax", n_expert_groups=1, n_limited_groups=1, q_lora_rank=0,
                                    route_scale=1.5), False),
    # group_limited_greedy: groups scored by their best expert on both sides
    "softmax-groups": (dict(score_func="softmax", q_lora_rank=0, route_scale=1.5), False),
}


@pytest.mark.parametrize("variant", list(OUR_VARIANTS))
def test_our_checkpoint_runs_in_transformers_with_equal_logits(variant, tmp_path):
    kw, bias = OUR_VARIANTS[variant]
    ours = build_ours(small_cfg(**kw), bias=bias)
    hf.save(ours, tmp_path / "ckpt")
    theirs = from_pretrained(tmp_path / "ckpt")
    expected = DeepseekV2ForCausalLM if ours.cfg.score_func == "softmax" else DeepseekV3ForCausalLM
    assert type(theirs) is expected
    assert theirs.model.layers[0].self_attn.scaling == pytest.approx(ours.layers["0"].attn.softmax_scale)
    assert logits_diff(ours, theirs) <= ATOL


def test_mtp_layers_match_transformers_mtp_model(tmp_path):
    """Our MTP depths against transformers' MtpModel (what generate(use_mtp=True) runs), fed the same states."""
    from transformers.modeling_layers import MtpModel

    ours = build_ours(small_cfg(n_mtp_layers=2))
    hf.save(ours, tmp_path)
    theirs = from_pretrained(tmp_path)
    # transformers looks for MTP weights only at the released depth (layer 61); point it at ours.
    theirs._keys_to_ignore_on_load_unexpected = {r"model\.layers\.(3|4)\."}
    mtp = MtpModel.from_pretrained(theirs).eval()
    T = 32
    x, nxt = tokens(T), tokens(T, seed=2)
    pos = torch.arange(T).expand(2, T)
    with torch.no_grad():
        h = ours.norm(ours.hidden(x))  # what Transformer.losses feeds depth 1
        for k in range(2):
            module = ours.mtp[str(k)]
            h_next = module(h, ours.embed(nxt), ours.rope_cos[:T], ours.rope_sin[:T])
            expected = module.norm(h_next)
            got = mtp.forward_layer(k, h, pos, None, input_ids=nxt)
            assert (got - expected).abs().max().item() <= ATOL
            h = expected  # each depth gets the previous depth's normed output


# ---------------------------------------------------------------------------------------------
# ours → ours


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bitwise_including_mtp_and_router_bias(dtype, tmp_path):
    ours = build_ours(small_cfg(n_mtp_layers=2)).to(dtype)
    with torch.no_grad():
        for m in ours.modules():
            if hasattr(m, "e_score_correction_bias"):
                m.e_score_correction_bias.sub_(0.1)  # negative entries too, float32 with fine digits
    hf.save(ours, tmp_path / "ckpt", max_shard_bytes=40_000)
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    back = hf.load(tmp_path / "ckpt", dtype=dtype)
    assert back.cfg == ours.cfg
    assert tensors_equal(ours, back)
    assert back.layers["1"].ffn.gate.e_score_correction_bias.dtype == torch.float32


def test_softmax_round_trip_keeps_groups_and_bias_with_warnings(tmp_path):
    ours = build_ours(small_cfg(score_func="softmax", route_scale=1.0))
    with pytest.warns(UserWarning) as record:
        hf.save(ours, tmp_path)
    text = " ".join(str(w.message) for w in record)
    assert "e_score_correction_bias" in text
    assert json.loads((tmp_path / "config.json").read_text())["topk_method"] == "group_limited_greedy"
    back = hf.load(tmp_path)
    assert back.cfg == ours.cfg and tensors_equal(ours, back)


@pytest.mark.parametrize("cfg, cls", [
    (small_cfg(), DeepseekV3Config),
    # without YaRN its parameters are not written: they come back as our defaults
    (small_cfg(q_lora_rank=0, original_seq_len=64, rope_factor=40.0, mscale=1.0), DeepseekV3Config),
    (small_cfg(mscale=0.0, qk_rope_head_dim=64, max_seq_len=4096 * 8, original_seq_len=4096), DeepseekV3Config),
    (small_cfg(score_func="softmax", n_expert_groups=1, n_limited_groups=1), DeepseekV2Config),
], ids=["v3-yarn", "v3-no-yarn", "v3-yarn-mscale0", "v2-yarn"])
def test_config_maps_both_ways_and_rope_equals_transformers(cfg, cls):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    d = hf_config.to_hf_config(cfg)
    assert d["model_type"] == cls.model_type and d["tie_word_embeddings"] is False
    theirs = cls(**{k: v for k, v in d.items() if k not in ("model_type", "architectures")})
    assert hf_config.from_hf_config(theirs.to_dict()) == cfg  # what transformers itself writes
    assert hf_config.from_hf_config(json.loads(json.dumps(d))) == cfg
    scale = yarn_apply_mscale(theirs.rope_parameters, cfg.qk_head_dim**-0.5)
    assert scale == pytest.approx(MLA(cfg).softmax_scale, rel=1e-12)
    if theirs.rope_parameters["rope_type"] == "yarn":
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](theirs)
        assert attention_factor == 1.0  # transformers' cos/sin scaling, absent from DeepSeek's reference
        torch.testing.assert_close(inv_frequencies(cfg), inv_freq, rtol=1e-6, atol=0)


RELEASED_V3 = {  # DeepSeek-V3 / R1 config.json as released (transformers 4.46 format), FP8 block
    "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
    "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
    "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280,
}
RELEASED_V2_LITE = {  # DeepSeek-V2-Lite config.json as released
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "attention_bias": False,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 10944,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "moe_intermediate_size": 1408, "moe_layer_freq": 1,
    "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16, "q_lora_rank": None,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False,
    "topk_group": 1, "topk_method": "greedy", "v_head_dim": 128, "vocab_size": 102400,
}


@pytest.mark.parametrize("released, preset, mscale", [(RELEASED_V3, "671b", 1.0), (RELEASED_V2_LITE, "16b", 0.707)])
def test_released_configs_map_to_our_presets(released, preset, mscale):
    cfg = hf_config.from_hf_config(released)
    expected = yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text())
    expected.pop("max_seq_len"), expected.pop("original_seq_len")  # presets train at 4K without YaRN
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert (cfg.max_seq_len, cfg.original_seq_len, cfg.rope_factor, cfg.mscale) == (163840, 4096, 40, mscale)
    scale = cfg.qk_head_dim**-0.5 * (0.1 * mscale * math.log(40) + 1) ** 2
    assert scale == pytest.approx(hf_scaling(released))  # transformers' scale for the same config


def hf_scaling(d: dict) -> float:
    """transformers' softmax scale for a released config (yarn_apply_mscale)."""
    d = {k: v for k, v in d.items() if k not in ("architectures", "quantization_config")}
    cls = DeepseekV3Config if d["model_type"] == "deepseek_v3" else DeepseekV2Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    config = cls(**{k: v for k, v in d.items() if k != "model_type"})
    return yarn_apply_mscale(config.rope_parameters, (d["qk_nope_head_dim"] + d["qk_rope_head_dim"]) ** -0.5)


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("hf") / "ckpt"
    hf.save(build_ours(small_cfg()), path)
    return path


def copy_of(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


def load_error(path) -> str:
    with pytest.raises(HFCheckpointError) as e:
        quiet_load(path)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


def edit_tensors(path: Path, edit) -> None:
    file = path / "model.safetensors"
    sd = load_file(file)
    edit(sd)
    save_file(sd, file, metadata={"format": "pt"})


def edit_config(path: Path, **kw) -> None:
    d = json.loads((path / "config.json").read_text())
    d.update(kw)
    (path / "config.json").write_text(json.dumps(d))


def test_missing_folder_config_or_weights(saved, tmp_path):
    assert "not a folder" in load_error(tmp_path / "nope")
    assert "no config.json" in load_error(tmp_path)
    ckpt = copy_of(saved, tmp_path)
    (ckpt / "model.safetensors").unlink()
    msg = load_error(ckpt)
    assert str(ckpt) in msg and "no model.safetensors" in msg
    (ckpt / "config.json").write_text("{not json")
    assert "invalid JSON" in load_error(ckpt)


@pytest.mark.parametrize("edit, expected", [
    (dict(model_type="llama"), "model_type='llama'"),
    (dict(quantization_config={"quant_method": "fp8"}), "quant_method='fp8'"),
    (dict(rope_parameters=None, rope_scaling={**YARN, "mscale": 1.0}), "mscale_all_dim"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(hidden_act="gelu"), "hidden_act"),
])
def test_config_without_an_equivalent_is_refused(saved, tmp_path, edit, expected):
    ckpt = copy_of(saved, tmp_path)
    edit_config(ckpt, **edit)
    msg = load_error(ckpt)
    assert "config.json" in msg and expected in msg


def test_tensor_shape_mismatch_names_file_tensor_and_both_shapes(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    edit_tensors(ckpt, lambda sd: sd.__setitem__(name, torch.zeros(128, 12)))
    msg = load_error(ckpt)
    assert "model.safetensors" in msg and name in msg and "(128, 12)" in msg and "(128, 16)" in msg


def test_config_that_disagrees_with_the_tensors_is_refused(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    edit_config(ckpt, moe_intermediate_size=48)
    msg = load_error(ckpt)
    assert "expected (" in msg and "48" in msg


@pytest.mark.parametrize("name, expected", [
    ("model.layers.2.mlp.experts.5.up_proj.weight", "missing tensor model.layers.2.mlp.experts.5.up_proj.weight"),
    ("model.layers.3.shared_head.norm.weight", "missing tensor model.layers.3.shared_head.norm.weight"),
    ("lm_head.weight", "missing tensor lm_head.weight"),
])
def test_missing_tensor_is_named(saved, tmp_path, name, expected):
    ckpt = copy_of(saved, tmp_path)
    edit_tensors(ckpt, lambda sd: sd.pop(name))
    msg = load_error(ckpt)
    assert expected in msg and str(ckpt) in msg


def test_unexpected_tensor_is_named(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    edit_tensors(ckpt, lambda sd: sd.__setitem__("model.layers.0.self_attn.o_proj.bias", torch.zeros(64)))
    assert "unexpected tensor model.layers.0.self_attn.o_proj.bias" in load_error(ckpt)


def test_mtp_copy_of_the_head_must_equal_the_head(saved, tmp_path):
    ckpt = copy_of(saved, tmp_path)
    edit_tensors(ckpt, lambda sd: sd["model.layers.3.shared_head.head.weight"].add_(1.0))
    assert "differs from lm_head.weight" in load_error(ckpt)


def test_index_pointing_to_a_missing_shard(tmp_path):
    hf.save(build_ours(small_cfg(n_mtp_layers=0)), tmp_path / "ckpt", max_shard_bytes=40_000)
    shard = sorted((tmp_path / "ckpt").glob("model-*.safetensors"))[1]
    shard.unlink()
    msg = load_error(tmp_path / "ckpt")
    assert "model.safetensors.index.json" in msg and shard.name in msg


def test_save_refuses_a_non_empty_folder_unless_overwrite(tmp_path):
    ours = build_ours(small_cfg(n_mtp_layers=0))
    target = tmp_path / "ckpt"
    target.mkdir()
    hf.save(ours, target)  # an empty folder is fine
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(HFCheckpointError, match="not empty"):
        hf.save(ours, target)
    assert (target / "notes.txt").exists()
    hf.save(ours, target, overwrite=True)
    assert not (target / "notes.txt").exists() and tensors_equal(ours, hf.load(target))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary folders left


def test_failed_save_leaves_no_partial_folder(tmp_path, monkeypatch):
    ours = build_ours(small_cfg(n_mtp_layers=0))
    calls = []

    def failing_save_file(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return save_file(*args, **kw)

    monkeypatch.setattr(hf, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        hf.save(ours, tmp_path / "new", max_shard_bytes=40_000)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        hf.save(ours, tmp_path / "old", overwrite=True, max_shard_bytes=40_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (tmp_path / "old" / "config.json").read_text() == "{}"  # the previous contents survive
