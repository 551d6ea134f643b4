import pytest
import torch

from model import ConfigError, ModelConfig, Transformer, param_counts
from train.config import compose, model_config

PRESETS = ["smoke", "tiny", "16b", "236b", "671b"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_validates_and_counts_match_the_built_model(preset):
    cfg = model_config(compose([f"model={preset}"]).model)
    assert isinstance(cfg, ModelConfig)
    device = "cpu" if preset == "smoke" else "meta"  # large ones only on the meta device
    with torch.device(device):
        model = Transformer(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert built == param_counts(cfg, include_mtp=True).total


def test_671b_has_671b_total_and_37b_activated():
    total, activated = param_counts(model_config(compose(["model=671b"]).model))
    assert abs(total / 671e9 - 1) < 0.01
    # We count 36.63B activated (embedding excluded: a lookup, not a matmul), 1.01% below the
    # published figure, which is itself rounded to whole billions: accept that rounding (±0.5B).
    assert abs(activated - 37e9) <= 0.5e9
    assert 36.5e9 < activated < 36.7e9


def test_236b_has_236b_total_and_21b_activated():
    total, activated = param_counts(model_config(compose(["model=236b"]).model))
    assert abs(total / 236e9 - 1) < 0.01
    assert abs(activated / 21e9 - 1) < 0.01


def test_smoke_and_tiny_sizes():
    assert 1e6 < param_counts(model_config(compose(["model=smoke"]).model)).total < 5e6
    assert 80e6 < param_counts(model_config(compose(["model=tiny"]).model)).total < 130e6


@pytest.mark.parametrize("override, key", [
    ("model.n_limited_groups=5", "model.n_limited_groups"),  # > n_expert_groups=4
    ("model.n_routed_experts=18", "model.n_routed_experts"),  # not divisible by 4 groups
    ("model.n_activated_experts=17", "model.n_activated_experts"),  # > n_routed_experts
    ("model.qk_rope_head_dim=15", "model.qk_rope_head_dim"),  # odd rope dim
    ("model.score_func=relu", "model.score_func"),
    ("model.n_dense_layers=9", "model.n_dense_layers"),
    ("model.dim=abc", "model.dim"),  # wrong type
    ("model.foo=1", "model.foo"),  # unknown key
    ("+model.foo=1", "model.foo"),  # unknown key added with +
])
def test_bad_config_is_a_one_line_error_naming_the_field(override, key):
    with pytest.raises(ConfigError) as info:
        model_config(compose([override]).model)
    msg = str(info.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


def test_unknown_key_in_a_preset_file_is_named(tmp_path, monkeypatch):
    import shutil

    import train.config as tc

    conf = tmp_path / "conf"
    shutil.copytree(tc.CONF_DIR, conf)
    (conf / "model" / "broken.yaml").write_text((conf / "model" / "smoke.yaml").read_text() + "bogus_key: 3\n")
    monkeypatch.setattr(tc, "CONF_DIR", conf)
    with pytest.raises(ConfigError, match=r"^model\.bogus_key"):
        tc.compose(["model=broken"])


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="model.nonsense"):
        ModelConfig.from_dict({"nonsense": 1})


@pytest.mark.parametrize("key, allowed", [
    ("fp8.backend", "off, te, torch, emulated"),
    ("trainer.device", "auto, cpu, cuda"),
    ("trainer.dtype", "auto, fp32, bf16"),
    ("trainer.spike.action", "off, skip, rollback"),
    ("parallel.partition", "parameters, flops, uniform"),
    ("model.score_func", "softmax, sigmoid"),
    ("fp8.recipe", "auto, blockwise, tensorwise, rowwise, current, delayed, mxfp8, grad_blocks, e5m2_forward, "
                   "amax_floor"),
])
def test_a_value_outside_a_closed_set_is_one_line_naming_the_key_and_the_choices(key, allowed):
    with pytest.raises(ConfigError) as info:
        compose([f"{key}=bogus"])
    assert str(info.value) == f"{key}='bogus': must be one of {allowed}"


def test_choices_are_their_strings_through_asdict_and_json():
    import json
    from dataclasses import asdict, fields, is_dataclass

    from model.config import Choice
    from parallel.pipeline import PARTITIONS
    from train.config import Config, Partition, choice_type, to_config

    def choice_keys(schema, prefix=""):
        for f in fields(schema):
            sub = getattr(schema(), f.name)
            if is_dataclass(sub):
                yield from choice_keys(type(sub), f"{prefix}{f.name}.")
            elif choice_type(f"{prefix}{f.name}"):
                yield f"{prefix}{f.name}"

    keys = list(choice_keys(Config))
    assert len(keys) == 8, keys
    for key in keys:
        choice = choice_type(key)
        assert [m.name for m in choice] == [m.value for m in choice], key  # OmegaConf looks names up
    assert tuple(Partition) == PARTITIONS
    cfg = to_config(compose(["fp8=emulated", "trainer.dtype=bf16", "parallel.partition=flops"]))
    assert isinstance(cfg.fp8.backend, Choice) and cfg.fp8.backend == "emulated" and f"{cfg.fp8.backend}" == "emulated"
    d = asdict(cfg)
    back = json.loads(json.dumps(d))
    assert back == d and back["trainer"]["dtype"] == "bf16" and type(back["parallel"]["partition"]) is str


def test_a_wrong_group_option_names_the_group_the_option_and_the_available_ones():
    with pytest.raises(ConfigError) as info:
        compose(["model=nonexistent"])
    assert str(info.value) == "model=nonexistent: no such option; available: 16b, 236b, 671b, smoke, tiny"
    with pytest.raises(ConfigError, match=r"^experiment=nope: no such option; available: smoke$"):
        compose(["+experiment=nope"])


def test_a_comma_list_without_multirun_says_how_to_sweep():
    with pytest.raises(ConfigError, match=r"^optim\.lr=1e-3,3e-3: a comma list is a sweep; add -m"):
        compose(["optim.lr=1e-3,3e-3"])


def _ds_kwargs(**over):
    kw = dict(micro_batch_size=2, grad_accum=4, zero_stage=1, grad_clip=1.0, bf16=True, lr=1e-3,
              betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, device_type="cpu")
    return {**kw, **over}


def test_deepspeed_extra_is_deep_merged_after_ours():
    from parallel.engine import deepspeed_config

    base = deepspeed_config(**_ds_kwargs())
    assert deepspeed_config(**_ds_kwargs(extra={})) == base == deepspeed_config(**_ds_kwargs(extra=None))
    extra = {"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 50_000_000},
             "communication_data_type": "fp32", "steps_per_print": 10}
    merged = deepspeed_config(**_ds_kwargs(extra=extra))
    assert merged["zero_optimization"] == {"stage": 1, "overlap_comm": True, "reduce_bucket_size": 50_000_000}
    assert merged["communication_data_type"] == "fp32" and merged["steps_per_print"] == 10
    assert merged["optimizer"] == base["optimizer"] and merged["bf16"] == base["bf16"]
    merged["zero_optimization"]["overlap_comm"] = False
    assert extra["zero_optimization"]["overlap_comm"] is True  # the caller's dict is not aliased


def test_parallel_deepspeed_defaults_to_empty_and_reaches_the_typed_config():
    from train.config import to_config

    assert to_config(compose([])).parallel.deepspeed == {}
    cfg = to_config(compose(["+parallel.deepspeed.zero_optimization.reduce_bucket_size=50000000",
                             "+parallel.deepspeed.zero_optimization.overlap_comm=true",
                             "+parallel.deepspeed.communication_data_type=fp32"]))
    assert cfg.parallel.deepspeed == {"zero_optimization": {"reduce_bucket_size": 50_000_000, "overlap_comm": True},
                                      "communication_data_type": "fp32"}


@pytest.mark.parametrize("override, line", [
    ("gradient_clipping=2.0", "parallel.deepspeed.gradient_clipping: set by moeforge from optim.grad_clip; use that key"),
    ("train_micro_batch_size_per_gpu=8", "parallel.deepspeed.train_micro_batch_size_per_gpu: set by moeforge from "
                                         "trainer.micro_batch_size; use that key"),
    ("train_batch_size=8", "parallel.deepspeed.train_batch_size: set by moeforge from trainer.global_batch_size"),
    ("gradient_accumulation_steps=8", "parallel.deepspeed.gradient_accumulation_steps: set by moeforge from "
                                      "trainer.global_batch_size"),
    ("zero_optimization.stage=2", "parallel.deepspeed.zero_optimization.stage: set by moeforge from parallel.zero_stage"),
    ("zero_optimization=2", "parallel.deepspeed.zero_optimization: set by moeforge from parallel.zero_stage"),
    ("optimizer.params.lr=1.0", "parallel.deepspeed.optimizer: set by moeforge from optim.*; use those keys"),
    ("bf16.enabled=false", "parallel.deepspeed.bf16: set by moeforge from trainer.dtype"),
    ("data_types.grad_accum_dtype=bf16", "parallel.deepspeed.data_types: set by moeforge from trainer.dtype"),
    ("scheduler.type=WarmupLR", "parallel.deepspeed.scheduler: set by moeforge from schedule.*"),
])
def test_a_deepspeed_key_moeforge_sets_is_refused_naming_ours(override, line):
    from train.config import to_config

    with pytest.raises(ConfigError) as info:
        to_config(compose([f"+parallel.deepspeed.{override}"]))
    assert str(info.value).startswith(line) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("override, line", [
    ("bogus_key=1", "parallel.deepspeed.bogus_key: not a DeepSpeed "),
    ("comunication_data_type=fp32", "(did you mean communication_data_type?)"),
    ("zero_optimization.bogus=1", "parallel.deepspeed.zero_optimization.bogus: not a DeepSpeed "),
    ("zero_optimization.reduce_bucket_size=abc", "parallel.deepspeed.zero_optimization.reduce_bucket_size='abc': "),
    ("zero_optimization.offload_optimizer.device=gpu",
     "parallel.deepspeed.zero_optimization.offload_optimizer.device='gpu': Input should be 'none', 'cpu' or 'nvme'"),
    ("tensorboard.bogus=1", "parallel.deepspeed.tensorboard.bogus: not a DeepSpeed "),
    ("communication_data_type=int3", "parallel.deepspeed.communication_data_type: Invalid communication_data_type"),
])
def test_deepspeed_settings_are_checked_against_deepspeeds_schema(override, line):
    from train.config import to_config

    with pytest.raises(ConfigError) as info:
        to_config(compose([f"+parallel.deepspeed.{override}"]))
    msg = str(info.value)
    assert line in msg and "\n" not in msg, msg
