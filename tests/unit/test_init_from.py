"""`checkpoint.init_from` in one process: a Hugging Face folder read as ranges (model/hf_reader.py).

The multi-process run (pp=2 × ep=2, each rank reading only what it holds) is
tests/distributed/test_resume.py::test_init_from_a_hugging_face_folder_at_pp2_ep2.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

import model.hf as hf
from model.hf_config import HFCheckpointError
from model.hf_reader import HFRangeReader
from parallel import state as pstate
from tests.unit.test_export import build, small_cfg


def restored(reader, cfg):
    from model import Transformer

    torch.manual_seed(123)
    fresh = Transformer(cfg)
    fresh.init_weights(123)
    pstate.restore(pstate.WeightsOnly(reader), fresh, SimpleNamespace(state={}), cfg.n_routed_experts, step=0)
    return fresh


def assert_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_every_tensor_equals_hf_load_and_expert_ranges_read_only_their_experts(tmp_path):
    cfg = small_cfg(n_mtp_layers=1)
    hf.save(build(cfg), tmp_path / "hf", max_shard_bytes=40_000)
    reference = hf.load(tmp_path / "hf")
    reader = HFRangeReader(tmp_path / "hf", cfg)
    assert_equal(restored(reader, cfg), reference)
    w1 = reference.state_dict()["layers.1.ffn.experts.w1"]  # (8, 32, 64)
    per = w1[0].numel()
    reader._ckpt.used.clear()
    got = reader.read("param", "layers.1.ffn.experts.w1", 3 * per + 5, 2 * per)  # expert 3 (part) to 5 (part)
    assert torch.equal(got, w1.reshape(-1)[3 * per + 5:5 * per + 5])
    assert reader._ckpt.used == {f"model.layers.1.mlp.experts.{j}.gate_proj.weight" for j in (3, 4, 5)}


def test_fused_experts_and_rotate_half_rope_read_as_hf_load_does(tmp_path):
    cfg = small_cfg(n_mtp_layers=0)
    hf.save(build(cfg), tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    for i in (1, 2):
        p = f"model.layers.{i}.mlp.experts."
        g = torch.stack([tensors.pop(f"{p}{j}.gate_proj.weight") for j in range(8)])
        u = torch.stack([tensors.pop(f"{p}{j}.up_proj.weight") for j in range(8)])
        tensors[f"{p}gate_up_proj"] = torch.cat([g, u], dim=1)
        tensors[f"{p}down_proj"] = torch.stack([tensors.pop(f"{p}{j}.down_proj.weight") for j in range(8)])
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "rope_interleave": False}))
    assert_equal(restored(HFRangeReader(tmp_path / "hf", cfg), cfg), hf.load(tmp_path / "hf"))


def test_a_folder_of_another_model_is_refused(tmp_path):
    hf.save(build(small_cfg(n_mtp_layers=0)), tmp_path / "hf")
    with pytest.raises(HFCheckpointError, match=r"config.json: model.dim is 64 there but 128 in this run"):
        HFRangeReader(tmp_path / "hf", small_cfg(dim=128))
    reader = HFRangeReader(tmp_path / "hf", small_cfg(n_mtp_layers=1))  # MTP depth may differ, but not be missing
    with pytest.raises(HFCheckpointError, match="missing tensor model.layers.3.enorm.weight"):
        restored(reader, small_cfg(n_mtp_layers=1))
