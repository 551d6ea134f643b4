"""Single-process parts of parallel/: layout validation and coordinates, stage partition,
layout-independent initialisation of sharded and per-stage modules."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from model import Transformer
from model.config import ConfigError, ModelConfig
from parallel.expert import ranks_per_node, shard_experts
from parallel.pipeline import BlockPipe, OutputPipe, SharedEmbedding, balanced_stages, layer_costs, spec_parts
from parallel.topology import Layout
from train.config import compose, model_config


def smoke() -> ModelConfig:
    return model_config(compose(["model=smoke"]).model)


@pytest.mark.parametrize("world, pp, ep, needle", [
    (3, 2, 1, "parallel.pp=2: does not divide the world size 3"),
    (4, 2, 4, "parallel.ep=4: does not divide dp=2"),
    (6, 1, 3, "parallel.ep=3: does not divide model.n_routed_experts=16"),
    (10, 5, 1, "parallel.pp=5: more pipeline stages than model.n_layers=4"),
])
def test_layout_errors_name_the_values(world, pp, ep, needle):
    with pytest.raises(ConfigError) as e:
        Layout(world, pp, ep).check(smoke(), zero_stage=1)
    assert needle in str(e.value)


def test_zero2_with_pipelines_is_refused():
    with pytest.raises(ConfigError, match="parallel.zero_stage=2: DeepSpeed's pipeline engine allows ZeRO stage 0 or 1"):
        Layout(4, 2, 1).check(smoke(), zero_stage=2)
    Layout(4, 1, 2).check(smoke(), zero_stage=2)  # fine without a pipeline


def test_groups_follow_deepspeeds_rank_order():
    """pp=2 × dp=4, ep=2: what deepspeed.utils.groups builds (checked again at run time)."""
    lay = Layout(8, 2, 2)
    assert [lay.stage_of(r) for r in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert lay.ep_ranks(5) == [4, 5] and lay.ep_ranks(6) == [6, 7]
    assert lay.edp_ranks(5) == [5, 7] and lay.edp_ranks(0) == [0, 2]
    assert lay.dp_ranks(1) == [4, 5, 6, 7] and lay.edp == 2


def test_balanced_stages_is_optimal_and_contiguous():
    costs = [5.0, 3, 9, 1, 1, 7, 2, 2, 6.0]  # embed, 7 blocks, output
    for pp in range(1, 8):
        bounds = balanced_stages(costs, pp)
        assert bounds[0] == 0 and bounds[-1] == 7 and all(a < b for a, b in zip(bounds, bounds[1:]))
        blocks = list(costs[1:-1])
        blocks[0] += costs[0]
        blocks[-1] += costs[-1]
        got = max(sum(blocks[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = min(max(sum(blocks[a:b]) for a, b in zip((0, *cut), (*cut, 7)))
                   for cut in itertools.combinations(range(1, 7), pp - 1))
        assert got == best


def test_spec_parts_keep_embedding_first_and_output_with_mtp_last():
    # specs: embed, 4 blocks, next-token embed, output
    assert spec_parts([0, 2, 4], has_mtp=True) == [0, 3, 7]
    assert spec_parts([0, 2, 4], has_mtp=False) == [0, 3, 6]


def test_layer_costs_by_method():
    cfg = smoke()
    for method in ("parameters", "flops", "uniform"):
        costs = layer_costs(cfg, method, 256)
        assert len(costs) == cfg.n_layers + 2
    params = layer_costs(cfg, "parameters", 256)
    built = Transformer(cfg)
    assert params[1] == sum(p.numel() for p in built.layers["0"].parameters())
    assert params[2] == sum(p.numel() for p in built.layers["1"].parameters())
    with pytest.raises(ConfigError, match="parallel.partition='bogus'"):
        layer_costs(cfg, "bogus", 256)


def test_weights_do_not_depend_on_the_layout():
    """Per-stage layers and expert shards built from meta equal the single-process model's tensors."""
    cfg = smoke()
    full = Transformer(cfg)
    full.init_weights(seed=7)
    ref = full.state_dict()
    block = BlockPipe(cfg, 2, seed=7)
    for name, t in block.block.state_dict().items():
        assert torch.equal(t, ref[f"layers.2.{name}"]), name
    out = OutputPipe(cfg, seed=7)
    for name, t in out.state_dict().items():
        if not name.startswith("rope"):
            assert torch.equal(t, ref[name]), name
    assert torch.equal(SharedEmbedding(cfg, seed=7).weight, ref["embed.weight"])
    with torch.device("meta"):
        sharded = Transformer(cfg)
    shard_experts(sharded, None, 4, 1)
    sharded.to_empty(device="cpu")
    sharded.init_weights(seed=7)
    E_l = cfg.n_routed_experts // 4
    for w in ("w1", "w2", "w3"):
        got = getattr(sharded.layers["1"].ffn.experts, w)
        assert torch.equal(got, ref[f"layers.1.ffn.experts.{w}"][E_l:2 * E_l])
    assert torch.equal(sharded.layers["1"].ffn.gate.weight, ref["layers.1.ffn.gate.weight"])


def test_every_parameter_is_initialised():
    cfg = smoke()
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    for p in model.parameters():
        p.data.fill_(float("nan"))
    model.init_weights(seed=0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(torch.isfinite(b).all() for b in model.buffers())


@pytest.mark.parametrize("members, local_world, per_node", [
    ([0, 1, 2, 3], 8, 4),  # the whole group inside one node: one hop
    ([0, 1, 2, 3, 4, 5, 6, 7], 4, 4),  # two nodes of four
    ([4, 5, 6, 7], 2, 2),  # a group starting on a later node
    ([0, 1, 2, 3, 4, 5], 4, 6),  # uneven (4 + 2): one hop, never a wrong node map
    ([0, 2, 4, 6], 2, 1),  # one rank on each of four nodes
])
def test_ep_ranks_per_node_from_the_launch(members, local_world, per_node):
    assert ranks_per_node(members, local_world) == per_node


def test_cpu_training_keeps_freed_host_memory_for_reuse():
    """parallel/engine.py keep_freed_host_memory: after it, glibc serves a freed 64 MiB block again
    without page faults; with its defaults every malloc of it is a fresh mapping, faulted in."""
    import subprocess
    import sys

    code = (
        "import ctypes, resource, sys\n"
        "from parallel.engine import keep_freed_host_memory\n"
        "if sys.argv[1] == 'on': assert keep_freed_host_memory()\n"
        "libc = ctypes.CDLL(None)\n"
        "libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
        "def touch(n):\n"
        "    p = libc.malloc(n); ctypes.memset(p, 1, n); libc.free(p)\n"
        "touch(1 << 26)\n"
        "f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(5): touch(1 << 26)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)\n")
    faults = {}
    for mode in ("off", "on"):
        r = subprocess.run([sys.executable, "-c", code, mode], cwd=Path(__file__).resolve().parents[2],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        faults[mode] = int(r.stdout.split()[-1])
    assert faults["off"] > 5 * 10_000 and faults["on"] < 1_000, faults  # 64 MiB = 16,384 pages
